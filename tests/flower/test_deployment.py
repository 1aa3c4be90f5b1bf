"""privfl over Flower as real processes: a TLS SuperLink, one SuperNode and one worker per site, all on
127.0.0.1. The averaged model equals the in-process run; ledgers stay at the sites; the server side
never holds a site's update; dropouts and faults end as the protocols promise; every process stops."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from privfl.errors import ConfigError
from privfl.flower.deploy import pid_alive
from privfl.flower.local import LocalFederation

_CLIENT_DP = """
[federation.client_dp]
noise_multiplier = 0.6
clip_norm = 0.4
delta = 1e-3
adaptive = true
"""


def _in_process(text: str, out: Path | None = None, round_index: int | None = None):
    """The same federation in one process (the same partitions, names and seeds); the final model, or
    the model after ``round_index`` (read from the checkpoint in ``out``)."""
    from privfl.federation import Federation
    from privfl.models import build_model
    from privfl.runner import load_dataset, split_clients
    from privfl.site import _parse_config
    from privfl.training import flatten_parameters

    config = _parse_config(text)
    split = load_dataset(config)
    clients = split_clients(config, split)
    federation = Federation(
        model_fn=lambda: build_model(config.model, split.train.input_shape, split.train.num_classes),
        clients=clients, test_set=split.test, training=config.training, federation=config.federation, progress=False,
    )
    result = federation.run(out)
    params = flatten_parameters(result.model)
    if round_index is not None:
        from privfl.rundir import load_checkpoint

        params = load_checkpoint(out, round_index, params.size)
    return params, clients, split


def _known_update(text: str, clients, split) -> bytes:
    """client-0's round-0 update, recomputed exactly as the site computed it (its seed comes from noise_seed)."""
    import torch

    from privfl.models import build_model
    from privfl.plan import derive_seed, plan_site
    from privfl.site import _parse_config
    from privfl.training import make_private_compatible, resolve_device, train_dp_sgd

    config = _parse_config(text)
    torch.manual_seed(config.federation.seed)
    model = make_private_compatible(build_model(config.model, split.train.input_shape, split.train.num_classes))
    plan = plan_site(len(clients["client-0"]), config.training, config.federation, 3)
    result = train_dp_sgd(model, clients["client-0"], config=config.training, noise_multiplier=plan.noise_multiplier,
                          device=resolve_device("cpu"), seed=derive_seed(config.federation.noise_seed, 0, 0, 0), site="client-0")
    return result.delta.astype("<f4").tobytes()[:64]


def _files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _all_stopped(pids: list[int], within: float = 15.0, *, root: Path | None = None) -> bool:
    """Whether every pid has ended (and, with ``root``, every process whose environment names a path
    under it: also a grandchild forked after the deployment last looked, which ``pids`` cannot list)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(pid_alive(pid) for pid in pids) and not (root is not None and _running_under(root)):
            return True
        time.sleep(0.2)
    return False


def _describe(pids: list[int]) -> str:
    """Each pid's name, parent, process group and command line (for a failure message)."""
    described = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:300]
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            described.append(f"{pid} {comm} (state {fields[0]}, ppid {fields[1]}, pgid {fields[2]}): {cmdline}")
        except OSError:
            described.append(f"{pid} (gone)")
    return "; ".join(described)


