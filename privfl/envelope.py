"""The messages between the Aggregator and a Site: a small JSON header and binary parts, strictly parsed.

Every request names the run, the round, the step and the site it is for; every reply repeats them.
Either side checks each field before it looks at a binary part, so a message from another run,
another round, for another site, of an unknown step or simply garbage is a :class:`MessageError`
(the site answers it with a refusal, the aggregator drops that site from the round); nothing a peer
sends can crash the other side.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from privfl.errors import MessageError
from privfl.protocols.wire import decode_frame, encode_frame

__all__ = ["AGGREGATOR", "Reply", "Request", "Status", "Step", "decode_reply", "decode_request", "encode_reply", "encode_request"]

_KIND_REQUEST = 60
_KIND_REPLY = 61
_MAX_HEADER_BYTES = 1 << 20
_MAX_MESSAGE_BYTES = 1 << 34
_VERSION = 1
AGGREGATOR = "aggregator"
"""The name the aggregator goes by as a sender."""


class Step(str, Enum):
    """What a request asks of a site."""

    HELLO = "hello"
    """Start of a run: the run config; the site answers with its name, role, identity key and spent epsilon
    (the CKKS key holder also with the run's public context, its run id and its signature over both, the
    run and the run config)."""
    TRAIN = "train"
    """The global model (and, until the site has it, the CKKS public context with the key holder's
    signature, which the site checks); the site trains (or refuses, for its budget) and answers with the
    protocol's first message."""
    SECAGG_KEYS = "secagg-keys"
    SECAGG_RELAY = "secagg-relay"
    SECAGG_CHECK = "secagg-check"
    SECAGG_UNMASK = "secagg-unmask"
    CKKS_DECRYPT = "ckks-decrypt"
    """To the key holder: the checked, signed ciphertexts of a round and the contributors' identity keys
    (under client-level DP also the clip norm and the site count); it answers with the decrypted sum
    (noised, with the S it was noised for and the next round's S)."""
    SHARED_KEY_DECRYPT = "shared-key-decrypt"
    """Shared-key mode, to one contributing site: the summed ciphertext, the signed seeds and the
    contributors' identity keys; it checks them, decrypts and answers with the round's average."""


class Status(str, Enum):
    """How a site answered."""

    OK = "ok"
    SKIPPED = "skipped"
    """Its own ledger says the round would exceed its budget: it did not touch its data."""
    REFUSED = "refused"
    """The request was malformed, stale, out of order or unsafe; the reason says which."""


@dataclass(frozen=True, slots=True)
class Request:
    """Aggregator -> site."""

    run: str
    step: Step
    round_index: int
    site: str
    fields: dict[str, Any] = field(default_factory=dict)
    parts: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Reply:
    """Site -> aggregator."""

    run: str
    step: Step
    round_index: int
    site: str
    status: Status
    fields: dict[str, Any] = field(default_factory=dict)
    parts: tuple[bytes, ...] = ()

    @property
    def reason(self) -> str:
        return str(self.fields.get("reason", ""))


def _header(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _parse_header(raw: bytes, sender: str | None) -> dict[str, Any]:
    if len(raw) > _MAX_HEADER_BYTES:
        raise MessageError("header too large", sender=sender)
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MessageError(f"header is not JSON: {exc}", sender=sender) from None
    if not isinstance(data, dict) or data.get("v") != _VERSION:
        raise MessageError("header is not a privfl v1 header", sender=sender)
    for key in ("run", "step", "site"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise MessageError(f"header field {key!r} missing or not a string", sender=sender)
    try:
        data["step"] = Step(data["step"])
    except ValueError:
        raise MessageError(f"unknown step {data['step']!r}", sender=sender) from None
    if not isinstance(data.get("fields", {}), dict):
        raise MessageError("header field 'fields' is not an object", sender=sender)
    return data


def encode_request(request: Request) -> bytes:
    head = {"v": _VERSION, "run": request.run, "step": request.step.value, "site": request.site, "fields": request.fields}
    return encode_frame(_KIND_REQUEST, request.round_index, AGGREGATOR, [_header(head), *request.parts])


def decode_request(data: bytes, *, max_parts: int = 16) -> Request:
    """Parses a request (the site then checks run, round, step and site against its own state).

    Raises:
        MessageError: not a well-formed privfl request.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError("request is not bytes", sender=AGGREGATOR)
    frame = decode_frame(bytes(data), kind=_KIND_REQUEST, round_index=None, sender=AGGREGATOR, max_bytes=_MAX_MESSAGE_BYTES, max_parts=max_parts)
    if not frame.parts:
        raise MessageError("request has no header", sender=AGGREGATOR)
    head = _parse_header(frame.parts[0], AGGREGATOR)
    return Request(head["run"], head["step"], frame.round_index, head["site"], head.get("fields", {}), tuple(frame.parts[1:]))


def encode_reply(reply: Reply) -> bytes:
    fields = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in reply.fields.items()}
    head = {"v": _VERSION, "run": reply.run, "step": reply.step.value, "site": reply.site, "status": reply.status.value, "fields": fields}
    return encode_frame(_KIND_REPLY, reply.round_index, reply.site, [_header(head), *reply.parts])


def decode_reply(data: bytes, *, run: str, step: Step, round_index: int, site: str, max_parts: int = 16) -> Reply:
    """Parses a site's reply and checks it answers this very request.

    Raises:
        MessageError: malformed, or for another run, round, step or site.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError("reply is not bytes", sender=site)
    frame = decode_frame(bytes(data), kind=_KIND_REPLY, round_index=round_index, sender=site, max_bytes=_MAX_MESSAGE_BYTES, max_parts=max_parts)
    if not frame.parts:
        raise MessageError("reply has no header", sender=site)
    head = _parse_header(frame.parts[0], site)
    if head["run"] != run:
        raise MessageError("reply belongs to another run", sender=site)
    if head["step"] is not step:
        raise MessageError(f"reply to step {head['step'].value!r}, expected {step.value!r}", sender=site)
    if head["site"] != site:
        raise MessageError(f"reply signed for site {head['site']!r}", sender=site)
    try:
        status = Status(head.get("status"))
    except ValueError:
        raise MessageError(f"unknown status {head.get('status')!r}", sender=site) from None
    return Reply(run, step, round_index, site, status, head.get("fields", {}), tuple(frame.parts[1:]))
