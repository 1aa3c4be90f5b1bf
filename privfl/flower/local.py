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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from privfl.config import PartitionKind, ProtectionKind, RunConfig
from privfl.errors import ConfigError, DeploymentError
from privfl.results import RoundRecord, RunSummary

if TYPE_CHECKING:
    from privfl.flower.deploy import LocalDeployment
    from privfl.flower.warm import WarmLauncher

__all__ = ["LocalDeploymentResult", "LocalFederation", "deploy_local", "write_site_data"]

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

    summary: RunSummary
    history: list[RoundRecord]
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


def _changed_settings(before: str, after: str) -> list[str]:
    """The dotted settings two TOML run configs give different values (or only one of them gives)."""
    from privfl.config import tomllib

    def flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in table.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    try:
        a, b = flat(tomllib.loads(before)), flat(tomllib.loads(after))
    except (tomllib.TOMLDecodeError, RecursionError):
        return []
    missing = object()
    return sorted(key for key in a.keys() | b.keys() if a.get(key, missing) != b.get(key, missing))


def site_names(config: RunConfig, num_sites: int) -> tuple[tuple[str, ...] | None, str | None]:
    """The names ``privfl deploy local`` gives ``num_sites`` sites, and a note when the config's own are not used.

    The config's ``client_names`` when it has exactly ``num_sites`` of them; under ``partition =
    "group"`` otherwise None: the sites are named after the groups, as ``privfl run`` names them
    (``privfl.runner.split_clients``); otherwise ``client-0``, ``client-1``, ... (``--sites``
    replaces the config's ``num_clients``).
    """
    names = config.data.client_names
    if names and len(names) == num_sites:
        return tuple(names), None
    note = None if not names else f"the config's {len(names)} client_names name sites only with --sites {len(names)}"
    if config.data.partition is PartitionKind.GROUP:
        return None, note
    return tuple(f"client-{i}" for i in range(num_sites)), note


def write_site_data(config: RunConfig, num_sites: int, root: Path) -> tuple[dict[str, Path], Path, tuple[int, ...], int]:
    """Partitions the config's bundled dataset over ``num_sites`` sites as CSV files under ``root``.

    Returns:
        (site name -> its folder, the test-set CSV, input shape, number of classes).
    """
    from dataclasses import replace

    from privfl.runner import load_dataset, split_clients

    data = replace(config.data, num_clients=num_sites, client_names=site_names(config, num_sites)[0])
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


