"""Tests for the many-trial epsilon lower bound and the comparison with a claimed epsilon."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privfl.audit.empirical import (
    AuditFailure,
    AuditStatus,
    ThresholdSelection,
    compare_to_claim,
    epsilon_lower_bound,
    gaussian_mechanism_epsilon,
)
from privfl.errors import ConfigError, PrivflError

DELTA = 1e-5
ALPHA = 0.05


def _allowed_rate(alpha: float, reps: int) -> float:
    return alpha + 3.0 * math.sqrt(alpha * (1.0 - alpha) / reps)


@pytest.mark.parametrize("selection", list(ThresholdSelection))
def test_no_signal_bound_is_rarely_positive(selection: ThresholdSelection) -> None:
    # IN and OUT scores from one distribution: any positive bound is a false discovery.
    reps = 200
    rng = np.random.default_rng(11)
    positives = 0
    for rep in range(reps):
        scores_in = rng.normal(size=200)
        scores_out = rng.normal(size=200)
        bound = epsilon_lower_bound(scores_in, scores_out, delta=DELTA, alpha=ALPHA, selection=selection, seed=rep)
        positives += bound.epsilon > 0
    assert positives / reps <= _allowed_rate(ALPHA, reps)


@pytest.mark.parametrize("selection", list(ThresholdSelection))
def test_randomized_response_bound_rarely_exceeds_true_epsilon(selection: ThresholdSelection) -> None:
    # Randomized response is exactly eps-DP and is the worst case for a threshold test, so the
    # bound exceeding the true epsilon is a false discovery at the alternative, not only at 0.
    true_eps, n, reps = 1.0, 2000, 200
    p = math.exp(true_eps) / (1.0 + math.exp(true_eps))
    rng = np.random.default_rng(5)
    exceed, total = 0, 0.0
    for rep in range(reps):
        scores_in = (rng.random(n) < p).astype(float)
        scores_out = (rng.random(n) < 1.0 - p).astype(float)
        bound = epsilon_lower_bound(scores_in, scores_out, delta=DELTA, selection=selection, seed=rep)
        exceed += bound.epsilon > true_eps
        total += bound.epsilon
    assert exceed / reps <= _allowed_rate(ALPHA, reps)
    # ...and the test is not vacuous: on average it certifies most of the true epsilon.
    assert total / reps > 0.7 * true_eps


def test_gaussian_mechanism_epsilon_matches_dp_accounting() -> None:
    pld = pytest.importorskip("dp_accounting.pld.pld_privacy_accountant")
    from dp_accounting import dp_event

    for sigma in (1.0, 1.5, 2.0):
        accountant = pld.PLDAccountant()
        accountant.compose(dp_event.GaussianDpEvent(sigma))
        assert gaussian_mechanism_epsilon(sigma, DELTA) == pytest.approx(accountant.get_epsilon(DELTA), rel=2e-3)
    assert gaussian_mechanism_epsilon(1.0, DELTA, steps=4) == pytest.approx(gaussian_mechanism_epsilon(0.5, DELTA))


def test_separated_scores_give_positive_bound_below_ceiling() -> None:
    rng = np.random.default_rng(0)
    scores_in = rng.normal(3.0, 1.0, size=500)
    scores_out = rng.normal(0.0, 1.0, size=500)
    for selection in ThresholdSelection:
        bound = epsilon_lower_bound(scores_in, scores_out, delta=DELTA, selection=selection)
        assert 1.0 < bound.epsilon <= bound.ceiling
        assert bound.tpr_lower > bound.fpr_upper
        assert bound.num_in == bound.num_out == 500


def test_perfect_separation_reaches_ceiling_and_ceiling_grows_with_trials() -> None:
    small = epsilon_lower_bound(np.ones(100), np.zeros(100), delta=DELTA)
    large = epsilon_lower_bound(np.ones(1000), np.zeros(1000), delta=DELTA)
    assert small.epsilon == pytest.approx(small.ceiling)
    assert large.epsilon == pytest.approx(large.ceiling)
    assert large.ceiling > small.ceiling + 1.0
    # Known value: CP at alpha/(2n) per side, n = 1000: log((L - delta) / U) with L = 1 - U.
    level = ALPHA / 2000
    upper = 1.0 - level ** (1 / 1000)
    assert large.ceiling == pytest.approx(math.log((1 - upper - DELTA) / upper), rel=1e-6)


def test_larger_score_means_in() -> None:
    # Reversed roles carry no evidence in this orientation except through the symmetric form,
    # which also needs IN scores to be high; swapping the groups must not certify anything.
    rng = np.random.default_rng(1)
    bound = epsilon_lower_bound(rng.normal(-3, 1, 300), rng.normal(0, 1, 300), delta=DELTA)
    assert bound.epsilon == 0.0


def test_strong_leak_fails_claim_and_can_raise() -> None:
    bound = epsilon_lower_bound(np.full(1000, 5.0), np.zeros(1000), delta=DELTA)
    outcome = compare_to_claim(bound, 1.0, raise_on_failure=False)
    assert not outcome.passed
    assert outcome.status is AuditStatus.FAILED
    assert "FAILED" in outcome.message and "1.000" in outcome.message
    with pytest.raises(AuditFailure) as info:
        compare_to_claim(bound, 1.0, raise_on_failure=True)
    assert isinstance(info.value, PrivflError)
    assert info.value.outcome.empirical_epsilon == pytest.approx(bound.epsilon)


def test_claim_above_bound_passes_and_flags_underpowered_audit() -> None:
    bound = epsilon_lower_bound(np.full(50, 5.0), np.zeros(50), delta=DELTA)
    outcome = compare_to_claim(bound, 10.0, raise_on_failure=True)
    assert outcome.passed
    assert not outcome.can_detect_violation  # 50 trials cannot certify eps = 10
    assert "could not have found a violation" in outcome.message
    assert outcome.confidence == pytest.approx(0.95)


@pytest.mark.parametrize(
    ("scores_in", "scores_out", "kwargs", "field"),
    [
        ([], [0.0], {"delta": DELTA}, "scores_in"),
        ([0.0], [float("nan")], {"delta": DELTA}, "scores_out"),
        ([[0.0]], [0.0], {"delta": DELTA}, "scores_in"),
        ([0.0], [0.0], {"delta": 0.0}, "delta"),
        ([0.0], [0.0], {"delta": 1.5}, "delta"),
        ([0.0], [0.0], {"delta": DELTA, "alpha": 1.0}, "alpha"),
        ([0.0], [0.0, 1.0], {"delta": DELTA, "selection": ThresholdSelection.SPLIT}, "selection"),
    ],
)
def test_invalid_inputs_raise_config_error(scores_in, scores_out, kwargs, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        epsilon_lower_bound(scores_in, scores_out, **kwargs)
    assert info.value.field == field


def test_compare_rejects_bad_claim() -> None:
    bound = epsilon_lower_bound([1.0, 2.0], [0.0, 0.5], delta=DELTA)
    with pytest.raises(ConfigError) as info:
        compare_to_claim(bound, float("nan"))
    assert info.value.field == "claimed_epsilon"
