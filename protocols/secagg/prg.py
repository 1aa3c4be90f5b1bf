"""Pseudorandom mask expansion: AES-256-CTR keystream read as little-endian uint32 words.

A mask seed (32 bytes from ``os.urandom`` or an X25519/HKDF derivation) is turned into an AES key with
HKDF-SHA256 under a label, and the AES-CTR keystream (counter starting at zero; every key is used for one
stream only) is viewed as ``uint32`` with :func:`numpy.frombuffer`. No simulation-grade randomness is used here.

Masks are added in Z_{2^32}; reducing mod 2^k afterwards is exact because 2^k divides 2^32, and a uniform
word mod 2^32 stays uniform mod 2^k.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from privfl.protocols.secagg.keys import hkdf

__all__ = ["WORD", "CHUNK_WORDS", "PARALLEL_MIN_WORDS", "mask_key", "expand", "apply_masks", "uniform_floats"]

WORD = np.dtype("<u4")
"""The word every mask and masked vector is made of (4 bytes, little endian)."""

CHUNK_WORDS = 1 << 15
"""Words expanded per step: 128 KiB fits in L2, so a keystream chunk is consumed while still cached."""

PARALLEL_MIN_WORDS = 1 << 22
"""Below this many keystream words in total, one thread does the work (threads cost more than they save)."""

_BLOCK_WORDS = 4  # one AES block is four uint32 words


def mask_key(seed: bytes, label: bytes) -> bytes:
    """Derives the AES-256 key of one mask stream.

    Args:
        seed: 32 secret bytes (a self-mask seed or a pairwise agreed secret).
        label: domain separation (what the stream is for, and the round).

    Returns:
        32 key bytes.
    """
    return hkdf(seed, b"prg", label)


def _encryptor(key: bytes, first_block: int = 0):
    # CTR's counter block is a 128-bit big-endian integer; block i of the stream (words 4i..4i+3) is
    # AES(key, i) whichever block the encryptor starts at, so a slice of the stream can be made alone.
    return Cipher(algorithms.AES(key), modes.CTR(first_block.to_bytes(16, "big"))).encryptor()


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
    threads: int = 1,
) -> None:
    """Adds every addend and ``sign * PRG(key)`` for every stream into ``acc`` in place (mod 2^32).

    The loop runs over chunks outside and vectors/streams inside, so each chunk of ``acc`` and of the
    keystream stays in cache: one pass over memory however many streams there are. With ``threads`` > 1
    the vector is cut into that many contiguous slices, each expanded by its own thread from its own
    counter offset (OpenSSL and numpy release the GIL); the result is identical.

    Args:
        acc: 1-D ``uint32`` accumulator, modified in place.
        streams: (AES key, +1 or -1) pairs.
        addends: ``uint32`` vectors of the same length, added as they are.
        chunk_words: words per step.
        threads: worker threads for large jobs (at least :data:`PARALLEL_MIN_WORDS` keystream words).
    """
    if acc.dtype != WORD or acc.ndim != 1:
        raise TypeError("acc must be a 1-D little-endian uint32 array")
    if not streams and not addends:
        return
    length = acc.shape[0]
    threads = max(1, min(threads, length // chunk_words))
    if threads == 1 or length * len(streams) < PARALLEL_MIN_WORDS:
        _apply_range(acc, streams, addends, chunk_words, 0, length)
        return
    step = -(-length // threads)
    step += -step % _BLOCK_WORDS
    bounds = [(start, min(start + step, length)) for start in range(0, length, step)]
    with ThreadPoolExecutor(max_workers=len(bounds)) as pool:
        for future in [pool.submit(_apply_range, acc, streams, addends, chunk_words, a, b) for a, b in bounds]:
            future.result()


def _apply_range(
    acc: np.ndarray, streams: Sequence[tuple[bytes, int]], addends: Sequence[np.ndarray], chunk_words: int, begin: int, end: int
) -> None:
    encryptors = [(_encryptor(key, begin // _BLOCK_WORDS), sign) for key, sign in streams]
    zeros = bytes(4 * chunk_words)
    # CTR's update_into wants room for one extra block minus a byte.
    buf = bytearray(4 * chunk_words + 15)
    for start in range(begin, end, chunk_words):
        stop = min(start + chunk_words, end)
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
