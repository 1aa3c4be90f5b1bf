"""``privfl deploy local``: a whole federation on this machine as real processes over Flower with TLS.

A TLS SuperLink (certificates made with ``cryptography``) and one SuperNode per site on 127.0.0.1;
each site gets its own partition of the bundled dataset (a CSV file in its folder) and its own state
directory (ledger, keys). The ServerApp writes history.json and summary.json into ``out``, as
``privfl run`` does; each site's ledger stays in that site's state directory. Every process started
here is stopped on return, on error and on Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privfl.config import ProtectionKind, RunConfig
from privfl.errors import ConfigError, PrivflError

__all__ = ["LocalDeploymentResult", "deploy_local", "write_site_data"]

log = logging.getLogger("privfl")

SERVER_APP = "privfl.flower.apps:server_app"
CLIENT_APP = "privfl.flower.apps:client_app"


@dataclass(slots=True)
class LocalDeploymentResult:
    """What :func:`deploy_local` returns.

    Attributes:
        summary: the run summary (also in ``out/summary.json``).
        history: one record per round (``out/history.json``).
        out_dir: the deployment directory.
        site_dirs: site name -> its folder (data.csv, state/ with its ledger and keys).
        seconds: wall time from the first process started to the last stopped.
    """

    summary: dict[str, Any]
    history: list[dict[str, Any]]
    out_dir: Path
    site_dirs: dict[str, Path]
    seconds: float


def _write_csv(path: Path, features: np.ndarray, labels: np.ndarray) -> None:
    flat = features.reshape(len(features), -1)
    header = ",".join([f"x{i}" for i in range(flat.shape[1])] + ["label"])
    rows = np.concatenate([flat.astype(np.float64), labels.reshape(-1, 1).astype(np.float64)], axis=1)
    # float32 values written with 9 significant digits read back bit for bit.
    np.savetxt(path, rows, delimiter=",", header=header, comments="", fmt=["%.9g"] * flat.shape[1] + ["%d"])


def _arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    indices = np.asarray(getattr(dataset, "indices", range(len(dataset))))
    base = getattr(dataset, "dataset", dataset)
    return base.features.numpy()[indices], base.targets.numpy()[indices]


def write_site_data(config: RunConfig, num_sites: int, root: Path) -> tuple[dict[str, Path], Path, tuple[int, ...], int]:
    """Partitions the config's bundled dataset over ``num_sites`` sites as CSV files under ``root``.

    Returns:
        (site name -> its folder, the test-set CSV, input shape, number of classes).
    """
    from dataclasses import replace

    from privfl.runner import load_dataset, split_clients

    names = list(config.data.client_names) if config.data.client_names and len(config.data.client_names) == num_sites else None
    data = replace(config.data, num_clients=num_sites, client_names=names)
    split = load_dataset(config)
    clients = split_clients(replace(config, data=data), split)
    folders = {}
    for name, dataset in clients.items():
        folder = root / "sites" / name
        (folder / "state").mkdir(parents=True, exist_ok=True)
        _write_csv(folder / "data.csv", *_arrays(dataset))
        folders[name] = folder
    test = root / "server" / "test.csv"
    test.parent.mkdir(parents=True, exist_ok=True)
    _write_csv(test, *_arrays(split.test))
    return folders, test, tuple(split.train.input_shape), int(split.train.num_classes)


def deploy_local(
    config_text: str,
    *,
    sites: int,
    out: str | Path,
    progress: bool = True,
    timeout: float = 3600.0,
    step_timeout: float = 600.0,
) -> LocalDeploymentResult:
    """Runs the federation ``config_text`` describes as a local Flower deployment with TLS.

    Args:
        config_text: a run config (TOML, the schema of ``privfl run``).
        sites: how many SuperNodes (sites) to start; the bundled dataset is split over them.
        out: a new (or empty) directory for everything the deployment writes.
        progress: show a progress bar over rounds.
        timeout: seconds the whole run may take before it is stopped.
        step_timeout: seconds a site has for one protocol step before it counts as dropped.

    Raises:
        ConfigError: a bad config or site count, or ``out`` is not empty.
        PrivflError: the deployment did not start, or the run failed (the message names the log).
        ImportError: Flower is not installed (``pip install 'privfl[flower]'``).
    """
    from privfl.flower.deploy import LocalDeployment, write_app_dir
    from privfl.site import _parse_config
    from privfl.errors import MessageError

    try:
        config = _parse_config(config_text)
    except MessageError as exc:
        raise ConfigError("config", "<toml>", exc.reason) from exc
    if not isinstance(sites, int) or isinstance(sites, bool) or sites < 1:
        raise ConfigError("sites", sites, "must be an int >= 1")
    if config.federation.protection is ProtectionKind.CKKS and sites < config.federation.ckks.min_contributors:
        raise ConfigError("sites", sites, f"CKKS needs at least ckks.min_contributors = {config.federation.ckks.min_contributors} sites")
    root = Path(out).resolve()
    if root.exists() and any(root.iterdir()):
        raise ConfigError("out", str(root), "must be a new or empty directory")
    root.mkdir(parents=True, exist_ok=True)
    folders, test_csv, input_shape, num_classes = write_site_data(config, sites, root)
    (root / "config.toml").write_text(config_text)
    node_configs = []
    worker_args = []
    for i, (name, folder) in enumerate(folders.items()):
        role = "key-holder" if i == 0 and config.federation.protection is ProtectionKind.CKKS else "site"
        socket_path = folder / "state" / "site.sock"
        worker_args.append(
            ["--site", name, "--data", str(folder / "data.csv"), "--state-dir", str(folder / "state"), "--role", role,
             "--socket", str(socket_path)]
        )
        node_configs.append({"site": name, "worker": str(socket_path)})
    run_config = {
        "config": str(root / "config.toml"),
        "out": str(root),
        "input-shape": ",".join(str(d) for d in input_shape),
        "num-classes": num_classes,
        "test-data": str(test_csv),
        "min-sites": sites,
        "wait-seconds": 120,
        "step-timeout": float(step_timeout),
    }
    app = write_app_dir(root / "app", serverapp=SERVER_APP, clientapp=CLIENT_APP, run_config=run_config)
    started = time.perf_counter()
    workers = _Workers(root / "workers")
    try:
        workers.start(worker_args)
        with LocalDeployment(root / "flower", node_configs) as deployment:
            handle = deployment.start_run(app, run_config=run_config)
            _follow(handle, root / "history.json", config.federation.rounds, progress=progress, timeout=timeout)
            result = handle.wait(timeout=60)
    finally:
        workers.stop()
    seconds = time.perf_counter() - started
    summary_path = root / "summary.json"
    if not result.ok or not summary_path.exists():
        tail = "\n".join(result.output.strip().splitlines()[-15:])
        raise PrivflError(f"the deployment's run ended with status {result.status}; see {result.log_file}\n{tail}")
    summary = json.loads(summary_path.read_text())
    summary["deployment"].update({"mode": "local", "tls": True, "wall_seconds": seconds, "flower_log": str(result.log_file)})
    summary_path.write_text(json.dumps(summary, indent=2))
    history = json.loads((root / "history.json").read_text())
    return LocalDeploymentResult(summary=summary, history=history, out_dir=root, site_dirs=folders, seconds=seconds)


class _Workers:
    """The sites' long-lived workers (privfl.flower.worker), each in its own process group, always stopped."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list = []

    def start(self, arguments: list[list[str]], *, timeout: float = 180.0) -> None:
        import os
        import subprocess
        import sys

        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i, args in enumerate(arguments):
            log_file = (self.log_dir / f"worker-{i}.log").open("wb")
            process = subprocess.Popen(
                [sys.executable, "-m", "privfl.flower.worker", *args], stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            log_file.close()
            self.processes.append((process, Path(args[args.index("--socket") + 1]), self.log_dir / f"worker-{i}.log"))
        from privfl.flower.worker import call

        deadline = time.monotonic() + timeout
        for process, socket_path, log_path in self.processes:
            while True:
                if process.poll() is not None:
                    raise PrivflError(f"a site worker exited with code {process.returncode}; see {log_path}:\n{log_path.read_text()[-2000:]}")
                if socket_path.exists():
                    try:
                        call(socket_path, b"", timeout=10)
                        break
                    except OSError:
                        pass
                if time.monotonic() > deadline:
                    raise PrivflError(f"a site worker did not start within {timeout:g} s; see {log_path}")
                time.sleep(0.2)

    def stop(self, grace: float = 5.0) -> None:
        import os
        import signal

        for process, _, _ in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for process, _, _ in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - still alive after the grace period: kill it
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=10)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process, _, _ in self.processes]


def _follow(handle, history_path: Path, rounds: int, *, progress: bool, timeout: float) -> None:
    """Shows the rounds as the ServerApp records them, until the run ends or ``timeout``."""
    from privfl.federation import _Progress

    deadline = time.monotonic() + timeout
    shown = 0
    with _Progress(rounds, enabled=progress, start=0) as bar:
        while handle.running():
            if time.monotonic() > deadline:
                raise PrivflError(f"the deployment did not finish within {timeout:g} s; see {handle.log_file}")
            try:
                history = json.loads(history_path.read_text()) if history_path.exists() else []
            except (OSError, ValueError):
                history = []  # being replaced right now: read it next time
            for record in history[shown:]:
                bar.advance(_for_bar(record))
            shown = max(shown, len(history))
            time.sleep(0.5)


def _for_bar(record: dict[str, Any]) -> dict[str, Any]:
    accuracy = record.get("test_accuracy")
    epsilon = record.get("max_epsilon")
    return {
        **record,
        "test_accuracy": accuracy,
        "max_epsilon": epsilon if epsilon is not None else math.nan,
    }
