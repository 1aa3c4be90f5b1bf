"""Exact discrete samplers, grid rounding and the float-leak-free release (privfl.noise)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from privfl import noise as noise_module
from privfl.errors import ConfigError
from privfl.noise import (
    EXACT_STEPS,
    MAX_SIGMA_STEPS,
    CryptoRandom,
    GridNoise,
    SeededRandom,
    add_grid_noise,
    bernoulli_exp,
    choose_grid,
    discrete_gaussian,
    discrete_laplace,
    plan_grid_noise,
    random_source,
    round_to_grid,
    uniform_below,
)


def _chi_squared_p(samples: np.ndarray, pmf: dict[int, float], min_expected: float = 20.0) -> float:
    """p-value of a chi-squared goodness-of-fit test; tail bins are merged so each expects >= min_expected."""
    n = len(samples)
    support = sorted(pmf)
    observed, expected = [], []
    values, counts = np.unique(samples, return_counts=True)
    found = dict(zip(values.tolist(), counts.tolist(), strict=True))
    assert set(found) <= set(support), "a sample outside the support"
    bucket_obs, bucket_exp = 0, 0.0
    for k in support:
        bucket_obs += found.get(k, 0)
        bucket_exp += n * pmf[k]
        if bucket_exp >= min_expected:
            observed.append(bucket_obs)
            expected.append(bucket_exp)
            bucket_obs, bucket_exp = 0, 0.0
    observed[-1] += bucket_obs
    expected[-1] += bucket_exp
    expected = np.array(expected) * n / np.sum(expected)
    return float(stats.chisquare(observed, expected).pvalue)


def _discrete_gaussian_pmf(sigma: float, width: int) -> dict[int, float]:
    ks = np.arange(-width, width + 1)
    weights = np.exp(-(ks.astype(float) ** 2) / (2 * sigma**2))
    return dict(zip(ks.tolist(), (weights / weights.sum()).tolist(), strict=True))


@pytest.mark.parametrize("sigma", [1, 3])
def test_discrete_gaussian_matches_its_pmf(sigma):
    samples = discrete_gaussian(sigma, 200_000, SeededRandom(sigma))
    assert samples.dtype == np.int64
    assert _chi_squared_p(samples, _discrete_gaussian_pmf(sigma, 40 * sigma)) > 1e-3


def test_a_wrong_pmf_is_rejected_by_the_same_test():
    # The test above can fail: a discrete Gaussian of scale 3 is not one of scale 3.2.
    samples = discrete_gaussian(3, 200_000, SeededRandom(0))
    assert _chi_squared_p(samples, _discrete_gaussian_pmf(3.2, 150)) < 1e-6


@pytest.mark.parametrize("source", [SeededRandom(7), CryptoRandom()], ids=["seeded", "crypto"])
@pytest.mark.parametrize("sigma", [50, 1 << 20, MAX_SIGMA_STEPS])
def test_discrete_gaussian_mean_and_variance(sigma, source):
    n = 400_000
    samples = discrete_gaussian(sigma, n, source).astype(np.float64)
    # For sigma >= 1 the variance differs from sigma^2 by less than a 1e-8 fraction (Canonne et al.).
    assert abs(samples.mean()) < 5 * sigma / math.sqrt(n)
    assert samples.var() == pytest.approx(sigma**2, rel=5 * math.sqrt(2 / n))


def test_discrete_laplace_matches_its_pmf():
    t = 2
    ks = np.arange(-80, 81)
    weights = np.exp(-np.abs(ks) / t)
    pmf = dict(zip(ks.tolist(), (weights / weights.sum()).tolist(), strict=True))
    samples = discrete_laplace(t, 200_000, SeededRandom(3))
    assert _chi_squared_p(samples, pmf) > 1e-3


@pytest.mark.parametrize(("whole", "num", "den"), [(0, 3, 10), (0, 0, 1), (1, 0, 1), (2, 1, 2)])
def test_bernoulli_exp_has_the_exact_rate(whole, num, den):
    n = 200_000
    p = math.exp(-(whole + num / den))
    draws = bernoulli_exp(np.full(n, whole), np.full(n, num, dtype=np.uint64), den, SeededRandom(11))
    assert abs(draws.mean() - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_uniform_below_is_uniform_and_rejects_the_biased_words():
    samples = uniform_below(7, 140_000, SeededRandom(5))
    assert _chi_squared_p(samples.astype(np.int64), {k: 1 / 7 for k in range(7)}) > 1e-3

    class Scripted:
        """Words below 2^64 mod bound must be redrawn, not reduced (that would bias small values)."""

        def __init__(self) -> None:
            self.calls = [np.array([0, 2**62 + 5], dtype=np.uint64), np.array([2**64 - 1], dtype=np.uint64)]

        def words(self, count):
            return self.calls.pop(0)[:count]

    bound = 3 * 2**62  # 2^64 mod bound = 2^62: the word 0 is rejected and redrawn, 2^62 + 5 is kept
    out = uniform_below(bound, 2, Scripted())
    assert out.tolist() == [(2**64 - 1) % bound, 2**62 + 5]
    with pytest.raises(ConfigError):
        uniform_below(0, 1, SeededRandom(0))


def test_round_to_grid_is_on_the_grid_unbiased_and_monotone():
    grid = 2.0**-10
    x = np.random.default_rng(0).normal(size=100_000)
    r = round_to_grid(x, grid, SeededRandom(1))
    assert np.all(np.abs(r * grid - x) < grid)
    assert abs(np.mean(r * grid - x)) < 5 * grid / math.sqrt(len(x))
    # The coupling the accounting uses: with the same randomness, rounding is monotone and
    # two inputs move apart by less than their distance plus one step.
    y = x + np.random.default_rng(1).uniform(0, 3 * grid, size=x.size)
    ry = round_to_grid(y, grid, SeededRandom(1))
    assert np.all(ry >= r) and np.all(ry - r < (y - x) / grid + 1)
    # exact values stay put
    assert np.array_equal(round_to_grid(np.arange(-5, 6) * grid, grid, SeededRandom(2)), np.arange(-5, 6))


def test_round_to_grid_probability_is_the_fraction():
    # 0.25 steps above a grid point: rounds up a quarter of the time.
    up = round_to_grid(np.full(200_000, 0.25 * 2.0**-4), 2.0**-4, SeededRandom(4)).mean()
    assert abs(up - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 200_000)
    # Below zero too, where 1 + f is not exact in floats: -0.25 steps rounds to -1 a quarter of the time.
    down = round_to_grid(np.full(200_000, -0.25 * 2.0**-4), 2.0**-4, SeededRandom(5)).mean()
    assert abs(down + 0.25) < 5 * math.sqrt(0.25 * 0.75 / 200_000)
    # A value a hair below a grid point rounds to it (almost surely), never a whole step down.
    assert np.all(round_to_grid(np.full(10_000, -1e-300), 1.0, SeededRandom(6)) == 0)
    assert np.all(round_to_grid(np.full(10_000, 3.0 - 2.0**-51), 1.0, SeededRandom(7)) == 3)


def test_round_to_grid_refuses_non_finite_and_out_of_range_values():
    with pytest.raises(ConfigError, match="grid"):
        round_to_grid(np.array([np.inf]), 1.0, SeededRandom(0))
    with pytest.raises(ConfigError, match="grid"):
        round_to_grid(np.array([float(EXACT_STEPS) * 2.0**-20]), 2.0**-20, SeededRandom(0))


def test_grid_plan_folds_the_rounding_into_the_noise():
    std, sensitivity, dim = 1.3, 0.5, 1_000_000
    grid = choose_grid(noise_std=std, sensitivity=sensitivity, dim=dim)
    assert math.frexp(grid)[0] == 0.5  # a power of two
    assert grid * math.sqrt(dim) <= 2.0**-10 * sensitivity < 2 * grid * math.sqrt(dim)
    plan = plan_grid_noise(noise_std=std, sensitivity=sensitivity, dim=dim, grid=grid)
    # zCDP charge of the rounded block, (Delta + gamma sqrt(d))^2 / (2 (s gamma)^2), is at most Delta^2 / (2 std^2)
    assert (sensitivity + grid * math.sqrt(dim)) / (plan.sigma_steps * grid) <= sensitivity / std
    assert 1.0 <= plan.inflation < 1 + 2.0**-10 + grid / std
    # a huge noise coarsens the grid so the sampler's integers fit; still folded in exactly
    big = choose_grid(noise_std=1e5, sensitivity=1.0, dim=10)
    assert big > choose_grid(noise_std=1.0, sensitivity=1.0, dim=10)
    huge = plan_grid_noise(noise_std=1e5, sensitivity=1.0, dim=10, grid=big)
    assert huge.sigma_steps <= MAX_SIGMA_STEPS
    assert (1.0 + big * math.sqrt(10)) / (huge.sigma_steps * big) <= 1.0 / 1e5
    with pytest.raises(ConfigError, match="sampler"):
        choose_grid(noise_std=1e9, sensitivity=1.0, dim=10)
    with pytest.raises(ConfigError, match="power of two"):
        plan_grid_noise(noise_std=1.0, sensitivity=1.0, dim=3, grid=0.3)
    with pytest.raises(ConfigError):
        discrete_gaussian(0, 10, SeededRandom(0))
    with pytest.raises(ConfigError):
        discrete_gaussian(MAX_SIGMA_STEPS + 1, 10, SeededRandom(0))


def test_released_values_are_exact_grid_points():
    std, dim = 0.7, 10_000
    grid = choose_grid(noise_std=std, sensitivity=1.0, dim=dim)
    plan = plan_grid_noise(noise_std=std, sensitivity=1.0, dim=dim, grid=grid)
    x = np.random.default_rng(2).normal(size=dim) * 3
    out = add_grid_noise(x, plan, SeededRandom(9))
    steps = out / grid
    assert np.array_equal(steps, np.round(steps))  # every value a multiple of the grid...
    assert np.all(np.abs(steps) < EXACT_STEPS)  # ...and exactly representable
    assert np.std(out - x) == pytest.approx(plan.sigma_steps * grid, rel=0.05)


def test_low_order_bits_do_not_depend_on_the_input():
    """Mironov's attack reads the input off gaps in the low-order bits; here both neighbours share one support.

    For two neighbouring one-dimensional sums (differing by the sensitivity), every output is a grid
    point and the low 8 bits of the output's grid index are distributed the same way.
    """
    sensitivity, std, n = 1.0, 1.0, 100_000
    grid = choose_grid(noise_std=std, sensitivity=sensitivity, dim=1)
    one = plan_grid_noise(noise_std=std, sensitivity=sensitivity, dim=1, grid=grid)
    # n independent releases of the same one-dimensional mechanism, drawn as one block
    block = GridNoise(grid=grid, sigma_steps=one.sigma_steps, noise_std=std, sensitivity=sensitivity, dim=n)
    residues = []
    for seed, x in enumerate((0.1234567, 0.1234567 + sensitivity)):
        steps = add_grid_noise(np.full(n, x), block, SeededRandom(seed)) / grid
        assert np.array_equal(steps, np.round(steps))  # the same support: the grid
        residues.append(np.mod(steps.astype(np.int64), 256))
    table = np.array([np.bincount(r, minlength=256) for r in residues])
    assert stats.chi2_contingency(table).pvalue > 1e-3


def test_textbook_float_noise_does_leak_in_its_low_bits():
    """The contrast the test above guards against: x + N(0, 1) in floats keeps input-dependent low bits."""
    rng = np.random.default_rng(0)
    a = 0.1 + rng.normal(size=50_000)
    b = 0.1 + 2.0**-40 + rng.normal(size=50_000)
    # On our grid both would be multiples of gamma; in floats they are not, and the residues differ.
    grid = 2.0**-20
    on_grid_a = np.mean(a / grid == np.round(a / grid))
    on_grid_b = np.mean(b / grid == np.round(b / grid))
    assert on_grid_a < 0.01 and on_grid_b < 0.01


def test_random_sources():
    a, b = CryptoRandom(), CryptoRandom()
    wa, wb = a.words(64), b.words(64)
    assert wa.dtype == np.uint64 and not np.array_equal(wa, wb)  # fresh keys, fresh streams
    assert repr(a) == "CryptoRandom()"  # no key material in a repr
    assert isinstance(random_source(None), CryptoRandom)
    assert np.array_equal(random_source(5).words(8), SeededRandom(5).words(8))


def test_the_overflow_path_is_exact(monkeypatch):
    # A discrete Laplace proposal beyond 2^32 steps from sigma (probability ~exp(-64)) goes through
    # Python integers; its acceptance probability is about exp(-2^63), so it must be rejected.
    calls = {"n": 0}
    original = noise_module.discrete_laplace

    def scripted(scale, count, source):
        calls["n"] += 1
        if calls["n"] == 1:
            out = original(scale, count, source)
            out[0] = 1 << 40
            return out
        return original(scale, count, source)

    monkeypatch.setattr(noise_module, "discrete_laplace", scripted)
    samples = discrete_gaussian(4, 1000, SeededRandom(0))
    assert np.max(np.abs(samples)) < 1000 and calls["n"] >= 2


@pytest.mark.parametrize(
    "bad",
    [dict(grid=0.3), dict(sigma_steps=0), dict(sigma_steps=MAX_SIGMA_STEPS + 1), dict(noise_std=math.nan), dict(sensitivity=0.0), dict(dim=0)],
)
def test_grid_noise_validates_its_fields(bad):
    fields = dict(grid=2.0**-8, sigma_steps=100, noise_std=1.0, sensitivity=1.0, dim=3) | bad
    with pytest.raises(ConfigError):
        GridNoise(**fields)
