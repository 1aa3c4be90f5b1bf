"""privfl: privacy-preserving federated learning with DP-SGD, CKKS, secure aggregation and audits.

The names below are imported on first use (PEP 562), so ``import privfl`` and light submodules such as
``privfl.errors`` or ``privfl.protocols.secagg`` do not pull in torch: a refused command line answers
at once, and a process that only aggregates needs numpy and cryptography.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from privfl.errors import (
    BudgetExceededError,
    ConfigError,
    DecryptionError,
    MessageError,
    PrivflError,
    ProtocolAbort,
)

__version__ = "0.1.0"

_LAZY = {
    "ClientBudget": "privfl.accounting",
    "DPEvent": "privfl.accounting",
    "LedgerKey": "privfl.accounting",
    "PrivacyLedger": "privfl.accounting",
    "CkksConfig": "privfl.config",
    "ClippingMode": "privfl.config",
    "DPConfig": "privfl.config",
    "FederationConfig": "privfl.config",
    "ProtectionKind": "privfl.config",
    "RunConfig": "privfl.config",
    "TrainingConfig": "privfl.config",
    "export_model": "privfl.export",
    "load_model": "privfl.export",
    "Federation": "privfl.federation",
    "RunResult": "privfl.federation",
    "RoundRecord": "privfl.results",
    "RunSummary": "privfl.results",
    "SiteSummary": "privfl.results",
    "SecAggConfig": "privfl.protocols.secagg",
    "SharedKeyConfig": "privfl.protocols.shared_key",
    "check_model_for_imprint": "privfl.received_model",
    "verify_model_architecture": "privfl.received_model",
    "verify_received_model": "privfl.received_model",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from privfl.accounting import ClientBudget, DPEvent, LedgerKey, PrivacyLedger
    from privfl.config import (
        CkksConfig,
        ClippingMode,
        DPConfig,
        FederationConfig,
        ProtectionKind,
        RunConfig,
        TrainingConfig,
    )
    from privfl.export import export_model, load_model
    from privfl.federation import Federation, RunResult
    from privfl.protocols.secagg import SecAggConfig
    from privfl.protocols.shared_key import SharedKeyConfig
    from privfl.received_model import check_model_for_imprint, verify_model_architecture, verify_received_model
    from privfl.results import RoundRecord, RunSummary, SiteSummary


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'privfl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BudgetExceededError",
    "CkksConfig",
    "ClientBudget",
    "ClippingMode",
    "ConfigError",
    "DPConfig",
    "DPEvent",
    "DecryptionError",
    "Federation",
    "FederationConfig",
    "LedgerKey",
    "MessageError",
    "PrivacyLedger",
    "PrivflError",
    "ProtectionKind",
    "ProtocolAbort",
    "RoundRecord",
    "RunConfig",
    "RunResult",
    "RunSummary",
    "SecAggConfig",
    "SharedKeyConfig",
    "SiteSummary",
    "TrainingConfig",
    "check_model_for_imprint",
    "export_model",
    "load_model",
    "verify_model_architecture",
    "verify_received_model",
]
