"""Client-level DP (DP-FedAvg) with Sites and the Aggregator as separate roles: the same release as
the in-process federation, the noise added once by the party that first sees the sum (the plaintext
aggregator, the CKKS key-holder site), and a clip norm no party can quietly change."""

from __future__ import annotations

import json

import numpy as np
import pytest
from roles_helpers import make_aggregator, make_sites, run_in_process

from privfl.aggregator import LocalSites
from privfl.client_dp import plan_client_dp, release_noise
from privfl.envelope import Request, Status, Step, decode_reply, decode_request, encode_request
from privfl.site import CLIENT_DP_FILE, _parse_config
from privfl.training import flatten_parameters

_CLIENT_DP = """
[federation.client_dp]
noise_multiplier = 0.6
clip_norm = 0.4
delta = 1e-3
adaptive = {adaptive}
"""


def _text(run_toml, protection, *, adaptive, rounds=3):
    text = run_toml(protection, rounds=rounds, extra=_CLIENT_DP.format(adaptive="true" if adaptive else "false"))
    # Deployed secure aggregation with client-level DP runs in the authenticated mode only.
    return text.replace("[federation.secagg]\n", "[federation.secagg]\nauthenticated = true\n") if protection == "secagg" else text


_sites = make_sites
_aggregator = make_aggregator
_in_process = run_in_process


@pytest.mark.parametrize(
    "protection,adaptive",
    [("plaintext", False), ("plaintext", True), ("ckks", False), ("ckks", True), ("secagg", False), ("secagg", True)],
    ids=["plaintext-fixed-clip", "plaintext-adaptive-clip", "ckks", "ckks-adaptive-clip", "secagg", "secagg-adaptive-clip"],
)
def test_deployed_client_level_dp_releases_what_the_in_process_run_releases(protection, adaptive, split, clients, tmp_path, run_toml):
    text = _text(run_toml, protection, adaptive=adaptive)
    deployed = _aggregator(text, split).run(LocalSites(_sites(clients, tmp_path)), tmp_path / "server")
    expected = _in_process(text, split, clients)
    assert all(h["aborted"] is None and len(h["contributors"]) == 3 for h in deployed.history)
    cfg = _parse_config(text)
    plan = plan_client_dp(cfg.federation.client_dp, num_clients=3, client_fraction=1.0, rounds=3)
    levels = [h["client_level"] for h in deployed.history]
    in_process = [h["client_level"] for h in expected.history]
    # The same charge, clip norms and (noised) unclipped fractions, round by round.
    for mine, theirs in zip(levels, in_process, strict=True):
        assert mine["epsilon"] == pytest.approx(theirs["epsilon"], rel=1e-9)
        assert mine["delta"] == pytest.approx(theirs["delta"], rel=1e-12)
        assert mine["clip_norm"] == pytest.approx(theirs["clip_norm"], rel=1e-9)
        assert mine["next_clip_norm"] == pytest.approx(theirs["next_clip_norm"], rel=1e-9)
        if adaptive:
            assert mine["unclipped_fraction_noised"] == pytest.approx(theirs["unclipped_fraction_noised"], abs=1e-9)
        else:
            assert mine["unclipped_fraction_noised"] is None and mine["clip_norm"] == 0.4
    if adaptive:
        assert len({level["clip_norm"] for level in levels}) > 1  # S moved
    difference = float(np.max(np.abs(deployed.parameters - flatten_parameters(expected.model))))
    if protection in ("plaintext", "secagg"):
        # Secure aggregation: every noised value lies on the quantizer's grid, so the sum is exact.
        assert difference <= 1e-5
    else:
        # CKKS decrypts within about 1e-6 of the sum; the release rounds it to the noise grid, where such a
        # difference can move a coordinate by one grid step (over the fixed denominator), each round.
        grid = max(release_noise(plan, clip_norm=level["clip_norm"], dim=deployed.parameters.size, adaptive=adaptive).update.grid
                   for level in levels)
        assert difference <= 3 * cfg.federation.server_learning_rate * grid / plan.expected_clients + 1e-5
    summary = deployed.summary["client_level"]
    assert summary["rounds_released"] == 3 and summary["epsilon"] == pytest.approx(expected.summary["client_level"]["epsilon"])
    assert summary["clip_norms"] == [level["clip_norm"] for level in levels]
    written = json.loads((tmp_path / "server" / "summary.json").read_text())
    assert written["client_level"]["epsilon"] == pytest.approx(summary["epsilon"])
    if protection == "ckks":
        # The key holder, not the aggregator, noised the sums: its own record of the releases.
        record = json.loads((tmp_path / "site-0" / CLIENT_DP_FILE).read_text())[deployed.summary["deployment"]["run_id"]]
        assert record["num_sites"] == 3 and [level["clip_norm"] for level in record["levels"]] == summary["clip_norms"]
        assert not (tmp_path / "site-1" / CLIENT_DP_FILE).exists()


