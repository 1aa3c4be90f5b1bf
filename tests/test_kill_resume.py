"""Real processes: kill -9 at random points never loses spending; two runs on one directory are refused."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privfl.accounting import LedgerKey, LedgerStatus, PrivacyLedger, epsilon_of_events
from privfl.rundir import (
    CHECKPOINT_DIR,
    HISTORY_FILE,
    LEDGER_FILE,
    LEDGER_KEY_FILE,
    LOCK_FILE,
    check_ledger_against_history,
    load_history,
    run_traces,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and flock")

KILLS = 10
"""Kills in the CI run (each costs a process start, about 3 s on two cores)."""


def _config(tmp_path: Path, rounds: int) -> Path:
    # RDP: the accountant is not under test here, and it is the fast one.
    config = tmp_path / f"tiny-{rounds}.toml"
    config.write_text(
        '[data]\nnum_clients = 3\npartition = "iid"\n'
        '[training]\nbatch_size = 64\n[training.dp]\nnoise_multiplier = 1.0\naccountant = "rdp"\n'
        f'[federation]\nrounds = {rounds}\nprotection = "plaintext"\ndevice = "cpu"\n'
    )
    return config


def _start(config: Path, out: Path, *, resume: bool, stderr: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "privfl.cli", "run", str(config), "--out", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with stderr.open("ab") as err:
        return subprocess.Popen(
            [*command, "--resume"] if resume else command, stdout=subprocess.DEVNULL, stderr=err, env=env
        )


def _reap(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def _check_spending(out: Path, charged_before: dict[str, int]) -> dict[str, int]:
    """The ledger left by a killed run: loadable, consistent with history, and never less than what happened."""
    if not (out / LEDGER_FILE).exists():
        # Killed before the ledger existed: nothing else may mark the directory as a run.
        assert run_traces(out) == [], f"traces without a ledger: {run_traces(out)}"
        return charged_before
    ledger = PrivacyLedger.load(out / LEDGER_FILE, key=LedgerKey.read(out / LEDGER_KEY_FILE))
    history = load_history(out / HISTORY_FILE)
    check_ledger_against_history(ledger, history, out / LEDGER_FILE)
    charged = {}
    for client in ledger.clients:
        entries = [e for e in ledger.entries if e.client == client and e.status is LedgerStatus.TRAINED]
        charged[client] = len(entries)
        # every training the history records (its update left the client) is charged
        assert len(entries) >= sum(client in h["trained"] for h in history)
        # a charge once on disk is never lost by a later kill or resume
        assert len(entries) >= charged_before.get(client, 0)
        # the recorded epsilon is the accountant's over the recorded events
        expected = epsilon_of_events(ledger.events(client), delta=ledger.budget(client).delta, accountant=ledger.accountant)
        assert ledger.epsilon(client) == pytest.approx(expected, rel=1e-12)
        if entries:
            assert entries[-1].epsilon == pytest.approx(expected, rel=1e-9)
    return charged


_FORK_SERVER = r"""
import json, os, signal, sys, time
# Import everything a run needs once; each run is then a fork, a real process killed with SIGKILL.
# No torch op has run here, so forking is safe (no thread pools yet).
import privfl.cli, privfl.runner, privfl.audit.report, torch, opacus  # noqa: F401
children = set()
out = sys.stdout
def reply(message):
    out.write(json.dumps(message) + "\n")
    out.flush()
