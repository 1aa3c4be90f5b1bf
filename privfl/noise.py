"""Released DP noise without floating-point leaks: randomized rounding to a grid, then discrete Gaussian noise.

Why: a textbook floating-point Gaussian sample, added to a float, leaves gaps in the low-order bits
of the result that depend on the un-noised value; Mironov (CCS 2012) showed that they can reveal it
exactly. Here every released value is an integer multiple of a grid step gamma (a power of two), the
noise is an integer drawn exactly from the discrete Gaussian N_Z(0, sigma^2) with integer arithmetic
only (Canonne, Kamath, Steinke, NeurIPS 2020, Algorithms 1-3), and the float that leaves is
``gamma * integer``, which is exact. What the output reveals is then exactly what the discrete
mechanism reveals; no bit of it comes from how floats round.

Mechanism on a block of ``dim`` coordinates with L2 sensitivity ``Delta`` (a real number):

* v = x / gamma (exact: gamma is a power of two), r = ceil(v - U) per coordinate with U uniform on
  [0, 1) in steps of 2^-64 (unbiased randomized rounding: E[r] = v up to 2^-64);
* output gamma (r + Y) with Y ~ N_Z(0, s^2) per coordinate, s an integer number of grid steps.

Accounting. Couple the rounding of two neighbouring inputs through the same U: ceil(a) - ceil(b) is
below |a - b| + 1, so the rounded inputs differ by an integer vector of L2 norm at most
Delta / gamma + sqrt(dim) (in grid steps), i.e. Delta + gamma sqrt(dim). Renyi divergence is jointly
quasi-convex (van Erven, Harremoes 2014), so the mechanism is no less private than the worst pair of
rounded inputs, and for integer shifts the discrete Gaussian satisfies the same zCDP bound as the
continuous one: rho = ||shift||^2 / (2 s^2) (Canonne et al. 2020; coordinates add). privfl folds the
rounding into the noise: s = ceil(std (Delta + gamma sqrt(dim)) / (Delta gamma)), so the charged noise
multiplier std / Delta stays exact and the extra noise is a factor 1 + gamma sqrt(dim) / Delta (at most
``tolerance``, 2^-10 by default, unless the grid had to be coarsened; see :func:`choose_grid`).

Randomness: :class:`CryptoRandom` (a ChaCha20 keystream under a fresh 256-bit key from ``os.urandom``)
unless a simulation seed is given, in which case :class:`SeededRandom` (numpy's PCG64) is used, for
reproducible simulations only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from privfl.errors import ConfigError

__all__ = [
    "EXACT_STEPS",
    "MAX_SIGMA_STEPS",
    "CryptoRandom",
    "GridNoise",
    "RandomSource",
    "SeededRandom",
    "add_grid_noise",
    "bernoulli_exp",
    "choose_grid",
    "discrete_gaussian",
    "discrete_laplace",
    "plan_grid_noise",
    "random_source",
    "round_to_grid",
    "uniform_below",
]

_U64 = np.uint64
MAX_SIGMA_STEPS = 1 << 26
"""Largest discrete-Gaussian scale in grid steps: keeps every integer of the sampler below 2^64."""
EXACT_STEPS = 1 << 52
"""Grid values (in steps) beyond this magnitude could not be written as exact float64s."""


class RandomSource(Protocol):
    """A stream of uniform 64-bit words."""

    def words(self, count: int) -> np.ndarray:
        """``count`` independent uniform ``uint64`` words."""
        ...


class CryptoRandom:
    """Cryptographic words: the ChaCha20 keystream under a fresh key from ``os.urandom``.

    A new object draws a new key, so two objects never share a stream; the key never leaves it.
    """

    __slots__ = ("_encryptor",)

    def __init__(self) -> None:
        # The key is used for this one stream only, so a fixed (zero) nonce/counter is safe.
        self._encryptor = Cipher(algorithms.ChaCha20(os.urandom(32), bytes(16)), mode=None).encryptor()

    def __repr__(self) -> str:
        return "CryptoRandom()"

    def words(self, count: int) -> np.ndarray:
        return np.frombuffer(self._encryptor.update(bytes(8 * count)), dtype="<u8").astype(_U64, copy=False)


class SeededRandom:
    """Reproducible words from numpy's PCG64 generator: for simulations and tests only, never a deployment."""

    __slots__ = ("_bits",)

    def __init__(self, seed: int | np.random.SeedSequence) -> None:
        self._bits = np.random.PCG64(seed)

    def words(self, count: int) -> np.ndarray:
        return self._bits.random_raw(count).astype(_U64, copy=False)