def test_a_site_refuses_another_clip_norm_than_the_runs_fixed_one_before_training(split, clients, tmp_path, run_toml):
    from privfl.site import seeded_model

    text = _text(run_toml, "plaintext", adaptive=False, rounds=2)
    config = _parse_config(text)
    site = _sites(clients, tmp_path)[1]
    run = "ab" * 16
    hello = site.handle(encode_request(Request(run, Step.HELLO, 0, "node:1", {"config": text}, ())))
    assert decode_reply(hello, run=run, step=Step.HELLO, round_index=0, site="site-1").status is Status.OK
    shape, classes = split.train.input_shape, split.train.num_classes
    params = flatten_parameters(seeded_model(config, None, shape, classes)).astype("<f4").tobytes()
    fields = {"index": 1, "num_sites": 3, "participants": 3, "input_shape": list(shape), "num_classes": classes}
    for clip_norm, reason in (
        (40.0, "fixed clip norm is 0.4"), (None, "clip norm"), (-0.4, "clip norm"), ("0.4", "clip norm"), (10**400, "Overflow"),
    ):
        request = Request(run, Step.TRAIN, 0, "site-1", {**fields, "clip_norm": clip_norm}, (params, b""))
        reply = decode_reply(site.handle(encode_request(request)), run=run, step=Step.TRAIN, round_index=0, site="site-1")
        assert reply.status is Status.REFUSED and reason in reply.reason
    # Refused before the data was touched: nothing spent; the run's own clip norm is served.
    assert site.spent(config)[0] == 0.0
    request = Request(run, Step.TRAIN, 0, "site-1", {**fields, "clip_norm": 0.4}, (params, b""))
    reply = decode_reply(site.handle(encode_request(request)), run=run, step=Step.TRAIN, round_index=0, site="site-1")
    assert reply.status is Status.OK and site.spent(config)[0] > 0


class _Tamper(LocalSites):
    """An aggregator's channel that rewrites fields of requests of one step (an active server)."""

    def __init__(self, sites, step, **fields):
        super().__init__(sites)
        self.step, self.fields = step, fields

    def exchange(self, requests, *, timeout):
        changed = {}
        for node, payload in requests.items():
            request = decode_request(payload)
            if request.step is self.step:
                request = Request(request.run, request.step, request.round_index, request.site,
                                  {**request.fields, **self.fields}, request.parts)
                payload = encode_request(request)
            changed[node] = payload
        return super().exchange(changed, timeout=timeout)