class LocalFederation:
    """Sites, their workers, a TLS SuperLink and their SuperNodes on 127.0.0.1, as a context manager.

    :func:`deploy_local` is this with one run; tests use it to run several configs on one deployment,
    to stop a site mid-run or to inject faults.

    Args:
        config_text: the run config whose bundled dataset is split over the sites.
        sites: how many sites.
        out: a new (or empty) directory for everything.
        budgets: site name -> its own epsilon budget (node configuration); default: the run config's.
        worker_faults: site name -> ``STEP@ROUND`` list: that site's worker closes the connection
            instead of answering (fault injection for tests; see ``privfl.flower.worker``).
        key_holder: the site holding the CKKS key (default: the first).
        resume: continue the unfinished run in ``out/run`` (an earlier deployment there was stopped
            or crashed): the same sites with their data and state directories, the same config, a
            new SuperLink and SuperNodes; the Aggregator resumes after the last recorded round.
        allow_noise_seed: let the sites join runs whose config fixes ``federation.noise_seed``
            (default: when ``config_text`` sets one: on one machine one operator plays every party).
            Sites refuse such runs otherwise (:class:`privfl.site.Site`).
    """

    def __init__(
        self,
        config_text: str,
        *,
        sites: int,
        out: str | Path,
        budgets: dict[str, float] | None = None,
        worker_faults: dict[str, list[str]] | None = None,
        key_holder: int = 0,
        resume: bool = False,
        allow_noise_seed: bool | None = None,
    ) -> None:
        from privfl.errors import MessageError
        from privfl.site import _parse_config

        try:
            self.config = _parse_config(config_text)
        except MessageError as exc:
            raise ConfigError("config", "<toml>", exc.reason) from exc
        self.config_text = config_text
        if not isinstance(sites, int) or isinstance(sites, bool) or sites < 1:
            raise ConfigError("sites", sites, "must be an int >= 1")
        config = self.config
        if config.federation.protection is ProtectionKind.CKKS and sites < config.federation.ckks.min_contributors:
            raise ConfigError("sites", sites, f"CKKS needs at least ckks.min_contributors = {config.federation.ckks.min_contributors} sites")
        if config.federation.protection is ProtectionKind.SHARED_KEY:
            shared = config.federation.shared_key
            if sites < shared.min_contributors + 1:
                raise ConfigError(
                    "sites", sites,
                    f"the shared-key mode needs the decrypting site and shared_key.min_contributors = {shared.min_contributors} others",
                )
        from privfl.site import check_weight_bounds

        check_weight_bounds(config)  # the Aggregator would refuse it, once the SuperLink and the sites are up
        from privfl.flower.deploy import flower_executable

        for name in ("flower-superlink", "flower-supernode", "flwr"):
            flower_executable(name)  # ImportError naming the install command, before anything is written
        self.root = Path(out).resolve()
        self._resume = bool(resume)
        if self._resume:
            self._check_resumable(config_text, sites)
        elif self.root.exists() and any(self.root.iterdir()):
            raise ConfigError("out", str(self.root), "must be a new or empty directory (or resume the run there with --resume)")
        self._made_root = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        self._sites, self._budgets, self._worker_faults, self._key_holder = sites, budgets, worker_faults, key_holder
        self._allow_noise_seed = config.federation.noise_seed is not None if allow_noise_seed is None else bool(allow_noise_seed)
        # Written on entry, while the SuperLink starts (see `_write_sites`).
        self.site_dirs: dict[str, Path] = {}
        self.names: list[str] = []
        self.test_csv: Path | None = None
        self.input_shape: tuple[int, ...] = ()
        self.num_classes = 0
        self.node_configs: list[dict[str, str | int | float | bool]] = []
        self._worker_args: list[list[str]] = []
        self.workers = _Workers(self.root / "workers")
        self.deployment: LocalDeployment | None = None
        self._runs = 0
        self._ready = False

    def _check_resumable(self, config_text: str, sites: int) -> None:
        """Refuses a resume that cannot continue the run in ``out/run`` (before anything starts)."""
        from privfl.aggregator import AGGREGATOR_FILE

        run = self.root / "run"
        if not (run / AGGREGATOR_FILE).is_file():
            raise ConfigError("out", str(self.root), "holds no deployed run to resume (run/aggregator.json is missing)")
        if (run / "summary.json").exists():
            raise ConfigError("out", str(self.root), "the run there has finished (run/summary.json exists); nothing to resume")
        started = (run / "config.toml").read_text()
        if started != config_text:
            changed = _changed_settings(started, config_text)
            raise ConfigError(
                "config", str(run / "config.toml"),
                "is the config the run was started with, and this one differs "
                + (f"in {', '.join(changed)}" if changed else "only in how it is written (the sites compare the text)")
                + f": resume with that file, or without a config (it is read from {run / 'config.toml'})",
            )
        existing = sorted(p.name for p in (self.root / "sites").iterdir()) if (self.root / "sites").is_dir() else []
        if len(existing) != sites:
            raise ConfigError("sites", sites, f"the run there has {len(existing)} sites ({', '.join(existing)}); resume with --sites {len(existing)}")

    def _write_sites(self) -> None:
        """Each site's data, state directory, worker arguments and node configuration."""
        self.site_dirs, self.test_csv, self.input_shape, self.num_classes = write_site_data(self.config, self._sites, self.root)
        self.names = list(self.site_dirs)
        self._provision(self.config)
        from privfl.site import site_identity

        # The key holder's identity key, and every site's (secure aggregation), as a consortium hands them out of band.
        identities = {name: site_identity(folder / "state").hex() for name, folder in self.site_dirs.items()}
        holder_key = identities[self.names[self._key_holder]]
        for i, (name, folder) in enumerate(self.site_dirs.items()):
            peers = folder / "peers.json"
            peers.write_text(json.dumps({other: key for other, key in identities.items() if other != name}, indent=2) + "\n")
            socket_path = folder / "state" / "site.sock"
            args = ["--site", name, "--data", str(folder / "data.csv"), "--state-dir", str(folder / "state"),
                    "--role", "key-holder" if i == self._key_holder else "site", "--socket", str(socket_path),
                    "--key-holder-key", holder_key, "--peers", str(peers), *(["--allow-noise-seed"] if self._allow_noise_seed else [])]
            # Each site's own cap: the one given for it, else the operator's config's (one machine, one operator).
            budget = self._budgets[name] if self._budgets and name in self._budgets else self.config.training.dp.epsilon_budget
            args += ["--budget", str(float(budget))]
            for fault in (self._worker_faults or {}).get(name, []):
                args += ["--fault", fault]
            self._worker_args.append(args)
            self.node_configs.append({"site": name, "worker": str(socket_path)})

    def _provision(self, config: RunConfig) -> None:
        """The shared-key mode's key, as a consortium provisions it out of band: one key into every
        site's state directory (once per deployment), none for the server."""
        from privfl.site import SHARED_KEY_FILE, provision_shared_key

        states = [folder / "state" for folder in self.site_dirs.values()]
        if config.federation.protection is ProtectionKind.SHARED_KEY and not all((d / SHARED_KEY_FILE).exists() for d in states):
            provision_shared_key(states, poly_modulus_degree=config.federation.shared_key.poly_modulus_degree)

    def __enter__(self) -> LocalFederation:
        from privfl.flower.deploy import LocalDeployment
        from privfl.flower.warm import NODE_MODULES, WORKER_MODULES
        from privfl.site import TRAIN_MODULES

        self.started = time.perf_counter()
        try:
            # SuperNode authentication on: only nodes whose keys were registered may join. Flower's
            # processes keep nothing that must be saved (the sites' state is in their workers), so one
            # still shutting down 2 s after SIGTERM is killed. The SuperLink boots while this process
            # writes the sites' data.
            flower = self.root / "flower"
            for attempt in range(2, 1000):
                if not (self._resume and flower.exists()):
                    break
                flower = self.root / f"flower-{attempt}"  # a resumed deployment: new TLS material, new logs
            self.deployment = LocalDeployment(flower, [{} for _ in range(self._sites)], node_auth=True, stop_grace=2.0)
            # One process imports Flower, torch and Opacus once; every SuperNode, site worker and the
            # ServerApp are forked from it (privfl.flower.warm) instead of importing them again.
            self.workers.launcher = self.deployment.start_warm((*NODE_MODULES, *WORKER_MODULES, *TRAIN_MODULES), serverapp=True)
            self.deployment.start_superlink()
            self._write_sites()
            self.deployment.set_node_configs(self.node_configs)
            self.deployment.prepare_nodes()  # node keys registered; workers and SuperNodes start in `_wait_ready`
        except BaseException as exc:
            self.stop()
            if isinstance(exc, ConfigError) and not self._resume:
                # A setting that cannot work (more sites than the data splits into): nothing ran and nothing
                # was spent, so what the start wrote goes too, and the same --out can be used again.
                self._discard_start()
            raise
        # `run` submits its run at once: the ServerApp boots while the launcher imports and the
        # workers start, and waits for the SuperNodes, which start only once every worker answers
        # (`_wait_ready`), so no message can reach a site before its worker does.
        return self

    def _discard_start(self) -> None:
        """Removes what a fresh start wrote into ``out`` (it was new or empty), and ``out`` if it made it."""
        import shutil

        for child in list(self.root.iterdir()):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        if self._made_root:
            self.root.rmdir()

    def _wait_ready(self) -> None:
        """Returns once every worker answers and every SuperNode has registered (raises otherwise);
        starts the SuperNodes, once, after the workers answer."""
        self._wait_workers()
        if not self._ready:
            assert self.deployment is not None
            if not self.deployment.supernodes:
                self.deployment.start_nodes()
            self.deployment.wait_nodes()
            self._ready = True

    def _wait_workers(self) -> None:
        """Starts the workers (once) and returns once every one answers: no message can then find a
        site without its worker."""
        if self.deployment is None:
            raise DeploymentError("the federation is not started: enter it (with LocalFederation(...) as federation) first")
        if not self._ready:
            if not self.workers.processes:
                self.workers.spawn(self._worker_args)
            self.workers.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stops every process started here (SuperNodes, SuperLink, workers)."""
        try:
            try:
                self.workers.terminate()  # they wind down while the deployment stops
            finally:
                if self.deployment is not None:
                    self.deployment.stop()
        finally:
            self.workers.stop()

    def restart_site(self, name: str) -> None:
        """Kills a site's worker (SIGKILL, as a crash would) and starts it again on the same state directory."""
        self._wait_ready()
        self.workers.restart(self.names.index(name))

    def started_pids(self) -> list[int]:
        """Every process this federation started (for checks that none is left)."""
        pids = list(self.workers.pids)
        if self.deployment is not None:
            pids += self.deployment.started_pids()
        return pids

    def run(
        self,
        config_text: str | None = None,
        *,
        progress: bool = False,
        timeout: float = 3600.0,
        step_timeout: float = 600.0,
        on_round=None,
        record: bool = False,
    ) -> tuple[RunSummary, list[RoundRecord], Path]:
        """Runs one config (default: the one the federation was made with) to completion.

        ``record`` keeps what the server observes in the run's ``observed/`` folder (``privfl attack --run``).

        Returns:
            (summary, history, the run's directory).

        Raises:
            DeploymentError: the run failed (the message names Flower's log and quotes its end).
        """
        from privfl.flower.deploy import write_app_dir

        if self.deployment is None:
            raise DeploymentError("the federation is not started: enter it (with LocalFederation(...) as federation) first")
        if config_text is not None:
            from privfl.errors import MessageError
            from privfl.site import _parse_config

            try:
                self._provision(_parse_config(config_text))
            except MessageError as exc:
                raise ConfigError("config", "<toml>", exc.reason) from exc
        self._runs += 1
        run_dir = self.root / ("run" if self._runs == 1 else f"run-{self._runs}")
        resuming = self._resume and self._runs == 1
        config_path = run_dir / "config.toml"
        done = 0
        if resuming:
            from privfl.rundir import load_history

            done = len(load_history(run_dir / "history.json"))
        else:
            run_dir.mkdir(parents=True, exist_ok=False)
            config_path.write_text(config_text if config_text is not None else self.config_text)
        rounds = _rounds_of(config_path.read_text())
        run_config: dict[str, str | int | float | bool] = {
            "config": str(config_path),
            "out": str(run_dir),
            "input-shape": ",".join(str(d) for d in self.input_shape),
            "num-classes": self.num_classes,
            "test-data": str(self.test_csv),
            "min-sites": len(self.names),
            "wait-seconds": 120,
            "step-timeout": float(step_timeout),
            "resume": resuming,  # always present, so that `flwr run --run-config resume=true` may override it
            "record": bool(record),
        }
        app = write_app_dir(self.root / "app", serverapp=SERVER_APP, clientapp=CLIENT_APP, run_config=run_config)
        handle = self.deployment.start_run(app, run_config=run_config)
        self._wait_ready()  # on an error the caller's `with` stops the run with the deployment
        summary_path = run_dir / "summary.json"
        _follow(handle, run_dir / "history.json", rounds, progress=progress, timeout=timeout, on_round=on_round, start=done,
                done_path=summary_path)  # fmt: skip
        result = handle.wait_completed(timeout=120)
        if not result.ok or not summary_path.exists():
            tail = "\n".join(result.output.strip().splitlines()[-15:])
            raise DeploymentError(f"the deployment's run ended with status {result.status}; see {result.log_file}\n{tail}")
        summary: RunSummary = json.loads(summary_path.read_text())
        summary["deployment"].update({"mode": "local", "tls": True, "flower_log": str(result.log_file)})
        summary_path.write_text(json.dumps(summary, indent=2))
        history: list[RoundRecord] = json.loads((run_dir / "history.json").read_text())
        return summary, history, run_dir


