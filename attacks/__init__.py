"""Gradient-inversion and label-recovery attacks, run on exactly what the server observes."""

from .analytic import AnalyticLinear
from .base import (
    AggregateObservation,
    Attack,
    CiphertextObservation,
    DPGradientObservation,
    GradientObservation,
    Observation,
    Reconstruction,
    Reduction,
    UpdateObservation,
)
from .dlg import DLG
from .inverting import InvertingGradients
from .labels import recover_labels

__all__ = [
    "Attack",
    "Observation",
    "GradientObservation",
    "DPGradientObservation",
    "UpdateObservation",
    "AggregateObservation",
    "Reduction",
    "CiphertextObservation",
    "Reconstruction",
    "AnalyticLinear",
    "DLG",
    "InvertingGradients",
    "recover_labels",
]
