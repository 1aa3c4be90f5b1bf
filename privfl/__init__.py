"""privfl: privacy-preserving federated learning with DP-SGD, CKKS, secure aggregation and audits."""

__version__ = "0.1.0"
