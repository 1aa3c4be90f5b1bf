"""LocalDeployment on loopback with TLS: a stand-in echo app reaches every SuperNode, survives a killed node, leaks no process."""

from __future__ import annotations

import hashlib
import json
import signal
import stat
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from privfl.errors import ConfigError
from privfl.flower.deploy import LocalDeployment, LocalSimulation, pid_alive, write_app_dir
from privfl.flower.tls import generate_node_auth_keys, generate_tls_material

ECHO_MODULE = Path(__file__).with_name("_echo_app.py")
PAYLOAD = bytes(range(256)) * 4  # 1 KiB, every byte value
SITES = ["site-0", "site-1", "site-2"]


def _echo_app(directory: Path, out_file: Path, *, in_fab: bool = True) -> Path:
    """The echo app directory.

    With ``in_fab`` the module travels in the FAB as ``privfl_echo_app``; without it the directory
    holds only pyproject.toml and every Flower process imports ``_echo_app`` from its environment
    (``PYTHONPATH``), as the real app imports ``privfl.flower.apps`` from the installed package.
    """
    app = directory / "app"
    app.mkdir(parents=True, exist_ok=True)
    module = "privfl_echo_app" if in_fab else ECHO_MODULE.stem
    if in_fab:
        (app / "privfl_echo_app.py").write_text(ECHO_MODULE.read_text())
    return write_app_dir(
        app,
        serverapp=f"{module}:server_app",
        clientapp=f"{module}:client_app",
        name="privfl-echo",
        run_config={
            "out-file": str(out_file),
            "payload-hex": PAYLOAD.hex(),
            "expected-nodes": len(SITES),
            "wait-nodes-s": 60.0,
            "rounds": 1,
            "timeout-s": 60.0,
            "fail-node-site": "",
            "pause-file": "",
            "poll-s": 0.0,
            "payload-repeat": 1,
            "server-fail": False,
        },
    )


def _digest(site: str) -> str:
    return hashlib.sha256(PAYLOAD + site.encode()).hexdigest()


