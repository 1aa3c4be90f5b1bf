"""Privacy accounting: epsilon for DP-SGD events, noise calibration, and the per-client privacy ledger.

What happened is kept apart from how it is counted. A :class:`DPEvent` records a run of
Poisson-sampled Gaussian steps ("``steps`` steps at sampling rate ``q`` with noise multiplier
``sigma``"); an accountant (PRV by default, RDP on request) turns a list of events into
``epsilon(delta)``. The :class:`PrivacyLedger` stores, for every client and every round, the events
and the epsilon spent so far, refuses training that would exceed a client's budget, and is written
to the run directory so that a restart can never reset a budget.

DP-SGD mechanism (Abadi et al. 2016): each step samples every example independently with
probability ``q`` (Poisson sampling), clips each per-example gradient to L2 norm ``C``
(``max_grad_norm``), sums, and adds N(0, (sigma * C)^2 I). Its privacy loss is that of the
Poisson-subsampled Gaussian mechanism composed over the steps, which the PRV accountant
(Gopi, Lee, Wutschitz 2021) computes to within ``eps_error`` and the RDP accountant
(Mironov 2017) upper-bounds.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

from privfl.errors import BudgetExceededError, ConfigError

__all__ = [
    "Accountant",
    "DPEvent",
    "epsilon",
    "epsilon_of_events",
    "noise_multiplier",
    "LedgerEntry",
    "ClientBudget",
    "PrivacyLedger",
    "LedgerStatus",
    "merge_events",
]


class Accountant(str, Enum):
    """How DP-SGD events are composed into (epsilon, delta)."""

    PRV = "prv"
    """Privacy random variables (tightest; default)."""
    RDP = "rdp"
    """Renyi DP (a valid, looser upper bound)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DPEvent:
    """``steps`` Poisson-sampled Gaussian steps at ``sample_rate`` with ``noise_multiplier``."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError("noise_multiplier", self.noise_multiplier, "must be a finite number > 0")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError("sample_rate", self.sample_rate, "must be in (0, 1]")
        if not (isinstance(self.steps, int) and self.steps >= 0):
            raise ConfigError("steps", self.steps, "must be an integer >= 0")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ConfigError("delta", delta, "must be in (0, 1)")


def _accountant(kind: Accountant | str) -> Accountant:
    try:
        return Accountant(kind)
    except ValueError:
        raise ConfigError("accountant", kind, f"must be one of {[a.value for a in Accountant]}") from None


def epsilon_of_events(events: Sequence[DPEvent], *, delta: float, accountant: Accountant | str = Accountant.PRV) -> float:
    """Epsilon at ``delta`` of the composition of ``events``.

    Args:
        events: what happened, in any order (composition is commutative).
        delta: the target delta, in (0, 1).
        accountant: ``"prv"`` (default) or ``"rdp"``.

    Returns:
        Epsilon; 0.0 when no step was taken.

    Raises:
        ConfigError: a bad delta or accountant name.
    """
    _check_delta(delta)
    kind = _accountant(accountant)
    merged = tuple(sorted((e.noise_multiplier, e.sample_rate, e.steps) for e in merge_events(events) if e.steps > 0))
    if not merged:
        return 0.0
    return _composed_epsilon(merged, delta, kind)


@functools.lru_cache(maxsize=4096)
def _composed_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, kind: Accountant) -> float:
    # Cached: the ledger asks for the same compositions every round (budget check, then charge).
    history = list(history)
    if kind is Accountant.RDP:
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
        acc.history = history
        return float(acc.get_epsilon(delta))
    import numpy as np
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = history
    # eps_error bounds the PRV discretisation error (absolute, 0.01); the result is an upper bound.
    # At q = 1 the PRV's log(1 - q) is -inf by design; numpy's warning about it is noise.
    with np.errstate(divide="ignore"):
        return float(acc.get_epsilon(delta, eps_error=0.01))


def epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant | str = Accountant.PRV,
) -> float:
    """Epsilon of ``steps`` DP-SGD steps (Poisson sampling at ``sample_rate``, Gaussian noise).

    Args:
        noise_multiplier: sigma, the noise standard deviation over the clipping norm.
        sample_rate: q, the probability that each example is in a step's batch.
        steps: number of steps.
        delta: target delta.
        accountant: ``"prv"`` (default, tightest) or ``"rdp"``.

    Returns:
        Epsilon at ``delta``.
    """
    event = DPEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    return epsilon_of_events([event], delta=delta, accountant=accountant)


def noise_multiplier(
    *,
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant | str = Accountant.PRV,
) -> float:
    """The smallest noise multiplier whose ``steps`` steps stay within ``target_epsilon``.

    Bisection on sigma (epsilon falls monotonically as sigma grows); the result satisfies
    ``epsilon(noise_multiplier=result, ...) <= target_epsilon`` and is within 0.1% of the tightest
    such sigma.

    Raises:
        ConfigError: a non-positive target, or a target that no sigma <= 1e4 reaches.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError("target_epsilon", target_epsilon, "must be a finite number > 0")
    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigError("steps", steps, "must be an integer >= 1")

    def eps_at(sigma: float) -> float:
        return epsilon(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant)

    low, high = 0.0, 1.0
    while eps_at(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ConfigError("target_epsilon", target_epsilon, "unreachable: needs a noise multiplier above 1e4")
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        if eps_at(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientBudget:
    """A client's sample-level privacy budget: every record in its data gets (epsilon, delta)-DP."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not (self.epsilon > 0):
            raise ConfigError("epsilon", self.epsilon, "a budget must be a number > 0 (math.inf for no cap)")
        _check_delta(self.delta)


class LedgerStatus(str, Enum):
    """What happened to a client in a round."""

    TRAINED = "trained"
    """It trained with DP-SGD; the steps are charged even if its update was later dropped."""
    SKIPPED_BUDGET = "skipped_budget"
    """It was sampled but another round would exceed its budget, so it did not touch its data."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LedgerEntry:
    """One line of the ledger: a client in a round."""

    round: int
    client: str
    status: LedgerStatus
    steps: int
    sample_rate: float
    noise_multiplier: float
    epsilon: float
    """Epsilon spent so far (all rounds up to and including this one) at the client's delta."""
    delta: float
    note: str = ""


@dataclass(slots=True)
class _ClientAccount:
    budget: ClientBudget
    events: list[DPEvent] = field(default_factory=list)


class PrivacyLedger:
    """Per-client, per-round record of DP-SGD spending, with budget enforcement and persistence.

    Args:
        accountant: how events are composed (PRV by default).

    The ledger is append-only: entries are never edited, and :meth:`load` rebuilds every client's
    events from the file, so a resumed run continues from what was really spent.
    """

    FORMAT_VERSION = 1

    def __init__(self, *, accountant: Accountant | str = Accountant.PRV) -> None:
        self.accountant = _accountant(accountant)
        self._accounts: dict[str, _ClientAccount] = {}
        self._entries: list[LedgerEntry] = []

    # -- registration -----------------------------------------------------------------------
    def register(self, client: str, budget: ClientBudget) -> None:
        """Adds a client with its budget; re-registering with the same budget is a no-op.

        Raises:
            ConfigError: the client is already registered with a different budget.
        """
        existing = self._accounts.get(client)
        if existing is None:
            self._accounts[client] = _ClientAccount(budget=budget)
        elif existing.budget != budget:
            raise ConfigError(
                f"budget[{client}]", budget, f"differs from the ledger's recorded budget {existing.budget}"
            )

    @property
    def clients(self) -> tuple[str, ...]:
        return tuple(self._accounts)

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        return tuple(self._entries)

    def budget(self, client: str) -> ClientBudget:
        return self._account(client).budget

    def events(self, client: str) -> tuple[DPEvent, ...]:
        return tuple(self._account(client).events)

    def _account(self, client: str) -> _ClientAccount:
        try:
            return self._accounts[client]
        except KeyError:
            raise ConfigError("client", client, "is not registered in the ledger") from None

    # -- accounting ---------------------------------------------------------------------------
    def epsilon(self, client: str) -> float:
        """Epsilon the client has spent so far, at its budget's delta."""
        account = self._account(client)
        return epsilon_of_events(account.events, delta=account.budget.delta, accountant=self.accountant)

    def epsilon_if(self, client: str, event: DPEvent) -> float:
        """Epsilon the client would have spent after ``event``."""
        account = self._account(client)
        return epsilon_of_events([*account.events, event], delta=account.budget.delta, accountant=self.accountant)

    def can_afford(self, client: str, event: DPEvent) -> bool:
        """Whether ``event`` keeps the client within its epsilon budget."""
        return self.epsilon_if(client, event) <= self._account(client).budget.epsilon

    def charge(self, round_index: int, client: str, event: DPEvent, *, note: str = "") -> LedgerEntry:
        """Records that the client trained in this round.

        Raises:
            BudgetExceededError: the event would take the client past its budget (nothing is recorded).
        """
        account = self._account(client)
        spent = self.epsilon_if(client, event)
        if spent > account.budget.epsilon:
            raise BudgetExceededError(
                f"client {client!r}: round {round_index} would spend epsilon {spent:.3f} "
                f"> budget {account.budget.epsilon:.3f}"
            )
        account.events.append(event)
        entry = LedgerEntry(
            round=round_index,
            client=client,
            status=LedgerStatus.TRAINED,
            steps=event.steps,
            sample_rate=event.sample_rate,
            noise_multiplier=event.noise_multiplier,
            epsilon=spent,
            delta=account.budget.delta,
            note=note,
        )
        self._entries.append(entry)
        return entry

    def record_skip(self, round_index: int, client: str, *, reason: str) -> LedgerEntry:
        """Records that a sampled client did not train because of its budget."""
        account = self._account(client)
        entry = LedgerEntry(
            round=round_index,
            client=client,
            status=LedgerStatus.SKIPPED_BUDGET,
            steps=0,
            sample_rate=0.0,
            noise_multiplier=0.0,
            epsilon=self.epsilon(client),
            delta=account.budget.delta,
            note=reason,
        )
        self._entries.append(entry)
        return entry

    def rounds(self, client: str, status: LedgerStatus) -> int:
        """How many rounds the client has with this status."""
        return sum(1 for e in self._entries if e.client == client and e.status is status)

    def annotate_last(self, client: str, note: str) -> None:
        """Appends a note to the client's latest entry (e.g. its update was dropped in aggregation)."""
        for i in range(len(self._entries) - 1, -1, -1):
            entry = self._entries[i]
            if entry.client == client:
                joined = f"{entry.note}; {note}" if entry.note else note
                fields = {name: getattr(entry, name) for name in LedgerEntry.__slots__}
                fields["note"] = joined
                self._entries[i] = LedgerEntry(**fields)
                return

    # -- persistence ----------------------------------------------------------------------------
    def to_json(self) -> dict:
        """A JSON-ready dict of the whole ledger."""
        return {
            "format_version": self.FORMAT_VERSION,
            "accountant": self.accountant.value,
            # JSON has no infinity: an uncapped budget is written as null.
            "budgets": {
                c: {"epsilon": None if math.isinf(a.budget.epsilon) else a.budget.epsilon, "delta": a.budget.delta}
                for c, a in self._accounts.items()
            },
            "entries": [{**asdict(e), "status": e.status.value} for e in self._entries],
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the ledger atomically (a crash mid-write never leaves a truncated ledger)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".ledger-", suffix=".tmp", delete=False) as fh:
            json.dump(self.to_json(), fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
            tmp = fh.name
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Reads a ledger written by :meth:`save`, rebuilding every client's events.

        Raises:
            ConfigError: the file is not a privfl ledger.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("format_version") != cls.FORMAT_VERSION:
                raise ConfigError("ledger", str(path), f"unsupported format_version {data.get('format_version')!r}")
            ledger = cls(accountant=data["accountant"])
            for client, budget in data["budgets"].items():
                eps = math.inf if budget["epsilon"] is None else float(budget["epsilon"])
                ledger.register(client, ClientBudget(epsilon=eps, delta=float(budget["delta"])))
            for raw in data["entries"]:
                entry = LedgerEntry(**{**raw, "status": LedgerStatus(raw["status"])})
                ledger._entries.append(entry)
                if entry.status is LedgerStatus.TRAINED:
                    ledger._accounts[entry.client].events.append(
                        DPEvent(noise_multiplier=entry.noise_multiplier, sample_rate=entry.sample_rate, steps=entry.steps)
                    )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError("ledger", str(path), f"is not a valid privfl ledger: {exc}") from exc
        return ledger


def merge_events(events: Iterable[DPEvent]) -> list[DPEvent]:
    """Merges events with equal (noise_multiplier, sample_rate) so accounting stays fast over many rounds."""
    merged: dict[tuple[float, float], int] = {}
    for e in events:
        key = (e.noise_multiplier, e.sample_rate)
        merged[key] = merged.get(key, 0) + e.steps
    return [DPEvent(noise_multiplier=s, sample_rate=q, steps=n) for (s, q), n in merged.items()]
