"""Every secure-aggregation decoder answers malformed bytes with a typed PrivflError, never a crash.

Two kinds of mutation, for each message of a round, fed to a receiver at exactly that step:
- raw: bit flips, truncation, insertion, splicing of the sealed bytes (a network attacker);
- structured: the frame's parts are altered and the message is sealed again with the right key, the
  way the peer that holds that key (a malicious server towards a client, a malicious client towards
  the server) can do it, so the parsing behind the authentication tag is exercised as well.
"""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privfl.errors import PrivflError
from privfl.protocols.secagg import IdentityKey
from privfl.protocols.secagg import messages as m
from privfl.protocols.secagg.keys import tag
from privfl.protocols.secagg.prg import WORD
from privfl.protocols.secagg.simulate import new_round
from privfl.protocols.wire import encode_frame

ROUND, DIM, ME = 4, 6, "client-00"
IDS = ["client-00", "client-01", "client-02"]

# Server-to-client and client-to-server message kinds.
TO_CLIENT = [m.KEYS, m.RELAY, m.CHECK_REQUEST, m.UNMASK_REQUEST]
TO_SERVER = [m.ADVERTISE, m.SHARES, m.MASKED_INPUT, m.CHECK, m.UNMASK]


def _words() -> dict[str, np.ndarray]:
    return {u: np.frombuffer(secrets.token_bytes(4 * DIM), dtype=WORD).copy() for u in IDS}


def _play_until(kind: int, authenticated: bool):
    """Plays a 3-client round (t = 2) honestly up to the message of ``kind`` from or to client-00.

    Returns:
        (run, that message's payload, a function that hands a payload to its receiver).
    """
    identities = {u: IdentityKey.generate() for u in IDS} if authenticated else None
    run = new_round(IDS, round_index=ROUND, threshold=2, neighbours=None, dimension=DIM, bits=32, graph_seed=b"f" * 16, identities=identities)
    server, clients, words = run.server, run.clients, _words()
    others = IDS[1:]
    adverts = {u: clients[u].advertise() for u in IDS}
    if kind == m.ADVERTISE:
        for u in others:
            server.receive_advertise(u, adverts[u])
        return run, adverts[ME], lambda p: server.receive_advertise(ME, p)
    for u in IDS:
        server.receive_advertise(u, adverts[u])
    keys = server.keys_messages()
    if kind == m.KEYS:
        return run, keys[ME], clients[ME].share_keys
    shares = {u: clients[u].share_keys(keys[u]) for u in IDS}
    if kind == m.SHARES:
        for u in others:
            server.receive_shares(u, shares[u])
        return run, shares[ME], lambda p: server.receive_shares(ME, p)
    for u in IDS:
        server.receive_shares(u, shares[u])
    relays = server.relay_messages()
    if kind == m.RELAY:
        return run, relays[ME], lambda p: clients[ME].masked_input(p, words[ME])
    masked = {u: clients[u].masked_input(relays[u], words[u]) for u in IDS}
    if kind == m.MASKED_INPUT:
        for u in others:
            server.receive_masked_input(u, masked[u])
        return run, masked[ME], lambda p: server.receive_masked_input(ME, p)
    for u in IDS:
        server.receive_masked_input(u, masked[u])
    if authenticated:
        checks = server.consistency_requests()
        if kind == m.CHECK_REQUEST:
            return run, checks[ME], clients[ME].sign_survivors
        signed = {u: clients[u].sign_survivors(checks[u]) for u in IDS}
        if kind == m.CHECK:
            for u in others:
                server.receive_consistency(u, signed[u])
            return run, signed[ME], lambda p: server.receive_consistency(ME, p)
        for u in IDS:
            server.receive_consistency(u, signed[u])
    requests = server.unmask_requests()
    if kind == m.UNMASK_REQUEST:
        return run, requests[ME], clients[ME].unmask
    replies = {u: clients[u].unmask(requests[u]) for u in IDS}
    assert kind == m.UNMASK
    for u in others:
        server.receive_unmask(u, replies[u])
    return run, replies[ME], lambda p: server.receive_unmask(ME, p)


def _reseal(run, kind: int, parts: list[bytes], header: tuple[int, int, str]) -> bytes:
    """Seals ``parts`` under the key the honest sender of ``kind`` would use (known to the attacker)."""
    frame = encode_frame(*header, parts)
    if kind in TO_CLIENT:
        key = m.channel_key(run.server._channels[ME], ROUND, ME, kind, m.DOWN)
    else:
        key = run.clients[ME]._key(kind, m.UP)
    return frame + tag(key, frame)


