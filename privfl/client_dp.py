"""Client-level differential privacy: DP-FedAvg (McMahan et al. 2018) with adaptive clipping (Andrew et al. 2021).

Sample-level DP-SGD protects each record inside a site. Client-level DP protects a whole site's
participation: the released average changes little whether or not a site took part at all.

Mechanism, per round:

* each sampled client clips its update to L2 norm S (the clip norm): delta_k * min(1, S / ||delta_k||),
  and, for adaptive clipping, reports the centred bit b_k - 1/2 with b_k = [||delta_k|| <= S]
  (centring makes one client's influence on the bit sum 1/2, which the split below relies on);
* Gaussian noise N(0, (z_delta S)^2 I) is added to the sum of clipped updates, and N(0, sigma_b^2) to
  the sum of centred bits; the unclipped fraction is (noisy sum) / (q K) + 1/2;
* the average uses a fixed denominator (the expected number of sampled clients, q K), so one client's
  presence moves the numerator by at most S and nothing else depends on who took part.

With adaptive clipping the clip norm follows the geometric update S <- S exp(-eta (b_bar - gamma)),
driving the fraction of unclipped updates to the target quantile gamma. Releasing both sums is
one Gaussian mechanism with effective noise multiplier z, where z^-2 = z_delta^-2 + (2 sigma_b)^-2
(Andrew et al. 2021, Theorem 1), so the accountant is charged one Poisson-subsampled Gaussian
step per round at noise multiplier z and client sampling rate q.

Fixed-size client sampling (exactly m of K): adding a client can displace another from the sample,
so one client moves the sum by up to 2S (and the centred bit sum by up to 1). privfl accounts it as a
Gaussian mechanism with noise multiplier z / 2 and no amplification (q = 1), and calibrates z
accordingly; valid, and loose.

Every noise here is a discrete Gaussian on a power-of-two grid, added to a value rounded to that grid
(:mod:`privfl.noise`): a textbook float Gaussian would leave low-order bits that depend on the
un-noised sum (Mironov 2012). The rounding is folded into the noise scale, so the charge above holds.

Where the noise is added depends on the protection:

* ``plaintext`` and ``ckks``: centrally, once, on the aggregate (for CKKS by the key holder, after
  decryption and before the average is released);
* ``secagg``: distributed. Each of the round's c clients adds N(0, rho (z_delta S)^2 / c) to its own
  clipped update before masking, so the server never sees an un-noised sum; rho = max over round
  sizes c' of c' / t(c') >= 1 (t the protocol's threshold) is public and fixed for the run. With
  everyone surviving, the sum carries rho (z_delta S)^2 whatever c is: the released noise does not
  reveal how many sites took part (with shares of (z_delta S)^2 / t(c) it would, c / t(c) varying
  with c, and an observer of a high-dimensional release estimates the variance: issue 13). Any
  s >= t(c) survivors still leave at least (z_delta S)^2, so the server never sees less than the
  charged noise; but then the variance would reveal s / c, so a round with a dropout is not
  released (fail closed, ``SecAggConfig.fail_on_dropout``).

Adjacency (``ClientDPConfig.adjacency``): zero-out with the K sites public by default: neighbouring
federations differ in one site's contribution, present or replaced by none. The released noise is
then the same for both, and the release is exactly the Poisson-subsampled Gaussian that is charged
(the grid's ceil leaves the total variance equal across c to a relative 2 / s_share, s_share the
share's scale in steps, thousands or more: the Renyi divergence it opens is below d (2 / s_share)^2 / 4
for d coordinates; below any reported digit). Against the server, which samples and sees who takes
part, no participation guarantee holds: it gets the un-amplified epsilon (the audit says so).

Secure aggregation clips every coordinate to its ``clip_range`` c: a clipped noise share is no longer
the accounted noise (bounded support: epsilon is infinite under add/remove). :func:`secagg_range`
therefore derives c and the quantizer step from the noise, S and the client count, every round (S
moves under adaptive clipping), so that the probability that any coordinate of any client clips in
a round is at most p = delta 2^-10 / (T (1 + e^32)); the discrete Gaussian is s^2-sub-Gaussian
(Canonne, Kamath, Steinke 2020), so P(|Y| > k s) <= 2 exp(-k^2 / 2) per coordinate and a union bound
over n (d + 1) coordinates gives k = sqrt(2 ln(2 n (d + 1) / p)). A round where a coordinate would
clip anyway is aborted before anything is masked (fail closed, ``SecAggConfig.fail_on_clip``): the
release is the accounted mechanism except on an event of probability at most T p over the run, so
a recorded (epsilon, delta) holds as (epsilon, delta + (1 + e^epsilon) T p) <= (epsilon, delta (1 + 2^-10))
for any epsilon <= 32 (the tail delta, :attr:`SecAggRange.tail_delta`).
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from privfl.config import ClientDPConfig, ClientSampling
from privfl.errors import ConfigError
from privfl.noise import GridNoise, RandomSource, add_grid_noise, choose_grid, plan_grid_noise

__all__ = [
    "CLIP_TAIL_FRACTION",
    "MAX_DEPLOYED_SECAGG_SITES",
    "RELEASE_STREAM",
    "TAIL_EPSILON_CEILING",
    "ClientDPPlan",
    "ClientLevelRun",
    "ReleaseNoise",
    "SecAggRange",
    "central_noise",
    "clip_update",
    "clip_with_bit",
    "count_free_shares",
    "delta_noise_multiplier",
    "deployed_secagg_noise_ratio",
    "distributed_noise",
    "next_clip_norm",
    "plan_client_dp",
    "release_noise",
    "secagg_mask_context",
    "secagg_noise_ratio",
    "secagg_range",
    "split_release",
]

CLIP_TAIL_FRACTION = 2.0**-10
"""Share of the client-level delta spent, over the whole run, on the chance that secure aggregation clips noise."""
TAIL_EPSILON_CEILING = 32.0
"""The tail delta is bounded for every recorded epsilon up to this (its e^epsilon factor is planned for it)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientDPPlan:
    """The client-level mechanism resolved for a federation.

    Attributes:
        noise_multiplier: z: the update-sum noise is z_delta S with z_delta from z (below).
        accounted_noise_multiplier: what the accountant is charged per round (z for Poisson
            sampling; z / 2 for fixed-size sampling, whose sensitivity is 2S).
        delta_noise_multiplier: z_delta, the noise on the update sum (z without adaptive clipping).
        bit_noise_std: sigma_b, the noise on the bit sum (0 without adaptive clipping).
        sample_rate: q used by the accountant (1.0 for fixed-size sampling).
        expected_clients: the fixed denominator q K (or m for fixed-size sampling).
    """

    noise_multiplier: float
    accounted_noise_multiplier: float
    delta_noise_multiplier: float
    bit_noise_std: float
    sample_rate: float
    expected_clients: float