def test_secagg_each_site_binds_its_masks_to_the_clip_norm_it_was_told(split, clients, tmp_path, run_toml, monkeypatch):
    """Adaptive clipping under secure aggregation: a server telling one site a 100x S (so that its noise share
    is planned for another S than the others') gets masks that do not cancel: each site binds its pairwise
    masks to the S and site count it planned its own share for, not to the server's copy of the parameters."""
    import struct

    import privfl.protocols.secagg.client as secagg_client

    used: dict[str, set[bytes]] = {}
    real = secagg_client.pairwise_mask_key

    def recording(shared, round_index, a, b, context=b""):
        used.setdefault(a, set()).add(context)
        return real(shared, round_index, a, b, context)

    monkeypatch.setattr(secagg_client, "pairwise_mask_key", recording)
    text = _text(run_toml, "secagg", adaptive=True, rounds=1)
    channel = _Tamper(_sites(clients, tmp_path), Step.TRAIN, clip_norm=40.0)
    honest = LocalSites.exchange.__get__(channel)
    tampered = channel.exchange

    def exchange(requests, *, timeout):  # only site-1's train request is rewritten
        if all(decode_request(p).step is Step.TRAIN for p in requests.values()):
            out = honest({n: p for n, p in requests.items() if n != "site-1"}, timeout=timeout)
            out.update(tampered({n: p for n, p in requests.items() if n == "site-1"}, timeout=timeout))
            return out
        return honest(requests, timeout=timeout)

    channel.exchange = exchange  # type: ignore[method-assign]
    result = _aggregator(text, split).run(channel)
    # The unmasked sum is pseudorandom; the honest aggregator sees its weight word is off and releases nothing.
    assert "masks did not cancel" in result.history[0]["aborted"]
    assert np.array_equal(result.parameters, flatten_parameters(_initial(text, split)))
    assert used["site-1"] == {b"privfl-client-dp" + struct.pack(">dI", 40.0, 3)}
    assert used["site-0"] == used["site-2"] == {b"privfl-client-dp" + struct.pack(">dI", 0.4, 3)}


@pytest.mark.parametrize("change", [{"clip_norm": 4.0}, {"num_sites": 30}], ids=["clip-norm", "site-count"])
def test_the_key_holder_refuses_to_noise_for_another_clip_norm_or_site_count(change, split, clients, tmp_path, run_toml):
    text = _text(run_toml, "ckks", adaptive=False, rounds=2)
    # The site count is pinned at the first release: change it from the second decryption on.
    sites = _sites(clients, tmp_path)
    channel = _Tamper(sites, Step.CKKS_DECRYPT, **change)
    if "num_sites" in change:
        original = channel.exchange

        def exchange(requests, *, timeout):
            if any(decode_request(p).round_index == 0 for p in requests.values()):
                return LocalSites.exchange(channel, requests, timeout=timeout)
            return original(requests, timeout=timeout)

        channel.exchange = exchange  # type: ignore[method-assign]
    result = _aggregator(text, split).run(channel)
    refused = [h for h in result.history if h["aborted"]]
    assert refused, "the key holder released a sum noised for another clip norm or site count"
    assert all("did not decrypt" in h["aborted"] for h in refused)
    # Nothing was released for the refused rounds, and the round's one decryption was not used up.
    record = json.loads((tmp_path / "site-0" / CLIENT_DP_FILE).read_text()) if (tmp_path / "site-0" / CLIENT_DP_FILE).exists() else {}
    released = sum(len(run["levels"]) for run in record.values())
    assert released == sum(1 for h in result.history if not h["aborted"])
    # The run charged every round all the same (conservative) and went on.
    assert [h["client_level"]["epsilon"] is not None for h in result.history] == [True, True]


def _drop_masked_input_of(victim):
    def alter(node, request, reply):
        return None if node == victim and decode_request(request).step is Step.SECAGG_RELAY else reply

    return alter


def test_secagg_withholds_a_round_with_a_dropout_and_needs_no_weight_bound(split, clients, tmp_path, run_toml):
    # No weight_bound: under client-level DP every site counts once, so none is needed.
    text = _text(run_toml, "secagg", adaptive=False, rounds=2).replace("authenticated = true\nweight_bound = 1000\n", "authenticated = true\n")
    assert text.count("weight_bound") == 1  # the shared-key mode's only
    result = _aggregator(text, split).run(LocalSites(_sites(clients, tmp_path), alter=_drop_masked_input_of("site-2")))
    # Two of three masked inputs arrived, enough to unmask their sum: but its noise would reveal how
    # many sites survived, so the average is withheld, the round charged, and the run goes on.
    for record in result.history:
        assert record["aborted"] and "withheld" in record["aborted"]
        assert record["client_level"]["epsilon"] is not None and record["client_level"]["unclipped_fraction_noised"] is None
    assert np.array_equal(result.parameters, flatten_parameters(_initial(text, split)))


