"""Sites and the Aggregator as separate roles exchanging bytes: same results as the in-process
federation, ledgers kept at the sites, budgets enforced by the sites, bad messages refused."""

from __future__ import annotations

import numpy as np
import pytest
from roles_helpers import make_aggregator, make_sites, run_in_process

from privfl.aggregator import Aggregator, LocalSites
from privfl.envelope import Request, Status, Step, decode_reply, decode_request, encode_request
from privfl.errors import ConfigError
from privfl.federation import Federation
from privfl.models import build_model
from privfl.rundir import LEDGER_FILE
from privfl.site import Site, SiteRole, _parse_config, provision_shared_key, site_identity
from privfl.training import flatten_parameters


def _sites(clients, root, **budgets):
    return make_sites(clients, root, budgets={name.replace("_", "-"): value for name, value in budgets.items()})


_aggregator = make_aggregator


def _federation(text, split, clients):
    return flatten_parameters(run_in_process(text, split, clients).model)


@pytest.mark.parametrize("protection", ["plaintext", "ckks", "secagg", "shared_key"])
def test_sites_and_aggregator_give_the_in_process_result(protection, split, clients, tmp_path, run_toml):
    text = run_toml(protection)
    sites = _sites(clients, tmp_path)
    if protection == "shared_key":
        provision_shared_key([site.state_dir for site in sites])
    result = _aggregator(text, split).run(LocalSites(sites), tmp_path / "server")
    expected = _federation(text, split, clients)
    assert all(h["aborted"] is None and len(h["contributors"]) == 3 for h in result.history)
    # From the second round on, each site trains its last round's model reset in place (privfl.model_pool),
    # and the result below is still the in-process one.
    assert all(site._template[1].reused == len(result.history) - 1 for site in sites)
    difference = np.max(np.abs(result.parameters - expected))
    if protection == "plaintext":
        assert difference <= 1e-5
    elif protection == "ckks":
        assert difference <= 1e-6 * np.max(np.abs(expected)) + 1e-7
    elif protection == "secagg":
        cfg = _parse_config(text).federation.secagg
        from privfl.site import quantizer_for

        # Each round's average is within the quantization error of the sum, over a total weight >= 1 example.
        bound = quantizer_for(_parse_config(text), 3).max_error(3) * cfg.weight_bound / 1.0
        assert difference <= 2 * bound
    else:
        from privfl.protocols.shared_key import RoundEncoding

        shared = _parse_config(text).federation.shared_key
        # Two primes: a step of about 1e-15 clip_range; the rounds compound it far below float32 precision.
        step = RoundEncoding.for_round(shared, expected.size, 3).step
        assert step < 1e-12 and difference <= 1e-5
    assert result.summary["final_accuracy"] >= 0.9


def test_each_ledger_lives_only_at_its_site(split, clients, tmp_path, run_toml):
    result = _aggregator(run_toml("secagg"), split).run(LocalSites(_sites(clients, tmp_path)), tmp_path / "server")
    for name in clients:
        assert (tmp_path / name / LEDGER_FILE).is_file()
        assert (tmp_path / name / "ledger.key").stat().st_mode & 0o077 == 0
    assert not list((tmp_path / "server").rglob("ledger*"))
    assert not (tmp_path / "server" / "identity.key").exists()
    # What the server recorded about budgets is what each site reported from its own ledger.
    for entry in result.summary["clients"].values():
        assert entry["epsilon_source"].startswith("reported by the site")
        assert 0 < entry["epsilon"] <= 3.0


def test_a_restarted_site_keeps_its_spent_epsilon(split, clients, tmp_path, run_toml):
    budgets = {"site_0": 10.0, "site_1": 10.0, "site_2": 10.0}
    _aggregator(run_toml("plaintext", rounds=1), split).run(LocalSites(_sites(clients, tmp_path, **budgets)))
    # New objects over the same state directories: a new process at each site.
    again = _sites(clients, tmp_path, **budgets)
    spent = {site.name: site.spent(_parse_config(run_toml("plaintext")))[0] for site in again}
    assert all(value > 0 for value in spent.values())
    second = _aggregator(run_toml("plaintext", rounds=1), split).run(LocalSites(again))
    for name, value in spent.items():
        assert second.summary["clients"][name]["epsilon"] > value


