"""Tests of authenticated secure aggregation: signed keys and the consistency check against an active server."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from privfl.errors import ConfigError, MessageError, ProtocolAbort, ProtocolError
from privfl.protocols.base import ClientUpdate, DirectTransport
from privfl.protocols.secagg import IdentityKey, SecAggConfig, SecAggProtection, run_secure_sum, simulate
from privfl.protocols.secagg import messages as m
from privfl.protocols.secagg.client import SecAggClient, keys_statement, survivor_bitmap, survivors_statement
from privfl.protocols.secagg.keys import TAG_BYTES, KeyPair, agree, hkdf, verify_signature
from privfl.protocols.secagg.prg import WORD
from privfl.protocols.secagg.simulate import drive, new_round


def _ids(n: int) -> list[str]:
    return [f"client-{i:02d}" for i in range(n)]


def _identities(n: int) -> dict[str, IdentityKey]:
    return {u: IdentityKey.generate() for u in _ids(n)}


def _words(n: int, dim: int) -> dict[str, np.ndarray]:
    return {u: np.frombuffer(secrets.token_bytes(4 * dim), dtype=WORD).copy() for u in _ids(n)}


def _round(n=6, *, threshold=4, neighbours=None, round_index=3, identities=None, dim=8):
    identities = identities or _identities(n)
    run = new_round(
        _ids(n), round_index=round_index, threshold=threshold, neighbours=neighbours, dimension=dim, bits=32,
        graph_seed=b"a" * 16, identities=identities,
    )
    return run, identities


def _until_masked(run, words, skip=()):
    """Plays rounds 0-2 honestly; returns nothing, leaves the server ready to close round 2."""
    server = run.server
    for u, c in run.clients.items():
        server.receive_advertise(u, c.advertise())
    keys = server.keys_messages()
    for u in keys:
        server.receive_shares(u, run.clients[u].share_keys(keys[u]))
    relays = server.relay_messages()
    for u in relays:
        payload = run.clients[u].masked_input(relays[u], words[u])
        if u not in skip:
            server.receive_masked_input(u, payload)


# -- honest runs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("neighbours", [None, 8])
def test_honest_authenticated_round_is_exact_under_dropouts(neighbours):
    n, dim = 12, 40
    # The least thresholds above half of the share holders (12 complete, 9 with k = 8). Four clients
    # never answer the unmask request (01-04), and with k = 8 one neighbourhood may hold all four:
    # 9 - 4 = 5 = t is the most dropouts the bound leaves room for there.
    run, _ = _round(n, threshold=7 if neighbours is None else 5, neighbours=neighbours, dim=dim)
    words = _words(n, dim)
    stop = {"client-01": "advertise", "client-02": "share", "client-03": "masked_input", "client-04": "consistency", "client-05": "unmask"}
    total, transcript = drive(run, words, DirectTransport(), stop_after=stop)
    survivors = run.server.survivors
    assert set(survivors) == set(_ids(n)) - {"client-01", "client-02"}
    expected = sum(words[u].astype(np.uint64) for u in survivors) % (1 << 32)
    assert np.array_equal(total, expected.astype(WORD))
    # The extra round was played: one 64-byte signature (plus framing) per signer.
    assert transcript.bytes_up["client-00"]["consistency"] > 64
    assert transcript.bytes_up["client-04"]["consistency"] > 0 and transcript.bytes_up["client-04"]["unmask"] == 0
    assert transcript.bytes_up["client-03"]["consistency"] == 0


def test_run_secure_sum_authenticated_matches_the_inputs():
    rng = np.random.default_rng(4)  # test data only
    inputs = {u: rng.uniform(-1, 1, 30) for u in _ids(8)}
    result = run_secure_sum(inputs, threshold=3, neighbours=4, authenticated=True, drop_after={"consistency": {"client-06"}})
    assert "client-06" in result.survivors  # its masked input is in; its b_u is rebuilt from the others
    assert np.all(np.abs(result.total - sum(inputs[u] for u in result.survivors)) <= result.max_error)
    steps = {step for (_, _, step, _) in run_secure_sum(inputs, threshold=5, authenticated=True, record=True).transcript}
    assert {"consistency_request", "consistency"} <= steps
    with pytest.raises(ConfigError, match="drop_after"):
        run_secure_sum(inputs, threshold=5, drop_after={"consistency": {"client-01"}})  # no such round in plain mode


def test_protection_keeps_identities_across_rounds_and_hides_them():
    rng = np.random.default_rng(5)  # test data only
    updates = {u: ClientUpdate(rng.normal(0, 0.2, 16), float(rng.integers(1, 50))) for u in _ids(5)}
    protection = SecAggProtection(SecAggConfig(threshold=3, authenticated=True))
    for round_index in (0, 1):
        result = protection.run_round(round_index, updates, DirectTransport())
        expected = sum(x.weight * x.delta for x in updates.values()) / sum(x.weight for x in updates.values())
        assert np.allclose(result.average, expected, atol=1e-6)
        assert protection.server.params.authenticated
        registry = dict(protection.server.params.identities)
        if round_index == 0:
            first = registry
    assert registry == first  # long-term keys: the same registry in both rounds
    given = _identities(5)
    config = SecAggConfig(threshold=3, authenticated=True, identities=given)
    text = repr(config) + repr(given["client-00"]) + repr(protection.server.params)
    raw = given["client-00"].private.private_bytes_raw()
    assert "private" not in text and raw.hex() not in text and "identities" not in text
    assert SecAggProtection(config).run_round(0, dict(zip(_ids(5), updates.values(), strict=True)), DirectTransport()).contributors == tuple(_ids(5))
    for kwargs, field in [
        (dict(identities=given), "identities"),  # identities without authenticated=True
        (dict(authenticated=True, identities={"client-00": b"x" * 32}), "identities"),
        (dict(authenticated=1), "authenticated"),
    ]:
        with pytest.raises(ConfigError) as info:
            SecAggConfig(threshold=3, **kwargs)
        assert info.value.field == field
    with pytest.raises(ConfigError, match="identities"):
        SecAggProtection(SecAggConfig(threshold=2, authenticated=True, identities={"client-00": given["client-00"]})).run_round(
            0, dict(zip(_ids(3), list(updates.values())[:3], strict=True)), DirectTransport()
        )


def test_client_needs_its_registered_identity():
    run, identities = _round(4, threshold=3)
    with pytest.raises(ProtocolError, match="identity"):
        SecAggClient("client-00", run.params)
    with pytest.raises(ProtocolError, match="registered"):
        SecAggClient("client-00", run.params, identities["client-01"])


# -- man in the middle on the keys ------------------------------------------------------------------
@pytest.mark.parametrize("authenticated", [True, False])
def test_server_substituting_a_clients_keys_is_detected_before_any_share(authenticated):
    n = 6
    identities = _identities(n) if authenticated else None
    run = new_round(_ids(n), round_index=1, threshold=4, neighbours=None, dimension=4, bits=32, graph_seed=b"m" * 16, identities=identities)
    server = run.server
    for u, c in run.clients.items():
        server.receive_advertise(u, c.advertise())
    # An active server swaps in its own keys for client-00 (keeping client-00's signature), so it could
    # open every share the others seal for client-00.
    mallory_c, mallory_s = KeyPair.generate(), KeyPair.generate()
    server._public_keys["client-00"] = (mallory_c.public, mallory_s.public)
    keys = server.keys_messages()
    victims = [u for u in keys if u != "client-00"]
    for u in victims:
        if authenticated:
            with pytest.raises(ProtocolAbort, match=r"client-00.*not signed"):
                run.clients[u].share_keys(keys[u])
            assert run.clients[u]._self_seed == b""  # nothing was even split, let alone sent
        else:
            # The check can fail: without signatures the same substitution goes unnoticed.
            assert run.clients[u].share_keys(keys[u])
    # Re-signing with another identity (the server's own, say) does not help either.
    if authenticated:
        forged = IdentityKey.generate().sign(keys_statement(run.params, "client-00", mallory_c.public, mallory_s.public))
        with pytest.raises(MessageError, match="does not verify"):
            verify_signature(run.params.identities["client-00"], forged, keys_statement(run.params, "client-00", mallory_c.public, mallory_s.public), signer="client-00")


@pytest.mark.parametrize("authenticated", [True, False])
def test_network_attacker_replacing_advertised_keys_is_dropped(authenticated, monkeypatch):
    """Someone on the client-server link replaces the advertised keys and recomputes the channel tag.

    The tag is keyed from the advertised c key itself, so it verifies; only the signature catches this.
    """
    rng = np.random.default_rng(6)  # test data only
    inputs = {u: rng.uniform(-1, 1, 10) for u in _ids(6)}
    victim = "client-02"

    class Substitute(DirectTransport):
        params = None

        def deliver(self, sender, receiver, step, payload):
            if sender != victim or step != "advertise":
                return payload
            frame = m.open_message(payload, kind=m.ADVERTISE, round_index=0, sender=victim, max_bytes=1024, key=None)[0]
            c, s = KeyPair.generate(), KeyPair.generate()
            server_pk = Substitute.params.server_public_key
            channel = hkdf(agree(c.private, server_pk), b"channel-secret", 0, victim)
            key = m.channel_key(channel, 0, victim, m.ADVERTISE, m.UP)
            return m.seal_message(key, m.ADVERTISE, 0, victim, [c.public, s.public, *frame.parts[2:]])

    original = simulate.new_round

    def capture(*args, **kwargs):
        run = original(*args, **kwargs)
        Substitute.params = run.params  # the attacker knows the server's public key
        return run

    monkeypatch.setattr(simulate, "new_round", capture)
    result = run_secure_sum(inputs, threshold=4, authenticated=authenticated, transport=Substitute())
    if authenticated:
        assert victim not in result.survivors and result.dropped[victim].startswith("advertise") and "does not verify" in result.dropped[victim]
    else:
        # The check can fail: the plain mode accepts the substituted keys; this attacker, who does not
        # also rewrite later messages, is noticed only when the victim's next tag fails.
        assert result.dropped[victim].startswith("share") and "authentication" in result.dropped[victim]
    assert np.all(np.abs(result.total - sum(inputs[u] for u in result.survivors)) <= result.max_error)


# -- consistency check -----------------------------------------------------------------------------
def test_split_survivor_views_make_honest_clients_abort_without_revealing_shares():
    n = 6
    run, _ = _round(n, threshold=4)
    server = run.server
    late = "client-05"
    _until_masked(run, _words(n, 8))
    server.consistency_requests()  # the honest requests, discarded: the server plays a split view instead
    everyone, without_late = _ids(n), _ids(n)[:5]
    # Group A is told client-05 survived (so it would give b-shares of client-05); group B is told it
    # dropped (so it would give s-shares of client-05). Both kinds would unmask y_05.
    group_a, group_b = _ids(n)[:3], _ids(n)[3:5]
    signatures = {}
    for u in group_a:
        request = server._send(u, m.CHECK_REQUEST, [survivor_bitmap(run.params, everyone)])
        signatures[u] = m.open_message(run.clients[u].sign_survivors(request), kind=m.CHECK, round_index=3, sender=u, max_bytes=1024, key=None)[0].parts[0]
    for u in group_b:
        request = server._send(u, m.CHECK_REQUEST, [survivor_bitmap(run.params, without_late)])
        signatures[u] = m.open_message(run.clients[u].sign_survivors(request), kind=m.CHECK, round_index=3, sender=u, max_bytes=1024, key=None)[0].parts[0]

    def request(u, survivors, want_b, want_s, signers):
        signers = sorted(signers)
        return server._send(
            u, m.UNMASK_REQUEST,
            [survivor_bitmap(run.params, survivors), m.pack_ids(want_b), m.pack_ids(want_s), m.pack_ids(signers), b"".join(signatures[v] for v in signers)],
        )

    # B sees only two signatures on its set (< t = 4) ...
    with pytest.raises(ProtocolAbort, match=r"2 valid signatures.*< threshold 4"):
        run.clients["client-03"].unmask(request("client-03", without_late, without_late, [late], group_b))
    # ... and padding with A's signatures fails: they are over another set.
    with pytest.raises(ProtocolAbort, match="consistency check failed"):
        run.clients["client-04"].unmask(request("client-04", without_late, without_late, [late], group_a + group_b))
    # An A client handed B's set (with B's signatures) refuses too: it is not the set it signed.
    with pytest.raises(ProtocolAbort, match="other than the one we signed"):
        run.clients["client-00"].unmask(request("client-00", without_late, without_late, [late], group_a + group_b))
    # A has only 3 honest signers of its own set (< 4) unless client-05 itself signs.
    with pytest.raises(ProtocolAbort, match="3 valid signatures"):
        run.clients["client-01"].unmask(request("client-01", everyone, everyone, [], group_a))
    # No client answered, so no share of client-05 (of either kind) left any honest client.
    assert all(run.clients[u]._step == -1 for u in _ids(5) if u != "client-02")
    assert server._b_shares == {} and server._s_shares == {}


def test_consistent_view_with_t_signatures_is_answered():
    n = 6
    run, _ = _round(n, threshold=4)
    _until_masked(run, _words(n, 8), skip={"client-05"})
    checks = run.server.consistency_requests()
    assert set(checks) == set(_ids(5))
    for u in checks:
        run.server.receive_consistency(u, run.clients[u].sign_survivors(checks[u]))
    requests = run.server.unmask_requests()
    for u, r in requests.items():
        run.server.receive_unmask(u, run.clients[u].unmask(r))
    total = run.server.finish()
    assert total.shape == (8,)


def test_tampered_or_missing_signatures_abort_the_client():
    n = 6
    run, _ = _round(n, threshold=4)
    _until_masked(run, _words(n, 8))
    checks = run.server.consistency_requests()
    for u in checks:
        run.server.receive_consistency(u, run.clients[u].sign_survivors(checks[u]))
    requests = run.server.unmask_requests()
    frame = m.open_message(requests["client-00"], kind=m.UNMASK_REQUEST, round_index=3, sender="server", max_bytes=1 << 16, key=None)[0]
    parts = list(frame.parts)
    bad = bytearray(parts[4])
    bad[5] ^= 1
    with pytest.raises(ProtocolAbort, match="consistency check failed"):
        run.clients["client-00"].unmask(run.server._send("client-00", m.UNMASK_REQUEST, [*parts[:4], bytes(bad)]))
    assert run.clients["client-01"].unmask(requests["client-01"])  # the honest request is answered


# -- replay across rounds --------------------------------------------------------------------------
def test_signatures_are_bound_to_the_round():
    identities = _identities(6)
    old, _ = _round(6, threshold=4, round_index=7, identities=identities)
    old_adverts = {u: c.advertise() for u, c in old.clients.items()}
    new, _ = _round(6, threshold=4, round_index=8, identities=identities)
    # Same identities, same server key: only the round index differs.
    object.__setattr__(new.params, "server_public_key", old.params.server_public_key)
    frame = m.open_message(old_adverts["client-00"], kind=m.ADVERTISE, round_index=7, sender="client-00", max_bytes=1024, key=None)[0]
    c_pk, s_pk, signature = frame.parts
    verify_signature(identities["client-00"].public, signature, keys_statement(old.params, "client-00", c_pk, s_pk), signer="client-00")
    with pytest.raises(MessageError, match="does not verify"):
        verify_signature(identities["client-00"].public, signature, keys_statement(new.params, "client-00", c_pk, s_pk), signer="client-00")
    survivors = set(_ids(6))
    old_check = identities["client-00"].sign(survivors_statement(old.params, survivor_bitmap(old.params, survivors)))
    with pytest.raises(MessageError, match="does not verify"):
        verify_signature(identities["client-00"].public, old_check, survivors_statement(new.params, survivor_bitmap(new.params, survivors)), signer="client-00")


def test_server_replaying_last_rounds_keys_is_detected():
    identities = _identities(6)
    old, _ = _round(6, threshold=4, round_index=7, identities=identities)
    old_advert = old.clients["client-00"].advertise()
    c_pk, s_pk, signature = m.open_message(old_advert, kind=m.ADVERTISE, round_index=7, sender="client-00", max_bytes=1024, key=None)[0].parts
    new, _ = _round(6, threshold=4, round_index=8, identities=identities)
    for u, c in new.clients.items():
        new.server.receive_advertise(u, c.advertise())
    # The server replays client-00's keys from round 7 (whose shares it may have learned since).
    new.server._public_keys["client-00"] = (c_pk, s_pk)
    new.server._key_signatures["client-00"] = signature
    keys = new.server.keys_messages()
    with pytest.raises(ProtocolAbort, match=r"client-00.*not signed"):
        new.clients["client-01"].share_keys(keys["client-01"])
    # And a consistency answer replayed from another round is dropped by the server.
    old_run, _ = _round(4, threshold=3, round_index=1, identities={u: identities[u] for u in _ids(4)})
    new_run, _ = _round(4, threshold=3, round_index=2, identities={u: identities[u] for u in _ids(4)})
    for run in (old_run, new_run):
        _until_masked(run, _words(4, 8))
    old_checks = old_run.server.consistency_requests()
    new_run.server.consistency_requests()
    old_sig = m.open_message(
        old_run.clients["client-01"].sign_survivors(old_checks["client-01"]), kind=m.CHECK, round_index=1, sender="client-01", max_bytes=1024, key=None
    )[0].parts[0]
    key = m.channel_key(new_run.clients["client-01"]._channel, 2, "client-01", m.CHECK, m.UP)
    replay = m.seal_message(key, m.CHECK, 2, "client-01", [old_sig])
    with pytest.raises(MessageError, match="does not verify"):
        new_run.server.receive_consistency("client-01", replay)
    assert "does not verify" in new_run.server.dropped["client-01"]
    assert len(replay) > TAG_BYTES
