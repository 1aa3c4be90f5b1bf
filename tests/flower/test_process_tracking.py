"""A stopped deployment leaves nothing behind: helpers die with the process that forked them, and a
process left in a tracked process group after its leader ended is still found and stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from privfl.flower.deploy import _Tracked, pid_alive
from privfl.flower.warm import die_with_parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc: Linux")

_SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def _kill(pids: list[int]) -> None:
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.timeout(60)
@pytest.mark.parametrize("parent_first", [False, True], ids=["parent-killed-later", "parent-gone-before-the-call"])
def test_a_forked_helper_dies_with_its_parent(parent_first):
    code = (
        "import os, sys, time\n"
        "from privfl.flower.warm import die_with_parent\n"
        "parent = os.getpid()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        f"    if {parent_first}:\n"
        "        while os.getppid() == parent:\n"
        "            time.sleep(0.01)\n"
        "    die_with_parent(parent)\n"
        "    time.sleep(120)\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        f"time.sleep(0 if {parent_first} else 120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        if not parent_first:
            time.sleep(0.5)  # the child has made its call
            assert pid_alive(child)
            parent.kill()
        parent.wait(timeout=30)
        assert _gone(child), "the helper outlived the process that forked it"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        _kill([child] if child else [])


def test_die_with_parent_is_a_no_op_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert die_with_parent(os.getppid()) is False


@pytest.mark.timeout(60)
def test_a_process_left_in_a_tracked_group_after_its_leader_ended_is_found_and_stopped():
    # The leader starts a helper in its own process group and exits: the helper is orphaned (it no
    # longer descends from anything tracked) but is still in the group the leader started.
    code = f"import subprocess; p = subprocess.Popen({_SLEEPER!r}); print(p.pid, flush=True)"
    leader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    tracked = _Tracked()
    tracked.add(leader.pid)
    orphan = None
    try:
        assert leader.pid in tracked.leaders
        assert leader.stdout is not None
        orphan = int(leader.stdout.readline())
        leader.wait(timeout=30)
        assert pid_alive(orphan) and not tracked.same_process(leader.pid)
        assert tracked.orphans() == [orphan]


        tracked.signal(leader.pid, signal.SIGKILL)
        assert _gone(orphan), "the orphan in the stopped leader's group is still running"
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait()
        _kill([orphan] if orphan else [])


@pytest.mark.timeout(60)
def test_a_group_whose_number_was_reused_by_another_process_is_not_signalled():
    # A live process that is not the one first seen under that pid (its start time differs).
    other = subprocess.Popen(_SLEEPER, start_new_session=True)
    try:
        tracked = _Tracked()
        tracked.add(other.pid)
        tracked.procs[other.pid] += 1  # as if the tracked process had ended and the pid been reused
        tracked.leaders[other.pid] += 1
        assert tracked.orphans() == []
        tracked.signal(other.pid, signal.SIGKILL)
        time.sleep(0.3)
        assert other.poll() is None, "a process that only reused a tracked pid was signalled"
    finally:
        other.kill()
        other.wait()
