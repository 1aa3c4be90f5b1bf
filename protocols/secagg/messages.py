"""Message kinds, id-list and bitmap packing and the authenticated client/server envelope (frame || GMAC tag).

Each client shares a channel secret with the server (X25519 of the client's c key and the server's
key); every message gets a one-time AES-GMAC key derived from it per step and direction, so an altered,
misrouted or replayed message fails authentication. This guards integrity only; confidentiality of the
shares comes from the client-to-client AES-GCM layer, which the server cannot open.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

import numpy as np

from privfl.errors import MessageError
from privfl.protocols.secagg.keys import TAG_BYTES, hkdf, tag, verify_tag
from privfl.protocols.wire import Frame, decode_frame, encode_frame

__all__ = [
    "ADVERTISE",
    "CHECK",
    "CHECK_REQUEST",
    "KEYS",
    "MASKED_INPUT",
    "RELAY",
    "SHARES",
    "STEP_NAMES",
    "UNMASK",
    "UNMASK_REQUEST",
    "add_vector",
    "channel_key",
    "is_member",
    "member_positions",
    "open_message",
    "open_vector",
    "pack_ids",
    "pack_members",
    "seal_message",
    "seal_vector",
    "unpack_ids",
    "unpack_members",
    "vector_prefix",
]

ADVERTISE, KEYS, SHARES, RELAY, MASKED_INPUT, UNMASK_REQUEST, UNMASK = 1, 2, 3, 4, 5, 6, 7
# Authenticated mode only: the consistency check between masked input and unmask (kind 8 is the aggregate).
CHECK_REQUEST, CHECK = 9, 10
STEP_NAMES = {
    ADVERTISE: "advertise",
    KEYS: "advertise_keys",
    SHARES: "share",
    RELAY: "share_relay",
    MASKED_INPUT: "masked_input",
    UNMASK_REQUEST: "unmask_request",
    UNMASK: "unmask",
    CHECK_REQUEST: "consistency_request",
    CHECK: "consistency",
}
UP, DOWN = b"client->server", b"server->client"

_LEN = struct.Struct(">H")


def pack_ids(ids: Iterable[str]) -> bytes:
    """Length-prefixed UTF-8 ids in sorted order."""
    out = []
    for u in sorted(ids):
        raw = u.encode("utf-8")
        out.append(_LEN.pack(len(raw)))
        out.append(raw)
    return b"".join(out)


def unpack_ids(data: bytes, *, sender: str | None = None) -> list[str]:
    """Inverse of :func:`pack_ids`.

    Raises:
        MessageError: truncated, not UTF-8, or duplicated ids.
    """
    ids, offset = [], 0
    while offset < len(data):
        if offset + _LEN.size > len(data):
            raise MessageError("truncated id list", sender=sender)
        (length,) = _LEN.unpack_from(data, offset)
        offset += _LEN.size
        if offset + length > len(data):
            raise MessageError("truncated id list", sender=sender)
        try:
            ids.append(data[offset : offset + length].decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise MessageError("id is not UTF-8", sender=sender) from exc
        offset += length
    if len(set(ids)) != len(ids):
        raise MessageError("duplicate id in list", sender=sender)
    return ids


def pack_members(positions: Iterable[int], size: int) -> bytes:
    """A set of positions in [0, size) as a bitmap: ceil(size / 8) bytes, position p in bit p % 8 of byte p // 8.

    The survivor set travels this way (positions on the graph's cycle: ``RoundParams.ring``), so that a
    client tests a neighbour in O(1) and the whole set costs n bits, not a list of ids to parse.

    Raises:
        ValueError: a position outside [0, size).
    """
    out = bytearray((size + 7) // 8)
    for p in positions:
        if not 0 <= p < size:
            raise ValueError(f"position {p} outside [0, {size})")
        out[p >> 3] |= 1 << (p & 7)
    return bytes(out)


def unpack_members(data: bytes, size: int, *, sender: str | None = None) -> bytes:
    """Checks that ``data`` is a bitmap of :func:`pack_members` for ``size`` positions (so it has one encoding).

    Returns:
        ``data`` as bytes.

    Raises:
        MessageError: the wrong length, or a bit set at or beyond ``size``.
    """
    data = bytes(data)
    if len(data) != (size + 7) // 8:
        raise MessageError(f"bitmap of {len(data)} bytes for {size} positions (expected {(size + 7) // 8})", sender=sender)
    if size % 8 and data[-1] >> (size % 8):
        raise MessageError("bitmap sets a position beyond the roster", sender=sender)
    return data


def is_member(bitmap: bytes, position: int) -> bool:
    """Whether ``position`` is set in a bitmap of :func:`pack_members`."""
    return bool(bitmap[position >> 3] >> (position & 7) & 1)


def member_positions(bitmap: bytes, size: int) -> list[int]:
    """Every position set in a bitmap of :func:`pack_members`, ascending."""
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")[:size]
    return [int(p) for p in np.flatnonzero(bits)]


def channel_key(channel_secret: bytes, round_index: int, client_id: str, kind: int, direction: bytes) -> bytes:
    """One-time GMAC key for the message of ``kind`` between ``client_id`` and the server."""
    return hkdf(channel_secret, b"channel", round_index, client_id, kind, direction)


def seal_message(key: bytes, kind: int, round_index: int, sender: str, parts: list[bytes]) -> bytes:
    """Frames ``parts`` and appends the GMAC tag."""
    frame = encode_frame(kind, round_index, sender, parts)
    return frame + tag(key, frame)


def open_message(
    payload: bytes,
    *,
    kind: int,
    round_index: int,
    sender: str,
    max_bytes: int,
    key: bytes | None,
    max_parts: int = 1 << 20,
) -> tuple[Frame, bytes, bytes]:
    """Parses a sealed message; verifies its tag when ``key`` is given.

    Returns:
        (frame, frame bytes, tag) so a caller that learns the key from the frame can verify afterwards.

    Raises:
        MessageError: truncated, oversized, malformed, wrong kind/round/sender, or failed authentication.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise MessageError(f"expected bytes, got {type(payload).__name__}", sender=sender)
    if len(payload) > max_bytes + TAG_BYTES:
        raise MessageError(f"oversized message: {len(payload)} bytes > limit {max_bytes + TAG_BYTES}", sender=sender)
    if len(payload) < TAG_BYTES:
        raise MessageError(f"truncated message: {len(payload)} bytes", sender=sender)
    payload = bytes(payload)
    body, got_tag = payload[:-TAG_BYTES], payload[-TAG_BYTES:]
    frame = decode_frame(body, kind=kind, round_index=round_index, sender=sender, max_bytes=max_bytes, max_parts=max_parts)
    if key is not None:
        verify_tag(key, body, got_tag, sender=sender)
    return frame, body, got_tag


_WORD = np.dtype("<u4")
_ALIGN = 16


def _padding(kind: int, round_index: int, sender: str) -> int:
    # Frame of a vector message: header, sender, part count, [len, padding], [len, words]. The zero
    # padding puts the words on a 16-byte boundary of the message: numpy adds misaligned uint32 views
    # about five times slower than aligned ones, and the server adds every masked vector it receives.
    return -len(encode_frame(kind, round_index, sender, [b"", b""])) % _ALIGN


def vector_prefix(kind: int, round_index: int, sender: str, nbytes: int) -> bytes:
    """The exact frame header :func:`encode_frame` writes for a vector message of ``nbytes`` (padding part, then the words)."""
    empty = encode_frame(kind, round_index, sender, [bytes(_padding(kind, round_index, sender)), b""])
    return empty[:-8] + struct.pack(">Q", nbytes)


def seal_vector(
    key: bytes, kind: int, round_index: int, sender: str, *, length: int, fill: Callable[[np.ndarray], None]
) -> bytes:
    """Builds a sealed vector message of ``length`` uint32 words, written in place by ``fill``.

    The words are produced straight into the outgoing buffer: a multi-megabyte vector is not copied
    through ``tobytes`` and ``encode_frame``. They start 16-byte aligned within the message.
    """
    prefix = vector_prefix(kind, round_index, sender, 4 * length)
    buf = bytearray(len(prefix) + 4 * length + TAG_BYTES)
    buf[: len(prefix)] = prefix
    fill(np.frombuffer(buf, dtype=_WORD, count=length, offset=len(prefix)))
    view = memoryview(buf)
    buf[-TAG_BYTES:] = tag(key, view[:-TAG_BYTES])
    view.release()
    return bytes(buf)


def open_vector(payload: bytes, *, kind: int, round_index: int, sender: str, length: int, key: bytes | None) -> np.ndarray:
    """Authenticates a vector message and views its words without copying.

    ``key=None`` parses without authenticating (see :func:`add_vector`).

    Returns:
        A read-only ``uint32`` view of ``length`` words.

    Raises:
        MessageError: malformed, truncated, oversized, wrong kind/round/sender/length, or failed authentication.
    """
    prefix = vector_prefix(kind, round_index, sender, 4 * length)
    if isinstance(payload, bytes) and len(payload) == len(prefix) + 4 * length + TAG_BYTES and payload.startswith(prefix):
        if key is not None:
            verify_tag(key, memoryview(payload)[:-TAG_BYTES], payload[-TAG_BYTES:], sender=sender)
        return np.frombuffer(payload, dtype=_WORD, count=length, offset=len(prefix))
    # Not the exact expected layout: the general parser says precisely what is wrong (or accepts it).
    frame, _, _ = open_message(payload, kind=kind, round_index=round_index, sender=sender, max_bytes=4 * length + 1024, key=key)
    if len(frame.parts) != 2 or frame.parts[0] != bytes(_padding(kind, round_index, sender)) or len(frame.parts[1]) != 4 * length:
        raise MessageError(f"masked vector must be {4 * length} bytes after its padding", sender=sender)
    return np.frombuffer(frame.parts[1], dtype=_WORD)


def add_vector(
    acc: np.ndarray, payload: bytes, *, kind: int, round_index: int, sender: str, length: int, key: bytes | None
) -> bytes:
    """Authenticates a vector message (unless ``key`` is None) and adds its words into ``acc`` (mod 2^32).

    The words are added only once the tag has verified, so a rejected message leaves ``acc`` unchanged.
    (Fusing the GMAC with the add, slice by slice, was measured slower on the server's path: there the
    words are still in cache from the transport, and one-shot GMAC runs at about 24 GB/s.)

    Args:
        acc: 1-D ``uint32`` running sum of ``length`` words, modified in place.
        key: the one-time GMAC key; None skips authentication (only where the transport itself
            authenticates the sender to this party and protects the bytes; see docs/secagg.md).

    Returns:
        The message's 16-byte tag (verified unless ``key`` is None).

    Raises:
        MessageError: malformed, truncated, oversized, wrong kind/round/sender/length, or failed
            authentication.
    """
    words = open_vector(payload, kind=kind, round_index=round_index, sender=sender, length=length, key=key)
    np.add(acc, words, out=acc)
    return bytes(payload[-TAG_BYTES:])
