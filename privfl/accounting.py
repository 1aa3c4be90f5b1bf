"""Privacy accounting: epsilon for DP-SGD events, noise calibration, and the per-client privacy ledger.

What happened is kept apart from how it is counted. Events say what happened:
:class:`PoissonSampledGaussian` (one DP-SGD step) and :class:`FixedSizeSampledGaussian` (a release
over a sample of exactly m of K); a :class:`DPEvent` is the ledger's record of ``steps`` Poisson-sampled
steps. A :class:`PrivacyAccountant` (dp-accounting's shape: ``compose(event, count)`` and
``get_epsilon(delta)``) says how they are counted: :class:`PRVAccountant` (default),
:class:`PLDAccountant` or :class:`RDPAccountant`, from :func:`make_accountant`. Every answer is a pure
function of the multiset of events, so a ledger, a reloaded ledger and :func:`epsilon_of_events`
agree to the last bit; the expensive per-step pieces are cached, so a round that adds one round's
steps to a client's history costs one self-composition, however many distinct client plans there
are. The :class:`PrivacyLedger` stores, for every client and every round, the events
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

import abc
import contextvars
import functools
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import random
import secrets
import stat
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from privfl import _validate
from privfl.errors import BudgetExceededError, ConfigError, LedgerError

__all__ = [
    "Accountant",
    "ClientBudget",
    "DPEvent",
    "FixedSizeSampledGaussian",
    "LedgerEntry",
    "LedgerKey",
    "LedgerStatus",
    "PLDAccountant",
    "PRVAccountant",
    "PoissonSampledGaussian",
    "PrivacyAccountant",
    "PrivacyEvent",
    "PrivacyLedger",
    "RDPAccountant",
    "clear_caches",
    "epsilon",
    "epsilon_of_events",
    "make_accountant",
    "merge_events",
    "noise_multiplier",
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
class PoissonSampledGaussian:
    """One step of the Poisson-subsampled Gaussian mechanism: one DP-SGD step.

    Every record joins the batch independently with probability ``sample_rate``; the sum of the
    batch's contributions, each clipped to L2 norm C, gets N(0, (noise_multiplier * C)^2 I) noise.
    Neighbouring datasets differ by one record added or removed. ``sample_rate = 1`` is the plain
    Gaussian mechanism.
    """

    sample_rate: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        _check_noise_multiplier(self.noise_multiplier)
        _check_sample_rate(self.sample_rate)


@dataclass(frozen=True, kw_only=True, slots=True)
class FixedSizeSampledGaussian:
    """One Gaussian release over a sample of exactly ``sample_size`` of ``population_size`` members.

    Each member's contribution is clipped to L2 norm C and the sum gets N(0, (noise_multiplier * C)^2 I).
    Under add/remove adjacency, adding a member to a fixed-size sample can displace another, so one
    member moves the sum by up to 2C. privfl counts this as a Gaussian mechanism with noise multiplier
    ``noise_multiplier / 2`` and no amplification by sampling (q = 1): a valid bound, and a loose one
    (the amplification that sampling without replacement gives is not claimed).
    """

    sample_size: int
    population_size: int
    noise_multiplier: float

    def __post_init__(self) -> None:
        _check_noise_multiplier(self.noise_multiplier)
        if not (_is_int(self.sample_size) and self.sample_size >= 1):
            raise ConfigError("sample_size", self.sample_size, "must be an integer >= 1")
        if not (_is_int(self.population_size) and self.population_size >= self.sample_size):
            raise ConfigError("population_size", self.population_size, f"must be an integer >= sample_size ({self.sample_size})")


PrivacyEvent = PoissonSampledGaussian | FixedSizeSampledGaussian
"""What happened, as an accountant composes it (one mechanism invocation; ``count`` repeats it)."""


def _sampled_gaussian(event: PrivacyEvent) -> tuple[float, float]:
    """(sigma, q) of the Poisson-subsampled Gaussian that ``event`` is counted as."""
    if isinstance(event, PoissonSampledGaussian):
        return event.noise_multiplier, event.sample_rate
    if isinstance(event, FixedSizeSampledGaussian):
        return event.noise_multiplier / 2, 1.0  # sensitivity 2C (a displaced member), no amplification
    raise ConfigError("event", type(event).__name__, "must be a PoissonSampledGaussian or a FixedSizeSampledGaussian")


@dataclass(frozen=True, kw_only=True, slots=True)
class DPEvent:
    """``steps`` Poisson-sampled Gaussian steps at ``sample_rate`` with ``noise_multiplier`` (a ledger record)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        _check_noise_multiplier(self.noise_multiplier)
        _check_sample_rate(self.sample_rate)
        if not (isinstance(self.steps, int) and self.steps >= 0):
            raise ConfigError("steps", self.steps, "must be an integer >= 0")

    @property
    def mechanism(self) -> PoissonSampledGaussian:
        """One of the steps, as an accountant composes it (``steps`` times)."""
        return PoissonSampledGaussian(sample_rate=self.sample_rate, noise_multiplier=self.noise_multiplier)


