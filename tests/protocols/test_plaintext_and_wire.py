"""The plaintext baseline and the strict message framing."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privfl.errors import ConfigError, MessageError
from privfl.protocols.base import ClientUpdate, DirectTransport
from privfl.protocols.plaintext import PlaintextProtection, PlaintextServer
from privfl.protocols.wire import decode_frame, encode_frame


def test_plaintext_weighted_average_and_bytes():
    updates = {
        "a": ClientUpdate(delta=np.array([1.0, 2.0], np.float32), weight=1.0),
        "b": ClientUpdate(delta=np.array([3.0, 6.0], np.float32), weight=3.0),
    }
    result = PlaintextProtection().run_round(0, updates, DirectTransport())
    np.testing.assert_allclose(result.average, [2.5, 5.0])
    assert result.total_weight == 4.0
    assert 8 <= result.upload_bytes["a"] - 8 <= 8 + 64  # 2 float32 + weight + small header


def test_plaintext_server_rejects_wrong_shape_and_nan():
    server = PlaintextServer(3)
    good = encode_frame(1, 0, "a", [struct.pack(">d", 1.0), np.ones(3, "<f4").tobytes()])
    short = encode_frame(1, 0, "b", [struct.pack(">d", 1.0), np.ones(2, "<f4").tobytes()])
    nan = encode_frame(1, 0, "c", [struct.pack(">d", 1.0), np.full(3, np.nan, "<f4").tobytes()])
    out = server.aggregate(0, {"a": good, "b": short, "c": nan})
    assert out.accepted == ("a",)
    assert "expected 3" in out.rejected["b"] and "non-finite" in out.rejected["c"]


def test_client_update_validation():
    with pytest.raises(ConfigError):
        ClientUpdate(delta=np.zeros((2, 2)), weight=1.0)
    with pytest.raises(ConfigError):
        ClientUpdate(delta=np.zeros(2), weight=0.0)
    with pytest.raises(ConfigError):
        ClientUpdate(delta=np.array([np.inf]), weight=1.0)


@settings(max_examples=50, deadline=None)
@given(parts=st.lists(st.binary(max_size=64), max_size=5), round_index=st.integers(0, 2**32 - 1), sender=st.text(max_size=20))
def test_frames_round_trip(parts, round_index, sender):
    frame = decode_frame(encode_frame(7, round_index, sender, parts), kind=7, round_index=round_index, sender=sender)
    assert frame.parts == tuple(parts) and frame.sender == sender


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.binary(max_size=32), min_size=1, max_size=4), cut=st.integers(1, 40))
def test_any_truncation_is_rejected(parts, cut):
    data = encode_frame(1, 0, "x", parts)
    with pytest.raises(MessageError):
        decode_frame(data[: max(0, len(data) - cut)], kind=1, round_index=0)


def test_frame_checks():
    data = encode_frame(1, 5, "x", [b"abc"])
    with pytest.raises(MessageError, match="kind"):
        decode_frame(data, kind=2, round_index=5)
    with pytest.raises(MessageError, match="round 5"):
        decode_frame(data, kind=1, round_index=6)
    with pytest.raises(MessageError, match="oversized"):
        decode_frame(data, kind=1, round_index=5, max_bytes=10)
    with pytest.raises(MessageError, match="magic"):
        decode_frame(b"XXXX" + data[4:], kind=1, round_index=5)
    with pytest.raises(MessageError, match="parts"):
        decode_frame(encode_frame(1, 5, "x", [b""] * 3), kind=1, round_index=5, max_parts=2)


def test_weight_that_overflows_the_sum_is_rejected():
    server = PlaintextServer(3)
    good = encode_frame(1, 0, "a", [struct.pack(">d", 2.0), np.ones(3, "<f4").tobytes()])
    huge = encode_frame(1, 0, "b", [struct.pack(">d", 1e300), np.full(3, 1e30, "<f4").tobytes()])
    out = server.aggregate(0, {"a": good, "b": huge})
    assert out.accepted == ("a",) and "overflow" in out.rejected["b"]
    assert np.all(np.isfinite(server._sum)) and server._sum.tolist() == [2.0, 2.0, 2.0]


class _CorruptAggregate:
    def deliver(self, sender, receiver, step, payload):
        return payload[:-3] if step == "aggregate" else payload


def test_malformed_aggregate_aborts_with_a_typed_error():
    from privfl.errors import ProtocolAbort

    updates = {"a": ClientUpdate(delta=np.ones(4, np.float32), weight=1.0)}
    with pytest.raises(ProtocolAbort, match="malformed"):
        PlaintextProtection().run_round(0, updates, _CorruptAggregate())


def test_framing_refuses_out_of_range_headers():
    from privfl.errors import ProtocolError

    with pytest.raises(ProtocolError):
        encode_frame(1, 2**32, "x", [])
    with pytest.raises(ProtocolError):
        encode_frame(1, 0, "x" * 70000, [])


def test_release_noise_is_an_argument_for_one_round():
    import numpy as np

    from privfl.protocols.base import ClientUpdate, DirectTransport, NoisePlacement
    from privfl.protocols.plaintext import PlaintextProtection

    protection = PlaintextProtection()
    assert protection.noise_placement is NoisePlacement.CENTRAL
    updates = {"a": ClientUpdate(np.ones(3), 1.0), "b": ClientUpdate(np.zeros(3), 1.0)}
    noised = protection.run_round(0, updates, DirectTransport(), release_noise=lambda total: total + 10.0)
    assert np.allclose(noised.average, (np.ones(3) + 10.0) / 2)
    plain = protection.run_round(1, updates, DirectTransport())  # not carried into the next round
    assert np.allclose(plain.average, np.ones(3) / 2)
    assert protection.release_noise is None