def _running_under(root: Path) -> list[int]:
    """Live processes (not zombies) whose environment mentions ``root`` (FLWR_HOME and the like)."""
    needle = str(root).encode()
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes() and pid_alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.timeout(1200)
def test_tls_deployment_matches_in_process_for_every_protection(tmp_path, run_toml):
    budgets = {name: 100.0 for name in ("client-0", "client-1", "client-2")}
    federation = LocalFederation(run_toml("plaintext"), sites=3, out=tmp_path / "dep", budgets=budgets)
    results = {}
    with federation:
        pids = federation.started_pids()
        # The long-lived processes are up and listed. (The list may also hold a library's short-lived
        # helper caught mid-run, e.g. `uname -p` from the platform module; it need not be alive now,
        # only gone at the end like everything else.)
        deployment = federation.deployment
        assert deployment is not None and deployment.superlink is not None
        long_lived = [*federation.workers.pids, deployment.superlink.pid, *(node.pid for node in deployment.supernodes)]
        assert set(long_lived) <= set(pids) and all(pid_alive(pid) for pid in long_lived)
        for protection in ("plaintext", "ckks", "secagg", "shared_key"):
            results[protection] = federation.run(run_toml(protection), step_timeout=120)
            pids += federation.started_pids()  # the executors' and each run's processes, too
            if protection == "plaintext":
                # client-1's process crashes and comes back on the same state directory.
                federation.restart_site("client-1")
                pids += federation.started_pids()
        # Client-level DP over the network: the key-holder site noises each decrypted sum.
        client_dp_text = run_toml("ckks", extra=_CLIENT_DP)
        client_dp_run = federation.run(client_dp_text, step_timeout=120)
        pids += federation.started_pids()
    assert _all_stopped(pids), "a process started by the deployment is still alive"
    # The ServerApp's log (what `flwr run --stream` prints) shows each round, not only the start and the end.
    # (This log is cut when the run completes: the launcher stops the stream then, so the last round's line may
    # be missing here; history.json has every round.)
    assert "privfl: round 0: 3 of 3 sampled sites trained" in (tmp_path / "dep" / "flower" / "run-1.log").read_text()
    # The restarted site kept its spent epsilon: the next run adds to it (it would otherwise start
    # again near the one-run figure).
    first = results["plaintext"][0]["clients"]["client-1"]["epsilon"]
    second = results["ckks"][0]["clients"]["client-1"]["epsilon"]
    assert 2.5 < first <= 3.0 and second > first + 0.5

    from privfl.site import _parse_config, quantizer_for

    for protection, (summary, history, run_dir) in results.items():
        expected, clients, split = _in_process(run_toml(protection))
        from privfl.rundir import load_checkpoint

        got = load_checkpoint(run_dir, 1, expected.size)
        assert all(h["aborted"] is None and len(h["contributors"]) == 3 for h in history), (protection, history)
        difference = float(np.max(np.abs(got - expected)))
        if protection == "plaintext":
            assert difference <= 1e-5
        elif protection == "ckks":
            assert difference <= 1e-6 * float(np.max(np.abs(expected))) + 1e-7
        elif protection == "shared_key":
            assert difference <= 1e-5  # two primes: a quantization step near 1e-15, below float32 on the wire
        else:
            config = _parse_config(run_toml(protection))
            assert difference <= 2 * quantizer_for(config, 3).max_error(3) * config.federation.secagg.weight_bound
        assert summary["deployment"]["tls"] is True and summary["final_accuracy"] >= 0.9

    summary, history, run_dir = client_dp_run
    expected, _, _ = _in_process(client_dp_text)
    assert all(h["aborted"] is None and len(h["contributors"]) == 3 for h in history)
    clip_norms = summary["client_level"]["clip_norms"]
    # Adaptive clipping under CKKS: the key holder moved S after round 0 and the sites clipped to its S.
    assert summary["client_level"]["rounds_released"] == 2 and clip_norms[0] == 0.4 and clip_norms[1] != 0.4
    holder = json.loads((federation.site_dirs[federation.names[0]] / "state" / "client-dp.json").read_text())
    assert [level["clip_norm"] for level in holder[summary["deployment"]["run_id"]]["levels"]] == clip_norms
    from privfl.client_dp import plan_client_dp, release_noise
    from privfl.rundir import load_checkpoint

    config = _parse_config(client_dp_text)
    plan = plan_client_dp(config.federation.client_dp, num_clients=3, client_fraction=1.0, rounds=2)
    # CKKS decrypts within about 1e-6 of the sum; rounding to the noise grid can turn that into one grid step.
    grid = max(release_noise(plan, clip_norm=s, dim=expected.size, adaptive=True).update.grid for s in clip_norms)
    got = load_checkpoint(run_dir, 1, expected.size)
    assert float(np.max(np.abs(got - expected))) <= 2 * grid / plan.expected_clients + 1e-5

    # Each ledger exists only in its own site's state directory; the server side has none.
    for folder in federation.site_dirs.values():
        assert (folder / "state" / "ledger.jsonl").is_file()
    server_side = [tmp_path / "dep" / "flower", *(r[2] for r in results.values())]
    assert not [p for root in server_side for p in root.rglob("ledger*")]

    # No file of the SuperLink's or the ServerApp's holds client-0's update (CKKS, secure aggregation and
    # shared-key runs) or the shared key; the search itself finds those bytes where they are.
    shared_key = (federation.site_dirs["client-0"] / "state" / "shared-key.bin").read_bytes()[12:]
    for root in (tmp_path / "dep" / "flower", results["shared_key"][2]):
        assert _files_holding(root, shared_key) == []
    for protection in ("ckks", "secagg", "shared_key"):
        expected, clients, split = _in_process(run_toml(protection))
        needle = _known_update(run_toml(protection), clients, split)
        probe = tmp_path / "probe.bin"
        probe.write_bytes(b"x" * 100 + needle + b"y")
        assert _files_holding(tmp_path, needle) == [probe]
        probe.unlink()
        for root in (tmp_path / "dep" / "flower", results[protection][2]):
            assert _files_holding(root, needle) == []


