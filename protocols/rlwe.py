"""Ring-LWE symmetric encryption for sums: seeded ciphertexts that carry one word per value per prime.

The ring is R_Q = Z_Q[X]/(X^N + 1) with Q a product of one or two NTT-friendly primes below 2^32
(:data:`PRIMES`), kept in RNS form (one residue per prime). Everything the protocol needs is an
addition, so the scheme is the plain symmetric RLWE encryption with the message in the high bits:

    c0 = -a * s + Delta * m + e   (mod Q),   a = PRG(seed, context) uniform in R_Q,

with ``s`` a uniform ternary secret polynomial, ``e`` drawn coefficient-wise from the centred binomial
distribution with eta = 21 (standard deviation 3.24, every value within [-21, 21]), ``m`` the
integer plaintext polynomial and ``Delta = 2^d`` a power of two. A ciphertext is ``(seed, c0)``:
``a`` is never sent, since anybody can expand it from the 32-byte seed; that is what halves the
upload against a ciphertext that ships both polynomials. Sums add the ``c0`` and the ``a``:

    sum_k c0_k + (sum_k a_k) * s = Delta * sum_k m_k + sum_k e_k   (mod Q),

and with n summands |sum_k e_k| <= 21 n < Delta / 2 always, so the key holder recovers
``sum_k m_k`` exactly by rounding: for a sum of genuine ciphertexts the release is a function of the
plaintexts alone and reveals nothing about the errors (no flooding needed, unlike an approximate CKKS
decryption). A decryption whose rounding residual exceeds 21 n anywhere is refused: a ciphertext
missing from the sum, counted twice, or expanded with another ``a`` decrypts to values spread over
all of Z_Q. (Small offsets added to c0 in the coefficient domain are not detected: they round away
or, near the bound, flip the refusal; :mod:`privfl.protocols.shared_key` says what that allows.)

Security: RLWE with N = 4096 (or 8192), log2 Q <= 64, ternary secret and error of standard deviation
3.2 is well inside the Homomorphic Encryption Standard's 128-bit table (Albrecht et al. 2018, Table 1:
log2 Q <= 109 for N = 4096). ``c0`` is indistinguishable from uniform given ``a`` under decision RLWE,
so an eavesdropper or the server that sums learns nothing about ``m``. Randomness: the secret key,
the seeds and the errors come from the operating system's generator (``secrets``) or from AES-CTR
keystreams keyed by it (:mod:`privfl.protocols.secagg.prg`).

Polynomials are stored in the NTT (evaluation) domain, where products are coefficient-wise; the
message and error are transformed once on encryption and the sum once on decryption.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from privfl.errors import ConfigError, DecryptionError
from privfl.protocols.secagg.prg import expand, mask_key

__all__ = [
    "ERROR_BOUND",
    "PRIMES",
    "SEED_BYTES",
    "SecretKey",
    "decrypt_sum",
    "encrypt",
    "expand_a",
    "intt",
    "mulmod",
    "ntt",
    "reduce_sum",
    "shoup",
]

PRIMES: tuple[int, ...] = (4294475777, 4293918721)
"""The RNS primes: the two largest primes below 2^32 that are 1 mod 2^15 (an NTT for every N <= 16384).

