"""privfl: privacy-preserving federated learning with DP-SGD, CKKS, secure aggregation and audits."""

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
from privfl.errors import (
    BudgetExceededError,
    ConfigError,
    DecryptionError,
    MessageError,
    PrivflError,
    ProtocolAbort,
)
from privfl.export import export_model, load_model
from privfl.federation import Federation, RunResult
from privfl.protocols.secagg import SecAggConfig

__version__ = "0.1.0"

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
    "RunConfig",
    "RunResult",
    "SecAggConfig",
    "TrainingConfig",
    "export_model",
    "load_model",
]
