"""The split-view attack on secure aggregation, and the t > h/2 bound that stops it.

A malicious server drives real client state machines through their byte messages. It tells one group
of the victim's share holders that the victim survived (they reveal b-shares of its self-mask seed) and
another group that it dropped (they reveal s-shares of its pairwise-mask key). With 2t <= h share
holders both groups can reach t, and the server strips every mask from the victim's masked input.

Below the bound the attack must succeed (so this test can fail); the rounds below the bound are built
only inside the private, test-only ``_unsafe_allow_low_threshold`` block. At the enforced bound it must
fail, in the plain and in the authenticated mode.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from privfl.errors import ConfigError, ProtocolAbort, ProtocolError
from privfl.protocols.base import ClientUpdate, DirectTransport
from privfl.protocols.secagg import SecAggConfig, SecAggProtection, SecAggServer, run_secure_sum, simulate
from privfl.protocols.secagg import messages as m
from privfl.protocols.secagg import params as params_module
from privfl.protocols.secagg import shamir
from privfl.protocols.secagg.client import SecAggClient, pairwise_mask_key, self_mask_key
from privfl.protocols.secagg.graph import check_neighbours
from privfl.protocols.secagg.keys import IdentityKey, KeyPair, agree, private_key_from_bytes
from privfl.protocols.secagg.params import RoundParams, _unsafe_allow_low_threshold, check_threshold, min_threshold
from privfl.protocols.secagg.prg import WORD, apply_masks
from privfl.protocols.secagg.simulate import drive, new_round

ROUND = 9
DIM = 24


def _ids(n: int) -> list[str]:
    return [f"client-{i:02d}" for i in range(n)]


def _words(ids: list[str]) -> dict[str, np.ndarray]:
    return {u: np.frombuffer(secrets.token_bytes(4 * DIM), dtype=WORD).copy() for u in ids}


@dataclass
class Outcome:
    """What the malicious server got: the victim's input if it could unmask it, and the share counts."""

    recovered: np.ndarray | None
    b_shares: dict[int, int]
    s_shares: dict[int, int]
    refusals: dict[str, str] = field(default_factory=dict)


def _open_reply(server: SecAggServer, u: str, kind: int, payload: bytes):
    key = m.channel_key(server._channels[u], ROUND, u, kind, m.UP)
    return m.open_message(payload, kind=kind, round_index=ROUND, sender=u, max_bytes=1 << 20, key=key)[0]


def split_view_attack(
    n: int,
    threshold: int,
    *,
    authenticated: bool,
    neighbours: int | None = None,
    group_b: set[str] | None = None,
    victim: str = "client-00",
) -> tuple[Outcome, np.ndarray]:
    """Plays rounds 0-2 honestly, then the split view against ``victim``.

    Args:
        group_b: the victim's share holders told that it dropped (default: as many as fit while the
            others, with the victim, still number at least t). Clients holding no share of the victim
            sign group B's set, which helps B's members reach t signatures in authenticated mode.

    Returns:
        (what the server obtained, the victim's true encoded input).
    """
    ids = _ids(n)
    identities = {u: IdentityKey.generate() for u in ids} if authenticated else None
    run = new_round(
        ids, round_index=ROUND, threshold=threshold, neighbours=neighbours, dimension=DIM, bits=32,
        graph_seed=b"split-view-graph-seed", identities=identities,
    )
    server, clients, p = run.server, run.clients, run.params
    words = _words(ids)

    # Rounds 0-2, honest: the server routes keys and sealed shares and keeps the victim's masked input.
    for u in ids:
        server.receive_advertise(u, clients[u].advertise())
    keys = server.keys_messages()
    for u in keys:
        server.receive_shares(u, clients[u].share_keys(keys[u]))
    relays = server.relay_messages()
    masked = {u: clients[u].masked_input(relays[u], words[u]) for u in relays}
    for u, payload in masked.items():
        server.receive_masked_input(u, payload)
    key = m.channel_key(server._channels[victim], ROUND, victim, m.MASKED_INPUT, m.UP)
    y_victim = m.open_vector(masked[victim], kind=m.MASKED_INPUT, round_index=ROUND, sender=victim, length=DIM, key=key).copy()

    # The split: A is told the victim survived (survivor set = everyone), B that it dropped.
    holders = sorted(p.graph[victim])  # the victim's other share holders
    if group_b is None:
        group_b = set(holders[threshold - 1 :])  # the victim plus t - 1 holders stay in A
    group_b = set(group_b)
    outsiders = set(ids) - set(holders) - {victim}
    everyone, without_victim = frozenset(ids), frozenset(ids) - {victim}
    view = {u: (without_victim if u in group_b or u in outsiders else everyone) for u in ids}

    refusals: dict[str, str] = {}
    signatures: dict[str, bytes] = {}
    if authenticated:
        for u in ids:
            request = server._send(u, m.CHECK_REQUEST, [m.pack_ids(view[u])])
            try:
                signatures[u] = _open_reply(server, u, m.CHECK, clients[u].sign_survivors(request)).parts[0]
            except ProtocolError as exc:
                refusals[u] = str(exc)

    b_shares: dict[int, int] = {}
    s_shares: dict[int, int] = {}
    for u in ids:
        if u in refusals:
            continue
        survivors = view[u]
        relayed = server._relayed[u]
        parts = [m.pack_ids(survivors), m.pack_ids((relayed | {u}) & survivors), m.pack_ids(relayed - survivors)]
        if authenticated:
            # Every signature this client's holders made on the set it was shown.
            signers = sorted(v for v in (p.graph[u] | {u}) if v in signatures and view[v] == survivors)
            parts += [m.pack_ids(signers), b"".join(signatures[v] for v in signers)]
        try:
            reply = clients[u].unmask(server._send(u, m.UNMASK_REQUEST, parts))
        except ProtocolError as exc:
            refusals[u] = str(exc)
            continue
        frame = _open_reply(server, u, m.UNMASK, reply)
        for i in range(0, len(frame.parts), 3):
            kind, owner, raw = frame.parts[i : i + 3]
            if owner.decode() == victim:
                (b_shares if kind == b"b" else s_shares)[p.index[u]] = int.from_bytes(raw, "big")

    outcome = Outcome(recovered=None, b_shares=b_shares, s_shares=s_shares, refusals=refusals)
    if len(b_shares) >= threshold and len(s_shares) >= threshold:
        seed = shamir.int_to_secret(shamir.reconstruct(b_shares, threshold))
        s_private = private_key_from_bytes(shamir.int_to_secret(shamir.reconstruct(s_shares, threshold)))
        assert s_private.public_key().public_bytes_raw() == server._public_keys[victim][1]
        streams = [(self_mask_key(seed, ROUND, victim), -1)]
        for v in server._relayed[victim]:
            shared = agree(s_private, server._public_keys[v][1])
            streams.append((pairwise_mask_key(shared, ROUND, victim, v), -p.sign(victim, v)))
        apply_masks(y_victim, streams)
        outcome.recovered = y_victim
    return outcome, words[victim]


