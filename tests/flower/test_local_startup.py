"""The pieces `privfl deploy local` overlaps its start-up with: a ClientApp's request waits for a worker
that is still starting, node configs are set before the SuperNodes start, and the Control API client
falls back to the flwr commands on another Flower version."""

from __future__ import annotations

import socketserver
import threading
import time
from pathlib import Path

import pytest

from privfl.errors import ConfigError, DeploymentError
from privfl.flower.worker import _read_message, _send_message, call


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        _send_message(self.request, b"echo:" + _read_message(self.request))


def _serve_later(path: Path, delay: float) -> tuple[threading.Thread, list[socketserver.UnixStreamServer]]:
    servers: list[socketserver.UnixStreamServer] = []

    def run() -> None:
        time.sleep(delay)
        server = socketserver.UnixStreamServer(str(path), _Echo)
        servers.append(server)
        server.serve_forever(poll_interval=0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, servers


def test_a_request_waits_for_a_worker_that_is_still_starting(tmp_path: Path) -> None:
    path = tmp_path / "site.sock"
    thread, servers = _serve_later(path, 0.4)
    try:
        started = time.monotonic()
        assert call(path, b"hello", timeout=5, connect_wait=10) == b"echo:hello"
        assert time.monotonic() - started >= 0.35  # it really waited for the listener
    finally:
        while not servers:
            time.sleep(0.01)
        servers[0].shutdown()
        servers[0].server_close()
        thread.join(timeout=5)


def test_without_a_wait_a_missing_worker_fails_at_once_and_a_wait_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "nobody.sock"
    started = time.monotonic()
    with pytest.raises(FileNotFoundError):
        call(path, b"x", timeout=5)
    assert time.monotonic() - started < 0.2
    started = time.monotonic()
    with pytest.raises(FileNotFoundError):
        call(path, b"x", timeout=5, connect_wait=0.3)
    assert 0.25 <= time.monotonic() - started < 3


def test_a_dead_workers_socket_fails_within_a_second_however_long_the_wait(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()  # the file stays, nobody listens: a worker that died
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        call(path, b"x", timeout=5, connect_wait=60)
    assert time.monotonic() - started < 3
    with pytest.raises(ConnectionRefusedError):
        call(path, b"x", timeout=5)  # no wait: at once


def test_node_configs_can_be_set_until_the_supernodes_start(tmp_path: Path) -> None:
    pytest.importorskip("flwr")
    from privfl.flower.deploy import LocalDeployment

    dep = LocalDeployment(tmp_path / "dep", [{}, {}])
    dep.set_node_configs([{"site": "a"}, {"site": "b", "worker-wait": 60}])
    assert dep.node_configs[1] == {"site": "b", "worker-wait": 60}
    assert dep._node_config_args == ['site="a"', 'site="b" worker-wait=60']
    with pytest.raises(ConfigError, match="2 nodes"):
        dep.set_node_configs([{"site": "a"}])
    with pytest.raises(ConfigError):
        dep.set_node_configs([{"bad key": 1}, {"site": "b"}])
    with pytest.raises(DeploymentError, match="after start_superlink"):
        dep.start_nodes()


def test_the_control_client_is_used_only_with_the_supported_flower(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("flwr")
    import privfl.flower.control as control

    monkeypatch.setattr(control, "_supported", lambda: False)
    assert control.control_client("127.0.0.1:1", tmp_path / "ca.pem") is None