def test_an_exhausted_site_refuses_to_train_even_when_asked(split, clients, tmp_path, run_toml):
    sites = _sites(clients, tmp_path, site_2=0.2)
    aggregator = _aggregator(run_toml("plaintext", rounds=2), split)
    result = aggregator.run(LocalSites(sites))
    assert all("site-2" in h["skipped"] for h in result.history)
    assert "not asked" in result.history[1]["skipped"]["site-2"]
    assert result.summary["clients"]["site-2"]["rounds_trained"] == 0
    # Ask it directly, as a server ignoring its answer would: it still refuses.
    params = result.parameters.astype("<f4").tobytes()
    request = Request(aggregator.run_id, Step.TRAIN, 1, "site-2", {"index": 2, "num_sites": 3, "participants": 3,
                      "input_shape": list(split.train.input_shape), "num_classes": split.train.num_classes}, (params, b""))
    reply = decode_reply(sites[2].handle(encode_request(request)), run=aggregator.run_id, step=Step.TRAIN, round_index=1, site="site-2")
    assert reply.status is Status.SKIPPED and "budget" in reply.reason


def _refusal(site, payload, *, run="0" * 32, step=Step.TRAIN, round_index=0):
    raw = site.handle(payload)
    from privfl.protocols.wire import decode_frame

    frame = decode_frame(raw, kind=61, round_index=None)
    import json

    head = json.loads(frame.parts[0])
    assert head["status"] == "refused", head
    return head["fields"]["reason"]


def test_bad_messages_are_refused_not_crashes(split, clients, tmp_path, run_toml):
    sites = _sites(clients, tmp_path)
    aggregator = _aggregator(run_toml("secagg", rounds=1), split)
    aggregator.run(LocalSites(sites))
    site = sites[1]
    run = aggregator.run_id
    assert "magic" in _refusal(site, b"garbage bytes")
    assert "truncated" in _refusal(site, b"")
    other_run = encode_request(Request("f" * 32, Step.TRAIN, 0, "site-1", {}, ()))
    assert "has not joined" in _refusal(site, other_run)
    other_site = encode_request(Request(run, Step.TRAIN, 0, "site-0", {}, ()))
    assert "addressed to site" in _refusal(site, other_site)
    replay = encode_request(Request(run, Step.TRAIN, 0, "site-1", {"index": 1, "num_sites": 3}, (b"", b"")))
    assert "already trained" in _refusal(site, replay)
    wrong_step = encode_request(Request(run, Step.SECAGG_RELAY, 0, "site-1", {}, (b"x",)))
    assert "no secure-aggregation round" in _refusal(site, wrong_step)
    not_key_holder = encode_request(Request(run, Step.CKKS_DECRYPT, 0, "site-1", {"dim": 3}, (b"x",)))
    assert "not the CKKS key holder" in _refusal(site, not_key_holder)


def test_the_ledger_alone_refuses_a_replayed_round_after_a_restart(split, clients, tmp_path, run_toml):
    import json

    from privfl.site import RUN_FILE

    aggregator = _aggregator(run_toml("plaintext", rounds=2), split)
    aggregator.run(LocalSites(_sites(clients, tmp_path, site_1=10.0)))
    # run.json names the run and its config only: what the site trained is in its ledger, nowhere else.
    assert set(json.loads((tmp_path / "site-1" / RUN_FILE).read_text())) == {"run", "config"}
    restarted = _sites(clients, tmp_path, site_1=10.0)[1]
    fields = {"index": 1, "num_sites": 3, "input_shape": list(split.train.input_shape), "num_classes": split.train.num_classes}
    for round_index in (0, 1):
        replay = encode_request(Request(aggregator.run_id, Step.TRAIN, round_index, "site-1", fields, (b"", b"")))
        assert "already trained" in _refusal(restarted, replay, round_index=round_index)
    # Another run's charges do not count for this one: its round 0 is refused only for its bytes.
    other = "e" * 32
    hello = Request(other, Step.HELLO, 0, "site-1", {"config": run_toml("plaintext", rounds=2)}, ())
    assert decode_reply(restarted.handle(encode_request(hello)), run=other, step=Step.HELLO, round_index=0, site="site-1").status is Status.OK
    fresh = encode_request(Request(other, Step.TRAIN, 0, "site-1", fields, (b"", b"")))
    assert "global model has 0 parameters" in _refusal(restarted, fresh)


def test_a_corrupted_reply_drops_that_site_and_the_round_completes(split, clients, tmp_path, run_toml):
    from privfl.envelope import decode_request

    def corrupt(node, request, reply):
        return b"\x00" * 40 if node == "site-1" and decode_request(request).step is Step.TRAIN else reply

    result = _aggregator(run_toml("plaintext", rounds=1), split).run(LocalSites(_sites(clients, tmp_path), alter=corrupt))
    record = result.history[0]
    assert record["aborted"] is None
    assert "site-1" in record["dropped"] and "malformed" in record["dropped"]["site-1"]
    assert sorted(record["contributors"]) == ["site-0", "site-2"]


