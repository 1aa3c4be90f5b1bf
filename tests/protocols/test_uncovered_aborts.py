"""Abort paths no other test reaches: repeated or inconsistent unmask answers in secure aggregation, and
the CKKS key holder's refusals, each pinned to its branch by the error type and a distinctive message.

The key holder's ``DecryptionError`` is opaque on purpose ("decryption failed"); the branch that refused
is identified through the chained cause (``__cause__``), which ``decrypt_sum`` documents as kept for debugging.
"""

from __future__ import annotations

import numpy as np
import pytest

from privfl.config import CkksConfig
from privfl.errors import DecryptionError, MessageError, ProtocolAbort
from privfl.protocols.base import SERVER, ClientUpdate, DirectTransport
from privfl.protocols.ckks import CkksClient, CkksKeyHolder, CkksProtection, SiteIdentity
from privfl.protocols.oneshot import KIND_AGGREGATE, KIND_UPDATE
from privfl.protocols.secagg import messages as m
from privfl.protocols.secagg import shamir
from privfl.protocols.secagg.prg import WORD
from privfl.protocols.secagg.simulate import new_round
from privfl.protocols.wire import decode_frame, encode_frame

# =====================================================================================================
# Secure aggregation: round 3 (unmask)
# =====================================================================================================

N, T, DIM = 6, 4, 8
IDS = [f"client-{i:02d}" for i in range(N)]
LATE = "client-05"  # shares its keys, then never sends a masked input: its s-key must be rebuilt
LIAR = "client-00"  # x = 1: always among the T smallest evaluation points the server interpolates at


def _to_unmask(seed: int = 11):
    """A plain round (complete graph, 6 clients, t = 4) driven up to the unmask requests.

    Returns the run, the requests, and the exact expected sum of the five survivors' words.
    """
    run = new_round(IDS, round_index=0, threshold=T, neighbours=None, dimension=DIM, bits=32, graph_seed=b"u" * 16)
    server, clients = run.server, run.clients
    for u, c in clients.items():
        server.receive_advertise(u, c.advertise())
    keys = server.keys_messages()
    for u in keys:
        server.receive_shares(u, clients[u].share_keys(keys[u]))
    relays = server.relay_messages()
    rng = np.random.default_rng(seed)  # test data only
    words = {u: rng.integers(0, 1 << 32, size=DIM, dtype=np.uint64).astype(WORD) for u in IDS}
    for u in relays:
        if u != LATE:
            server.receive_masked_input(u, clients[u].masked_input(relays[u], words[u]))
    requests = server.unmask_requests()
    survivors = [u for u in IDS if u != LATE]
    assert tuple(survivors) == server.survivors and set(requests) == set(survivors)
    expected = (sum(words[u].astype(np.uint64) for u in survivors) % (1 << 32)).astype(WORD)
    return run, requests, expected


def _honest_parts(run, u: str) -> list[tuple[bytes, str, int]]:
    """(kind, owner, share value) triples exactly as client ``u`` answers its request."""
    client = run.clients[u]
    want_b, want_s = run.server._requested[u]
    held = dict(client._held)
    held[u] = client._own_shares
    return [(b"b", o, held[o][1]) for o in sorted(want_b)] + [(b"s", o, held[o][0]) for o in sorted(want_s)]


def _seal_unmask(run, u: str, triples, *, raw_len: int = shamir.SHARE_BYTES) -> bytes:
    """An unmask answer authenticated with ``u``'s own channel key (only ``u`` itself can send it)."""
    parts: list[bytes] = []
    for kind, owner, value in triples:
        parts += [kind, owner.encode("utf-8"), int(value).to_bytes(raw_len, "big")]
    return run.clients[u]._send(m.UNMASK, parts)


def _share_points(server, x: int) -> list[str]:
    """Owners for which the server holds a share from evaluation point ``x`` (b or s table)."""
    return sorted(
        f"{name}:{owner}"
        for name, table in (("b", server._b_shares), ("s", server._s_shares))
        for owner, shares in table.items()
        if x in shares
    )


