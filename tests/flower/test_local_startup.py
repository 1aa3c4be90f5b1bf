"""The pieces `privfl deploy local` overlaps its start-up with: node configs set before the SuperNodes
start, the start-up steps in order, and the Control API client (its Flower internals pinned; the flwr
commands on another Flower version)."""

from __future__ import annotations

from pathlib import Path

import pytest

from privfl.errors import ConfigError, DeploymentError


def test_node_configs_can_be_set_until_the_supernodes_start(tmp_path: Path) -> None:
    pytest.importorskip("flwr")
    from privfl.flower.deploy import LocalDeployment

    dep = LocalDeployment(tmp_path / "dep", [{}, {}])
    dep.set_node_configs([{"site": "a"}, {"site": "b", "budget": 3}])
    assert dep.node_configs[1] == {"site": "b", "budget": 3}
    assert dep._node_config_args == ['site="a"', 'site="b" budget=3']
    with pytest.raises(ConfigError, match="2 nodes"):
        dep.set_node_configs([{"site": "a"}])
    with pytest.raises(ConfigError):
        dep.set_node_configs([{"bad key": 1}, {"site": "b"}])
    with pytest.raises(DeploymentError, match="after start_superlink"):
        dep.start_nodes()
    with pytest.raises(DeploymentError, match="after start_nodes"):
        dep.wait_nodes()


def test_a_simulation_refuses_the_split_start(tmp_path: Path) -> None:
    pytest.importorskip("flwr")
    from privfl.flower.deploy import LocalSimulation

    sim = LocalSimulation(tmp_path / "sim", 2)
    with pytest.raises(DeploymentError, match="start"):
        sim.start_superlink()
    with pytest.raises(DeploymentError):
        sim.start_nodes()
    assert sim.superlink is None  # nothing was started


def test_the_control_client_is_used_only_with_the_supported_flower(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("flwr")
    import privfl.flower.control as control

    monkeypatch.setattr(control, "_supported", lambda: False)
    assert control.control_client("127.0.0.1:1", tmp_path / "ca.pem") is None


def test_the_control_api_internals_it_uses_are_where_it_expects() -> None:
    pytest.importorskip("flwr")
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.proto.control_pb2 import ListRunsRequest, RegisterNodeRequest
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    assert RegisterNodeRequest(public_key=b"k").public_key == b"k"
    assert ListRunsRequest(run_id=7).run_id == 7
    assert callable(ControlHttpClient.RegisterNode) and callable(ControlHttpClient.ListRuns)
    assert callable(ControlHttpClient.from_server_address) and callable(ControlHttpClient.close)
    assert callable(CliClientHttpInterceptor().intercept)
    assert callable(RuntimeVersionHttpInterceptor(component_name="flwr CLI").intercept)


def test_following_a_run_logs_a_line_per_round_for_verbose(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json
    import logging

    from privfl.flower.local import _follow

    history = tmp_path / "history.json"
    records = [
        {"round": r, "sampled": ["a", "b"], "trained": ["a", "b"], "contributors": ["a", "b"], "skipped": {},
         "dropped": {}, "aborted": None, "test_accuracy": 0.5 + r / 10, "max_epsilon": 1.0 + r}
        for r in range(2)
    ]
    history.write_text(json.dumps(records))

    class Finished:
        log_file = tmp_path / "run.log"

        def running(self) -> bool:
            return False  # the run has ended: what is recorded is shown once

    with caplog.at_level(logging.INFO, logger="privfl"):
        _follow(Finished(), history, 2, progress=False, timeout=10)
    lines = [r.getMessage() for r in caplog.records if r.name == "privfl"]
    assert lines == [
        "round 0: 2 of 2 sampled sites trained, 2 aggregated, test accuracy 0.5000, max epsilon 1.000",
        "round 1: 2 of 2 sampled sites trained, 2 aggregated, test accuracy 0.6000, max epsilon 2.000",
    ]


def test_a_setting_that_fails_at_start_leaves_out_reusable_and_no_process(tmp_path: Path) -> None:
    pytest.importorskip("flwr")
    import time

    from privfl.config import default_config_text
    from privfl.flower.deploy import pid_alive
    from privfl.flower.local import LocalFederation

    out = tmp_path / "deploy"
    federation = LocalFederation(default_config_text(), sites=500, out=out)  # more sites than the data splits into
    with pytest.raises(ConfigError, match=r"data\.min_client_size"), federation:
        pass
    # nothing ran and nothing was spent: what the start wrote is gone, so the same --out works next time
    assert not out.exists()
    deadline = time.monotonic() + 10
    while any(pid_alive(pid) for pid in federation.started_pids()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in federation.started_pids() if pid_alive(pid)]
    out.mkdir()
    (out / "kept.txt").write_text("not ours")
    with pytest.raises(ConfigError, match="new or empty directory"):
        LocalFederation(default_config_text(), sites=500, out=out)
    assert (out / "kept.txt").read_text() == "not ours"


@pytest.mark.parametrize("protection", ["secagg", "shared_key"])
def test_a_protection_without_its_weight_bound_is_refused_before_anything_starts(tmp_path: Path, run_toml, protection) -> None:
    # The Aggregator refuses it too; here nothing is written and no process starts (it used to fail only
    # once the SuperLink and every site were up, leaving a directory that could not be reused).
    pytest.importorskip("flwr")
    from privfl.flower.local import LocalFederation

    text = run_toml(protection, rounds=1).replace(f"[federation.{protection}]\nweight_bound = 1000", "")
    assert f"[federation.{protection}]" not in text
    out = tmp_path / "deploy"
    with pytest.raises(ConfigError, match=rf"federation\.{protection}\.weight_bound=None: deployments need a public upper bound"):
        LocalFederation(text, sites=3, out=out)
    assert not out.exists()


def test_a_resume_with_another_config_names_the_settings_that_differ() -> None:
    from privfl.flower.local import _changed_settings

    before = "[training]\nlearning_rate = 0.1\n[federation]\nrounds = 4\n"
    assert _changed_settings(before, "[training]\nlearning_rate = 0.2\n[federation]\nrounds = 4\nseed = 3\n") == [
        "federation.seed", "training.learning_rate",
    ]
    assert _changed_settings(before, "# a comment\n" + before) == []  # the same settings, written differently
