"""Fuzzing every CKKS decoder: the server's update parser, the key holder's aggregate input, the average message.

Inputs are random bytes, valid messages with flipped / truncated / spliced bytes, and structured
mutations of the TenSEAL proto and SEAL ciphertext fields. Anything not accepted must raise a typed
:class:`~privfl.errors.PrivflError`; nothing may crash (a SIGSEGV would end this process), and
TenSEAL must never be handed bytes that privfl did not build. Bounded: a few hundred examples each.
The long campaign (20,000 inputs per decoder) is ``test_ckks_fuzz_campaign.py`` (marked slow).
"""

from __future__ import annotations

import struct
from dataclasses import replace
from functools import lru_cache

import numpy as np
import pytest
import tenseal as ts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privfl.config import CkksConfig
from privfl.errors import DecryptionError, MessageError, PrivflError
from privfl.protocols.base import SERVER, ClientUpdate
from privfl.protocols.ckks import CkksClient, CkksKeyHolder, CkksServer, SiteIdentity, _update_body
from privfl.protocols.ckks_wire import RawCiphertext, encode_ciphertext, encode_proto, parse_vector
from privfl.protocols.oneshot import KIND_AGGREGATE, KIND_AVERAGE, KIND_UPDATE, decode_average, encode_average
from privfl.protocols.wire import decode_frame, encode_frame

DIM = 20
SITES = ("alice", "bob")


class World:
    """One key holder, two registered sites, their valid messages for rounds 0..3, and a server."""

    def __init__(self) -> None:
        self.config = CkksConfig()
        self.holder = CkksKeyHolder(self.config)
        self.client = CkksClient(self.holder.public_context(), self.config, run_id=self.holder.run_id)
        self.identities = {s: SiteIdentity.generate(s) for s in SITES}
        for s, identity in self.identities.items():
            self.holder.register_site(s, identity.public_bytes())
        self.server = CkksServer(self.holder.public_context(), self.config, DIM, run_id=self.holder.run_id, sites=self.holder.sites())
        self.layout = self.holder.layout
        rng = np.random.default_rng(1)
        self.updates = {s: ClientUpdate(delta=rng.normal(0, 0.05, DIM).astype(np.float32), weight=5.0) for s in SITES}
        self.messages = {
            (r, s): self.client.encrypt(r, s, self.updates[s], 2, identity=self.identities[s]) for r in range(4) for s in SITES
        }
        self.vector = decode_frame(self.messages[(0, "alice")], kind=KIND_UPDATE, round_index=0).parts[1]
        self.raw = RawCiphertext.of(parse_vector(self.vector, self.layout, DIM + 1), self.layout)
        self.aggregates = {r: encode_frame(KIND_AGGREGATE, r, SERVER, [self.messages[(r, s)] for s in SITES]) for r in range(4)}
        self.average = encode_average(0, np.linspace(-1, 1, DIM), 10.0)

    def signed(self, round_index: int, site: str, parts: list[bytes]) -> bytes:
        body = _update_body(round_index, site, parts)
        signature = self.identities[site].sign(self.holder.run_id, round_index, body)
        return encode_frame(KIND_UPDATE, round_index, site, [signature, *parts])


@lru_cache(maxsize=1)
def world() -> World:
    return World()


# -- mutations (shared with the campaign) -------------------------------------------------------------------