def _answer_all(run, requests, skip=()):
    for u, r in requests.items():
        if u not in skip:
            run.server.receive_unmask(u, run.clients[u].unmask(r))


# -- 1. duplicate unmask answers (server.py, receive_unmask: "duplicate message") -----------------------


def test_identical_unmask_twice_is_refused_and_the_first_answers_shares_are_taken_back():
    run, requests, expected = _to_unmask()
    server = run.server
    x = run.params.index[LIAR]
    answer = run.clients[LIAR].unmask(requests[LIAR])
    server.receive_unmask(LIAR, answer)
    assert _share_points(server, x)  # the first answer was counted
    with pytest.raises(MessageError, match="duplicate message") as info:
        server.receive_unmask(LIAR, answer)
    assert info.value.sender == LIAR
    assert _share_points(server, x) == []  # nothing from the repeater is counted, not even once
    assert LIAR not in server._responders
    _answer_all(run, requests, skip={LIAR})
    total = server.finish()
    # The repeater's input stays in the sum (it survived); its shares are not used.
    assert np.array_equal(total, expected)
    assert server.dropped.get(LIAR) == "unmask: duplicate message"  # and nothing more from it is read


def test_a_different_second_unmask_is_refused_and_neither_answer_is_counted():
    run, requests, expected = _to_unmask()
    server = run.server
    x = run.params.index[LIAR]
    _answer_all(run, requests, skip={LIAR})
    server.receive_unmask(LIAR, run.clients[LIAR].unmask(requests[LIAR]))
    honest = _honest_parts(run, LIAR)
    altered = [(k, o, (v + 1) % shamir.PRIME) for k, o, v in honest]  # every share wrong, same shape
    with pytest.raises(MessageError, match="duplicate message"):
        server.receive_unmask(LIAR, _seal_unmask(run, LIAR, altered))
    assert _share_points(server, x) == []
    # Four honest answers remain (= t): the sum is still exact, built without the liar's shares.
    assert np.array_equal(server.finish(), expected)


def test_a_third_unmask_after_a_duplicate_is_not_counted():
    run, requests, _expected = _to_unmask()
    server = run.server
    x = run.params.index[LIAR]
    answer = run.clients[LIAR].unmask(requests[LIAR])
    server.receive_unmask(LIAR, answer)
    with pytest.raises(MessageError, match="duplicate message"):
        server.receive_unmask(LIAR, answer)
    altered = [(k, o, (v + 1) % shamir.PRIME) for k, o, v in _honest_parts(run, LIAR)]
    try:
        server.receive_unmask(LIAR, _seal_unmask(run, LIAR, altered))
    except MessageError:
        pass  # refusing it is correct
    assert _share_points(server, x) == [], "shares of a client that already repeated itself were counted again"
    assert LIAR not in server._responders


# -- 2. malformed / misplaced shares in one answer (server.py, receive_unmask) ---------------------------


def _misplaced(run, kind_of_edit):
    honest = _honest_parts(run, LIAR)
    if kind_of_edit == "b-share where an s-share was asked":
        return [(b"b" if o == LATE else k, o, v) for k, o, v in honest]
    if kind_of_edit == "s-share where a b-share was asked":
        return [(b"s" if o == "client-01" else k, o, v) for k, o, v in honest]
    if kind_of_edit == "unknown share kind":
        return [(b"x" if o == LATE else k, o, v) for k, o, v in honest]
    if kind_of_edit == "same owner twice":
        return [(k, "client-01" if o == "client-02" else o, v) for k, o, v in honest]
    if kind_of_edit == "owner never asked for":
        return [(k, "mallory" if o == "client-02" else o, v) for k, o, v in honest]
    raise AssertionError(kind_of_edit)


