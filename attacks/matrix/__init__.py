"""The attack matrix behind ``privfl attack``: every attack against every server view, scored against chance.

``config`` holds what to run (``AttackMatrixConfig``, read from TOML), ``cells`` runs one attack on one
setting and scores it, ``render`` writes the table and the grids, ``run`` drives the matrix and writes
``results.json``, ``results.md`` and ``grid-<dataset>.png``. See docs/attacks.md, "The attack matrix".
"""

from .cells import AttackRow
from .config import (
    AggregateSettings,
    AttackKind,
    AttackMatrixConfig,
    DatasetMatrix,
    DLGSettings,
    DPSettings,
    FedAvgSettings,
    InvertingSettings,
    attack_config_from_dict,
    default_attack_config,
    load_attack_config,
)
from .render import print_attack_summary
from .run import AttackMatrixInterrupted, AttackMatrixResult, run_attack_matrix

__all__ = [
    "AggregateSettings",
    "AttackKind",
    "AttackMatrixConfig",
    "AttackMatrixInterrupted",
    "AttackMatrixResult",
    "AttackRow",
    "DLGSettings",
    "DPSettings",
    "DatasetMatrix",
    "FedAvgSettings",
    "InvertingSettings",
    "attack_config_from_dict",
    "default_attack_config",
    "load_attack_config",
    "print_attack_summary",
    "run_attack_matrix",
]