def _check_noise_multiplier(value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError("noise_multiplier", value, "must be a finite number > 0")


def _check_sample_rate(value: float) -> None:
    if not 0 < value <= 1:
        raise ConfigError("sample_rate", value, "must be in (0, 1]")


def _check_delta(delta: float) -> None:
    _validate.open_unit_interval("delta", delta, allow_numpy=True)


def _accountant(kind: Accountant | str) -> Accountant:
    return _validate.member("accountant", kind, Accountant)


class PrivacyAccountant(abc.ABC):
    """Composes privacy events and answers epsilon at a delta (dp-accounting's ``PrivacyAccountant`` shape).

    What happened (the events) is kept apart from how it is counted (the subclass). Composition is
    commutative: only the multiset of events matters.
    """

    @abc.abstractmethod
    def compose(self, event: PrivacyEvent, count: int = 1) -> PrivacyAccountant:
        """Adds ``count`` independent runs of ``event``; returns the accountant (for chaining).

        Raises:
            ConfigError: an event type this accountant cannot count, or a count that is not an integer >= 0.
        """

    @abc.abstractmethod
    def get_epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` of everything composed so far (0.0 when nothing was).

        Raises:
            ConfigError: delta is not in (0, 1).
        """


class _NumericAccountant(PrivacyAccountant):
    """Keeps the multiset of events; subclasses name the numerical method that counts them."""

    kind: ClassVar[Accountant]

    def __init__(self) -> None:
        self._counts: dict[PrivacyEvent, int] = {}

    def compose(self, event: PrivacyEvent, count: int = 1) -> PrivacyAccountant:
        _sampled_gaussian(event)  # refuses other types
        if not (_is_int(count) and count >= 0):
            raise ConfigError("count", count, "must be an integer >= 0")
        if count:
            self._counts[event] = self._counts.get(event, 0) + count
        return self

    @property
    def events(self) -> tuple[tuple[PrivacyEvent, int], ...]:
        """(event, count) for every distinct event composed so far, in first-composed order."""
        return tuple(self._counts.items())

    def get_epsilon(self, delta: float) -> float:
        _check_delta(delta)
        merged: dict[tuple[float, float], int] = {}
        for event, count in self._counts.items():
            key = _sampled_gaussian(event)
            merged[key] = merged.get(key, 0) + count
        history = tuple(sorted((sigma, q, steps) for (sigma, q), steps in merged.items()))
        if not history:
            return 0.0
        return _composed_epsilon(history, delta, self.kind)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self._counts)} distinct events, {sum(self._counts.values())} in all)"


class PRVAccountant(_NumericAccountant):
    """Privacy random variables (Gopi, Lee, Wutschitz 2021, with Opacus' PRVs): an upper bound within 0.01.

    Where the PRV mesh would exceed a million points, the same question is answered by
    :class:`PLDAccountant` (also an upper bound), so every call takes bounded time and memory.
    """

    kind = Accountant.PRV


class RDPAccountant(_NumericAccountant):
    """Renyi DP (Mironov 2017) through dp-accounting over a wide order grid: a valid, looser upper bound."""

    kind = Accountant.RDP


class PLDAccountant(_NumericAccountant):
    """Pessimistic privacy loss distributions (dp-accounting; Doroshenko et al. 2022), grid fitted to the answer."""

    kind = Accountant.PLD


_ACCOUNTANTS: dict[Accountant, type[_NumericAccountant]] = {
    Accountant.PRV: PRVAccountant,
    Accountant.RDP: RDPAccountant,
    Accountant.PLD: PLDAccountant,
}


def make_accountant(kind: Accountant | str = Accountant.PRV) -> PrivacyAccountant:
    """A new, empty accountant of this kind.

    Raises:
        ConfigError: an unknown accountant name.
    """
    return _ACCOUNTANTS[_accountant(kind)]()


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
    acc = make_accountant(accountant)
    for event in events:
        acc.compose(event.mechanism, event.steps)
    return acc.get_epsilon(delta)


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
"""Fractional orders cost ~5 ms each per distinct (sigma, q); the per-step curve is computed once and cached."""

_RDP_TAIL_ORDERS: tuple[float, ...] = (1.1, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0, 256.0, 512.0)
"""Orders for the PRV mesh's tail bounds: any valid bound serves, a looser one only widens the mesh."""

_RDP_TAIL_INTEGER_ORDERS: tuple[int, ...] = tuple(int(a) for a in _RDP_TAIL_ORDERS if float(a).is_integer())
_RDP_TAIL_FRACTIONAL_ORDERS: tuple[float, ...] = tuple(a for a in _RDP_TAIL_ORDERS if not float(a).is_integer())


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


# -- how events are counted ------------------------------------------------------------------------
# Every answer is a pure function of the merged history (sorted (sigma, q, steps) triples), so a
# ledger, a reloaded ledger and epsilon_of_events agree to the last bit. What makes a round cheap
# is that the expensive part of each method depends on one step's (sigma, q) only and is cached:
# the per-step Renyi curve (RDP), the per-step privacy loss distribution (PLD), and the per-step
# discretised PRV and its spectrum on a mesh shared by all step counts up to the next power of two
# (PRV). A client's history grows by one round's steps at a time, so each round's question reuses
# its previous rounds' pieces and costs one self-composition (an FFT power) and one epsilon search.


@functools.lru_cache(maxsize=8192)
def _rdp_per_step(sigma: float, q: float, orders: tuple[float, ...]):
    """dp-accounting's Renyi curve of one Poisson-sampled Gaussian step (read-only array)."""
    dpa = _dp_accounting()
    acc = dpa.rdp.RdpAccountant(orders=list(orders))
    acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)))
    curve = acc.rdp
    curve.setflags(write=False)
    return curve


def _rdp_epsilon(
    history: Sequence[tuple[float, float, int]], delta: float, orders: Sequence[float] = _RDP_ORDERS
) -> float:
    """As dp-accounting's RdpAccountant composing the history (the same sums, in the same order)."""
    import numpy as np

    dpa = _dp_accounting()
    orders = tuple(orders)
    total = np.zeros(len(orders))
    for sigma, q, steps in history:
        total += steps * _rdp_per_step(sigma, q, orders)
    return float(dpa.rdp.rdp_privacy_accountant.compute_epsilon(orders, total, delta)[0])


@functools.cache
def _integer_order_terms():
    """For every integer tail order a and k = 0..a: (a, k, log C(a, k)), flattened, and where each order starts."""
    import numpy as np
    from scipy.special import gammaln

    orders = np.array(_RDP_TAIL_INTEGER_ORDERS, dtype=np.int64)
    alpha = np.repeat(orders, orders + 1).astype(float)
    k = np.concatenate([np.arange(a + 1) for a in orders]).astype(float)
    log_comb = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
    starts = np.concatenate([[0], np.cumsum(orders + 1)[:-1]])
    return alpha, k, log_comb, starts


@functools.lru_cache(maxsize=8192)
def _rdp_tail_per_step(sigma: float, q: float):
    """Renyi divergence of one Poisson-sampled Gaussian step at the integer tail orders (read-only array).

    The closed form dp-accounting sums one term at a time (Mironov, Talwar, Zhang 2019, section
    3.3): A_a = sum over k of C(a, k) (1 - q)^(a - k) q^k exp((k^2 - k) / (2 sigma^2)), and the
    divergence is log(A_a) / (a - 1); here every order's terms in one numpy pass, 1,115 terms in
    all, where dp-accounting's scalar loop took about 5 ms per sigma. Agrees with dp-accounting's
    values to about 1e-12 relative (tests/test_accounting_sizes.py).
    """
    import numpy as np

    orders = np.array(_RDP_TAIL_INTEGER_ORDERS, dtype=float)
    if q >= 1.0:
        curve = orders / (2 * sigma * sigma)
    else:
        alpha, k, log_comb, starts = _integer_order_terms()
        terms = log_comb + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma * sigma)
        peak = np.maximum.reduceat(terms, starts)
        log_a = peak + np.log(np.add.reduceat(np.exp(terms - np.repeat(peak, orders.astype(np.int64) + 1)), starts))
        curve = log_a / (orders - 1)
    curve.setflags(write=False)
    return curve


def _rdp_tail_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """An RDP upper bound on epsilon over :data:`_RDP_TAIL_ORDERS`, for sizing the PRV mesh's tails.

    Integer orders come from :func:`_rdp_tail_per_step`. A fractional order a can only give a
    smaller answer where the one found exceeds log(1 - 1/a) - log(delta a) / (a - 1), its answer
    with a zero divergence (dp-accounting's conversion); only then are the fractional orders
    computed (dp-accounting's series, about 10 ms per sigma, the bulk of a calibration probe
    before). Skipping them can only keep a larger answer, which is still a valid bound: the mesh
    is then wider, never too narrow.
    """
    import numpy as np

    dpa = _dp_accounting()
    total = np.zeros(len(_RDP_TAIL_INTEGER_ORDERS))
    for sigma, q, steps in history:
        total += steps * _rdp_tail_per_step(sigma, q)
    compute_epsilon = dpa.rdp.rdp_privacy_accountant.compute_epsilon
    eps = float(compute_epsilon(_RDP_TAIL_INTEGER_ORDERS, total, delta)[0])
    floor = min(math.log1p(-1 / a) - math.log(delta * a) / (a - 1) for a in _RDP_TAIL_FRACTIONAL_ORDERS)
    if eps > floor:
        eps = min(eps, _rdp_epsilon(history, delta, _RDP_TAIL_FRACTIONAL_ORDERS))
    return eps


def _pld_step(sigma: float, q: float, interval: float):
    """dp-accounting's pessimistic PLD of one Poisson-sampled Gaussian step (add/remove adjacency)."""
    dpa = _dp_accounting()
    return dpa.pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma,
        value_discretization_interval=interval,
        sampling_prob=q,
        neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


class _RandomEvictionCache:
    """At most ``maxsize`` values by key; a full cache drops a random entry, not the least recently used.

    A federation asks about every client once per round, in the same order: a cycle longer than an
    LRU cache misses every time, while random eviction keeps a share of hits.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._entries: dict[Any, Any] = {}
        self._rng = random.Random(0)  # simulation-grade randomness: only which entry to drop
        self._lock = threading.Lock()

    def get(self, key: Any, make) -> Any:
        if not _CACHE_STEPS.get():
            return make(*key)
        with self._lock:
            if key in self._entries:
                return self._entries[key]
        value = make(*key)
        with self._lock:
            while len(self._entries) >= self.maxsize:
                del self._entries[self._rng.choice(list(self._entries))]
            self._entries[key] = value
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_PLD_STEPS = _RandomEvictionCache(maxsize=256)
"""Per-step PLDs by (sigma, q, loss grid): the coarse grid's is shared by every round of a client."""


def _pld_at(history: Sequence[tuple[float, float, int]], delta: float, interval: float) -> float:
    """As dp-accounting's PLDAccountant composing the history at this loss grid."""
    import numpy as np

    dpa = _dp_accounting()
    pld = dpa.pld.privacy_loss_distribution.identity(value_discretization_interval=interval)
    for sigma, q, steps in history:
        pld = pld.compose(_PLD_STEPS.get((sigma, q, interval), _pld_step).self_compose(steps))
    # At epsilons in the thousands dp-accounting's epsilon search divides tiny masses; the
    # overflow it warns about resolves to the right (infinite-ratio) branch.
    with np.errstate(over="ignore", divide="ignore"):
        return float(pld.get_epsilon_for_delta(delta))


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


def _prv_domain(history: Sequence[tuple[float, float, int]], eps_error: float, delta_error: float):
    """The PRV mesh (Gopi et al. 2021, remark 5.6) for any history of at most the next power of two steps.

    The mesh is sized for ``design`` steps, the power of two at or above the history's total, and
    its width from Renyi tail bounds for the history scaled up to ``design`` steps: finer and wider
    than the history needs, so the discretisation error stays within ``eps_error`` and the mass
    outside within ``delta_error``; and shared by every round until the total doubles, so each
    step's discretisation is reused. Opacus' own rule asks its RDP accountant for the tail bounds
    over a fine fractional order grid; any valid RDP upper bound serves. Returns the domain, or
    None when it would exceed the mesh cap.
    """
    from opacus.accountants.analysis.prv import Domain
    from scipy.fft import next_fast_len

    total = sum(steps for _, _, steps in history)
    design = 1 << (total - 1).bit_length()
    scaled = tuple((sigma, q, -(-steps * design // total)) for sigma, q, steps in history)
    reach = _rdp_tail_epsilon(scaled, delta_error / 4)
    for sigma, q, _ in history:
        reach = max(reach, _rdp_tail_epsilon(((sigma, q, 1),), delta_error / (8 * design)))
    half_width = max(reach, eps_error) + 3
    mesh = eps_error / math.sqrt(design * math.log(12 / delta_error) / 2)
    if 2 * half_width / mesh > _PRV_MAX_MESH_POINTS:
        return None
    # Domain.create_aligned's layout (points -k..k+1 times the mesh, an even count), widened
    # symmetrically to a size the FFT factors well: an awkward size (2 x a large prime) made
    # each composition up to 9x slower. Wider only moves less mass outside.
    size = 2 * math.ceil(half_width / mesh) + 2
    while (size := next_fast_len(size, real=True)) % 2:
        size += 1
    k = size // 2 - 1
    return Domain(t_min=-k * mesh, t_max=(k + 1) * mesh, size=size)


def _truncated_prv_mean(q: float, sigma: float, t_min: float, t_max: float) -> float:
    """Mean of Opacus' truncated Poisson-subsampled Gaussian PRV, as its ``mean()`` computes it.

    The same integration by parts, the same break points and the same adaptive quadrature, over a
    scalar transcription of Opacus' cdf (propositions B1 and B4 of Gopi et al. 2021) in ``math``
    rather than numpy: quad calls it hundreds of times one point at a time, where numpy's
    per-call overhead made this two thirds of a discretisation. Agrees with Opacus' value to
    about 1e-12 of a mesh step.
    """
    from scipy import integrate

    log_1mq = math.log(1 - q) if q < 1 else -math.inf
    scale = 2 * math.sqrt(2) * sigma
    s2 = sigma * sigma

    def cdf(t: float) -> float:
        if t <= log_1mq:
            return 0.0
        if t > 700.0:  # exp would overflow; both erfc terms are 0 long before
            return 1.0
        ratio = (math.exp(t) + q - 1) / q
        if ratio <= 0:  # rounding just above log(1 - q)
            return 0.0
        z = math.log(ratio)
        return -q * math.erfc((2 * z * s2 - 1) / scale) / 2 - (1 - q) * math.erfc((2 * z * s2 + 1) / scale) / 2 + 1.0

    c_min = cdf(t_min)
    mass = cdf(t_max) - c_min

    def truncated_cdf(t: float) -> float:
        if t < t_min:
            return 0.0
        if t < t_max:
            return (cdf(t) - c_min) / mass
        return 1.0

    import numpy as np

    lower_exponent = int(np.log10(np.abs(t_min)))
    upper_exponent = int(np.log10(t_max))
    points = np.concatenate(
        [
            [t_min],
            -np.logspace(start=lower_exponent, stop=-5, num=10),
            [0],
            np.logspace(start=-5, stop=upper_exponent, num=10),
            [t_max],
        ]
    )
    mean = 0.0
    for left, right in itertools.pairwise(points):
        integral, _ = integrate.quad(truncated_cdf, left, right, limit=500)
        mean += right * truncated_cdf(right) - left * truncated_cdf(left) - integral
    return mean


def _prv_cdf(q: float, sigma: float, t):
    """Opacus' cdf of the Poisson-subsampled Gaussian PRV (propositions B1 and B4 of Gopi et al. 2021), vectorised.

    The same formula as ``PoissonSubsampledGaussianPRV.cdf``, with z = log((e^t + q - 1) / q)
    written as t - log q + log1p((q - 1) e^-t), which neither overflows at large t nor loses
    digits near log(1 - q).
    """
    import numpy as np
    from scipy.special import erfc

    t = np.asarray(t, dtype=float)
    if q >= 1.0:
        inside = np.ones(t.shape, dtype=bool)
        z = t
    else:
        inside = t > math.log1p(-q)
        safe = np.where(inside, t, 0.0)  # e^-t of the points outside would overflow; they are masked out
        z = safe - math.log(q) + np.log1p((q - 1) * np.exp(-safe))
    scale = 2 * math.sqrt(2) * sigma
    s2 = sigma * sigma
    value = 1.0 - q * erfc((2 * z * s2 - 1) / scale) / 2 - (1 - q) * erfc((2 * z * s2 + 1) / scale) / 2
    return np.where(inside, value, 0.0)


def _discretize_step(q: float, sigma: float, domain):
    """Opacus' ``discretize`` of the truncated PRV on ``domain``, with one cdf pass instead of two.

    Opacus evaluates the cdf at every bin's left and right edges (each right edge is the next
    bin's left one); here once at the size + 1 edges, and the pmf is their difference. The
    mean-preserving shift is Opacus': the continuous mean (:func:`_truncated_prv_mean`) minus the
    discrete one, refused when it reaches half a mesh step. Returns (pmf, shifted domain); the pmf
    agrees with Opacus' to about 1e-15 per bin (tests/test_accounting_sizes.py).
    """
    import numpy as np

    ts = domain.ts
    edges = np.empty(len(ts) + 1)
    edges[:-1] = ts - domain.dt / 2
    edges[-1] = ts[-1] + domain.dt / 2
    c_min, c_max = _prv_cdf(q, sigma, np.array([domain.t_min, domain.t_max]))
    cdf = np.where(
        edges < domain.t_min, 0.0, np.where(edges < domain.t_max, (_prv_cdf(q, sigma, edges) - c_min) / (c_max - c_min), 1.0)
    )
    pmf = np.diff(cdf)
    shift = _truncated_prv_mean(q, sigma, domain.t_min, domain.t_max) - float(np.dot(ts, pmf))
    if abs(shift) >= domain.dt / 2:
        raise RuntimeError("Discrete mean differs significantly from continuous mean.")
    return pmf, domain.shift_right(shift)


class _StepPRV:
    """One step's PRV discretised on a domain, with its spectrum (what every self-composition needs)."""

    __slots__ = ("domain", "nbytes", "size", "spectrum")

    def __init__(self, sigma: float, q: float, domain) -> None:
        import numpy as np
        from scipy.fft import rfft
        from scipy.integrate import IntegrationWarning

        # At q = 1 the PRV's log(1 - q) is -inf by design; numpy's warning about it is noise. A
        # quadrature warning on the PRV's mean is not: the mean-preserving discretisation would
        # rest on an inexact mean, so it is raised and the caller answers with PLD instead.
        with np.errstate(divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("error", IntegrationWarning)
            pmf, self.domain = _discretize_step(q, sigma, domain)  # domain shifted: discrete mean = continuous
        self.size = len(pmf)
        self.spectrum = rfft(pmf)  # the pmf itself is not kept: every use goes through this
        self.nbytes = self.spectrum.nbytes

    def self_composed(self, count: int):
        """Opacus' ``_compose_fourier`` from the cached spectrum: ``count`` independent steps."""
        import numpy as np
        from opacus.accountants.analysis.prv import DiscretePRV
        from scipy.fft import irfft

        pmf = irfft(self.spectrum**count, n=self.size)
        shift = count - 1
        if count % 2 == 0:
            shift += self.size // 2
        domain = self.domain.shift_right(self.domain.shifts * (count - 1))
        return DiscretePRV(pmf=np.roll(pmf, shift), domain=domain)


class _StepPRVCache:
    """Discretised steps by (sigma, q, domain), within a memory budget.

    A federation asks about every client once per round, so the working set is one entry per
    distinct client plan. Eviction is random, not least-recently-used: a cycle longer than the
    cache would miss every time under LRU, while random eviction keeps a share of hits.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: dict[tuple[float, float, float, float, int], _StepPRV] = {}
        self._bytes = 0
        self._rng = random.Random(0)  # simulation-grade randomness: only which entry to drop
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, sigma: float, q: float, domain) -> _StepPRV:
        if not _CACHE_STEPS.get():
            return _StepPRV(sigma, q, domain)
        key = (sigma, q, float(domain.t_min), float(domain.t_max), int(domain.size))
        with self._lock:
            step = self._entries.get(key)
            if step is not None:
                self.hits += 1
                return step
            self.misses += 1
        step = _StepPRV(sigma, q, domain)  # outside the lock: a duplicate under a race is only wasted work
        with self._lock:
            while self._entries and self._bytes + step.nbytes > self.max_bytes:
                victim = self._rng.choice(list(self._entries))
                self._bytes -= self._entries.pop(victim).nbytes
            if step.nbytes <= self.max_bytes and key not in self._entries:
                self._entries[key] = step
                self._bytes += step.nbytes
        return step

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self.hits = self.misses = 0


_CACHE_STEPS: contextvars.ContextVar[bool] = contextvars.ContextVar("privfl_cache_steps", default=True)
"""False while noise calibration probes sigmas no run will use (their pieces are not kept)."""

_STEP_PRVS = _StepPRVCache(max_bytes=1 << 30)
"""About 0.8 MB per distinct client plan at a typical 100k-point mesh: room for about 1300."""


def _prv_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    import numpy as np
    from scipy.signal import convolve

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
        composed = [_STEP_PRVS.get(sigma, q, domain).self_composed(steps) for sigma, q, steps in history]
        # Opacus' compose_heterogeneous: neighbours convolved pairwise until one is left.
        while len(composed) > 1:
            paired = [composed.pop()] if len(composed) % 2 == 1 else []
            for left, right in zip(composed[:-1:2], composed[1::2], strict=True):
                pmf = convolve(left.pmf, right.pmf, mode="same")
                paired.append(type(left)(pmf=pmf, domain=left.domain.shift_right(right.domain.shifts)))
            composed = paired
        with np.errstate(divide="ignore", over="ignore"):
            return float(composed[0].compute_epsilon(delta, delta_error, eps_error)[2])
    except MemoryError:
        return _pld_epsilon(history, delta)
    except (RuntimeError, ValueError, ArithmeticError, Warning) as exc:
        # Opacus refuses a discretisation whose mean moved, or a delta its floating point cannot
        # resolve; a quadrature warning is raised above. PLD answers the same question (an upper bound).
        log.debug("PRV could not compose %s (%s); composed with PLD", history, exc)
        return _pld_epsilon(history, delta)


@functools.lru_cache(maxsize=4096)
def _composed_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, kind: Accountant) -> float:
    # Cached: the ledger asks for the same compositions every round (budget check, then charge).
    if kind is Accountant.RDP:
        return _rdp_epsilon(history, delta)
    if kind is Accountant.PLD:
        return _pld_epsilon(history, delta)
    return _prv_epsilon(history, delta)


def clear_caches() -> None:
    """Forgets every cached composition and per-step piece (for benchmarks that time cold calls)."""
    _composed_epsilon.cache_clear()
    _rdp_per_step.cache_clear()
    _rdp_tail_per_step.cache_clear()
    _PLD_STEPS.clear()
    _STEP_PRVS.clear()

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
    spent: Sequence[DPEvent] = (),
) -> float:
    """The smallest noise multiplier whose ``steps`` steps stay within ``target_epsilon``.

    With ``spent`` (what a client already used, e.g. its ledger's events), the ``steps`` steps
    are the rest of a run: epsilon is that of ``spent`` composed with them.

    A safeguarded root search on log sigma against log epsilon (epsilon falls monotonically as
    sigma grows): bracket around a guess from the central limit theorem (mu-GDP), then Illinois
    steps (regula falsi that halves a stale end's weight; near-linear in log-log, so a handful of
    evaluations, about 7 where bisection took 15 to 25), moving an end by at least a sixteenth of
    the bracket each time. Every evaluation uses the requested accountant, so the result always
    satisfies ``epsilon(noise_multiplier=result, ..., accountant=accountant) <= target_epsilon``,
    and lies within 0.1% of the tightest such sigma. The probes' per-step pieces are not cached.

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
    token = _CACHE_STEPS.set(False)  # the probes' per-step pieces would only crowd out the run's
    try:
        return _calibrate(target_epsilon, sample_rate, steps, delta, kind, spent=tuple(spent))
    finally:
        _CACHE_STEPS.reset(token)


def _gdp_guess(target: float, q: float, steps: int, delta: float) -> float:
    """A starting sigma from the central limit theorem for composition (Dong, Roth, Su 2022).

    Many steps of the Poisson-subsampled Gaussian are close to mu-GDP with mu = q sqrt(T (e^(1/sigma^2) - 1))
    (exactly mu = sqrt(T) / sigma at q = 1), and mu-GDP gives delta(eps) = Phi(-eps/mu + mu/2) -
    e^eps Phi(-eps/mu - mu/2). Only a starting point: the search then evaluates the real accountant.
    Returns 1.0 where the approximation has no answer.
    """

    def phi(x: float) -> float:
        return math.erfc(-x / math.sqrt(2)) / 2

    def delta_at(mu: float) -> float:
        return phi(-target / mu + mu / 2) - math.exp(target) * phi(-target / mu - mu / 2)

    try:
        low, high = 1e-6, 1.0
        while delta_at(high) < delta:
            low, high = high, high * 2
            if high > 1e4:
                return 1.0
        for _ in range(60):  # delta grows with mu
            mid = math.sqrt(low * high)
            low, high = (mid, high) if delta_at(mid) < delta else (low, mid)
        mu = high
        if q >= 1.0:
            return math.sqrt(steps) / mu
        return 1 / math.sqrt(math.log1p(mu * mu / (q * q * steps)))
    except (OverflowError, ValueError, ZeroDivisionError):
        return 1.0


def _calibrate(target: float, q: float, steps: int, delta: float, kind: Accountant, *, spent: tuple[DPEvent, ...] = ()) -> float:
    def eps_at(sigma: float) -> float:
        merged: dict[tuple[float, float], int] = {(sigma, q): steps}
        for event in spent:
            key = (event.noise_multiplier, event.sample_rate)
            merged[key] = merged.get(key, 0) + event.steps
        return _composed_epsilon(tuple(sorted((s, r, t) for (s, r), t in merged.items())), delta, kind)

    def unreachable(eps: float) -> ConfigError:
        return ConfigError(
            "target_epsilon",
            target,
            f"unreachable with the {kind.value} accountant at delta={delta:g}: even noise multiplier "
            f"{_SIGMA_SEARCH_MAX:g} gives epsilon {eps:.4g} over {steps} steps at sample rate {q:g}"
            + (" (its answer carries an absolute error of 0.01; use accountant='pld' for smaller targets)" if kind is Accountant.PRV else ""),
        )

    # Bracket around the guess, the step squaring each time (1.05, 1.1, 1.22, 1.48, 2.2, 4.8, ...).
    start = min(max(_gdp_guess(target, q, steps, delta), 1e-3), _SIGMA_SEARCH_MAX)
    factor = 1.05
    eps_start = eps_at(start)
    if eps_start > target:
        low, eps_low = start, eps_start
        while True:
            high = min(low * factor, _SIGMA_SEARCH_MAX)
            eps_high = eps_at(high)
            if eps_high <= target:
                break
            if high >= _SIGMA_SEARCH_MAX:
                raise unreachable(eps_high)
            low, eps_low, factor = high, eps_high, factor * factor
    else:
        high, eps_high = start, eps_start
        while True:
            low = high / factor
            eps_low = eps_at(low)
            if eps_low > target:
                break
            if low <= 1e-3:
                return low  # epsilon 0 holds: delta exceeds what any sigma this small can leak
            high, eps_high, factor = low, eps_low, factor * factor
    # Invariant: eps(low) > target >= eps(high). Work in x = log sigma, y = log epsilon - log target.
    def y_of(eps: float) -> float:
        return math.log(max(eps, 1e-300) / target)

    a, ya = math.log(low), y_of(eps_low)
    b, yb = math.log(high), y_of(eps_high)
    side = 0
    while b - a > math.log1p(1e-3):
        x = b - yb * (b - a) / (yb - ya) if math.isfinite(ya) and ya > yb else (a + b) / 2
        margin = (b - a) / 16
        if not (a + margin <= x <= b - margin):
            x = min(max(x, a + margin), b - margin)  # a step that would barely move an end moves it by a sixteenth
        eps = eps_at(math.exp(x))
        y = y_of(eps)
        if eps > target:
            a, ya = x, y
            if side == -1:
                yb /= 2  # Illinois: the end that did not move twice running counts half
            side = -1
        else:
            b, yb = x, y
            if side == 1:
                ya /= 2
            side = 1
    return math.exp(b)


GENESIS = hashlib.sha256(b"privfl ledger journal, format 2").hexdigest()
"""The ``prev`` of a journal's first line."""

_MAX_LINE_BYTES = 1 << 16
"""No ledger line but the header comes near this (a long drop note is ~200 bytes); a longer one is corrupt."""
_MAX_HEADER_BYTES = 1 << 28
"""The header holds the run's identity, one data fingerprint per site (about 80 bytes each): 1,000 sites
make an 81 KB header. This bound (256 MiB, the history's) is far above any real federation's."""

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
    steps: dict[tuple[float, float], int] = field(default_factory=dict)
    """Steps per (noise_multiplier, sample_rate): the merged history, kept so a question costs no replay."""

    def add(self, event: DPEvent) -> None:
        self.events.append(event)
        key = (event.noise_multiplier, event.sample_rate)
        self.steps[key] = self.steps.get(key, 0) + event.steps

    def epsilon(self, kind: Accountant, extra: DPEvent | None = None) -> float:
        """As :func:`epsilon_of_events` over the events (and ``extra``): the same history, so the same bits."""
        steps = self.steps
        if extra is not None:
            steps = dict(steps)
            key = (extra.noise_multiplier, extra.sample_rate)
            steps[key] = steps.get(key, 0) + extra.steps
        history = tuple(sorted((sigma, q, n) for (sigma, q), n in steps.items() if n > 0))
        return _composed_epsilon(history, self.budget.delta, kind) if history else 0.0


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

    def __init__(self, path: Path, key: LedgerKey | None, head: str, *, size: int, last_line: int) -> None:
        self.path = path
        self.key = key
        self.head = head
        self.broken = False
        self.size = size
        """Bytes of the file as this journal knows it."""
        self.last_line = last_line
        """Bytes of its last line, newline included."""
        self.closed_as: tuple[int, int, int, int] | None = None
        """(inode, size, mtime, ctime) of the file when this journal closed it (see PrivacyLedger.reopen)."""
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
        self.size += len(line) + 1
        self.last_line = len(line) + 1
        return self.head

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            try:
                st = os.stat(self.path)
                self.closed_as = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            except OSError:
                self.closed_as = None

    def reattach(self) -> bool:
        """Reopens the file for appending if it is exactly as this journal closed it (see PrivacyLedger.reopen)."""
        if self.fd is not None or self.broken or self.closed_as is None:
            return False
        try:
            st = os.stat(self.path)
            # ctime too: restoring the mtime after an edit (os.utime) moves the ctime, which no call sets back.
            if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != self.closed_as or st.st_size != self.size:
                return False
            with open(self.path, "rb") as fh:
                fh.seek(self.size - self.last_line)
                tail = fh.read(self.last_line)
            if not (len(tail) == self.last_line and tail.endswith(b"\n") and hashlib.sha256(tail[:-1]).hexdigest() == self.head):
                return False
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError:
            return False
        return True


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
        # Each client's entry indices, in order: per-client questions cost that client's entries, not
        # the whole ledger's (at 10,000 sites a summary asked 20,000 of them).
        self._client_entries: dict[str, list[int]] = {}
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
        return self._account(client).epsilon(self.accountant)

    def epsilon_if(self, client: str, event: DPEvent) -> float:
        """Epsilon the client would have spent after ``event``."""
        return self._account(client).epsilon(self.accountant, event)

    def can_afford(self, client: str, event: DPEvent) -> bool:
        """Whether ``event`` keeps the client within its epsilon budget."""
        return self.epsilon_if(client, event) <= self._account(client).budget.epsilon

    def refusal(self, client: str, event: DPEvent) -> str | None:
        """Why the client must not train for ``event`` (it would pass its budget), or None if it may.

        The one rule a site applies before touching its data, in ``privfl run`` and in a
        deployed :class:`~privfl.site.Site` alike.
        """
        after = self.epsilon_if(client, event)
        budget = self._account(client).budget.epsilon
        if after > budget:
            return f"another round would spend epsilon {after:.3f} > budget {budget:.3f}"
        return None

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
        account.add(event)
        self._append_entry(entry)
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
        self._append_entry(entry)
        return entry

    def _append_entry(self, entry: LedgerEntry) -> None:
        self._client_entries.setdefault(entry.client, []).append(len(self._entries))
        self._entries.append(entry)

    def _last_entry_index(self, client: str) -> int | None:
        indices = self._client_entries.get(client)
        return indices[-1] if indices else None

    def rounds(self, client: str, status: LedgerStatus) -> int:
        """How many rounds the client has with this status."""
        return sum(1 for i in self._client_entries.get(client, ()) if self._entries[i].status is status)

    def annotate_last(self, client: str, note: str) -> None:
        """Appends a note to the client's latest entry (e.g. its update was dropped in aggregation)."""
        index = self._last_entry_index(client)
        if index is not None:
            self._write({"kind": "note", "client": client, "note": note})
            self._annotate(index, note)

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
    def from_json(cls, data: Mapping[str, Any], *, accountant: Accountant | str | None = None) -> PrivacyLedger:
        """An in-memory ledger rebuilt from :meth:`to_json`'s dict (it has no journal; :meth:`load` verifies one).

        Args:
            data: what :meth:`to_json` returned (after a JSON round trip or not).
            accountant: compose with this accountant instead of the recorded one (kept in
                :attr:`recorded_accountant`).

        Raises:
            LedgerError: the dict is not a ledger of this format, or holds a value no run could write.
        """
        where = "ledger JSON"
        ledger = cls(accountant=Accountant.PRV)
        try:
            header = {
                "kind": "header",
                "format": "privfl-ledger",
                "format_version": data["format_version"],
                "accountant": data["accountant"],
                "authenticated": False,
                "run": None,
                "created": "",
            }
            records: list[Mapping[str, Any]] = [header]
            records += [{"kind": "budget", "client": c, **b} for c, b in data["budgets"].items()]
            resumes = sorted((r["after_entries"], r["round"]) for r in data["resumes"])
            entries = list(data["entries"])
            for index, entry in enumerate(entries):
                records += [{"kind": "resume", "round": start} for count, start in resumes if count == index]
                records.append({"kind": "entry", **entry})
            records += [{"kind": "resume", "round": start} for count, start in resumes if count == len(entries)]
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise LedgerError(where, f"not a privfl ledger dict ({exc!r} missing or malformed)") from None
        for number, record in enumerate(records, start=1):

            def bad(problem: str, number: int = number) -> LedgerError:
                return LedgerError(where, f"record {number}: {problem}")

            allowed = _KEYS[record["kind"]]
            if set(record) != allowed:
                raise bad(f"fields {sorted(allowed - set(record))} missing or {sorted(set(record) - allowed)} unexpected")
            try:
                ledger._apply(dict(record), number, None, accountant, bad)
            except LedgerError:
                raise
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise bad(f"malformed ({exc})") from None
        return ledger

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
        ledger._journal = _Journal(path, key, ledger._hashes[-1], size=len(line) + 1, last_line=len(line) + 1)
        ledger._path = path
        return ledger

    def close(self) -> None:
        """Closes the journal (the ledger stays readable in memory; it records nothing more until :meth:`reopen`)."""
        if self._journal is not None:
            self._journal.close()

    def reopen(self) -> bool:
        """Reopens a closed journal-backed ledger for appending, if its file is exactly as this ledger left it.

        "Exactly": the same inode, size, modification and change times as when :meth:`close` closed it, and its
        last line still hashing to this ledger's head. Then the lines before it are the ones this
        ledger verified or wrote, and a long-lived holder (a site serving request after request)
        skips re-verifying every line, a cost that grows with the ledger. Anything else (another
        process appended, the file was replaced or edited, a write had failed) returns False and
        changes nothing: load it afresh with :meth:`open`, which verifies every line.

        The caller must hold the run directory's (or state directory's) lock, as for :meth:`open`.
        """
        return self._journal is not None and self._journal.reattach()

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
        ledger, _, _ = cls._replay(Path(path), key, accountant)
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
        ledger, valid_length, last_line = cls._replay(path, key, accountant)
        if valid_length != path.stat().st_size:
            with path.open("r+b") as fh:
                fh.truncate(valid_length)
                fh.flush()
                os.fsync(fh.fileno())
            fsync_directory(path.parent)
        ledger._journal = _Journal(path, key, ledger._hashes[-1], size=valid_length, last_line=last_line)
        return ledger

    @classmethod
    def _replay(cls, path: Path, key: LedgerKey | None, accountant: Accountant | str | None) -> tuple[PrivacyLedger, int, int]:
        """The verified ledger, the byte length of its valid lines and of its last valid line (newline included)."""
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
        last_line = len(lines[-1]) + 1 if lines else 0
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
                last_line = len(tail)
                log.warning("ledger %s: line %d lacked its newline; kept", path, number)
        if not ledger._hashes:
            raise LedgerError(str(path), "is empty: it holds no header")
        return ledger, valid, last_line

    def _replay_line(
        self, path: Path, number: int, raw: bytes, key: LedgerKey | None, accountant: Accountant | str | None
    ) -> None:
        """Verifies one journal line and applies it; nothing changes when it is refused."""
        where = f"line {number}"

        def bad(problem: str) -> LedgerError:
            return LedgerError(str(path), f"{where}: {problem}")

        if len(raw) > (_MAX_HEADER_BYTES if number == 1 else _MAX_LINE_BYTES):
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
            self._apply_header(record, key, accountant, bad)
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
            self._apply_budget(record, client, bad)
            return
        if client not in self._accounts:
            raise bad(f"client {client!r} has no budget line before it")
        if kind == "note":
            if not isinstance(record["note"], str):
                raise bad("malformed note")
            last = self._last_entry_index(client)
            if last is None:
                raise bad(f"a note for client {client!r}, which has no entry")
            self._annotate(last, record["note"])
            return
        self._apply_entry(record, client, bad)

    def _apply_header(self, record: dict[str, Any], key: LedgerKey | None, accountant: Accountant | str | None, bad) -> None:
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

    def _apply_budget(self, record: dict[str, Any], client: str, bad) -> None:
        if client in self._accounts:
            raise bad(f"client {client!r} is registered twice")
        eps = record["epsilon"]
        if not (eps is None or _is_number(eps)) or not _is_number(record["delta"]):
            raise bad("malformed budget")
        budget = ClientBudget(epsilon=math.inf if eps is None else float(eps), delta=float(record["delta"]))
        self._accounts[client] = _ClientAccount(budget=budget)

    def _apply_entry(self, record: dict[str, Any], client: str, bad) -> None:
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
            account.add(event)
        self._append_entry(entry)


def merge_events(events: Iterable[DPEvent]) -> list[DPEvent]:
    """Merges events with equal (noise_multiplier, sample_rate) so accounting stays fast over many rounds."""
    merged: dict[tuple[float, float], int] = {}
    for e in events:
        key = (e.noise_multiplier, e.sample_rate)
        merged[key] = merged.get(key, 0) + e.steps
    return [DPEvent(noise_multiplier=s, sample_rate=q, steps=n) for (s, q), n in merged.items()]
