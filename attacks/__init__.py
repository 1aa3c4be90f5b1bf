"""Gradient-inversion and label-recovery attacks, run on exactly what the server observes."""
