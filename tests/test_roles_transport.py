"""Fault injection per message between the Aggregator and in-process Sites: LocalSites(transport=...)
carries every request and reply through the same Transport interface the in-process Federation takes."""

from __future__ import annotations

import numpy as np
from roles_helpers import make_aggregator, make_sites

from privfl.aggregator import LocalSites
from privfl.envelope import Step
from privfl.protocols.base import SERVER, DirectTransport
from privfl.site import _parse_config


class Recording:
    """Records (sender, receiver, step) of every message; loses or garbles the ones listed."""

    def __init__(self, lose=(), garble=()):
        self.lose, self.garble = set(lose), set(garble)
        self.seen: list[tuple[str, str, str]] = []

    def deliver(self, sender: str, receiver: str, step: str, payload: bytes) -> bytes | None:
        self.seen.append((sender, receiver, step))
        if (sender, receiver, step) in self.lose:
            return None
        if (sender, receiver, step) in self.garble:
            return b"\x00" * len(payload)
        return payload


def test_every_request_and_reply_passes_through_the_transport(split, clients, tmp_path, run_toml):
    transport = Recording()
    result = make_aggregator(run_toml("secagg", rounds=1), split).run(LocalSites(make_sites(clients, tmp_path), transport=transport))
    assert result.history[0]["aborted"] is None
    steps = {step for _, _, step in transport.seen}
    assert {Step.HELLO.value, Step.TRAIN.value, Step.SECAGG_KEYS.value, Step.SECAGG_RELAY.value, Step.SECAGG_UNMASK.value} <= steps
    for name in clients:
        for step in steps:
            # Each request is followed by its reply, for every site and step.
            assert (SERVER, name, step) in transport.seen and (name, SERVER, step) in transport.seen
    requests = [(r, s) for sender, r, s in transport.seen if sender == SERVER]
    replies = [(sender, s) for sender, r, s in transport.seen if r == SERVER]
    assert sorted(requests) == sorted(replies)


def test_a_lossless_transport_changes_nothing(split, clients, tmp_path, run_toml):
    text = run_toml("plaintext", rounds=1)
    plain = make_aggregator(text, split).run(LocalSites(make_sites(clients, tmp_path / "a")))
    carried = make_aggregator(text, split).run(LocalSites(make_sites(clients, tmp_path / "b"), transport=DirectTransport()))
    assert np.array_equal(plain.parameters, carried.parameters)


def test_a_lost_request_drops_that_site_before_it_trains(split, clients, tmp_path, run_toml):
    transport = Recording(lose={(SERVER, "site-1", Step.TRAIN.value)})
    result = make_aggregator(run_toml("secagg", rounds=1), split).run(LocalSites(make_sites(clients, tmp_path), transport=transport))
    record = result.history[0]
    assert record["aborted"] is None
    # site-1 never got its train request: it did not train and spent nothing.
    assert "site-1" in record["dropped"] and "site-1" not in record["trained"]
    assert result.summary["clients"]["site-1"]["rounds_trained"] == 0
    assert sorted(record["contributors"]) == ["site-0", "site-2"]


def test_a_reply_lost_after_the_masked_input_keeps_that_site_in_the_sum(split, clients, tmp_path, run_toml):
    transport = Recording(lose={("site-2", SERVER, Step.SECAGG_UNMASK.value)})
    result = make_aggregator(run_toml("secagg", rounds=1), split).run(LocalSites(make_sites(clients, tmp_path), transport=transport))
    record = result.history[0]
    assert record["aborted"] is None
    # Its masked input arrived before its unmask reply was lost: the others' shares unmask it.
    assert sorted(record["contributors"]) == ["site-0", "site-1", "site-2"]
    assert ("site-2", SERVER, Step.SECAGG_UNMASK.value) in transport.seen


def test_garbled_bytes_either_way_are_refused_without_a_crash(split, clients, tmp_path, run_toml):
    transport = Recording(garble={(SERVER, "site-1", Step.TRAIN.value), ("site-2", SERVER, Step.TRAIN.value)})
    sites = make_sites(clients, tmp_path)
    text = run_toml("plaintext", rounds=2)
    result = make_aggregator(text, split).run(LocalSites(sites, transport=transport))
    for record in result.history:
        assert record["aborted"] is None
        assert record["contributors"] == ["site-0"]
        # The site cannot read the garbled request: its refusal names no run, round or step, so it answers nothing.
        assert "malformed reply" in record["dropped"]["site-1"]
        assert "malformed reply" in record["dropped"]["site-2"]  # the aggregator could not read the garbled reply
    # site-1 never trained (its requests were unreadable); site-2 trained and its own ledger charged it,
    # though no reply of its reached the server (which records what sites report: nothing).
    config = _parse_config(text)
    spent = {site.name: site.spent(config)[0] for site in sites}
    assert spent["site-1"] == 0.0 and spent["site-2"] > 0.0
    assert result.summary["clients"]["site-2"]["rounds_trained"] == 0
