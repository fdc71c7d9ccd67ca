"""The consortium side: the Flower ServerApp, the round loop, validation and aggregation.

Imports `model` and `privacy`; never `client`.
"""