Each has a rejection rate below 2.5e-4 when a uniform residue is drawn from a 32-bit word.
"""

ETA = 21
"""Centred binomial parameter: e = popcount(21 random bits) - popcount(21 random bits)."""

ERROR_BOUND = ETA
"""Largest absolute value of one error coefficient."""

SEED_BYTES = 32

_MASK21 = np.uint32((1 << ETA) - 1)
_KEY_MAGIC = b"PFLRLWE1"


def _is_prime(n: int) -> bool:
    # Deterministic Miller-Rabin for n < 3.3e24 (these bases suffice).
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in bases:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


@dataclass(frozen=True)
class _NttTable:
    """Precomputed powers (each with its Shoup quotient) for the negacyclic NTT of length N modulo q."""

    q: int
    n: int
    psi: tuple[np.ndarray, np.ndarray]  # psi^i, i < N
    psi_inv_scaled: tuple[np.ndarray, np.ndarray]  # N^-1 psi^-i
    bitrev: np.ndarray
    stages: tuple[tuple[np.ndarray, np.ndarray], ...]  # per stage, omega^(N/L j) for j < L/2
    inv_stages: tuple[tuple[np.ndarray, np.ndarray], ...]


def shoup(w: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray]:
    """(w, floor(w 2^32 / q)) for :func:`mulmod`: constants below q < 2^32, as uint64."""
    w = np.asarray(w, dtype=np.uint64)
    return w, (w << np.uint64(32)) // np.uint64(q)


def mulmod(x: np.ndarray, w: tuple[np.ndarray, np.ndarray], q: int) -> np.ndarray:
    """x w mod q for uint64 x < q < 2^32 and a constant w from :func:`shoup` (no division).

    Shoup's method: with w' = floor(w 2^32 / q), x w - floor(x w' / 2^32) q lies in [0, 2q), and
    every product stays below 2^64; the uint64 arithmetic wraps exactly.
    """
    qq = np.uint64(q)
    estimate = (x * w[1]) >> np.uint64(32)
    r = x * w[0] - estimate * qq
    reduced: np.ndarray = np.minimum(r, r - qq)  # r - q wraps above r when r < q
    return reduced


@lru_cache(maxsize=16)
def _table(q: int, n: int) -> _NttTable:
    if (q - 1) % (2 * n) or not _is_prime(q):
        raise ConfigError("rlwe", (q, n), "q must be a prime with q = 1 mod 2N")
    for g in range(2, 1000):
        psi = pow(g, (q - 1) // (2 * n), q)
        if pow(psi, n, q) == q - 1:  # order exactly 2N (N is a power of two)
            break
    else:  # pragma: no cover - a prime 1 mod 2N always has such a root among small bases
        raise ConfigError("rlwe", (q, n), "no primitive 2N-th root of unity found")
    omega = psi * psi % q

    def powers(base: int, count: int, scale: int = 1) -> tuple[np.ndarray, np.ndarray]:
        out = np.empty(count, dtype=np.uint64)
        value = scale % q
        for i in range(count):
            out[i] = value
            value = value * base % q
        return shoup(out, q)

    bits = n.bit_length() - 1
    bitrev = np.array([int(format(i, f"0{bits}b")[::-1], 2) for i in range(n)], dtype=np.int64)
    stages, inv_stages = [], []
    length = 2
    omega_inv = pow(omega, q - 2, q)
    while length <= n:
        stages.append(powers(pow(omega, n // length, q), length // 2))
        inv_stages.append(powers(pow(omega_inv, n // length, q), length // 2))
        length *= 2
    n_inv = pow(n, q - 2, q)
    psi_inv = pow(psi, q - 2, q)
    return _NttTable(q, n, powers(psi, n), powers(psi_inv, n, n_inv), bitrev, tuple(stages), tuple(inv_stages))


def _butterflies(x: np.ndarray, q: int, stages: tuple[tuple[np.ndarray, np.ndarray], ...]) -> np.ndarray:
    # Iterative radix-2 Cooley-Tukey over the last axis (input already in bit-reversed order).
    rows, n = x.shape
    qq = np.uint64(q)
    for twiddles in stages:
        half = twiddles[0].shape[0]
        view = x.reshape(rows, n // (2 * half), 2 * half)
        u = view[..., :half]
        v = mulmod(view[..., half:], twiddles, q)
        out = np.empty_like(view)
        total = np.add(u, v, out=out[..., :half])
        np.minimum(total, total - qq, out=total)
        difference = np.subtract(u + qq, v, out=out[..., half:])
        np.minimum(difference, difference - qq, out=difference)
        x = out.reshape(rows, n)
    return x


def ntt(x: np.ndarray, q: int) -> np.ndarray:
    """Negacyclic NTT of each row of ``x`` (uint64 residues mod q, shape (rows, N))."""
    table = _table(q, x.shape[-1])
    return _butterflies(mulmod(x, table.psi, q)[:, table.bitrev], q, table.stages)


def intt(x: np.ndarray, q: int) -> np.ndarray:
    """Inverse of :func:`ntt`."""
    table = _table(q, x.shape[-1])
    return mulmod(_butterflies(x[:, table.bitrev], q, table.inv_stages), table.psi_inv_scaled, q)


def _uniform(seed: bytes, context: bytes, limb: int, count: int) -> np.ndarray:
    """``count`` uniform residues mod PRIMES[limb], from the keystream of (seed, context) by rejection."""
    q = PRIMES[limb]
    key = mask_key(seed, b"rlwe-a" + bytes([limb]) + context)
    extra = count // 1000 + 64
    while True:
        words = expand(key, count + extra)
        kept = words[words < q]
        if kept.shape[0] >= count:
            return kept[:count].astype(np.uint64)
        extra *= 4  # pragma: no cover - about 2^-60 for a million residues


def expand_a(seeds: list[tuple[bytes, bytes]], limbs: int, rows: int, n: int) -> np.ndarray:
    """The sum of the ``a`` polynomials of (seed, context) pairs (NTT domain), shape (limbs, rows, N), reduced.

    The context (the caller binds run, round and sender into it) makes ``a`` a function of where a
    ciphertext belongs as well as of its seed: a seed replayed in another round or under another name
    expands to another ``a``, and its ciphertext then decrypts to noise.
    """
    total = np.zeros((limbs, rows * n), dtype=np.uint64)
    for seed, context in seeds:
        for limb in range(limbs):
            total[limb] += _uniform(seed, context, limb, rows * n)
    return reduce_sum(total.reshape(limbs, rows, n), len(seeds))


def reduce_sum(total: np.ndarray, count: int) -> np.ndarray:
    """Reduces a uint64 sum of ``count`` residue arrays (limb on axis 0) modulo each limb's prime."""
    if count >= 1 << 32:
        raise ConfigError("count", count, "a uint64 sum holds at most 2^32 - 1 residues below 2^32")
    for limb in range(total.shape[0]):
        total[limb] %= np.uint64(PRIMES[limb])
    return total


def _error(shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape))
    words = expand(secrets.token_bytes(32), 2 * count)
    masked = words & _MASK21
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        bits = np.bitwise_count(masked).astype(np.int64)
    else:  # pragma: no cover - older numpy
        bits = np.unpackbits(masked.view(np.uint8).reshape(-1, 4), axis=1).sum(axis=1, dtype=np.int64)
    error: np.ndarray = (bits[0::2] - bits[1::2]).reshape(shape)
    return error


