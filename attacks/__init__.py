"""Gradient-inversion and label-recovery attacks, run on exactly what the server observes.

The check a site runs on a received model (imprint attacks) is client-side code: :mod:`privfl.received_model`.
"""

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
    ServerView,
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
    imprint_model,
)
from .inverting import InvertingGradients
from .labels import LabelRecovery, recover_labels

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
    "LabelRecovery",
    "ModelTamperError",
    "Observation",
    "Placement",
    "Reconstruction",
    "Reduction",
    "ServerView",
    "Statistic",
    "UpdateObservation",
    "imprint_model",
    "recover_labels",
    "update_label_counts",
]
