"""The privfl error hierarchy: every error the toolkit raises on purpose derives from PrivflError."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing these at run time would pull in numpy and torch
    from privfl.audit.empirical import AuditOutcome
    from privfl.received_model import Finding

__all__ = [
    "AttackError",
    "AuditFailure",
    "BudgetExceededError",
    "ConfigError",
    "DecryptionError",
    "DeploymentError",
    "LedgerError",
    "MessageError",
    "ModelTamperError",
    "PrivacyWarning",
    "PrivflError",
    "ProtocolAbort",
    "ProtocolError",
    "RunLockedError",
]


class PrivflError(Exception):
    """Root of all errors raised by privfl."""


class PrivacyWarning(UserWarning):
    """A run's settings void or weaken its privacy claim (a ``privfl lint`` ERROR), though it can run.

    Warned once per run start; ``warnings.simplefilter("error", PrivacyWarning)`` turns it into an
    exception for pipelines that must refuse such runs.
    """


class ConfigError(PrivflError, ValueError):
    """A configuration value is invalid.

    The message always names the field and the bad value, e.g.
    ``ConfigError("num_clients", 1, "must be at least 2")``.
    """

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}={value!r}: {reason}")


class BudgetExceededError(PrivflError):
    """An operation would take a client past its privacy budget."""


class ProtocolError(PrivflError):
    """A protection protocol was used out of order or with inconsistent state."""


class MessageError(ProtocolError):
    """A message from a peer is malformed, truncated, oversized, for the wrong round or unauthenticated.

    The sender is treated as dropped for the round; the protocol goes on without it.
    """

    def __init__(self, reason: str, *, sender: str | None = None) -> None:
        self.reason = reason
        self.sender = sender
        prefix = f"message from {sender!r}: " if sender is not None else ""
        super().__init__(prefix + reason)


class ProtocolAbort(ProtocolError):
    """A protocol cannot complete safely (e.g. too few survivors); nothing is revealed."""

    def __init__(self, message: str, *, survivors: int | None = None, threshold: int | None = None) -> None:
        self.survivors = survivors
        self.threshold = threshold
        super().__init__(message)


class DecryptionError(PrivflError):
    """Decryption or authentication failed. Deliberately opaque: it never says why."""

    def __init__(self) -> None:
        super().__init__("decryption failed")


class AttackError(PrivflError):
    """An attack cannot run on the observation it was given (e.g. a ciphertext)."""


class ModelTamperError(PrivflError):
    """A model received from the server differs from the agreed one, or carries an imprint signature.

    Raised on the client by :func:`privfl.verify_received_model` and
    :func:`privfl.received_model.verify_model_architecture`; the client should refuse to train on the model.

    Attributes:
        findings: What the check found.
    """

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = list(findings)
        lines = "; ".join(f"[{f.kind.value}] {f.location}: {f.detail}" for f in self.findings[:5])
        more = f" (+{len(self.findings) - 5} more)" if len(self.findings) > 5 else ""
        super().__init__(f"received model rejected: {lines}{more}")


class AuditFailure(PrivflError):
    """An empirical audit certified more privacy loss than the accountant claimed.

    Raised by :func:`privfl.audit.compare_to_claim` unless it is called with ``raise_on_failure=False``.

    Attributes:
        outcome: The FAILED :class:`~privfl.audit.AuditOutcome`; the message is its message.
    """

    def __init__(self, outcome: AuditOutcome) -> None:
        self.outcome = outcome
        super().__init__(outcome.message)


class LedgerError(PrivflError):
    """A privacy ledger cannot be trusted: unreadable, corrupt, truncated mid-chain or edited.

    Spending is never reset on this error: a run refuses to resume until the ledger is repaired.
    """

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"ledger {path}: {problem}")


class DeploymentError(PrivflError):
    """A deployment's process did not start or died, or its run failed (the message names the log file)."""


class RunLockedError(PrivflError):
    """Another process holds the run directory; two runs on one directory would lose spending."""

    def __init__(self, path: str, holder: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(f"run directory {path} is in use by {holder}; wait for it to finish or choose another --out")
