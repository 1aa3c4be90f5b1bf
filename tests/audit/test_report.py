"""Tests for the run audit: files written, epsilon recomputed from the ledger, warnings, and bad run directories."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from privfl.accounting import Accountant, epsilon
from privfl.audit.lint import Severity
from privfl.audit.report import AuditReport, audit_run
from privfl.config import config_from_dict
from privfl.errors import ConfigError
from privfl.runner import load_dataset, run, split_clients
from privfl.training import sampling_plan

SIGMA = 1.0
DELTA = 0.01  # >= 1/n for clients of ~228 examples: the audit must say so


def _config(budget: float):
    return config_from_dict(
        {
            "data": {"num_clients": 2, "partition": "iid"},
            "training": {"batch_size": 32, "dp": {"noise_multiplier": SIGMA, "budget_epsilon": budget, "delta": DELTA}},
            "federation": {"rounds": 3, "protection": "plaintext", "device": "cpu"},
        }
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-round, 2-client plaintext run whose budget allows exactly one round: rounds 1 and 2 are skipped."""
    probe = _config(1.0)
    sizes = [len(ds) for ds in split_clients(probe, load_dataset(probe)).values()]
    q, steps = sampling_plan(max(sizes), probe.training)
    one = epsilon(noise_multiplier=SIGMA, sample_rate=q, steps=steps, delta=DELTA)
    two = epsilon(noise_multiplier=SIGMA, sample_rate=q, steps=2 * steps, delta=DELTA)
    out = tmp_path_factory.mktemp("audit") / "run"
    run(_config((one + two) / 2), out, progress=False)
    return out