@pytest.mark.timeout(1200)
def test_secagg_over_the_network_survives_dropouts_and_aborts_below_threshold(tmp_path, run_toml):
    budgets = {name: 100.0 for name in ("client-0", "client-1", "client-2")}
    faults = {
        # Round 0: client-2 sends its masked input, then never answers again in that round.
        "client-2": ["secagg-unmask@0", "secagg-relay@1"],
        # Round 1: two of three sites are gone before their masked input: below the threshold.
        "client-1": ["secagg-relay@1"],
    }
    text = run_toml("secagg", rounds=4)
    federation = LocalFederation(text, sites=3, out=tmp_path / "dep", budgets=budgets, worker_faults=faults)
    killed = {}

    def kill_after_round_2(record):
        if record["round"] == 2 and not killed:
            # A real crash: client-2's SuperNode and worker die; round 3 goes on without it.
            index = federation.names.index("client-2")
            node = federation.deployment.supernodes[index]
            killed["pids"] = [node.pid, federation.workers.pids[index]]
            federation.deployment.kill_supernode(index)
            os.killpg(federation.workers.pids[index], signal.SIGKILL)

    with federation:
        pids = federation.started_pids()
        _summary, history, _ = federation.run(step_timeout=20, on_round=kill_after_round_2)
    assert _all_stopped(pids)

    first, second, third, fourth = history
    # Exact over the survivors: client-2's masked input arrived, so it is in the sum.
    assert first["aborted"] is None and sorted(first["contributors"]) == ["client-0", "client-1", "client-2"]
    # (a site whose masked input arrived is a contributor, not a dropout, even if it never unmasks)
    worker_log = (tmp_path / "dep" / "workers" / f"worker-{federation.names.index('client-2')}.log").read_text()
    assert "no answer to ('secagg-unmask', 0)" in worker_log
    # Below the threshold: a typed abort naming the counts, and the run goes on.
    assert second["aborted"] and "threshold" in second["aborted"]
    assert third["aborted"] is None and len(third["contributors"]) == 3
    assert killed, "the kill hook did not run"
    assert fourth["aborted"] is None and sorted(fourth["contributors"]) == ["client-0", "client-1"]
    assert "client-2" in fourth["dropped"]
    # Round 0's update equals the in-process round with every site (quantization aside).
    from privfl.site import _parse_config, quantizer_for

    expected, _, _ = _in_process(text, tmp_path / "in-process", round_index=0)
    from privfl.rundir import load_checkpoint

    got = load_checkpoint(tmp_path / "dep" / "run", 0, expected.size)
    config = _parse_config(text)
    assert np.max(np.abs(got - expected)) <= 2 * quantizer_for(config, 3).max_error(3) * 1000


@pytest.mark.timeout(600)
def test_the_same_apps_run_20_virtual_sites_under_the_simulation_engine(tmp_path, run_toml):
    pytest.importorskip("ray", reason='the Simulation Engine needs: pip install "flwr[simulation]~=1.42.0"')
    from privfl.flower.deploy import LocalSimulation, write_app_dir
    from privfl.flower.local import CLIENT_APP, SERVER_APP

    text = run_toml("secagg").replace("num_clients = 3", "num_clients = 20")
    config_path = tmp_path / "run.toml"
    config_path.write_text(text)
    run_config = {
        "config": str(config_path), "out": str(tmp_path / "run"), "input-shape": "30", "num-classes": 2,
        "test-data": "", "min-sites": 20, "wait-seconds": 120, "step-timeout": 300.0,
        "sim-state-root": str(tmp_path / "sites"),
    }
    app = write_app_dir(tmp_path / "app", serverapp=SERVER_APP, clientapp=CLIENT_APP, run_config=run_config)
    with LocalSimulation(tmp_path / "sim", 20, federation_config={"init-args-num-cpus": 2, "client-resources-num-cpus": 1}) as sim:
        result = sim.run_app(app, run_config=run_config, timeout=540)
        pids = sim.started_pids()
    assert result.ok, result.output[-3000:]
    assert _all_stopped(pids)

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert summary["deployment"]["sites"] == 20 and summary["rounds"] == 2
    assert all(h["aborted"] is None and len(h["contributors"]) == 20 for h in history)
    # Every virtual site kept its own ledger in its own state directory.
    ledgers = sorted(p.parent.name for p in (tmp_path / "sites").glob("*/ledger.jsonl"))
    assert ledgers == [f"site-{i:04d}" for i in range(20)]


