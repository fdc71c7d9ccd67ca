"""medfed: federated learning for hospital consortia, with differential privacy, over Flower."""

__version__ = "0.1.0"