# -- the attack works below the bound ---------------------------------------------------------------
BELOW = [(4, 2), (6, 3), (7, 3)]


@pytest.mark.parametrize("authenticated", [False, True], ids=["plain", "authenticated"])
@pytest.mark.parametrize(("n", "threshold"), BELOW)
def test_split_view_unmasks_the_victim_below_the_bound(n, threshold, authenticated):
    assert 2 * threshold <= n
    with pytest.raises(ConfigError):
        new_round(_ids(n), round_index=ROUND, threshold=threshold, neighbours=None, dimension=DIM, bits=32, graph_seed=b"x" * 16)
    with _unsafe_allow_low_threshold():
        outcome, truth = split_view_attack(n, threshold, authenticated=authenticated)
    assert outcome.refusals == {}
    assert outcome.recovered is not None
    assert np.array_equal(outcome.recovered, truth)  # bit-exact: the victim's input, every mask stripped


@pytest.mark.parametrize("authenticated", [False, True], ids=["plain", "authenticated"])
def test_split_view_unmasks_a_secagg_plus_victim_below_the_bound(authenticated):
    # k = 4: 5 share holders per client, t = 2 <= 5/2.
    with _unsafe_allow_low_threshold():
        outcome, truth = split_view_attack(10, 2, authenticated=authenticated, neighbours=4)
    assert outcome.recovered is not None and np.array_equal(outcome.recovered, truth)


# -- and fails at the enforced bound ----------------------------------------------------------------
@pytest.mark.parametrize("authenticated", [False, True], ids=["plain", "authenticated"])
@pytest.mark.parametrize("n", [4, 6, 7])
def test_split_view_fails_at_the_enforced_threshold(n, authenticated):
    threshold = min_threshold(n)
    assert 2 * threshold > n
    outcome, truth = split_view_attack(n, threshold, authenticated=authenticated)
    assert outcome.recovered is None
    # One group always falls short: h - t < t holders are left for it.
    assert min(len(outcome.b_shares), len(outcome.s_shares)) < threshold
    told_dropped = set(_ids(n)[threshold:])
    if authenticated:
        # They see fewer than t signatures on their survivor set and reveal nothing at all.
        assert set(outcome.refusals) == told_dropped
        assert all("valid signatures" in reason for reason in outcome.refusals.values())
        assert outcome.s_shares == {}


