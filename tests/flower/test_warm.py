"""privfl.flower.warm: processes forked from one launcher behave as separately started ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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
