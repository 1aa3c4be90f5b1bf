"""Fixed-point encoding of float vectors into Z_{2^k} so that a sum of n of them can never wrap.

Each coordinate is clipped to [-c, c] (clipped values are counted, never wrapped), divided by the step
Δ, and stochastically rounded: q = floor(x / Δ + U), U ~ Uniform[0, 1) from an AES-CTR keystream, so
E[q Δ] = x and |q Δ - x| < Δ. With L = max |q|, a sum of at most n encodings lies in [-n L, n L]; the
modulus 2^k must satisfy 2 n L + 1 <= 2^k so the centred lift of the sum mod 2^k is exact.

Error bound: for m <= n summed vectors, every coordinate of the decoded sum is within m Δ of the sum of
the clipped inputs (deterministic), and its error has standard deviation at most sqrt(m) Δ / 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from privfl.errors import ConfigError
from privfl.protocols.secagg.prg import WORD, uniform_floats

__all__ = ["MAX_BITS", "Quantizer"]

MAX_BITS = 32
"""Words are 32 bits on the wire (no more upload than float32)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Quantizer:
    """Public encoding parameters, shared by every client and the server.

    Args:
        clip_range: c > 0; inputs are clipped to [-c, c].
        bits: k, the modulus is 2^k (2..32).
        num_clients: n, the most vectors that will ever be summed.
        fraction_bits: if given, the step is 2^-fraction_bits and ``bits`` is checked against overflow;
            if None, the finest step that cannot overflow is chosen: Δ = c / floor((2^k - 1) / (2 n)).

    Raises:
        ConfigError: a bad value, or ``bits`` too small for ``num_clients`` sums (the message names it).
    """

    clip_range: float
    bits: int = 32
    num_clients: int
    fraction_bits: int | None = None
    levels: int = field(init=False)
    step: float = field(init=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.clip_range, (int, float)) and math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ConfigError("clip_range", self.clip_range, "must be a finite number > 0")
        if not (isinstance(self.bits, int) and 2 <= self.bits <= MAX_BITS):
            raise ConfigError("bits", self.bits, f"must be an int in [2, {MAX_BITS}]")
        if not (isinstance(self.num_clients, int) and self.num_clients >= 1):
            raise ConfigError("num_clients", self.num_clients, "must be an int >= 1")
        n, k = self.num_clients, self.bits
        if self.fraction_bits is None:
            levels = ((1 << k) - 1) // (2 * n)
            if levels < 1:
                raise ConfigError("bits", k, f"a 2^{k} modulus cannot hold a sum of {n} clients' values")
            step = self.clip_range / levels
        else:
            if not (isinstance(self.fraction_bits, int) and -64 <= self.fraction_bits <= 64):
                raise ConfigError("fraction_bits", self.fraction_bits, "must be an int in [-64, 64]")
            step = math.ldexp(1.0, -self.fraction_bits)
            levels = math.ceil(self.clip_range / step)
            needed = (2 * n * levels).bit_length()
            if 2 * n * levels + 1 > 1 << k:
                raise ConfigError(
                    "bits",
                    k,
                    f"{n} clients x values in [-{levels}, {levels}] steps could overflow 2^{k}; need bits >= {needed}",
                )
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "step", step)

    @property
    def modulus_mask(self) -> int:
        """2^k - 1."""
        return (1 << self.bits) - 1

    def max_error(self, summed: int) -> float:
        """Largest possible per-coordinate error of a decoded sum of ``summed`` vectors (vs clipped inputs)."""
        return summed * self.step

    def encode(self, values: np.ndarray, rounding_key: bytes) -> tuple[np.ndarray, int]:
        """Clips, stochastically rounds and maps into Z_{2^k}.

        Args:
            values: 1-D float array.
            rounding_key: fresh AES key for the rounding uniforms (see :func:`prg.mask_key`).

        Returns:
            (uint32 words in [0, 2^k), number of clipped coordinates).
        """
        values = np.asarray(values, dtype=np.float64)
        c = float(self.clip_range)
        clipped = int(np.count_nonzero(np.abs(values) > c))
        scaled = np.clip(values, -c, c) / self.step
        scaled += uniform_floats(rounding_key, scaled.shape[0])
        q = np.floor(scaled, out=scaled).astype(np.int64)
        # Division by the step can land a hair above L; clamping keeps the no-overflow guarantee.
        np.clip(q, -self.levels, self.levels, out=q)
        return (q & self.modulus_mask).astype(WORD), clipped

    def decode_sum(self, words: np.ndarray) -> np.ndarray:
        """Centred lift of a sum mod 2^k, times the step.

        Args:
            words: the unmasked sum (uint32; only the low k bits count).

        Returns:
            float64 sum of the encoded values.
        """
        s = (words.astype(np.int64)) & self.modulus_mask
        s[s >= 1 << (self.bits - 1)] -= 1 << self.bits
        return s * self.step