@pytest.mark.parametrize("authenticated", [False, True], ids=["plain", "authenticated"])
def test_split_view_fails_at_the_enforced_threshold_with_secagg_plus(authenticated):
    outcome, _ = split_view_attack(10, 3, authenticated=authenticated, neighbours=4)
    assert outcome.recovered is None and min(len(outcome.b_shares), len(outcome.s_shares)) < 3


@pytest.mark.parametrize("authenticated", [False, True], ids=["plain", "authenticated"])
@pytest.mark.parametrize("n", [4, 5])
def test_no_split_of_the_holders_works_at_the_enforced_threshold(n, authenticated):
    # Every way of telling the victim's holders "survived" or "dropped": none yields both secrets.
    threshold = min_threshold(n)
    others = _ids(n)[1:]
    for size in range(len(others) + 1):
        for group_b in itertools.combinations(others, size):
            outcome, _ = split_view_attack(n, threshold, authenticated=authenticated, group_b=set(group_b))
            assert outcome.recovered is None, group_b
            assert len(outcome.b_shares) + len(outcome.s_shares) <= n  # each honest holder gives one kind at most


# -- where the bound is enforced ---------------------------------------------------------------------
def test_rounds_below_the_bound_are_refused_with_the_field_value_and_bound():
    inputs = {u: np.zeros(3) for u in _ids(4)}
    with pytest.raises(ConfigError) as info:
        run_secure_sum(inputs, threshold=2)
    assert (info.value.field, info.value.value) == ("threshold", 2)
    assert "with 4 share holders it must be > 2" in str(info.value) and "lies about who dropped" in str(info.value)
    with pytest.raises(ConfigError, match=r"threshold=3: with 7 share holders it must be > 3\.5 .*at least 4"):
        run_secure_sum({u: np.zeros(3) for u in _ids(7)}, threshold=3)
    with pytest.raises(ConfigError, match="with 5 share holders"):
        run_secure_sum({u: np.zeros(3) for u in _ids(10)}, threshold=2, neighbours=4)
    with pytest.raises(ConfigError, match="threshold"):
        SecAggConfig(threshold=2).resolve_threshold(4)
    updates = {u: ClientUpdate(np.zeros(3), 1.0) for u in _ids(4)}
    with pytest.raises(ConfigError, match="4 share holders"):
        SecAggProtection(SecAggConfig(threshold=2)).run_round(0, updates, DirectTransport())
    # Above the bound each of these runs.
    assert SecAggConfig(threshold=3).resolve_threshold(4) == 3
    assert len(run_secure_sum(inputs, threshold=3).survivors) == 4


def test_fractions_at_or_below_half_are_refused_and_the_default_resolves_above_half():
    for bad in (0.5, 0.3, 1e-9):
        with pytest.raises(ConfigError) as info:
            SecAggConfig(threshold=bad)
        assert info.value.field == "threshold" and "(1/2, 1]" in str(info.value)
    for fraction in (2 / 3, 0.5 + 1e-12, 0.51, 0.6, 0.75, 1.0):
        for neighbours in (None, 1, 2, 3, 4, 5, 8, 14, 15):
            config = SecAggConfig(threshold=fraction, neighbours=neighbours)
            for n in range(2, 120):
                holders = check_neighbours(config.round_neighbours(n), n) + 1
                t = config.resolve_threshold(n)
                assert holders / 2 < t <= holders, (fraction, neighbours, n)
                assert t >= fraction * holders - 1e-9
    default = SecAggConfig()
    assert [default.resolve_threshold(n) for n in range(2, 11)] == [2, 2, 3, 4, 4, 5, 6, 6, 7]


def test_every_round_size_is_checked_because_odd_degrees_adapt():
    # neighbours=3: a 5-client round uses degree 2 (3 holders) but a 4-client round is complete (4 holders).
    config = SecAggConfig(threshold=2, neighbours=3)
    assert config.resolve_threshold(5) == 2
    with pytest.raises(ConfigError, match="in a round of 4 clients, with 4 share holders"):
        config.check_threshold_bound(5)
    SecAggConfig(threshold=3, neighbours=3).check_threshold_bound(50)
    SecAggConfig().check_threshold_bound(200)


def test_min_threshold_is_exactly_where_a_split_stops_working():
    # Brute force over how many honest holders each group gets; corrupt holders give both kinds.
    for holders in range(2, 16):
        for corrupt in range(holders):
            honest = holders - corrupt
            for t in range(2, holders + 1):
                attack = any(a + corrupt >= t and b + corrupt >= t for a in range(honest + 1) for b in range(honest - a + 1))
                assert attack == (t < min_threshold(holders, corrupt)), (holders, corrupt, t)


# -- the honest client checks the parameters itself ---------------------------------------------------
def _low_params(n: int = 4, t: int = 2, server_key: KeyPair | None = None) -> RoundParams:
    """Round parameters built with the bound switched off, as a malicious server could hand them out."""
    with _unsafe_allow_low_threshold():
        return RoundParams(
            round_index=ROUND, client_ids=tuple(_ids(n)), threshold=t, graph_seed=b"g" * 16, dimension=DIM,
            server_public_key=(server_key or KeyPair.generate()).public,
        )