@dataclass(frozen=True, eq=False)
class SecretKey:
    """A uniform ternary secret polynomial, shared by the sites and never by the server.

    Use :meth:`generate`; :meth:`to_bytes` is for the site's own state only (no repr shows the key).
    """

    n: int
    _coefficients: np.ndarray = field(repr=False)
    _ntt: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        return f"SecretKey(n={self.n}, key_id={self.key_id.hex()}, secret=<hidden>)"

    @classmethod
    def generate(cls, n: int) -> SecretKey:
        """A fresh key from the operating system's generator."""
        _table(PRIMES[0], n)  # checks N
        chosen = np.empty(0, dtype=np.int64)
        while chosen.shape[0] < n:
            raw = np.frombuffer(secrets.token_bytes(2 * n), dtype=np.uint8)
            chosen = np.concatenate([chosen, raw[raw < 255].astype(np.int64) % 3 - 1])
        return cls(n, chosen[:n].copy())

    @property
    def key_id(self) -> bytes:
        """A public 16-byte fingerprint (a hash of the key) to check that two parties hold the same key."""
        return hashlib.sha256(b"privfl-rlwe-key-id" + self.to_bytes()).digest()[:16]

    def to_bytes(self) -> bytes:
        """The secret key, for the holder's own state directory only: never send it to the server."""
        return _KEY_MAGIC + self.n.to_bytes(4, "big") + (self._coefficients + 1).astype(np.uint8).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> SecretKey:
        """Reloads :meth:`to_bytes`.

        Raises:
            ConfigError: not a key written by :meth:`to_bytes`.
        """
        if len(data) < 12 or data[:8] != _KEY_MAGIC:
            raise ConfigError("secret key", f"<{len(data)} bytes>", "is not a privfl RLWE key")
        n = int.from_bytes(data[8:12], "big")
        raw = np.frombuffer(data[12:], dtype=np.uint8)
        if n not in (2048, 4096, 8192, 16384) or raw.shape[0] != n or np.any(raw > 2):
            raise ConfigError("secret key", f"<{len(data)} bytes>", "is malformed")
        return cls(n, raw.astype(np.int64) - 1)

    def ntt_form(self, limb: int) -> tuple[np.ndarray, np.ndarray]:
        """The key in the NTT domain modulo PRIMES[limb], shape (1, N), with its Shoup quotients."""
        cached = self._ntt.get(limb)
        if cached is None:
            q = PRIMES[limb]
            cached = shoup(ntt((self._coefficients % q).astype(np.uint64)[None, :], q), q)
            self._ntt[limb] = cached
        return cached