def _rounds_of(text: str) -> int:
    from privfl.site import _parse_config

    return _parse_config(text).federation.rounds


def deploy_local(
    config_text: str,
    *,
    sites: int,
    out: str | Path,
    progress: bool = True,
    timeout: float = 3600.0,
    step_timeout: float = 600.0,
    on_start: Callable[[], None] | None = None,
    record: bool = False,
    resume: bool = False,
) -> LocalDeploymentResult:
    """Runs the federation ``config_text`` describes as a local Flower deployment with TLS.

    Args:
        config_text: a run config (TOML, the schema of ``privfl run``).
        sites: how many SuperNodes (sites) to start; the bundled dataset is split over them.
        out: a new (or empty) directory for everything the deployment writes; the run's
            history.json and summary.json go to ``out/run``.
        progress: show a progress bar over rounds.
        timeout: seconds the whole run may take before it is stopped.
        step_timeout: seconds a site has for one protocol step before it counts as dropped.
        resume: continue the unfinished run in ``out`` (same config and site count), after a stop or crash.
        record: keep what the server observes in ``out/run/observed`` (for ``privfl attack --run out/run``;
            under plaintext it holds every site's update).
        on_start: called once the config and the site count are checked, before any process starts
            (e.g. to say what is about to run: a refused setting is then reported alone). Errors that
            need the data (e.g. a group column the dataset lacks) come after it, once the SuperLink has
            started; it is stopped before they are raised.

    Raises:
        ConfigError: a bad config or site count, or ``out`` is not empty.
        DeploymentError: the deployment did not start, or the run failed (the message names the log).
        ImportError: Flower is not installed (``pip install 'privfl[flower]'``).
    """
    federation = LocalFederation(config_text, sites=sites, out=out, resume=resume)
    if on_start is not None:
        on_start()
    with federation:
        summary, history, run_dir = federation.run(progress=progress, timeout=timeout, step_timeout=step_timeout, record=record)
    seconds = time.perf_counter() - federation.started
    summary["deployment"]["wall_seconds"] = seconds
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return LocalDeploymentResult(summary=summary, history=history, out_dir=run_dir, site_dirs=federation.site_dirs, seconds=seconds)


