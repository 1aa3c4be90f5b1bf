"""A client's survivor checks read its own neighbourhood plus one compact bitmap, and still refuse what they refused.

The survivor set U3 travels as a bitmap over the clients' positions on the SecAgg+ cycle. A client
checks that it is in U3, that U3 has at least t members and that U3 induces a connected masking
graph (a bit-parallel scan for two runs of k/2 missing clients), and looks up only its own share
holders in it. These tests count what a client touches rather than timing it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import numpy as np
import pytest

from privfl.errors import MessageError, ProtocolAbort
from privfl.protocols.base import DirectTransport
from privfl.protocols.secagg import IdentityKey
from privfl.protocols.secagg import client as client_module
from privfl.protocols.secagg import messages as m
from privfl.protocols.secagg.client import survivor_bitmap, survivors_statement
from privfl.protocols.secagg.graph import build_graph, components, ring_connected, ring_positions
from privfl.protocols.secagg.prg import WORD
from privfl.protocols.secagg.simulate import drive, new_round

K = 6  # the same degree at every n below, so that any growth with n shows in the counts
T = 4


def _ids(n: int) -> list[str]:
    return [f"client-{i:04d}" for i in range(n)]


def _words(ids: list[str], dim: int) -> dict[str, np.ndarray]:
    return {u: np.frombuffer(secrets.token_bytes(4 * dim), dtype=WORD).copy() for u in ids}


# -- the bit-parallel connectivity test is the graph's own ------------------------------------------
def _subsets(rng: np.random.Generator, n: int) -> Iterator[set[int]]:
    for density in (0.2, 0.5, 0.8, 0.95):
        for _ in range(40):
            yield {p for p in range(n) if rng.random() < density}
    for _ in range(40):  # one or two cut-out arcs: the runs that decide connectivity
        members = set(range(n))
        for _ in range(int(rng.integers(1, 3))):
            start, length = int(rng.integers(n)), int(rng.integers(1, n // 2))
            members -= {(start + i) % n for i in range(length)}
        yield members


@pytest.mark.parametrize(("n", "k"), [(5, 2), (6, 4), (9, 2), (12, 4), (13, 6), (20, 8), (31, 4), (40, 10), (64, 18)])
def test_ring_connected_agrees_with_a_graph_search(n, k):
    rng = np.random.default_rng(n * 100 + k)  # simulation data only
    ids = _ids(n)
    seed = b"ring-connected-seed"
    graph = build_graph(ids, k, seed)
    ring = ring_positions(ids, k, seed)
    at = {p: u for u, p in ring.items()}
    checked = 0
    for members in _subsets(rng, n):
        if not members:
            continue
        bits = sum(1 << p for p in members)
        expected = components(graph, {at[p] for p in members}) == 1
        for start in sorted(members)[:3]:  # any member may run the check, from its own position
            assert ring_connected(bits, n, k, start) is expected, (sorted(members), start)
        checked += 1
    assert checked > 150


def test_ring_connected_refuses_a_start_outside_the_set_and_odd_degrees():
    with pytest.raises(ValueError):
        ring_connected(0b1110, 4, 2, 0)
    with pytest.raises(ValueError):
        ring_connected(0b1111, 6, 3, 0)


def test_bitmaps_are_canonical():
    assert m.pack_members([0, 3, 9], 10) == bytes([0b00001001, 0b10])
    assert m.unpack_members(bytes([0b00001001, 0b10]), 10, sender="server") == bytes([0b00001001, 0b10])
    assert [m.is_member(bytes([0b00001001, 0b10]), p) for p in range(10)] == [p in (0, 3, 9) for p in range(10)]
    with pytest.raises(MessageError, match="bitmap"):
        m.unpack_members(bytes([1]), 10, sender="server")  # too short
    with pytest.raises(MessageError, match="bitmap"):
        m.unpack_members(bytes([1, 0b100]), 10, sender="server")  # a position beyond the roster
    with pytest.raises(ValueError):
        m.pack_members([10], 10)


# -- what one client touches in its unmask step ----------------------------------------------------
class _CountingDict(dict):
    """A dict that counts lookups (``[]``, ``in``, ``get``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lookups = 0

    def __getitem__(self, key):
        self.lookups += 1
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self.lookups += 1
        return super().__contains__(key)

    def get(self, key, default=None):
        self.lookups += 1
        return super().get(key, default)


def _unmask_footprint(n: int, *, authenticated: bool, monkeypatch) -> dict[str, int]:
    """Plays a round at k = 6 and returns the most one client touched in its consistency and unmask steps."""
    ids = _ids(n)
    identities = {u: IdentityKey.generate() for u in ids} if authenticated else None
    run = new_round(ids, round_index=1, threshold=T, neighbours=K, dimension=4, bits=32, graph_seed=b"cost-seed-0123456", identities=identities)
    p = run.params
    parsed: list[int] = []
    original_unpack = m.unpack_ids

    def counting_unpack(data: bytes, *, sender: str | None = None) -> list[str]:
        ids_read = original_unpack(data, sender=sender)
        parsed.append(len(ids_read))
        return ids_read

    def no_graph_search(*_args, **_kwargs):
        raise AssertionError("a client searched the whole survivors' graph")

    counters = {name: _CountingDict(getattr(p, name)) for name in ("graph", "index", "ring")}
    footprint = {"lookups": 0, "longest id list": 0}

    def client_step(call):
        def step(*args):
            for counter in counters.values():
                counter.lookups = 0
            parsed.clear()
            with monkeypatch.context() as patch:
                patch.setattr(client_module.m, "unpack_ids", counting_unpack)
                patch.setattr(client_module, "components", no_graph_search)
                for name, counter in counters.items():
                    object.__setattr__(p, name, counter)
                try:
                    return call(*args)
                finally:
                    for name, counter in counters.items():
                        object.__setattr__(p, name, dict(counter))
                    footprint["lookups"] = max(footprint["lookups"], sum(c.lookups for c in counters.values()))
                    footprint["longest id list"] = max([footprint["longest id list"], *parsed])

        return step

    for c in run.clients.values():
        c.unmask = client_step(c.unmask)
        c.sign_survivors = client_step(c.sign_survivors)
    # A tenth drop after sharing, spread over the cycle: their s-shares are asked for too.
    dropping = {u: "share" for u in ids[:: 10]}
    total, _ = drive(run, _words(ids, 4), DirectTransport(), stop_after=dropping)
    assert total.shape == (4,)
    return footprint


@pytest.mark.parametrize("authenticated", [False, True], ids=["plain", "authenticated"])
def test_a_clients_survivor_checks_touch_its_neighbourhood_only(authenticated, monkeypatch):
    small = _unmask_footprint(40, authenticated=authenticated, monkeypatch=monkeypatch)
    large = _unmask_footprint(400, authenticated=authenticated, monkeypatch=monkeypatch)
    # The ids a client parses are its own holders (want_b, want_s, the signers): at most k + 1 each.
    assert small["longest id list"] <= K + 1 and large["longest id list"] <= K + 1
    # Lookups in the roster, graph and cycle tables: a few per holder, and no more at 10x the clients.
    assert large["lookups"] <= 6 * (K + 1)
    assert large["lookups"] == small["lookups"]


# -- what the checks still refuse --------------------------------------------------------------------
def _masked_round(n: int, *, drop: set[str], authenticated: bool = False):
    ids = _ids(n)
    identities = {u: IdentityKey.generate() for u in ids} if authenticated else None
    run = new_round(ids, round_index=2, threshold=T, neighbours=K, dimension=4, bits=32, graph_seed=b"refuse-seed-012345", identities=identities)
    server, words = run.server, _words(ids, 4)
    for u, c in run.clients.items():
        server.receive_advertise(u, c.advertise())
    keys = server.keys_messages()
    for u in keys:
        server.receive_shares(u, run.clients[u].share_keys(keys[u]))
    relays = server.relay_messages()
    for u in relays:
        payload = run.clients[u].masked_input(relays[u], words[u])
        if u not in drop:
            server.receive_masked_input(u, payload)
    return run


def _arc(p, start: int, length: int) -> set[str]:
    at = {q: u for u, q in p.ring.items()}
    return {at[(start + i) % len(p.client_ids)] for i in range(length)}


def _request(run, u: str, survivors: set[str]) -> bytes:
    p = run.params
    held = run.server._relayed[u]
    want_b, want_s = sorted((held | {u}) & survivors), sorted(held - survivors)
    return run.server._send(u, m.UNMASK_REQUEST, [survivor_bitmap(p, survivors), m.pack_ids(want_b), m.pack_ids(want_s)])


def test_a_client_far_from_the_gaps_still_refuses_a_disconnected_survivor_set():
    # An active server cuts two arcs of k/2 clients out of U3: the survivors split into two halves,
    # and the sum of each half would be exposed. Every survivor refuses, not only the clients next to
    # a gap: the check stays global (a local one would leave it to the gaps' neighbours, which may
    # collude with the server).
    n = 40
    run = _masked_round(n, drop=set())
    p = run.params
    cut = _arc(p, 5, K // 2) | _arc(p, 25, K // 2)
    survivors = set(p.client_ids) - cut
    assert components(p.graph, survivors) == 2
    far = _arc(p, 15, 1).pop()  # 7 positions from either gap: none of its holders is missing
    assert not (p.graph[far] & cut)
    with pytest.raises(ProtocolAbort, match="disconnected"):
        run.clients[far].unmask(_request(run, far, survivors))
    assert run.server._b_shares == {} and run.server._s_shares == {}


def test_one_long_run_of_dropouts_leaves_the_survivors_connected_and_answered():
    # Connected with one gap of k/2 missing clients: answered, as before (no stricter local rule).
    n = 40
    run = _masked_round(n, drop=set())
    p = run.params
    survivors = set(p.client_ids) - _arc(p, 5, K)
    assert components(p.graph, survivors) == 1
    for u in sorted(survivors):
        assert run.clients[u].unmask(_request(run, u, survivors))


def test_bitmap_survivor_sets_that_omit_the_client_or_are_malformed_are_refused():
    run = _masked_round(20, drop=set())
    p = run.params
    u = "client-0003"
    others = set(p.client_ids) - {u}
    omits = run.server._send(u, m.UNMASK_REQUEST, [survivor_bitmap(p, others), m.pack_ids([]), m.pack_ids([])])
    with pytest.raises(MessageError, match="omits us"):
        run.clients[u].unmask(omits)
    v = "client-0004"
    bad = bytearray(survivor_bitmap(p, p.client_ids))
    bad[-1] |= 0x80  # position 23 of a 20-client roster
    request = run.server._send(v, m.UNMASK_REQUEST, [bytes(bad), m.pack_ids([]), m.pack_ids([])])
    with pytest.raises(MessageError, match="bitmap"):
        run.clients[v].unmask(request)
    w = "client-0005"
    short = run.server._send(w, m.UNMASK_REQUEST, [survivor_bitmap(p, p.client_ids)[:-1], m.pack_ids([]), m.pack_ids([])])
    with pytest.raises(MessageError, match="bitmap"):
        run.clients[w].unmask(short)


def test_consistency_signatures_from_outside_the_holders_are_refused():
    run = _masked_round(20, drop=set(), authenticated=True)
    server, p = run.server, run.params
    checks = server.consistency_requests()
    signatures = {}
    for u in checks:
        reply = run.clients[u].sign_survivors(checks[u])
        server.receive_consistency(u, reply)
        signatures[u] = server._survivor_signatures[u]
    u = "client-0000"
    stranger = next(v for v in p.client_ids if v != u and v not in p.graph[u])
    signers = sorted(p.graph[u] | {u, stranger})
    bitmap = survivor_bitmap(p, p.client_ids)
    held = server._relayed[u]
    request = server._send(
        u, m.UNMASK_REQUEST,
        [bitmap, m.pack_ids(held | {u}), m.pack_ids([]), m.pack_ids(signers), b"".join(signatures[v] for v in signers)],
    )
    with pytest.raises(ProtocolAbort, match="holds none of our shares"):
        run.clients[u].unmask(request)
    # The signed statement is bound to the bitmap: another set does not verify.
    from privfl.protocols.secagg.keys import verify_signature

    other = survivor_bitmap(p, set(p.client_ids) - {stranger})
    with pytest.raises(MessageError, match="does not verify"):
        verify_signature(p.identity_key(u), signatures[u], survivors_statement(p, other), signer=u)
    verify_signature(p.identity_key(u), signatures[u], survivors_statement(p, bitmap), signer=u)


def test_a_client_builds_only_its_own_row_of_the_graph():
    # A networked client decodes the round's parameters at every step (one process per step): it
    # must not build the n rows of the graph (O(n k)) to read its own.
    from privfl.protocols.secagg import SecAggClient
    from privfl.protocols.secagg.keys import KeyPair
    from privfl.protocols.secagg.params import RoundParams
    from privfl.protocols.secagg.state import decode_params, encode_params, export_client, restore_client

    ids = _ids(2000)
    params = RoundParams(
        round_index=4, client_ids=tuple(ids), threshold=T, neighbours=K, graph_seed=secrets.token_bytes(16),  # a fresh graph
        dimension=4, server_public_key=KeyPair.generate().public,
    )
    decoded = decode_params(encode_params(params), round_index=4)
    me = ids[7]
    client = SecAggClient(me, decoded)
    restored = restore_client(export_client(client), round_index=4, client_id=me)
    restored.advertise()
    rows = decoded.graph._rows  # the rows built so far (shared by every object of this graph)
    assert set(rows) <= {ids[0], me}  # RoundParams reads the first client's row for the holder count
    assert decoded.graph[me] == params.graph[me] and len(decoded.graph[me]) == K