def random_source(seed: int | None) -> RandomSource:
    """The noise source: cryptographic when ``seed`` is None, else seeded (simulation only)."""
    return CryptoRandom() if seed is None else SeededRandom(seed)


# -- exact integer samplers (Canonne, Kamath, Steinke 2020) ------------------------------------------------


def uniform_below(bound: int, count: int, source: RandomSource) -> np.ndarray:
    """``count`` exactly uniform integers in [0, bound), as uint64, by rejection (1 <= bound < 2^64).

    A word w is kept when w >= 2^64 mod bound: the kept range is then a whole multiple of ``bound``,
    so w mod bound is exactly uniform (no modulo bias). One scalar bound per call lets numpy divide
    by a constant, several times faster than dividing element by element.
    """
    if not 1 <= bound < 1 << 64:
        raise ConfigError("bound", bound, "must be in [1, 2^64)")
    b = _U64(bound)
    floor_rejects = _U64((1 << 64) % bound)
    out = source.words(count)
    bad = np.flatnonzero(out < floor_rejects)
    if bad.size:
        out = out.copy()  # a keystream view is read-only
    while bad.size:
        # Rejected with probability below bound / 2^64: almost never for the bounds used here.
        fresh = source.words(bad.size)
        out[bad] = fresh
        bad = bad[fresh < floor_rejects]
    return out % b


def _bernoulli_exp_fraction(num: np.ndarray, den: int, source: RandomSource) -> np.ndarray:
    """Bernoulli(exp(-num/den)) per entry, for 0 <= num <= den (CKS Algorithm 1, gamma <= 1).

    Draw A_k ~ Bernoulli(gamma / k) for k = 1, 2, ... until the first A_k = 0; the answer is whether
    that k is odd. Each A_k is "a uniform integer below den * k is below num": integers only. All
    entries still running share the same k, so each pass draws against one scalar bound.
    """
    result = np.zeros(num.shape, dtype=bool)
    active = np.arange(num.size)
    k = 1
    while active.size:
        a = uniform_below(den * k, active.size, source) < num[active]
        stopped = active[~a]
        result[stopped] = k % 2 == 1
        active = active[a]
        k += 1
    return result


def _bernoulli_exp_minus_one(count: int, source: RandomSource) -> np.ndarray:
    """Bernoulli(exp(-1)), ``count`` times."""
    return _bernoulli_exp_fraction(np.ones(count, dtype=_U64), 1, source)


def bernoulli_exp(whole: np.ndarray, num: np.ndarray, den: int, source: RandomSource) -> np.ndarray:
    """Bernoulli(exp(-(whole + num/den))) per entry, exactly, with 0 <= num < den < 2^54.

    exp(-gamma) = exp(-1)^whole * exp(-num/den): ``whole`` Bernoulli(exp(-1)) trials must all succeed,
    then one Bernoulli(exp(-num/den)) (CKS Algorithm 1 for gamma > 1).
    """
    whole = np.asarray(whole, dtype=np.int64).copy()
    num = np.asarray(num, dtype=_U64)
    alive = np.ones(whole.shape, dtype=bool)
    pending = np.flatnonzero(whole > 0)
    while pending.size:
        ok = _bernoulli_exp_minus_one(pending.size, source)
        alive[pending[~ok]] = False
        whole[pending] -= 1
        # Each pass kills about 63% of the remaining trials: the loop ends after O(log n) passes.
        pending = pending[ok & (whole[pending] > 0)]
    rest = np.flatnonzero(alive)
    alive[rest] = _bernoulli_exp_fraction(num[rest], den, source)
    return alive