class _Workers:
    """The sites' long-lived workers (privfl.flower.worker), each in its own process group, always stopped."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list = []  # (Popen or WarmProcess, socket path, log path, arguments)
        self._all: list = []  # every process ever started, for stop()
        self.launcher: WarmLauncher | None = None  # when set, workers are forked from it

    def _spawn(self, index: int, args: list[str]):
        import os
        import subprocess
        import sys

        log_path = self.log_dir / f"worker-{index}.log"
        if self.launcher is not None:
            forked = self.launcher.spawn("privfl.flower.worker:main", args, log_file=log_path, env=os.environ, name="privfl-worker")
            self._all.append(forked)
            return (forked, Path(args[args.index("--socket") + 1]), log_path, args)
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "privfl.flower.worker", *args], stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self._all.append(process)
        return (process, Path(args[args.index("--socket") + 1]), log_path, args)

    def spawn(self, arguments: list[list[str]]) -> None:
        """Starts one worker per argument list; `wait_ready` waits for them."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i, args in enumerate(arguments):
            self.processes.append(self._spawn(i, args))

    def wait_ready(self, *, timeout: float = 180.0) -> None:
        """Returns once every worker answers on its socket (raises if one exits or times out)."""
        deadline = time.monotonic() + timeout
        for entry in self.processes:
            self._wait_ready(entry, deadline, timeout)

    def start(self, arguments: list[list[str]], *, timeout: float = 180.0) -> None:
        self.spawn(arguments)
        self.wait_ready(timeout=timeout)

    def restart(self, index: int, *, timeout: float = 180.0) -> None:
        """Kills worker ``index`` (SIGKILL, as a crash would) and starts it again on the same state directory."""
        import os
        import signal

        process = self.processes[index][0]
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)
        self.processes[index] = self._spawn(index, self.processes[index][3])
        self._wait_ready(self.processes[index], time.monotonic() + timeout, timeout)

    @staticmethod
    def _wait_ready(entry, deadline: float, timeout: float) -> None:
        from privfl.flower.worker import call

        process, socket_path, log_path, _ = entry
        while True:
            if process.poll() is not None:
                raise DeploymentError(f"a site worker exited with code {process.returncode}; see {log_path}:\n{log_path.read_text()[-2000:]}")
            if socket_path.exists():
                try:
                    call(socket_path, b"", timeout=10)
                    return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise DeploymentError(f"a site worker did not start within {timeout:g} s; see {log_path}")
            time.sleep(0.2)

    def terminate(self) -> None:
        """Sends SIGTERM to every worker still running (`stop` waits for them)."""
        import os
        import signal

        for process in self._all:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def stop(self, grace: float = 5.0) -> None:
        import os
        import signal

        self.terminate()
        deadline = time.monotonic() + grace
        for process in self._all:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # still alive after the grace period: kill it
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=10)

    @property
    def pids(self) -> list[int]:
        return [entry[0].pid for entry in self.processes]


