"""A deployed run's server side resumes after a crash: same run id, same sites, the next unrecorded
round; the sites' ledgers keep what was spent, and nothing trains twice in one round."""

from __future__ import annotations

import json

import numpy as np
import pytest
from roles_helpers import make_aggregator, make_sites

from privfl.aggregator import AGGREGATOR_FILE, LocalSites
from privfl.envelope import Step, decode_request
from privfl.errors import ConfigError
from privfl.site import _parse_config

_CLIENT_DP = """
[federation.client_dp]
noise_multiplier = 0.6
clip_norm = 0.4
delta = 1e-3
adaptive = false
"""


class _Crash(Exception):
    """The server process dies."""


class _CrashingSites(LocalSites):
    """Delivers requests until the train step of ``round_index``; then the server dies, before
    (``after=False``) or after (``after=True``) the sites have trained."""

    def __init__(self, sites, round_index, *, after):
        super().__init__(sites)
        self.round_index, self.after = round_index, after

    def exchange(self, requests, *, timeout):
        first = decode_request(next(iter(requests.values())))
        if first.step is Step.TRAIN and first.round_index == self.round_index:
            if self.after:
                super().exchange(requests, timeout=timeout)
            raise _Crash
        return super().exchange(requests, timeout=timeout)


def _sites(clients, root):
    return make_sites(clients, root, budget=100.0)


_aggregator = make_aggregator


def _crash_after_recording(monkeypatch, round_index):
    """The server dies right after recording ``round_index`` (between two rounds)."""
    import privfl.federation as driver

    original = driver._Progress.advance

    def advance(self, record):
        original(self, record)
        if record["round"] == round_index:
            raise _Crash

    monkeypatch.setattr(driver._Progress, "advance", advance)


@pytest.mark.parametrize("protection,extra", [("plaintext", ""), ("ckks", _CLIENT_DP)], ids=["plaintext", "ckks-client-dp"])
def test_a_resumed_server_finishes_the_run_it_would_have_run(protection, extra, split, clients, tmp_path, run_toml, monkeypatch):
    text = run_toml(protection, rounds=3, extra=extra)
    uninterrupted = _aggregator(text, split).run(LocalSites(_sites(clients, tmp_path / "a")), tmp_path / "a-server")
    sites = _sites(clients, tmp_path / "b")
    with monkeypatch.context() as patch:
        _crash_after_recording(patch, 1)
        with pytest.raises(_Crash):
            _aggregator(text, split).run(LocalSites(sites), tmp_path / "b-server")
    # A new server process, the same sites (new objects over their state directories).
    resumed = _aggregator(text, split).run(LocalSites(_sites(clients, tmp_path / "b")), tmp_path / "b-server", resume=True)
    assert [h["round"] for h in resumed.history] == [0, 1, 2]
    assert all(h["aborted"] is None and len(h["contributors"]) == 3 for h in resumed.history)
    # Sampling and training seeds come from noise_seed, so the resumed run is the uninterrupted one (under
    # CKKS up to its ~1e-6 decryption error, which the client-level release's grid can turn into one step).
    difference = float(np.max(np.abs(resumed.parameters - uninterrupted.parameters)))
    if extra:
        from privfl.client_dp import plan_client_dp, release_noise

        plan = plan_client_dp(_parse_config(text).federation.client_dp, num_clients=3, client_fraction=1.0, rounds=3)
        grid = max(release_noise(plan, clip_norm=h["client_level"]["clip_norm"], dim=resumed.parameters.size,
                                 adaptive=False).update.grid for h in resumed.history)
        assert difference <= 3 * grid / plan.expected_clients + 1e-5
    else:
        assert difference <= 1e-5
    for name, entry in resumed.summary["clients"].items():
        assert entry["rounds_trained"] == 3
        assert entry["epsilon"] == pytest.approx(uninterrupted.summary["clients"][name]["epsilon"], rel=1e-9)
    if extra:
        levels = [h["client_level"] for h in resumed.history]
        assert [level["clip_norm"] for level in levels] == pytest.approx(
            [h["client_level"]["clip_norm"] for h in uninterrupted.history], rel=1e-9
        )
        assert resumed.summary["client_level"]["rounds_released"] == 3
        assert resumed.summary["client_level"]["epsilon"] == pytest.approx(uninterrupted.summary["client_level"]["epsilon"])
    assert resumed.summary["deployment"]["run_id"] == json.loads((tmp_path / "b-server" / AGGREGATOR_FILE).read_text())["run"]