@pytest.mark.parametrize(
    "edit",
    [
        "b-share where an s-share was asked",
        "s-share where a b-share was asked",
        "unknown share kind",
        "same owner twice",
        "owner never asked for",
    ],
)
def test_unrequested_or_repeated_share_drops_the_sender_and_counts_nothing(edit):
    run, requests, expected = _to_unmask()
    server = run.server
    with pytest.raises(MessageError, match="unrequested, repeated or malformed share") as info:
        server.receive_unmask(LIAR, _seal_unmask(run, LIAR, _misplaced(run, edit)))
    assert info.value.sender == LIAR
    assert server.dropped[LIAR].startswith("unmask") and "unrequested" in server.dropped[LIAR]
    assert _share_points(server, run.params.index[LIAR]) == []
    _answer_all(run, requests, skip={LIAR})
    assert np.array_equal(server.finish(), expected)


def test_share_of_wrong_byte_length_is_refused():
    run, _, _ = _to_unmask()
    honest = _honest_parts(run, LIAR)
    with pytest.raises(MessageError, match="unrequested, repeated or malformed share"):
        run.server.receive_unmask(LIAR, _seal_unmask(run, LIAR, honest, raw_len=shamir.SHARE_BYTES + 1))
    assert LIAR in run.server.dropped


def test_share_outside_the_field_is_refused():
    run, _, _ = _to_unmask()
    honest = _honest_parts(run, LIAR)
    # PRIME itself still fits in 33 bytes but is not a field element.
    outside = [(k, o, shamir.PRIME if o == LATE else v) for k, o, v in honest]
    with pytest.raises(MessageError, match="share outside the field"):
        run.server.receive_unmask(LIAR, _seal_unmask(run, LIAR, outside))
    assert "outside the field" in run.server.dropped[LIAR]
    assert _share_points(run.server, run.params.index[LIAR]) == []


def test_answer_with_a_missing_share_is_refused():
    run, _, _ = _to_unmask()
    honest = _honest_parts(run, LIAR)
    with pytest.raises(MessageError, match="wrong number of shares"):
        run.server.receive_unmask(LIAR, _seal_unmask(run, LIAR, honest[:-1]))
    assert "wrong number of shares" in run.server.dropped[LIAR]


# -- 3. inconsistent share values (server.py, finish) ---------------------------------------------------


def test_altered_mask_key_share_aborts_because_the_rebuilt_key_does_not_match():
    run, requests, _ = _to_unmask()
    server = run.server
    _answer_all(run, requests, skip={LIAR})
    altered = [(k, o, (v + 1) % shamir.PRIME if k == b"s" else v) for k, o, v in _honest_parts(run, LIAR)]
    server.receive_unmask(LIAR, _seal_unmask(run, LIAR, altered))  # well formed: accepted here
    # With a share beyond the threshold the shares' consistency check sees it first; with exactly t
    # shares only the comparison with the advertised public key can.
    with pytest.raises(ProtocolAbort, match=f"client '{LATE}': (mask key shares are inconsistent|rebuilt mask key does not match its public key)"):
        server.finish()


def _forge_to_value(run, kind: bytes, owner: str, target: int) -> int:
    """The share LIAR must send for ``owner`` so that the server's interpolation yields ``target``."""
    index = run.params.index
    held_index = 1 if kind == b"b" else 0
    points = {}
    for u in IDS:
        if u == LATE:
            continue
        client = run.clients[u]
        pair = client._own_shares if u == owner else client._held[owner]
        points[index[u]] = pair[held_index]
    xs = tuple(sorted(points)[:T])  # the server uses the T smallest points
    x_liar = index[LIAR]
    assert x_liar in xs
    weights = dict(zip(xs, shamir.lagrange_at_zero(xs), strict=True))
    rest = sum(weights[x] * points[x] for x in xs if x != x_liar) % shamir.PRIME
    return (target - rest) * pow(weights[x_liar], -1, shamir.PRIME) % shamir.PRIME


