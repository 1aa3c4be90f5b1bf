"""What the CKKS key holder releases: the decrypted sum flooded with fresh Gaussian noise and rounded to a grid.

Why (Li and Micciancio, EUROCRYPT 2021): a CKKS decryption is m + e with e depending on the secret
key. A party that holds the ciphertext (c0, c1), as the server does for every sum, and receives the
exact decryption re-encodes it and solves c0 + c1 s = Encode(m + e) for s by linear algebra: one exact
release gives away the key, and with it every site's update. The fix Li, Micciancio, Schultz and
Sorrell (CRYPTO 2022) analyse is noise flooding: add fresh noise to the decryption before it leaves
the key holder, so each release is only a noisy (RLWE-like) equation in s.

Mechanism, on each decrypted slot of a sum of k ciphertexts:

* sigma_k = sqrt(k) * sigma_1, where sigma_1 is the per-slot error standard deviation of one fresh
  encryption, measured by the key holder itself at setup (it encrypts zeros with the public key and
  decrypts them with its secret key: nothing from a peer);
* release round(x + N(0, (F sigma_k)^2), grid), with grid = the largest power of two <= F sigma_k,
  F = :data:`FLOOD_FACTOR`. The grid drops every float64 bit below the noise, so no bit of the
  output depends on how the Gaussian sample rounded (Mironov, CCS 2012).

The added error is about 1.04 F times the CKKS error itself (measured in docs/ckks.md). F = 4 keeps
the decrypted average within the tests' 1e-6 relative error at the default scale 2^32; it is not
the 2^(lambda/2) statistical flooding that would make the release provably independent of s (that
would swamp the values at these parameters): docs/ckks.md states the residual risk.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

__all__ = ["FLOOD_FACTOR", "crypto_gaussian", "flood_and_round", "measure_fresh_error", "release_grid"]

FLOOD_FACTOR = 4.0
"""Flooding noise standard deviation, in units of the sum's own CKKS error standard deviation."""


def measure_fresh_error(secret_context: Any, public_context: Any, slots: int, samples: int = 4) -> float:
    """Per-slot error standard deviation of one fresh public-key encryption, measured.

    Args:
        secret_context: the key holder's TenSEAL context (decrypts).
        public_context: the public context clients encrypt with.
        slots: values per ciphertext.
        samples: ciphertexts of zeros to measure over (``samples * slots`` values).

    Returns:
        sigma_1 > 0.
    """
    import tenseal as ts

    errors = []
    for _ in range(samples):
        blob = ts.ckks_vector(public_context, np.zeros(slots)).serialize()
        errors.append(np.asarray(ts.ckks_vector_from(secret_context, blob).decrypt()))
    sigma = float(np.std(np.concatenate(errors)))
    if not (math.isfinite(sigma) and sigma > 0):
        raise RuntimeError("could not measure the CKKS encryption error")
    return sigma


def crypto_gaussian(count: int) -> np.ndarray:
    """``count`` standard normal samples from ``os.urandom`` (Box-Muller on 53-bit uniforms)."""
    words = np.frombuffer(os.urandom(16 * count), dtype="<u8").reshape(2, count) >> np.uint64(11)
    u1 = (words[0].astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]: log never sees 0
    u2 = words[1].astype(np.float64) * 2.0**-53
    gaussian: np.ndarray = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)
    return gaussian


def release_grid(fresh_error: float, contributions: int, factor: float = FLOOD_FACTOR) -> tuple[float, float]:
    """(flooding noise std, grid) for a sum of ``contributions`` ciphertexts."""
    noise_std = factor * math.sqrt(contributions) * fresh_error
    return noise_std, 2.0 ** math.floor(math.log2(noise_std))


def flood_and_round(values: np.ndarray, fresh_error: float, contributions: int, factor: float = FLOOD_FACTOR) -> np.ndarray:
    """The released copy of a decrypted sum: Gaussian flooding, then rounding to a power-of-two grid.

    Args:
        values: the exact decryption (float64).
        fresh_error: sigma_1 from :func:`measure_fresh_error`.
        contributions: how many ciphertexts were summed (k).
        factor: F, the flooding std in units of the sum's CKKS error std.

    Returns:
        float64 multiples of the grid.
    """
    noise_std, grid = release_grid(fresh_error, contributions, factor)
    noised = np.asarray(values, dtype=np.float64) + noise_std * crypto_gaussian(values.size).reshape(values.shape)
    # Dividing and multiplying by a power of two is exact: the result is exactly an integer times grid.
    return np.round(noised / grid) * grid
