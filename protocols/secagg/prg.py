"""Pseudorandom mask expansion: AES-256 counter-mode keystream read as little-endian uint32 words.

A mask seed (32 bytes from ``os.urandom`` or an X25519/HKDF derivation) is turned into an AES key with
HKDF-SHA256 under a label (every key is used for one stream only), and its keystream is viewed as
``uint32`` with :func:`numpy.frombuffer`. No simulation-grade randomness is used here.

The stream is cut into segments of :data:`SEGMENT_WORDS` words; block i of segment j is
AES(key, j as 96 bits || i + 2 as 32 bits), big endian. That is plain AES-CTR over distinct counter
blocks (a PRF on distinct inputs), and it is exactly the keystream that AES-GCM encryption with nonce j
produces, which OpenSSL computes with its VAES/AVX-512 GCM code about twice as fast as its AES-CTR code
(15 against 7.7 GB/s on one core here; the GHASH it also computes is thrown away). A slice that starts
inside a segment is made with AES-CTR from the same counter block, so any slice can be made alone.

Masks are added in Z_{2^32}; reducing mod 2^k afterwards is exact because 2^k divides 2^32, and a uniform
word mod 2^32 stays uniform mod 2^k.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from privfl.protocols.secagg.keys import hkdf

__all__ = ["CHUNK_WORDS", "PARALLEL_MIN_WORDS", "SEGMENT_WORDS", "WORD", "apply_masks", "expand", "mask_key", "uniform_floats"]

WORD = np.dtype("<u4")
"""The word every mask and masked vector is made of (4 bytes, little endian)."""

CHUNK_WORDS = 1 << 15
"""Words expanded per step: 128 KiB fits in L2, so a keystream chunk is consumed while still cached."""

SEGMENT_WORDS = 1 << 19
"""Words per keystream segment (one GCM nonce; 2 MiB). A multiple of :data:`CHUNK_WORDS`. Starting a
segment costs about 3.5 us (a new cipher context), 2.5% of expanding it."""

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


def _encryptor(key: bytes, word: int) -> CipherContext:
    # The encryptor of the keystream from ``word`` (a multiple of 4) to the end of its segment.
    segment, offset = divmod(word, SEGMENT_WORDS)
    nonce = segment.to_bytes(12, "big")
    if offset == 0:
        # GCM's first keystream block is AES(nonce || 2); its tag is never computed nor used.
        return Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
    block = offset // _BLOCK_WORDS + 2
    return Cipher(algorithms.AES(key), modes.CTR(nonce + block.to_bytes(4, "big"))).encryptor()


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
        _apply_range(acc, streams, addends, chunk_words, begin=0, end=length)
        return
    step = -(-length // threads)
    # Slices start on a segment boundary when each thread gets a segment or more (then every
    # encryptor is a fast GCM one), else on a block boundary (the CTR path for the head).
    step += -step % (SEGMENT_WORDS if step >= SEGMENT_WORDS else _BLOCK_WORDS)
    bounds = [(start, min(start + step, length)) for start in range(0, length, step)]
    with ThreadPoolExecutor(max_workers=len(bounds)) as pool:
        for future in [pool.submit(_apply_range, acc, streams, addends, chunk_words, begin=a, end=b) for a, b in bounds]:
            future.result()


def _apply_range(
    acc: np.ndarray, streams: Sequence[tuple[bytes, int]], addends: Sequence[np.ndarray], chunk_words: int, *, begin: int, end: int
) -> None:
    zeros = bytes(4 * chunk_words)
    # CTR's update_into wants room for one extra block minus a byte.
    buf = bytearray(4 * chunk_words + 15)
    adders = [(np.add if sign > 0 else np.subtract) for _, sign in streams]
    encryptors: list[CipherContext] = []
    start = begin
    while start < end:
        if start == begin or start % SEGMENT_WORDS == 0:
            encryptors = [_encryptor(key, start) for key, _ in streams]
        # A step never crosses a segment boundary, where the counter blocks jump to the next nonce.
        stop = min(start + chunk_words, end, (start // SEGMENT_WORDS + 1) * SEGMENT_WORDS)
        count = stop - start
        data = zeros if count == chunk_words else zeros[: 4 * count]
        words = np.frombuffer(buf, dtype=WORD, count=count)
        target = acc[start:stop]
        for vector in addends:
            np.add(target, vector[start:stop], out=target)
        for encryptor, add in zip(encryptors, adders, strict=True):
            encryptor.update_into(data, buf)
            add(target, words, out=target)
        start = stop


def uniform_floats(key: bytes, length: int) -> np.ndarray:
    """Keystream-derived uniforms in [0, 1) with 32-bit resolution (for stochastic rounding).

    Args:
        key: an AES-256 key from :func:`mask_key`.
        length: number of values.

    Returns:
        ``float64`` array of ``length`` values in [0, 1).
    """
    return expand(key, length).astype(np.float64) * (1.0 / 4294967296.0)