def test_mask_key_shares_rebuilding_no_32_byte_secret_abort_as_inconsistent():
    run, requests, _ = _to_unmask()
    server = run.server
    _answer_all(run, requests, skip={LIAR})
    forged = _forge_to_value(run, b"s", LATE, 1 << 256)  # a field element, but not a 32-byte secret
    triples = [(k, o, forged if (k, o) == (b"s", LATE) else v) for k, o, v in _honest_parts(run, LIAR)]
    server.receive_unmask(LIAR, _seal_unmask(run, LIAR, triples))
    # With a share beyond the threshold the consistency check catches it before reconstruction
    # (no cause); with exactly t shares, the failed conversion to a 32-byte key does (cause ProtocolError).
    with pytest.raises(ProtocolAbort, match=f"client '{LATE}': mask key shares are inconsistent") as info:
        server.finish()
    assert info.value.__cause__ is None or "not a 32-byte secret" in str(info.value.__cause__)


def test_altered_self_mask_share_never_gives_a_wrong_sum():
    run, requests, expected = _to_unmask()
    server = run.server
    _answer_all(run, requests, skip={LIAR})
    victim = "client-02"
    altered = [(k, o, (v + 1) % shamir.PRIME if (k, o) == (b"b", victim) else v) for k, o, v in _honest_parts(run, LIAR)]
    server.receive_unmask(LIAR, _seal_unmask(run, LIAR, altered))
    try:
        total = server.finish()
    except ProtocolAbort:
        return  # detecting it is correct
    assert np.array_equal(total, expected), "an altered self-mask share produced a wrong sum silently"


def test_self_mask_shares_rebuilding_no_32_byte_secret_abort_as_protocol_abort():
    run, requests, _ = _to_unmask()
    server = run.server
    _answer_all(run, requests, skip={LIAR})
    victim = "client-02"
    forged = _forge_to_value(run, b"b", victim, 1 << 256)
    triples = [(k, o, forged if (k, o) == (b"b", victim) else v) for k, o, v in _honest_parts(run, LIAR)]
    server.receive_unmask(LIAR, _seal_unmask(run, LIAR, triples))
    with pytest.raises(ProtocolAbort):
        server.finish()


# =====================================================================================================
# CKKS: the key holder's decrypt path and the protection's finalize
# =====================================================================================================

CKKS_DIM = 12
SITES = ("alice", "bob", "carol")


class _Ckks:
    def __init__(self, config: CkksConfig | None = None):
        self.config = config or CkksConfig()
        self.holder = CkksKeyHolder(self.config)
        self.client = CkksClient(self.holder.public_context(), self.config, run_id=self.holder.run_id)
        self.identities = {s: SiteIdentity.generate(s) for s in SITES}
        for s, identity in self.identities.items():
            self.holder.register_site(s, identity.public_bytes())
        rng = np.random.default_rng(5)  # test data only
        self.updates = {
            s: ClientUpdate(delta=rng.normal(0, 0.05, CKKS_DIM).astype(np.float32), weight=float(3 + i)) for i, s in enumerate(SITES)
        }

    def message(self, round_index: int, site: str, identity: SiteIdentity | None = None) -> bytes:
        return self.client.encrypt(round_index, site, self.updates[site], len(SITES), identity=identity or self.identities[site])


@pytest.fixture(scope="module")
def ckks():
    # One key holder for the module (keys are slow to make): every test uses its own round index.
    return _Ckks()


def _aggregate(round_index: int, messages) -> bytes:
    return encode_frame(KIND_AGGREGATE, round_index, SERVER, list(messages))


def _refusal(holder, round_index: int, aggregate: bytes, dim: int = CKKS_DIM) -> BaseException:
    with pytest.raises(DecryptionError) as info:
        holder.decrypt_sum(round_index, aggregate, dim)
    assert str(info.value) == "decryption failed"  # opaque to the caller
    assert info.value.__cause__ is not None
    return info.value.__cause__


def _still_decrypts(ckks, round_index: int) -> None:
    # The refusal did not burn the round: an honest sum of it decrypts afterwards.
    released = ckks.holder.decrypt_sum(round_index, _aggregate(round_index, [ckks.message(round_index, s) for s in ("alice", "bob")]), CKKS_DIM)
    assert released.contributors == ("alice", "bob")


