"""Privacy and security: DP-SGD, the accountant and ledger, and the consortium's PKI.

Imports no other medfed package.
"""