def _drop_at(step: Step, victims: set[str]):
    from privfl.envelope import decode_request

    def alter(node, request, reply):
        return None if node in victims and decode_request(request).step is step else reply

    return alter


def test_secagg_recovers_a_site_lost_after_its_masked_input(split, clients, tmp_path, run_toml):
    text = run_toml("secagg", rounds=1)
    result = _aggregator(text, split).run(LocalSites(_sites(clients, tmp_path), alter=_drop_at(Step.SECAGG_UNMASK, {"site-2"})))
    record = result.history[0]
    assert record["aborted"] is None
    # Its masked input arrived, so it is in the sum: the result equals the full in-process round.
    assert sorted(record["contributors"]) == ["site-0", "site-1", "site-2"]
    expected = _federation(text, split, clients)
    assert np.max(np.abs(result.parameters - expected)) < 1e-3


def test_secagg_below_threshold_aborts_typed_and_the_run_goes_on(split, clients, tmp_path, run_toml):
    lost = {"site-1", "site-2"}
    calls = {"n": 0}
    first_round_drop = _drop_at(Step.SECAGG_RELAY, lost)

    def alter(node, request, reply):
        from privfl.envelope import decode_request

        if decode_request(request).round_index == 0:
            return first_round_drop(node, request, reply)
        calls["n"] += 1
        return reply

    result = _aggregator(run_toml("secagg", rounds=2), split).run(LocalSites(_sites(clients, tmp_path), alter=alter))
    assert result.history[0]["aborted"] and "threshold" in result.history[0]["aborted"]
    assert result.history[1]["aborted"] is None and len(result.history[1]["contributors"]) == 3


def test_aggregator_refuses_what_deployments_do_not_support(split, run_toml):
    # Client-level DP runs in deployments under plaintext, CKKS and secure aggregation
    # (tests/test_roles_client_dp.py), not yet in the shared-key mode.
    with pytest.raises(ConfigError, match="client_dp"):
        _aggregator(run_toml("shared_key", extra="[federation.client_dp]\nnoise_multiplier = 1.0\nclip_norm = 1.0\n"), split)
    with pytest.raises(ConfigError, match="input_shape"):
        Aggregator(run_toml("plaintext"))


def test_shared_key_sites_must_hold_one_provisioned_key(split, clients, tmp_path, run_toml):
    sites = _sites(clients, tmp_path)
    # No key anywhere: every site refuses at hello, so no site joins.
    with pytest.raises(ConfigError, match="no site accepted"):
        _aggregator(run_toml("shared_key", rounds=1), split).run(LocalSites(sites))
    provision_shared_key([sites[0].state_dir, sites[1].state_dir])
    provision_shared_key([sites[2].state_dir])  # a different key
    with pytest.raises(ConfigError, match="same shared key"):
        _aggregator(run_toml("shared_key", rounds=1), split).run(LocalSites(sites))
    with pytest.raises(ConfigError, match="already exists"):
        provision_shared_key([sites[0].state_dir])
    assert oct((sites[0].state_dir / "shared-key.bin").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ConfigError, match="weight_bound"):
        _aggregator(run_toml("shared_key", rounds=1).replace("[federation.shared_key]\nweight_bound = 1000", ""), split)


def test_shared_key_server_holds_no_key_and_a_site_decrypts_each_round_once(split, clients, tmp_path, run_toml):
    sites = _sites(clients, tmp_path)
    provision_shared_key([site.state_dir for site in sites])
    seen: list[tuple[str, bytes]] = []

    def keep(node, payload, reply):
        seen.append((node, payload))
        return reply

    aggregator = _aggregator(run_toml("shared_key", rounds=2), split)
    result = aggregator.run(LocalSites(sites, alter=keep), tmp_path / "server")
    assert all(h["aborted"] is None for h in result.history)
    assert not any(p.name == "shared-key.bin" for p in (tmp_path / "server").rglob("*"))
    key = (sites[0].state_dir / "shared-key.bin").read_bytes()
    assert not any(key[12:] in payload for _, payload in seen)  # the key never crosses to the server
    decrypts = [p for _, p in seen if b"shared-key-decrypt" in p]
    assert len(decrypts) == 2  # one site decrypts each round's sum
    # The same decryption request again (a replay by the server) is refused by the site that served it.
    node = next(n for n, p in seen if p == decrypts[0])
    raw = LocalSites(sites).sites[node].handle(decrypts[0])
    reply = decode_reply(raw, run=aggregator.run_id, step=Step.SHARED_KEY_DECRYPT, round_index=0, site=node)
    assert reply.status is Status.REFUSED and "already decrypted" in reply.reason
    # Only the one decrypting site decrypts: another site, handed the same request, refuses (two
    # decrypting sites could be given two subsets of a round, whose difference is one update).
    assert node == sites[0].name and sites[0].role is SiteRole.KEY_HOLDER
    other = sites[1]
    request = decode_request(decrypts[0])
    forwarded = encode_request(Request(request.run, request.step, request.round_index, other.name, request.fields, request.parts))
    raw = other.handle(forwarded)
    reply = decode_reply(raw, run=aggregator.run_id, step=Step.SHARED_KEY_DECRYPT, round_index=0, site=other.name)
    assert reply.status is Status.REFUSED and "does not decrypt" in reply.reason


