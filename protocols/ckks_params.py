"""CKKS parameters: the one place they are defined and checked.

Kept apart from `privfl.protocols.ckks` so that reading a config needs neither TenSEAL nor torch;
`privfl.config` re-exports `CkksConfig` for the run-config schema.
"""

from __future__ import annotations

from dataclasses import dataclass

from privfl.errors import ConfigError

__all__ = ["HE_STANDARD_MAX_LOGQ_128", "CkksConfig"]


# Largest total coefficient-modulus bit count for 128-bit classical security with a ternary
# secret, from the Homomorphic Encryption Standard (Albrecht et al. 2018, Table 1).
HE_STANDARD_MAX_LOGQ_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


@dataclass(frozen=True, kw_only=True, slots=True)
class CkksConfig:
    """CKKS parameters, chosen for additions only.

    Aggregation needs no multiplication, so one data prime suffices: the ciphertext stays at a
    single RNS limb, which is what keeps the upload near 7.5x the float32 bytes (typical
    multiplication-ready chains of 3-4 primes give 14-20x). A second prime is the key-switching
    ("special") prime that TenSEAL requires; it never appears in a ciphertext.

    Args:
        poly_modulus_degree: ring dimension N; a ciphertext packs N/2 values.
        data_bits: bit size of the data prime q0. Values are encoded at scale 2^scale_bits, so
            the summed, weighted values must stay below 2^(data_bits - scale_bits - 1).
        special_bits: bit size of the key-switching prime.
        scale_bits: log2 of the encoding scale: about ``scale_bits - 22`` bits of absolute precision
            (the key holder adds noise of a few times the encryption error before it releases a sum).
        min_contributors: the fewest distinct registered sites whose signed ciphertexts the key holder
            sums before it decrypts (>= 2): it never decrypts a single site's update.
    """

    poly_modulus_degree: int = 8192
    data_bits: int = 52
    special_bits: int = 52
    scale_bits: int = 32
    min_contributors: int = 2

    def __post_init__(self) -> None:
        if self.poly_modulus_degree not in HE_STANDARD_MAX_LOGQ_128:
            raise ConfigError(
                "poly_modulus_degree", self.poly_modulus_degree, f"must be one of {sorted(HE_STANDARD_MAX_LOGQ_128)}"
            )
        for name in ("data_bits", "special_bits"):
            value = getattr(self, name)
            if not (isinstance(value, int) and 20 <= value <= 60):
                raise ConfigError(name, value, "must be an integer in [20, 60] (SEAL's prime sizes)")
        if not (isinstance(self.scale_bits, int) and 10 <= self.scale_bits <= self.data_bits - 8):
            raise ConfigError("scale_bits", self.scale_bits, f"must be an integer in [10, data_bits - 8 = {self.data_bits - 8}]")
        if isinstance(self.min_contributors, bool) or not (isinstance(self.min_contributors, int) and self.min_contributors >= 2):
            raise ConfigError(
                "min_contributors",
                self.min_contributors,
                "must be an integer >= 2: the key holder never decrypts a single site's update",
            )
        limit = HE_STANDARD_MAX_LOGQ_128[self.poly_modulus_degree]
        total = self.data_bits + self.special_bits
        if total > limit:
            raise ConfigError(
                "data_bits+special_bits",
                total,
                f"exceeds {limit} bits, the 128-bit-security limit for N={self.poly_modulus_degree} (HE standard)",
            )

    @property
    def slots(self) -> int:
        """Values packed per ciphertext."""
        return self.poly_modulus_degree // 2

    @property
    def max_magnitude(self) -> float:
        """Largest absolute value a (summed) slot may reach before it would wrap modulo q0."""
        return 2.0 ** (self.data_bits - self.scale_bits - 1)
