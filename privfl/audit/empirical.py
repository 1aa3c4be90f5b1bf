"""Empirical lower bounds on epsilon from membership-inference trials, and their comparison with a claim."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize, special

from privfl import _validate
from privfl.errors import AuditFailure, ConfigError  # AuditFailure is re-exported here

__all__ = [
    "AuditFailure",
    "AuditOutcome",
    "AuditStatus",
    "EpsilonLowerBound",
    "LowerBound",
    "ThresholdSelection",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "compare_to_claim",
    "epsilon_lower_bound",
    "gaussian_mechanism_delta",
    "gaussian_mechanism_epsilon",
]


class ThresholdSelection(enum.Enum):
    """How the decision threshold is chosen without invalidating the confidence level.

    Picking the best of many thresholds on the same trials and then quoting a single
    Clopper-Pearson interval overstates confidence. Both choices below are valid:

    - ``BONFERRONI``: every threshold is considered; the Clopper-Pearson level for the TPR is
      ``alpha / (2 * num_in)`` and for the FPR ``alpha / (2 * num_out)``. A threshold only matters
      through the counts it produces, and there are ``num_in`` non-trivial IN counts and ``num_out``
      non-trivial OUT counts, so a union bound over counts (not over real-valued thresholds) makes the
      intervals hold simultaneously for every threshold with probability at least ``1 - alpha``.
    - ``SPLIT``: a seeded random half of each group chooses the threshold; the other half bounds it at
      level ``alpha / 2`` per rate. No multiplicity cost, but half the trials.
    """

    BONFERRONI = "bonferroni"
    SPLIT = "split"


class LowerBound(Protocol):
    """What :func:`compare_to_claim` needs from any empirical bound."""

    @property
    def epsilon(self) -> float: ...

    @property
    def ceiling(self) -> float: ...

    @property
    def alpha(self) -> float: ...

    @property
    def delta(self) -> float: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class EpsilonLowerBound:
    """A many-trial (Jagielski et al. 2020) lower bound on epsilon.

    Attributes:
        epsilon: Certified lower bound on epsilon (0 when nothing can be certified). With
            probability at least ``1 - alpha`` over the trials, the mechanism is not
            ``(epsilon', delta)``-DP for any ``epsilon' < epsilon``.
        threshold: Score threshold (predict IN when ``score >= threshold``) achieving the bound.
        tpr_lower: Clopper-Pearson lower bound on the true-positive rate at that threshold.
        fpr_upper: Clopper-Pearson upper bound on the false-positive rate at that threshold.
        alpha: One minus the confidence level of the bound.
        delta: The delta the bound is stated for.
        num_in: Number of IN trials supplied.
        num_out: Number of OUT trials supplied.
        ceiling: Largest epsilon these trial counts could ever certify (a perfect attack).
        selection: How the threshold choice was corrected for.
    """

    epsilon: float
    threshold: float
    tpr_lower: float
    fpr_upper: float
    alpha: float
    delta: float
    num_in: int
    num_out: int
    ceiling: float
    selection: ThresholdSelection


def clopper_pearson_lower(successes: NDArray[np.int64] | int, trials: int, level: float) -> NDArray[np.float64]:
    """One-sided Clopper-Pearson lower bound: ``P[p < bound] <= level``.

    Args:
        successes: Observed success counts (array or scalar).
        trials: Number of trials.
        level: One-sided error probability.

    Returns:
        The lower bounds, 0 where ``successes == 0``.
    """
    k = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bound = special.betaincinv(k, trials - k + 1.0, level)
    return np.where(k <= 0, 0.0, bound)


def clopper_pearson_upper(successes: NDArray[np.int64] | int, trials: int, level: float) -> NDArray[np.float64]:
    """One-sided Clopper-Pearson upper bound: ``P[p > bound] <= level``.

    Args:
        successes: Observed success counts (array or scalar).
        trials: Number of trials.
        level: One-sided error probability.

    Returns:
        The upper bounds, 1 where ``successes == trials``.
    """
    k = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bound = special.betaincinv(k + 1.0, trials - k, 1.0 - level)
    return np.where(k >= trials, 1.0, bound)


def _epsilon_from_rates(tpr_lo: NDArray[np.float64], fpr_hi: NDArray[np.float64], delta: float) -> NDArray[np.float64]:
    """Largest epsilon ruled out by ``TPR >= tpr_lo`` and ``FPR <= fpr_hi`` under (eps, delta)-DP.

    (eps, delta)-DP forces, for every test, ``TPR <= e^eps FPR + delta`` and, applied to the
    complementary test in the other direction, ``TNR <= e^eps FNR + delta``, i.e.
    ``1 - FPR <= e^eps (1 - TPR) + delta``. Both are rearranged for eps and the larger kept.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        direct = np.log(np.maximum(tpr_lo - delta, 0.0)) - np.log(fpr_hi)
        complement = np.log(np.maximum(1.0 - fpr_hi - delta, 0.0)) - np.log(1.0 - tpr_lo)
    eps = np.maximum(direct, complement)
    return np.where(np.isnan(eps), -np.inf, eps)


def _as_scores(name: str, values: ArrayLike) -> NDArray[np.float64]:
    """Validate a one-dimensional, non-empty, finite score array."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(name, values, "must be an array of real numbers") from exc
    if array.ndim != 1:
        raise ConfigError(name, f"array of shape {array.shape}", "must be one-dimensional")
    if array.size == 0:
        raise ConfigError(name, "empty array", "must hold at least one score")
    if not np.all(np.isfinite(array)):
        bad = array[~np.isfinite(array)][0]
        raise ConfigError(name, float(bad), "every score must be finite (no NaN or inf)")
    return array


def _check_probability(name: str, value: float) -> float:
    """Validate a probability strictly inside (0, 1)."""
    return float(_validate.open_unit_interval(name, value, allow_numpy=True))  # type: ignore[arg-type]


def _counts_at_thresholds(
    scores_in: NDArray[np.float64], scores_out: NDArray[np.float64], thresholds: NDArray[np.float64]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Numbers of IN and OUT scores ``>= threshold`` for each threshold."""
    sorted_in = np.sort(scores_in)
    sorted_out = np.sort(scores_out)
    tp = scores_in.size - np.searchsorted(sorted_in, thresholds, side="left")
    fp = scores_out.size - np.searchsorted(sorted_out, thresholds, side="left")
    return tp.astype(np.int64), fp.astype(np.int64)


def _best_threshold(
    scores_in: NDArray[np.float64],
    scores_out: NDArray[np.float64],
    thresholds: NDArray[np.float64],
    *,
    level_in: float,
    level_out: float,
    delta: float,
) -> tuple[int, NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Evaluate every threshold; return the argmax index, eps, tpr_lo and fpr_hi arrays."""
    tp, fp = _counts_at_thresholds(scores_in, scores_out, thresholds)
    tpr_lo = clopper_pearson_lower(tp, scores_in.size, level_in)
    fpr_hi = clopper_pearson_upper(fp, scores_out.size, level_out)
    eps = _epsilon_from_rates(tpr_lo, fpr_hi, delta)
    return int(np.argmax(eps)), eps, tpr_lo, fpr_hi


def _ceiling(num_in: int, num_out: int, level_in: float, level_out: float, delta: float) -> float:
    """Epsilon certified by a perfect attack: every IN above the threshold, every OUT below."""
    tpr_lo = clopper_pearson_lower(num_in, num_in, level_in)
    fpr_hi = clopper_pearson_upper(0, num_out, level_out)
    return max(0.0, float(_epsilon_from_rates(tpr_lo, fpr_hi, delta)))


def epsilon_lower_bound(
    scores_in: ArrayLike,
    scores_out: ArrayLike,
    *,
    delta: float,
    alpha: float = 0.05,
    selection: ThresholdSelection = ThresholdSelection.BONFERRONI,
    seed: int = 0,
) -> EpsilonLowerBound:
    """Lower-bound epsilon from independent IN and OUT trials (Jagielski, Ullman, Oprea 2020).

    Each IN score comes from a run that included the target record, each OUT score from a run
    that did not; a larger score means "more likely IN". For a threshold t the attack says IN when
    ``score >= t``. If the mechanism is (eps, delta)-DP then ``TPR <= e^eps FPR + delta`` and
    ``1 - FPR <= e^eps (1 - TPR) + delta``, so Clopper-Pearson bounds ``TPR >= tpr_lower`` and
    ``FPR <= fpr_upper`` (each at level alpha/2, union bound) certify
    ``eps >= max(log((tpr_lower - delta) / fpr_upper), log((1 - fpr_upper - delta) / (1 - tpr_lower)))``.

    Threat model: the auditor controls the target record and sees the trained output (or
    whatever produced the scores); the trials must be independent runs of the mechanism.

    Args:
        scores_in: Scores of runs with the target included.
        scores_out: Scores of runs with the target excluded.
        delta: The delta of the guarantee under test, in (0, 1).
        alpha: One minus the confidence level, in (0, 1).
        selection: How choosing the best threshold is paid for (see :class:`ThresholdSelection`).
        seed: Seed of the random half split; used only by ``ThresholdSelection.SPLIT``.

    Returns:
        The bound with the threshold, rate bounds and the ceiling for these trial counts.

    Raises:
        ConfigError: If a score array is empty, not 1-D or holds NaN/inf, or if delta/alpha are
            outside (0, 1), or if SPLIT is asked for with fewer than 2 trials per group.
    """
    s_in = _as_scores("scores_in", scores_in)
    s_out = _as_scores("scores_out", scores_out)
    delta = _check_probability("delta", delta)
    alpha = _check_probability("alpha", alpha)
    if not isinstance(selection, ThresholdSelection):
        raise ConfigError("selection", selection, "must be a ThresholdSelection")

    if selection is ThresholdSelection.BONFERRONI:
        level_in = alpha / (2.0 * s_in.size)
        level_out = alpha / (2.0 * s_out.size)
        thresholds = np.unique(np.concatenate([s_in, s_out]))
        best, eps, tpr_lo, fpr_hi = _best_threshold(
            s_in, s_out, thresholds, level_in=level_in, level_out=level_out, delta=delta
        )
        ceiling = _ceiling(s_in.size, s_out.size, level_in, level_out, delta)
        return EpsilonLowerBound(
            epsilon=max(0.0, float(eps[best])),
            threshold=float(thresholds[best]),
            tpr_lower=float(tpr_lo[best]),
            fpr_upper=float(fpr_hi[best]),
            alpha=alpha,
            delta=delta,
            num_in=s_in.size,
            num_out=s_out.size,
            ceiling=ceiling,
            selection=selection,
        )

    if s_in.size < 2 or s_out.size < 2:
        raise ConfigError("selection", selection.value, "SPLIT needs at least 2 IN and 2 OUT scores")
    rng = np.random.default_rng(seed)
    perm_in = rng.permutation(s_in.size)
    perm_out = rng.permutation(s_out.size)
    half_in, half_out = s_in.size // 2, s_out.size // 2
    pick_in, test_in = s_in[perm_in[:half_in]], s_in[perm_in[half_in:]]
    pick_out, test_out = s_out[perm_out[:half_out]], s_out[perm_out[half_out:]]
    # The selection half ranks thresholds by the bound they would give, so lucky tiny counts
    # are not preferred; its own confidence level does not matter for validity.
    candidates = np.unique(np.concatenate([pick_in, pick_out]))
    best, _, _, _ = _best_threshold(
        pick_in, pick_out, candidates, level_in=alpha / 2.0, level_out=alpha / 2.0, delta=delta
    )
    threshold = np.array([candidates[best]])
    _, eps, tpr_lo, fpr_hi = _best_threshold(
        test_in, test_out, threshold, level_in=alpha / 2.0, level_out=alpha / 2.0, delta=delta
    )
    return EpsilonLowerBound(
        epsilon=max(0.0, float(eps[0])),
        threshold=float(threshold[0]),
        tpr_lower=float(tpr_lo[0]),
        fpr_upper=float(fpr_hi[0]),
        alpha=alpha,
        delta=delta,
        num_in=s_in.size,
        num_out=s_out.size,
        ceiling=_ceiling(test_in.size, test_out.size, alpha / 2.0, alpha / 2.0, delta),
        selection=selection,
    )


def gaussian_mechanism_delta(epsilon: float, mu: float) -> float:
    """Exact delta(eps) of a mu-GDP mechanism (Balle and Wang 2018; Dong, Roth, Su 2019).

    ``delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``.

    Args:
        epsilon: Epsilon, at least 0.
        mu: Sensitivity over noise standard deviation, positive.

    Returns:
        The smallest delta for which the mechanism is (epsilon, delta)-DP.
    """
    if mu <= 0:
        return 0.0
    a = special.log_ndtr(-epsilon / mu + mu / 2.0)
    b = epsilon + special.log_ndtr(-epsilon / mu - mu / 2.0)
    # Difference of exponentials computed stably: e^a (1 - e^(b - a)).
    return float(math.exp(a) * -math.expm1(min(b - a, 0.0)))


def gaussian_mechanism_epsilon(noise_multiplier: float, delta: float, *, steps: int = 1) -> float:
    """Exact epsilon of ``steps`` full-batch Gaussian mechanisms with sensitivity 1 (no subsampling).

    Composition of T Gaussian mechanisms with noise multiplier sigma is mu-GDP with
    ``mu = sqrt(T) / sigma``, and the (eps, delta) curve of mu-GDP is exact.

    Args:
        noise_multiplier: Noise standard deviation over sensitivity (sigma), positive.
        delta: Target delta in (0, 1).
        steps: Number of composed releases.

    Returns:
        The smallest epsilon with the mechanism (epsilon, delta)-DP.

    Raises:
        ConfigError: If an argument is out of range.
    """
    _validate.positive("noise_multiplier", noise_multiplier, allow_numpy=True)
    if steps < 1:
        raise ConfigError("steps", steps, "must be at least 1")
    delta = _check_probability("delta", delta)
    mu = math.sqrt(steps) / noise_multiplier
    if gaussian_mechanism_delta(0.0, mu) <= delta:
        return 0.0
    high = 1.0
    while gaussian_mechanism_delta(high, mu) > delta:
        high *= 2.0
    return float(optimize.brentq(lambda e: gaussian_mechanism_delta(e, mu) - delta, 0.0, high, xtol=1e-10))


class AuditStatus(enum.Enum):
    """Verdict of an empirical audit against the accountant's claim."""

    PASSED = "passed"
    FAILED = "failed"


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditOutcome:
    """An empirical lower bound side by side with the claimed epsilon.

    Attributes:
        status: FAILED when the empirical lower bound exceeds the claim.
        empirical_epsilon: The certified lower bound.
        claimed_epsilon: The accountant's epsilon at the same delta.
        ceiling: Largest epsilon the audit could have certified with its number of trials.
        confidence: ``1 - alpha`` of the empirical bound.
        delta: The delta both epsilons refer to.
        can_detect_violation: Whether the ceiling exceeds the claim; if not, the audit could
            never have failed and says nothing about the claim.
        message: Human-readable verdict.
    """

    status: AuditStatus
    empirical_epsilon: float
    claimed_epsilon: float
    ceiling: float
    confidence: float
    delta: float
    can_detect_violation: bool
    message: str

    @property
    def passed(self) -> bool:
        """True unless the empirical bound exceeds the claim."""
        return self.status is AuditStatus.PASSED


def compare_to_claim(bound: LowerBound, claimed_epsilon: float, *, raise_on_failure: bool = True) -> AuditOutcome:
    """Compare an empirical lower bound with the accountant's claimed epsilon; by default, fail loudly.

    A lower bound above the claim means, at the bound's confidence, that the claim is false
    (an accounting bug, a sampling/clipping bug, or a claim for the wrong delta). A lower bound
    below the claim proves nothing: audits only find violations.

    Args:
        bound: Any empirical bound (many-trial, one-run eps-DP or one-run GDP).
        claimed_epsilon: The epsilon the accountant reports at ``bound.delta``.
        raise_on_failure: Raise :class:`~privfl.errors.AuditFailure` when the claim is violated
            (the default). Pass False to get the FAILED outcome back instead, e.g. to print it
            in a report.

    Returns:
        The outcome. It is always PASSED unless ``raise_on_failure=False``; then
        ``outcome.passed`` is False when the claim is violated.

    Raises:
        ConfigError: If claimed_epsilon is negative or not finite.
        AuditFailure: If the empirical bound exceeds the claim, unless ``raise_on_failure=False``;
            the FAILED outcome is its ``outcome`` attribute.
    """
    _validate.positive("claimed_epsilon", claimed_epsilon, allow_zero=True, allow_numpy=True)
    empirical = float(bound.epsilon)
    ceiling = float(bound.ceiling)
    confidence = 1.0 - float(bound.alpha)
    can_detect = ceiling > claimed_epsilon
    summary = (
        f"empirical epsilon >= {empirical:.3f} at {confidence:.0%} confidence "
        f"(delta={bound.delta:g}), claimed epsilon {claimed_epsilon:.3f}, "
        f"ceiling for this many trials {ceiling:.3f}"
    )
    if empirical > claimed_epsilon:
        status = AuditStatus.FAILED
        message = (
            "PRIVACY AUDIT FAILED: the measured privacy loss exceeds the accountant's claim; "
            "the claimed guarantee does not hold for this mechanism. " + summary
        )
    else:
        status = AuditStatus.PASSED
        message = "audit passed (no violation found; this is not a proof of privacy): " + summary
        if not can_detect:
            message += "; the ceiling is below the claim, so this audit could not have found a violation"
    outcome = AuditOutcome(
        status=status,
        empirical_epsilon=empirical,
        claimed_epsilon=float(claimed_epsilon),
        ceiling=ceiling,
        confidence=confidence,
        delta=float(bound.delta),
        can_detect_violation=can_detect,
        message=message,
    )
    if raise_on_failure and status is AuditStatus.FAILED:
        raise AuditFailure(outcome)
    return outcome