def test_ckks_needs_exactly_one_key_holder(split, clients, tmp_path, run_toml):
    # Sites that hold some key holder's key and would join, but none of them holds the CKKS key.
    sites = [Site(name, ds, tmp_path / name, key_holder_key=site_identity(tmp_path / "elsewhere"), allow_noise_seed=True)
             for name, ds in clients.items()]
    with pytest.raises(ConfigError, match="key-holder"):
        _aggregator(run_toml("ckks", rounds=1), split).run(LocalSites(sites))


def _ckks_train(run, site, fields, context, run_id, signature):
    return encode_request(Request(run, Step.TRAIN, 0, site, fields, (b"\x00" * 4 * 31, b"", context, run_id, signature)))


def test_a_site_encrypts_only_under_the_context_its_key_holder_signed_for_the_run(split, clients, tmp_path, run_toml):
    """The public context reaches a site through the server: a context the server made (it would hold the
    secret key of every update), the key holder's context of another run, or one it made under another run
    config than the site's, is refused before training."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from privfl.accounting import LedgerKey, PrivacyLedger
    from privfl.protocols.ckks import CkksKeyHolder
    from privfl.protocols.ckks_signing import vouch_context

    text = run_toml("ckks", rounds=1)
    holder, site = _sites(clients, tmp_path)[:2]
    run, old_run = "a" * 32, "b" * 32
    replies = {}
    for r in (old_run, run):
        hello = encode_request(Request(r, Step.HELLO, 0, "node:1", {"config": text}, ()))
        replies[r] = decode_reply(holder.handle(hello), run=r, step=Step.HELLO, round_index=0, site=holder.name).parts
        assert site.handle(encode_request(Request(r, Step.HELLO, 0, "node:2", {"config": text}, ())))
    fields = {"index": 1, "num_sites": 3, "participants": 3, "input_shape": [30], "num_classes": 2}
    # The server's own keys, signed by a key of its own: refused.
    own = CkksKeyHolder(_parse_config(text).federation.ckks)
    forged = vouch_context(Ed25519PrivateKey.generate(), run, text, own.run_id, own.public_context())
    assert "not signed by this site's key holder" in _refusal(site, _ckks_train(run, "site-1", fields, own.public_context(), own.run_id, forged))
    # The key holder's real context with the signature of another one: refused.
    context, run_id, signature = replies[run]
    assert "not signed" in _refusal(site, _ckks_train(run, "site-1", fields, own.public_context(), run_id, signature))
    # The key holder's signed context of an earlier run, replayed into this one: refused.
    assert "not signed" in _refusal(site, _ckks_train(run, "site-1", fields, *replies[old_run]))
    assert "no valid key-holder signature" in _refusal(site, _ckks_train(run, "site-1", fields, context, run_id, b""))
    # The key holder told another config than the sites (say, with less client-level noise): its context,
    # signed for that config, is refused by a site that joined with the run's.
    split_run, other_text = "d" * 32, text + "\n# another config\n"
    hello = encode_request(Request(split_run, Step.HELLO, 0, "node:1", {"config": other_text}, ()))
    split_parts = decode_reply(holder.handle(hello), run=split_run, step=Step.HELLO, round_index=0, site=holder.name).parts
    site.handle(encode_request(Request(split_run, Step.HELLO, 0, "node:2", {"config": text}, ())))
    assert "this run config" in _refusal(site, _ckks_train(split_run, "site-1", fields, *split_parts))
    # A run's config does not change after a site joined, and the key holder makes a run's keys once.
    for party in (site, holder):
        again = encode_request(Request(split_run, Step.HELLO, 0, "node:2", {"config": other_text if party is site else text}, ()))
        assert "another run config" in _refusal(party, again)
    for r in (old_run, run):  # keys made, then replaced by a later run's: never made again
        assert "already made" in _refusal(holder, encode_request(Request(r, Step.HELLO, 0, "node:1", {"config": text}, ())))
    site.handle(encode_request(Request(run, Step.HELLO, 0, "node:2", {"config": text}, ())))
    # Nothing was trained for any of them: the site's ledger holds no charge.
    ledger = PrivacyLedger.open(site.state_dir / LEDGER_FILE, key=LedgerKey.read(site.state_dir / "ledger.key"))
    assert not [e for e in ledger.entries if e.client == "site-1"]
    ledger.close()
    # The real one is accepted (the request then fails only on its dummy model bytes).
    assert "global model has 31 parameters" in _refusal(site, _ckks_train(run, "site-1", fields, context, run_id, signature))


def test_a_site_refuses_a_run_config_that_fixes_the_noise_seed_unless_allowed(split, clients, tmp_path, run_toml):
    """The config comes from the server: a fixed noise_seed would let it regenerate and subtract every noise draw."""
    name, data = next(iter(clients.items()))
    text = run_toml("plaintext", rounds=1)
    assert "noise_seed = 11" in text
    hello = encode_request(Request("f" * 32, Step.HELLO, 0, "node:0", {"config": text}, ()))
    assert "noise_seed" in _refusal(Site(name, data, tmp_path / "strict"), hello)
    allowed = Site(name, data, tmp_path / "simulation", allow_noise_seed=True)
    assert decode_reply(allowed.handle(hello), run="f" * 32, step=Step.HELLO, round_index=0, site=name).status is Status.OK
    unseeded = encode_request(Request("e" * 32, Step.HELLO, 0, "node:0", {"config": text.replace("noise_seed = 11\n", "")}, ()))
    assert decode_reply(Site(name, data, tmp_path / "strict").handle(unseeded), run="e" * 32, step=Step.HELLO,
                        round_index=0, site=name).status is Status.OK
    # A run joined while allowed is refused at its next step once the site runs without the permission.
    train = encode_request(Request("f" * 32, Step.TRAIN, 0, name, {"index": 0, "num_sites": 3}, (b"", b"")))
    assert "noise_seed" in _refusal(Site(name, data, tmp_path / "simulation"), train)
    # The first run a site joins fixes its ledger's delta: one at or above 1 / n is refused.
    loose = encode_request(Request("d" * 32, Step.HELLO, 0, "node:0", {"config": text.replace("delta = 1e-5", "delta = 0.5")}, ()))
    assert "1 / n" in _refusal(Site(name, data, tmp_path / "loose", allow_noise_seed=True), loose)
    for bad in ("../site-0", "a/b", ".."):
        with pytest.raises(ConfigError, match="without /"):
            Site(bad, data, tmp_path / "names")
    # No budget of its own and none in the config: refused (the first run would fix an infinite cap for good).
    uncapped = text.replace("target_epsilon = 3.0", "noise_multiplier = 1.0")
    hello = encode_request(Request("c" * 32, Step.HELLO, 0, "node:0", {"config": uncapped}, ()))
    assert "no epsilon budget of its own" in _refusal(Site(name, data, tmp_path / "nocap", allow_noise_seed=True), hello)
    capped = Site(name, data, tmp_path / "capped", allow_noise_seed=True, budget=2.0)
    assert decode_reply(capped.handle(hello), run="c" * 32, step=Step.HELLO, round_index=0, site=name).status is Status.OK


def test_a_ckks_site_without_its_key_holders_key_does_not_join(split, clients, tmp_path, run_toml):
    name, data = next(iter(clients.items()))
    site = Site(name, data, tmp_path / name, allow_noise_seed=True)
    hello = encode_request(Request("c" * 32, Step.HELLO, 0, "node:0", {"config": run_toml("ckks", rounds=1)}, ()))
    assert "key holder's identity key" in _refusal(site, hello)
    # Another protection needs no key holder: the same site joins.
    hello = encode_request(Request("c" * 32, Step.HELLO, 0, "node:0", {"config": run_toml("plaintext", rounds=1)}, ()))
    assert decode_reply(site.handle(hello), run="c" * 32, step=Step.HELLO, round_index=0, site=name).status is Status.OK
    for bad in ("zz" * 32, "ab", b"\x01" * 31):
        with pytest.raises(ConfigError, match="key_holder_key"):
            Site(name, data, tmp_path / name, key_holder_key=bad)
    assert site_identity(tmp_path / name) == site.identity_public() and len(site.identity_public()) == 32


def test_the_server_never_holds_a_decryption_key_or_a_single_update(split, clients, tmp_path, run_toml):
    aggregator = _aggregator(run_toml("ckks", rounds=1), split)
    aggregator.run(LocalSites(_sites(clients, tmp_path)), tmp_path / "server")
    from privfl.protocols.ckks import _load_context

    assert not _load_context(aggregator._ckks_public).has_secret_key()
    # The key holder's secret stays in its own state directory, readable by its owner only.
    secret = tmp_path / "site-0" / "ckks-key-holder.bin"
    assert secret.is_file() and secret.stat().st_mode & 0o077 == 0
    assert not (tmp_path / "site-1" / "ckks-key-holder.bin").exists()


def test_a_request_the_protocol_cannot_serve_is_refused_before_training(split, clients, tmp_path, run_toml):
    """Refused after training, it would have spent budget for nothing."""
    sites = _sites(clients, tmp_path)
    aggregator = _aggregator(run_toml("secagg", rounds=2), split)
    aggregator.run(LocalSites(sites))
    site = sites[1]
    before = site.spent(_parse_config(run_toml("secagg", rounds=2)))[0]
    import json

    from privfl.protocols.wire import decode_frame

    params = b"\x00" * 64  # not secure-aggregation round parameters
    # A new run (hello), then a train request whose model is well formed but whose protocol part is not.
    hello = encode_request(Request("a" * 32, Step.HELLO, 0, "site-1", {"config": run_toml("secagg", rounds=2)}, ()))
    site.handle(hello)
    request = Request("a" * 32, Step.TRAIN, 0, "site-1", {"index": 1, "num_sites": 3, "participants": 3,
                      "input_shape": list(split.train.input_shape), "num_classes": split.train.num_classes}, (b"\x00" * 248, params))
    frame = decode_frame(site.handle(encode_request(request)), kind=61, round_index=None)
    head = json.loads(frame.parts[0])
    assert head["status"] == "refused" and "magic" in head["fields"]["reason"]
    assert site.spent(_parse_config(run_toml("secagg", rounds=2)))[0] == before


def _conforms(value, shape) -> list[str]:
    """Keys a JSON-ready dict lacks or has beyond a TypedDict (its required and optional keys)."""
    missing = sorted(shape.__required_keys__ - value.keys())
    extra = sorted(value.keys() - shape.__required_keys__ - shape.__optional_keys__)
    return [f"missing {k}" for k in missing] + [f"undeclared {k}" for k in extra]


def test_both_producers_write_the_declared_result_shapes(split, clients, tmp_path, run_toml):
    """history and summary of the in-process run and of a deployment match RoundRecord / RunSummary / SiteSummary."""
    from privfl.results import RoundRecord, RunSummary, SiteSummary

    text = run_toml("plaintext", rounds=2)
    deployed = _aggregator(text, split).run(LocalSites(_sites(clients, tmp_path)), tmp_path / "server")
    cfg = _parse_config(text)
    in_process = Federation(
        model_fn=lambda: build_model(cfg.model, split.train.input_shape, split.train.num_classes),
        clients=clients, test_set=split.test, training=cfg.training, federation=cfg.federation, progress=False,
    ).run(tmp_path / "in-process")
    for result in (deployed, in_process):
        assert result.history and all(_conforms(record, RoundRecord) == [] for record in result.history)
        assert _conforms(result.summary, RunSummary) == []
        assert all(_conforms(site, SiteSummary) == [] for site in result.summary["clients"].values())
    assert "step_seconds" in deployed.history[0] and "ledger" in in_process.history[0]


def test_a_site_whose_ledger_vanished_refuses_instead_of_starting_from_zero(split, clients, tmp_path, run_toml, caplog):
    text = run_toml("plaintext", rounds=1)
    _aggregator(text, split).run(LocalSites(_sites(clients, tmp_path)))
    (tmp_path / "site-1" / LEDGER_FILE).unlink()  # its key is still there: the site has spent before
    with caplog.at_level("WARNING", logger="privfl"):
        result = _aggregator(text, split).run(LocalSites(_sites(clients, tmp_path)))
    # It refuses to join the run (a typed LedgerError, answered as a refusal), so it is never asked to train.
    assert all("site-1" not in record["sampled"] for record in result.history)
    assert "site-1" not in result.summary["clients"]
    assert any("site-1" in r.getMessage() and "the ledger is gone" in r.getMessage() for r in caplog.records)


def test_authenticated_secagg_runs_with_the_sites_identity_keys_and_checks_consistency(split, clients, tmp_path, run_toml):
    text = run_toml("secagg", rounds=2, extra="").replace("[federation.secagg]\n", "[federation.secagg]\nauthenticated = true\n")
    result = _aggregator(text, split).run(LocalSites(_sites(clients, tmp_path)), tmp_path / "server")
    assert all(h["aborted"] is None and len(h["contributors"]) == 3 for h in result.history)
    # The extra step of the authenticated mode: every survivor signs who sent a masked input.
    assert all("secagg-check" in h["step_seconds"] for h in result.history)
    expected = _federation(run_toml("secagg", rounds=2), split, clients)
    cfg = _parse_config(text)
    from privfl.site import quantizer_for

    bound = quantizer_for(cfg, 3).max_error(3) * cfg.federation.secagg.weight_bound
    assert np.max(np.abs(result.parameters - expected)) <= 2 * bound
    # Each site pinned the others' identity keys on first sight, for every later run.
    import json

    pinned = json.loads((tmp_path / "site-1" / "secagg-peers.json").read_text())["sites"]
    assert pinned == {site.name: site.identity_public().hex() for site in _sites(clients, tmp_path)}


def test_secagg_peer_keys_are_pinned_across_runs_or_given_out_of_band(split, clients, tmp_path, run_toml):
    """A server swapping a site's key at the start of a new run is caught by sites that saw the real key in an
    earlier run; sites given the others' keys out of band (``peer_keys``) refuse any other key, or an unknown site."""
    from dataclasses import replace

    from privfl.protocols.secagg.keys import IdentityKey
    from privfl.protocols.secagg.state import decode_params, encode_params

    class SwapKey(LocalSites):
        def exchange(self, requests, *, timeout):
            changed = {}
            for node, payload in requests.items():
                request = decode_request(payload)
                if request.step is Step.TRAIN:
                    params = decode_params(request.parts[1], round_index=request.round_index)
                    forged = {**params.identities, "site-2": IdentityKey.generate().public}
                    parts = (request.parts[0], encode_params(replace(params, identities=forged)), *request.parts[2:])
                    payload = encode_request(Request(request.run, request.step, request.round_index, request.site, request.fields, parts))
                changed[node] = payload
            return super().exchange(changed, timeout=timeout)

    text = run_toml("secagg", rounds=1).replace("[federation.secagg]\n", "[federation.secagg]\nauthenticated = true\n")
    _aggregator(text, split).run(LocalSites(_sites(clients, tmp_path / "tofu")))
    swapped = _aggregator(text, split).run(SwapKey(_sites(clients, tmp_path / "tofu")))  # a new run, a new run id
    assert swapped.history[0]["aborted"] and not swapped.history[0]["contributors"]
    # Given out of band: the first run with a swapped key is refused already, and so is a site nobody gave.
    first = _sites(clients, tmp_path / "given")
    keys = {site.name: site.identity_public() for site in first}
    given = [Site(site.name, site.dataset, site.state_dir, role=site.role, key_holder_key=site.key_holder_key, allow_noise_seed=True,
                  peer_keys={n: k.hex() for n, k in keys.items() if n != site.name}) for site in first]
    refused = _aggregator(text, split).run(SwapKey(given))
    assert refused.history[0]["aborted"] and not refused.history[0]["contributors"]
    honest = _aggregator(text, split).run(LocalSites(given))
    assert honest.history[0]["aborted"] is None and len(honest.history[0]["contributors"]) == 3
    stranger = [Site(s.name, s.dataset, s.state_dir, role=s.role, key_holder_key=s.key_holder_key, allow_noise_seed=True,
                     peer_keys={n: k for n, k in (s.peer_keys or {}).items() if n != "site-2"}) for s in given]
    assert not _aggregator(text, split).run(LocalSites(stranger)).history[0]["contributors"]
    with pytest.raises(ConfigError, match="peer_keys"):
        Site("site-0", clients["site-0"], tmp_path / "bad", peer_keys={"site-1": "zz"})


