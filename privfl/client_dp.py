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

Where the noise is added depends on the protection:

* ``plaintext`` and ``ckks``: centrally, once, on the aggregate (for CKKS by the key holder, after
  decryption and before the average is released);
* ``secagg``: distributed. Each client adds N(0, (z_delta S)^2 / t) to its own clipped update before
  masking, where t is the protocol's threshold, so the server never sees an un-noised sum. The sum
  over s >= t survivors then carries variance (s / t)(z_delta S)^2 >= (z_delta S)^2: dropouts can
  only leave more noise than accounted, never less.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from privfl.config import ClientDPConfig, ClientSampling
from privfl.errors import ConfigError

__all__ = [
    "ClientDPPlan",
    "plan_client_dp",
    "clip_update",
    "distributed_noise",
    "noisy_average",
    "next_clip_norm",
    "delta_noise_multiplier",
]


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


def distributed_noise(dim: int, *, total_std: float, threshold: int, rng: np.random.Generator) -> np.ndarray:
    """One client's share of the noise: N(0, total_std^2 / threshold) per coordinate.

    Any ``s >= threshold`` shares sum to noise of variance ``(s / threshold) total_std^2 >= total_std^2``.
    """
    if threshold < 1:
        raise ConfigError("threshold", threshold, "must be >= 1")
    return rng.normal(0.0, total_std / math.sqrt(threshold), size=dim)


def noisy_average(total: np.ndarray, *, noise_std: float, denominator: float, rng: np.random.Generator | None) -> np.ndarray:
    """Central DP-FedAvg release: (sum + N(0, noise_std^2)) / denominator (no noise when ``rng`` is None)."""
    noisy = total if rng is None else total + rng.normal(0.0, noise_std, size=total.shape)
    return noisy / denominator


def next_clip_norm(clip_norm: float, unclipped_fraction: float, *, target_quantile: float, learning_rate: float) -> float:
    """Geometric update S exp(-eta (b_bar - gamma)) (Andrew et al. 2021)."""
    return clip_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile))
