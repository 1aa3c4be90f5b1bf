"""privfl.flower.warm: processes forked from one launcher behave as separately started ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privfl.errors import DeploymentError
from privfl.flower.deploy import pid_alive
from privfl.flower.warm import WarmLauncher

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and /proc: Linux")

HERE = Path(__file__).resolve().parent


@pytest.fixture
def launcher(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    started = WarmLauncher(["json", "_warm_target"], log_file=tmp_path / "warm.log", env=env, start_timeout=60)
    children: list[int] = []
    started.children = children  # type: ignore[attr-defined]
    try:
        yield started
    finally:  # every process the test started is stopped by its pid, also when it fails
        for pid in children:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        started.close(grace=5)
        if started.process.poll() is None:
            started.process.kill()
            started.process.wait(timeout=10)


def _spawn(launcher, target, argv, tmp_path, **kwargs):
    process = launcher.spawn(target, argv, log_file=tmp_path / "child.log", env=kwargs.pop("env", {"WARM_TEST": "yes"}), **kwargs)
    launcher.children.append(process.pid)
    return process


def test_a_child_gets_its_own_session_log_environment_and_exit_status(launcher, tmp_path):
    out = tmp_path / "seen.json"
    process = _spawn(launcher, "_warm_target:report", [str(out), "3"], tmp_path, cwd=tmp_path, name="privfl-test")
    assert process.wait(timeout=30) == 3
    assert process.returncode == 3 and process.poll() == 3
    seen = json.loads(out.read_text())
    assert seen["pid"] == process.pid
    assert seen["sid"] == process.pid and seen["pgid"] == process.pid  # its own session and group
    assert seen["pid"] != launcher.process.pid
    assert seen["cwd"] == str(tmp_path)
    assert seen["env"] == "yes"
    assert seen["argv"] == ["_warm_target", str(out), "3"]
    assert seen["stdin"] == ""  # /dev/null, not the launcher's request pipe
    assert seen["comm"] == "privfl-test"
    assert "hello from the child" in (tmp_path / "child.log").read_text()
    assert not pid_alive(process.pid)  # reaped by the launcher: no zombie left


def test_only_the_given_environment_reaches_the_child(launcher, tmp_path):
    out = tmp_path / "seen.json"
    process = _spawn(launcher, "_warm_target:report", [str(out), "0"], tmp_path, env={})
    assert process.wait(timeout=30) == 0
    assert json.loads(out.read_text())["env"] is None


def test_signals_wait_timeouts_and_failures_read_as_with_popen(launcher, tmp_path):
    sleeper = _spawn(launcher, "_warm_target:sleep", ["60"], tmp_path)
    with pytest.raises(subprocess.TimeoutExpired):
        sleeper.wait(timeout=0.2)
    assert sleeper.poll() is None and pid_alive(sleeper.pid)
    sleeper.terminate()
    assert sleeper.wait(timeout=30) == -signal.SIGTERM
    sleeper.kill()  # an ended process is not signalled again

    failing = _spawn(launcher, "_warm_target:fail", ["on", "purpose"], tmp_path)
    assert failing.wait(timeout=30) == 1
    assert "RuntimeError: the target failed: on purpose" in (tmp_path / "child.log").read_text()

    missing = _spawn(launcher, "no_such_module_here:main", [], tmp_path)
    assert missing.wait(timeout=30) == 1
    assert "ModuleNotFoundError" in (tmp_path / "child.log").read_text()


def test_a_malformed_request_is_refused_and_the_launcher_goes_on(launcher, tmp_path):
    with pytest.raises(DeploymentError, match="module:function"):
        launcher.spawn("not-a-target", [], log_file=tmp_path / "x.log", env={})
    out = tmp_path / "seen.json"
    assert _spawn(launcher, "_warm_target:report", [str(out), "0"], tmp_path).wait(timeout=30) == 0


def test_the_launcher_exits_when_closed_and_its_children_run_on(launcher, tmp_path):
    sleeper = _spawn(launcher, "_warm_target:sleep", ["60"], tmp_path)
    launcher.close(grace=10)
    assert launcher.process.returncode == 0
    assert sleeper.poll() is None and pid_alive(sleeper.pid)  # as a separately started process would
    os.kill(sleeper.pid, signal.SIGKILL)
    sleeper.wait(timeout=30)
    with pytest.raises(DeploymentError, match="exited"):
        launcher.spawn("_warm_target:sleep", ["1"], log_file=tmp_path / "x.log", env={})


def test_bad_module_names_are_refused_before_anything_starts(tmp_path):
    with pytest.raises(DeploymentError, match="module name"):
        WarmLauncher(["json; rm -rf /"], log_file=tmp_path / "w.log")


@pytest.fixture
def listening(tmp_path: Path):
    import tempfile

    socket_dir = Path(tempfile.mkdtemp(prefix="privfl-test-"))  # AF_UNIX paths are short
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    started = WarmLauncher(["_warm_target"], log_file=tmp_path / "warm.log", env=env, start_timeout=60,
                           listen=socket_dir / "s", allow=["_warm_target:report", "_warm_target:sleep"])  # fmt: skip
    try:
        yield started, socket_dir / "s", env
    finally:
        started.close(grace=5)
        if started.process.poll() is None:
            started.process.kill()
            started.process.wait(timeout=10)
        import shutil

        shutil.rmtree(socket_dir, ignore_errors=True)


def _shim(tmp_path: Path, socket_path: Path, target: str) -> Path:
    fallback = tmp_path / "fallback"
    fallback.write_text("#!/bin/sh\necho fallback ran \"$@\"\nexit 5\n")
    fallback.chmod(0o755)
    shim = tmp_path / f"shim-{target.replace(':', '-')}"
    shim.write_text(
        f"#!{sys.executable}\nfrom privfl.flower.warm import forward_to_launcher\n"
        f"forward_to_launcher({str(socket_path)!r}, {target!r}, {str(fallback)!r})\n"
    )
    shim.chmod(0o755)
    return shim


def test_a_command_forwarded_over_the_socket_runs_forked_with_this_process_streams(listening, tmp_path):
    _, socket_path, env = listening
    out = tmp_path / "seen.json"
    shim = _shim(tmp_path, socket_path, "_warm_target:report")
    result = subprocess.run([str(shim), str(out), "7"], input="from stdin", capture_output=True, text=True,
                            env={**env, "WARM_TEST": "shim"}, cwd=tmp_path, timeout=60)  # fmt: skip
    assert result.returncode == 7, result.stderr
    assert "hello from the child" in result.stdout  # the shim's own stdout
    seen = json.loads(out.read_text())
    assert seen["stdin"] == "from stdin" and seen["env"] == "shim" and seen["cwd"] == str(tmp_path)
    assert seen["argv"] == ["_warm_target", str(out), "7"]
    assert seen["sid"] == seen["pid"]  # forked by the launcher into its own session
    assert seen["comm"] == "privfl-server"
    assert oct(socket_path.stat().st_mode & 0o777) == "0o600"


def test_a_forwarded_command_ends_with_the_signal_its_shim_gets(listening, tmp_path):
    launcher, socket_path, env = listening
    shim = _shim(tmp_path, socket_path, "_warm_target:sleep")
    process = subprocess.Popen([str(shim), "60"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not [p for p in _children_of(launcher.process.pid)] and time.monotonic() < deadline:
            time.sleep(0.05)
        forked = _children_of(launcher.process.pid)
        assert forked, "nothing was forked"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == -signal.SIGTERM
        deadline = time.monotonic() + 10
        while any(pid_alive(pid) for pid in forked) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(pid_alive(pid) for pid in forked)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        for pid in _children_of(launcher.process.pid):
            os.kill(pid, signal.SIGKILL)


def test_a_target_not_allowed_on_the_socket_or_no_launcher_runs_the_real_command(listening, tmp_path):
    launcher, socket_path, env = listening
    refused = subprocess.run([str(_shim(tmp_path, socket_path, "_warm_target:fail")), "a"], capture_output=True,
                             text=True, env=env, timeout=60)  # fmt: skip
    assert refused.returncode == 5 and "fallback ran a" in refused.stdout
    assert "not allowed" in refused.stderr
    launcher.close(grace=10)
    gone = subprocess.run([str(_shim(tmp_path, socket_path, "_warm_target:report")), "b"], capture_output=True,
                          text=True, env=env, timeout=60)  # fmt: skip
    assert gone.returncode == 5 and "fallback ran b" in gone.stdout


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid and pid_alive(int(entry.name)):
                found.append(int(entry.name))
    return found