def encrypt(key: SecretKey, plain: np.ndarray, delta_bits: int, limbs: int, *, context: bytes = b"") -> tuple[bytes, np.ndarray]:
    """Encrypts integer polynomials under the shared key.

    Args:
        key: the shared secret key.
        plain: int64, shape (rows, N); |Delta * plain| must stay below Q / 2 (the caller sizes it).
        delta_bits: d, with Delta = 2^d.
        limbs: how many of :data:`PRIMES` make Q (1 or 2).
        context: bound into ``a`` with the seed (see :func:`expand_a`); the decryptor must use the same.

    Returns:
        (seed, c0) with c0 uint32 of shape (limbs, rows, N), each limb's residues below its prime.
    """
    rows, n = plain.shape
    x = np.left_shift(plain, delta_bits) + _error(plain.shape)
    seed = secrets.token_bytes(SEED_BYTES)
    c0 = np.empty((limbs, rows, n), dtype=np.uint32)
    for limb in range(limbs):
        q = PRIMES[limb]
        qq = np.uint64(q)
        encoded = ntt((x % q).astype(np.uint64), q)
        a = _uniform(seed, context, limb, rows * n).reshape(rows, n)
        difference = encoded + qq - mulmod(a, key.ntt_form(limb), q)
        c0[limb] = np.minimum(difference, difference - qq)
    return seed, c0


def decrypt_sum(key: SecretKey, c0_sum: np.ndarray, a_sum: np.ndarray, delta_bits: int, count: int) -> np.ndarray:
    """Decrypts a sum of ``count`` ciphertexts exactly, or refuses.

    Args:
        key: the shared secret key.
        c0_sum: uint64 (limbs, rows, N), the summed c0 reduced per limb.
        a_sum: the same for the summed ``a`` (:func:`expand_a`).
        delta_bits: d, with Delta = 2^d > 2 * 21 * count.
        count: how many ciphertexts the sum claims to hold.

    Returns:
        int64 (rows, N): the sum of the plaintext polynomials.

    Raises:
        DecryptionError: some coefficient's rounding residual exceeds 21 * count, the most that
            ``count`` genuine ciphertexts can carry (so the sum is not what it claims to be).
    """
    limbs = c0_sum.shape[0]
    residues = []
    for limb in range(limbs):
        q = PRIMES[limb]
        qq = np.uint64(q)
        total = c0_sum[limb] + mulmod(a_sum[limb], key.ntt_form(limb), q)
        residues.append(intt(np.minimum(total, total - qq), q))
    if limbs == 1:
        modulus = PRIMES[0]
        x = residues[0]
    else:
        q1, q2 = PRIMES[0], PRIMES[1]
        modulus = q1 * q2
        inv = np.uint64(pow(q1, q2 - 2, q2))
        x1, x2 = residues
        y = (x2 + np.uint64(q2) - x1 % np.uint64(q2)) % np.uint64(q2) * inv % np.uint64(q2)
        x = x1 + np.uint64(q1) * y  # < q1 q2 < 2^64: the CRT lift
    upper = x > np.uint64(modulus // 2)
    centred = x.astype(np.int64)
    centred[upper] = -(np.uint64(modulus) - x[upper]).astype(np.int64)
    half = np.int64(1) << np.int64(delta_bits - 1)
    plain: np.ndarray = np.right_shift(centred + half, delta_bits)
    residual = centred - np.left_shift(plain, delta_bits)
    if int(np.max(np.abs(residual))) > ERROR_BOUND * count:
        raise DecryptionError()
    return plain
