"""Privacy accounting: epsilon for DP-SGD events, noise calibration, and the per-client privacy ledger.

What happened is kept apart from how it is counted. A :class:`DPEvent` records a run of
Poisson-sampled Gaussian steps ("``steps`` steps at sampling rate ``q`` with noise multiplier
``sigma``"); an accountant (PRV by default, PLD or RDP on request) turns a list of events into
``epsilon(delta)``. The :class:`PrivacyLedger` stores, for every client and every round, the events
and the epsilon spent so far, refuses training that would exceed a client's budget, and is kept in
the run directory as an append-only, hash-chained journal so that a restart can never reset a
budget (format below).

DP-SGD mechanism (Abadi et al. 2016): each step samples every example independently with
probability ``q`` (Poisson sampling), clips each per-example gradient to L2 norm ``C``
(``max_grad_norm``), sums, and adds N(0, (sigma * C)^2 I). Its privacy loss is that of the
Poisson-subsampled Gaussian mechanism composed over the steps, which the PRV accountant
(Gopi, Lee, Wutschitz 2021) computes to within ``eps_error``, the PLD accountant (dp-accounting's
pessimistic privacy loss distributions, Doroshenko et al. 2022) bounds from above on a loss grid
fitted to the answer, and the RDP accountant (Mironov 2017) upper-bounds over a wide order grid.
All three are upper bounds. Each call takes bounded time and memory: where PRV's mesh would exceed
a million points (many steps at little noise, where it took minutes and gigabytes) the composition
is answered by PLD instead.

Ledger journal (format 2, ``ledger.jsonl``): one JSON object per line, each written with a single
``write`` and fsynced before the method that wrote it returns, so a charge is on disk before the
update it pays for leaves the client. Lines are canonical JSON (sorted keys, no spaces) and each
carries ``prev``, the SHA-256 of the previous line's bytes (the first line's ``prev`` is
:data:`GENESIS`); with a :class:`LedgerKey` each line also carries ``mac``, HMAC-SHA256 of the line
without its ``mac`` under the site-local key. Line kinds: ``header`` (format, accountant, run
identity), ``budget`` (a client's cap), ``entry`` (a :class:`LedgerEntry`), ``note`` (appended to the
client's latest entry), ``resume`` (a run resumed at a round: earlier entries of that round or later
belong to an interrupted attempt; they stay charged). Loading replays and verifies every line.

What the chain and the MAC protect against: the chain detects any edit, removal or reordering of a
line by someone who does not recompute the hashes after it; the MAC detects it for anyone who cannot
read the key file. Neither detects a consistent rollback (the tail cut off, or an older copy of the
whole directory restored): for that, compare the head hash the audit prints with a copy kept
elsewhere. Someone who can read ``ledger.key`` can forge the whole ledger.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import stat
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from privfl.errors import BudgetExceededError, ConfigError, LedgerError

__all__ = [
    "Accountant",
    "DPEvent",
    "epsilon",
    "epsilon_of_events",
    "noise_multiplier",
    "LedgerEntry",
    "LedgerKey",
    "ClientBudget",
    "PrivacyLedger",
    "LedgerStatus",
    "merge_events",
]


class Accountant(str, Enum):
    """How DP-SGD events are composed into (epsilon, delta)."""

    PRV = "prv"
    """Privacy random variables (Opacus; tight; default). Falls back to PLD where its mesh would be too large."""
    RDP = "rdp"
    """Renyi DP (a valid, looser upper bound)."""
    PLD = "pld"
    """Privacy loss distributions (dp-accounting, pessimistic estimate; tight, bounded time and memory)."""


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
        accountant: ``"prv"`` (default), ``"pld"`` or ``"rdp"``.

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


_PRV_MAX_MESH_POINTS = 1_000_000
"""Opacus' PRV accountant takes about a second per million mesh points, and its mesh reached 5.8e9
points (MemoryError) at sigma 0.5, q 0.5, 50k steps; above the cap PLD answers instead."""

_PLD_COARSE_INTERVAL = 1e-2
_PLD_FINE_INTERVAL = 1e-3
_PLD_FINEST_INTERVAL = 1e-5
_PLD_LARGE_EPSILON = 1000.0
"""Above this epsilon a 1e-2 loss grid changes no reported digit, and a finer one costs seconds."""

# Renyi orders: fractional ones close to 1 answer large epsilons (the best order is near
# 1 + log(1/delta) / epsilon), large ones answer small epsilons (the conversion term is about
# log(1/delta) / (order - 1), so a grid that stops at 63 cannot certify below ~0.1 at delta 1e-5).
# Every order is a valid bound; the grid only decides how tight the minimum is. Orders above 4096
# cost up to a second per distinct (sigma, q) and add nothing above epsilon ~0.003.
_RDP_ORDERS: tuple[float, ...] = tuple(
    sorted(
        {1.001, 1.002, 1.005, 1.01, 1.02, 1.03, 1.05, 1.075, 1.15, 1.25, 1.75}  # 1.25, 1.75: dp-accounting's
        | {round(1 + x / 10, 1) for x in range(1, 30)}
        | {round(4 + x / 4, 2) for x in range(16)}
        | {round(8 + x / 2, 1) for x in range(7)}
        | {float(a) for a in range(2, 64)}
        | {64.0, 80.0, 96.0, 128.0, 160.0, 192.0, 256.0, 384.0, 512.0, 768.0, 1024.0, 1536.0, 2048.0, 3072.0, 4096.0}
    )
)
"""Fractional orders cost ~5 ms each per distinct (sigma, q); these ~55 keep a call near 0.2 s."""

_RDP_TAIL_ORDERS: tuple[float, ...] = (1.1, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0, 256.0, 512.0)
"""Orders for the PRV mesh's tail bounds: any valid bound serves, a looser one only widens the mesh."""


