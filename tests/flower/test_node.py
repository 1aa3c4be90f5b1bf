"""privfl.flower.node: the SuperNode launcher's pieces, without starting any process.

The launcher itself runs in every deployment test (LocalDeployment starts it by default); these
tests pin what it changes in Flower, so a Flower upgrade that moves those internals fails here by
name rather than as a slow deployment.
"""

from __future__ import annotations

import functools
import itertools
import types

import pytest

pytest.importorskip("flwr")

from privfl.flower import node


def test_idle_waits_grow_from_the_poll_to_the_idle_poll_and_reset_on_a_message(monkeypatch):
    waits = []
    monkeypatch.setattr(node.time, "sleep", waits.append)
    clock = node._PollClock(0.05, 0.25)
    for _ in range(10):
        clock.sleep(3)  # Flower's idle wait: the SuperLink had nothing
    assert waits[0] == 0.05
    assert all(b == pytest.approx(min(0.25, a * 1.25)) for a, b in itertools.pairwise(waits))
    assert waits[-1] == 0.25
    assert sum(waits[:6]) < 0.65  # about six asks in the first 0.6 s after a message
    clock.activity()
    waits.clear()
    clock.sleep(3)
    clock.sleep(0.5)  # waiting for the ClientApp's reply (in the node's memory): 10 ms
    clock.sleep(0.005)
    assert waits == [0.05, 0.01, 0.005]
    assert clock.monotonic is node.time.monotonic  # everything else is the real module


def test_a_stored_message_resets_the_idle_wait_and_wakes_the_executor(monkeypatch):
    import os

    monkeypatch.setattr(node.time, "sleep", lambda s: None)
    answers = iter([None, None, 7, None])
    module = types.SimpleNamespace(_pull_and_store_message=lambda **kw: next(answers))
    clock = node._PollClock(0.05, 0.25)
    read, write = os.pipe()
    try:
        os.set_blocking(read, False)
        assert node._announce_messages(module, clock, write)
        assert not node._announce_messages(module, clock, write)  # once only
        for _ in range(2):
            assert module._pull_and_store_message(state=None) is None
            clock.sleep(3)
        assert clock._idle > 0.05
        with pytest.raises(BlockingIOError):
            os.read(read, 10)  # no message yet: no wake-up
        assert module._pull_and_store_message(state=None) == 7
        assert clock._idle == 0.05
        assert os.read(read, 10) == b"\0"
    finally:
        os.close(read)
        os.close(write)


def test_object_pull_backoff_is_shortened_once():
    calls = []

    def pull(object_ids, pull_object_fn, initial_backoff=1.0, backoff_cap=10.0):
        calls.append((initial_backoff, backoff_cap))

    module = types.SimpleNamespace(pull=pull, other=lambda ids: None)
    assert node.shorten_object_pulls(module, "pull", 0.05)
    module.pull([], None)
    assert calls == [(0.05, 1.0)]
    assert not node.shorten_object_pulls(module, "pull", 0.02)  # already wrapped: left as is
    assert not node.shorten_object_pulls(module, "other", 0.05)  # no backoff arguments
    assert not node.shorten_object_pulls(module, "missing", 0.05)


@pytest.mark.parametrize(
    ("module_name", "name"),
    [
        ("flwr.supernode.start_client_internal", "pull_objects"),
        ("flwr.supernode.runtime.run_clientapp", "pull_and_inflate_object_from_tree"),
        ("flwr.superlink.grid.http_grid", "pull_objects"),
    ],
)
def test_the_flower_internals_it_changes_are_where_it_expects(monkeypatch, module_name, name):
    import importlib

    module = importlib.import_module(module_name)
    monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    assert node.shorten_object_pulls(module, name, 0.05)
    assert isinstance(getattr(module, name), functools.partial)


def test_the_supernode_loop_sleeps_through_the_module_it_replaces():
    import inspect

    import flwr.supernode.start_client_internal as internal

    source = inspect.getsource(internal)
    assert "time.sleep(3)" in source  # the idle poll the launcher shortens
    assert "run_id = _pull_and_store_message(" in source  # what it wraps to see a message arrive
    assert internal.time.__name__ == "time"


def test_runtime_address_follows_the_supernode_arguments():
    assert node._runtime_address(["--superlink", "x:1", "--host", "127.0.0.1", "--port", "5555"]) == "127.0.0.1:5555"
    assert node._runtime_address([]) == "127.0.0.1:9094"
    assert node._runtime_address(["--host", "::1", "--port", "7"]) == "[::1]:7"
    with pytest.raises(SystemExit, match="ssl-certfile"):
        node._runtime_address(["--ssl-certfile", "c.pem"])
    with pytest.raises(SystemExit, match="isolation"):
        node._runtime_address(["--isolation", "subprocess"])


def test_refuses_a_flower_it_was_not_written_for(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.43.0")
    with pytest.raises(SystemExit, match="plain flower-supernode"):
        node._check_flower_version()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.42.3")
    node._check_flower_version()


def test_poll_argument_is_bounded():
    with pytest.raises(SystemExit):
        node.main(["--poll", "0"])
    with pytest.raises(SystemExit):
        node.main(["--poll", "nan"])


def test_the_serverapp_end_of_run_log_flush_is_shortened_where_it_expects(monkeypatch):
    import importlib
    import inspect
    import queue
    import sys
    import time

    from privfl.flower import apps

    importlib.import_module("flwr.superlink.runtime.run_serverapp")
    run_serverapp = sys.modules["flwr.superlink.runtime.run_serverapp"]  # the package's attribute is a function

    assert "flush_logs(log_queue)" in inspect.getsource(run_serverapp)  # called by name when the app returns
    monkeypatch.setattr(run_serverapp, "flush_logs", run_serverapp.flush_logs)  # restored after the test
    assert apps._shorten_final_log_flush()
    assert not apps._shorten_final_log_flush()  # once
    started = time.monotonic()
    assert run_serverapp.flush_logs(queue.Queue())
    assert time.monotonic() - started < 0.9  # Flower's own waits 1 s after the queue is empty
    waiting: queue.Queue[str | None] = queue.Queue()
    waiting.put("a log line nobody uploads")
    assert not run_serverapp.flush_logs(waiting, timeout=0.1)  # still bounded by its timeout
    monkeypatch.setattr(node, "flower_version_supported", lambda: False)
    monkeypatch.setattr(run_serverapp, "flush_logs", lambda log_queue, timeout=3.0: True)
    assert not apps._shorten_final_log_flush()  # another Flower: left as it is


@pytest.mark.timeout(60)
def test_an_executor_whose_supernode_is_gone_stops_on_sigterm():
    """Its ask for a task fails fast when nothing answers (Flower's own invoker retries that forever), so
    the stop flag and the parent check are read: a stopped deployment leaves no orphaned executor."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = (
        "import os\n"
        "from privfl.flower.node import run_executor\n"
        f"run_executor('127.0.0.1:{port}', poll=0.05, parent_pid=os.getppid(), idle_poll=0.1)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(4.0)  # imports, then several failed asks
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        assert proc.returncode == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert err.count("Runtime API not answering") == 1  # once per streak of failed asks, not once per ask
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
