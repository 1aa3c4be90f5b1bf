"""The Protection contract: every protection runs through the same cases.

Each protection (plaintext, CKKS, secure aggregation, shared-key encryption with one and two primes,
and a small user-defined one written here)
must, for a round of client updates carried as bytes over a :class:`Transport`:

1. return the weighted average over all clients, within its own error bound;
2. drop a client whose upload is lost in transit, and average over the rest;
3. raise a typed :class:`ProtocolAbort` when fewer clients survive than it needs (and complete
   when exactly that many survive);
4. drop, with a reason, a client whose upload arrives as garbage / truncated / empty / with
   trailing bytes, without crashing and without any untyped exception;
5. reject an upload replayed from another round (the round index is bound into every message).

A case that does not fit a protocol's semantics is expressed through that protocol's own numbers
(its upload step, its survivor threshold, its error bound), never skipped.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from privfl.errors import MessageError, ProtocolAbort
from privfl.protocols.base import SERVER, ClientUpdate, Protection, RoundResult, Transport
from privfl.protocols.ckks import CkksProtection
from privfl.protocols.ckks_params import CkksConfig
from privfl.protocols.plaintext import PlaintextProtection
from privfl.protocols.secagg import SecAggConfig, SecAggProtection
from privfl.protocols.shared_key import SharedKeyConfig, SharedKeyProtection
from privfl.protocols.wire import decode_frame, encode_frame

NUM_CLIENTS = 5
DIM = 50


# --------------------------------------------------------------------------------------------
# A user-defined protection: one framed message per client, averaged on the "server".
# --------------------------------------------------------------------------------------------

_F64 = struct.Struct(">d")


class FramedMeanProtection(Protection):
    """Sends n_k and delta_k (float64) in a strict frame bound to the round and the sender.

    The server checks every message on its own (frame, round, sender, shape, finiteness) and drops
    the sender of any message that fails, with the reason; fewer than ``min_participants`` accepted
    updates abort the round.
    """

    name: ClassVar[str] = "framed-mean"
    KIND: ClassVar[int] = 41
    STEP: ClassVar[str] = "upload"

    def __init__(self, min_participants: int = 2) -> None:
        self._min = min_participants

    @property
    def min_participants(self) -> int:
        return self._min

    @classmethod
    def _parse(cls, round_index: int, sender: str, message: bytes, dim: int) -> tuple[float, np.ndarray]:
        frame = decode_frame(message, kind=cls.KIND, round_index=round_index, sender=sender, max_bytes=8 * dim + 1024, max_parts=2)
        if len(frame.parts) != 2 or len(frame.parts[0]) != 8 or len(frame.parts[1]) != 8 * dim:
            raise MessageError("upload has the wrong shape", sender=sender)
        (weight,) = _F64.unpack(frame.parts[0])
        delta = np.frombuffer(frame.parts[1], dtype="<f8")
        if not (np.isfinite(weight) and weight > 0) or not np.all(np.isfinite(delta)):
            raise MessageError("upload holds a non-finite value or a non-positive weight", sender=sender)
        return weight, delta

    def run_round(self, round_index: int, updates: Mapping[str, ClientUpdate], transport: Transport) -> RoundResult:
        if not updates:
            raise ProtocolAbort(f"round {round_index}: no client updates", survivors=0, threshold=self._min)
        dims = {len(u.delta) for u in updates.values()}
        if len(dims) != 1:
            raise ProtocolAbort(f"round {round_index}: updates of different lengths {sorted(dims)}")
        (dim,) = dims
        dropped: dict[str, str] = {}
        upload: dict[str, int] = {}
        accepted: dict[str, tuple[float, np.ndarray]] = {}
        for client, update in updates.items():
            message = encode_frame(
                self.KIND, round_index, client, [_F64.pack(update.weight), update.delta.astype("<f8").tobytes()]
            )
            upload[client] = len(message)
            received = transport.deliver(client, SERVER, self.STEP, message)
            if received is None:
                dropped[client] = "upload lost in transit (client dropped)"
                continue
            try:
                accepted[client] = self._parse(round_index, client, received, dim)
            except MessageError as exc:
                dropped[client] = f"upload rejected by the server: {exc.reason}"
        if len(accepted) < self._min:
            raise ProtocolAbort(
                f"round {round_index}: {len(accepted)} valid updates < {self._min}",
                survivors=len(accepted),
                threshold=self._min,
            )
        total_weight = sum(w for w, _ in accepted.values())
        weighted_sum = sum(w * d for w, d in accepted.values())
        return RoundResult(
            average=weighted_sum / total_weight,
            total_weight=total_weight,
            contributors=tuple(accepted),
            dropped=dropped,
            upload_bytes=upload,
            download_bytes={c: 8 * (dim + 1) for c in updates},
        )


# --------------------------------------------------------------------------------------------
# Per-protection facts: how to build it, its upload step, its survivor threshold, its error bound.
# --------------------------------------------------------------------------------------------


def _weighted(updates: Mapping[str, ClientUpdate], ids) -> tuple[np.ndarray, float]:
    ids = list(ids)
    total = sum(updates[u].weight for u in ids)
    return sum(updates[u].weight * updates[u].delta.astype(np.float64) for u in ids) / total, total


@dataclass(frozen=True)
class Spec:
    name: str
    make: Callable[[], Protection]
    upload_step: str
    needed: Callable[[Protection, int], int]
    """Fewest clients that must deliver a valid upload for a round of n to complete."""
    bounds: Callable[[Protection, Mapping[str, ClientUpdate], tuple[str, ...]], tuple[float, float]]
    """(max absolute per-coordinate error of the average, max relative error of total_weight)."""


def _plain_bounds(protection, updates, ids):
    # float32 on the wire: |delta| < 1 loses at most ~6e-8 per value.
    return 1e-6, 1e-12


def _exact_bounds(protection, updates, ids):
    return 1e-12, 1e-12


def _ckks_bounds(protection, updates, ids):
    # tests/protocols/test_ckks.py: relative error <= 1e-6 of the average, total weight rel 1e-6.
    # Expressed per coordinate against the average's norm (checked as a norm below as well).
    expected, _ = _weighted(updates, ids)
    return 1e-6 * float(np.linalg.norm(expected)), 1e-6


def _secagg_bounds(protection, updates, ids):
    # The decoded sums S (of r_k delta_k) and R (of r_k c, c = clip_range = 1) are each within
    # m = protection.max_error per coordinate; the average S / R is then within
    # m (1 + |avg| / c) / R_true <= 2 m / R_true (|avg| <= c); 3 m / R_true leaves room for rounding.
    m = protection.max_error
    assert m > 0
    bound = max(u.weight for u in updates.values())
    ratio_sum = sum(updates[u].weight for u in ids) / bound
    return 3 * m / ratio_sum, 2 * m / ratio_sum + 1e-12


def _make_ckks() -> CkksProtection:
    # One per test: the key holder decrypts each round at most once, and keygen is ~0.5 s.
    return CkksProtection(CkksConfig())


SPECS = {
    "plaintext": Spec("plaintext", PlaintextProtection, "update", lambda p, n: max(1, p.min_participants), _plain_bounds),
    "ckks": Spec("ckks", _make_ckks, "update", lambda p, n: p.config.min_contributors, _ckks_bounds),
    "secagg": Spec(
        "secagg",
        lambda: SecAggProtection(SecAggConfig(clip_range=1.0)),
        "masked_input",
        lambda p, n: p.config.resolve_threshold(n),
        _secagg_bounds,
    ),
    # Quantized like secure aggregation: the same bound, from the protection's own max_error.
    "shared_key": Spec(
        "shared_key",
        lambda: SharedKeyProtection(SharedKeyConfig(clip_range=1.0)),
        "update",
        lambda p, n: p.config.min_contributors,
        _secagg_bounds,
    ),
    "shared_key-1-prime": Spec(
        "shared_key-1-prime",
        lambda: SharedKeyProtection(SharedKeyConfig(clip_range=1.0, limbs=1)),
        "update",
        lambda p, n: p.config.min_contributors,
        _secagg_bounds,
    ),
    "framed-mean": Spec("framed-mean", FramedMeanProtection, FramedMeanProtection.STEP, lambda p, n: p.min_participants, _exact_bounds),
}
NAMES = list(SPECS)


@pytest.fixture(params=NAMES)
def spec(request) -> Spec:
    return SPECS[request.param]


# --------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------


def _updates(seed: int = 0, n: int = NUM_CLIENTS, dim: int = DIM) -> dict[str, ClientUpdate]:
    rng = np.random.default_rng(seed)  # test data only
    # |delta| stays well inside secagg's clip_range of 1 (std 0.1 over 250 values).
    return {f"c{i}": ClientUpdate(rng.normal(0, 0.1, dim), float(rng.integers(1, 500))) for i in range(n)}


class Scripted:
    """A transport that loses, replaces or records a client's message at a given step.

    ``lose``: {(sender, step)}; ``replace``: {(sender, step): payload -> bytes};
    ``record``: {(sender, step)} whose delivered payloads are kept in ``recorded``.
    """

    def __init__(self, lose=(), replace=None, record=()) -> None:
        self.lose = set(lose)
        self.replace = dict(replace or {})
        self.record = set(record)
        self.recorded: dict[tuple[str, str], bytes] = {}
        self.seen: set[tuple[str, str]] = set()

    def deliver(self, sender: str, receiver: str, step: str, payload: bytes) -> bytes | None:
        key = (sender, step)
        self.seen.add(key)
        if key in self.record:
            self.recorded[key] = bytes(payload)
        if key in self.lose:
            return None
        if key in self.replace:
            return self.replace[key](bytes(payload))
        return payload


def _check_average(spec: Spec, protection: Protection, result: RoundResult, updates, ids) -> None:
    ids = sorted(ids)
    expected, total = _weighted(updates, ids)
    atol, wrel = spec.bounds(protection, updates, tuple(ids))
    assert sorted(result.contributors) == ids
    assert len(set(result.contributors)) == len(result.contributors)
    assert result.average.shape == (DIM,)
    error = float(np.max(np.abs(result.average - expected)))
    assert error <= atol, f"{spec.name}: max error {error:.3g} > bound {atol:.3g}"
    if spec.name == "ckks":
        assert np.linalg.norm(result.average - expected) / np.linalg.norm(expected) <= 1e-6
    assert result.total_weight == pytest.approx(total, rel=wrel, abs=0)


def _distinguishable(spec: Spec, protection: Protection, updates, ids, others) -> None:
    """The average over ``ids`` differs from the one over ``others`` by more than the bound."""
    atol, _ = spec.bounds(protection, updates, tuple(sorted(ids)))
    a, _ = _weighted(updates, ids)
    b, _ = _weighted(updates, others)
    assert float(np.max(np.abs(a - b))) > 10 * atol


# --------------------------------------------------------------------------------------------
# 1. Exact average.
# --------------------------------------------------------------------------------------------


def test_weighted_average_over_all_clients(spec):
    updates = _updates(seed=1)
    protection = spec.make()
    transport = Scripted()
    result = protection.run_round(0, updates, transport)
    _check_average(spec, protection, result, updates, updates)
    assert dict(result.dropped) == {}
    # The upload step named in the spec is the one each client's update travels on.
    assert {(u, spec.upload_step) for u in updates} <= transport.seen
    assert set(result.upload_bytes) == set(updates) and all(b > 0 for b in result.upload_bytes.values())


# --------------------------------------------------------------------------------------------
# 2. One client's upload is lost.
# --------------------------------------------------------------------------------------------


def test_lost_upload_drops_that_client(spec):
    updates = _updates(seed=2)
    protection = spec.make()
    lost = "c2"
    result = protection.run_round(0, updates, Scripted(lose={(lost, spec.upload_step)}))
    rest = [u for u in updates if u != lost]
    assert lost not in result.contributors
    assert lost in result.dropped and "lost" in result.dropped[lost]
    _check_average(spec, protection, result, updates, rest)
    _distinguishable(spec, protection, updates, rest, list(updates))


# --------------------------------------------------------------------------------------------
# 3. Too few survivors: a typed abort; exactly enough: the round completes.
# --------------------------------------------------------------------------------------------


def test_exactly_the_needed_survivors_complete_the_round(spec):
    updates = _updates(seed=3)
    protection = spec.make()
    needed = spec.needed(protection, len(updates))
    assert 1 <= needed < len(updates)
    ids = sorted(updates)
    survivors, gone = ids[:needed], ids[needed:]
    result = protection.run_round(0, updates, Scripted(lose={(u, spec.upload_step) for u in gone}))
    assert set(result.dropped) == set(gone)
    _check_average(spec, protection, result, updates, survivors)


def test_too_few_survivors_abort_with_a_typed_error(spec):
    updates = _updates(seed=4)
    protection = spec.make()
    needed = spec.needed(protection, len(updates))
    ids = sorted(updates)
    gone = ids[needed - 1 :]  # one fewer survivor than needed (none at all for plaintext)
    with pytest.raises(ProtocolAbort):
        protection.run_round(0, updates, Scripted(lose={(u, spec.upload_step) for u in gone}))


# --------------------------------------------------------------------------------------------
# 4. Bad bytes in one client's upload.
# --------------------------------------------------------------------------------------------


def _garbage(payload: bytes) -> bytes:
    return np.random.default_rng(99).integers(0, 256, len(payload), dtype=np.uint8).tobytes()


CORRUPTIONS = {
    "garbage": _garbage,
    "truncated": lambda p: p[: len(p) // 2],
    "truncated-by-one": lambda p: p[:-1],
    "empty": lambda p: b"",
    "trailing-bytes": lambda p: p + b"\x00\x01\x02\x03",
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_malformed_upload_drops_that_client_with_a_reason(spec, corruption):
    updates = _updates(seed=5)
    protection = spec.make()
    bad = "c1"
    transport = Scripted(replace={(bad, spec.upload_step): CORRUPTIONS[corruption]})
    result = protection.run_round(0, updates, transport)  # any exception here fails the contract
    rest = [u for u in updates if u != bad]
    assert bad not in result.contributors
    assert isinstance(result.dropped.get(bad), str) and result.dropped[bad].strip()
    _check_average(spec, protection, result, updates, rest)
    _distinguishable(spec, protection, updates, rest, list(updates))


# --------------------------------------------------------------------------------------------
# 5. A replay of a client's round-0 upload in round 1.
# --------------------------------------------------------------------------------------------


def test_upload_replayed_from_another_round_is_rejected(spec):
    protection = spec.make()
    victim = "c3"
    key = (victim, spec.upload_step)
    first = _updates(seed=6)
    recorder = Scripted(record={key})
    protection.run_round(0, first, recorder)
    assert key in recorder.recorded
    old = recorder.recorded[key]

    second = _updates(seed=7)
    try:
        result = protection.run_round(1, second, Scripted(replace={key: lambda _payload: old}))
    except ProtocolAbort:
        return  # a typed refusal of the whole round is acceptable; acceptance is not
    rest = [u for u in second if u != victim]
    assert victim not in result.contributors
    assert victim in result.dropped
    _check_average(spec, protection, result, second, rest)
    # Had the replay been counted, the average would hold the victim's round-0 update instead.
    with_replay = {**second, victim: first[victim]}
    _distinguishable(spec, protection, with_replay, rest, list(with_replay))


# The two protections that authenticate uploads (CKKS: an Ed25519 signature over run, round and
# ciphertexts; secagg: a per-round channel key and fresh round keys) bind the round cryptographically,
# not only in the frame header: a replay whose header is rewritten to the current round must still
# fail. Plaintext and the framed mean carry no integrity at all (plaintext's threat model is "none"),
# so for them a rewritten header is, by design, a genuine-looking upload; they are not in this case.
_ROUND_FIELD = slice(5, 9)  # privfl.protocols.wire header: magic (4), kind (1), round (4, big-endian)


@pytest.mark.parametrize("name", ["ckks", "secagg"])
def test_replay_with_rewritten_round_header_is_rejected(name):
    spec = SPECS[name]
    protection = spec.make()
    victim = "c3"
    key = (victim, spec.upload_step)
    first = _updates(seed=8)
    recorder = Scripted(record={key})
    protection.run_round(0, first, recorder)
    old = recorder.recorded[key]
    # The header is the frame's (secagg appends a 16-byte tag after it, so only the header is read).
    assert old[:4] == b"PFL1" and struct.unpack(">I", old[_ROUND_FIELD]) == (0,)
    forged = old[: _ROUND_FIELD.start] + struct.pack(">I", 1) + old[_ROUND_FIELD.stop :]
    assert struct.unpack(">I", forged[_ROUND_FIELD]) == (1,) and len(forged) == len(old)

    second = _updates(seed=9)
    try:
        result = protection.run_round(1, second, Scripted(replace={key: lambda _payload: forged}))
    except ProtocolAbort:
        return
    rest = [u for u in second if u != victim]
    assert victim not in result.contributors
    assert victim in result.dropped
    # Refused by the cryptographic check, not by the framing: the forged header itself is well formed.
    assert any(w in result.dropped[victim] for w in ("signature", "authentic"))
    _check_average(spec, protection, result, second, rest)