class _DroppedOrderFilter(logging.Filter):
    """Drops dp-accounting's notice that a fractional Renyi order's series did not converge.

    dp-accounting then leaves that order out, which can only loosen the minimum over orders; the
    notice is about privfl's grid, not the user's run. Other absl messages pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


_DROPPED_ORDER_FILTER = _DroppedOrderFilter()


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError:  # pragma: no cover - a runtime dependency since 0.1
        raise ImportError("privfl's accountants need dp-accounting: pip install 'dp-accounting>=0.4'") from None
    absl_log = logging.getLogger("absl")
    if _DROPPED_ORDER_FILTER not in absl_log.filters:
        absl_log.addFilter(_DROPPED_ORDER_FILTER)
    return dp_accounting


def _dp_event(history: Sequence[tuple[float, float, int]]):
    dpa = _dp_accounting()
    return dpa.ComposedDpEvent(
        [
            dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
            for sigma, q, steps in history
        ]
    )


def _pld_at(history: Sequence[tuple[float, float, int]], delta: float, interval: float) -> float:
    dpa = _dp_accounting()
    acc = dpa.pld.PLDAccountant(
        neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=interval
    )
    acc.compose(_dp_event(history))
    import numpy as np

    # At epsilons in the thousands dp-accounting's epsilon search divides tiny masses; the
    # overflow it warns about resolves to the right (infinite-ratio) branch.
    with np.errstate(over="ignore", divide="ignore"):
        return float(acc.get_epsilon(delta))


def _pld_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """PLD epsilon with the loss grid refined to the answer's scale.

    dp-accounting's pessimistic PLD is an upper bound at any grid; a coarse grid only makes it
    looser. A grid of 1e-2 is cheap everywhere (<= 0.2 s at 50k steps) and bounds the answer;
    the grid is then refined to about epsilon / 10 000 beyond 1000 steps, epsilon / 1000 up to
    them (between 1e-5 and 1e-3): the pessimistic rounding accumulates over the steps, and at
    epsilon / 1000 it still added 19% at sigma 5, q 0.001, 50k steps. Cost stays bounded (about
    2 s at most over benchmarks/accountant_limits.py's grid) because a loss grid is only fine
    where the losses, and so the answer, are small. The smallest answer is kept:
    each is a valid bound.
    """
    interval = _PLD_COARSE_INTERVAL
    eps = _pld_at(history, delta, interval)
    # The rounding error grows with the number of compositions; a few steps need no finer grid
    # than epsilon / 1000, and one that fine at sigma ~1 costs seconds (a wide per-step loss range).
    relative = 1e-4 if sum(steps for _, _, steps in history) > 1000 else 1e-3
    for _ in range(3):
        if not eps < _PLD_LARGE_EPSILON:
            break
        finer = min(_PLD_FINE_INTERVAL, max(_PLD_FINEST_INTERVAL, eps * relative))
        if finer > interval / 2:
            break
        interval = finer
        eps = min(eps, _pld_at(history, delta, interval))
    return eps


def _rdp_epsilon(
    history: Sequence[tuple[float, float, int]], delta: float, orders: Sequence[float] = _RDP_ORDERS
) -> float:
    dpa = _dp_accounting()
    acc = dpa.rdp.RdpAccountant(orders=list(orders))
    acc.compose(_dp_event(history))
    return float(acc.get_epsilon(delta))


def _prv_domain(history: Sequence[tuple[float, float, int]], eps_error: float, delta_error: float):
    """Opacus' PRV mesh (Gopi et al. 2021, remark 5.6), with the tail bounds from privfl's RDP grid.

    Opacus' own rule asks its RDP accountant for two tail bounds over a fine fractional order grid
    (most of a small PRV call's time, and the source of its "Optimal order" warnings); any valid
    RDP upper bound serves, and a tighter one only trims mesh points that carry no mass. Returns
    the domain, or None when it would exceed the mesh cap.
    """
    from opacus.accountants.analysis.prv import Domain

    total = sum(steps for _, _, steps in history)
    reach = _rdp_epsilon(history, delta_error / 4, _RDP_TAIL_ORDERS)
    for sigma, q, _ in history:
        reach = max(reach, _rdp_epsilon(((sigma, q, 1),), delta_error / (8 * total), _RDP_TAIL_ORDERS))
    half_width = max(reach, eps_error) + 3
    mesh = eps_error / math.sqrt(total * math.log(12 / delta_error) / 2)
    if 2 * half_width / mesh > _PRV_MAX_MESH_POINTS:
        return None
    return Domain.create_aligned(-half_width, half_width, mesh)


def _prv_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    import numpy as np
    from opacus.accountants.analysis.prv import (
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )

    # eps_error bounds the PRV discretisation error (absolute, 0.01); the result is an upper bound
    # (Opacus' PRVAccountant.get_epsilon, with the domain computed as in _prv_domain). The mesh
    # grows like sqrt(steps) times the loss range; past the cap the same question goes to PLD,
    # which is also an upper bound, so the answer never under-reports.
    eps_error, delta_error = 0.01, delta / 1000
    domain = _prv_domain(history, eps_error, delta_error)
    if domain is None:
        log.debug("PRV mesh above %d points for %s; composed with PLD", _PRV_MAX_MESH_POINTS, history)
        return _pld_epsilon(history, delta)
    try:
        # At q = 1 the PRV's log(1 - q) is -inf by design; numpy's warning about it is noise.
        with np.errstate(divide="ignore"):
            dprvs = [
                discretize(TruncatedPrivacyRandomVariable(PoissonSubsampledGaussianPRV(q, sigma), domain.t_min, domain.t_max), domain)
                for sigma, q, _ in history
            ]
            composed = compose_heterogeneous(dprvs=dprvs, num_self_compositions=[steps for _, _, steps in history])
            return float(composed.compute_epsilon(delta, delta_error, eps_error)[2])
    except MemoryError:
        return _pld_epsilon(history, delta)


@functools.lru_cache(maxsize=4096)
def _composed_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, kind: Accountant) -> float:
    # Cached: the ledger asks for the same compositions every round (budget check, then charge).
    if kind is Accountant.RDP:
        return _rdp_epsilon(history, delta)
    if kind is Accountant.PLD:
        return _pld_epsilon(history, delta)
    return _prv_epsilon(history, delta)


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
        accountant: ``"prv"`` (default), ``"pld"`` (as tight, faster at many steps) or ``"rdp"``.

    Returns:
        Epsilon at ``delta``.
    """
    event = DPEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    return epsilon_of_events([event], delta=delta, accountant=accountant)


_SIGMA_SEARCH_MAX = 1e7
"""Calibration gives up above this noise multiplier and says what epsilon the accountant reaches there."""


def noise_multiplier(
    *,
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant | str = Accountant.PRV,
) -> float:
    """The smallest noise multiplier whose ``steps`` steps stay within ``target_epsilon``.

    Bisection on log sigma (epsilon falls monotonically as sigma grows). The result always
    satisfies ``epsilon(noise_multiplier=result, ..., accountant=accountant) <= target_epsilon``.
    For RDP and PLD it is within 0.1% of the tightest such sigma. For PRV the search runs on PLD
    (seconds cheaper per step at many steps), then the PRV answer is checked and, if above the
    target, raised and bisected back: within about 0.2% of the tightest.

    Raises:
        ConfigError: a bad target, steps, sample rate or delta, or a target that no sigma up to
            1e7 reaches with this accountant (the message gives the epsilon reached there).
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError("target_epsilon", target_epsilon, "must be a finite number > 0")
    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigError("steps", steps, "must be an integer >= 1")
    _check_delta(delta)
    kind = _accountant(accountant)
    DPEvent(noise_multiplier=1.0, sample_rate=sample_rate, steps=steps)  # validates sample_rate
    search_kind = Accountant.PLD if kind is Accountant.PRV else kind

    def eps_at(sigma: float, how: Accountant) -> float:
        return epsilon(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta, accountant=how)

    low, high = 0.0, 1.0
    while eps_at(high, search_kind) > target_epsilon:
        low, high = high, high * 4
        if high > _SIGMA_SEARCH_MAX:
            floor = eps_at(_SIGMA_SEARCH_MAX, search_kind)
            if floor > target_epsilon:
                raise ConfigError(
                    "target_epsilon",
                    target_epsilon,
                    f"unreachable with the {search_kind.value} accountant at delta={delta:g}: even noise multiplier "
                    f"{_SIGMA_SEARCH_MAX:g} gives epsilon {floor:.4g} over {steps} steps at sample rate {sample_rate:g}",
                )
            high = _SIGMA_SEARCH_MAX
            break
    if low == 0.0:
        low = high / 4
        while eps_at(low, search_kind) <= target_epsilon and low > 1e-3:
            high, low = low, low / 4
    # Invariant: eps(low) > target >= eps(high); geometric midpoints keep the step count
    # independent of the scale of sigma.
    while high - low > 1e-3 * high:
        mid = math.sqrt(low * high)
        if eps_at(mid, search_kind) > target_epsilon:
            low = mid
        else:
            high = mid
    if kind is Accountant.PRV and eps_at(high, kind) > target_epsilon:
        # PRV sits up to its eps_error (0.01) above PLD, which matters at small targets (at 0.05 it
        # needs ~15% more noise): grow the step geometrically, then bisect back to 0.2%.
        low, factor = high, 1.002
        high = low * factor
        while eps_at(high, kind) > target_epsilon:
            low, factor = high, factor * factor
            high = low * factor
            if high > _SIGMA_SEARCH_MAX:
                raise ConfigError(
                    "target_epsilon",
                    target_epsilon,
                    f"unreachable with the prv accountant at delta={delta:g} below noise multiplier {_SIGMA_SEARCH_MAX:g} "
                    "(its answer carries an absolute error of 0.01; use accountant='pld' for smaller targets)",
                )
        while high > low * 1.002:
            mid = math.sqrt(low * high)
            if eps_at(mid, kind) > target_epsilon:
                low = mid
            else:
                high = mid
    return high


GENESIS = hashlib.sha256(b"privfl ledger journal, format 2").hexdigest()
"""The ``prev`` of a journal's first line."""

_MAX_LINE_BYTES = 1 << 16
"""No ledger line comes near this (a long drop note is ~200 bytes); a longer one is corrupt."""

log = logging.getLogger("privfl")


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


class LedgerKey:
    """A site-local secret that authenticates every ledger line with HMAC-SHA256.

    Kept in its own file (``ledger.key``, mode 0600) next to the ledger. It only protects against
    edits by someone who cannot read that file: whoever can read it can forge a whole ledger. The
    secret never appears in ``repr`` or in logs.
    """

    __slots__ = ("_secret",)
    SIZE = 32

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) < self.SIZE:
            raise ConfigError("ledger_key", "<hidden>", f"must be at least {self.SIZE} random bytes")
        self._secret = secret

    @classmethod
    def generate(cls) -> LedgerKey:
        """A fresh key from the OS's cryptographic randomness."""
        return cls(secrets.token_bytes(cls.SIZE))

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> LedgerKey:
        """Reads a key written by :meth:`write`.

        Raises:
            LedgerError: the file is missing, readable by others, or not a key.
        """
        path = Path(path)
        try:
            mode = path.stat().st_mode
            raw = path.read_bytes()
        except OSError as exc:
            raise LedgerError(str(path), f"the ledger key cannot be read ({exc.strerror or exc}); without it the ledger cannot be verified") from None
        if mode & 0o077:
            raise LedgerError(str(path), f"the ledger key has mode {oct(stat.S_IMODE(mode))}: others may read or replace it; chmod 600 it")
        try:
            secret = bytes.fromhex(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise LedgerError(str(path), "is not a privfl ledger key (64 hex digits)") from None
        if len(secret) < cls.SIZE:
            raise LedgerError(str(path), "is not a privfl ledger key (too short)")
        return cls(secret)

    def write(self, path: str | os.PathLike[str]) -> None:
        """Writes the key durably with mode 0600 (replacing any key there)."""
        from privfl.rundir import durable_write_bytes

        path = Path(path)
        durable_write_bytes(path, self._secret.hex().encode() + b"\n")  # mkstemp: created 0600
        os.chmod(path, 0o600)

    def mac(self, body: bytes) -> str:
        """HMAC-SHA256 of ``body``, hex."""
        return hmac.new(self._secret, body, hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        return "LedgerKey(<hidden>)"


def _canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True).encode("ascii")


def _seal(record: Mapping[str, Any], prev: str, key: LedgerKey | None) -> bytes:
    """The canonical line for ``record`` chained to ``prev`` (and MACed under ``key``)."""
    body = {**record, "prev": prev}
    if key is not None:
        body["mac"] = key.mac(_canonical(body))
    return _canonical(body)


def _finite_or_null(value: float) -> float | None:
    # JSON has no infinity: an uncapped budget (or an infinite epsilon) is written as null.
    return None if math.isinf(value) else float(value)


def _entry_record(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "kind": "entry",
        "round": entry.round,
        "client": entry.client,
        "status": entry.status.value,
        "steps": entry.steps,
        "sample_rate": entry.sample_rate,
        "noise_multiplier": entry.noise_multiplier,
        "epsilon": _finite_or_null(entry.epsilon),
        "delta": entry.delta,
        "note": entry.note,
    }


class _Journal:
    """The open, append-only ledger file: one fsynced line per call."""

    def __init__(self, path: Path, key: LedgerKey | None, head: str) -> None:
        self.path = path
        self.key = key
        self.head = head
        self.broken = False
        try:
            self.fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise LedgerError(str(path), f"cannot be opened for appending: {exc.strerror or exc}") from None

    def append(self, record: Mapping[str, Any]) -> str:
        """Writes and fsyncs one line; returns its hash."""
        if self.fd is None:
            raise LedgerError(str(self.path), "the ledger was closed; reload it to charge again")
        if self.broken:
            raise LedgerError(str(self.path), "an earlier write to the ledger failed; reload it to charge again")
        line = _seal(record, self.head, self.key)
        data = memoryview(line + b"\n")
        try:
            while data:
                written = os.write(self.fd, data)
                data = data[written:]
            os.fsync(self.fd)
        except BaseException:
            # A half-written line must stay the last one: it is discarded on load, and nothing
            # may be appended after it (the chain would break in the middle).
            self.broken = True
            raise
        self.head = hashlib.sha256(line).hexdigest()
        return self.head

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


_ENTRY_KEYS = frozenset({"kind", "round", "client", "status", "steps", "sample_rate", "noise_multiplier", "epsilon", "delta", "note"})
_KEYS = {
    "header": frozenset({"kind", "format", "format_version", "accountant", "authenticated", "run", "created"}),
    "budget": frozenset({"kind", "client", "epsilon", "delta"}),
    "entry": _ENTRY_KEYS,
    "note": frozenset({"kind", "client", "note"}),
    "resume": frozenset({"kind", "round"}),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return True


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class PrivacyLedger:
    """Per-client, per-round record of DP-SGD spending, with budget enforcement and persistence.

    Args:
        accountant: how events are composed (PRV by default).

    The ledger is append-only: entries are never edited. In memory it is a plain object; created
    with :meth:`create` or reopened with :meth:`open` it is backed by a journal file (format in the
    module docstring) and every method that records something writes and fsyncs one line before
    it returns, so a charge is durable before the update it pays for can leave the client.
    :meth:`load` and :meth:`open` replay and verify every line, so a resumed run continues from
    what was really spent and an edited ledger is refused with :class:`~privfl.errors.LedgerError`.
    """

    FORMAT_VERSION = 2

    def __init__(self, *, accountant: Accountant | str = Accountant.PRV) -> None:
        self.accountant = _accountant(accountant)
        self.recorded_accountant: str = self.accountant.value
        """The accountant named in the ledger file (may differ from ``accountant`` when overridden on load)."""
        self.run_identity: dict[str, Any] | None = None
        """The run's settings and data fingerprint, recorded in the header (None outside a run)."""
        self.authenticated = False
        """Whether every line carries a MAC under a :class:`LedgerKey`."""
        self._accounts: dict[str, _ClientAccount] = {}
        self._entries: list[LedgerEntry] = []
        self._resumes: list[tuple[int, int]] = []
        self._hashes: list[str] = []
        self._journal: _Journal | None = None
        self._path: Path | None = None

    # -- registration -----------------------------------------------------------------------
    def register(self, client: str, budget: ClientBudget) -> None:
        """Adds a client with its budget; re-registering with the same budget is a no-op.

        Raises:
            ConfigError: the client is already registered with a different budget.
        """
        existing = self._accounts.get(client)
        if existing is None:
            self._write({"kind": "budget", "client": client, "epsilon": _finite_or_null(budget.epsilon), "delta": budget.delta})
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

    @property
    def head(self) -> str | None:
        """SHA-256 of the journal's last line (None for a ledger never written)."""
        return self._hashes[-1] if self._hashes else None

    @property
    def lines(self) -> int:
        """Lines in the journal."""
        return len(self._hashes)

    def line_hash(self, line: int) -> str:
        """SHA-256 of journal line ``line`` (1-based).

        Raises:
            LedgerError: the journal has fewer lines.
        """
        if not 1 <= line <= len(self._hashes):
            raise LedgerError(str(self._path or "ledger"), f"has {len(self._hashes)} lines, not {line}: it was cut short or replaced")
        return self._hashes[line - 1]

    def budget(self, client: str) -> ClientBudget:
        return self._account(client).budget

    def events(self, client: str) -> tuple[DPEvent, ...]:
        return tuple(self._account(client).events)

    def superseded(self) -> frozenset[int]:
        """Indices (into :attr:`entries`) of entries from an interrupted attempt at a round.

        A run killed mid-round is resumed at that round: the entries it wrote for it stay charged
        (the data was used) but belong to no recorded round.
        """
        return frozenset(i for count, start in self._resumes for i in range(count) if self._entries[i].round >= start)

    def interrupted_trainings(self) -> dict[str, int]:
        """Client -> trainings charged in interrupted attempts at a round (redone after a resume)."""
        counts: dict[str, int] = {}
        for index in self.superseded():
            entry = self._entries[index]
            if entry.status is LedgerStatus.TRAINED:
                counts[entry.client] = counts.get(entry.client, 0) + 1
        return counts

    def _account(self, client: str) -> _ClientAccount:
        try:
            return self._accounts[client]
        except KeyError:
            raise ConfigError("client", client, "is not registered in the ledger") from None

    def _write(self, record: Mapping[str, Any]) -> None:
        # Disk first, memory second: an entry the journal refused is not spent in memory either,
        # and one on disk is never missing after a reload.
        if self._journal is not None:
            self._hashes.append(self._journal.append(record))

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
        """Records that the client trained in this round (durably, when the ledger has a journal).

        Raises:
            BudgetExceededError: the event would take the client past its budget (nothing is recorded).
            LedgerError: the journal cannot be written (nothing is recorded in memory).
        """
        account = self._account(client)
        spent = self.epsilon_if(client, event)
        if spent > account.budget.epsilon:
            raise BudgetExceededError(
                f"client {client!r}: round {round_index} would spend epsilon {spent:.3f} "
                f"> budget {account.budget.epsilon:.3f}"
            )
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
        self._write(_entry_record(entry))
        account.events.append(event)
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
        self._write(_entry_record(entry))
        self._entries.append(entry)
        return entry

    def rounds(self, client: str, status: LedgerStatus) -> int:
        """How many rounds the client has with this status."""
        return sum(1 for e in self._entries if e.client == client and e.status is status)

    def annotate_last(self, client: str, note: str) -> None:
        """Appends a note to the client's latest entry (e.g. its update was dropped in aggregation)."""
        for i in range(len(self._entries) - 1, -1, -1):
            if self._entries[i].client == client:
                self._write({"kind": "note", "client": client, "note": note})
                self._annotate(i, note)
                return

    def _annotate(self, index: int, note: str) -> None:
        entry = self._entries[index]
        fields = {name: getattr(entry, name) for name in LedgerEntry.__slots__}
        fields["note"] = f"{entry.note}; {note}" if entry.note else note
        self._entries[index] = LedgerEntry(**fields)

    def mark_resume(self, round_index: int) -> None:
        """Records that the run resumes at ``round_index``: earlier entries for it or later rounds were interrupted."""
        self._write({"kind": "resume", "round": round_index})
        self._resumes.append((len(self._entries), round_index))

    # -- persistence ----------------------------------------------------------------------------
    def _header(self) -> dict[str, Any]:
        return {
            "kind": "header",
            "format": "privfl-ledger",
            "format_version": self.FORMAT_VERSION,
            "accountant": self.recorded_accountant,
            "authenticated": self.authenticated,
            "run": self.run_identity,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def to_json(self) -> dict:
        """A JSON-ready dict of the whole ledger (budgets, entries with their notes, resume points)."""
        return {
            "format_version": self.FORMAT_VERSION,
            "accountant": self.accountant.value,
            "budgets": {
                c: {"epsilon": _finite_or_null(a.budget.epsilon), "delta": a.budget.delta} for c, a in self._accounts.items()
            },
            "entries": [{k: v for k, v in _entry_record(e).items() if k != "kind"} for e in self._entries],
            "resumes": [{"after_entries": count, "round": start} for count, start in self._resumes],
        }

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        accountant: Accountant | str = Accountant.PRV,
        key: LedgerKey | None = None,
        run_identity: Mapping[str, Any] | None = None,
    ) -> PrivacyLedger:
        """A new, empty ledger backed by a journal at ``path`` (written durably before returning).

        Args:
            path: the journal file; must not exist.
            accountant: how events are composed.
            key: authenticate every line with this key (strongly recommended in a run directory).
            run_identity: the run's settings and data fingerprint, kept in the header.

        Raises:
            LedgerError: ``path`` already exists (a ledger is never replaced).
        """
        from privfl.rundir import durable_write_bytes

        path = Path(path)
        if path.exists():
            raise LedgerError(str(path), "already exists; a new ledger never replaces one")
        ledger = cls(accountant=accountant)
        ledger.authenticated = key is not None
        ledger.run_identity = None if run_identity is None else json.loads(json.dumps(run_identity))
        line = _seal(ledger._header(), GENESIS, key)
        durable_write_bytes(path, line + b"\n")
        ledger._hashes.append(hashlib.sha256(line).hexdigest())
        ledger._journal = _Journal(path, key, ledger._hashes[-1])
        ledger._path = path
        return ledger

    def close(self) -> None:
        """Closes the journal (the ledger stays readable in memory; it records nothing more)."""
        if self._journal is not None:
            self._journal.close()

    def save(self, path: str | os.PathLike[str], *, key: LedgerKey | None = None) -> None:
        """Writes this in-memory ledger as a complete journal, atomically and durably.

        A journal-backed ledger is already saved line by line; saving it over its own journal is refused.

        Raises:
            LedgerError: ``path`` is this ledger's own journal.
        """
        from privfl.rundir import durable_write_bytes

        path = Path(path)
        if self._journal is not None and path.resolve() == self._journal.path.resolve():
            raise LedgerError(str(path), "is this ledger's live journal; every record is already on disk")
        copy = PrivacyLedger(accountant=self.accountant)
        copy.recorded_accountant = self.recorded_accountant
        copy.authenticated = key is not None
        copy.run_identity = self.run_identity
        records: list[Mapping[str, Any]] = [copy._header()]
        records += [
            {"kind": "budget", "client": c, "epsilon": _finite_or_null(a.budget.epsilon), "delta": a.budget.delta}
            for c, a in self._accounts.items()
        ]
        resumes = sorted(self._resumes)
        for index, entry in enumerate(self._entries):
            records += [{"kind": "resume", "round": start} for count, start in resumes if count == index]
            records.append(_entry_record(entry))
        records += [{"kind": "resume", "round": start} for count, start in resumes if count == len(self._entries)]
        lines, prev = [], GENESIS
        for record in records:
            line = _seal(record, prev, key)
            prev = hashlib.sha256(line).hexdigest()
            lines.append(line + b"\n")
        durable_write_bytes(path, b"".join(lines))

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, key: LedgerKey | None = None, accountant: Accountant | str | None = None
    ) -> PrivacyLedger:
        """Reads and verifies a ledger journal, rebuilding every client's events (read-only).

        Args:
            path: the journal.
            key: the ledger's key; required when the ledger is authenticated (and then every
                line's MAC is checked).
            accountant: compose with this accountant instead of the recorded one (kept in
                :attr:`recorded_accountant`); needed when the recorded one is not prv or rdp.

        Raises:
            LedgerError: the file is unreadable, corrupt, edited, truncated mid-chain, or needs a
                key. The message names the file and the first bad line. A torn last line (a
                write cut short by a crash) is discarded with a warning: its charge was never
                complete, so the update it would have paid for never left the client.
        """
        ledger, _ = cls._replay(Path(path), key, accountant)
        return ledger

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, key: LedgerKey | None = None, accountant: Accountant | str | None = None
    ) -> PrivacyLedger:
        """Like :meth:`load`, then reopens the journal for appending (a torn last line is cut off first).

        The caller must hold the run directory's lock: two writers would fork the chain.
        """
        from privfl.rundir import fsync_directory

        path = Path(path)
        ledger, valid_length = cls._replay(path, key, accountant)
        if valid_length != path.stat().st_size:
            with path.open("r+b") as fh:
                fh.truncate(valid_length)
                fh.flush()
                os.fsync(fh.fileno())
            fsync_directory(path.parent)
        ledger._journal = _Journal(path, key, ledger._hashes[-1])
        return ledger

    @classmethod
    def _replay(cls, path: Path, key: LedgerKey | None, accountant: Accountant | str | None) -> tuple[PrivacyLedger, int]:
        """The verified ledger and the byte length of its valid lines."""
        try:
            with path.open("rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise LedgerError(str(path), f"cannot be read: {exc.strerror or exc}") from None
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        ledger = cls(accountant=Accountant.PRV)
        ledger._path = path
        for number, raw in enumerate(lines, start=1):
            ledger._replay_line(path, number, raw, key, accountant)
        valid = len(data) - len(tail)
        if tail:
            number = len(lines) + 1
            try:
                ledger._replay_line(path, number, tail, key, accountant)
            except LedgerError as exc:
                if number == 1 or _is_json(tail):
                    # Whole JSON that fails verification is an edit, not a torn write: a line is
                    # written in one piece, and no proper prefix of a JSON object parses.
                    raise
                # Only the final line, and only when incomplete: it was being written when the
                # process stopped, before its fsync returned, so the update never left.
                log.warning("ledger %s: discarded an incomplete last line %d (%d bytes): %s", path, number, len(tail), exc.problem)
            else:
                # Complete but for its newline: keep it (counting a charge twice is safe; losing one is not).
                valid = len(data)
                log.warning("ledger %s: line %d lacked its newline; kept", path, number)
        if not ledger._hashes:
            raise LedgerError(str(path), "is empty: it holds no header")
        return ledger, valid

    def _replay_line(
        self, path: Path, number: int, raw: bytes, key: LedgerKey | None, accountant: Accountant | str | None
    ) -> None:
        """Verifies one journal line and applies it; nothing changes when it is refused."""
        where = f"line {number}"

        def bad(problem: str) -> LedgerError:
            return LedgerError(str(path), f"{where}: {problem}")

        if len(raw) > _MAX_LINE_BYTES:
            raise bad(f"{len(raw)} bytes long; not a ledger line (the ledger is corrupt)")
        try:
            record = json.loads(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise bad("not a JSON line (the ledger is corrupt)") from None
        if not isinstance(record, dict):
            raise bad("not a JSON object (the ledger is corrupt)")
        kind = record.get("kind")
        if isinstance(kind, str) and isinstance(record.get("client"), str):
            where += f" ({kind} of {record['client']!r}" + (f", round {record['round']!r})" if "round" in record else ")")
        try:
            canonical = _canonical(record)
        except ValueError:
            raise bad("holds a number that is not finite (the ledger is corrupt)") from None
        if canonical != raw:
            raise bad("not in the form privfl writes: it was edited")
        expected = self._hashes[-1] if self._hashes else GENESIS
        if record.get("prev") != expected:
            previous = f"line {number - 1}" if number > 1 else "the start of the chain"
            raise bad(f"does not follow {previous}: a line before it was edited, removed or reordered")
        if key is not None:
            mac = record.get("mac")
            body = {k: v for k, v in record.items() if k != "mac"}
            if not (isinstance(mac, str) and hmac.compare_digest(mac, key.mac(_canonical(body)))):
                raise bad("its MAC does not verify under the ledger key: it was edited or forged")
        allowed = _KEYS.get(kind) if isinstance(kind, str) else None
        if allowed is None:
            raise bad(f"unknown kind {kind!r}")
        extra = set(record) - allowed - {"prev", "mac"}
        missing = allowed - set(record)
        if extra or missing:
            raise bad(f"fields {sorted(missing)} missing or {sorted(extra)} unexpected")
        try:
            self._apply(record, number, key, accountant, bad)
        except LedgerError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # ConfigError (a ValueError) from DPEvent/ClientBudget: a value no run could write.
            raise bad(f"malformed ({exc})") from None
        self._hashes.append(hashlib.sha256(raw).hexdigest())

    def _apply(self, record: dict[str, Any], number: int, key: LedgerKey | None, accountant: Accountant | str | None, bad) -> None:
        kind = record["kind"]
        if kind == "header":
            if number != 1:
                raise bad("a second header")
            if record["format"] != "privfl-ledger" or record["format_version"] != self.FORMAT_VERSION:
                raise bad(f"not a privfl ledger of format {self.FORMAT_VERSION} ({record['format']!r} {record['format_version']!r})")
            if not isinstance(record["authenticated"], bool) or not isinstance(record["accountant"], str):
                raise bad("malformed header")
            if record["authenticated"] and key is None:
                raise bad("the ledger is authenticated: verify it with its key (ledger.key in the run directory)")
            if not (record["run"] is None or isinstance(record["run"], dict)):
                raise bad("malformed run identity")
            if accountant is None:
                try:
                    self.accountant = Accountant(record["accountant"])
                except ValueError:
                    raise bad(f"accountant {record['accountant']!r} is not one privfl composes with") from None
            else:
                self.accountant = _accountant(accountant)
            self.recorded_accountant = record["accountant"]
            self.authenticated = record["authenticated"]
            self.run_identity = record["run"]
            return
        if number == 1:
            raise bad("the ledger does not start with a header")
        if kind == "resume":
            if not (_is_int(record["round"]) and record["round"] >= 0):
                raise bad("malformed resume round")
            self._resumes.append((len(self._entries), record["round"]))
            return
        client = record["client"]
        if not (isinstance(client, str) and client):
            raise bad("malformed client name")
        if kind == "budget":
            if client in self._accounts:
                raise bad(f"client {client!r} is registered twice")
            eps = record["epsilon"]
            if not (eps is None or _is_number(eps)) or not _is_number(record["delta"]):
                raise bad("malformed budget")
            budget = ClientBudget(epsilon=math.inf if eps is None else float(eps), delta=float(record["delta"]))
            self._accounts[client] = _ClientAccount(budget=budget)
            return
        if client not in self._accounts:
            raise bad(f"client {client!r} has no budget line before it")
        if kind == "note":
            if not isinstance(record["note"], str):
                raise bad("malformed note")
            last = next((i for i in range(len(self._entries) - 1, -1, -1) if self._entries[i].client == client), None)
            if last is None:
                raise bad(f"a note for client {client!r}, which has no entry")
            self._annotate(last, record["note"])
            return
        # an entry
        account = self._accounts[client]
        status = LedgerStatus(record["status"])
        numbers = ("sample_rate", "noise_multiplier", "delta")
        if not (_is_int(record["round"]) and record["round"] >= 0 and _is_int(record["steps"]) and record["steps"] >= 0):
            raise bad("malformed round or steps")
        if not all(_is_number(record[k]) for k in numbers) or not (record["epsilon"] is None or _is_number(record["epsilon"])):
            raise bad("malformed number")
        if not isinstance(record["note"], str):
            raise bad("malformed note")
        if record["delta"] != account.budget.delta:
            raise bad(f"delta {record['delta']!r} differs from the client's budget delta {account.budget.delta!r}")
        event = None
        if status is LedgerStatus.TRAINED:
            event = DPEvent(noise_multiplier=float(record["noise_multiplier"]), sample_rate=float(record["sample_rate"]), steps=record["steps"])
        elif record["steps"] != 0:
            raise bad("a skipped round with steps")
        entry = LedgerEntry(
            round=record["round"],
            client=client,
            status=status,
            steps=record["steps"],
            sample_rate=float(record["sample_rate"]),
            noise_multiplier=float(record["noise_multiplier"]),
            epsilon=math.inf if record["epsilon"] is None else float(record["epsilon"]),
            delta=float(record["delta"]),
            note=record["note"],
        )
        if event is not None:
            account.events.append(event)
        self._entries.append(entry)


def merge_events(events: Iterable[DPEvent]) -> list[DPEvent]:
    """Merges events with equal (noise_multiplier, sample_rate) so accounting stays fast over many rounds."""
    merged: dict[tuple[float, float], int] = {}
    for e in events:
        key = (e.noise_multiplier, e.sample_rate)
        merged[key] = merged.get(key, 0) + e.steps
    return [DPEvent(noise_multiplier=s, sample_rate=q, steps=n) for (s, q), n in merged.items()]
