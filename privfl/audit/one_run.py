"""One-training-run privacy audits (Steinke, Nasr, Jagielski 2023) with eps-DP and Gaussian-DP analyses."""

from __future__ import annotations

import enum
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy import special, stats

from privfl import _validate
from privfl.audit.empirical import _as_scores, _check_probability, gaussian_mechanism_epsilon
from privfl.errors import ConfigError

__all__ = [
    "CanaryTrial",
    "InputSpaceAuditConfig",
    "InputSpaceAuditResult",
    "OneRunAnalysis",
    "OneRunLowerBound",
    "default_guess_grid",
    "f_dp_guess_grid",
    "gdp_guessing_rejects",
    "one_run_epsilon_lower_bound",
    "one_run_gdp_lower_bound",
    "one_run_p_value",
    "run_input_space_canary_audit",
    "simulate_dirac_canaries",
]

_EPS_SEARCH_MAX = 60.0
_MU_SEARCH_MAX = 30.0


class OneRunAnalysis(enum.Enum):
    """Which privacy definition the one-run hypothesis test is run against."""

    EPSILON_DP = "epsilon-dp"
    GAUSSIAN_DP = "gaussian-dp"


@dataclass(frozen=True, kw_only=True, slots=True)
class OneRunLowerBound:
    """A one-run lower bound on epsilon.

    Attributes:
        epsilon: Certified lower bound on epsilon at ``delta`` (0 if nothing is certified).
        mu: For the Gaussian-DP analysis, the certified lower bound on mu (the mechanism is not
            mu'-GDP for any mu' < mu); None for the eps-DP analysis.
        correct: Number of correct guesses at the chosen guess counts.
        guesses: Number of guesses (``k_plus + k_minus``) at the chosen guess counts.
        k_plus: Canaries guessed IN (highest scores).
        k_minus: Canaries guessed OUT (lowest scores).
        num_canaries: Number of canaries m.
        alpha: One minus the confidence level (for the whole search, not one grid point).
        delta: The delta of the bound.
        ceiling: Largest epsilon this many canaries could certify with the same grid (a
            perfect attack guessing every grid point right).
        analysis: eps-DP (binomial tail) or Gaussian-DP (f-DP recursion).
        grid_size: Number of (k_plus, k_minus) pairs tried; alpha was split evenly over them.
    """

    epsilon: float
    mu: float | None
    correct: int
    guesses: int
    k_plus: int
    k_minus: int
    num_canaries: int
    alpha: float
    delta: float
    ceiling: float
    analysis: OneRunAnalysis
    grid_size: int

    def describe(self) -> str:
        """One line for a report: the bound, its confidence and the ceiling for this m.

        The ceiling is part of every statement because a bound far below the claim says little
        when the claim is above what m canaries could ever certify.
        """
        name = "eps-DP (Steinke et al. 2023)" if self.analysis is OneRunAnalysis.EPSILON_DP else (
            "f-DP, Gaussian trade-off (Mahloujifar et al. 2024)"
        )
        mu = f" (mu >= {self.mu:.3f})" if self.mu is not None else ""
        grid = f", best of {self.grid_size} pre-declared guess counts" if self.grid_size > 1 else ""
        return (
            f"one-run {name} audit: epsilon >= {self.epsilon:.3f}{mu} at delta={self.delta:g} with "
            f"{1 - self.alpha:.0%} confidence, {self.correct} of {self.guesses} guesses right "
            f"({self.k_plus} IN, {self.k_minus} OUT){grid}; ceiling for m={self.num_canaries} canaries: "
            f"{self.ceiling:.3f} (a perfect attack could certify no more)"
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class CanaryTrial:
    """Scores and true membership of m canaries from one run.

    Attributes:
        scores: One score per canary; larger means "more likely included".
        included: Whether each canary was included (drawn independently with probability 1/2).
    """

    scores: NDArray[np.float64]
    included: NDArray[np.bool_]


def default_guess_grid(num_canaries: int) -> tuple[tuple[int, int], ...]:
    """Pre-declared (k_plus, k_minus) pairs searched when the caller fixes neither.

    Counts are the fractions 1/2, 1/4, 1/10, 1/20, 1/50, 1/100, 1/200 and 1/500 of m (rounded,
    at least 1, duplicates dropped), used symmetrically (k, k) and one-sided (k, 0). The grid
    depends only on m, so it is fixed before any score is seen and a Bonferroni split of alpha
    over its size keeps the confidence level honest.

    Args:
        num_canaries: m.

    Returns:
        The grid of (k_plus, k_minus) pairs.
    """
    fractions = (1 / 2, 1 / 4, 1 / 10, 1 / 20, 1 / 50, 1 / 100, 1 / 200, 1 / 500)
    counts = sorted({max(1, round(num_canaries * f)) for f in fractions})
    grid: list[tuple[int, int]] = []
    for k in counts:
        if 2 * k <= num_canaries:
            grid.append((k, k))
        grid.append((k, 0))
    return tuple(dict.fromkeys(grid))


def f_dp_guess_grid(num_canaries: int) -> tuple[tuple[int, int], ...]:
    """Pre-declared (k_plus, k_minus) pairs searched by the Gaussian-DP analysis when the caller fixes neither.

    Symmetric counts at 1/40, 1/20, 1/10, 1/4 and 1/2 of m and one-sided counts at 1/20, 1/10 and
    1/4 (rounded, at least 1, duplicates dropped). The f-DP recursion's power on Gaussian-shaped
    mechanisms peaks near r = m/10 to m/7 total guesses and falls on either side (at m = 1000:
    48-58% of the true epsilon at k = (50, 50) or (75, 75), 39-52% at (20, 20)), so the smaller
    fractions of :func:`default_guess_grid` mostly cost Bonferroni level; the large symmetric counts
    stay because they set the ceiling (a perfect attack certifies more with more guesses). At
    m = 1000 this grid has 8 pairs instead of 16, certifies more on average (42-47% vs 37-44% of
    the true epsilon at eps 2-4) and has a higher ceiling (9.22 vs 8.53 at delta 1e-5). Like the
    default grid it depends only on m, so alpha split over it keeps the confidence level.

    Args:
        num_canaries: m.

    Returns:
        The grid of (k_plus, k_minus) pairs.
    """
    symmetric = (1 / 40, 1 / 20, 1 / 10, 1 / 4, 1 / 2)
    one_sided = (1 / 20, 1 / 10, 1 / 4)
    grid: list[tuple[int, int]] = []
    for f in symmetric:
        k = max(1, round(num_canaries * f))
        if 2 * k <= num_canaries:
            grid.append((k, k))
    for f in one_sided:
        grid.append((max(1, round(num_canaries * f)), 0))
    return tuple(dict.fromkeys(grid))


def one_run_p_value(num_canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Upper bound on ``P[#correct >= correct]`` for an (epsilon, delta)-DP mechanism.

    Steinke, Nasr and Jagielski (2023), Theorem 3.1: with m canaries each included w.p. 1/2 and
    r guesses, ``P[W >= v] <= P[Bin(r, p) >= v] + 2 m delta max_{1<=i<=v} P[v-i <= Bin(r, p) < v] / i``
    where ``p = e^eps / (1 + e^eps)`` is the accuracy of eps-DP randomized response.

    Args:
        num_canaries: m.
        guesses: r, the number of non-abstaining guesses.
        correct: v, the number of correct guesses.
        epsilon: Epsilon of the null hypothesis.
        delta: Delta of the null hypothesis.

    Returns:
        The p-value, clipped to at most 1.
    """
    if correct <= 0:
        return 1.0
    p = special.expit(epsilon)
    tail = float(stats.binom.sf(correct - 1, guesses, p))
    if delta == 0.0:
        return min(1.0, tail)
    # pmf at v-1, v-2, ..., 0; cumulative sums give P[v-i <= Bin < v] for i = 1..v.
    below = stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, p)
    ratio = np.cumsum(below) / np.arange(1, correct + 1)
    return min(1.0, tail + 2.0 * num_canaries * delta * float(np.max(ratio)))


def _largest_epsilon_rejected(num_canaries: int, guesses: int, correct: int, delta: float, level: float) -> float:
    """Largest eps found with p-value <= level (0 if even eps = 0 is not rejected).

    Any eps with p-value <= level is a valid bound, because (eps, delta)-DP implies
    (eps', delta)-DP for every eps' >= eps; bisection keeps ``p(lo) <= level`` throughout.
    """
    if one_run_p_value(num_canaries, guesses, correct, 0.0, delta) > level:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(num_canaries, guesses, correct, hi, delta) <= level:
        lo, hi = hi, 2.0 * hi
        if hi > _EPS_SEARCH_MAX:
            return lo
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if one_run_p_value(num_canaries, guesses, correct, mid, delta) <= level:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6:
            break
    return lo


def gdp_guessing_rejects(
    mus: NDArray[np.float64], num_canaries: int, guesses: int, correct: int, level: float
) -> NDArray[np.bool_]:
    """Whether ``>= correct`` right guesses out of ``guesses`` rejects mu-GDP at ``level``, per mu.

    The f-DP guessing-game bound of Mahloujifar, Melis and Chaudhuri (2024, "Auditing f-Differential
    Privacy in One Run"), specialised to membership (two choices per canary) and the Gaussian
    trade-off function. Masses are averaged per canary: if the event had probability ``level``,
    the correct guesses carry mass ``r_v = level * v / m`` and the wrong ones ``h_v = level *
    (r - v) / m``. Walking the count of correct guesses down from v to 0, f-DP forces
    ``h_i = max(h_{i+1}, psi(r_{i+1}))`` with ``psi(x) = Phi(Phi^-1(x) - mu)`` (the least probability
    of the swapped event) and ``r_i = r_{i+1} + i / (r - i) (h_i - h_{i+1})``. The total guessed
    mass cannot exceed ``r / m``, so ``r_0 + h_0 > r / m`` is a contradiction: the event is rarer
    than ``level`` under mu-GDP, which is rejected.

    Args:
        mus: Candidate mu values (vectorised).
        num_canaries: m.
        guesses: r.
        correct: v.
        level: Significance level for this single test.

    Returns:
        A boolean array, True where mu-GDP is rejected.
    """
    mus = np.asarray(mus, dtype=np.float64)
    r_mass = np.full(mus.shape, level * correct / num_canaries)
    h_mass = np.full(mus.shape, level * (guesses - correct) / num_canaries)
    budget = guesses / num_canaries
    for i in range(correct - 1, -1, -1):
        # Both masses only grow, so once they exceed the budget the rejection is final; clipping
        # keeps Phi^-1 defined after that point.
        with np.errstate(divide="ignore"):
            psi = special.ndtr(special.ndtri(np.minimum(r_mass, 1.0)) - mus)
        h_new = np.maximum(h_mass, psi)
        r_mass = r_mass + (i / (guesses - i)) * (h_new - h_mass)
        h_mass = h_new
        if np.all(r_mass + h_mass > budget):
            break
    return r_mass + h_mass > budget


def _largest_mu_rejected(num_canaries: int, guesses: int, correct: int, level: float) -> float:
    """Largest mu the guessing game rejects (0 if none), by repeated 32-way sectioning.

    Rejection is monotone in mu (a larger mu makes psi smaller and every mass smaller), so the
    rejected set is an interval starting at 0 and sectioning brackets its end.
    """
    lo, hi = 0.0, _MU_SEARCH_MAX
    for _ in range(4):
        points = np.linspace(lo, hi, 33)[1:]
        rejected = gdp_guessing_rejects(points, num_canaries, guesses, correct, level)
        if not rejected.any():
            hi = float(points[0])
            continue
        top = int(np.flatnonzero(rejected)[-1])
        lo = float(points[top])
        if top + 1 < points.size:
            hi = float(points[top + 1])
    return lo


def _check_membership(scores: ArrayLike, included: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Validate paired canary scores and membership flags."""
    s = _as_scores("scores", scores)
    inc = np.asarray(included)
    if inc.shape != s.shape:
        raise ConfigError("included", f"array of shape {inc.shape}", f"must match scores of shape {s.shape}")
    if inc.dtype != np.bool_:
        if not np.all(np.isin(inc, (0, 1))):
            raise ConfigError("included", "non-boolean values", "must be booleans (or 0/1)")
        inc = inc.astype(bool)
    return s, inc


def _resolve_grid(
    num_canaries: int, k_plus: int | None, k_minus: int | None, analysis: OneRunAnalysis
) -> tuple[tuple[int, int], ...]:
    """The (k_plus, k_minus) pairs to try, validated against m (the base grid depends on the analysis)."""
    for name, value in (("k_plus", k_plus), ("k_minus", k_minus)):
        if value is not None:
            _validate.positive_int(name, value, minimum=0, allow_numpy=True)
    if k_plus is not None and k_minus is not None:
        grid: tuple[tuple[int, int], ...] = ((int(k_plus), int(k_minus)),)
    else:
        base = f_dp_guess_grid(num_canaries) if analysis is OneRunAnalysis.GAUSSIAN_DP else default_guess_grid(num_canaries)
        if k_plus is not None:
            grid = tuple(dict.fromkeys((int(k_plus), kp) for kp, _ in base))
        elif k_minus is not None:
            grid = tuple(dict.fromkeys((kp, int(k_minus)) for kp, _ in base))
        else:
            grid = base
    valid = tuple((kp, km) for kp, km in grid if 0 < kp + km <= num_canaries)
    if not valid:
        raise ConfigError("k_plus + k_minus", (k_plus, k_minus), f"must be between 1 and num_canaries={num_canaries}")
    return valid


def _count_correct(order: NDArray[np.intp], included: NDArray[np.bool_], k_plus: int, k_minus: int) -> int:
    """Right guesses when the top k_plus are called IN and the bottom k_minus OUT."""
    top = order[::-1][:k_plus]
    bottom = order[:k_minus]
    return int(included[top].sum() + (~included[bottom]).sum())


def one_run_epsilon_lower_bound(
    scores: ArrayLike,
    included: ArrayLike,
    *,
    delta: float,
    alpha: float = 0.05,
    k_plus: int | None = None,
    k_minus: int | None = None,
    analysis: OneRunAnalysis = OneRunAnalysis.EPSILON_DP,
) -> OneRunLowerBound:
    """Lower-bound epsilon from one run with m independently included canaries.

    The auditor guesses IN for the ``k_plus`` highest scores, OUT for the ``k_minus`` lowest and
    abstains on the rest. Under (eps, delta)-DP the number of correct guesses is stochastically
    dominated as in :func:`one_run_p_value` (or, for ``GAUSSIAN_DP``, as in
    :func:`gdp_guessing_rejects`); the bound is the largest eps (mu) rejected at confidence
    ``1 - alpha``.

    If ``k_plus`` or ``k_minus`` is None, the pairs of :func:`default_guess_grid` (eps-DP) or
    :func:`f_dp_guess_grid` (Gaussian-DP) are tried and each test is run at level
    ``alpha / grid_size`` (Bonferroni), so the maximum over the grid is still a ``1 - alpha``
    bound. Fixing both counts in advance avoids that cost.

    Threat model: canaries are included independently with probability 1/2 and the scores are
    computed without knowledge of which were included (e.g. from the final model only).

    Args:
        scores: One score per canary, larger meaning "more likely included".
        included: True where the canary was included in the run.
        delta: The delta of the bound, in (0, 1).
        alpha: One minus the confidence level, in (0, 1).
        k_plus: Number of IN guesses, or None to search.
        k_minus: Number of OUT guesses, or None to search.
        analysis: eps-DP (Steinke et al.) or Gaussian-DP (f-DP recursion, converted to
            (eps, delta) through the Gaussian privacy curve).

    Returns:
        The bound, with the counts that achieved it and the ceiling.

    Raises:
        ConfigError: On empty, non-finite or mismatched inputs, probabilities outside (0, 1), or
            guess counts that are negative or exceed the number of canaries.
    """
    s, inc = _check_membership(scores, included)
    delta = _check_probability("delta", delta)
    alpha = _check_probability("alpha", alpha)
    if not isinstance(analysis, OneRunAnalysis):
        raise ConfigError("analysis", analysis, "must be a OneRunAnalysis")
    m = s.size
    grid = _resolve_grid(m, k_plus, k_minus, analysis)
    level = alpha / len(grid)
    order = np.argsort(s, kind="stable")

    best: tuple[float, float | None, int, int, int] | None = None
    ceiling = 0.0
    for kp, km in grid:
        r = kp + km
        v = _count_correct(order, inc, kp, km)
        if analysis is OneRunAnalysis.EPSILON_DP:
            eps = _largest_epsilon_rejected(m, r, v, delta, level)
            mu: float | None = None
            ceiling = max(ceiling, _largest_epsilon_rejected(m, r, r, delta, level))
        else:
            mu = _largest_mu_rejected(m, r, v, level)
            eps = _gdp_epsilon(mu, delta)
            ceiling = max(ceiling, _gdp_epsilon(_largest_mu_rejected(m, r, r, level), delta))
        if best is None or eps > best[0]:
            best = (eps, mu, v, kp, km)
    assert best is not None  # the grid is never empty
    eps, mu, v, kp, km = best
    return OneRunLowerBound(
        epsilon=eps,
        mu=mu,
        correct=v,
        guesses=kp + km,
        k_plus=kp,
        k_minus=km,
        num_canaries=m,
        alpha=alpha,
        delta=delta,
        ceiling=ceiling,
        analysis=analysis,
        grid_size=len(grid),
    )


def one_run_gdp_lower_bound(
    scores: ArrayLike,
    included: ArrayLike,
    *,
    delta: float,
    alpha: float = 0.05,
    k_plus: int | None = None,
    k_minus: int | None = None,
) -> OneRunLowerBound:
    """Gaussian-DP one-run bound: :func:`one_run_epsilon_lower_bound` with ``GAUSSIAN_DP``.

    The test rejects mu-GDP; the epsilon reported is that of the rejected Gaussian curve at
    ``delta``. It is a lower bound on the mechanism's epsilon when the mechanism's privacy curve
    is Gaussian-shaped (true of DP-SGD without subsampling, close to true with it); for other
    mechanisms read ``mu`` (a statement about GDP), not ``epsilon``.

    Args:
        scores: One score per canary, larger meaning "more likely included".
        included: True where the canary was included in the run.
        delta: The delta at which the rejected mu is converted to epsilon.
        alpha: One minus the confidence level.
        k_plus: Number of IN guesses, or None to search.
        k_minus: Number of OUT guesses, or None to search.

    Returns:
        The bound, with ``mu`` set.

    Raises:
        ConfigError: As :func:`one_run_epsilon_lower_bound`.
    """
    return one_run_epsilon_lower_bound(
        scores,
        included,
        delta=delta,
        alpha=alpha,
        k_plus=k_plus,
        k_minus=k_minus,
        analysis=OneRunAnalysis.GAUSSIAN_DP,
    )


def _gdp_epsilon(mu: float, delta: float) -> float:
    """Epsilon at delta of a mu-GDP mechanism (0 for mu = 0)."""
    if mu <= 0.0:
        return 0.0
    return gaussian_mechanism_epsilon(1.0 / mu, delta)


def simulate_dirac_canaries(
    *,
    dimension: int,
    num_canaries: int,
    noise_multiplier: float,
    max_grad_norm: float = 1.0,
    steps: int = 1,
    sample_rate: float = 1.0,
    seed: int,
) -> CanaryTrial:
    """White-box DP-SGD audit with Dirac gradient canaries, simulated exactly.

    Canary i has gradient ``max_grad_norm * e_i`` on its own coordinate (already clipped) and
    is included w.p. 1/2. Each of ``steps`` steps Poisson-samples every included canary with
    probability ``sample_rate`` and releases the noisy sum ``sum_sampled C e_i + N(0, sigma^2 C^2 I_d)``,
    as DP-SGD does for the canary part of the batch. The auditor sees every released gradient and
    scores canary i by the sum over steps of coordinate i divided by C. Coordinates beyond m
    carry only noise and cannot change a score, so they are not drawn.

    For ``sample_rate = 1`` this is the Gaussian mechanism composed ``steps`` times, which is
    ``sqrt(steps) / noise_multiplier``-GDP: the audit's target is exactly known.

    Args:
        dimension: Model dimension d; must be at least ``num_canaries``.
        num_canaries: m.
        noise_multiplier: sigma.
        max_grad_norm: Clipping norm C.
        steps: Number of DP-SGD steps T.
        sample_rate: Poisson sampling rate q in (0, 1].
        seed: Seed of ``numpy.random.default_rng`` (simulation only).

    Returns:
        The canary scores and inclusion flags.

    Raises:
        ConfigError: If an argument is out of range.
    """
    if num_canaries < 1:
        raise ConfigError("num_canaries", num_canaries, "must be at least 1")
    if dimension < num_canaries:
        raise ConfigError("dimension", dimension, f"must be at least num_canaries={num_canaries}")
    _validate.positive("noise_multiplier", noise_multiplier, allow_zero=True, allow_numpy=True)
    _validate.positive("max_grad_norm", max_grad_norm, allow_numpy=True)
    if steps < 1:
        raise ConfigError("steps", steps, "must be at least 1")
    _validate.unit_interval("sample_rate", sample_rate, allow_numpy=True)
    rng = np.random.default_rng(seed)
    included = rng.random(num_canaries) < 0.5
    # Per coordinate, T independent steps add up to (#steps sampled) * C + N(0, T sigma^2 C^2).
    times_sampled = rng.binomial(steps, sample_rate, size=num_canaries) if sample_rate < 1.0 else np.full(num_canaries, steps)
    signal = np.where(included, times_sampled, 0).astype(np.float64) * max_grad_norm
    noise = rng.normal(0.0, noise_multiplier * max_grad_norm * math.sqrt(steps), size=num_canaries)
    return CanaryTrial(scores=(signal + noise) / max_grad_norm, included=included)



@dataclass(frozen=True, kw_only=True, slots=True)
class InputSpaceAuditConfig:
    """A one-run black-box audit of privfl's DP-SGD (`train_dp_sgd`) on a small tabular task.

    Attributes:
        num_canaries: m canaries, each included in the training set w.p. 1/2.
        noise_multiplier: DP-SGD noise multiplier sigma.
        max_grad_norm: DP-SGD clipping norm C.
        sample_rate: Poisson sampling rate q of each step.
        epochs: Passes over the data (steps = epochs / q).
        learning_rate: SGD learning rate.
        hidden_units: 0 for logistic regression, else one hidden ReLU layer of this width.
        canary_scale: Magnitude of each canary's private marker feature.
        delta: Delta of the claimed and the empirical epsilon.
        alpha: One minus the confidence level of the empirical bound.
        analysis: The one-run analysis: eps-DP (default) or the f-DP (Gaussian trade-off)
            analysis, which certifies more when the privacy curve is Gaussian-shaped.
        seed: Seeds data split, canaries, model init, sampling and noise (simulation only).
    """

    num_canaries: int = 500
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    sample_rate: float = 0.25
    epochs: int = 4
    learning_rate: float = 5.0
    hidden_units: int = 0
    canary_scale: float = 20.0
    delta: float = 1e-5
    alpha: float = 0.05
    analysis: OneRunAnalysis = OneRunAnalysis.EPSILON_DP
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.analysis, OneRunAnalysis):
            try:
                object.__setattr__(self, "analysis", OneRunAnalysis(self.analysis))
            except ValueError:
                raise ConfigError("analysis", self.analysis, f"must be one of {[a.value for a in OneRunAnalysis]}") from None
        if self.num_canaries < 2:
            raise ConfigError("num_canaries", self.num_canaries, "must be at least 2")
        _validate.positive("noise_multiplier", self.noise_multiplier, allow_numpy=True, hint="the accountant needs noise")
        _validate.positive("max_grad_norm", self.max_grad_norm, allow_numpy=True)
        _validate.unit_interval("sample_rate", self.sample_rate, allow_numpy=True)
        if self.epochs < 1:
            raise ConfigError("epochs", self.epochs, "must be at least 1")
        _validate.positive("learning_rate", self.learning_rate, allow_numpy=True)
        if self.hidden_units < 0:
            raise ConfigError("hidden_units", self.hidden_units, "must be >= 0")
        _validate.positive("canary_scale", self.canary_scale, allow_numpy=True)
        _check_probability("delta", self.delta)
        _check_probability("alpha", self.alpha)


@dataclass(frozen=True, kw_only=True, slots=True)
class InputSpaceAuditResult:
    """Outcome of :func:`run_input_space_canary_audit`.

    Attributes:
        trial: Canary scores (negative loss under the trained model) and true inclusion.
        claimed_epsilon: the RDP epsilon of the DP event ``train_dp_sgd`` reports, at ``config.delta``.
        bound: The one-run lower bound from the canary scores (``config.analysis``).
        steps: DP-SGD steps taken.
    """

    trial: CanaryTrial
    claimed_epsilon: float
    bound: OneRunLowerBound
    steps: int


def run_input_space_canary_audit(config: InputSpaceAuditConfig) -> InputSpaceAuditResult:
    """Train a small model with `train_dp_sgd` on breast-cancer data plus canaries and audit it.

    Canary i is a copy of a random real example with its label flipped (mislabeled) and a marker
    feature of size ``canary_scale`` in a column no other example uses (an outlier), so a member
    canary can be fitted without hurting the rest of the data. The auditor sees only the final
    model (black box up to losses) and scores each canary by its negative loss.

    Args:
        config: The audit set-up.

    Returns:
        Scores, the accountant's claim and the empirical bound.
    """
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    from privfl.accounting import epsilon
    from privfl.audit.mia import torch_loss_scores
    from privfl.config import Accountant, DPConfig, TrainingConfig
    from privfl.training import flatten_parameters, load_flat_parameters, train_dp_sgd

    rng = np.random.default_rng(config.seed)
    data = load_breast_cancer()
    base = StandardScaler().fit_transform(data.data)
    labels = data.target.astype(np.int64)
    m = config.num_canaries
    n, d = base.shape
    features = np.hstack([base, np.zeros((n, m))])
    sources = rng.integers(0, n, size=m)
    canary_x = np.hstack([base[sources], config.canary_scale * np.eye(m)])
    canary_y = 1 - labels[sources]
    included = rng.random(m) < 0.5

    train_x = torch.tensor(np.vstack([features, canary_x[included]]), dtype=torch.float32)
    train_y = torch.tensor(np.concatenate([labels, canary_y[included]]), dtype=torch.int64)
    torch.manual_seed(config.seed)
    model: torch.nn.Module
    if config.hidden_units:
        model = torch.nn.Sequential(
            torch.nn.Linear(d + m, config.hidden_units), torch.nn.ReLU(), torch.nn.Linear(config.hidden_units, 2)
        )
    else:
        model = torch.nn.Linear(d + m, 2)
    dataset = torch.utils.data.TensorDataset(train_x, train_y)
    # The training that ships (privfl.training.train_dp_sgd: privfl's own Poisson batches, Opacus'
    # clipping and noise), so the audit certifies what a site runs, not a loop of its own.
    training = TrainingConfig(
        local_epochs=config.epochs,
        batch_size=max(1, round(config.sample_rate * len(dataset))),
        learning_rate=config.learning_rate,
        dp=DPConfig(noise_multiplier=config.noise_multiplier, max_grad_norm=config.max_grad_norm, accountant=Accountant.RDP),
    )
    start = flatten_parameters(model)
    result = train_dp_sgd(
        model, dataset, config=training, noise_multiplier=config.noise_multiplier, device=torch.device("cpu"),
        seed=config.seed, site="canary audit",
    )
    load_flat_parameters(model, start + result.delta)
    model.eval()
    steps = result.event.steps
    claimed = epsilon(
        noise_multiplier=result.event.noise_multiplier, sample_rate=result.event.sample_rate, steps=steps,
        delta=config.delta, accountant=Accountant.RDP,
    )
    scores = torch_loss_scores(
        model, torch.tensor(canary_x, dtype=torch.float32), torch.tensor(canary_y, dtype=torch.int64)
    )
    trial = CanaryTrial(scores=scores, included=included)
    bound = one_run_epsilon_lower_bound(scores, included, delta=config.delta, alpha=config.alpha, analysis=config.analysis)
    return InputSpaceAuditResult(trial=trial, claimed_epsilon=claimed, bound=bound, steps=steps)
