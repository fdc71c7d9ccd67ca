"""The hospital side: the site trainer, and the Flower ClientApp that reaches it.

Imports `model`, `privacy` and `sites`; never `coordinator`.
"""
