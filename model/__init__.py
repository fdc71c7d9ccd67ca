"""The shared model: its network, training and evaluation steps, and the wire contract.

Imports no other medfed package.
"""