def delta_noise_multiplier(noise_multiplier: float, bit_noise_std: float) -> float:
    """z_delta from z^-2 = z_delta^-2 + (2 sigma_b)^-2.

    Raises:
        ConfigError: the bit noise is too small to leave any budget for the update (2 sigma_b <= z).
    """
    if 2 * bit_noise_std <= noise_multiplier:
        raise ConfigError(
            "client_dp.bit_noise_std",
            bit_noise_std,
            f"must exceed noise_multiplier / 2 = {noise_multiplier / 2:.3g} (Andrew et al. 2021)",
        )
    return (noise_multiplier**-2 - (2 * bit_noise_std) ** -2) ** -0.5


def plan_client_dp(config: ClientDPConfig, *, num_clients: int, client_fraction: float, rounds: int) -> ClientDPPlan:
    """Resolves the noise multipliers and accounting rate for ``num_clients`` clients over ``rounds`` rounds."""
    from privfl.accounting import noise_multiplier as calibrate

    if config.sampling is ClientSampling.POISSON:
        q, sensitivity_factor = client_fraction, 1.0
        expected = client_fraction * num_clients
    else:
        q, sensitivity_factor = 1.0, 2.0
        expected = float(max(1, round(client_fraction * num_clients)))
    if config.noise_multiplier is not None:
        z = config.noise_multiplier
    else:
        assert config.target_epsilon is not None  # ClientDPConfig sets exactly one of noise_multiplier and target_epsilon
        accounted = calibrate(
            target_epsilon=config.target_epsilon, sample_rate=q, steps=rounds, delta=config.delta, accountant=config.accountant
        )
        z = accounted * sensitivity_factor
    if config.adaptive:
        bit_std = config.bit_noise_std if config.bit_noise_std is not None else max(expected / 20.0, 0.51 * z + 1e-9)
        z_delta = delta_noise_multiplier(z, bit_std)
    else:
        bit_std, z_delta = 0.0, z
    return ClientDPPlan(
        noise_multiplier=z,
        accounted_noise_multiplier=z / sensitivity_factor,
        delta_noise_multiplier=z_delta,
        bit_noise_std=bit_std,
        sample_rate=q,
        expected_clients=expected,
    )