def _follow(
    handle, history_path: Path, rounds: int, *, progress: bool, timeout: float, on_round=None, start: int = 0, done_path: Path | None = None
) -> None:
    """Shows the rounds as the ServerApp records them (after the ``start`` already recorded), until the run
    ends, ``done_path`` exists (the ServerApp writes it last), or ``timeout``."""
    from privfl.federation import _Progress, _round_log_line
    from privfl.rundir import HistoryFollower

    deadline = time.monotonic() + timeout
    shown = start
    follower = HistoryFollower(history_path)  # reads what each round appended, not the whole file again
    with _Progress(rounds, enabled=progress, start=start) as bar:
        while True:
            running = handle.running() and not (done_path is not None and done_path.exists())
            history = follower.read()
            for record in history[shown:]:
                bar.advance(_for_bar(record))
                log.info("%s", _round_log_line(record))  # privfl -v: a line per round, as privfl run logs
                if on_round is not None:
                    on_round(record)
            shown = max(shown, len(history))
            if not running:
                return
            if time.monotonic() > deadline:
                raise DeploymentError(f"the deployment did not finish within {timeout:g} s; see {handle.log_file}")
            time.sleep(0.1)


def _for_bar(record: dict[str, Any]) -> dict[str, Any]:
    accuracy = record.get("test_accuracy")
    epsilon = record.get("max_epsilon")
    return {
        **record,
        "test_accuracy": accuracy,
        "max_epsilon": epsilon if epsilon is not None else math.nan,
    }