def test_client_refuses_parameters_below_the_bound_whoever_built_them():
    # A malicious server hands out parameters that skipped validation.
    with pytest.raises(ProtocolAbort, match=r"refusing to take part in round 9: threshold=2: with 4 share holders"):
        SecAggClient("client-00", _low_params())
    # Or edits a validated object.
    legal = _low_params(t=3)
    SecAggClient("client-00", legal)
    object.__setattr__(legal, "threshold", 2)
    with pytest.raises(ProtocolAbort, match="must be > 2"):
        SecAggClient("client-00", legal)
    # Or a graph other than the one its public seed gives (fewer holders than the clients compute).
    edited = _low_params(n=6, t=4)
    object.__setattr__(edited, "graph", {u: frozenset() for u in edited.client_ids})
    with pytest.raises(ProtocolAbort, match="graph"):
        SecAggClient("client-00", edited)
    # An honest server will not run such a round either.
    key = KeyPair.generate()
    with pytest.raises(ConfigError, match="must be > 2"):
        SecAggServer(_low_params(server_key=key), key)


def test_client_refuses_to_share_below_the_bound():
    # A client created while the check was off still refuses where its secrets are split.
    with _unsafe_allow_low_threshold():
        run = new_round(_ids(4), round_index=ROUND, threshold=2, neighbours=None, dimension=DIM, bits=32, graph_seed=b"g" * 16)
        for u, c in run.clients.items():
            run.server.receive_advertise(u, c.advertise())
        keys = run.server.keys_messages()
    with pytest.raises(ProtocolAbort, match="refusing to share: threshold=2"):
        run.clients["client-01"].share_keys(keys["client-01"])
    assert run.clients["client-01"]._self_seed == b""  # nothing was split


def test_the_override_is_private_and_scoped():
    # Only a test reaching into the params module can lower the bound; no public API carries it.
    assert "_unsafe_allow_low_threshold" not in params_module.__all__
    public = [run_secure_sum, new_round, simulate.drive, SecAggProtection.__init__, SecAggConfig, RoundParams, SecAggClient, SecAggServer]
    for obj in public:
        names = set(inspect.signature(obj).parameters)
        assert not {n for n in names if "unsafe" in n or "allow" in n or "low" in n}, obj
    assert not [f.name for f in dataclasses.fields(SecAggConfig) if "unsafe" in f.name or "allow" in f.name]
    with _unsafe_allow_low_threshold():
        check_threshold(2, 4)
    with pytest.raises(ConfigError):
        check_threshold(2, 4)  # back on after the block, also after an exception inside it
    with pytest.raises(RuntimeError):
        with _unsafe_allow_low_threshold():
            raise RuntimeError
    with pytest.raises(ConfigError):
        check_threshold(2, 4)
    root = Path(params_module.__file__).resolve().parents[2]
    users = [
        path.relative_to(root).as_posix()
        for folder in ("protocols", "privfl", "attacks")
        for path in (root / folder).rglob("*.py")
        if "_unsafe_allow_low_threshold" in path.read_text() or "_LOW_THRESHOLD_ALLOWED" in path.read_text()
    ]
    assert users == ["protocols/secagg/params.py"]


# -- what the bound costs: dropouts tolerated ---------------------------------------------------------
@pytest.mark.parametrize("authenticated", [False, True], ids=["plain", "authenticated"])
@pytest.mark.parametrize("n", [5, 6, 7])
def test_the_least_legal_threshold_tolerates_h_minus_t_dropouts(n, authenticated):
    t = min_threshold(n)
    identities = {u: IdentityKey.generate() for u in _ids(n)} if authenticated else None
    words = _words(_ids(n))
    last = "consistency" if authenticated else "masked_input"
    for dropouts in (n - t, n - t + 1):
        run = new_round(_ids(n), round_index=ROUND, threshold=t, neighbours=None, dimension=DIM, bits=32, graph_seed=b"d" * 16, identities=identities)
        # One client leaves before sharing; the rest after sending their masked input (still summed).
        stop = {u: ("advertise" if i == 0 else last) for i, u in enumerate(_ids(n)[1 : dropouts + 1])}
        if dropouts == n - t:
            total, _ = drive(run, words, DirectTransport(), stop_after=stop)
            expected = sum(words[u].astype(np.uint64) for u in run.server.survivors) % (1 << 32)
            assert np.array_equal(total, expected.astype(WORD))
            assert len(run.server.survivors) == n - 1
        else:
            with pytest.raises(ProtocolAbort, match="< threshold"):
                drive(run, words, DirectTransport(), stop_after=stop)