def clip_update(delta: np.ndarray, clip_norm: float) -> tuple[np.ndarray, bool]:
    """Clips to L2 norm ``clip_norm``; returns the clipped update and whether it was within the norm."""
    norm = float(np.linalg.norm(delta.astype(np.float64)))
    if norm <= clip_norm:
        return delta.astype(np.float64), True
    return delta.astype(np.float64) * (clip_norm / norm), False


@dataclass(frozen=True, kw_only=True, slots=True)
class ReleaseNoise:
    """The discrete Gaussian noise of one release (or one client's share of it), per block.

    Attributes:
        update: the noise on the clipped-update block (sensitivity S, std z_delta S / sqrt(shares)).
        bit: the noise on the centred-bit coordinate (sensitivity 1/2, std sigma_b / sqrt(shares)),
            or None without adaptive clipping.
    """

    update: GridNoise
    bit: GridNoise | None

    def apply(self, vector: np.ndarray, source: RandomSource) -> np.ndarray:
        """Returns ``vector`` rounded to each block's grid and noised (a new float64 array).

        Raises:
            ConfigError: the vector's length does not match the plan, or a value is too large for the grid.
        """
        expected = self.update.dim + (1 if self.bit is not None else 0)
        if vector.shape != (expected,):
            raise ConfigError("vector", vector.shape, f"expected {expected} coordinates")
        out = np.empty(expected)
        out[: self.update.dim] = add_grid_noise(vector[: self.update.dim], self.update, source)
        if self.bit is not None:
            out[self.update.dim :] = add_grid_noise(vector[self.update.dim :], self.bit, source)
        return out


