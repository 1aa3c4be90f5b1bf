"""Issue 14 items 2-4 and 7: refusals before any work, typed filesystem errors, an audit that fails loudly.

Each test reproduces a reported problem: a refused run that first calibrated noise, a traceback for
a file in the way or a full disk, an audit that exits 0 with errors, an RDP cross-check that called a
clean run edited, an unfinished run that could only be audited by resuming (spending) it.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from rich.console import Console

import privfl.federation as federation_module
from privfl.accounting import Accountant, LedgerKey, PrivacyLedger
from privfl.audit.report import audit_run
from privfl.cli import main
from privfl.config import DPConfig, FederationConfig, ProtectionKind, TrainingConfig
from privfl.errors import ConfigError, LedgerError, RunLockedError
from privfl.federation import Federation
from privfl.models import LogisticRegression
from privfl.report import interrupted_trainings, print_run_report
from privfl.rundir import LEDGER_FILE, RunLock


def _federation(clients, split, *, rounds=2, dp=None):
    return Federation(
        model_fn=lambda: LogisticRegression(30, 2),
        clients=clients,
        test_set=split.test,
        training=TrainingConfig(batch_size=64, learning_rate=0.5, dp=dp or DPConfig(noise_multiplier=1.0)),
        federation=FederationConfig(rounds=rounds, protection=ProtectionKind.PLAINTEXT, device="cpu"),
        progress=False,
    )


def _calibrated(clients, split, rounds=3):
    # PRV (the default) calibrated to epsilon 3: the RDP figure of the same events is above 3.
    return _federation(clients, split, rounds=rounds, dp=DPConfig(target_epsilon=3.0))


def _tiny_config(tmp_path: Path) -> Path:
    config = tmp_path / "tiny.toml"
    config.write_text(
        '[data]\nnum_clients = 3\npartition = "iid"\n[training]\nbatch_size = 64\n'
        '[training.dp]\nnoise_multiplier = 1.0\nbudget_epsilon = 50.0\naccountant = "rdp"\n'
        '[federation]\nrounds = 2\nprotection = "plaintext"\ndevice = "cpu"\n'
    )
    return config


# -- item 3: refuse before working ----------------------------------------------------------------------
@pytest.fixture
def no_calibration(monkeypatch):
    """Fails the test if noise is calibrated (the expensive step a refusal must not pay for)."""
    calls = []

    def calibrate(**kwargs):
        calls.append(kwargs)
        raise AssertionError("noise was calibrated before the run directory was checked")

    monkeypatch.setattr(federation_module, "noise_multiplier", calibrate)
    return calls


def test_refusals_for_the_directory_come_before_noise_calibration(clients, split, tmp_path, no_calibration, monkeypatch):
    fed = _calibrated(clients, split)
    held = tmp_path / "held"
    held.mkdir()
    (held / LEDGER_FILE).write_text("")  # a ledger is there: a fresh start would reset spending
    with pytest.raises(ConfigError, match="already holds a run's privacy ledger"):
        fed.run(held)
    with pytest.raises(ConfigError, match="holds no run to resume"):
        fed.run(tmp_path / "empty", resume=True)
    traces = tmp_path / "traces"
    traces.mkdir()
    (traces / "history.json").write_text("[]")
    with pytest.raises(LedgerError, match=r"history\.json"):
        fed.run(traces)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"File exists|existing file"):
        fed.run(a_file)
    with RunLock(tmp_path / "locked"):
        with pytest.raises(RunLockedError):
            fed.run(tmp_path / "locked")
    # Unwritable (as root, permissions do not stop us: simulate a read-only file system).
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(ConfigError, match="Read-only file system"):
        fed.run(tmp_path / "ro" / "run")
    assert no_calibration == []


def test_the_runner_refuses_before_loading_data(tmp_path, monkeypatch):
    import privfl.runner as runner
    from privfl.config import load_config

    config = load_config(_tiny_config(tmp_path))

    def load(*args, **kwargs):
        raise AssertionError("the dataset was loaded before the run directory was checked")

    monkeypatch.setattr(runner, "load_dataset", load)
    held = tmp_path / "held"
    held.mkdir()
    (held / LEDGER_FILE).write_text("")
    with pytest.raises(ConfigError, match="already holds"):
        runner.run(config, held, progress=False)
    with pytest.raises(ConfigError, match="holds no run to resume"):
        runner.run(config, tmp_path / "empty", resume=True, progress=False)
    with RunLock(tmp_path / "locked"):
        # A run in progress may not have written its ledger yet: "in use" is the true refusal.
        with pytest.raises(RunLockedError):
            runner.run(config, tmp_path / "locked", resume=True, progress=False)


def test_an_unwritable_directory_is_refused_before_anything_is_created(tmp_path, monkeypatch):
    from privfl.rundir import check_run_directory

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match="no write permission"):
        check_run_directory(tmp_path / "new", resume=False)
    assert not (tmp_path / "new").exists()


# -- item 4: typed filesystem errors, exit 2, from every command -----------------------------------------
def _no_traceback(err: str) -> None:
    assert "Traceback" not in err and err.count("privfl: error:") == 1


@pytest.mark.parametrize("where", ["file", "proc"])
def test_run_and_audit_with_an_impossible_out_exit_2(tmp_path, capsys, where, audited_run):
    target = "/proc/privfl-x" if where == "proc" else str(tmp_path / "a-file")
    if where == "file":
        Path(target).write_text("x")
    assert main(["run", str(_tiny_config(tmp_path)), "--out", target, "--quiet"]) == 2
    err = capsys.readouterr().err
    _no_traceback(err)
    assert f"out_dir={target!r}" in err
    assert main(["audit", str(audited_run), "--out", target]) == 2
    err = capsys.readouterr().err
    _no_traceback(err)
    assert f"out_dir={target!r}" in err and "cannot write the audit report" in err
    assert main(["attack", "--out", target, "--quiet"]) == 2
    _no_traceback(capsys.readouterr().err)


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_attack_on_a_read_only_or_full_disk_exits_2(tmp_path, capsys, monkeypatch, code):
    import privfl.attacks.matrix as harness

    def fails(config, out, **kwargs):
        raise OSError(code, os.strerror(code), str(Path(out) / "results.json"))

    monkeypatch.setattr(harness, "run_attack_matrix", fails)
    assert main(["attack", "--out", str(tmp_path / "attacks"), "--quiet"]) == 2
    err = capsys.readouterr().err
    _no_traceback(err)
    assert os.strerror(code) in err and "results.json" in err


def test_lint_of_an_unreadable_file_exits_2(tmp_path, capsys, monkeypatch):
    config = _tiny_config(tmp_path)
    real_read_text = Path.read_text

    def denied(self, *args, **kwargs):
        if self == config:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)  # as root, chmod 000 would not stop the read
    assert main(["lint", str(config)]) == 2
    err = capsys.readouterr().err
    _no_traceback(err)
    assert "Permission denied" in err and str(config) in err


def _disk_fills_after(monkeypatch, writes: int, *, target=os, name="fsync"):
    """Makes every ``os.<name>`` call after the first ``writes`` raise ENOSPC."""
    real = getattr(target, name)
    count = [0]

    def full(*args, **kwargs):
        count[0] += 1
        if count[0] > writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, full)
    return count


@pytest.mark.parametrize("writes", [1, 3, 6, 12, 20])
def test_disk_full_during_a_run_exits_2_leaves_no_temp_files_and_resumes(tmp_path, capsys, monkeypatch, writes):
    # A 2-round run fsyncs 28 times: 1 the run lock, 2-5 the key and the ledger's creation (file and
    # directory), then run.json, journal lines, history, checkpoints and summary.
    config = _tiny_config(tmp_path)
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _disk_fills_after(patch, writes)
        assert main(["run", str(config), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    _no_traceback(err)
    assert "No space left on device" in err and "free space" in err
    assert not [p.name for p in out.rglob("*.tmp")], "a failed write left a temporary file"
    # Once space is back, what the message says to do works.
    again = ["run", str(config), "--out", str(out), "--quiet"] + (["--resume"] if "--resume" in err else [])
    assert main(again) == 0, capsys.readouterr().err


def test_disk_full_writing_the_audit_exits_2_without_temp_files(audited_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "report"
    with monkeypatch.context() as patch:
        _disk_fills_after(patch, 1)
        assert main(["audit", str(audited_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    _no_traceback(err)
    assert "No space left on device" in err and "cannot write the audit report" in err
    assert not [p.name for p in out.rglob("*.tmp")], "a failed write left a temporary file"


# -- item 2: an audit that fails loudly and compares like with like -------------------------------------
@pytest.fixture(scope="module")
def audited_run(clients, split, tmp_path_factory):
    out = tmp_path_factory.mktemp("loud") / "run"
    _calibrated(clients, split, rounds=2).run(out)
    return out


def test_an_rdp_cross_check_of_a_clean_prv_run_finds_no_error(audited_run, tmp_path, capsys):
    assert main(["audit", str(audited_run), "--out", str(tmp_path / "prv")]) == 0
    capsys.readouterr()
    assert main(["audit", str(audited_run), "--out", str(tmp_path / "rdp"), "--accountant", "rdp", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["error"] == 0, report["findings"]
    assert report["accountant"] == "rdp" and report["cross_check_accountant"] == "prv"
    for c in report["sample_level"].values():
        # The RDP figure is above the budget PRV enforced; the comparison with it is with PRV.
        assert c["epsilon"] > c["epsilon_budget"] >= c["epsilon_enforced"] * (1 - 1e-9)
        assert c["epsilon_enforced"] == pytest.approx(c["epsilon_cross_check"])
    codes = [f["code"] for f in report["findings"]]
    assert "PFA003" not in codes and "PFA011" not in codes and codes.count("PFA014") == 3
    assert "ledger enforced budgets with prv" in (tmp_path / "rdp" / "audit.md").read_text()


def test_an_audit_with_an_error_exits_1(audited_run, tmp_path, capsys):
    # An edited summary figure is an ERROR finding (PFA011): the audit must not exit 0.
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(audited_run, copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["clients"]["site-0"]["epsilon"] = 1.0
    (copy / "summary.json").write_text(json.dumps(summary))
    assert main(["audit", str(copy)]) == 1
    assert "ERROR PFA011" in capsys.readouterr().out


# -- item 2 and 7: an interrupted run, audited without resuming; its charges explained -------------------
class _Stop(KeyboardInterrupt):
    pass


@pytest.fixture(scope="module")
def interrupted(clients, split, tmp_path_factory):
    """A 3-round run calibrated to its budget, stopped after site-0's charge in round 1, audited, then resumed."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    real_charge = PrivacyLedger.charge

    def charge(self, round_index, client, event, **kwargs):
        entry = real_charge(self, round_index, client, event, **kwargs)
        if round_index == 1 and client == "site-0":
            raise _Stop  # like Ctrl-C or kill -9 after the charge was written
        return entry

    PrivacyLedger.charge = charge
    try:
        with pytest.raises(_Stop):
            _calibrated(clients, split).run(out)
    finally:
        PrivacyLedger.charge = real_charge
    lines_before = (out / LEDGER_FILE).read_bytes()
    unfinished = audit_run(out, out_dir=out / "unfinished")
    assert (out / LEDGER_FILE).read_bytes() == lines_before  # auditing spent nothing, resumed nothing
    result = _calibrated(clients, split).run(out, resume=True)
    return out, unfinished, result