OPS = ("replace", "truncate", "extend", "drop", "duplicate", "append", "swap", "empty")
structured = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 1 << 16), st.binary(max_size=72)), min_size=1, max_size=4)
raw = st.lists(st.tuples(st.sampled_from(("flip", "cut", "insert", "delete")), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=40)), min_size=1, max_size=4)
header_change = st.one_of(st.none(), st.tuples(st.sampled_from(("kind", "round", "sender")), st.integers(0, 255)))


def _mutate_parts(parts: list[bytes], ops) -> list[bytes]:
    parts = list(parts)
    for op, where, data in ops:
        i = where % len(parts) if parts else 0
        if op == "replace" and parts:
            parts[i] = data
        elif op == "truncate" and parts:
            parts[i] = parts[i][: where % (len(parts[i]) + 1)]
        elif op == "extend" and parts:
            parts[i] = parts[i] + data
        elif op == "drop" and parts:
            del parts[i]
        elif op == "duplicate" and parts:
            parts.insert(i, parts[i])
        elif op == "append":
            parts.append(data)
        elif op == "swap" and len(parts) > 1:
            j = (i + 1) % len(parts)
            parts[i], parts[j] = parts[j], parts[i]
        elif op == "empty":
            parts = []
    return parts


def _mutate_bytes(payload: bytes, ops) -> bytes:
    data = bytearray(payload)
    for op, where, chunk in ops:
        i = where % (len(data) + 1)
        if op == "flip" and data:
            data[i % len(data)] ^= chunk[0] or 1
        elif op == "cut":
            data = data[:i]
        elif op == "insert":
            data[i:i] = chunk
        elif op == "delete":
            del data[i : i + len(chunk)]
    return bytes(data)


def _check(deliver, payload) -> None:
    try:
        deliver(payload)
    except PrivflError:
        pass  # typed: the sender is dropped, or the client stops, and the round goes on or aborts cleanly


CASES = [(kind, auth) for auth in (False, True) for kind in TO_CLIENT + TO_SERVER if auth or kind not in (m.CHECK_REQUEST, m.CHECK)]


@pytest.mark.parametrize(("kind", "authenticated"), CASES, ids=[f"{m.STEP_NAMES[k]}-{'auth' if a else 'plain'}" for k, a in CASES])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_malformed_messages_raise_typed_errors(kind, authenticated, data):
    run, payload, deliver = _play_until(kind, authenticated)
    sender = "server" if kind in TO_CLIENT else ME
    frame = m.open_message(payload, kind=kind, round_index=ROUND, sender=sender, max_bytes=1 << 20, key=None)[0]
    if data.draw(st.booleans(), label="structured"):
        parts = _mutate_parts(list(frame.parts), data.draw(structured, label="ops"))
        header = [kind, ROUND, sender]
        change = data.draw(header_change, label="header")
        if change is not None:
            field, value = change
            if field == "kind":
                header[0] = value
            elif field == "round":
                header[1] = value
            else:
                header[2] = f"client-{value:02d}"
        mutated = _reseal(run, kind, parts, tuple(header))
    else:
        mutated = _mutate_bytes(payload, data.draw(raw, label="ops"))
    _check(deliver, mutated)


@pytest.mark.parametrize("authenticated", [False, True])
def test_the_honest_messages_pass_the_same_harness(authenticated):
    # The harness can fail: the unmutated message reaches the receiver and is accepted.
    for kind in TO_CLIENT + TO_SERVER:
        if not authenticated and kind in (m.CHECK_REQUEST, m.CHECK):
            continue
        run, payload, deliver = _play_until(kind, authenticated)
        deliver(payload)
        sender = "server" if kind in TO_CLIENT else ME
        frame = m.open_message(payload, kind=kind, round_index=ROUND, sender=sender, max_bytes=1 << 20, key=None)[0]
        run2, payload2, deliver2 = _play_until(kind, authenticated)
        resealed = _reseal(run2, kind, list(m.open_message(payload2, kind=kind, round_index=ROUND, sender=sender, max_bytes=1 << 20, key=None)[0].parts), (kind, ROUND, sender))
        if kind == m.MASKED_INPUT:
            assert resealed == payload2  # the vector layout is the frame's own
        deliver2(resealed)
        assert frame.parts