def release_noise(
    plan: ClientDPPlan, *, clip_norm: float, dim: int, adaptive: bool, shares: float = 1, min_grid: float | None = None
) -> ReleaseNoise:
    """Plans the grid noise of a DP-FedAvg release: central (``shares=1``) or one client's share of it.

    Each block gets its own power-of-two grid (from :func:`privfl.noise.choose_grid`, at least
    ``min_grid``, e.g. the secure-aggregation quantizer's step) and a discrete Gaussian scale that folds
    the rounding in: the block's zCDP charge stays at most the continuous Gaussian's, so the joint
    charge is 1 / (2 z^2) as the accountant assumes (Andrew et al. split, unchanged).

    With ``shares = t``, each share has 1/t of the variance; any s >= t shares sum to at least the
    accounted variance (a sum of discrete Gaussians, close to one: Kairouz, Liu, Steinke 2021).

    Args:
        plan: the client-level plan (z_delta, sigma_b).
        clip_norm: S this round.
        dim: number of update coordinates (the bit, if any, comes after them).
        adaptive: whether the vector carries the centred bit.
        shares: how many shares together make the accounted noise: t, or c / rho under secure
            aggregation (:func:`count_free_shares`); a real number >= 1.
        min_grid: a power of two the grid steps must be multiples of (None: no constraint).

    Raises:
        ConfigError: ``shares`` < 1, or a grid that cannot hold the noise.
    """
    if isinstance(shares, bool) or not isinstance(shares, (int, float)) or not (math.isfinite(shares) and shares >= 1):
        raise ConfigError("threshold", shares, "shares must be a number >= 1")
    if min_grid is not None and not (math.isfinite(min_grid) and min_grid > 0 and math.frexp(min_grid)[0] == 0.5):
        raise ConfigError("min_grid", min_grid, "must be None or a power of two")
    blocks = [(plan.delta_noise_multiplier * clip_norm, clip_norm, dim)]
    if adaptive:
        # One client moves the centred bit sum by at most 1/2.
        blocks.append((plan.bit_noise_std, 0.5, 1))
    planned = []
    for total_std, sensitivity, size in blocks:
        std = total_std / math.sqrt(shares)
        step = choose_grid(noise_std=total_std, sensitivity=sensitivity, dim=size)
        if min_grid is not None:
            # Both are powers of two: the larger is a multiple of the smaller.
            step = max(step, min_grid)
        # The rounding's worst case (one step per coordinate) is charged against the whole noise; a
        # share carries 1/sqrt(t) of it, so the share's scale is the whole scale over sqrt(t).
        whole = plan_grid_noise(noise_std=total_std, sensitivity=sensitivity, dim=size, grid=step)
        share_steps = max(1, math.ceil(whole.sigma_steps / math.sqrt(shares)))
        planned.append(GridNoise(grid=step, sigma_steps=share_steps, noise_std=std, sensitivity=sensitivity, dim=size))
    return ReleaseNoise(update=planned[0], bit=planned[1] if adaptive else None)


def distributed_noise(
    vector: np.ndarray,
    *,
    plan: ClientDPPlan,
    clip_norm: float,
    adaptive: bool,
    threshold: float,
    source: RandomSource,
    min_grid: float | None = None,
) -> np.ndarray:
    """One client's contribution under secure aggregation: its clipped vector on the grid plus its noise share.

    The share is N_Z(0, s^2 / t) steps per coordinate with t = ``threshold`` (see :func:`release_noise`;
    the federation passes c / rho, :func:`count_free_shares`); any t shares sum to at least the
    accounted noise.

    Raises:
        ConfigError: ``threshold`` < 1 or a value too large for the grid.
    """
    dim = vector.shape[0] - (1 if adaptive else 0)
    noise = release_noise(plan, clip_norm=clip_norm, dim=dim, adaptive=adaptive, shares=threshold, min_grid=min_grid)
    return noise.apply(np.asarray(vector, dtype=np.float64), source)


def next_clip_norm(clip_norm: float, unclipped_fraction: float, *, target_quantile: float, learning_rate: float) -> float:
    """Geometric update S exp(-eta (b_bar - gamma)) (Andrew et al. 2021), with the noised fraction b_bar
    clamped to [0, 1] first (post-processing of the release): a fraction is in [0, 1], and a sum that
    decoded to garbage (a corrupted or inconsistent round) must not move S by orders of magnitude."""
    fraction = min(max(float(unclipped_fraction), 0.0), 1.0) if math.isfinite(unclipped_fraction) else target_quantile
    return clip_norm * math.exp(-learning_rate * (fraction - target_quantile))