def test_a_server_swapping_a_sites_identity_key_is_refused_by_every_site(split, clients, tmp_path, run_toml):
    from privfl.protocols.secagg.keys import IdentityKey
    from privfl.protocols.secagg.state import decode_params, encode_params

    class SwapKey(LocalSites):
        """From round 1 on, the server registers its own key for site-2 (to play site-2 itself)."""

        def exchange(self, requests, *, timeout):
            changed = {}
            for node, payload in requests.items():
                request = decode_request(payload)
                if request.step is Step.TRAIN and request.round_index == 1:
                    params = decode_params(request.parts[1], round_index=1)
                    forged = {**params.identities, "site-2": IdentityKey.generate().public}
                    from dataclasses import replace

                    parts = (request.parts[0], encode_params(replace(params, identities=forged)), *request.parts[2:])
                    payload = encode_request(Request(request.run, request.step, 1, request.site, request.fields, parts))
                changed[node] = payload
            return super().exchange(changed, timeout=timeout)

    text = run_toml("secagg", rounds=2).replace("[federation.secagg]\n", "[federation.secagg]\nauthenticated = true\n")
    sites = _sites(clients, tmp_path)
    result = _aggregator(text, split).run(SwapKey(sites))
    assert result.history[0]["aborted"] is None
    record = result.history[1]
    assert record["aborted"] and record["trained"] == []
    assert "another key for this site" in record["dropped"]["site-2"]
    assert all("differs from the one pinned" in record["dropped"][name] for name in ("site-0", "site-1"))
    # Refused before training: round 1 trained (and spent) nothing at any site.
    for site in sites:
        assert result.summary["clients"][site.name]["rounds_trained"] == 1


