"""`privfl audit DIR` on a deployment: every site's own ledger checked against the server's record of the run."""

from __future__ import annotations

import json
import shutil

import pytest
from roles_helpers import make_aggregator, make_sites

from privfl.aggregator import LocalSites
from privfl.audit.deployment import audit_deployment, find_deployment
from privfl.audit.rules import NO_CLIENT_DP, Severity
from privfl.audit.site import SiteFinding
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
    # The server keeps the run config it sent, as privfl run does (export and the recorded-view attack read it).
    assert (tmp_path / "run" / "config.toml").read_text() == run_toml("plaintext", rounds=2)
    assert find_deployment(tmp_path) == (tmp_path / "run", tmp_path / "sites")
    assert find_deployment(tmp_path / "run") == (tmp_path / "run", tmp_path / "sites")
    report = audit_deployment(tmp_path)
    assert report.run == result.summary["deployment"]["run_id"] and report.rounds == 2 and not report.missing
    assert [s.site for s in report.sites] == ["site-0", "site-1", "site-2"]
    for site in report.sites:
        assert site.rounds_charged == site.rounds_recorded == 2
        assert site.reported_epsilon == pytest.approx(site.epsilon_after_run, rel=1e-6) and 0 < site.epsilon_after_run <= 20.0
    assert not report.errors
    # Each site's spending by round, from its own ledger: two rounds, growing, ending at what it reported.
    for site in report.sites:
        assert len(site.epsilon_by_round) == 2 and 0 < site.epsilon_by_round[0] < site.epsilon_by_round[1]
        assert site.epsilon_by_round[-1] == site.epsilon_after_run
    text = (tmp_path / "run" / "deployment-audit.md").read_text()
    table = text.split("## Epsilon after each round (each site's ledger)")[1].split("## Findings")[0]
    assert table.split("|")[1:5] == [" round ", " site-0 ", " site-1 ", " site-2 "]  # a column per site
    assert f"{report.sites[1].epsilon_by_round[1]:.3f}" in table
    assert (tmp_path / "run" / "deployment-audit.png").stat().st_size > 10_000 and report.paths[-1].name == "deployment-audit.png"
    # The one warning is the run's: no client-level DP (PFA012 in a simulation's audit), in the same words.
    assert [(f.kind, f.site) for f in report.findings if f.severity is Severity.WARNING] == [("no-client-dp", "")]
    assert NO_CLIENT_DP in (tmp_path / "run" / "deployment-audit.md").read_text()
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
    with pytest.raises(ConfigError, match=rf"each site keeps its own.*into {tmp_path.resolve() / 'sites'}/NAME/state \(a sites/ folder next to"):
        audit_deployment(tmp_path / "run")
    assert main(["audit", str(tmp_path / "run")]) == 2
    assert "privfl audit --site" in capsys.readouterr().err
    assert main(["audit", str(tmp_path), "--accountant", "rdp"]) == 2
    with pytest.raises(ConfigError, match="not a deployment"):
        audit_deployment(tmp_path / "nothing")


def test_a_malformed_record_or_a_broken_ledger_is_a_clear_answer_not_a_crash(split, clients, tmp_path, run_toml, capsys):
    _deploy(run_toml("plaintext", rounds=1), split, clients, tmp_path)
    history = tmp_path / "run" / "history.json"
    good = history.read_text()
    for bad in ("5", "true", json.dumps([{"trained": 5}]), json.dumps([{"trained": "site-1"}])):
        history.write_text(bad)
        with pytest.raises(ConfigError, match=r"history\.json"):
            audit_deployment(tmp_path)
        assert main(["audit", str(tmp_path)]) == 2
    history.write_text(good)
    record_path = tmp_path / "run" / "aggregator.json"
    record = json.loads(record_path.read_text())
    for name in ("../site-0", str(tmp_path / "sites" / "site-0"), ".."):
        # A name that is a path is that name's error; nothing is written for it, the other sites are audited.
        record_path.write_text(json.dumps({**record, "sites": [name, "site-1"]}))
        report = audit_deployment(tmp_path, out_dir=tmp_path / "report")
        assert [s.site for s in report.sites] == ["site-1"] and any("not a plain name" in f.message for f in report.errors)
        assert sorted(p.name for p in (tmp_path / "report" / "sites").iterdir()) == ["site-1"]
    record_path.write_text(json.dumps(record))
    # One site's edited ledger is that site's error; the others are audited all the same.
    ledger = tmp_path / "sites" / "site-1" / "ledger.jsonl"
    ledger.write_text(ledger.read_text().replace('"steps":', '"steps": 1, "x":', 1))
    report = audit_deployment(tmp_path)
    assert [s.site for s in report.sites] == ["site-0", "site-2"]
    assert any("site-1" in f.message and "cannot be audited" in f.message for f in report.errors)
    capsys.readouterr()