@dataclass(frozen=True, kw_only=True, slots=True)
class SecAggRange:
    """Secure-aggregation encoding derived from the client-level noise, so that clipping almost never cuts it.

    Attributes:
        clip_range: c, a multiple of the step: no coordinate of a noised share exceeds it except with
            probability at most ``clip_probability`` per round.
        fraction_bits: f, the quantizer step is 2^-f; every noise grid is a multiple of it, so the
            quantizer maps each share to its integer exactly.
        bits_needed: the modulus bits a sum of ``max_clients`` encodings needs (<= the configured bits).
        noise: the shares' grid noise on that step (what :func:`distributed_noise` adds).
        tail_sigmas: k, the margin in share standard deviations.
        clip_probability: p, the bound on P(any coordinate of any client clips) in one round.
        tail_delta: what clipping can add to the client-level delta over the planned rounds,
            (1 + e^32) T p = delta 2^-10, for any recorded epsilon <= 32.
    """

    clip_range: float
    fraction_bits: int
    bits_needed: int
    noise: ReleaseNoise
    tail_sigmas: float
    clip_probability: float
    tail_delta: float


def secagg_range(
    plan: ClientDPPlan,
    *,
    clip_norm: float,
    dim: int,
    adaptive: bool,
    shares: float,
    max_clients: int,
    rounds: int,
    delta: float,
    bits: int = 32,
) -> SecAggRange:
    """Derives secure aggregation's clip range and step from the noise shares (module docstring: the tail bound).

    A coordinate of a client's vector is x + rounding + share, with |x| <= S (|x| <= 1/2 for the
    centred bit), rounding below one grid step and the share Y ~ N_Z(0, s^2) steps. With
    c >= bound + grid (1 + k s) it clips only when |Y| > k s. The step starts at the finest noise grid
    and is doubled until ``max_clients`` encodings fit ``bits`` (a coarser grid adds a little noise,
    folded into the shares' scale exactly as in :func:`release_noise`).

    Args:
        plan: the client-level plan.
        clip_norm: S this round.
        dim: update coordinates (the bit, if any, comes after them).
        adaptive: whether the vector carries the centred bit.
        shares: how many shares together make the accounted noise (c / rho, :func:`count_free_shares`).
        max_clients: n, the most clients a round can have (the union bound and the modulus use it).
        rounds: T, the planned rounds (the tail is spread over them).
        delta: the client-level delta.
        bits: the modulus bits available (``SecAggConfig.bits``).

    Raises:
        ConfigError: no step lets ``max_clients`` noised encodings fit ``bits``.
    """
    if not (isinstance(max_clients, int) and max_clients >= 1):
        raise ConfigError("max_clients", max_clients, "must be an int >= 1")
    if not (isinstance(rounds, int) and rounds >= 1):
        raise ConfigError("rounds", rounds, "must be an int >= 1")
    coordinates = max_clients * (dim + (1 if adaptive else 0))
    # log of p = delta 2^-10 / (T (1 + e^32)), kept in logs (p underflows nothing, but stays exact).
    log_p = math.log(delta * CLIP_TAIL_FRACTION / rounds) - (TAIL_EPSILON_CEILING + math.log1p(math.exp(-TAIL_EPSILON_CEILING)))
    k = math.sqrt(2 * (math.log(2 * coordinates) - log_p))
    natural = release_noise(plan, clip_norm=clip_norm, dim=dim, adaptive=adaptive, shares=shares)
    step = min(natural.update.grid, natural.bit.grid if natural.bit is not None else math.inf)
    while True:
        noise = release_noise(plan, clip_norm=clip_norm, dim=dim, adaptive=adaptive, shares=shares, min_grid=step)
        reach = clip_norm + noise.update.grid * (1 + k * noise.update.sigma_steps)
        if noise.bit is not None:
            reach = max(reach, 0.5 + noise.bit.grid * (1 + k * noise.bit.sigma_steps))
        levels = math.ceil(reach / step)
        needed = (2 * max_clients * levels).bit_length()  # 2 n L + 1 <= 2^bits: the sum never wraps
        if needed <= bits:
            break
        if step > clip_norm * 2.0**20 or math.frexp(step)[1] - 1 >= 64:
            raise ConfigError(
                "secagg.bits", bits, f"{max_clients} clients' noised updates need more bits at any step (need {needed})"
            )
        step *= 2
    fraction_bits = 1 - math.frexp(step)[1]
    if not -64 <= fraction_bits <= 64:
        raise ConfigError("secagg.fraction_bits", fraction_bits, "the derived step is outside 2^-64 .. 2^64")
    return SecAggRange(
        clip_range=levels * step,
        fraction_bits=fraction_bits,
        bits_needed=needed,
        noise=noise,
        tail_sigmas=k,
        clip_probability=math.exp(log_p),
        tail_delta=delta * CLIP_TAIL_FRACTION,
    )