def test_an_interrupted_run_is_audited_as_it_stands(interrupted):
    out, report, _ = interrupted
    assert report.interrupted and not (out / "unfinished" / "summary.json").exists()
    assert "PFA015" in {f.code for f in report.findings}
    by_name = {c.client: c for c in report.clients}
    # Round 0 for everyone, and site-0's charge of the round in progress.
    assert by_name["site-0"].rounds_trained == 2 and by_name["site-1"].rounds_trained == 1
    assert by_name["site-0"].epsilon > by_name["site-0"].epsilon_by_round[0]
    assert report.errors == ()
    assert "UNFINISHED" in report.markdown
    # The round in progress counts in `rounds` (it charged the ledger), and the header says it was not recorded.
    assert report.rounds == 2 and report.recorded_rounds == 1 and report.to_json()["recorded_rounds"] == 1
    assert "- rounds: 2; 1 recorded in history.json, the next one interrupted after its charges" in report.markdown


def test_a_charge_of_an_interrupted_attempt_is_explained(interrupted):
    out, _, result = interrupted
    report = audit_run(out)
    site0 = {c.client: c for c in report.clients}["site-0"]
    # The rerun of round 1 charged site-0 again: its calibrated budget cannot afford round 2.
    assert site0.rounds_interrupted == 1 and site0.rounds_trained == 3 and site0.rounds_skipped == 1
    (pfa007,) = [f for f in report.findings if f.code == "PFA007"]
    assert "interrupted attempts" in pfa007.message and "Nothing to change in the calibration" in pfa007.fix
    assert "| interrupted |" in report.markdown  # a column of the sample-level table
    assert interrupted_trainings(result) == {"site-0": 1}
    assert result.summary["clients"]["site-0"]["rounds_interrupted"] == 1
    assert result.summary["clients"]["site-1"]["rounds_interrupted"] == 0
    # The interrupted charge carries a note in the ledger itself (and survives a reload).
    reloaded = PrivacyLedger.load(out / LEDGER_FILE, key=LedgerKey.read(out / "ledger.key"))
    (index,) = reloaded.superseded()
    assert reloaded.entries[index].client == "site-0"
    assert "interrupted attempt at round 1" in reloaded.entries[index].note
    console = Console(record=True, width=200)
    print_run_report(result, console=console)
    text = console.export_text()
    assert "of which interrupted" in text and "interrupted attempts" in text


def test_findings_are_split_by_severity(interrupted):
    out, _, _ = interrupted
    report = audit_run(out)
    assert report.warnings and all(f.severity.value == "warning" for f in report.warnings)
    assert all(f.severity.value == "info" for f in report.notes)
    assert set(report.findings) == set(report.errors) | set(report.warnings) | set(report.notes)
    assert report.to_json()["counts"] == {"error": len(report.errors), "warning": len(report.warnings), "info": len(report.notes)}


def test_the_accountant_enum_is_what_the_audit_reports(audited_run):
    assert audit_run(audited_run, out_dir=audited_run / "again").accountant is Accountant.PRV


def test_a_third_accountant_is_cross_checked_against_the_ledgers_own(audited_run, tmp_path, capsys):
    # A PRV ledger audited with PLD: the cross-check column must be PRV (the enforcing one), not RDP.
    assert main(["audit", str(audited_run), "--out", str(tmp_path / "pld"), "--accountant", "pld", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accountant"] == "pld" and report["cross_check_accountant"] == "prv"
    assert report["counts"]["error"] == 0, report["findings"]
    for c in report["sample_level"].values():
        assert c["epsilon_enforced"] == c["epsilon_cross_check"] <= c["epsilon_budget"] * (1 + 1e-9)