@pytest.fixture(scope="module")
def report(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AuditReport:
    return audit_run(run_dir)


def _codes(report: AuditReport) -> set[str]:
    return {f.code for f in report.warnings}


def test_writes_the_three_files(report: AuditReport, run_dir: Path) -> None:
    assert report.paths.markdown == run_dir / "audit.md"
    assert report.paths.markdown.read_text() == report.markdown
    assert json.loads(report.paths.json.read_text()) == report.to_json()
    assert report.paths.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.paths.plot.stat().st_size > 5000


def test_out_dir_is_honoured(run_dir: Path, tmp_path: Path) -> None:
    other = audit_run(run_dir, out_dir=tmp_path / "elsewhere")
    assert other.paths.json.parent == tmp_path / "elsewhere" and other.paths.json.exists()


def test_epsilon_series_is_monotone_and_ends_at_the_summary(report: AuditReport, run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert report.rounds == 3
    for c in report.clients:
        series = c.epsilon_by_round
        assert len(series) == 3
        assert all(b >= a for a, b in zip(series, series[1:]))
        assert series[0] > 0
        assert c.epsilon == pytest.approx(summary["clients"][c.client]["epsilon"], rel=1e-9)
        # Only round 0 was trained; the skipped rounds add nothing.
        assert series[1] == series[0] == series[2]
        assert c.rounds_trained == 1 and c.rounds_skipped == 2
        assert c.epsilon_remaining == pytest.approx(c.epsilon_budget - c.epsilon)


def test_cross_check_uses_the_other_accountant(report: AuditReport) -> None:
    assert report.accountant is Accountant.PRV and report.cross_check_accountant is Accountant.RDP
    for c in report.clients:
        (q,) = c.sample_rates
        assert c.epsilon_cross_check == pytest.approx(
            epsilon(noise_multiplier=SIGMA, sample_rate=q, steps=c.steps, delta=DELTA, accountant="rdp")
        )
        assert c.epsilon < c.epsilon_cross_check  # RDP is the looser bound
    assert "PFA010" not in _codes(report)
    rdp = audit_run(report.run_dir, out_dir=report.run_dir / "rdp", accountant="rdp")
    assert rdp.clients[0].epsilon == pytest.approx(report.clients[0].epsilon_cross_check)


def test_skipped_rounds_and_large_delta_are_flagged(report: AuditReport) -> None:
    by_code = {}
    for f in report.warnings:
        by_code.setdefault(f.code, []).append(f)
    assert {f.field for f in by_code["PFA002"]} == {"clients.client-0.delta", "clients.client-1.delta"}
    assert all(f.severity is Severity.ERROR for f in by_code["PFA002"])
    assert len(by_code["PFA007"]) == 2 and "2 round(s)" in by_code["PFA007"][0].message
    # A fixed sigma spent to its cap is a warning (not the expected end of a calibrated run).
    assert by_code["PFA004"][0].severity is Severity.WARNING
    assert "PFA012" in by_code  # no client-level DP
    for code in ("PFA001", "PFA003", "PFA005", "PFA009", "PFA011"):
        assert code not in by_code
    assert all(f.fix for f in report.warnings)
    severities = [f.severity for f in report.warnings]
    assert severities == sorted(severities, key=[Severity.ERROR, Severity.WARNING, Severity.INFO].index)


def test_client_level_epsilon_is_infinite_without_client_dp(report: AuditReport) -> None:
    assert not report.client_level.enabled and math.isinf(report.client_level.epsilon)
    data = report.to_json()["client_level"]
    assert data["epsilon"] is None and data["protected"] is False
    assert "NOT protected" in report.markdown and "infinity" in report.markdown


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("checkpoints", "audit.*", "rdp"))
    return target


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_client_level_epsilon_from_client_dp_settings(run_dir: Path, tmp_path: Path) -> None:
    copy = _copy(run_dir, tmp_path)
    settings = {"noise_multiplier": 1.2, "delta": 1e-3, "sampling": "poisson", "accountant": "prv"}
    _edit(copy / "summary.json", lambda s: s["federation"].__setitem__("client_dp", settings))
    audited = audit_run(copy)
    assert audited.client_level.enabled
    # Client fraction 1: three rounds of the Gaussian mechanism at z = 1.2, q = 1.
    assert audited.client_level.epsilon == pytest.approx(epsilon(noise_multiplier=1.2, sample_rate=1.0, steps=3, delta=1e-3))
    assert "PFA012" not in _codes(audited)


def test_edited_ledger_is_caught(run_dir: Path, tmp_path: Path) -> None:
    copy = _copy(run_dir, tmp_path)

    def halve(ledger):
        ledger["entries"][0]["epsilon"] /= 2

    _edit(copy / "ledger.json", halve)
    audited = audit_run(copy)
    assert "PFA011" in _codes(audited)


def test_gdp_ledger_and_uncapped_budget_are_flagged(run_dir: Path, tmp_path: Path) -> None:
    copy = _copy(run_dir, tmp_path)

    def gdp_uncapped(ledger):
        ledger["accountant"] = "gdp"
        for budget in ledger["budgets"].values():
            budget["epsilon"] = None

    _edit(copy / "ledger.json", gdp_uncapped)
    audited = audit_run(copy)
    assert {"PFA006", "PFA009"} <= _codes(audited)
    assert audited.accountant is Accountant.PRV
    assert audited.to_json()["sample_level"]["client-0"]["epsilon_budget"] is None


def test_missing_or_broken_run_dir(tmp_path: Path, run_dir: Path) -> None:
    with pytest.raises(ConfigError, match="nowhere"):
        audit_run(tmp_path / "nowhere")
    copy = _copy(run_dir, tmp_path)
    (copy / "summary.json").unlink()
    with pytest.raises(ConfigError, match="summary.json is missing"):
        audit_run(copy)
    (copy / "ledger.json").write_text("{not json")
    with pytest.raises(ConfigError, match="ledger.json"):
        audit_run(copy)
    with pytest.raises(ConfigError, match="accountant"):
        audit_run(run_dir, out_dir=tmp_path / "x", accountant="gdp")