def secagg_noise_ratio(threshold_of: Callable[[int], int], max_clients: int) -> float:
    """rho = max over round sizes c in [2, ``max_clients``] of c / t(c): fixed for the run, public.

    Rounds whose size the protocol cannot run (``threshold_of`` raises ConfigError) are skipped: they abort.

    Raises:
        ConfigError: no round size from 2 to ``max_clients`` can run.
    """
    ratios = []
    for count in range(2, max(2, max_clients) + 1):
        try:
            ratios.append(count / threshold_of(count))
        except ConfigError:
            continue
    if not ratios:
        raise ConfigError("secagg.threshold", max_clients, "no round size can run secure aggregation")
    return max(1.0, max(ratios))


MAX_DEPLOYED_SECAGG_SITES = 10_000
"""The most sites a deployed secure-aggregation run with client-level DP serves: rho takes O(n^2)
work to derive (every round size's threshold), which a site must not be made to spend on a
server's say-so (about 1 s at 1,000 sites, 11 s at 3,000 here; cached per run)."""


@functools.lru_cache(maxsize=32)
def deployed_secagg_noise_ratio(secagg: Any, num_sites: int) -> float:
    """:func:`secagg_noise_ratio` for a deployment's ``SecAggConfig`` and site count, computed once per pair.

    Raises:
        ConfigError: more than :data:`MAX_DEPLOYED_SECAGG_SITES` sites, or no round size can run.
    """
    if not (isinstance(num_sites, int) and 2 <= num_sites <= MAX_DEPLOYED_SECAGG_SITES):
        raise ConfigError("num_sites", num_sites, f"deployed secure aggregation with client-level DP serves 2 to {MAX_DEPLOYED_SECAGG_SITES:,} sites")
    return secagg_noise_ratio(secagg.resolve_threshold, num_sites)


def count_free_shares(participants: int, noise_ratio: float) -> float:
    """c / rho: each of the round's c shares then carries rho (z_delta S)^2 / c, and their sum rho (z_delta S)^2 for every c.

    Any s >= t(c) >= c / rho of them still sum to at least the accounted (z_delta S)^2.

    Raises:
        ConfigError: fewer than two participants, or rho < 1.
    """
    if not (isinstance(participants, int) and participants >= 2):
        raise ConfigError("participants", participants, "secure aggregation needs at least 2")
    if not (math.isfinite(noise_ratio) and noise_ratio >= 1):
        raise ConfigError("noise_ratio", noise_ratio, "must be >= 1")
    # c / rho <= t(c) <= c, and >= 1 since rho <= c for c >= 2 (t >= 1)
    return max(1.0, participants / noise_ratio)


RELEASE_STREAM = 2**20
"""The site index of the central release noise's stream (:func:`privfl.plan.derive_seed`, purpose 2):
the plaintext server and the CKKS key holder draw from it, in one process or in a deployment alike."""