def _assert_all_dead(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    alive = [pid for pid in pids if pid_alive(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if pid_alive(pid)]
    assert not alive, f"processes still alive after the deployment closed: {alive}"


def test_tls_material_files_and_modes(tmp_path: Path) -> None:
    from cryptography import x509

    tls = generate_tls_material(tmp_path / "tls", extra_hosts=["superlink.example"])
    for key in (tls.ca_key, tls.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert "superlink.example" in san.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "::1"}
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    keys = generate_node_auth_keys(tmp_path / "keys", "node-0")
    assert keys.public_key.read_text().startswith("ecdsa-sha2-nistp256 ")
    assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600
    with pytest.raises(ConfigError):
        generate_node_auth_keys(tmp_path / "keys", "../evil")


def test_write_app_dir_rejects_bad_references(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        write_app_dir(tmp_path, serverapp="privfl.flower.apps", clientapp="m:client_app")
    with pytest.raises(ConfigError):
        write_app_dir(tmp_path, serverapp="m:a", clientapp="m:b", run_config={"bad key": 1})
    app = write_app_dir(
        tmp_path, serverapp="privfl.flower.apps:server_app", clientapp="privfl.flower.apps:client_app"
    )
    text = (app / "pyproject.toml").read_text()
    assert 'serverapp = "privfl.flower.apps:server_app"' in text


@pytest.mark.timeout(240)
def test_echo_over_tls_reaches_every_node_and_leaves_no_process(tmp_path: Path) -> None:
    out_file = tmp_path / "echo.json"
    app = _echo_app(tmp_path, out_file)
    with LocalDeployment(tmp_path / "dep", [{"site": s, "idx": i} for i, s in enumerate(SITES)]) as dep:
        assert all(node.node_id is not None for node in dep.supernodes)
        result = dep.run_app(app, run_config={"rounds": 2}, timeout=150)
        assert result.ok, result.output
        pids = dep.started_pids()
        assert len(pids) >= 1 + len(SITES)
        node_ids = {node.node_id: node.node_config["site"] for node in dep.supernodes}
    _assert_all_dead(pids)

    echo = json.loads(out_file.read_text())
    assert sorted(echo["node_ids"]) == sorted(node_ids)
    for rnd, round_ in enumerate(echo["rounds"]):
        replies = {r["src_node_id"]: r for r in round_["replies"]}
        assert set(replies) == set(node_ids)
        for node_id, site in node_ids.items():
            assert replies[node_id]["site"] == site
            assert replies[node_id]["digest"] == _digest(site)
            assert replies[node_id]["calls"] == rnd + 1  # context.state survives between messages


@pytest.mark.timeout(240)
def test_killed_supernode_mid_run_leaves_the_others_working(tmp_path: Path) -> None:
    out_file = tmp_path / "echo.json"
    pause = tmp_path / "paused"
    app = _echo_app(tmp_path, out_file, in_fab=False)
    assert sorted(p.name for p in app.iterdir()) == ["pyproject.toml"]
    env = {"PYTHONPATH": str(ECHO_MODULE.parent)}
    with LocalDeployment(tmp_path / "dep", [{"site": s} for s in SITES], extra_env=env) as dep:
        handle = dep.start_run(
            app,
            run_config={
                "rounds": 2,
                "timeout-s": 15.0,
                "poll-s": 0.2,
                "pause-file": str(pause),
                "fail-node-site": "site-2",
            },
        )
        deadline = time.monotonic() + 120
        while not pause.exists():
            assert handle.running(), handle.log_file.read_text()
            assert time.monotonic() < deadline, "round 0 did not finish"
            time.sleep(0.2)
        victim = dep.supernodes[1]
        dep.kill_supernode(1, signal.SIGKILL)
        assert not pid_alive(victim.pid)
        Path(str(pause) + ".resume").write_text("go")
        result = handle.wait(timeout=120)
        assert result.ok, result.output
        pids = dep.started_pids()
    _assert_all_dead(pids)

    echo = json.loads(out_file.read_text())
    by_site = {n.node_id: n.node_config["site"] for n in dep.supernodes}
    first, second = echo["rounds"]
    ok_first = {by_site[r["src_node_id"]] for r in first["replies"] if "digest" in r}
    err_first = {by_site[r["src_node_id"]]: r for r in first["replies"] if "error_code" in r}
    assert ok_first == {"site-0", "site-1"}
    # A ClientApp exception comes back as an error reply naming the exception.
    assert "site-2 was told to fail" in err_first["site-2"]["error_reason"]
    ok_second = {by_site[r["src_node_id"]]: r for r in second["replies"] if "digest" in r}
    assert set(ok_second) == {"site-0"}
    assert ok_second["site-0"]["digest"] == _digest("site-0")
    assert all(by_site.get(r["src_node_id"]) != "site-1" or "error_code" in r for r in second["replies"])


@pytest.mark.timeout(200)
@pytest.mark.parametrize("control_api", [True, False], ids=["control-api", "flwr-commands"])
def test_node_auth_refuses_unregistered_node_and_failing_serverapp_is_not_ok(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, control_api: bool
) -> None:
    if not control_api:  # as with another Flower version: `flwr supernode register` and `flwr ls`
        import privfl.flower.control

        monkeypatch.setattr(privfl.flower.control, "_supported", lambda: False)
    app = _echo_app(tmp_path, tmp_path / "echo.json")
    with LocalDeployment(tmp_path / "dep", [{"site": "site-0"}], node_auth=True) as dep:
        assert dep.supernodes[0].node_id is not None  # registered key: admitted
        rogue = dep.add_supernode({"site": "rogue"}, register_key=False, wait=False)
        result = dep.run_app(app, run_config={"server-fail": True, "expected-nodes": 1}, timeout=120)
        deadline = time.monotonic() + 90
        while rogue.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert rogue.process.poll() not in (None, 0), "an unregistered SuperNode was not refused"
        assert "Failed to activate SuperNode" in rogue.log_file.read_text()
        pids = dep.started_pids()
    _assert_all_dead(pids)
    # `flwr run --stream` itself exits 0; the failure shows in the run's status and its log.
    assert result.status == "finished:failed"
    assert not result.ok
    assert "the ServerApp was told to fail" in result.output


@pytest.mark.timeout(120)
def test_dead_supernode_at_startup_names_its_log(tmp_path: Path) -> None:
    from privfl.errors import DeploymentError

    # A node config value Flower cannot parse makes flower-supernode exit at once.
    dep = LocalDeployment(tmp_path / "dep", [{"site": "site-0"}], startup_timeout=60)
    dep._node_config_args = ["this is not key=value"]
    with pytest.raises(DeploymentError, match=r"supernode-0\.log"):
        dep.start()
    _assert_all_dead(dep.started_pids())


@pytest.mark.timeout(240)
def test_simulation_engine_runs_the_same_app_on_virtual_nodes(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason='the Simulation Engine needs: pip install "flwr[simulation]==1.42.0"')
    out_file = tmp_path / "echo.json"
    app = _echo_app(tmp_path, out_file)
    num_nodes = 20
    with LocalSimulation(
        tmp_path / "sim", num_nodes, federation_config={"init-args-num-cpus": 2, "client-resources-num-cpus": 1}
    ) as sim:
        result = sim.run_app(app, run_config={"rounds": 2, "expected-nodes": num_nodes}, timeout=200)
        assert result.ok, result.output
        pids = sim.started_pids()
    _assert_all_dead(pids)
    echo = json.loads(out_file.read_text())
    assert len(echo["node_ids"]) == num_nodes
    for round_ in echo["rounds"]:
        sites = sorted(r["site"] for r in round_["replies"])
        assert sites == sorted(f"partition-{i}" for i in range(num_nodes))
        assert all(r["digest"] == _digest(r["site"]) for r in round_["replies"])


def test_the_serverapps_resume_flag_takes_flowers_values_and_refuses_others() -> None:
    from privfl.flower.apps import _flag

    assert _flag(True, "resume") is True and _flag(False, "resume") is False
    assert _flag("true", "record") is True and _flag("False", "record") is False and _flag("1", "resume") is True
    for bad in ("yes", 2, None):
        with pytest.raises(ConfigError, match="resume"):
            _flag(bad, "resume")