def test_sum_of_fewer_than_min_contributors_is_not_decrypted(ckks):
    cause = _refusal(ckks.holder, 10, _aggregate(10, [ckks.message(10, "alice")]))
    assert isinstance(cause, ProtocolAbort) and "1 contributors < min_contributors 2" in str(cause)
    _still_decrypts(ckks, 10)


def test_empty_aggregate_is_not_decrypted(ckks):
    cause = _refusal(ckks.holder, 11, _aggregate(11, []))
    assert isinstance(cause, ProtocolAbort) and "0 contributors < min_contributors 2" in str(cause)


def test_contribution_with_a_bad_signature_is_not_decrypted(ckks):
    bob = decode_frame(ckks.message(12, "bob"), kind=KIND_UPDATE, round_index=12)
    signature = bytearray(bob.parts[0])
    signature[0] ^= 0x01
    tampered = encode_frame(KIND_UPDATE, 12, "bob", [bytes(signature), *bob.parts[1:]])
    cause = _refusal(ckks.holder, 12, _aggregate(12, [ckks.message(12, "alice"), tampered]))
    assert isinstance(cause, MessageError) and cause.reason == "signature does not verify" and cause.sender == "bob"
    _still_decrypts(ckks, 12)


def test_contribution_signed_by_another_key_for_a_registered_name_is_not_decrypted(ckks):
    impostor = ckks.message(13, "bob", identity=SiteIdentity.generate("bob"))
    cause = _refusal(ckks.holder, 13, _aggregate(13, [ckks.message(13, "alice"), impostor]))
    assert isinstance(cause, MessageError) and cause.reason == "signature does not verify"


def test_contribution_with_a_truncated_signature_is_not_decrypted(ckks):
    bob = decode_frame(ckks.message(14, "bob"), kind=KIND_UPDATE, round_index=14)
    short = encode_frame(KIND_UPDATE, 14, "bob", [bob.parts[0][:-1], *bob.parts[1:]])
    cause = _refusal(ckks.holder, 14, _aggregate(14, [ckks.message(14, "alice"), short]))
    assert isinstance(cause, MessageError) and cause.reason == "signature has the wrong length"


def test_contribution_from_an_unregistered_site_is_not_decrypted(ckks):
    mallory = SiteIdentity.generate("mallory")
    stranger = ckks.client.encrypt(15, "mallory", ckks.updates["carol"], 3, identity=mallory)
    cause = _refusal(ckks.holder, 15, _aggregate(15, [ckks.message(15, "alice"), stranger]))
    assert isinstance(cause, MessageError) and cause.reason == "site 'mallory' is not registered"


def test_contribution_for_another_round_is_not_decrypted(ckks):
    cause = _refusal(ckks.holder, 17, _aggregate(17, [ckks.message(17, "alice"), ckks.message(16, "bob")]))
    assert isinstance(cause, MessageError) and cause.reason == "message for round 16, expected round 17"
    _still_decrypts(ckks, 17)


def test_aggregate_framed_for_another_round_is_not_decrypted(ckks):
    messages = [ckks.message(18, s) for s in ("alice", "bob")]
    cause = _refusal(ckks.holder, 19, _aggregate(18, messages))
    assert isinstance(cause, MessageError) and cause.reason == "message for round 18, expected round 19"


def test_duplicated_contributor_is_not_decrypted(ckks):
    alice = ckks.message(20, "alice")
    cause = _refusal(ckks.holder, 20, _aggregate(20, [alice, ckks.message(20, "bob"), alice]))
    assert isinstance(cause, MessageError) and "appears twice in the aggregate" in cause.reason
    _still_decrypts(ckks, 20)


def test_same_site_with_two_different_contributions_is_not_decrypted(ckks):
    # Two distinct, validly signed updates from one site: the same site twice, not the same bytes.
    first = ckks.message(21, "alice")
    other = ckks.client.encrypt(
        21, "alice", ClientUpdate(delta=np.zeros(CKKS_DIM, np.float32), weight=1.0), 3, identity=ckks.identities["alice"]
    )
    assert first != other
    cause = _refusal(ckks.holder, 21, _aggregate(21, [first, ckks.message(21, "bob"), other]))
    assert isinstance(cause, MessageError) and "a site or a set of ciphertexts appears twice" in cause.reason