def test_a_site_without_a_valid_identity_key_is_left_out_of_the_run(split, clients, tmp_path, run_toml):
    from privfl.envelope import encode_reply

    def no_key(node, request, reply):
        if node != "site-2" or decode_request(request).step is not Step.HELLO:
            return reply
        parsed = decode_reply(reply, run=decode_request(request).run, step=Step.HELLO, round_index=0, site="site-2")
        parsed.fields["identity"] = "not hex"
        return encode_reply(parsed)

    result = _aggregator(run_toml("ckks", rounds=1), split).run(LocalSites(_sites(clients, tmp_path), alter=no_key))
    assert sorted(result.summary["clients"]) == ["site-0", "site-1"]
    assert result.history[0]["aborted"] is None and sorted(result.history[0]["contributors"]) == ["site-0", "site-1"]


def test_a_key_holder_reply_with_malformed_contributors_aborts_the_round_not_the_server(split, clients, tmp_path, run_toml):
    from privfl.envelope import encode_reply

    def garble(node, request, reply):
        parsed = decode_request(request)
        if parsed.step is not Step.CKKS_DECRYPT or parsed.round_index != 0:
            return reply
        answer = decode_reply(reply, run=parsed.run, step=parsed.step, round_index=0, site=node)
        answer.fields["contributors"] = 5
        return encode_reply(answer)

    result = _aggregator(run_toml("ckks", rounds=2), split).run(LocalSites(_sites(clients, tmp_path), alter=garble))
    assert result.history[0]["aborted"] and "other sites" in result.history[0]["aborted"]
    assert result.history[1]["aborted"] is None


