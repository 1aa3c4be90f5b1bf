"""Shamir t-of-n secret sharing over GF(p), p = 2^256 + 297 (the smallest prime above 2^256).

A secret s is the constant term of a uniformly random polynomial f of degree t-1; holder x gets f(x).
Any t points determine f, hence s = f(0) by Lagrange interpolation. Any t-1 points are consistent with
every secret: for each candidate s there is exactly one polynomial through those points and (0, s), so
fewer than t shares carry no information about s (information-theoretic, whatever the adversary's power).
Coefficients come from :mod:`secrets`.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from functools import lru_cache

from privfl.errors import ProtocolError

__all__ = ["PRIME", "SHARE_BYTES", "consistent", "int_to_secret", "lagrange_at_zero", "reconstruct", "secret_to_int", "split"]

PRIME = (1 << 256) + 297
SHARE_BYTES = 33
"""A field element fits in 33 bytes (p > 2^256)."""


def split(secret: int, threshold: int, xs: Sequence[int], *, prime: int = PRIME) -> dict[int, int]:
    """Shares ``secret`` so that any ``threshold`` of the holders ``xs`` can rebuild it.

    Args:
        secret: an element of GF(prime).
        threshold: t, the degree of the polynomial plus one (1 <= t <= len(xs)).
        xs: distinct nonzero evaluation points, one per holder.
        prime: the field modulus.

    Returns:
        x -> f(x) for every holder.

    Raises:
        ProtocolError: bad threshold, bad points or a secret outside the field.
    """
    if not 0 <= secret < prime:
        raise ProtocolError("secret outside the field")
    if not 1 <= threshold <= len(xs):
        raise ProtocolError(f"threshold {threshold} not in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or any(not 0 < x < prime for x in xs):
        raise ProtocolError("evaluation points must be distinct and nonzero")
    coefficients = [secret] + [secrets.randbelow(prime) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % prime
        shares[x] = y
    return shares


@lru_cache(maxsize=4096)
def lagrange_at_zero(xs: tuple[int, ...], prime: int = PRIME) -> tuple[int, ...]:
    """Weights w_i with f(0) = sum_i w_i f(x_i) for any polynomial of degree < len(xs).

    w_i = prod_{j != i} x_j / prod_{j != i} (x_j - x_i) = X / (x_i prod_{j != i} (x_j - x_i)) with
    X = prod_j x_j (every x_j is non-zero). The len(xs) denominators are inverted together with one
    modular inverse (Montgomery's trick): the inverses, not the products, were the cost.
    Cached: in a round many secrets are rebuilt from the same set of holders.
    """
    total = 1
    for x in xs:
        total = total * x % prime
    denominators = []
    for i, xi in enumerate(xs):
        d = xi
        for j, xj in enumerate(xs):
            if j != i:
                d = d * (xj - xi) % prime
        denominators.append(d)
    prefix = [1]
    for d in denominators:
        prefix.append(prefix[-1] * d % prime)
    inverse = pow(prefix[-1], -1, prime)  # 1 / (d_0 ... d_{n-1})
    weights = [0] * len(xs)
    for i in range(len(xs) - 1, -1, -1):
        # inverse is 1 / (d_0 ... d_i) here, so 1 / d_i = inverse * (d_0 ... d_{i-1}).
        weights[i] = total * (inverse * prefix[i] % prime) % prime
        inverse = inverse * denominators[i] % prime
    return tuple(weights)


def reconstruct(shares: Mapping[int, int], threshold: int, *, prime: int = PRIME) -> int:
    """Rebuilds the secret from at least ``threshold`` shares (uses the ``threshold`` smallest points).

    Raises:
        ProtocolError: fewer than ``threshold`` shares.
    """
    if len(shares) < threshold:
        raise ProtocolError(f"{len(shares)} shares < threshold {threshold}")
    xs = tuple(sorted(shares)[:threshold])
    weights = lagrange_at_zero(xs, prime)
    return sum(w * shares[x] for w, x in zip(weights, xs, strict=True)) % prime


def _batch_inverse(values: Sequence[int], prime: int) -> list[int]:
    """1 / v for every v (all non-zero mod ``prime``) with one modular inverse (Montgomery's trick)."""
    prefix = [1]
    for v in values:
        prefix.append(prefix[-1] * v % prime)
    inverse = pow(prefix[-1], -1, prime)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inverse * prefix[i] % prime
        inverse = inverse * values[i] % prime
    return out


@lru_cache(maxsize=4096)
def _barycentric_weights(xs: tuple[int, ...], prime: int) -> tuple[int, ...]:
    """w_i = 1 / prod_{j != i} (x_i - x_j): f(x) = l(x) sum_i w_i f(x_i) / (x - x_i), l(x) = prod_i (x - x_i)."""
    denominators = []
    for i, xi in enumerate(xs):
        d = 1
        for j, xj in enumerate(xs):
            if j != i:
                d = d * (xi - xj) % prime
        denominators.append(d)
    return tuple(_batch_inverse(denominators, prime))


def consistent(shares: Mapping[int, int], threshold: int, *, prime: int = PRIME, challenge: int | None = None) -> bool:
    """Whether all the shares lie on one polynomial of degree < ``threshold`` (a random parity check).

    `reconstruct` uses the ``threshold`` smallest points only; a wrong share among the others would
    go unnoticed, and a wrong share among those would give a wrong secret with nothing to show for it.
    The k shares lie on one polynomial of degree < t exactly when sum_i v_i y_i x_i^j = 0 for
    j = 0 .. k-t-1, with v_i = 1 / prod_{m != i} (x_i - x_m) (Reed-Solomon parity checks). This tests
    one random combination of those k-t checks, sum_j r^j, which costs k multiplications once the
    coefficients for a set of points are known (cached: in a round most secrets share holders).
    Shares that are off the polynomial pass with probability below k / p < 2^-240 over the choice of
    ``challenge`` (drawn from :mod:`secrets` when not given; a caller checking many secrets of one
    round draws one and passes it, so their coefficients are computed once).

    As long as at least ``threshold`` of the shares are honest, True means `reconstruct` returns
    the dealt secret. With ``threshold`` shares or fewer there is nothing to contradict: True.
    """
    points = tuple(sorted(shares))
    if len(points) <= threshold:
        return True
    r = challenge if challenge is not None else 1 + secrets.randbelow(prime - 1)
    coefficients = _parity_coefficients(points, threshold, r % prime, prime)
    return sum(c * shares[x] for c, x in zip(coefficients, points, strict=True)) % prime == 0


@lru_cache(maxsize=4096)
def _parity_coefficients(xs: tuple[int, ...], threshold: int, r: int, prime: int) -> tuple[int, ...]:
    """c_i = v_i * g(x_i) with g(x) = sum_{j < k-t} (r x)^j = ((r x)^(k-t) - 1) / (r x - 1)."""
    m = len(xs) - threshold
    v = _barycentric_weights(xs, prime)
    rx = [r * x % prime for x in xs]
    denominators = [(a - 1) % prime for a in rx]
    inverses = _batch_inverse([d or 1 for d in denominators], prime)
    g = [m % prime if d == 0 else (pow(a, m, prime) - 1) * inv % prime for a, d, inv in zip(rx, denominators, inverses, strict=True)]
    return tuple(vi * gi % prime for vi, gi in zip(v, g, strict=True))


def secret_to_int(secret: bytes) -> int:
    """32 bytes -> field element (big endian; 2^256 < p so it always fits)."""
    if len(secret) != 32:
        raise ProtocolError("secrets are 32 bytes")
    return int.from_bytes(secret, "big")


def int_to_secret(value: int) -> bytes:
    """Field element -> 32 bytes.

    Raises:
        ProtocolError: the value is not a 32-byte secret (wrong shares were combined).
    """
    if not 0 <= value < 1 << 256:
        raise ProtocolError("reconstructed value is not a 32-byte secret")
    return value.to_bytes(32, "big")