def discrete_laplace(scale: int, count: int, source: RandomSource) -> np.ndarray:
    """``count`` samples of the discrete Laplace distribution, P(y) proportional to exp(-|y| / scale) (CKS Algorithm 2).

    Args:
        scale: t, a positive integer.
        count: number of samples.
        source: the random words.

    Returns:
        int64 samples.
    """
    t = _U64(scale)
    out = np.empty(count, dtype=np.int64)
    pending = np.arange(count)
    while pending.size:
        n = pending.size
        u = uniform_below(scale, n, source)
        keep = _bernoulli_exp_fraction(u, scale, source)
        idx, u = pending[keep], u[keep]
        # V ~ Geometric(1 - exp(-1)): count successes of Bernoulli(exp(-1)) until the first failure.
        v = np.zeros(idx.size, dtype=_U64)
        going = np.arange(idx.size)
        while going.size:
            more = _bernoulli_exp_minus_one(going.size, source)
            going = going[more]
            v[going] += _U64(1)
        x = u + t * v
        negative = (source.words(idx.size) & _U64(1)) == 1
        # Rejecting "-0" gives zero the same weight as every other point.
        valid = ~(negative & (x == 0))
        signed = x.astype(np.int64)
        signed[negative] *= -1
        out[idx[valid]] = signed[valid]
        done = np.zeros(n, dtype=bool)
        done[np.flatnonzero(keep)[valid]] = True
        pending = pending[~done]
    return out


