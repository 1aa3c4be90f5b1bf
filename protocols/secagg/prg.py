"""Pseudorandom mask expansion: AES-256-CTR keystream read as little-endian uint32 words.

A mask seed (32 bytes from ``os.urandom`` or an X25519/HKDF derivation) is turned into an AES key with
HKDF-SHA256 under a label, and the AES-CTR keystream (counter starting at zero; every key is used for one
stream only) is viewed as ``uint32`` with :func:`numpy.frombuffer`. No simulation-grade randomness is used here.

Masks are added in Z_{2^32}; reducing mod 2^k afterwards is exact because 2^k divides 2^32, and a uniform
word mod 2^32 stays uniform mod 2^k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from privfl.protocols.secagg.keys import hkdf

__all__ = ["WORD", "CHUNK_WORDS", "mask_key", "expand", "apply_masks", "uniform_floats"]

WORD = np.dtype("<u4")
"""The word every mask and masked vector is made of (4 bytes, little endian)."""

CHUNK_WORDS = 1 << 15
"""Words expanded per step: 128 KiB fits in L2, so a keystream chunk is consumed while still cached."""

_ZERO_COUNTER = bytes(16)


def mask_key(seed: bytes, label: bytes) -> bytes:
    """Derives the AES-256 key of one mask stream.

    Args:
        seed: 32 secret bytes (a self-mask seed or a pairwise agreed secret).
        label: domain separation (what the stream is for, and the round).

    Returns:
        32 key bytes.
    """
    return hkdf(seed, b"prg", label)


def _encryptor(key: bytes):
    return Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()


def expand(key: bytes, length: int) -> np.ndarray:
    """Expands one key into ``length`` pseudorandom uint32 words.

    Args:
        key: an AES-256 key from :func:`mask_key`.
        length: number of words.

    Returns:
        A fresh writable ``uint32`` array.
    """
    out = np.zeros(length, dtype=WORD)
    apply_masks(out, [(key, 1)])
    return out


def apply_masks(
    acc: np.ndarray,
    streams: Sequence[tuple[bytes, int]],
    addends: Sequence[np.ndarray] = (),
    chunk_words: int = CHUNK_WORDS,
) -> None:
    """Adds every addend and ``sign * PRG(key)`` for every stream into ``acc`` in place (mod 2^32).

    The loop runs over chunks outside and vectors/streams inside, so each chunk of ``acc`` and of the
    keystream stays in cache: one pass over memory however many streams there are.

    Args:
        acc: 1-D ``uint32`` accumulator, modified in place.
        streams: (AES key, +1 or -1) pairs.
        addends: ``uint32`` vectors of the same length, added as they are.
        chunk_words: words per step.
    """
    if acc.dtype != WORD or acc.ndim != 1:
        raise TypeError("acc must be a 1-D little-endian uint32 array")
    if not streams and not addends:
        return
    length = acc.shape[0]
    encryptors = [(_encryptor(key), sign) for key, sign in streams]
    zeros = bytes(4 * chunk_words)
    # CTR's update_into wants room for one extra block minus a byte.
    buf = bytearray(4 * chunk_words + 15)
    for start in range(0, length, chunk_words):
        stop = min(start + chunk_words, length)
        count = stop - start
        data = zeros if count == chunk_words else zeros[: 4 * count]
        words = np.frombuffer(buf, dtype=WORD, count=count)
        target = acc[start:stop]
        for vector in addends:
            np.add(target, vector[start:stop], out=target)
        for encryptor, sign in encryptors:
            encryptor.update_into(data, buf)
            if sign > 0:
                np.add(target, words, out=target)
            else:
                np.subtract(target, words, out=target)


def uniform_floats(key: bytes, length: int) -> np.ndarray:
    """Keystream-derived uniforms in [0, 1) with 32-bit resolution (for stochastic rounding).

    Args:
        key: an AES-256 key from :func:`mask_key`.
        length: number of values.

    Returns:
        ``float64`` array of ``length`` values in [0, 1).
    """
    return expand(key, length).astype(np.float64) * (1.0 / 4294967296.0)