class _Stop(Exception):
    """The deploying process is stopped (as Ctrl-C would)."""


@pytest.mark.timeout(900)
def test_a_stopped_local_deployment_resumes_its_run(tmp_path, run_toml):
    text = run_toml("plaintext", rounds=4)
    out = tmp_path / "dep"

    def stop_after_round_1(record):
        if record["round"] == 1:
            raise _Stop

    first = LocalFederation(text, sites=3, out=out)
    with pytest.raises(_Stop), first:
        first.run(step_timeout=60, on_round=stop_after_round_1)
    pids = first.started_pids()
    assert _all_stopped(pids, root=out), f"a process of the stopped deployment is still alive: {_describe(_running_under(out))}"
    recorded = json.loads((out / "run" / "history.json").read_text())
    assert len(recorded) >= 2 and not (out / "run" / "summary.json").exists()

    with pytest.raises(ConfigError, match=r"this one differs in federation\.rounds: resume with that file, or without a config"):
        LocalFederation(run_toml("plaintext", rounds=5), sites=3, out=out, resume=True)
    with pytest.raises(ConfigError, match="--sites 3"):
        LocalFederation(text, sites=4, out=out, resume=True)
    with pytest.raises(ConfigError, match="new or empty"):
        LocalFederation(text, sites=3, out=out)

    second = LocalFederation(text, sites=3, out=out, resume=True)
    with second:
        summary, history, run_dir = second.run(step_timeout=60)
        pids = second.started_pids()
    assert _all_stopped(pids, root=out), f"still alive: {_describe(_running_under(out))}"
    assert run_dir == out / "run" and [h["round"] for h in history] == [0, 1, 2, 3]
    assert history[:2] == recorded[:2]  # the recorded rounds are kept as they were
    assert history[3]["aborted"] is None and len(history[3]["contributors"]) == 3
    # A round the stopped server had started is recorded as interrupted and not run again.
    interrupted = [h for h in history[len(recorded):] if h["aborted"]]
    assert len(interrupted) <= 1 and all(h["aborted"].startswith("interrupted") and h["trained"] == [] for h in interrupted)
    from privfl.audit.site import audit_site

    for name, entry in summary["clients"].items():
        # The site's own ledger: every training it was charged for is a recorded one, or one in the
        # round the server had started when it stopped.
        audit = audit_site(second.site_dirs[name] / "state", out_dir=tmp_path / "audit" / name)
        assert entry["rounds_trained"] <= audit.runs[0].rounds_trained <= entry["rounds_trained"] + len(interrupted)
        assert len(audit.runs) == 1 and audit.errors == () and entry["epsilon"] == pytest.approx(audit.epsilon)
    assert (out / "flower-2").is_dir()  # the resumed deployment's own TLS material and logs
    with pytest.raises(ConfigError, match="has finished"):
        LocalFederation(text, sites=3, out=out, resume=True)


@pytest.mark.timeout(300)
def test_sigterm_to_deploy_local_stops_everything_it_started(tmp_path, run_toml):
    import subprocess
    import sys

    config = tmp_path / "run.toml"
    config.write_text(run_toml("plaintext", rounds=30))
    out = tmp_path / "dep"
    command = [sys.executable, "-m", "privfl.cli", "deploy", "local", str(config), "--sites", "2", "--out", str(out), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "run" / "history.json").exists():  # the run is under way
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the deployment did not start a round"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 130 and "interrupted" in stderr
        assert _all_stopped([], root=out), f"still running after SIGTERM: {_describe(_running_under(out))}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        for pid in _running_under(out):
            os.kill(pid, signal.SIGKILL)
