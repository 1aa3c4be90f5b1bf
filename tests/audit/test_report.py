"""Tests for the run audit: files written, epsilon recomputed from the ledger, warnings, and bad run directories."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import math
import shutil
from pathlib import Path

import pytest

from privfl.accounting import Accountant, epsilon
from privfl.audit.lint import Severity
from privfl.audit.report import AuditReport, audit_run
from privfl.config import config_from_dict
from privfl.errors import ConfigError, LedgerError
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
    return {f.code for f in report.findings}


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
        assert all(b >= a for a, b in itertools.pairwise(series))
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
    for f in report.findings:
        by_code.setdefault(f.code, []).append(f)
    assert {f.field for f in by_code["PFA002"]} == {"clients.client-0.delta", "clients.client-1.delta"}
    assert all(f.severity is Severity.ERROR for f in by_code["PFA002"])
    assert len(by_code["PFA007"]) == 2 and "2 round(s)" in by_code["PFA007"][0].message
    # A fixed sigma spent to its cap is a warning (not the expected end of a calibrated run).
    assert by_code["PFA004"][0].severity is Severity.WARNING
    assert "PFA012" in by_code  # no client-level DP
    for code in ("PFA001", "PFA003", "PFA005", "PFA009", "PFA011"):
        assert code not in by_code
    assert all(f.fix for f in report.findings)
    severities = [f.severity for f in report.findings]
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


GENESIS = hashlib.sha256(b"privfl ledger journal, format 2").hexdigest()


def _canonical(record) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _edit_ledger(run_dir: Path, change, *, resign: bool) -> None:
    """Applies ``change`` to the ledger's records (a list of dicts) and writes them back.

    With ``resign`` the journal is re-chained and re-MACed under the run's key, as someone holding
    ledger.key could; without it, the edited lines keep their old hashes and MACs. Written from the
    documented format, independently of privfl's writer.
    """
    path = run_dir / "ledger.jsonl"
    key = bytes.fromhex((run_dir / "ledger.key").read_text().strip())
    records = [json.loads(line) for line in path.read_text().splitlines()]
    if not resign:
        # Each line keeps the prev and mac it had: a hand edit with a text editor.
        path.write_bytes(b"".join(_canonical(r) + b"\n" for r in change(records)))
        return
    records = change([{k: v for k, v in r.items() if k not in ("prev", "mac")} for r in records])
    lines, prev = [], GENESIS
    for record in records:
        body = {**record, "prev": prev}
        body["mac"] = hmac.new(key, _canonical(body), hashlib.sha256).hexdigest()
        line = _canonical(body)
        prev = hashlib.sha256(line).hexdigest()
        lines.append(line)
    path.write_bytes(b"\n".join(lines) + b"\n")


def _drop_anchors(run_dir: Path) -> None:
    """Removes the ledger lines history.json and summary.json recorded (a re-signed ledger changes every hash after the edit)."""
    _edit(run_dir / "history.json", lambda h: [r.pop("ledger") for r in h])
    _edit(run_dir / "summary.json", lambda s: s.pop("ledger"))


def _halve_first_epsilon(records):
    first = next(r for r in records if r["kind"] == "entry")
    first["epsilon"] /= 2
    return records


def test_edited_ledger_is_caught(run_dir: Path, tmp_path: Path) -> None:
    copy = _copy(run_dir, tmp_path)
    _edit_ledger(copy, _halve_first_epsilon, resign=False)
    with pytest.raises(LedgerError, match=r"ledger.jsonl: line \d+ \(entry of 'client-\d', round 0\): its MAC does not verify"):
        audit_run(copy)
    # Someone holding ledger.key can re-sign the edit: the lines history.json recorded differ...
    copy = _copy(run_dir, tmp_path / "resigned")
    _edit_ledger(copy, _halve_first_epsilon, resign=True)
    with pytest.raises(LedgerError, match=r"not the line history\.json recorded after round 0"):
        audit_run(copy)
    # ...and with those removed too, the recomputed epsilon still disagrees.
    _drop_anchors(copy)
    assert "PFA011" in _codes(audit_run(copy))


def _raise_sigma(client):
    def change(records):
        for r in records:
            if r["kind"] == "entry" and r["client"] == client and r["status"] == "trained":
                r["noise_multiplier"] *= 1.5
        return records

    return change


def test_a_raised_noise_multiplier_is_caught(run_dir: Path, tmp_path: Path) -> None:
    # The review's finding: raising one client's sigma lowered its epsilon and passed.
    copy = _copy(run_dir, tmp_path)
    _edit_ledger(copy, _raise_sigma("client-1"), resign=False)
    with pytest.raises(LedgerError, match="client-1"):
        audit_run(copy)
    copy = _copy(run_dir, tmp_path / "resigned")
    _edit_ledger(copy, _raise_sigma("client-1"), resign=True)
    _drop_anchors(copy)
    flagged = [f for f in audit_run(copy).findings if f.code == "PFA011"]
    assert [f.field for f in flagged] == ["clients.client-1.epsilon"]


def _drop_client(client):
    def change(records):
        return [r for r in records if not (r["kind"] == "entry" and r["client"] == client)]

    return change


def test_deleted_entries_are_caught(run_dir: Path, tmp_path: Path) -> None:
    # The review's finding: deleting one client's entries passed the audit, though history.json
    # shows it training.
    copy = _copy(run_dir, tmp_path)
    _edit_ledger(copy, _drop_client("client-0"), resign=False)
    with pytest.raises(LedgerError, match="does not follow line"):
        audit_run(copy)
    copy = _copy(run_dir, tmp_path / "resigned")
    _edit_ledger(copy, _drop_client("client-0"), resign=True)
    _drop_anchors(copy)
    with pytest.raises(LedgerError, match=r"history.json says client 'client-0' trained in round 0 1 time\(s\), the ledger 0"):
        audit_run(copy)


def test_a_shortened_ledger_is_caught_by_the_anchors(run_dir: Path, tmp_path: Path) -> None:
    copy = _copy(run_dir, tmp_path)
    # Cut the last line (client-1's skip in round 2) and its history record: chain, MACs and the
    # cross-check are intact; the lines history and summary recorded are not.
    assert json.loads((copy / "ledger.jsonl").read_text().splitlines()[-1])["client"] == "client-1"
    _edit_ledger(copy, lambda records: records[:-1], resign=True)
    _edit(copy / "history.json", lambda h: h[2]["skipped"].pop("client-1"))
    with pytest.raises(LedgerError, match="cut short or replaced"):
        audit_run(copy)


def test_the_ledger_key_is_needed(run_dir: Path, tmp_path: Path) -> None:
    copy = _copy(run_dir, tmp_path)
    (copy / "ledger.key").unlink()
    with pytest.raises(LedgerError, match=r"ledger\.key"):
        audit_run(copy)
    copy = _copy(run_dir, tmp_path / "loose")
    (copy / "ledger.key").chmod(0o644)
    with pytest.raises(LedgerError, match="chmod 600"):
        audit_run(copy)


def test_the_report_states_what_was_verified(report: AuditReport, run_dir: Path) -> None:
    lines = (run_dir / "ledger.jsonl").read_text().splitlines()
    assert report.ledger.lines == len(lines) and report.ledger.authenticated
    assert report.ledger.head == hashlib.sha256(lines[-1].encode()).hexdigest()
    assert report.ledger.head in report.markdown and report.to_json()["ledger"]["head"] == report.ledger.head


def test_seeded_client_sampling_is_flagged(run_dir: Path, tmp_path: Path) -> None:
    settings = {"noise_multiplier": 1.2, "delta": 1e-3, "sampling": "poisson", "accountant": "prv"}
    for secret in (True, False):
        copy = _copy(run_dir, tmp_path / str(secret))

        def change(s, secret=secret):
            s["federation"]["client_dp"] = settings
            s["federation"]["client_fraction"] = 0.5
            s["client_sampling_secret"] = secret

        _edit(copy / "summary.json", change)
        audited = audit_run(copy)
        assert ("PFA013" in _codes(audited)) is (not secret)
    (finding,) = [f for f in audited.findings if f.code == "PFA013"]
    unamplified = epsilon(noise_multiplier=1.2, sample_rate=1.0, steps=3, delta=1e-3)
    assert f"{unamplified:.3g} (q = 1)" in finding.message


def test_gdp_ledger_and_uncapped_budget_are_flagged(run_dir: Path, tmp_path: Path) -> None:
    copy = _copy(run_dir, tmp_path)

    def gdp_uncapped(records):
        for r in records:
            if r["kind"] == "header":
                r["accountant"] = "gdp"
            if r["kind"] == "budget":
                r["epsilon"] = None
        return records

    # A ledger written by a tool that used GDP: consistently chained and authenticated.
    _edit_ledger(copy, gdp_uncapped, resign=True)
    _drop_anchors(copy)
    audited = audit_run(copy)
    assert {"PFA006", "PFA009"} <= _codes(audited)
    assert audited.accountant is Accountant.PRV
    assert audited.to_json()["sample_level"]["client-0"]["epsilon_budget"] is None


def test_missing_or_broken_run_dir(tmp_path: Path, run_dir: Path) -> None:
    with pytest.raises(ConfigError, match="nowhere"):
        audit_run(tmp_path / "nowhere")
    copy = _copy(run_dir, tmp_path)
    (copy / "history.json").unlink()
    with pytest.raises(ConfigError, match=r"history\.json is missing"):
        audit_run(copy)  # a finished run (it has summary.json) must have its history
    shutil.copy(run_dir / "history.json", copy / "history.json")
    (copy / "summary.json").unlink()
    # Without summary.json the run is unfinished: audited as it stands, and the report says so.
    assert "PFA015" in {f.code for f in audit_run(copy).findings}
    (copy / "ledger.jsonl").write_text("{not json\n")
    with pytest.raises(LedgerError, match=r"ledger\.jsonl: line 1: not a JSON line"):
        audit_run(copy)
    (copy / "ledger.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"ledger\.jsonl is missing"):
        audit_run(copy)
    with pytest.raises(ConfigError, match="accountant"):
        audit_run(run_dir, out_dir=tmp_path / "x", accountant="gdp")


def test_fixed_size_client_sampling_is_described_as_the_mechanism_that_ran(run_dir: Path, tmp_path: Path) -> None:
    # Issue 13 item 5: "z = 7.2, m of K sites per round", not only its accounting model (q = 1, z/2).
    copy = _copy(run_dir, tmp_path)
    settings = {"noise_multiplier": 7.2, "delta": 1e-3, "sampling": "fixed", "accountant": "prv"}

    def change(s):
        s["federation"]["client_dp"] = settings
        s["federation"]["client_fraction"] = 0.5

    _edit(copy / "summary.json", change)
    level = audit_run(copy).client_level
    assert level.sampling == "fixed" and level.noise_multiplier == pytest.approx(3.6) and level.sample_rate == 1.0
    assert level.description == "z = 7.2 on the sum of clipped updates, 1 of 2 sites per round (fixed-size sampling)"
    assert "z/2 = 3.6 at q = 1" in level.explanation
    # q = 1: no amplification to lose, so the guarantee against the server is the same figure.
    assert level.epsilon_against_server == level.epsilon == pytest.approx(
        epsilon(noise_multiplier=3.6, sample_rate=1.0, steps=3, delta=1e-3)
    )


def test_each_delta_is_labelled_and_the_no_amplification_epsilon_is_reported(run_dir: Path, tmp_path: Path) -> None:
    copy = _copy(run_dir, tmp_path)
    settings = {"noise_multiplier": 1.2, "delta": 1e-3, "sampling": "poisson", "accountant": "prv"}

    def change(s):
        s["federation"]["client_dp"] = settings
        s["federation"]["client_fraction"] = 0.5
        s["client_sampling_secret"] = True  # secret: amplified against outsiders, not against the server

    _edit(copy / "summary.json", change)
    audited = audit_run(copy)
    level = audited.client_level
    unamplified = epsilon(noise_multiplier=1.2, sample_rate=1.0, steps=3, delta=1e-3)
    assert level.epsilon < unamplified and level.epsilon_against_server == pytest.approx(unamplified)
    assert f"against the server, which sees who took part: {unamplified:.3f}" in audited.markdown
    assert f"epsilon {unamplified:.3f} (q = 1)" in level.explanation
    assert audited.to_json()["client_level"]["epsilon_against_server"] == pytest.approx(unamplified)
    assert f"sample-level delta (one record of a client): {DELTA:g}" in audited.markdown
    assert "at client-level delta 0.001" in audited.markdown and "| sample delta |" in audited.markdown


def test_the_report_says_what_it_checks_and_what_it_cannot(report: AuditReport) -> None:
    assert "taken on trust" not in report.markdown
    assert "## What this audit checks, and what it cannot" in report.markdown
    assert "not checked: that the training code did what the ledger records" in report.markdown


def test_the_threshold_advice_keeps_it_above_half_the_share_holders(run_dir: Path, tmp_path: Path) -> None:
    copy = _copy(run_dir, tmp_path)
    _edit(copy / "history.json", lambda h: h[0].__setitem__("aborted", "2 survivors < threshold 3"))
    (finding,) = [f for f in audit_run(copy).findings if f.code == "PFA008" and f.field == "rounds.aborted"]
    assert "above half the share holders" in finding.fix and "PFL020" in finding.fix


def test_few_clients_get_a_column_and_a_line_each(report: AuditReport) -> None:
    table = report.markdown.split("### Epsilon after each round", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in table.splitlines() if line.startswith("| round"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["round", *(c.client for c in report.clients)]
