"""Message kinds, id-list packing and the authenticated client/server envelope (frame || Poly1305 tag).

Each client shares a channel secret with the server (X25519 of the client's c key and the server's
key); every message gets a one-time Poly1305 key derived from it per step and direction, so an altered,
misrouted or replayed message fails authentication. This guards integrity only; confidentiality of the
shares comes from the client-to-client AES-GCM layer, which the server cannot open.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from privfl.errors import MessageError
from privfl.protocols.secagg.keys import TAG_BYTES, hkdf, tag, verify_tag
from privfl.protocols.wire import Frame, decode_frame, encode_frame

__all__ = [
    "ADVERTISE",
    "KEYS",
    "SHARES",
    "RELAY",
    "MASKED_INPUT",
    "UNMASK_REQUEST",
    "UNMASK",
    "STEP_NAMES",
    "pack_ids",
    "unpack_ids",
    "channel_key",
    "seal_message",
    "open_message",
]

ADVERTISE, KEYS, SHARES, RELAY, MASKED_INPUT, UNMASK_REQUEST, UNMASK = 1, 2, 3, 4, 5, 6, 7
STEP_NAMES = {
    ADVERTISE: "advertise",
    KEYS: "advertise_keys",
    SHARES: "share",
    RELAY: "share_relay",
    MASKED_INPUT: "masked_input",
    UNMASK_REQUEST: "unmask_request",
    UNMASK: "unmask",
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


def channel_key(channel_secret: bytes, round_index: int, client_id: str, kind: int, direction: bytes) -> bytes:
    """One-time Poly1305 key for the message of ``kind`` between ``client_id`` and the server."""
    return hkdf(channel_secret, b"channel", round_index, client_id, kind, direction)


def seal_message(key: bytes, kind: int, round_index: int, sender: str, parts: list[bytes]) -> bytes:
    """Frames ``parts`` and appends the Poly1305 tag."""
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