def test_another_sites_ciphertexts_under_a_valid_signature_are_a_duplicate(ckks):
    from privfl.protocols.ckks import _update_body

    alice = ckks.message(22, "alice")
    parts = list(decode_frame(alice, kind=KIND_UPDATE, round_index=22).parts[1:])
    signature = ckks.identities["bob"].sign(ckks.holder.run_id, 22, _update_body(22, "bob", parts))
    copied = encode_frame(KIND_UPDATE, 22, "bob", [signature, *parts])
    cause = _refusal(ckks.holder, 22, _aggregate(22, [alice, copied]))
    assert isinstance(cause, MessageError) and "appears twice in the aggregate" in cause.reason


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (bytes(range(64)), "bad magic"),
        (b"", "truncated message"),
        ("not bytes", "expected bytes"),
    ],
)
def test_garbage_aggregate_is_not_decrypted(ckks, garbage, reason):
    cause = _refusal(ckks.holder, 23, garbage)
    assert isinstance(cause, MessageError) and reason in cause.reason


def test_aggregate_of_the_wrong_kind_is_not_decrypted(ckks):
    update = ckks.message(24, "alice")  # an update frame where an aggregate frame is expected
    cause = _refusal(ckks.holder, 24, update)
    assert isinstance(cause, MessageError) and cause.reason == f"wrong message kind {KIND_UPDATE}, expected {KIND_AGGREGATE}"


def test_aggregate_with_trailing_bytes_is_not_decrypted(ckks):
    good = _aggregate(25, [ckks.message(25, s) for s in ("alice", "bob")])
    cause = _refusal(ckks.holder, 25, good + b"\x00")
    assert isinstance(cause, MessageError) and "trailing bytes" in cause.reason
    assert ckks.holder.decrypt_sum(25, good, CKKS_DIM).contributors == ("alice", "bob")


def test_second_sum_of_a_decrypted_round_is_refused_by_its_own_branch(ckks):
    assert ckks.holder.decrypt_sum(26, _aggregate(26, [ckks.message(26, s) for s in ("alice", "bob")]), CKKS_DIM)
    cause = _refusal(ckks.holder, 26, _aggregate(26, [ckks.message(26, s) for s in ("alice", "carol")]))
    assert isinstance(cause, ProtocolAbort) and str(cause) == "round 26 was already decrypted"


# -- the protection's finalize --------------------------------------------------------------------------


class _Tamper(DirectTransport):
    def __init__(self, step: str, replacement):
        self.step, self.replacement = step, replacement

    def deliver(self, sender, receiver, step, payload):
        return self.replacement if step == self.step else payload


def _updates():
    return {c: ClientUpdate(delta=np.full(4, 0.25, np.float32), weight=2.0) for c in ("a", "b", "c")}


def test_finalize_aborts_when_the_aggregate_is_lost():
    with pytest.raises(ProtocolAbort, match="round 3: the encrypted aggregate was lost on its way to the key holder"):
        CkksProtection().run_round(3, _updates(), _Tamper("aggregate", None))


def test_finalize_aborts_without_decrypting_a_garbage_aggregate():
    protection = CkksProtection()
    with pytest.raises(ProtocolAbort, match="round 4: the key holder refused or could not decrypt the aggregate") as info:
        protection.run_round(4, _updates(), _Tamper("aggregate", b"\x00" * 40))
    assert isinstance(info.value.__cause__, DecryptionError)
    assert isinstance(info.value.__cause__.__cause__, MessageError)
    assert 4 not in protection.key_holder._decrypted_rounds  # nothing was decrypted


def test_finalize_aborts_when_the_average_is_lost():
    with pytest.raises(ProtocolAbort, match="round 5: the average was lost on its way to the clients"):
        CkksProtection().run_round(5, _updates(), _Tamper("average", None))
