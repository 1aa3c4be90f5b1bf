"""`privfl audit DIR` on a deployment: every site's own ledger checked against the server's record of the run."""

from __future__ import annotations

import json
import shutil

import pytest
from roles_helpers import make_aggregator, make_sites

from privfl.aggregator import LocalSites
from privfl.audit.deployment import audit_deployment, find_deployment
from privfl.audit.rules import Severity
from privfl.cli import main
from privfl.envelope import Step, decode_request
from privfl.errors import ConfigError


def _deploy(text, split, clients, root, *, alter=None, budget=20.0):
    """The layout of `privfl deploy local`: the server's run in root/run, each site's state in root/sites/NAME."""
    sites = make_sites(clients, root / "sites", budget=budget)
    aggregator = make_aggregator(text, split)
    result = aggregator.run(LocalSites(sites, alter=alter), root / "run")
    return result, sites


def test_a_deployment_is_audited_from_each_sites_ledger(split, clients, tmp_path, run_toml):
    result, _ = _deploy(run_toml("plaintext", rounds=2), split, clients, tmp_path)
    assert find_deployment(tmp_path) == (tmp_path / "run", tmp_path / "sites")
    assert find_deployment(tmp_path / "run") == (tmp_path / "run", tmp_path / "sites")
    report = audit_deployment(tmp_path)
    assert report.run == result.summary["deployment"]["run_id"] and report.rounds == 2 and not report.missing
    assert [s.site for s in report.sites] == ["site-0", "site-1", "site-2"]
    for site in report.sites:
        assert site.rounds_charged == site.rounds_recorded == 2
        assert site.reported_epsilon == pytest.approx(site.epsilon_after_run, rel=1e-6) and 0 < site.epsilon_after_run <= 20.0
    assert not report.errors and not [f for f in report.findings if f.severity is Severity.WARNING]
    # The reports sit with the server's run; the sites' state directories get nothing written.
    assert (tmp_path / "run" / "deployment-audit.md").is_file() and (tmp_path / "run" / "sites" / "site-1" / "site-audit.json").is_file()
    assert not list((tmp_path / "sites").rglob("site-audit.*"))


def test_a_rolled_back_ledger_is_an_error_and_a_lost_update_is_listed(split, clients, tmp_path, run_toml, capsys):
    def lose_site_2_first_update(node, request, reply):
        parsed = decode_request(request)
        return None if node == "site-2" and parsed.step is Step.TRAIN and parsed.round_index == 0 else reply

    text = run_toml("plaintext", rounds=2)
    _deploy(text, split, clients, tmp_path, alter=lose_site_2_first_update)
    # site-1's ledger is replaced by one of another run (a wrong backup restored over it): this run's charges are gone.
    state = tmp_path / "sites" / "site-1"
    other = tmp_path / "other"
    _deploy(run_toml("plaintext", rounds=1), split, clients, other)
    for name in ("ledger.jsonl", "ledger.key"):
        shutil.copy(other / "sites" / "site-1" / name, state / name)
    report = audit_deployment(tmp_path / "run")
    by_site = {s.site: s for s in report.sites}
    assert by_site["site-1"].rounds_charged == 0 and by_site["site-1"].rounds_recorded == 2
    assert [f.message for f in report.errors if "charges are missing" in f.message and "site-1" in f.message]
    # site-2 trained and was charged in round 0, but its update never reached the server.
    assert by_site["site-2"].rounds_charged == 2 and by_site["site-2"].rounds_recorded == 1
    assert any(f.severity is Severity.INFO and "site-2" in f.message and "lost reply" in f.message for f in report.findings)
    # The command line exits 1 on an error, as `privfl audit RUN_DIR` does.
    assert main(["audit", str(tmp_path), "--format", "json"]) == 1
    assert json.loads(capsys.readouterr().out)["findings"][0]["severity"] == "error"


def test_without_the_sites_state_the_audit_says_where_the_ledgers_are(split, clients, tmp_path, run_toml, capsys):
    _deploy(run_toml("plaintext", rounds=1), split, clients, tmp_path)
    shutil.rmtree(tmp_path / "sites" / "site-0")
    partial = audit_deployment(tmp_path)
    assert partial.missing == ("site-0",) and [s.site for s in partial.sites] == ["site-1", "site-2"]
    assert any(f.severity is Severity.WARNING and "site-0" in f.message and "not audited" in f.message for f in partial.findings)
    shutil.rmtree(tmp_path / "sites")
    with pytest.raises(ConfigError, match="each site keeps its own"):
        audit_deployment(tmp_path / "run")
    assert main(["audit", str(tmp_path / "run")]) == 2
    assert "privfl audit --site" in capsys.readouterr().err
    assert main(["audit", str(tmp_path), "--accountant", "rdp"]) == 2
    with pytest.raises(ConfigError, match="not a deployment"):
        audit_deployment(tmp_path / "nothing")