def test_a_site_that_spent_in_earlier_runs_but_not_this_one_is_no_warning(split, clients, tmp_path, run_toml):
    _deploy(run_toml("plaintext", rounds=1), split, clients, tmp_path / "first")
    # The same sites serve a second run in which site-2 is not sampled.
    shutil.copytree(tmp_path / "first" / "sites", tmp_path / "second" / "sites")
    sites = make_sites(clients, tmp_path / "second" / "sites", budget=20.0)
    make_aggregator(run_toml("plaintext", rounds=1), split).run(LocalSites(sites[:2]), tmp_path / "second" / "run")
    record_path = tmp_path / "second" / "run" / "aggregator.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "sites": [*record["sites"], "site-2"]}))
    report = audit_deployment(tmp_path / "second")
    idle = next(s for s in report.sites if s.site == "site-2")
    assert idle.epsilon_after_run is None and idle.rounds_charged == 0 and idle.audit.epsilon > 0
    assert not [f for f in report.findings if "site-2" in f.message and f.severity is not Severity.INFO]


def test_a_run_with_client_level_dp_gets_no_client_dp_warning(split, clients, tmp_path, run_toml):
    extra = "[federation.client_dp]\nnoise_multiplier = 0.6\nclip_norm = 0.4\ndelta = 1e-3\n"
    _deploy(run_toml("plaintext", rounds=1, extra=extra), split, clients, tmp_path)
    report = audit_deployment(tmp_path)
    assert not report.errors and len(report.sites) == 3
    assert "no-client-dp" not in {f.kind for f in report.findings}


def test_the_same_finding_at_many_sites_is_shown_for_the_first_few_then_by_site(split, clients, tmp_path, run_toml):
    _deploy(run_toml("plaintext", rounds=1), split, clients, tmp_path)
    report = audit_deployment(tmp_path)
    many = tuple(
        SiteFinding(severity=Severity.WARNING, kind="uncapped", site=f"clinic-{k:03d}", message=f"site clinic-{k:03d}: uncapped")
        for k in range(40)
    )
    text = type(report)(
        run_dir=report.run_dir, run=report.run, rounds=report.rounds, sites=report.sites, missing=(),
        findings=(SiteFinding(severity=Severity.ERROR, kind="over-budget", site="clinic-007", message="site clinic-007: over"), *many),
    ).to_markdown()
    findings = text.split("## Findings")[1]
    assert findings.count("uncapped") == 3 and "site clinic-007: over" in findings
    assert "the same at 37 more sites (deployment-audit.json has each): clinic-003, clinic-004" in findings
    assert "clinic-014, and 25 more" in findings and "clinic-015" not in findings
    # Sites, not findings, are counted: one site with 20 findings of a kind is listed in full, and findings
    # about no one site are never folded.
    repeated = tuple(
        SiteFinding(severity=Severity.WARNING, kind="recorded-epsilon", site="alpha", message=f"site alpha: entry {k}") for k in range(20)
    )
    unnamed = tuple(SiteFinding(severity=Severity.ERROR, kind="bad-name", message=f"the run names a site {k}") for k in range(15))
    folded = type(report)(
        run_dir=report.run_dir, run=report.run, rounds=report.rounds, sites=report.sites, missing=(), findings=(*unnamed, *repeated),
    ).to_markdown().split("## Findings")[1]
    assert folded.count("site alpha: entry") == 20 and folded.count("the run names a site") == 15 and "the same at" not in folded
    # 12 of one kind are still listed one by one.
    twelve = type(report)(
        run_dir=report.run_dir, run=report.run, rounds=report.rounds, sites=report.sites, missing=(), findings=many[:12],
    ).to_markdown()
    assert twelve.split("## Findings")[1].count("uncapped") == 12
