"""End-to-end tests of the secure-aggregation protocol: exactness, dropouts, aborts, secrecy, bad messages."""

from __future__ import annotations

import dataclasses
import secrets

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from privfl.errors import ConfigError, MessageError, ProtocolAbort, ProtocolError
from privfl.protocols.base import DirectTransport
from privfl.protocols.secagg import build_graph, run_secure_sum
from privfl.protocols.secagg import messages as m
from privfl.protocols.secagg.client import survivor_bitmap
from privfl.protocols.secagg.params import min_threshold
from privfl.protocols.secagg.prg import WORD
from privfl.protocols.secagg.server import SecAggServer
from privfl.protocols.secagg.simulate import ROUNDS, drive, new_round


def _ids(n: int) -> list[str]:
    return [f"client-{i:02d}" for i in range(n)]


def _inputs(n: int, dim: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)  # test data only
    return {u: rng.uniform(-1, 1, dim) for u in _ids(n)}


def _words(n: int, dim: int, bits: int = 32) -> dict[str, np.ndarray]:
    # Encoded inputs with known values, so tests can look for them in the server's state.
    return {u: (np.frombuffer(secrets.token_bytes(4 * dim), dtype=WORD) & np.uint32((1 << bits) - 1)).copy() for u in _ids(n)}