def discrete_gaussian(sigma: int, count: int, source: RandomSource) -> np.ndarray:
    """``count`` exact samples of N_Z(0, sigma^2): P(y) proportional to exp(-y^2 / (2 sigma^2)) on the integers.

    CKS Algorithm 3 with proposal scale t = sigma: a discrete Laplace sample Y is accepted with
    probability exp(-(|Y| - sigma)^2 / (2 sigma^2)). Any t > 0 is correct; t = sigma accepts about
    76% of proposals for large sigma. With an integer sigma every quantity is an integer.

    Args:
        sigma: the scale in grid steps, an integer in [1, MAX_SIGMA_STEPS].
        count: number of samples.
        source: the random words.

    Returns:
        int64 samples (variance slightly below sigma^2).

    Raises:
        ConfigError: ``sigma`` outside [1, MAX_SIGMA_STEPS].
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (int, np.integer)) or not 1 <= sigma <= MAX_SIGMA_STEPS:
        raise ConfigError("sigma", sigma, f"must be an integer number of grid steps in [1, {MAX_SIGMA_STEPS}]")
    sigma = int(sigma)
    den = 2 * sigma * sigma
    out = np.empty(count, dtype=np.int64)
    pending = np.arange(count)
    while pending.size:
        y = discrete_laplace(sigma, pending.size, source)
        d = np.abs(np.abs(y) - sigma).astype(_U64)
        safe = d < _U64(1 << 32)
        whole = np.zeros(y.size, dtype=np.int64)
        num = np.zeros(y.size, dtype=_U64)
        sq = d[safe] * d[safe]
        whole[safe] = (sq // _U64(den)).astype(np.int64)
        num[safe] = sq % _U64(den)
        for i in np.flatnonzero(~safe):
            # Beyond 2^32 the square overflows uint64 (probability about exp(-64) per sample): exact
            # Python integers; ``whole`` is capped where the chance of passing is below exp(-2^62) anyway.
            q, r = divmod(int(d[i]) ** 2, den)
            whole[i], num[i] = min(q, 1 << 62), r
        accept = bernoulli_exp(whole, num, den, source)
        out[pending[accept]] = y[accept]
        pending = pending[~accept]
    return out


# -- the grid ----------------------------------------------------------------------------------------------


def _float_to_u64(values: np.ndarray) -> np.ndarray:
    """Exact conversion of integer-valued floats in [0, 2^64) to uint64 (float -> uint64 is only portable below 2^63)."""
    out = np.empty(values.shape, dtype=_U64)
    big = values >= 2.0**63
    out[~big] = values[~big].astype(_U64)
    out[big] = (values[big] - 2.0**63).astype(_U64) + _U64(1 << 63)
    return out


def round_to_grid(values: np.ndarray, grid: float, source: RandomSource) -> np.ndarray:
    """Unbiased randomized rounding to multiples of ``grid``, in grid steps: r = ceil(x / grid - U).

    U = w / 2^64 for a uniform 64-bit word w. With v = n + f, n = trunc(v) and f the exact fractional
    part (``modf``), ceil(v - U) is n + [w < f 2^64] for f >= 0 and n - [w >= 2^64 - |f| 2^64] for
    f < 0: both comparisons are made exactly on integers (f 2^64 is an exact float). Given U the
    rounding is monotone with |r(a) - r(b)| < |a - b| + 1, the bound the accounting uses, and
    E[r] = v up to 2^-64.

    Args:
        values: finite floats.
        grid: a power of two.
        source: the random words.

    Returns:
        int64 grid steps r with r * grid within one step of each value.

    Raises:
        ConfigError: a value is not finite or too large for the grid (|x| / grid >= 2^52).
    """
    scaled = np.asarray(values, dtype=np.float64) / grid  # exact: grid is a power of two
    if scaled.size and not (np.all(np.isfinite(scaled)) and np.max(np.abs(scaled)) < EXACT_STEPS):
        raise ConfigError("noise grid", grid, f"a value is not finite or is {EXACT_STEPS} grid steps or more")
    frac, whole = np.modf(scaled)  # both exact
    steps = whole.astype(np.int64)
    words = source.words(scaled.size).reshape(scaled.shape)
    positive = frac > 0
    # f > 0: up when w < f 2^64, i.e. w < ceil(f 2^64) (< 2^64 - 2^11, so it fits).
    steps[positive] += words[positive] < _float_to_u64(np.ceil(np.ldexp(frac[positive], 64)))
    negative = frac < 0
    # f < 0: down (to n - 1) unless w < 2^64 - |f| 2^64, i.e. unless w < 2^64 - floor(|f| 2^64).
    low_part = _float_to_u64(np.floor(np.ldexp(-frac[negative], 64)))
    with np.errstate(over="ignore"):
        limit = _U64(0) - low_part  # 2^64 - floor(|f| 2^64) in wrapping arithmetic; 0 stands for 2^64
    keep = (low_part == 0) | (words[negative] < limit)
    steps[negative] -= ~keep
    return steps


def choose_grid(*, noise_std: float, sensitivity: float, dim: int, tolerance: float = 2.0**-10) -> float:
    """The grid step gamma: the largest power of two with gamma sqrt(dim) <= tolerance * sensitivity.

    Coarsened, if needed, so that noise_std / gamma stays within MAX_SIGMA_STEPS (then the rounding
    costs more than ``tolerance`` in noise, still folded in exactly by :func:`plan_grid_noise`).

    Raises:
        ConfigError: a non-positive or non-finite argument, or noise_std sqrt(dim) / sensitivity above
            MAX_SIGMA_STEPS / 2 (no grid then fits the sampler).
    """
    for name, value in (("noise_std", noise_std), ("sensitivity", sensitivity), ("tolerance", tolerance)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(name, value, "must be a finite number > 0")
    if dim < 1:
        raise ConfigError("dim", dim, "must be >= 1")
    # Rounding adds std sqrt(dim) / sensitivity steps whatever the grid: that part alone must fit.
    if noise_std * math.sqrt(dim) / sensitivity > MAX_SIGMA_STEPS / 2:
        raise ConfigError(
            "noise_std", noise_std, f"noise multiplier x sqrt({dim}) exceeds the exact sampler's range ({MAX_SIGMA_STEPS // 2} steps)"
        )
    exponent = math.floor(math.log2(tolerance * sensitivity / math.sqrt(dim)))
    # The noise grows by the rounding's share (below); the sampler's limit applies to the grown noise.
    while noise_std * (1 + math.ldexp(math.sqrt(dim), exponent) / sensitivity) / math.ldexp(1.0, exponent) > MAX_SIGMA_STEPS - 1:
        exponent += 1
    return math.ldexp(1.0, exponent)


@dataclass(frozen=True, kw_only=True, slots=True)
class GridNoise:
    """Discrete Gaussian noise for one block of coordinates, calibrated on a grid.

    Attributes:
        grid: gamma, a power of two; every released value is a multiple of it.
        sigma_steps: s, the discrete Gaussian's scale in grid steps.
        noise_std: the standard deviation the accountant assumed (std = z * sensitivity).
        sensitivity: the block's L2 sensitivity before rounding.
        dim: number of coordinates in the block.
    """

    grid: float
    sigma_steps: int
    noise_std: float
    sensitivity: float
    dim: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.grid) and self.grid > 0 and math.frexp(self.grid)[0] == 0.5):
            raise ConfigError("grid", self.grid, "must be a power of two")
        if isinstance(self.sigma_steps, bool) or not isinstance(self.sigma_steps, int) or not 1 <= self.sigma_steps <= MAX_SIGMA_STEPS:
            raise ConfigError("sigma_steps", self.sigma_steps, f"must be an int in [1, {MAX_SIGMA_STEPS}]")
        for name in ("noise_std", "sensitivity"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(name, value, "must be a finite number > 0")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ConfigError("dim", self.dim, "must be an int >= 1")

    @property
    def inflation(self) -> float:
        """s gamma / noise_std: how much more noise than the continuous mechanism (>= 1)."""
        return self.sigma_steps * self.grid / self.noise_std


def plan_grid_noise(*, noise_std: float, sensitivity: float, dim: int, grid: float) -> GridNoise:
    """Folds the rounding into the noise: s = ceil(std (Delta + gamma sqrt(dim)) / (Delta gamma)).

    Then ||shift|| / s <= (Delta + gamma sqrt(dim)) / (gamma s) <= Delta / std: the zCDP charge of the
    block is at most the continuous Gaussian's Delta^2 / (2 std^2).

    Raises:
        ConfigError: bad arguments, or a scale beyond MAX_SIGMA_STEPS (choose a coarser grid).
    """
    for name, value in (("noise_std", noise_std), ("sensitivity", sensitivity), ("grid", grid)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(name, value, "must be a finite number > 0")
    if math.frexp(grid)[0] != 0.5:
        raise ConfigError("grid", grid, "must be a power of two")
    if dim < 1:
        raise ConfigError("dim", dim, "must be >= 1")
    steps = math.ceil(noise_std * (sensitivity + grid * math.sqrt(dim)) / (sensitivity * grid))
    if steps > MAX_SIGMA_STEPS:
        raise ConfigError("grid", grid, f"too fine for noise {noise_std:.3g}: {steps} > {MAX_SIGMA_STEPS} steps")
    return GridNoise(grid=grid, sigma_steps=max(1, steps), noise_std=noise_std, sensitivity=sensitivity, dim=dim)


def add_grid_noise(values: np.ndarray, noise: GridNoise, source: RandomSource) -> np.ndarray:
    """Rounds ``values`` to the grid and adds discrete Gaussian noise: the released, exactly representable floats.

    Raises:
        ConfigError: a value too large for the grid, or a shape that does not match the plan.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (noise.dim,):
        raise ConfigError("values", values.shape, f"expected {noise.dim} coordinates")
    steps = round_to_grid(values, noise.grid, source) + discrete_gaussian(noise.sigma_steps, noise.dim, source)
    if steps.size and np.max(np.abs(steps)) >= EXACT_STEPS:
        raise ConfigError("noise grid", noise.grid, f"a noised value is {EXACT_STEPS} grid steps or more")
    return steps.astype(np.float64) * noise.grid  # exact: |steps| < 2^52 and grid is a power of two
