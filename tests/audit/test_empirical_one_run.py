"""Tests for one-run audits: validity, power on Dirac canaries, a real Opacus run and MIA scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privfl.audit.empirical import compare_to_claim, gaussian_mechanism_epsilon
from privfl.audit.one_run import (
    InputSpaceAuditConfig,
    OneRunAnalysis,
    default_guess_grid,
    f_dp_guess_grid,
    gdp_guessing_rejects,
    one_run_epsilon_lower_bound,
    one_run_gdp_lower_bound,
    one_run_p_value,
    run_input_space_canary_audit,
    simulate_dirac_canaries,
)
from privfl.errors import ConfigError

DELTA = 1e-5
ALPHA = 0.05


def _allowed_rate(alpha: float, reps: int) -> float:
    return alpha + 3.0 * math.sqrt(alpha * (1.0 - alpha) / reps)


@pytest.mark.parametrize("analysis", list(OneRunAnalysis))
def test_no_signal_one_run_bound_is_rarely_positive(analysis: OneRunAnalysis) -> None:
    reps, m = 200, 200
    rng = np.random.default_rng(21)
    positives = 0
    for _ in range(reps):
        included = rng.random(m) < 0.5
        scores = rng.normal(size=m)  # independent of membership
        bound = one_run_epsilon_lower_bound(scores, included, delta=DELTA, k_plus=20, k_minus=20, analysis=analysis)
        positives += bound.epsilon > 0
    assert positives / reps <= _allowed_rate(ALPHA, reps)


@pytest.mark.parametrize(
    ("analysis", "grid"),
    [(OneRunAnalysis.EPSILON_DP, default_guess_grid), (OneRunAnalysis.GAUSSIAN_DP, f_dp_guess_grid)],
)
def test_no_signal_with_guess_search_is_rarely_positive(analysis: OneRunAnalysis, grid) -> None:
    reps, m = 200, 200
    rng = np.random.default_rng(22)
    positives = 0
    for _ in range(reps):
        bound = one_run_epsilon_lower_bound(rng.normal(size=m), rng.random(m) < 0.5, delta=DELTA, analysis=analysis)
        positives += bound.epsilon > 0
        assert bound.grid_size == len(grid(m))
    assert positives / reps <= _allowed_rate(ALPHA, reps)


def test_f_dp_grid_is_smaller_than_the_default_and_keeps_the_ceiling() -> None:
    # The grid is a function of m only (fixed before any score is seen), every pair is usable,
    # and halving the Bonferroni split must not lower what a perfect attack could certify.
    m = 1000
    grid = f_dp_guess_grid(m)
    assert grid == ((25, 25), (50, 50), (100, 100), (250, 250), (500, 500), (50, 0), (100, 0), (250, 0))
    assert all(0 < kp + km <= m for kp, km in grid) and len(grid) < len(default_guess_grid(m))
    assert f_dp_guess_grid(3) == ((1, 1), (1, 0))
    perfect = np.arange(m, dtype=float)
    included = perfect >= m / 2
    new = one_run_gdp_lower_bound(perfect, included, delta=DELTA)
    old_level = ALPHA / len(default_guess_grid(m))
    old = max(
        one_run_gdp_lower_bound(perfect, included, delta=DELTA, alpha=old_level, k_plus=kp, k_minus=km).epsilon
        for kp, km in default_guess_grid(m)
    )
    assert new.grid_size == len(grid)
    assert new.ceiling >= old  # 9.22 vs 8.53 at delta 1e-5


def test_randomized_response_canaries_rarely_exceed_true_epsilon() -> None:
    # Per-canary randomized response is exactly eps-DP and makes the binomial tail exact, so this
    # checks the eps-DP analysis where it is tight.
    true_eps, m, reps = 1.0, 1000, 200
    p = math.exp(true_eps) / (1.0 + math.exp(true_eps))
    rng = np.random.default_rng(23)
    exceed, total = 0, 0.0
    for _ in range(reps):
        included = rng.random(m) < 0.5
        says_in = np.where(rng.random(m) < p, included, ~included)
        scores = says_in + 1e-6 * rng.random(m)  # break ties at random
        bound = one_run_epsilon_lower_bound(scores, included, delta=DELTA, k_plus=m // 2, k_minus=m // 2)
        exceed += bound.epsilon > true_eps
        total += bound.epsilon
    assert exceed / reps <= _allowed_rate(ALPHA, reps)
    assert total / reps > 0.6 * true_eps


def test_gdp_analysis_does_not_reject_the_true_mu_of_dirac_canaries() -> None:
    # Simulate the exact distribution of correct guesses at mu = 1 and check the smallest count
    # that rejects mu = 1 is reached with probability at most alpha.
    mu, m, k, reps = 1.0, 1000, 100, 4000
    rng = np.random.default_rng(24)
    included = rng.random((reps, m)) < 0.5
    scores = rng.normal(size=(reps, m)) + mu * included
    order = np.argsort(scores, axis=1)
    correct = np.take_along_axis(included, order[:, -k:], 1).sum(1) + (~np.take_along_axis(included, order[:, :k], 1)).sum(1)
    counts = np.arange(2 * k + 1)
    rejects = np.array([gdp_guessing_rejects(np.array([mu]), m, 2 * k, int(v), ALPHA)[0] for v in counts])
    assert rejects.any()  # a perfect attack would reject mu = 1
    smallest_rejected = counts[rejects][0]
    assert np.mean(correct >= smallest_rejected) <= ALPHA


def test_p_value_known_answer_without_delta() -> None:
    # With delta = 0 the p-value is the binomial tail: P[Bin(10, 1/2) >= 10] = 2^-10 at eps = 0.
    assert one_run_p_value(100, 10, 10, 0.0, 0.0) == pytest.approx(2.0**-10)
    assert one_run_p_value(100, 10, 0, 5.0, 0.0) == 1.0
    assert one_run_p_value(100, 10, 8, 1.0, 1e-3) > one_run_p_value(100, 10, 8, 1.0, 0.0)


def test_dirac_canaries_power_reaches_half_of_theoretical_epsilon() -> None:
    # Single full-batch step, sigma = 1: the Gaussian mechanism with eps ~ 4.38 at delta 1e-5.
    # Guess counts are fixed in advance (1% of m each side), so no search correction is needed.
    sigma, m = 1.0, 20_000
    theoretical = gaussian_mechanism_epsilon(sigma, DELTA)
    assert theoretical == pytest.approx(4.377, abs=0.01)
    trial = simulate_dirac_canaries(dimension=m, num_canaries=m, noise_multiplier=sigma, seed=7)
    eps_dp = one_run_epsilon_lower_bound(trial.scores, trial.included, delta=DELTA, k_plus=m // 100, k_minus=m // 100)
    gdp = one_run_gdp_lower_bound(trial.scores, trial.included, delta=DELTA, k_plus=m // 100, k_minus=m // 100)
    assert eps_dp.epsilon >= 0.5 * theoretical  # measured 0.54 of theoretical (seed 7)
    assert gdp.epsilon >= 0.6 * theoretical  # measured 0.68 of theoretical (seed 7)
    assert gdp.mu is not None and gdp.mu < 1.0 / sigma  # a valid bound stays below the true mu
    assert eps_dp.epsilon <= eps_dp.ceiling and gdp.epsilon <= gdp.ceiling
    assert compare_to_claim(gdp, theoretical).passed


def test_known_leak_without_noise_reaches_ceiling_and_fails_claim() -> None:
    trial = simulate_dirac_canaries(dimension=2000, num_canaries=1000, noise_multiplier=0.0, seed=1)
    bound = one_run_epsilon_lower_bound(trial.scores, trial.included, delta=DELTA)
    assert bound.correct == bound.guesses
    # The ceiling assumes every grid point is guessed right; with exact ties at 0 and 1 the widest
    # symmetric guesses cannot be, so the bound lands just below it (measured 4.30 of 5.00).
    assert 0.8 * bound.ceiling <= bound.epsilon <= bound.ceiling
    outcome = compare_to_claim(bound, 1.0, raise_on_failure=False)
    assert not outcome.passed and "FAILED" in outcome.message


def test_subsampled_multi_step_dirac_canaries_shape_and_signal() -> None:
    trial = simulate_dirac_canaries(
        dimension=500, num_canaries=500, noise_multiplier=0.5, steps=50, sample_rate=0.2, seed=3
    )
    assert trial.scores.shape == trial.included.shape == (500,)
    # Expected IN signal is q T = 10 in units of C; OUT is centred at 0.
    assert trial.scores[trial.included].mean() == pytest.approx(10.0, abs=0.5)
    assert trial.scores[~trial.included].mean() == pytest.approx(0.0, abs=0.5)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scores": [], "included": []}, "scores"),
        ({"scores": [0.0, 1.0], "included": [True]}, "included"),
        ({"scores": [0.0, 1.0], "included": [2, 0]}, "included"),
        ({"scores": [0.0, 1.0], "included": [True, False], "delta": 1.0}, "delta"),
        ({"scores": [0.0, 1.0], "included": [True, False], "k_plus": 2, "k_minus": 1}, "k_plus + k_minus"),
        ({"scores": [0.0, 1.0], "included": [True, False], "k_plus": -1}, "k_plus"),
    ],
)
def test_one_run_invalid_inputs(kwargs: dict[str, object], field: str) -> None:
    kwargs.setdefault("delta", DELTA)
    with pytest.raises(ConfigError) as info:
        one_run_epsilon_lower_bound(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_simulation_and_config_validation() -> None:
    with pytest.raises(ConfigError, match="dimension"):
        simulate_dirac_canaries(dimension=5, num_canaries=10, noise_multiplier=1.0, seed=0)
    with pytest.raises(ConfigError, match="sample_rate"):
        simulate_dirac_canaries(dimension=10, num_canaries=10, noise_multiplier=1.0, sample_rate=0.0, seed=0)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        InputSpaceAuditConfig(noise_multiplier=0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_opacus_input_space_canary_audit(seed: int) -> None:
    # The shipped DP-SGD (train_dp_sgd, Poisson sampling q = 0.25, 16 steps, RDP accountant) on breast-cancer
    # data with 500 mislabeled outlier canaries: the bound is positive yet below the claim.
    result = run_input_space_canary_audit(InputSpaceAuditConfig(noise_multiplier=1.0, seed=seed))
    assert result.steps == 16
    assert result.claimed_epsilon == pytest.approx(8.26, abs=0.1)
    assert result.bound.epsilon > 0.2  # measured 0.55 (seed 0) and 0.39 (seed 1)
    assert compare_to_claim(result.bound, result.claimed_epsilon).passed


@pytest.mark.slow
def test_opacus_input_space_canary_audit_longer_training() -> None:
    # 100 smaller steps (q = 0.1, 10 epochs): same claim scale, about 10-20 s of training.
    config = InputSpaceAuditConfig(noise_multiplier=1.0, sample_rate=0.1, epochs=10, learning_rate=1.0, seed=1)
    result = run_input_space_canary_audit(config)
    assert result.steps == 100
    assert result.bound.epsilon > 0.1  # measured 0.26
    assert compare_to_claim(result.bound, result.claimed_epsilon).passed


def test_f_dp_analysis_certifies_more_than_eps_dp_at_m_1000() -> None:
    # benchmarks/audit_power.py measures this over 50 seeds (docs/audits-empirical.md); 10 here.
    sigma, m = 1.0, 1000
    theoretical = gaussian_mechanism_epsilon(sigma, DELTA)
    shares = {a: [] for a in OneRunAnalysis}
    for seed in range(10):
        trial = simulate_dirac_canaries(dimension=m, num_canaries=m, noise_multiplier=sigma, seed=seed)
        for analysis in OneRunAnalysis:
            bound = one_run_epsilon_lower_bound(
                trial.scores, trial.included, delta=DELTA, alpha=ALPHA, k_plus=50, k_minus=50, analysis=analysis
            )
            assert bound.epsilon <= bound.ceiling
            shares[analysis].append(bound.epsilon / theoretical)
    assert np.mean(shares[OneRunAnalysis.GAUSSIAN_DP]) > 0.45
    assert np.mean(shares[OneRunAnalysis.GAUSSIAN_DP]) > np.mean(shares[OneRunAnalysis.EPSILON_DP]) + 0.1


@pytest.mark.parametrize("analysis", list(OneRunAnalysis))
def test_every_one_run_report_states_the_ceiling_for_its_m(analysis: OneRunAnalysis) -> None:
    trial = simulate_dirac_canaries(dimension=400, num_canaries=400, noise_multiplier=1.0, seed=3)
    bound = one_run_epsilon_lower_bound(trial.scores, trial.included, delta=DELTA, k_plus=20, k_minus=20, analysis=analysis)
    line = bound.describe()
    assert f"ceiling for m=400 canaries: {bound.ceiling:.3f}" in line
    assert f"epsilon >= {bound.epsilon:.3f}" in line and "95% confidence" in line


def test_input_space_audit_takes_the_analysis_option() -> None:
    assert InputSpaceAuditConfig(analysis="gaussian-dp").analysis is OneRunAnalysis.GAUSSIAN_DP
    with pytest.raises(ConfigError) as info:
        InputSpaceAuditConfig(analysis="renyi")
    assert info.value.field == "analysis"
