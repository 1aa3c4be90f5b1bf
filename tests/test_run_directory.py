"""The run directory: one run at a time, no silent reset of spending, typed errors, durable state."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import privfl.federation as federation_module
from privfl.cli import main
from privfl.config import DPConfig, FederationConfig, ProtectionKind, TrainingConfig
from privfl.errors import ConfigError, LedgerError, PrivflError, RunLockedError
from privfl.federation import CHECKPOINT_DIR, HISTORY_FILE, LEDGER_FILE, RUN_FILE, SUMMARY_FILE, Federation
from privfl.models import LogisticRegression


def _federation(clients, split, *, rounds=2):
    return Federation(
        model_fn=lambda: LogisticRegression(30, 2),
        clients=clients,
        test_set=split.test,
        training=TrainingConfig(batch_size=64, learning_rate=0.5, dp=DPConfig(noise_multiplier=1.0)),
        federation=FederationConfig(rounds=rounds, protection=ProtectionKind.PLAINTEXT, device="cpu"),
        progress=False,
    )


def test_a_second_run_on_a_held_directory_is_refused_naming_the_holder(clients, split, tmp_path):
    from privfl.rundir import RunLock

    out = tmp_path / "run"
    with RunLock(out):
        # flock conflicts between two open file descriptions, even in one process.
        with pytest.raises(RunLockedError) as info:
            _federation(clients, split).run(out)
        assert f"pid {os.getpid()}" in info.value.holder
        with pytest.raises(RunLockedError):
            _federation(clients, split).run(out, resume=True)
    assert not (out / LEDGER_FILE).exists()  # the refused run wrote nothing
    _federation(clients, split, rounds=1).run(out)  # released: the directory is usable


@pytest.mark.parametrize("resume", [False, True])
def test_a_lost_ledger_is_refused_and_nothing_is_overwritten(clients, split, tmp_path, resume):
    out = tmp_path / "run"
    _federation(clients, split).run(out)
    (out / LEDGER_FILE).unlink()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(LedgerError) as info:
        _federation(clients, split, rounds=3).run(out, resume=resume)
    assert LEDGER_FILE in str(info.value) and "history.json" in str(info.value)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "run.lock"}
    assert {p: b for p, b in before.items() if p.name != "run.lock"} == after


@pytest.mark.parametrize("trace", [HISTORY_FILE, RUN_FILE, SUMMARY_FILE, CHECKPOINT_DIR])
def test_any_trace_of_a_run_without_its_ledger_is_refused(clients, split, tmp_path, trace):
    out = tmp_path / "run"
    out.mkdir()
    if trace == CHECKPOINT_DIR:
        (out / trace).mkdir()
    else:
        (out / trace).write_text("[]")
    with pytest.raises(LedgerError, match=trace):
        _federation(clients, split).run(out)


def test_a_corrupt_history_is_a_typed_error_on_resume(clients, split, tmp_path):
    out = tmp_path / "run"
    _federation(clients, split).run(out)
    (out / HISTORY_FILE).write_text('[{"round": 0, "sampled": ')
    with pytest.raises(ConfigError, match=r"history\.json"):
        _federation(clients, split, rounds=3).run(out, resume=True)
    (out / HISTORY_FILE).write_text('[{"round": "zero"}]')
    with pytest.raises(ConfigError, match=r"history\.json"):
        _federation(clients, split, rounds=3).run(out, resume=True)


def test_a_corrupt_checkpoint_is_a_typed_error_on_resume(clients, split, tmp_path):
    out = tmp_path / "run"
    _federation(clients, split).run(out)
    (out / CHECKPOINT_DIR / "round-0001.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(ConfigError, match=r"round-0001\.pt"):
        _federation(clients, split, rounds=3).run(out, resume=True)


def test_every_state_file_is_fsynced_then_renamed_then_its_directory_fsynced(clients, split, tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", f"{os.path.realpath(src)} -> {os.path.realpath(dst)}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "run"
    _federation(clients, split).run(out)
    replaced = [(i, e[1].split(" -> ")) for i, e in enumerate(events) if e[0] == "replace"]
    targets = {Path(dst).name for _, (_, dst) in replaced}
    assert {"history.json", "summary.json", "run.json", "round-0000.pt", "round-0001.pt"} <= targets
    for i, (src, dst) in replaced:
        assert ("fsync", src) in events[:i], f"{dst} renamed before its content was fsynced"
        assert ("fsync", str(Path(dst).parent)) in events[i + 1 :], f"{dst}'s directory not fsynced after the rename"
    # the ledger journal: every line is fsynced where it is written
    ledger = os.path.realpath(out / LEDGER_FILE)
    assert sum(1 for e in events if e == ("fsync", ledger)) >= 2 * 3  # a charge per client per round
    # history.json: replaced whole in round 0, then round 1's record appended in place and fsynced there
    history = os.path.realpath(out / HISTORY_FILE)
    first_checkpoint = next(i for i, (_, dst) in replaced if Path(dst).name == "round-0000.pt")
    assert ("fsync", history) in events[first_checkpoint:]


def _interrupt_at_first_training(monkeypatch):
    def interrupted(*_, **__):  # stands in for train_dp_sgd
        raise KeyboardInterrupt

    monkeypatch.setattr(federation_module, "train_dp_sgd", interrupted)


def _tiny_config(tmp_path: Path) -> Path:
    config = tmp_path / "tiny.toml"
    config.write_text(
        '[data]\nnum_clients = 3\npartition = "iid"\n[training]\nbatch_size = 64\n[training.dp]\nnoise_multiplier = 1.0\n'
        '[federation]\nrounds = 2\nprotection = "plaintext"\ndevice = "cpu"\nnoise_seed = 1\n'
    )
    return config


def test_the_interrupt_hint_is_true_after_an_early_interrupt(tmp_path, monkeypatch, capsys):
    config = _tiny_config(tmp_path)
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt_at_first_training(patch)
        assert main(["run", str(config), "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err
    # Interrupted before the first charge: the ledger holds its budgets and no spending, and
    # the hint to resume works.
    assert "--resume" in err and str(out) in err
    assert main(["run", str(config), "--out", str(out), "--quiet", "--resume"]) == 0
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["rounds"] == 2


def test_the_interrupt_hint_says_run_again_when_nothing_was_written(tmp_path, monkeypatch, capsys):
    from privfl.federation import interrupted_run_hint

    out = tmp_path / "never"
    assert "run again" in interrupted_run_hint(out)
    out.mkdir()
    (out / "run.lock").write_text("")
    assert "run again" in interrupted_run_hint(out)
    config = _tiny_config(tmp_path)
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0  # and running again works


def test_a_locked_directory_exits_2_from_the_cli(tmp_path, capsys):
    from privfl.rundir import RunLock

    out = tmp_path / "run"
    with RunLock(out):
        assert main(["run", str(_tiny_config(tmp_path)), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "in use by pid" in err and str(out) in err


def test_errors_are_privfl_errors():
    assert issubclass(LedgerError, PrivflError) and issubclass(RunLockedError, PrivflError)


def test_resume_refuses_an_edited_ledger_and_appends_nothing(clients, split, tmp_path):
    out = tmp_path / "run"
    _federation(clients, split).run(out)
    lines = (out / LEDGER_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    target = next(i for i, r in enumerate(records) if r["kind"] == "entry" and r["client"] == "site-1")
    records[target]["noise_multiplier"] *= 2  # a lower epsilon for site-1, were it believed
    edited = "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in records)
    (out / LEDGER_FILE).write_text(edited)
    with pytest.raises(LedgerError, match=f"line {target + 1} \\(entry of 'site-1', round 0\\)"):
        _federation(clients, split, rounds=3).run(out, resume=True)
    assert (out / LEDGER_FILE).read_text() == edited


def test_an_interrupted_round_stays_charged_and_the_run_audits_clean(clients, split, tmp_path, monkeypatch):
    from privfl.audit.report import audit_run

    out = tmp_path / "run"
    real = federation_module.train_dp_sgd
    calls = []

    def train_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # round 1, second client: one charge of round 1 is on disk
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(federation_module, "train_dp_sgd", train_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            _federation(clients, split, rounds=3).run(out)
    result = _federation(clients, split, rounds=3).run(out, resume=True)
    ledger = result.ledger
    assert len(ledger.superseded()) == 1  # site-0's charge in the interrupted attempt at round 1
    for name in clients:
        trained = sum(name in h["trained"] for h in result.history)
        charged = sum(1 for e in ledger.entries if e.client == name and e.status.value == "trained")
        assert charged == trained + (name == "site-0")  # never less than what took place
    report = audit_run(out)
    assert report.ledger.interrupted_entries == 1 and "PFA011" not in {f.code for f in report.findings}


def test_resume_needs_only_the_ledger_for_the_run_identity(clients, split, tmp_path):
    # Killed between creating the ledger and writing run.json: the ledger's header identifies the run.
    out = tmp_path / "run"
    _federation(clients, split, rounds=1).run(out)
    (out / RUN_FILE).unlink()
    assert _federation(clients, split, rounds=2).run(out, resume=True).summary["rounds"] == 2
    assert json.loads((out / RUN_FILE).read_text())["clients"].keys() == clients.keys()
    # and a different run is still refused on the header's identity alone
    (out / RUN_FILE).unlink()
    other = Federation(
        model_fn=lambda: LogisticRegression(30, 2),
        clients=clients,
        training=TrainingConfig(batch_size=32, learning_rate=0.5, dp=DPConfig(noise_multiplier=1.0)),
        federation=FederationConfig(rounds=3, protection=ProtectionKind.PLAINTEXT, device="cpu"),
        progress=False,
    )
    with pytest.raises(ConfigError, match="other settings or data"):
        other.run(out, resume=True)


def test_a_resume_killed_before_its_first_round_leaves_history_and_ledger_agreeing(clients, split, tmp_path, monkeypatch):
    """Killed between a round's history line and its checkpoint, then killed again right after resuming (the
    ledger's resume marker written, no round run yet): the history on disk no longer names the interrupted
    round, so an audit or a later resume finds the two files in agreement."""
    from privfl.accounting import LedgerKey, PrivacyLedger
    from privfl.rundir import LEDGER_KEY_FILE, check_ledger_against_history, load_history

    out = tmp_path / "run"
    _federation(clients, split, rounds=3).run(out)
    (out / CHECKPOINT_DIR / "round-0002.pt").unlink()  # the kill between round 2's history and its checkpoint
    with monkeypatch.context() as patch:
        def killed(self, *args, **kwargs):
            raise KeyboardInterrupt

        patch.setattr(Federation, "_run_rounds", killed)
        with pytest.raises(KeyboardInterrupt):
            _federation(clients, split, rounds=3).run(out, resume=True)
    history = load_history(out / HISTORY_FILE)
    assert len(history) == 2
    ledger = PrivacyLedger.load(out / LEDGER_FILE, key=LedgerKey.read(out / LEDGER_KEY_FILE))
    check_ledger_against_history(ledger, history, out / LEDGER_FILE)  # raised before: round 2 recorded, its entries superseded
    result = _federation(clients, split, rounds=3).run(out, resume=True)
    assert [h["round"] for h in result.history] == [0, 1, 2]
