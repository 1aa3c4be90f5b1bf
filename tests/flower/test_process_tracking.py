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


def _group_with_two_helpers():
    """A session leader that starts two helpers in its group, prints their pids and exits."""
    code = (
        "import subprocess\n"
        f"a = subprocess.Popen({_SLEEPER!r}); b = subprocess.Popen({_SLEEPER!r})\n"
        "print(a.pid, b.pid, flush=True)\n"
    )
    leader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    return leader


def _stop_group(leader: subprocess.Popen, helpers: list[int]) -> None:
    try:
        os.killpg(leader.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if leader.poll() is None:
        leader.kill()
    leader.wait()
    if leader.stdout is not None:
        leader.stdout.close()
    _kill(helpers)


@pytest.mark.timeout(60)
def test_a_process_left_in_a_tracked_group_after_its_leader_ended_is_found_and_stopped():
    # Helper a was seen in the group (tracked); helper b never was (forked after the deployment last
    # looked). The leader exits: both are orphaned and descend from nothing tracked, but the group
    # has not been empty since a was seen in it, so it is still the leader's group.
    leader = _group_with_two_helpers()
    helpers: list[int] = []
    try:
        tracked = _Tracked()
        tracked.add(leader.pid)
        assert leader.pid in tracked.leaders
        assert leader.stdout is not None
        helpers = [int(pid) for pid in leader.stdout.readline().split()]
        a, b = helpers
        tracked.add(a)
        leader.wait(timeout=30)
        assert pid_alive(a) and pid_alive(b) and not tracked.same_process(leader.pid)
        assert sorted(tracked.orphans()) == sorted([a, b])
        tracked.signal(leader.pid, signal.SIGKILL)
        assert _gone(a) and _gone(b), "a process left in the stopped leader's group is still running"
    finally:
        _stop_group(leader, helpers)


@pytest.mark.timeout(60)
def test_a_group_left_without_a_tracked_process_is_not_signalled():
    # Nothing tracked is left in the group once its leader has ended: that the group is still the
    # leader's cannot be proved (had it emptied, its number could name a stranger's group now), so
    # it is left alone and forgotten.
    leader = _group_with_two_helpers()
    helpers: list[int] = []
    try:
        tracked = _Tracked()
        tracked.add(leader.pid)
        assert leader.stdout is not None
        helpers = [int(pid) for pid in leader.stdout.readline().split()]
        leader.wait(timeout=30)
        assert tracked.orphans() == [] and leader.pid not in tracked.leaders
        tracked.signal(leader.pid, signal.SIGKILL)
        time.sleep(0.3)
        assert all(pid_alive(pid) for pid in helpers)
    finally:
        _stop_group(leader, helpers)


@pytest.mark.timeout(60)
def test_a_process_that_starts_its_own_group_after_it_was_first_seen_is_signalled_as_a_group():
    # A warm child is forked first and calls setsid just after: seen in between, it did not lead a group yet.
    code = f"import os, subprocess, sys, time\ntime.sleep(1.0)\nos.setsid()\np = subprocess.Popen({_SLEEPER!r})\nprint(p.pid, flush=True)\ntime.sleep(120)\n"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    helpers: list[int] = []
    try:
        tracked = _Tracked()
        tracked.add(process.pid)
        assert process.pid not in tracked.leaders
        assert process.stdout is not None
        helpers = [int(process.stdout.readline())]
        tracked.signal(process.pid, signal.SIGKILL)
        assert _gone(helpers[0]), "the group the process started after it was first seen was not signalled"
    finally:
        _stop_group(process, helpers)


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
