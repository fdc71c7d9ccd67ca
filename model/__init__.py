"""The shared model: data contract, samples and tokenizers, the fusion network and presets,
devices, training and evaluation steps, and the wire contract.

Imports no other medfed package.
"""