@pytest.mark.parametrize("after", [True, False], ids=["sites-had-trained", "before-any-site-answered"])
def test_a_round_the_crashed_server_had_started_is_recorded_interrupted_not_retried(after, split, clients, tmp_path, run_toml):
    """Asking again could make a second release of the round with other sites (the sample is secret): the
    round the server had started is charged (client-level) and recorded as interrupted, never run twice."""
    from privfl.audit.site import audit_site

    text = run_toml("secagg", rounds=3, extra=_CLIENT_DP).replace("[federation.secagg]\n", "[federation.secagg]\nauthenticated = true\n")
    sites = _sites(clients, tmp_path)
    with pytest.raises(_Crash):
        _aggregator(text, split).run(_CrashingSites(sites, 1, after=after), tmp_path / "server")
    resumed = _aggregator(text, split).run(LocalSites(_sites(clients, tmp_path)), tmp_path / "server", resume=True)
    record = resumed.history[1]
    assert record["aborted"].startswith("interrupted") and record["trained"] == [] and record["sampled"] == []
    assert record["client_level"]["epsilon"] > resumed.history[0]["client_level"]["epsilon"]  # charged as a release
    assert resumed.history[2]["aborted"] is None and len(resumed.history[2]["contributors"]) == 3
    assert resumed.summary["client_level"]["rounds_released"] == 3
    for site in sites:
        # The site's own ledger: rounds 0 and 2, and round 1 only if it trained before the crash.
        trained = audit_site(site.state_dir, out_dir=tmp_path / "audit" / site.name).runs[0].rounds_trained
        assert trained == (3 if after else 2)
        assert resumed.summary["clients"][site.name]["rounds_trained"] == 2


def test_resume_refuses_what_it_cannot_continue(split, clients, tmp_path, run_toml):
    text = run_toml("plaintext", rounds=2)
    with pytest.raises(ConfigError, match="needs the out_dir"):
        _aggregator(text, split).run(LocalSites(_sites(clients, tmp_path)), resume=True)
    with pytest.raises(ConfigError, match="no deployed run to resume"):
        _aggregator(text, split).run(LocalSites(_sites(clients, tmp_path)), tmp_path / "empty", resume=True)
    with pytest.raises(_Crash):
        _aggregator(text, split).run(_CrashingSites(_sites(clients, tmp_path), 1, after=False), tmp_path / "server")
    with pytest.raises(ConfigError, match="already holds a run"):
        _aggregator(text, split).run(LocalSites(_sites(clients, tmp_path)), tmp_path / "server")
    with pytest.raises(ConfigError, match="another config"):
        _aggregator(run_toml("plaintext", rounds=3), split).run(LocalSites(_sites(clients, tmp_path)), tmp_path / "server", resume=True)
    two = dict(list(clients.items())[:2])
    with pytest.raises(ConfigError, match="missing: site-2"):
        _aggregator(text, split).run(LocalSites(_sites(two, tmp_path)), tmp_path / "server", resume=True)
    finished = _aggregator(text, split).run(LocalSites(_sites(clients, tmp_path)), tmp_path / "server", resume=True)
    assert [h["round"] for h in finished.history] == [0, 1]
    with pytest.raises(ConfigError, match="has finished"):
        _aggregator(text, split).run(LocalSites(_sites(clients, tmp_path)), tmp_path / "server", resume=True)


class _CrashAfterRelease(LocalSites):
    """The CKKS key holder releases round ``round_index`` (and moves S), then the server dies before it records it."""

    def __init__(self, sites, round_index):
        super().__init__(sites)
        self.round_index = round_index

    def exchange(self, requests, *, timeout):
        replies = super().exchange(requests, timeout=timeout)
        first = decode_request(next(iter(requests.values())))
        if first.step is Step.CKKS_DECRYPT and first.round_index == self.round_index:
            raise _Crash
        return replies


def test_a_resumed_ckks_run_with_adaptive_clipping_starts_from_the_key_holders_clip_norm(split, clients, tmp_path, run_toml):
    """The key holder released the round the server never recorded, and moved S: it names its S at hello, so the
    resumed server announces it and the next round releases (no round lost to a stale S)."""
    text = run_toml("ckks", rounds=3, extra=_CLIENT_DP.replace("adaptive = false", "adaptive = true"))
    with pytest.raises(_Crash):
        _aggregator(text, split).run(_CrashAfterRelease(_sites(clients, tmp_path), 1), tmp_path / "server")
    resumed = _aggregator(text, split).run(LocalSites(_sites(clients, tmp_path)), tmp_path / "server", resume=True)
    assert resumed.history[1]["aborted"].startswith("interrupted")
    assert resumed.history[2]["aborted"] is None and len(resumed.history[2]["contributors"]) == 3
    holder = json.loads((tmp_path / "site-0" / "client-dp.json").read_text())[resumed.summary["deployment"]["run_id"]]
    # Released by the key holder: rounds 0, 1 (the interrupted one) and 2, each for the S it tracked.
    assert len(holder["levels"]) == 3 and resumed.history[2]["client_level"]["clip_norm"] == holder["levels"][2]["clip_norm"]