reply({"ready": True})
for line in sys.stdin:
    request = json.loads(line)
    if "argv" in request:
        pid = os.fork()
        if pid == 0:
            null = os.open(os.devnull, os.O_RDWR)
            err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(null, 0); os.dup2(null, 1); os.dup2(err, 2)
            try:
                code = privfl.cli.main(request["argv"])
            except BaseException:
                import traceback; traceback.print_exc()
                code = 1
            sys.stderr.flush()
            os._exit(code)
        children.add(pid)
        reply({"pid": pid})
    elif "wait" in request:
        pid, deadline = request["wait"], time.monotonic() + request["timeout"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                reply({"code": os.waitstatus_to_exitcode(status)})
                break
            if time.monotonic() > deadline:
                reply({"code": None})
                break
            time.sleep(0.02)
    elif "kill" in request:
        os.kill(request["kill"], signal.SIGKILL)
        os.waitpid(request["kill"], 0)
        children.discard(request["kill"])
        reply({"code": -9})
for pid in children:  # stdin closed: no child outlives the server
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
"""


class _ForkServer:
    """Starts ``privfl run`` processes by forking a pre-imported interpreter (3 s of imports saved per start)."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert self._read() == {"ready": True}

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def _ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def start(self, argv: list[str], stderr: Path) -> int:
        return self._ask({"argv": argv, "stderr": str(stderr)})["pid"]

    def wait(self, pid: int, timeout: float) -> int | None:
        return self._ask({"wait": pid, "timeout": timeout})["code"]

    def kill(self, pid: int) -> None:
        self._ask({"kill": pid})

    def close(self) -> None:
        # Closing stdin makes the server SIGKILL and reap any child still running, then exit.
        try:
            self.process.stdin.close()
            self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def server():
    server = _ForkServer()
    try:
        yield server
    finally:
        server.close()


def test_kill_9_at_random_points_never_loses_spending(tmp_path, server):
    rng = random.Random(int(os.environ.get("PRIVFL_KILL_SEED", "20261130")))
    rounds = 6
    config = _config(tmp_path, rounds=rounds)
    stderr = tmp_path / "stderr.txt"
    runs, kills, deadline = 0, 0, time.monotonic() + 240
    while kills < KILLS and time.monotonic() < deadline:
        out = tmp_path / f"run-{runs}"
        argv = ["run", str(config), "--out", str(out), "--quiet"]
        charged: dict[str, int] = {}
        while kills < KILLS:
            if (out / "summary.json").exists():
                break  # killed after it finished (its summary is written last): nothing left to resume
            pid = server.start([*argv, "--resume"] if (out / LEDGER_FILE).exists() else argv, stderr)
            # A run takes about 0.3 s to reach its first round and a fraction of a second per
            # round: kills land before the ledger exists, between charges, mid-write and
            # between the history and checkpoint writes.
            code = server.wait(pid, rng.uniform(0.05, 2.5))
            if code is None:
                server.kill(pid)  # SIGKILL, then reaped by the server
                kills += 1
                charged = _check_spending(out, charged)
                continue
            assert code == 0, stderr.read_text()[-2000:]
            break  # finished before the kill: check it, then start another directory
        # resume to the end (a finished run, its summary written last, refuses a resume) and check it
        if (out / "summary.json").exists():
            ledger = (out / LEDGER_FILE).read_bytes()
            pid = server.start([*argv, "--resume"], stderr)
            assert server.wait(pid, 120) == 2 and "has finished" in stderr.read_text()[-2000:]
            assert (out / LEDGER_FILE).read_bytes() == ledger
        else:
            pid = server.start([*argv, "--resume"] if (out / LEDGER_FILE).exists() else argv, stderr)
            assert server.wait(pid, 120) == 0, stderr.read_text()[-2000:]
        charged = _check_spending(out, charged)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"] == rounds and len(list((out / CHECKPOINT_DIR).glob("round-*.pt"))) == rounds
        runs += 1
    assert kills >= KILLS
    from privfl.audit.report import audit_run

    report = audit_run(out)  # chain, MACs, history cross-check and anchors all verify after the kills
    assert "PFA011" not in {f.code for f in report.findings}


def _wait_for_holder(out: Path, pid: int, poll, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert poll() is None, "the first run ended before the second started"
        try:
            holder = json.loads((out / LOCK_FILE).read_text())
            if holder["pid"] == pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError("the first run never took the lock")


def test_a_second_process_on_a_running_directory_is_refused(tmp_path):
    # Two `python -m privfl.cli run` processes, as a user would start them.
    config = _config(tmp_path, rounds=500)
    out = tmp_path / "run"
    processes: list[subprocess.Popen] = []
    try:
        holder = _start(config, out, resume=False, stderr=tmp_path / "first.txt")
        processes.append(holder)
        _wait_for_holder(out, holder.pid, holder.poll)
        second_err = tmp_path / "second.txt"
        second = _start(config, out, resume=False, stderr=second_err)
        processes.append(second)
        assert second.wait(timeout=120) == 2
        message = second_err.read_text()
        assert f"in use by pid {holder.pid}" in message and str(out) in message
        assert holder.poll() is None  # the holder is untouched and still running
    finally:
        _reap(processes)


def test_two_concurrent_resumes_are_refused(tmp_path, server):
    out = tmp_path / "run"
    stderr = tmp_path / "stderr.txt"
    holder = None
    try:
        first = server.start(["run", str(_config(tmp_path, rounds=2)), "--out", str(out), "--quiet"], stderr)
        assert server.wait(first, 120) == 0, stderr.read_text()[-2000:]
        resume = ["run", str(_config(tmp_path, rounds=500)), "--out", str(out), "--quiet", "--resume"]
        holder = server.start(resume, stderr)
        _wait_for_holder(out, holder, lambda: server.wait(holder, 0))
        second_err = tmp_path / "second.txt"
        second = server.start(resume, second_err)
        assert server.wait(second, 120) == 2
        assert f"in use by pid {holder}" in second_err.read_text()
        assert server.wait(holder, 0) is None  # still running
    finally:
        if holder is not None and server.wait(holder, 0) is None:
            server.kill(holder)
