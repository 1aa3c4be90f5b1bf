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
from .fedavg import FedAvgInversion, update_label_counts
from .imprint import (
    ImprintAttack,
    ImprintBlock,
    ImprintReconstruction,
    ModelTamperError,
    Placement,
    Statistic,
    check_model_for_imprint,
    imprint_model,
    verify_model_architecture,
    verify_received_model,
)
from .inverting import InvertingGradients
from .labels import recover_labels

__all__ = [
    "DLG",
    "AggregateObservation",
    "AnalyticLinear",
    "Attack",
    "CiphertextObservation",
    "DPGradientObservation",
    "FedAvgInversion",
    "GradientObservation",
    "ImprintAttack",
    "ImprintBlock",
    "ImprintReconstruction",
    "InvertingGradients",
    "ModelTamperError",
    "Observation",
    "Placement",
    "Reconstruction",
    "Reduction",
    "Statistic",
    "UpdateObservation",
    "check_model_for_imprint",
    "imprint_model",
    "recover_labels",
    "update_label_counts",
    "verify_model_architecture",
    "verify_received_model",
]