def test_secagg_sites_refuse_to_unmask_a_round_with_a_dropout_whatever_the_server_does(
    split, clients, tmp_path, run_toml, monkeypatch, caplog
):
    """A malicious server that does not withhold the round asks the survivors to sign and unmask their subset's
    sum (its noise is planned for three sites, not two): every site refuses, and nothing is released."""
    import privfl.aggregator as aggregator_module

    monkeypatch.setattr(aggregator_module._SecAggRound, "_withhold", lambda self, survivors: None)
    text = _text(run_toml, "secagg", adaptive=False, rounds=1)
    result = _aggregator(text, split).run(LocalSites(_sites(clients, tmp_path), alter=_drop_masked_input_of("site-2")))
    (record,) = result.history
    assert record["aborted"] and "consistency" in record["aborted"]  # refused when asked to sign the survivor set
    refusals = [r.getMessage() for r in caplog.records if "invited clients are missing" in r.getMessage()]
    assert sorted(message.split()[1] for message in refusals) == ["site-0", "site-1"]
    assert np.array_equal(result.parameters, flatten_parameters(_initial(text, split)))


def test_secagg_a_site_refuses_a_threshold_too_small_for_its_noise_share(split, clients, tmp_path, run_toml):
    """Each share carries rho (z S)^2 / c; a server announcing sparse pairs with t = 2 would unmask sums of two
    shares, a fraction of the charged noise. The site refuses such a round before it touches its data."""
    from privfl.protocols.secagg.keys import IdentityKey, KeyPair
    from privfl.protocols.secagg.params import RoundParams
    from privfl.protocols.secagg.state import encode_params

    text = _text(run_toml, "secagg", adaptive=False, rounds=1)
    site = _sites(clients, tmp_path)[1]
    run = "ab" * 16
    hello = site.handle(encode_request(Request(run, Step.HELLO, 0, "node:1", {"config": text}, ())))
    assert decode_reply(hello, run=run, step=Step.HELLO, round_index=0, site="site-1").status is Status.OK
    ids = ("site-1", "a", "b", "c", "d", "e")
    fields = {"index": 1, "num_sites": 6, "participants": 6, "input_shape": [30], "num_classes": 2, "clip_norm": 0.4}

    identities = {u: site.identity_public() if u == "site-1" else IdentityKey.generate().public for u in ids}

    def train(neighbours, threshold):
        params = RoundParams(round_index=0, client_ids=ids, threshold=threshold, neighbours=neighbours, graph_seed=b"g" * 32,
                             dimension=63, bits=_parse_config(text).federation.secagg.bits, server_public_key=KeyPair.generate().public,
                             identities=identities)
        request = Request(run, Step.TRAIN, 0, "site-1", fields, (bytes(4 * 62), encode_params(params)))
        return decode_reply(site.handle(encode_request(request)), run=run, step=Step.TRAIN, round_index=0, site="site-1")

    # rho = 1.5 for up to 6 sites at the default threshold 2/3, so a round of 6 needs t >= 4.
    reply = train(neighbours=2, threshold=2)
    assert reply.status is Status.REFUSED and "threshold 2 is below 4.000" in reply.reason
    assert site.spent(_parse_config(text))[0] == 0.0  # refused before the data was touched
    assert train(neighbours=None, threshold=4).status is Status.OK  # the default threshold: it trains and advertises


def test_secagg_client_dp_is_refused_without_the_authenticated_mode(split, clients, tmp_path, run_toml):
    """Without signed keys the server could hand a site fake peer keys and read its update with only its own
    noise share: the aggregator and every site refuse the run."""
    from privfl.errors import ConfigError

    text = _text(run_toml, "secagg", adaptive=False, rounds=1).replace("authenticated = true\n", "")
    with pytest.raises(ConfigError, match="authenticated"):
        _aggregator(text, split)
    site = _sites(clients, tmp_path)[1]
    hello = site.handle(encode_request(Request("cd" * 16, Step.HELLO, 0, "node:1", {"config": text}, ())))
    reply = decode_reply(hello, run="cd" * 16, step=Step.HELLO, round_index=0, site="site-1")
    assert reply.status is Status.REFUSED and "authenticated = true" in reply.reason


