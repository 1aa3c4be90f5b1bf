"""Secure aggregation (Bonawitz et al. 2017, SecAgg+)."""