# -- exactness under dropouts (property) -----------------------------------------------------------
@st.composite
def scenarios(draw):
    n = draw(st.integers(3, 50))
    complete = draw(st.booleans())
    if complete:
        neighbours = None
        k = n - 1
    else:
        k = draw(st.integers(2, n - 1).filter(lambda k: not (k % 2 and n % 2 and k != n - 1)))
        neighbours = k
    # Above half of the k + 1 share holders: the least threshold the split-view bound allows, upwards.
    threshold = draw(st.integers(min_threshold(k + 1), k + 1))
    ids = _ids(n)
    fates = draw(st.lists(st.sampled_from(("stay",) * 6 + ROUNDS), min_size=n, max_size=n))
    drop_after = {r: {u for u, f in zip(ids, fates, strict=True) if f == r} for r in ROUNDS}
    return n, neighbours, threshold, drop_after, draw(st.integers(0, 2**31))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_exact_sum_of_survivors_or_clean_abort(scenario):
    n, neighbours, threshold, drop_after, seed = scenario
    inputs = _inputs(n, 6, seed)
    after_share = set(_ids(n)) - drop_after["advertise"] - drop_after["share"]
    try:
        result = run_secure_sum(inputs, threshold=threshold, neighbours=neighbours, drop_after=drop_after, seed=seed)
    except ProtocolAbort as exc:
        assert "<" in str(exc) or "components" in str(exc)
        if neighbours is None:
            # Complete graph: abort exactly when some step keeps fewer than t clients.
            alive = [n, n - len(drop_after["advertise"]), len(after_share), len(after_share - drop_after["masked_input"])]
            assert min(alive) < threshold
        return
    survivors = set(result.survivors)
    assert survivors <= after_share
    if neighbours is None:
        assert survivors == after_share
    assert set(result.dropped) == set(inputs) - survivors
    expected = sum(inputs[u] for u in survivors)
    assert np.all(np.abs(result.total - expected) <= result.max_error)
    # The documented bound exactly: m steps, with the finest step that cannot overflow for n clients.
    assert result.quantizer.step == 1.0 / ((2**32 - 1) // (2 * n))
    assert result.max_error == pytest.approx(len(survivors) * result.quantizer.step)
    assert result.max_error < 1.2e-6


def test_every_round_dropout_recovers_exact_words():
    n, dim = 12, 33
    run = new_round(_ids(n), round_index=5, threshold=4, neighbours=6, dimension=dim, bits=32, graph_seed=b"g" * 32)
    words = _words(n, dim)
    stop = {"client-01": "advertise", "client-02": "share", "client-03": "masked_input", "client-04": "unmask"}
    total, transcript = drive(run, words, DirectTransport(), stop_after=stop)
    survivors = run.server.survivors
    assert set(survivors) == set(_ids(n)) - {"client-01", "client-02"}
    expected = sum(words[u].astype(np.uint64) for u in survivors) % (1 << 32)
    assert np.array_equal(total, expected.astype(WORD))
    assert transcript.bytes_up["client-01"]["share"] == 0 and transcript.bytes_up["client-01"]["advertise"] > 0


def test_pairwise_masks_bound_to_a_context_cancel_only_when_every_client_holds_the_same():
    """Each client binds its pairwise masks to its own ``mask_context`` (deployments: the clip norm and site
    count it planned its noise share for): told different values by the server, the sum reveals nothing."""
    from privfl.protocols.secagg.client import SecAggClient

    n, dim = 5, 64
    words = _words(n, dim)
    expected = (sum(w.astype(np.uint64) for w in words.values()) % (1 << 32)).astype(WORD)
    for contexts, exact in (({}, True), ({"client-02": b"S=40"}, False)):
        run = new_round(_ids(n), round_index=3, threshold=3, neighbours=None, dimension=dim, bits=32, graph_seed=b"g" * 32)
        for u in run.params.client_ids:
            run.clients[u] = SecAggClient(u, dataclasses.replace(run.params, mask_context=contexts.get(u, b"S=0.4")), None)
        total, _ = drive(run, words, DirectTransport())
        if exact:
            assert np.array_equal(total, expected)
        else:
            # The uncancelled masks of client-02 and its four neighbours: every word is off, by pseudorandom amounts.
            assert np.count_nonzero(total != expected) >= dim - 1
    with pytest.raises(ConfigError, match="mask_context"):
        dataclasses.replace(run.params, mask_context=b"x" * 65)


def test_a_client_that_requires_every_invited_client_unmasks_no_subset():
    """Client-level DP: a subset's sum carries less noise than planned, so such a client refuses to unmask it,
    whatever the server does; without the requirement the survivors' sum is recovered as usual."""
    n, dim = 5, 16
    words = _words(n, dim)
    # client-04 never sends a masked input (after "share"), or never shares (after "advertise": the others then
    # hold its keys but not its shares, a smaller closed group the server could unmask).
    for required, stop_at, refusal in ((False, "share", ""), (True, "share", "invited clients are missing"),
                                       (False, "advertise", ""), (True, "advertise", "neighbours are missing")):
        run = new_round(_ids(n), round_index=4, threshold=3, neighbours=None, dimension=dim, bits=32, graph_seed=b"g" * 32)
        for client in run.clients.values():
            client.require_every_client = required
        stop = {"client-04": stop_at}
        if required:
            with pytest.raises(ProtocolAbort):
                drive(run, words, DirectTransport(), stop_after=stop)
            refused = {u: why for u, why in run.server.dropped.items() if u != "client-04"}
            assert refused and all(refusal in why for why in refused.values())
        else:
            total, _ = drive(run, words, DirectTransport(), stop_after=stop)
            expected = sum(words[u].astype(np.uint64) for u in _ids(n)[:4]) % (1 << 32)
            assert np.array_equal(total, expected.astype(WORD))


def test_small_modulus_sums_exactly():
    n, dim, bits = 7, 50, 12
    run = new_round(_ids(n), round_index=0, threshold=4, neighbours=None, dimension=dim, bits=bits, graph_seed=b"s" * 16)
    words = _words(n, dim, bits)
    total, _ = drive(run, words, DirectTransport(), stop_after={"client-00": "share"})
    expected = sum(words[u].astype(np.uint64) for u in run.server.survivors) % (1 << bits)
    assert np.array_equal(total, expected.astype(WORD))


# -- abort below threshold ---------------------------------------------------------------------------
@pytest.mark.parametrize("round_name", ["advertise", "share", "masked_input"])
def test_abort_below_threshold_names_the_counts(round_name):
    inputs = _inputs(6, 4, 0)
    with pytest.raises(ProtocolAbort, match=r"3 survivors < threshold 4") as info:
        run_secure_sum(inputs, threshold=4, drop_after={round_name: set(_ids(6)[:3])})
    assert info.value.survivors == 3 and info.value.threshold == 4


def test_abort_in_unmask_reveals_no_secret():
    n = 6
    run = new_round(_ids(n), round_index=0, threshold=4, neighbours=None, dimension=8, bits=32, graph_seed=b"s" * 16)
    stop = {u: "masked_input" for u in _ids(n)[:3]}
    with pytest.raises(ProtocolAbort, match=r"3 survivors < threshold 4"):
        drive(run, _words(n, 8), DirectTransport(), stop_after=stop)
    # The three that answered gave b-shares only; no self-mask seed has t shares.
    assert all(len(shares) < 4 for shares in run.server._b_shares.values())
    assert run.server._s_shares == {}


def test_disconnected_survivors_abort_before_any_share_is_asked():
    ids = _ids(8)
    graph = build_graph(ids, 2, b"ring-seed-0123456")
    a = ids[0]
    b = next(v for v in ids if v != a and v not in graph[a] and not (graph[v] & graph[a]))
    run = new_round(ids, round_index=0, threshold=2, neighbours=2, dimension=4, bits=32, graph_seed=b"ring-seed-0123456")
    with pytest.raises(ProtocolAbort, match="2 components"):
        drive(run, _words(8, 4), DirectTransport(), stop_after={a: "share", b: "share"})
    assert run.server._b_shares == {} and run.server._s_shares == {}


def test_config_errors_name_field_and_value():
    inputs = _inputs(5, 3, 0)
    for kwargs, name, value in [
        (dict(threshold=6), "threshold", 6),
        (dict(threshold=1), "threshold", 1),
        (dict(threshold=2, neighbours=5), "neighbours", 5),
        (dict(threshold=2, neighbours=3), "neighbours", 3),
        (dict(threshold=4, neighbours=2), "threshold", 4),
        (dict(threshold=2), "threshold", 2),  # 2 <= 5/2: below the split-view bound
        (dict(threshold=3, bits=2), "bits", 2),
        (dict(threshold=3, drop_after={"later": {"client-00"}}), "drop_after", "later"),
    ]:
        with pytest.raises(ConfigError) as info:
            run_secure_sum(inputs, **kwargs)
        assert (info.value.field, info.value.value) == (name, value)
        assert name in str(info.value)


# -- secrecy ---------------------------------------------------------------------------------------
def _walk(obj, seen=None):
    """Yields every value reachable from obj (dicts, sequences, sets, objects' __dict__ and slots)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    yield obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(k, seen)
            yield from _walk(v, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _walk(v, seen)
    elif isinstance(obj, (bytes, bytearray, str, int, float, np.ndarray)) or obj is None:
        return
    else:
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                yield from _walk(getattr(obj, f.name), seen)
        if hasattr(obj, "__dict__"):
            yield from _walk(vars(obj), seen)


def _holds(values, secret_words: np.ndarray) -> bool:
    needle = secret_words.tobytes()[:64]
    for v in values:
        if isinstance(v, np.ndarray) and v.size and needle in np.ascontiguousarray(v).tobytes():
            return True
        if isinstance(v, (bytes, bytearray)) and needle in v:
            return True
    return False


@pytest.mark.parametrize(("neighbours", "threshold"), [(None, 6), (4, 3)])
def test_server_state_and_transcript_never_hold_an_unmasked_input(neighbours, threshold):
    n, dim = 10, 256
    run = new_round(_ids(n), round_index=2, threshold=threshold, neighbours=neighbours, dimension=dim, bits=32, graph_seed=b"x" * 16)
    words = _words(n, dim)
    stop = {"client-03": "share", "client-04": "masked_input"}
    snapshots = []

    class Watching(DirectTransport):
        def deliver(self, sender, receiver, step, payload):
            snapshots.append(list(_walk(run.server)))  # the server's state at every step
            return payload

    total, transcript = drive(run, words, Watching(), stop_after=stop, record=True)
    snapshots.append(list(_walk(run.server)))
    payloads = [p for (_, _, _, p) in transcript.messages]
    assert len(payloads) > 4 * n
    for u, w in words.items():
        assert not any(_holds(values, w) for values in snapshots), u
        assert not any(w.tobytes()[:64] in p for p in payloads), u
    # The check can fail: the sum is there once it is returned, and a planted input would be found.
    expected = sum(words[u].astype(np.uint64) for u in run.server.survivors) % (1 << 32)
    assert _holds([total], expected.astype(WORD))
    assert _holds(list(_walk({"planted": [words["client-00"]]})), words["client-00"])


def test_masked_vectors_look_uniform():
    n, dim = 5, 4096
    run = new_round(_ids(n), round_index=0, threshold=3, neighbours=None, dimension=dim, bits=32, graph_seed=b"u" * 16)
    zeros = {u: np.zeros(dim, dtype=WORD) for u in _ids(n)}  # maximally structured inputs
    _, transcript = drive(run, zeros, DirectTransport(), record=True)
    masked = [p for (s, _, step, p) in transcript.messages if step == "masked_input"]
    assert len(masked) == n
    for payload in masked:
        body = np.frombuffer(payload[-16 - 4 * dim : -16], dtype=np.uint8)
        counts = np.bincount(body, minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4
    assert stats.chisquare(np.bincount(zeros["client-00"].view(np.uint8), minlength=256)).pvalue < 1e-4


# -- bad messages ----------------------------------------------------------------------------------
class Tamper(DirectTransport):
    """Alters the message one client sends at one step."""

    def __init__(self, victim: str, step: str, how):
        self.victim, self.step, self.how = victim, step, how

    def deliver(self, sender, receiver, step, payload):
        if sender == self.victim and step == self.step:
            return self.how(payload)
        return payload


def _flip(i):
    return lambda p: p[:i] + bytes([p[i] ^ 0x01]) + p[i + 1 :]


def _wrong_round(p):
    # header: magic(4) kind(1) round(4)
    return p[:5] + (int.from_bytes(p[5:9], "big") + 1).to_bytes(4, "big") + p[9:]


CASES = {
    "truncated": lambda p: p[: len(p) // 2],
    "empty": lambda p: b"",
    "oversized": lambda p: p + bytes(1 << 20),
    "trailing byte": lambda p: p + b"\x00",
    "bad tag": _flip(-1),
    "altered body": _flip(-40),
    "wrong round": _wrong_round,
    "not bytes": lambda p: "text",
}


@pytest.mark.parametrize("step", ["advertise", "share", "masked_input", "unmask"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_message_drops_its_sender_and_the_round_goes_on(step, case):
    inputs = _inputs(6, 5, 1)
    victim = "client-02"
    result = run_secure_sum(inputs, threshold=3, neighbours=4, transport=Tamper(victim, step, CASES[case]), seed=3)
    if step == "unmask":
        # Its input is already in the sum; only its shares are ignored.
        assert victim in result.survivors
    else:
        assert victim not in result.survivors
        assert result.dropped[victim].startswith(step)
    assert len(result.survivors) >= 5
    expected = sum(inputs[u] for u in result.survivors)
    assert np.all(np.abs(result.total - expected) <= result.max_error)


def test_altered_server_message_drops_the_receiver():
    inputs = _inputs(6, 5, 1)

    class Downlink(DirectTransport):
        def deliver(self, sender, receiver, step, payload):
            if receiver == "client-01" and step == "share_relay":
                return _flip(len(payload) // 2)(payload)
            return payload

    result = run_secure_sum(inputs, threshold=4, transport=Downlink())
    assert "client-01" not in result.survivors
    assert "authentication" in result.dropped["client-01"] or "client stopped" in result.dropped["client-01"]
    assert np.all(np.abs(result.total - sum(inputs[u] for u in result.survivors)) <= result.max_error)


def test_message_claiming_another_sender_is_rejected():
    inputs = _inputs(5, 4, 2)
    stolen = {}

    class Swap(DirectTransport):
        def deliver(self, sender, receiver, step, payload):
            if step == "advertise" and sender == "client-00":
                stolen["p"] = payload
            if step == "advertise" and sender == "client-01":
                return stolen["p"]  # client-00's message arriving on client-01's connection
            return payload

    result = run_secure_sum(inputs, threshold=3, transport=Swap())
    assert "client-01" in result.dropped and "claims sender" in result.dropped["client-01"]
    assert "client-00" in result.survivors


def test_duplicate_and_unknown_senders_are_typed_errors():
    n = 5
    run = new_round(_ids(n), round_index=0, threshold=3, neighbours=None, dimension=4, bits=32, graph_seed=b"d" * 16)
    server: SecAggServer = run.server
    adverts = {u: c.advertise() for u, c in run.clients.items()}
    with pytest.raises(MessageError, match="unknown client id"):
        server.receive_advertise("mallory", adverts["client-00"])
    for u, p in adverts.items():
        server.receive_advertise(u, p)
    with pytest.raises(MessageError, match="duplicate"):
        server.receive_advertise("client-04", adverts["client-04"])
    assert "duplicate" in server.dropped["client-04"]
    keys = server.keys_messages()
    assert set(keys) == set(_ids(4))
    shares = {u: run.clients[u].share_keys(keys[u]) for u in keys}
    for u, p in shares.items():
        server.receive_shares(u, p)
    with pytest.raises(MessageError, match="duplicate"):
        server.receive_shares("client-03", shares["client-03"])
    relays = server.relay_messages()
    assert set(relays) == set(_ids(3))
    words = _words(n, 4)
    masked = {u: run.clients[u].masked_input(relays[u], words[u]) for u in relays}
    for u, p in masked.items():
        server.receive_masked_input(u, p)
    with pytest.raises(MessageError, match="duplicate"):
        server.receive_masked_input("client-00", masked["client-00"])
    with pytest.raises(ProtocolAbort, match="2 survivors < threshold 3"):
        server.unmask_requests()


def test_out_of_order_calls_are_protocol_errors():
    run = new_round(_ids(3), round_index=0, threshold=2, neighbours=None, dimension=4, bits=32, graph_seed=b"o" * 16)
    client = run.clients["client-00"]
    with pytest.raises(ProtocolError):
        client.unmask(b"")
    with pytest.raises(ProtocolError):
        run.server.relay_messages()


# -- refusing to reveal both shares -----------------------------------------------------------------
def _round_until_unmask(n=6, dim=8):
    run = new_round(_ids(n), round_index=0, threshold=4, neighbours=None, dimension=dim, bits=32, graph_seed=b"r" * 16)
    server = run.server
    for u, c in run.clients.items():
        server.receive_advertise(u, c.advertise())
    keys = server.keys_messages()
    for u in keys:
        server.receive_shares(u, run.clients[u].share_keys(keys[u]))
    relays = server.relay_messages()
    late = "client-05"  # shares, computes its masked input, but it arrives too late
    words = _words(n, dim)
    for u in relays:
        payload = run.clients[u].masked_input(relays[u], words[u])
        if u != late:
            server.receive_masked_input(u, payload)
    return run, late


def test_client_refuses_to_reveal_both_shares_of_one_client():
    run, late = _round_until_unmask()
    server = run.server
    server.unmask_requests()  # honest requests exist; now play a greedy server instead
    survivors = [u for u in _ids(6) if u != late]
    greedy = server._send(
        "client-00", m.UNMASK_REQUEST, [survivor_bitmap(run.params, survivors), m.pack_ids([*survivors, late]), m.pack_ids([late])]
    )
    with pytest.raises(ProtocolAbort, match="both shares"):
        run.clients["client-00"].unmask(greedy)
    # A refusing client is done: it will not answer a second, honest-looking request either.
    honest = server._send("client-00", m.UNMASK_REQUEST, [survivor_bitmap(run.params, survivors), m.pack_ids(survivors), m.pack_ids([late])])
    with pytest.raises(ProtocolError):
        run.clients["client-00"].unmask(honest)
    # Nor will a client reveal its own mask key, or a b-share of a client the survivor list omits.
    own = server._send("client-01", m.UNMASK_REQUEST, [survivor_bitmap(run.params, survivors), m.pack_ids([]), m.pack_ids(["client-01"])])
    with pytest.raises(ProtocolAbort, match="own mask key"):
        run.clients["client-01"].unmask(own)
    split = server._send("client-02", m.UNMASK_REQUEST, [survivor_bitmap(run.params, survivors), m.pack_ids([late]), m.pack_ids([])])
    with pytest.raises(ProtocolAbort, match="inconsistent"):
        run.clients["client-02"].unmask(split)


def test_honest_request_is_answered_once():
    run, _late = _round_until_unmask()
    requests = run.server.unmask_requests()
    reply = run.clients["client-00"].unmask(requests["client-00"])
    assert reply
    with pytest.raises(ProtocolError):
        run.clients["client-00"].unmask(requests["client-00"])


def test_reprs_hide_secrets():
    run, _ = _round_until_unmask()
    text = repr(run.clients["client-00"]) + repr(run.server) + repr(run.params)
    assert "graph_seed" not in text and "private" not in text
    assert run.clients["client-00"]._self_seed.hex() not in text


def test_server_keeps_no_vector_and_a_different_authentic_duplicate_keeps_the_first():
    n, dim = 5, 16
    run = new_round(_ids(n), round_index=0, threshold=3, neighbours=None, dimension=dim, bits=32, graph_seed=b"q" * 16)
    server, clients = run.server, run.clients
    for u, c in clients.items():
        server.receive_advertise(u, c.advertise())
    keys = server.keys_messages()
    for u in keys:
        server.receive_shares(u, clients[u].share_keys(keys[u]))
    relays = server.relay_messages()
    words = _words(n, dim)
    for u in relays:
        server.receive_masked_input(u, clients[u].masked_input(relays[u], words[u]))
    # Only tags are held: no reference to any received payload survives in the server's state.
    assert not any(isinstance(v, np.ndarray) and v.base is not None for v in _walk(server))
    # A second, different vector that authenticates can come only from the client (it holds the key).
    key = clients["client-01"]._key(m.MASKED_INPUT, m.UP)
    other = m.seal_vector(key, m.MASKED_INPUT, 0, "client-01", length=dim, fill=lambda out: out.fill(7))
    with pytest.raises(MessageError, match="different one"):
        server.receive_masked_input("client-01", other)
    requests = server.unmask_requests()
    assert "client-01" in server.survivors  # its first input is still in the sum, so it must be unmasked
    for u, r in requests.items():
        if u != "client-01":
            server.receive_unmask(u, clients[u].unmask(r))
    expected = sum(words[u].astype(np.uint64) for u in _ids(n)) % (1 << 32)
    assert np.array_equal(server.finish(), expected.astype(WORD))