def flip(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, mask in edits:
        if out:
            out[position % len(out)] ^= mask or 1
    return bytes(out)


def truncate(data: bytes, keep: int) -> bytes:
    return data[: keep % (len(data) + 1)]


def splice(data: bytes, start: int, length: int, insert: bytes) -> bytes:
    start = start % (len(data) + 1)
    return data[:start] + insert + data[start + length :]


_U64_EDGES = [0, 1, 2, 3, 4095, 4096, 4097, 8192, 16384, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1]
_FLOAT_EDGES = [0.0, -0.0, 1.0, 2.0**31, 2.0**32, 2.0**33, float("nan"), float("inf"), -float("inf"), 5e-324, 1.7976931348623157e308]

_SIZES = [0, 1, DIM, DIM + 1, DIM + 2, 4096, 4097, 4096 + 300, 2**32 - 1]

_FIELDS = {
    "parms_id": st.tuples(*[st.sampled_from(_U64_EDGES)] * 4),
    "is_ntt_form": st.integers(0, 255),
    "size": st.sampled_from(_U64_EDGES),
    "poly_modulus_degree": st.sampled_from(_U64_EDGES),
    "coeff_modulus_size": st.sampled_from(_U64_EDGES),
    "scale": st.sampled_from(_FLOAT_EDGES),
    "correction_factor": st.sampled_from(_U64_EDGES),
    "seal_version": st.tuples(st.integers(0, 255), st.integers(0, 255)),
    "array_count": st.sampled_from(_U64_EDGES),
}


def as_zlib(blob: bytes) -> bytes:
    """The same SEAL ciphertext with a zlib-compressed body (compression mode 1)."""
    import zlib

    body = zlib.compress(blob[16:], 1)
    header = bytearray(blob[:16])
    header[5] = 1
    header[8:16] = struct.pack("<Q", 16 + len(body))
    return bytes(header) + body


def _raw_is_valid(raw: RawCiphertext) -> bool:
    """Independent oracle: every field equal to the honest one, full length, all coefficients below q0."""
    w = world()
    same = all(
        np.array_equal(getattr(raw, name), getattr(w.raw, name)) if name == "coefficients" else getattr(raw, name) == getattr(w.raw, name)
        for name in _FIELDS
        if name not in ("scale", "array_count")
    )
    scale_ok = struct.pack("<d", raw.scale) == struct.pack("<d", w.raw.scale)
    words = np.asarray(raw.coefficients)
    count_ok = raw.array_count in (None, w.raw.coefficients.size)  # None: the true length is written
    return bool(same and scale_ok and count_ok and words.size == w.raw.coefficients.size and int(words.max()) < w.layout.modulus)


@st.composite
def structured(draw) -> tuple[bytes, bool]:
    """A TenSEAL proto whose fields (and whose SEAL ciphertext's fields) are drawn, and whether it is valid."""
    w = world()
    raw = w.raw
    for name in draw(st.lists(st.sampled_from(sorted(_FIELDS)), max_size=3, unique=True)):
        raw = replace(raw, **{name: draw(_FIELDS[name])})
    mutation = draw(st.sampled_from(["none", "value", "truncate"]))
    if mutation != "none":
        words = raw.coefficients.copy()
        if mutation == "truncate":
            words = words[: draw(st.integers(0, words.size - 1))]
        if words.size and draw(st.booleans()):
            position = draw(st.integers(0, words.size - 1))
            words[position] = draw(st.sampled_from([*_U64_EDGES, w.layout.modulus - 1, w.layout.modulus, w.layout.modulus + 1]))
        raw = replace(raw, coefficients=words)
    crafted = encode_ciphertext(raw)
    if draw(st.booleans()):
        crafted = as_zlib(crafted)
    crafted_ok = _raw_is_valid(raw)
    if draw(st.booleans()):
        # the canonical proto around a (possibly mutated) ciphertext: exercises every SEAL field
        # check, and the one declared size and the proto's scale on their own
        size = draw(st.sampled_from([DIM + 1] * 4 + _SIZES))
        scale = draw(st.sampled_from([2.0**32] * 4 + _FLOAT_EDGES))
        return encode_proto([size], [crafted], scale), crafted_ok and size == DIM + 1 and scale == 2.0**32
    choices = [(crafted, crafted_ok), (w.vector[7:-9], True), (b"", False), (draw(st.binary(max_size=64)), False)]
    picked = draw(st.lists(st.sampled_from(choices), max_size=3))
    sizes = draw(st.lists(st.sampled_from(_SIZES), max_size=3))
    scale = draw(st.sampled_from([None, *_FLOAT_EDGES]))
    valid = sizes == [DIM + 1] and len(picked) == 1 and picked[0][1] and scale is not None and struct.pack("<d", scale) == struct.pack("<d", 2.0**32)
    return encode_proto(sizes, [blob for blob, _ in picked], scale), valid


def _describe(vector: bytes) -> str:
    """A short account of a vector's fields, for a failing example."""
    from privfl.protocols.ckks_wire import _parse_proto

    try:
        proto = _parse_proto(vector)
    except MessageError as exc:
        return f"<{len(vector)} bytes, proto: {exc.reason}>"
    blob = proto.ciphertext
    return f"<size={proto.size} scale={proto.scale!r} blob={len(blob)} bytes header={blob[:16].hex()} body0={blob[16:120].hex()}>"


def structured_vector():
    """Strategy: the bytes of :func:`structured`."""
    return structured().map(lambda item: item[0])


def mutated(valid: bytes):
    """Strategy: ``valid`` with flipped, truncated or spliced bytes (or random bytes)."""
    edits = st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=8)
    return st.one_of(
        st.builds(flip, st.just(valid), edits),
        st.builds(truncate, st.just(valid), st.integers(0, 2**31)),
        st.builds(splice, st.just(valid), st.integers(0, 2**31), st.integers(0, 4096), st.binary(max_size=64)),
        st.binary(max_size=512),
    )


_SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)


# -- 1: the server's update parser ------------------------------------------------------------------------


def _server_parse(data: bytes) -> None:
    try:
        world().server._parse(0, "alice", data)
    except MessageError:
        pass


@_SETTINGS
@given(data=st.data())
def test_server_update_parser_never_crashes(data):
    w = world()
    _server_parse(data.draw(mutated(w.messages[(0, "alice")])))


@_SETTINGS
@given(item=structured())
def test_server_update_parser_structured(item):
    vector, valid = item
    w = world()
    # unsigned: structure errors must be typed; signed by alice: exactly the valid vectors pass
    _server_parse(encode_frame(KIND_UPDATE, 0, "alice", [bytes(64), vector]))
    try:
        w.server._parse(0, "alice", w.signed(0, "alice", [vector]))
    except MessageError as exc:
        assert not valid, exc.reason
    else:
        assert valid, _describe(vector)


@_SETTINGS
@given(item=structured())
def test_vector_parser_structured(item):
    vector, valid = item
    w = world()
    try:
        out = parse_vector(vector, w.layout, DIM + 1)
    except MessageError as exc:
        assert not valid, exc.reason
        return
    assert valid
    assert out.dtype == np.uint64 and out.shape == (2, w.layout.poly_modulus_degree)
    assert np.array_equal(out.reshape(-1), w.raw.coefficients) or int(out.max()) < w.layout.modulus


# -- 2: the key holder's aggregate input ------------------------------------------------------------------


@pytest.fixture
def guarded_tenseal(monkeypatch):
    """Fails if privfl hands TenSEAL anything but a canonical uncompressed vector it built."""
    real = ts.ckks_vector_from

    def guard(context, data):
        data = bytes(data)
        assert data[:2] == b"\x0a\x01" and data[-9] == 0x19
        parse_vector(data, world().layout, data[2])  # passes every check
        assert data[3 + 4 + 5] == 0  # compression mode none (after tag, 3-byte varint length, magic, size, version)
        return real(context, data)

    monkeypatch.setattr(ts, "ckks_vector_from", guard)


def _decrypt(round_index: int, data: bytes) -> None:
    holder = world().holder
    try:
        released = holder.decrypt_sum(round_index, data, DIM)
    except DecryptionError:
        return
    # Accepted: must be a real sum of both registered sites; forget the round so the next example may try again.
    assert set(released.contributors) == set(SITES) and np.all(np.isfinite(released.weighted_sum))
    holder._decrypted_rounds.clear()


@_SETTINGS
@given(data=st.data())
def test_key_holder_aggregate_never_crashes(guarded_tenseal, data):
    w = world()
    round_index = data.draw(st.integers(0, 3))
    _decrypt(round_index, data.draw(mutated(w.aggregates[round_index])))


@_SETTINGS
@given(data=st.data())
def test_key_holder_spliced_contributions(guarded_tenseal, data):
    w = world()
    round_index = data.draw(st.integers(0, 3))
    pool = [*w.messages.values(), w.signed(round_index, "bob", [data.draw(structured_vector())])]
    parts = data.draw(st.lists(st.sampled_from(pool), max_size=4))
    if data.draw(st.booleans()):
        parts = [data.draw(mutated(p)) if data.draw(st.booleans()) else p for p in parts]
    _decrypt(round_index, encode_frame(KIND_AGGREGATE, round_index, SERVER, parts))


# -- 9a: the average message ------------------------------------------------------------------------------


@_SETTINGS
@given(data=st.data())
def test_average_decoder_never_crashes(data):
    w = world()
    message = data.draw(
        st.one_of(
            mutated(w.average),
            st.builds(
                lambda weight, values: encode_frame(KIND_AVERAGE, 0, SERVER, [struct.pack(">d", weight), np.asarray(values, "<f8").tobytes()]),
                st.floats(allow_nan=True, allow_infinity=True),
                st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=DIM, max_size=DIM),
            ),
        )
    )
    try:
        average, weight = decode_average(0, message, DIM)
    except PrivflError:
        return
    assert average.shape == (DIM,) and np.all(np.isfinite(average)) and np.isfinite(weight) and weight > 0
