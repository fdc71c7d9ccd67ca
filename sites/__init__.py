"""Site data: reading a hospital's files onto the study's contract, and synthetic consortia.

Imports `model` (the data contract) and nothing else of medfed.
"""