def clip_with_bit(delta: np.ndarray, clip_norm: float, *, adaptive: bool) -> tuple[np.ndarray, bool]:
    """A site's DP-FedAvg vector: its update clipped to ``clip_norm``, then (adaptive clipping) the
    centred bit ``[||delta|| <= S] - 1/2``; also whether the update was within the norm.

    The bit is centred so that one client moves the bit sum by 1/2, the sensitivity the noise split
    of Andrew et al. assumes.
    """
    clipped, within = clip_update(delta, clip_norm)
    vector = np.concatenate([clipped, [float(within) - 0.5]]) if adaptive else clipped
    return vector, within


def central_noise(
    plan: ClientDPPlan, *, clip_norm: float, dim: int, adaptive: bool, noise_seed: int | None, round_index: int
) -> Callable[[np.ndarray], np.ndarray]:
    """``f(sum) -> noised sum``: the noise the plaintext server or the CKKS key holder adds once to a round's sum.

    Released values lie on a power-of-two grid with exact discrete Gaussian noise drawn from a
    ChaCha20 keystream (:mod:`privfl.noise`), seeded from ``noise_seed`` in simulations and from the
    OS otherwise: the low-order float bits carry nothing (Mironov 2012).
    """
    from privfl.noise import random_source
    from privfl.plan import derive_seed

    noise = release_noise(plan, clip_norm=clip_norm, dim=dim, adaptive=adaptive)
    source = random_source(derive_seed(noise_seed, round_index, RELEASE_STREAM, 2))

    def add_noise(total: np.ndarray) -> np.ndarray:
        return noise.apply(np.asarray(total, dtype=np.float64), source)

    return add_noise


def split_release(total: np.ndarray, *, dim: int, plan: ClientDPPlan, adaptive: bool) -> tuple[np.ndarray, float | None]:
    """The DP-FedAvg average of a released (noised) sum over the fixed denominator, and the noised
    unclipped fraction (None without adaptive clipping)."""
    fraction = float(total[dim]) / plan.expected_clients + 0.5 if adaptive else None
    return total[:dim] / plan.expected_clients, fraction


