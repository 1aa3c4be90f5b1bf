"""`privfl audit --site`: a deployed site audits its own ledger, over every run it served."""

from __future__ import annotations

import json

import pytest
from roles_helpers import make_sites

from privfl.aggregator import Aggregator, LocalSites
from privfl.audit.rules import Severity
from privfl.audit.site import audit_site
from privfl.cli import main
from privfl.errors import ConfigError, LedgerError
from privfl.site import Site, _parse_config


def _run(text, split, clients, root):
    sites = make_sites(clients, root, budget=20.0)
    aggregator = Aggregator(text, input_shape=split.train.input_shape, num_classes=split.train.num_classes, progress=False)
    aggregator.run(LocalSites(sites))
    return aggregator.run_id, sites


def test_a_site_audit_recomputes_what_each_run_spent(split, clients, tmp_path, run_toml):
    text = run_toml("plaintext", rounds=2)
    first, sites = _run(text, split, clients, tmp_path)
    second, sites = _run(run_toml("plaintext", rounds=1), split, clients, tmp_path)
    site = sites[1]
    report = audit_site(site.state_dir, out_dir=tmp_path / "audit")
    spent, budget = site.spent(_parse_config(text))
    assert report.site == "site-1" and report.epsilon == pytest.approx(spent, rel=1e-9) and report.epsilon_budget == budget == 20.0
    assert [r.run for r in report.runs] == [first, second]
    assert [r.rounds_trained for r in report.runs] == [2, 1]
    assert report.runs[0].epsilon_after < report.runs[1].epsilon_after == pytest.approx(report.epsilon)
    # One run's trainings alone spend less than the site's total over both.
    assert report.runs[0].epsilon_run == pytest.approx(report.runs[0].epsilon_after) and report.runs[1].epsilon_run < report.epsilon
    assert report.authenticated and report.lines > 0 and report.errors == ()
    assert report.epsilon_cross_check > 0
    written = json.loads((tmp_path / "audit" / "site-audit.json").read_text())
    assert written["epsilon"] == pytest.approx(report.epsilon) and len(written["runs"]) == 2
    assert "# Privacy audit of site site-1" in (tmp_path / "audit" / "site-audit.md").read_text()


def test_an_uncapped_budget_is_reported_and_an_edited_ledger_refused(split, clients, tmp_path, run_toml):
    text = run_toml("plaintext", rounds=1).replace("target_epsilon = 3.0", "noise_multiplier = 1.0")
    # Uncapped only when the site itself says so (a config without a budget is refused otherwise).
    sites = [Site(name, data, tmp_path / name, allow_noise_seed=True, budget=float("inf")) for name, data in clients.items()]
    Aggregator(text, input_shape=split.train.input_shape, num_classes=split.train.num_classes, progress=False).run(LocalSites(sites))
    report = audit_site(sites[0].state_dir)
    assert any(f.severity is Severity.WARNING and "uncapped" in f.message for f in report.findings)
    assert (sites[0].state_dir / "site-audit.md").is_file()
    ledger = sites[0].state_dir / "ledger.jsonl"
    lines = ledger.read_text().splitlines(keepends=True)
    lines[-1] = lines[-1].replace('"steps":', '"steps": 1, "x":', 1)
    ledger.write_text("".join(lines))
    with pytest.raises(LedgerError):
        audit_site(sites[0].state_dir)
    with pytest.raises(ConfigError, match="not a site's state directory"):
        audit_site(tmp_path)


def test_the_command_line_audits_a_site_and_refuses_mixed_arguments(split, clients, tmp_path, run_toml, capsys):
    _, sites = _run(run_toml("plaintext", rounds=1), split, clients, tmp_path)
    assert main(["audit", "--site", str(sites[2].state_dir), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["site"] == "site-2"
    assert main(["audit", str(tmp_path), "--site", str(sites[2].state_dir)]) == 2
    assert main(["audit"]) == 2
    assert "name a run directory" in capsys.readouterr().err