def _initial(text, split):
    from privfl.site import seeded_model

    return seeded_model(_parse_config(text), None, split.train.input_shape, split.train.num_classes)


def test_in_process_secagg_client_dp_ignores_the_weight_bound(split, clients, run_toml):
    """Noised updates carry weight 1: scaling them by 1 / weight_bound would move the shares off the grid."""
    text = _text(run_toml, "secagg", adaptive=True, rounds=2)
    with_bound = _in_process(text, split, clients)
    without = _in_process(text.replace("[federation.secagg]\nweight_bound = 1000\n", ""), split, clients)
    assert [h["client_level"]["unclipped_fraction_noised"] for h in with_bound.history] == [
        h["client_level"]["unclipped_fraction_noised"] for h in without.history
    ]
    assert np.array_equal(flatten_parameters(with_bound.model), flatten_parameters(without.model))


def test_ckks_adaptive_the_key_holder_releases_no_sum_clipped_to_another_clip_norm(split, clients, tmp_path, run_toml, monkeypatch):
    """An active server announces a 100x larger S to the sites than the key holder noises for, forwards their
    updates without checking them and names the key holder's S in the decryption request: the sites signed the
    S they clipped to, so the key holder decrypts nothing."""
    import privfl.protocols.ckks as ckks

    text = _text(run_toml, "ckks", adaptive=True, rounds=2)
    honest = ckks.CkksServer

    class Forwarding(honest):  # the server's own check, made for the S it announced to the sites
        def __init__(self, *args, clip_norm=None, **kwargs):
            super().__init__(*args, clip_norm=40.0, **kwargs)

    monkeypatch.setattr(ckks, "CkksServer", Forwarding)
    result = _aggregator(text, split).run(_Tamper(_sites(clients, tmp_path), Step.TRAIN, clip_norm=40.0))
    assert all(h["aborted"] and "did not decrypt" in h["aborted"] for h in result.history)
    assert all(len(h["trained"]) == 3 for h in result.history)  # the sites trained and clipped to 40
    record_path = tmp_path / "site-0" / CLIENT_DP_FILE
    released = json.loads(record_path.read_text()) if record_path.exists() else {}
    assert sum(len(run["levels"]) for run in released.values()) == 0


def test_ckks_adaptive_a_lost_release_reply_costs_one_round_not_the_run(split, clients, tmp_path, run_toml):
    """The key holder released round 0 and moved S, but its reply was lost: the aggregator still announces the old
    S in round 1, the key holder refuses it and names its own, and round 2 runs with the key holder's S."""
    text = _text(run_toml, "ckks", adaptive=True, rounds=3)

    def lose_first_release(node, request, reply):
        parsed = decode_request(request)
        return None if parsed.step is Step.CKKS_DECRYPT and parsed.round_index == 0 else reply

    result = _aggregator(text, split).run(LocalSites(_sites(clients, tmp_path), alter=lose_first_release))
    first, second, third = result.history
    assert "did not decrypt" in first["aborted"] and "not the key holder's" in second["aborted"]
    assert third["aborted"] is None and len(third["contributors"]) == 3
    holder = json.loads((tmp_path / "site-0" / CLIENT_DP_FILE).read_text())[result.summary["deployment"]["run_id"]]
    assert len(holder["levels"]) == 2  # rounds 0 and 2 were released
    assert holder["levels"][0]["next_clip_norm"] != 0.4  # round 0 moved S at the key holder
    assert third["client_level"]["clip_norm"] == holder["levels"][1]["clip_norm"] == holder["levels"][0]["next_clip_norm"]
    assert second["client_level"]["next_clip_norm"] == holder["levels"][0]["next_clip_norm"]
