"""A small, strict framing for protocol messages: magic, kind, round, sender and length-prefixed parts.

Every parse is bounded: a truncated, oversized, trailing-garbage, wrong-kind or wrong-round message
raises :class:`~privfl.errors.MessageError` before any payload is interpreted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from privfl.errors import MessageError, ProtocolError

__all__ = ["MAX_MESSAGE_BYTES", "Frame", "decode_frame", "encode_frame"]

_MAGIC = b"PFL1"
_HEADER = struct.Struct(">4sBIH")  # magic, kind, round, sender length
_PART_COUNT = struct.Struct(">I")
_PART_LEN = struct.Struct(">Q")
MAX_MESSAGE_BYTES = 1 << 34
"""Default upper bound on one message (16 GiB); protocols pass a tighter, size-derived bound."""


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded message."""

    kind: int
    round_index: int
    sender: str
    parts: tuple[bytes, ...]


def encode_frame(kind: int, round_index: int, sender: str, parts: list[bytes] | tuple[bytes, ...]) -> bytes:
    """Serializes a message.

    Args:
        kind: message type, 0..255.
        round_index: the federation round the message belongs to.
        sender: the sender's id (UTF-8, < 64 KiB).
        parts: payload blobs.

    Returns:
        The framed bytes.
    """
    sender_bytes = sender.encode("utf-8")
    if not 0 <= kind < 256 or not 0 <= round_index < 2**32 or len(sender_bytes) >= 2**16:
        raise ProtocolError(f"cannot frame kind={kind}, round={round_index}, sender of {len(sender_bytes)} bytes")
    chunks = [_HEADER.pack(_MAGIC, kind, round_index, len(sender_bytes)), sender_bytes, _PART_COUNT.pack(len(parts))]
    for part in parts:
        chunks.append(_PART_LEN.pack(len(part)))
        chunks.append(bytes(part))
    return b"".join(chunks)


def decode_frame(
    data: bytes,
    *,
    kind: int,
    round_index: int | None,
    sender: str | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
    max_parts: int = 1 << 20,
) -> Frame:
    """Parses and checks a message.

    Args:
        data: the received bytes.
        kind: the message type expected at this step.
        round_index: the round expected (None: any round; the caller checks it against its state).
        sender: if given, the sender id the transport says it came from; must match the frame's.
        max_bytes: reject anything longer.
        max_parts: reject a frame that claims more parts.

    Returns:
        The frame.

    Raises:
        MessageError: the message is malformed, truncated, oversized, of the wrong kind or round,
            or claims another sender.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"expected bytes, got {type(data).__name__}", sender=sender)
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_bytes:
        # Refused before anything is copied.
        raise MessageError(f"oversized message: {size} bytes > limit {max_bytes}", sender=sender)
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise MessageError(f"truncated message: {len(data)} bytes", sender=sender)
    magic, got_kind, got_round, sender_len = _HEADER.unpack_from(data, 0)
    if magic != _MAGIC:
        raise MessageError("not a privfl message (bad magic)", sender=sender)
    if got_kind != kind:
        raise MessageError(f"wrong message kind {got_kind}, expected {kind}", sender=sender)
    if round_index is not None and got_round != round_index:
        raise MessageError(f"message for round {got_round}, expected round {round_index}", sender=sender)
    offset = _HEADER.size
    if offset + sender_len + _PART_COUNT.size > len(data):
        raise MessageError("truncated message header", sender=sender)
    try:
        got_sender = data[offset : offset + sender_len].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MessageError("sender id is not UTF-8", sender=sender) from exc
    if sender is not None and got_sender != sender:
        raise MessageError(f"message claims sender {got_sender!r}", sender=sender)
    offset += sender_len
    (count,) = _PART_COUNT.unpack_from(data, offset)
    offset += _PART_COUNT.size
    if count > max_parts:
        raise MessageError(f"message claims {count} parts > limit {max_parts}", sender=sender)
    parts = []
    for _ in range(count):
        if offset + _PART_LEN.size > len(data):
            raise MessageError("truncated message (part length)", sender=sender)
        (length,) = _PART_LEN.unpack_from(data, offset)
        offset += _PART_LEN.size
        if offset + length > len(data):
            raise MessageError("truncated message (part body)", sender=sender)
        parts.append(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise MessageError(f"{len(data) - offset} trailing bytes after the message", sender=sender)
    return Frame(kind=got_kind, round_index=got_round, sender=got_sender, parts=tuple(parts))