class ClientLevelRun:
    """A run's client-level bookkeeping: one charged release per round, and the clip norm S.

    The in-process federation and the deployed Aggregator keep one each; the CKKS key holder of a
    deployment tracks S the same way from the sums it releases.

    Args:
        config: the client-level DP settings.
        plan: the resolved mechanism (:func:`plan_client_dp`).
    """

    def __init__(self, config: ClientDPConfig, plan: ClientDPPlan) -> None:
        from privfl.accounting import DPEvent

        self.config = config
        self.plan = plan
        self.clip_norm = float(config.clip_norm)
        self.events: list[DPEvent] = []

    def resume(self, levels: list[dict | None]) -> None:
        """Replays the ``client_level`` records of the rounds already run (each was one charged release).

        Raises:
            ConfigError: a round of the run being resumed had no client-level DP.
        """
        from privfl.accounting import DPEvent

        for index, level in enumerate(levels):
            if not level:
                raise ConfigError("client_dp", "set", f"round {index} of the run being resumed had no client-level DP")
            self.events.append(DPEvent(noise_multiplier=level["accounted_noise_multiplier"], sample_rate=level["sample_rate"], steps=1))
        if levels and levels[-1]:
            self.clip_norm = float(levels[-1].get("next_clip_norm", levels[-1]["clip_norm"]))

    @property
    def epsilon(self) -> float:
        """Client-level epsilon of the releases charged so far, at the configured delta."""
        from privfl.accounting import epsilon_of_events

        return epsilon_of_events(self.events, delta=self.config.delta, accountant=self.config.accountant)

    def close_round(self, unclipped_fraction: float | None, *, delta: float) -> dict:
        """Charges the round (released or not: conservative) and moves S after a released adaptive round.

        Args:
            unclipped_fraction: the round's noised unclipped fraction, or None when nothing was
                released or clipping is fixed.
            delta: the client-level delta the recorded epsilon holds at.

        Returns:
            The round's ``client_level`` record.
        """
        from privfl.accounting import DPEvent

        plan = self.plan
        self.events.append(DPEvent(noise_multiplier=plan.accounted_noise_multiplier, sample_rate=plan.sample_rate, steps=1))
        epsilon = self.epsilon
        level = {
            "epsilon": epsilon if math.isfinite(epsilon) else None,
            "delta": delta,
            "accounted_noise_multiplier": plan.accounted_noise_multiplier,
            "sample_rate": plan.sample_rate,
            "clip_norm": self.clip_norm,
            # only the noised fraction: the exact count is what the bit noise protects
            "unclipped_fraction_noised": unclipped_fraction if self.config.adaptive else None,
        }
        if self.config.adaptive and unclipped_fraction is not None:
            self.clip_norm = next_clip_norm(
                self.clip_norm, unclipped_fraction,
                target_quantile=self.config.target_quantile, learning_rate=self.config.clip_learning_rate,
            )
        level["next_clip_norm"] = self.clip_norm
        return level

    def summary(self, *, delta: float, noise: str, clip_norms: list[float]) -> dict:
        """The run summary's ``client_level`` entry."""
        plan = self.plan
        epsilon = self.epsilon
        return {
            "epsilon": epsilon if math.isfinite(epsilon) else None,
            "delta": delta,
            "noise_multiplier": plan.noise_multiplier,
            "accounted_noise_multiplier": plan.accounted_noise_multiplier,
            "delta_noise_multiplier": plan.delta_noise_multiplier,
            "bit_noise_std": plan.bit_noise_std,
            "sample_rate": plan.sample_rate,
            "expected_clients": plan.expected_clients,
            "rounds_released": len(self.events),
            "noise": noise,
            "clip_norms": clip_norms,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class SecAggRound:
    """One secure-aggregation round's client-level noise: the share count and the derived encoding.

    The sites and the server compute it alike from public values (:func:`secagg_round`).

    Attributes:
        shares: how many shares make the accounted noise (c / rho, :func:`count_free_shares`).
        range: the derived clip range and quantizer step (:func:`secagg_range`).
    """

    shares: float
    range: SecAggRange

    @property
    def min_grid(self) -> float:
        """The quantizer's step: every noise grid is a multiple of it, so each share maps to its integer exactly."""
        return math.ldexp(1.0, -self.range.fraction_bits)


def secagg_mask_context(clip_norm: float, num_sites: int) -> bytes:
    """What a deployed secure-aggregation round's pairwise masks are bound to under client-level DP.

    Each site plans its noise share for the clip norm S and the site count it was told; binding both
    into its masks (``RoundParams.mask_context``) means that a server telling sites different values
    gets masks that do not cancel, and an unmasked sum that reveals nothing. Told the same values,
    every site's share is planned for the noise the sum carries.
    """
    return b"privfl-client-dp" + struct.pack(">dI", float(clip_norm), int(num_sites))


def secagg_round(
    plan: ClientDPPlan,
    *,
    noise_ratio: float,
    participants: int,
    clip_norm: float,
    dim: int,
    adaptive: bool,
    num_sites: int,
    rounds: int,
    delta: float,
    bits: int,
) -> SecAggRound:
    """The noise shares and secure-aggregation encoding of a round of ``participants`` sites out of ``num_sites``.

    Args:
        noise_ratio: rho of the run (:func:`secagg_noise_ratio`).
        participants: c, the sites whose shares the round sums (a lone site gets the whole noise).
        num_sites: K, the federation's sites (the most any round can have).
        Other arguments: as :func:`secagg_range`.

    Raises:
        ConfigError: no encoding fits ``bits`` (see :func:`secagg_range`).
    """
    shares = count_free_shares(participants, noise_ratio) if participants >= 2 else 1.0
    derived = secagg_range(
        plan, clip_norm=clip_norm, dim=dim, adaptive=adaptive, shares=shares,
        max_clients=max(2, num_sites), rounds=rounds, delta=delta, bits=bits,
    )
    return SecAggRound(shares=shares, range=derived)