def test_a_hello_with_an_unhashable_key_id_is_a_typed_refusal(split, clients, tmp_path, run_toml):
    from privfl.envelope import encode_reply

    def listed(node, request, reply):
        parsed = decode_request(request)
        if node != "site-1" or parsed.step is not Step.HELLO:
            return reply
        answer = decode_reply(reply, run=parsed.run, step=Step.HELLO, round_index=0, site=node)
        answer.fields["key_id"] = [answer.fields["key_id"]]
        return encode_reply(answer)

    sites = _sites(clients, tmp_path)
    provision_shared_key([site.state_dir for site in sites])
    with pytest.raises(ConfigError, match="same shared key"):
        _aggregator(run_toml("shared_key", rounds=1), split).run(LocalSites(sites, alter=listed))


def test_numbers_too_large_for_a_float_in_a_sites_reply_are_ignored_not_fatal(split, clients, tmp_path, run_toml):
    from privfl.envelope import encode_reply

    def huge(node, request, reply):
        parsed = decode_request(request)
        if node != "site-1" or parsed.step is not Step.TRAIN:
            return reply
        answer = decode_reply(reply, run=parsed.run, step=Step.TRAIN, round_index=parsed.round_index, site=node)
        answer.fields.update(epsilon=10**400, budget=10**400, site_seconds=10**400)
        return encode_reply(answer)

    result = _aggregator(run_toml("plaintext", rounds=1), split).run(LocalSites(_sites(clients, tmp_path), alter=huge))
    assert result.history[0]["aborted"] is None and result.summary["clients"]["site-1"]["epsilon"] is None
