"""Run a Flower deployment (TLS SuperLink and N SuperNodes) on loopback, submit apps to it, and tear it down.

`LocalDeployment` is the process machinery behind privfl's Flower runs and their tests: in one
directory it writes TLS material, starts ``flower-superlink`` with TLS on 127.0.0.1 and one
``flower-supernode`` per node config, waits until every node has registered, submits app
directories with ``flwr run``, and on exit stops every process it started. `write_app_dir` writes
the pyproject.toml that names an app's ServerApp and ClientApp, so the real privfl app plugs in by
passing ``"privfl.flower.apps:server_app"`` and ``"privfl.flower.apps:client_app"``.

Facts about Flower 1.42 this module relies on:

* The SuperLink serves its Fleet, Control and Runtime (ServerAppIo) APIs over HTTPS on ONE port
  (``--host``/``--port``, default 127.0.0.1:8000); the old 9091/9092/9093 gRPC ports are gone.
* Each SuperNode serves a local Runtime API (``--host``/``--port``, default 9094) for its
  ClientApp processes: every SuperNode on one machine needs its own port.
* SuperLink and SuperNodes launch ``flower-superexec`` by bare name, which launches
  ``flwr-serverapp``/``flwr-clientapp`` by bare name: the venv's bin directory must lead ``PATH``.
  The SuperLink's SuperExec runs in a session of its own, so killing the SuperLink's process group
  alone leaves it behind (it exits once it sees its parent gone); this module therefore also tracks
  and signals every descendant process.
* ``flwr`` CLI connections live in ``$FLWR_HOME/config.toml`` (not in the app's pyproject), and
  every Flower process installs FABs under ``$FLWR_HOME/apps``: each process here gets its own
  ``FLWR_HOME`` inside the deployment directory, so nothing touches ``~/.flwr``.
* Runtime dependency installation (``uv sync``) is on by default in the SuperLink and is turned
  off here (``--disable-runtime-dependency-installation``); SuperNodes never install unless asked.
  The update check and telemetry (network calls) are turned off through the environment.
* A SuperNode polls the SuperLink every 3 s when idle and handles one message at a time, each in a
  fresh ``flwr-clientapp`` process; ``Grid.send_and_receive`` polls every 3 s too. One message
  round trip therefore costs about 6 s on an idle 2-core machine (8-10 s under load), whatever the
  ClientApp computes. A SIGKILLed SuperNode stays registered until its heartbeat lapses (30 s
  interval, patience 2); messages to it get no reply before that.

Threat model: everything binds to 127.0.0.1; the Fleet API is TLS with a private CA made per
deployment. The SuperNodes' local Runtime API is plaintext on loopback, as in Flower's default.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from privfl.errors import ConfigError, DeploymentError
from privfl.flower.tls import NodeAuthKeys, TlsMaterial, generate_node_auth_keys, generate_tls_material
from privfl.flower.warm import (
    NODE_MODULES,
    SERVERAPP_MODULES,
    SERVERAPP_TARGET,
    SUPEREXEC_MODULES,
    SUPEREXEC_TARGET,
    WarmLauncher,
    WarmProcess,
)

__all__ = [
    "ConfigValue",
    "LocalDeployment",
    "LocalSimulation",
    "RunHandle",
    "RunResult",
    "SuperNodeProcess",
    "flower_executable",
    "pid_alive",
    "write_app_dir",
]

ConfigValue = str | int | float | bool
"""A value Flower accepts in a node config or a run config (TOML scalars)."""

_CONNECTION = "privfl-local"
_NODE_ID_RE = re.compile(r"SuperNode ID: (\d+)")
_RUN_ID_RE = re.compile(r"Successfully started run (\d+)")
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
_LOG_TAIL_CHARS = 2000


def flower_executable(name: str) -> Path:
    """The path of a Flower console script installed next to the running interpreter.

    Args:
        name: ``"flower-superlink"``, ``"flower-supernode"``, ``"flwr"`` and so on.

    Returns:
        The executable's path in ``sys.executable``'s directory, so a venv works without activation.

    Raises:
        ImportError: If it is not there (Flower is not installed in this environment).
    """
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise ImportError(f"{name} not found next to {sys.executable}; install Flower with: pip install 'privfl[flower]'")
    return path


# --- process bookkeeping ---------------------------------------------------------------------------


def _proc_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time in clock ticks) of a process from /proc, or None if it is gone."""
    fields = _proc_fields(pid)
    return None if fields is None else (fields[0], int(fields[1]), int(fields[19]))


def _group_members(pgids: Collection[int]) -> list[int]:
    """The live processes (not zombies) whose process group is one of ``pgids``, found through /proc."""
    found = []
    for entry in os.listdir("/proc") if pgids and os.path.isdir("/proc") else ():
        if entry.isdigit():
            fields = _proc_fields(int(entry))
            if fields is not None and fields[0] not in ("Z", "X") and int(fields[2]) in pgids:
                found.append(int(entry))
    return found


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an exited process nobody has reaped yet).

    Args:
        pid: The process id.

    Returns:
        True if the process runs (or sleeps, or is stopped); False if it is gone or a zombie.
    """
    if os.path.isdir("/proc"):
        stat = _proc_stat(pid)
        return stat is not None and stat[0] not in ("Z", "X")
    try:  # no /proc (not Linux): signal 0 tells whether the pid exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        stat = _proc_stat(int(entry))
        if stat is not None:
            children.setdefault(stat[1], []).append(int(entry))
    return children


def _descendants(roots: Sequence[int]) -> list[int]:
    """All live descendants of ``roots`` (not the roots themselves), found through /proc."""
    children = _children_map()
    found: list[int] = []
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.append(child)
                stack.append(child)
    return found


@dataclass(slots=True)
class _Tracked:
    """Every process this deployment started or saw descend from one, keyed by pid with start time.

    The start time guards against signalling an unrelated process that reused a pid.
    """

    procs: dict[int, int] = field(default_factory=dict)
    # Each tracked process's process group when it was last seen alive.
    groups: dict[int, int] = field(default_factory=dict)
    # The tracked processes seen leading their own process group (pid -> start time).
    leaders: dict[int, int] = field(default_factory=dict)

    def add(self, pid: int) -> None:
        fields = _proc_fields(pid)
        if fields is None:
            return
        start = int(fields[19])
        if self.procs.setdefault(pid, start) != start:
            return  # the pid now names another process than the one tracked
        if fields[0] not in ("Z", "X"):
            self.groups[pid] = int(fields[2])
            if int(fields[2]) == pid:  # (a warm child calls setsid just after its fork: seen again, it leads)
                self.leaders[pid] = start

    def same_process(self, pid: int) -> bool:
        stat = _proc_stat(pid)
        return stat is not None and self.procs.get(pid) == stat[2] and stat[0] not in ("Z", "X")

    def _group_is_ours(self, pgid: int) -> bool:
        """Whether process group ``pgid`` is provably still the one a tracked leader started.

        It is while its leader runs, and after the leader has ended while a tracked process that was
        in it still runs: the group has not been empty since, so its number cannot have been reused
        (a pid stays taken while it names a live process group). A group seen with neither is
        forgotten: once empty, its number may name a stranger's group (a new process given that pid
        that starts its own session).
        """
        if pgid not in self.leaders:
            return False
        if self.same_process(pgid) or any(
            group == pgid and self.same_process(pid) for pid, group in self.groups.items() if pid != pgid
        ):
            return True
        del self.leaders[pgid]
        return False

    def refresh(self) -> None:
        """Looks at every tracked process again: its group now, and whether it has come to lead one."""
        for pid in list(self.procs):
            if self.same_process(pid):
                self.add(pid)

    def orphans(self) -> list[int]:
        """Live processes in a tracked leader's group, also those whose parent has ended (and which
        therefore no longer descend from anything tracked)."""
        return _group_members([pgid for pgid in list(self.leaders) if self._group_is_ours(pgid)])

    def signal(self, pid: int, sig: int) -> None:
        """Signals ``pid``, and its whole process group when it leads one (a process forked by the warm
        launcher starts its own session: a child it forks just before the signal is in that group).
        The group is signalled also after its leader has ended, while it provably is the same group
        (`_group_is_ours`): what the leader left behind in it (e.g. a task its executor forked as the
        executor was stopped) is in that group, not under it."""
        if self.same_process(pid):
            self.add(pid)  # it may have started its own group since it was first seen
        group = self._group_is_ours(pid)  # decided before the signal can end the leader
        if self.same_process(pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if group:
            _signal_group(pid, sig)


# The commands the SuperLink starts by name that a warm deployment forks instead: (command, target, process name).
_WARM_COMMANDS = (
    ("flower-superexec", SUPEREXEC_TARGET, "privfl-sexec"),
    ("flwr-serverapp", SERVERAPP_TARGET, "privfl-server"),
)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _log_tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return text[-_LOG_TAIL_CHARS:]


# --- app directory ---------------------------------------------------------------------------------


def _toml_value(key: str, value: ConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(key, value, "must be a finite number")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid TOML basic string
    raise ConfigError(key, value, "must be a str, int, float or bool")


def _check_key(key: str, what: str) -> None:
    if not _KEY_RE.match(key):
        raise ConfigError(what, key, "keys are letters, digits, '_' and '-' (not leading '-')")


def _kv_args(config: Mapping[str, ConfigValue], what: str) -> str:
    """Flower's ``key=value key2=value2`` argument form, values written as TOML."""
    parts = []
    for key, value in config.items():
        _check_key(key, what)
        parts.append(f"{key}={_toml_value(key, value)}")
    return " ".join(parts)


def write_app_dir(
    directory: str | os.PathLike[str],
    *,
    serverapp: str,
    clientapp: str,
    run_config: Mapping[str, ConfigValue] | None = None,
    name: str = "privfl-app",
    version: str = "1.0.0",
    publisher: str = "privfl",
    modules: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Write a Flower app directory: a pyproject.toml naming the components, plus optional modules.

    The components may live in an installed package (``"privfl.flower.apps:server_app"``): then the
    directory holds only pyproject.toml, and every Flower process imports the package from the
    environment it runs in. Modules listed in ``modules`` are copied in and travel in the FAB.

    Args:
        directory: The app directory (created if missing; pyproject.toml is replaced).
        serverapp: ``"module:attribute"`` of the ``ServerApp``.
        clientapp: ``"module:attribute"`` of the ``ClientApp``.
        run_config: Defaults of the run config (``[tool.flwr.app.config]``). Only keys declared
            here can be overridden per run.
        name: Project name (lowercase letters, digits and ``-``).
        version: Project version.
        publisher: FAB publisher.
        modules: Python files to copy into the directory under their own names.

    Returns:
        The app directory.

    Raises:
        ConfigError: On a malformed component reference, name or config key/value, or a missing module.
    """
    for what, ref in (("serverapp", serverapp), ("clientapp", clientapp)):
        module, _, attr = ref.partition(":")
        if not module or not attr or not all(p.isidentifier() for p in module.split(".")) or not attr.isidentifier():
            raise ConfigError(what, ref, "must be 'package.module:attribute'")
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ConfigError("name", name, "use lowercase letters, digits and '-'")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for module_path in modules:
        src = Path(module_path)
        if not src.is_file() or src.suffix != ".py":
            raise ConfigError("modules", str(src), "must be an existing .py file")
        shutil.copyfile(src, out / src.name)
    lines = [
        "[project]",
        f"name = {json.dumps(name)}",
        f"version = {json.dumps(version)}",
        'description = "privfl on Flower"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        f"publisher = {json.dumps(publisher)}",
        "",
        "[tool.flwr.app.components]",
        f"serverapp = {json.dumps(serverapp)}",
        f"clientapp = {json.dumps(clientapp)}",
        "",
        "[tool.flwr.app.config]",
    ]
    for key, value in (run_config or {}).items():
        _check_key(key, "run_config")
        lines.append(f"{key} = {_toml_value(key, value)}")
    (out / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return out


# --- runs ------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class RunResult:
    """The outcome of one ``flwr run``.

    Attributes:
        run_id: Flower's run id, or None if the run never started.
        status: Flower's final status, e.g. ``"finished:completed"`` or ``"finished:failed"``
            (``"unknown"`` if it could not be read).
        returncode: Exit code of the ``flwr run`` command.
        output: Everything ``flwr run --stream`` printed (including the ServerApp's log).
        log_file: Where that output was written.
        seconds: Wall time from submission to the end of the stream.
    """

    run_id: int | None
    status: str
    returncode: int
    output: str
    log_file: Path
    seconds: float

    @property
    def ok(self) -> bool:
        """Whether the run finished and its ServerApp completed without error."""
        return self.returncode == 0 and self.status == "finished:completed"


@dataclass(slots=True)
class RunHandle:
    """A ``flwr run --stream`` in progress; `wait` for its `RunResult`."""

    process: subprocess.Popen[bytes]
    log_file: Path
    started: float
    _deployment: LocalDeployment

    def running(self) -> bool:
        """Whether the ``flwr run`` command (and so the run's log stream) is still going."""
        return self.process.poll() is None

    def wait(self, timeout: float) -> RunResult:
        """Wait for the run to finish and report how it ended.

        Args:
            timeout: Seconds to wait for the ``flwr run`` command.

        Returns:
            The run's result; check `RunResult.ok`.

        Raises:
            DeploymentError: If the command runs past ``timeout`` (it is killed and the run stopped).
        """
        try:
            returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._deployment._kill_tree(self.process.pid)
            self.process.wait(timeout=10)
            run_id = self._run_id()
            if run_id is not None:
                self._deployment._flwr(["stop", str(run_id), _CONNECTION], timeout=30)
            raise DeploymentError(
                f"flwr run did not finish within {timeout:g} s (run {run_id}); see {self.log_file}"
            ) from None
        seconds = time.monotonic() - self.started
        run_id = self._run_id()
        status = self._deployment.run_status(run_id) if run_id is not None else "not-started"
        return RunResult(
            run_id=run_id,
            status=status,
            returncode=returncode,
            output=self.log_file.read_text(errors="replace"),
            log_file=self.log_file,
            seconds=seconds,
        )

    def wait_completed(self, timeout: float, *, poll: float = 0.05) -> RunResult:
        """`wait`, except that a run the SuperLink reports ``finished:completed`` ends at once.

        Flower's log stream notices a finished run only at its next look (every 0.5 s) and then the
        ``flwr run`` command exits; here, once the run has completed, the command (by then a log
        streamer with nothing left to do for a completed run) is stopped, and ``returncode`` is 0.
        Any other ending (failed, stopped, no status) is waited for as `wait` does, so that the log
        of a failed run is complete.

        Raises:
            DeploymentError: As `wait`.
        """
        deadline = time.monotonic() + timeout
        while self.running():
            run_id = self._run_id()
            if run_id is not None and self._deployment.run_status(run_id) == "finished:completed":
                _signal_group(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._deployment._kill_tree(self.process.pid)
                    self.process.wait(timeout=5)
                return RunResult(
                    run_id=run_id,
                    status="finished:completed",
                    returncode=0,
                    output=self.log_file.read_text(errors="replace"),
                    log_file=self.log_file,
                    seconds=time.monotonic() - self.started,
                )
            if time.monotonic() > deadline:
                break
            time.sleep(poll)
        return self.wait(max(0.1, deadline - time.monotonic()))

    def _run_id(self) -> int | None:
        match = _RUN_ID_RE.search(self.log_file.read_text(errors="replace"))
        return int(match.group(1)) if match else None


# --- the deployment --------------------------------------------------------------------------------


@dataclass(slots=True)
class SuperNodeProcess:
    """One running SuperNode.

    Attributes:
        index: Its position in the node configs given to `LocalDeployment`.
        node_config: The node config it was started with (``context.node_config`` in its ClientApps).
        process: The ``flower-supernode`` process (leader of its own process group); a
            `privfl.flower.warm.WarmProcess` when the deployment forks its nodes warm.
        runtime_port: Its local Runtime API port.
        log_file: Its stdout and stderr (and those of its ClientApp processes).
        node_id: The node id the SuperLink gave it (None until registered).
        auth_keys: Its authentication keys when SuperNode authentication is on.
    """

    index: int
    node_config: dict[str, ConfigValue]
    process: subprocess.Popen[bytes] | WarmProcess
    runtime_port: int
    log_file: Path
    node_id: int | None = None
    auth_keys: NodeAuthKeys | None = None

    @property
    def pid(self) -> int:
        """The ``flower-supernode`` process id."""
        return self.process.pid


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1, held together so they differ from each other."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class LocalDeployment:
    """A TLS SuperLink and N SuperNodes on 127.0.0.1, as a context manager.

    Example:
        >>> with LocalDeployment(tmp_path, [{"site": "site-0"}, {"site": "site-1"}]) as dep:
        ...     app = write_app_dir(tmp_path / "app", serverapp="privfl.flower.apps:server_app",
        ...                         clientapp="privfl.flower.apps:client_app")
        ...     result = dep.run_app(app, run_config={"rounds": 3}, timeout=600)

    Layout of ``directory``: ``tls/`` (CA and server certificate), ``superlink.log``,
    ``supernode-{i}.log``, ``run-{n}.log`` (``flwr run --stream`` output), ``home/`` (one
    ``FLWR_HOME`` per process: installed FABs, the CLI connection config).

    Every process runs in its own process group. On exit (normal, exception or
    KeyboardInterrupt) every process started here and every descendant seen is sent SIGTERM, then
    SIGKILL after ``stop_grace`` seconds.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        node_configs: Sequence[Mapping[str, ConfigValue]],
        *,
        startup_timeout: float = 90.0,
        stop_grace: float = 5.0,
        node_auth: bool = False,
        extra_env: Mapping[str, str] | None = None,
        fast_nodes: bool = True,
    ) -> None:
        """Describe the deployment; nothing starts before `start` (or ``with``).

        Args:
            directory: Working directory for TLS files, logs and Flower state (created if missing).
            node_configs: One node config per SuperNode, e.g. ``{"site": "site-0", "data": "/d/0"}``;
                a ClientApp reads it as ``context.node_config``.
            startup_timeout: Seconds to wait for the SuperLink and for all nodes to register.
            stop_grace: Seconds between SIGTERM and SIGKILL on shutdown.
            node_auth: Turn on SuperNode authentication: the SuperLink runs with
                ``--enable-supernode-auth``, each node gets an ECDSA P-256 key, and each public key
                is registered with ``flwr supernode register`` before its node starts.
            extra_env: More environment variables for every process (e.g. ``PYTHONPATH``).
            fast_nodes: Start each SuperNode as ``python -m privfl.flower.node`` (Flower's SuperNode
                with 50 ms polls and ClientApp processes forked from a warm parent, see
                `privfl.flower.node`) instead of the plain ``flower-supernode``.

        Raises:
            ConfigError: If ``node_configs`` is empty, a key is malformed, or a timeout is not positive.
            ImportError: If Flower's executables are not installed next to ``sys.executable``.
        """
        if not node_configs:
            raise ConfigError("node_configs", list(node_configs), "needs at least one node")
        if startup_timeout <= 0:
            raise ConfigError("startup_timeout", startup_timeout, "must be positive")
        if stop_grace < 0:
            raise ConfigError("stop_grace", stop_grace, "must not be negative")
        self.node_configs = [dict(cfg) for cfg in node_configs]
        self._node_config_args = [_kv_args(cfg, "node_configs") for cfg in self.node_configs]
        self.directory = Path(directory).resolve()
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self.node_auth = node_auth
        self._extra_env = dict(extra_env or {})
        self.fast_nodes = fast_nodes
        self._node_keys: dict[int, NodeAuthKeys] = {}
        self._exe = {name: flower_executable(name) for name in ("flower-superlink", "flower-supernode", "flwr")}
        self.tls: TlsMaterial | None = None
        self.port: int | None = None
        self.superlink: subprocess.Popen[bytes] | None = None
        self.supernodes: list[SuperNodeProcess] = []
        self._leaders: list[subprocess.Popen[bytes]] = []
        self._tracked = _Tracked()
        self._log_handles: list[IO[bytes]] = []
        self._runs = 0
        self._ports: list[int] = []
        self._superlink_deadline = math.inf
        self._control = None  # the Control API client, made on first use (False: use the flwr CLI)
        self._warm: WarmLauncher | None = None
        self._warm_socket_dir: Path | None = None
        self._shim_dir: Path | None = None
        self._nodes_prepared = False

    # -- lifecycle ----------------------------------------------------------------------------------

    def __enter__(self) -> LocalDeployment:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """The SuperLink's address, ``127.0.0.1:PORT`` (Fleet, Control and Runtime APIs)."""
        if self.port is None:
            raise DeploymentError("the deployment has not been started")
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the SuperLink and every SuperNode; return once all nodes have registered.

        Raises:
            DeploymentError: If a process exits or the nodes do not all register within
                ``startup_timeout``; the message names the log file to read. Everything already
                started is stopped first.
        """
        if self.superlink is not None:
            raise DeploymentError("the deployment is already started")
        self._or_stop(self._start)

    def _start(self) -> None:
        self._spawn_superlink(1 + len(self.node_configs), ["--enable-supernode-auth"] if self.node_auth else [])
        self._start_nodes()
        self._wait_registered(self.supernodes, time.monotonic() + self.startup_timeout)

    def start_superlink(self) -> None:
        """Write TLS material and start the SuperLink; return at once (`start_nodes` waits for it).

        With `start_nodes` and `wait_nodes` this is `start` in three steps, so a caller can do other
        work (write data, start its own processes, submit a run) while Flower's processes boot.

        Raises:
            DeploymentError: If the deployment is already started (everything is stopped on any error).
        """
        if self.superlink is not None:
            raise DeploymentError("the deployment is already started")
        self._or_stop(lambda: self._spawn_superlink(1 + len(self.node_configs), ["--enable-supernode-auth"] if self.node_auth else []))

    def start_nodes(self) -> None:
        """Wait for the SuperLink's port, register every node key, start every SuperNode; return at once.

        Raises:
            DeploymentError: If the SuperLink did not come up or a registration failed (everything is
                stopped first).
        """
        if self.superlink is None or self.supernodes:
            raise DeploymentError("start_nodes comes once, after start_superlink")
        self._or_stop(self._start_nodes)

    def set_node_configs(self, node_configs: Sequence[Mapping[str, ConfigValue]]) -> None:
        """Replace the node configs (as many as before) until `start_nodes` starts the SuperNodes.

        Raises:
            ConfigError: If the count differs or a key is malformed.
            DeploymentError: If the SuperNodes are already started.
        """
        if self.supernodes:
            raise DeploymentError("the SuperNodes are already started with their node configs")
        if len(node_configs) != len(self.node_configs):
            raise ConfigError("node_configs", len(node_configs), f"must keep the {len(self.node_configs)} nodes given at construction")
        args = [_kv_args(cfg, "node_configs") for cfg in node_configs]
        self.node_configs = [dict(cfg) for cfg in node_configs]
        self._node_config_args = args

    def wait_nodes(self) -> None:
        """Return once every SuperNode has registered with the SuperLink.

        Raises:
            DeploymentError: If the SuperNodes are not started, or a node exits or does not register
                within ``startup_timeout`` (the deployment keeps running: stop it, or leave its ``with``).
        """
        if not self.supernodes:
            raise DeploymentError("wait_nodes comes after start_nodes")
        self._wait_registered(self.supernodes, time.monotonic() + self.startup_timeout)

    def prepare_nodes(self) -> None:
        """Wait for the SuperLink's port and register every node key (once); `start_nodes` then only
        starts the SuperNodes. Lets a caller register the keys early and start the nodes later.

        Raises:
            DeploymentError: If the SuperLink did not come up or a registration failed (everything is
                stopped first).
        """
        if self.superlink is None or self.supernodes:
            raise DeploymentError("prepare_nodes comes after start_superlink and before start_nodes")
        self._or_stop(self._prepare_nodes)

    def _or_stop(self, step: Callable[[], None]) -> None:
        """Runs one start-up step; on any error (Ctrl-C too) stops everything started so far, then re-raises."""
        try:
            step()
        except BaseException:
            self.stop()
            raise

    def _prepare_nodes(self) -> None:
        if self._nodes_prepared:
            return
        self._wait_superlink()
        if self.node_auth:  # every key registered before any node starts
            self._register_keys([self._auth_keys(index) for index in range(len(self.node_configs))])
        self._nodes_prepared = True

    def _start_nodes(self) -> None:
        self._prepare_nodes()
        indices = range(len(self.node_configs))
        for index in indices:
            self._spawn_supernode(index, self._ports[1 + index], register_key=False)

    def start_warm(self, modules: Sequence[str] = NODE_MODULES, *, serverapp: bool = False) -> WarmLauncher:
        """Start a `privfl.flower.warm.WarmLauncher` that imports ``modules`` once; return at once.

        Fast SuperNodes started after this are forked from it instead of starting a fresh interpreter
        each (the same program and arguments: ``privfl.flower.node``). A caller may fork its own
        processes from it too (`WarmLauncher.spawn`); `stop` stops the launcher and everything it forked.

        With ``serverapp``, the SuperLink's SuperExec and the ServerApp processes it starts are forked
        from it as well: the SuperLink (started after this) finds ``flower-superexec`` and
        ``flwr-serverapp`` scripts first on its PATH that hand their arguments, environment and
        standard streams to the launcher over a Unix socket (owner-only, in a private temporary
        directory) and run Flower's real commands if the launcher cannot be reached
        (`privfl.flower.warm.forward_to_launcher`). Call it before `start_superlink`.

        Raises:
            DeploymentError: If a launcher is already running, or ``serverapp`` after the SuperLink started.
        """
        if self._warm is not None:
            raise DeploymentError("the deployment already has a warm launcher")
        if serverapp and self.superlink is not None:
            raise DeploymentError("start_warm(serverapp=True) comes before start_superlink")
        self.directory.mkdir(parents=True, exist_ok=True)
        listen = None
        if serverapp:
            import tempfile

            # A short path (AF_UNIX paths are at most 107 bytes), in a directory only this user can enter.
            self._warm_socket_dir = Path(tempfile.mkdtemp(prefix="privfl-warm-"))
            listen = self._warm_socket_dir / "s"
            shim_dir = self.directory / "shim"
            shim_dir.mkdir(parents=True, exist_ok=True)
            for command, target, name in _WARM_COMMANDS:
                shim = shim_dir / command
                shim.write_text(
                    f"#!{sys.executable}\n"
                    f"# privfl deploy local: Flower's {command}, forked from the deployment's warm launcher.\n"
                    "from privfl.flower.warm import forward_to_launcher\n\n"
                    f"forward_to_launcher({str(listen)!r}, {target!r}, {str(flower_executable(command))!r}, name={name!r})\n"
                )
                shim.chmod(0o755)
            self._shim_dir = shim_dir
            modules = (*modules, *(m for m in (*SERVERAPP_MODULES, *SUPEREXEC_MODULES) if m not in modules))
        self._warm = WarmLauncher(modules, log_file=self.directory / "warm.log", env=self._env("warm"),
                                  start_timeout=self.startup_timeout, listen=listen,
                                  allow=tuple(target for _, target, _ in _WARM_COMMANDS) if serverapp else ())  # fmt: skip
        self._leaders.append(self._warm.process)  # type: ignore[arg-type]
        self._tracked.add(self._warm.process.pid)
        return self._warm

    def _auth_keys(self, index: int) -> NodeAuthKeys:
        """Node ``index``'s key pair, made on first use."""
        if index not in self._node_keys:
            self._node_keys[index] = generate_node_auth_keys(self.directory / "node-keys", f"node-{index}")
        return self._node_keys[index]

    def _control_client(self):
        """This process's Control API connection to the SuperLink (None: use the ``flwr`` commands)."""
        if self.superlink is None or self.superlink.poll() is not None:
            return None  # nothing to talk to (not started, or stopped)
        if self._control is None and self.tls is not None:
            from privfl.flower.control import control_client

            self._control = control_client(self.address, self.tls.ca_cert) or False
        return self._control or None

    def _register_keys(self, keys: Sequence[NodeAuthKeys], timeout: float = 60.0) -> None:
        """Register each public key: over this process's Control API connection where the installed
        Flower is the supported version, else with one ``flwr supernode register`` process per key."""
        client = self._control_client()
        if client is not None:
            client.register_nodes([key.public_key for key in keys])
            return
        procs = [
            subprocess.Popen(
                [str(self._exe["flwr"]), "supernode", "register", str(key.public_key), _CONNECTION],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self._env("cli"), cwd=self.directory,
            )
            for key in keys
        ]  # fmt: skip
        deadline = time.monotonic() + timeout
        failures = []
        try:
            for key, proc in zip(keys, procs, strict=True):
                try:
                    out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    failures.append(f"{key.public_key.name}: no answer within {timeout:g} s")
                    continue
                if proc.returncode != 0:
                    failures.append(f"{key.public_key.name} ({proc.returncode}): {out.decode(errors='replace').strip()}")
        finally:  # none outlives this call, also on an error or Ctrl-C
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if failures:
            raise DeploymentError("flwr supernode register failed: " + "; ".join(failures))

    def _spawn_supernode(self, index: int, port: int, *, register_key: bool) -> SuperNodeProcess:
        tls = self.tls
        assert tls is not None
        launcher = [sys.executable, "-m", "privfl.flower.node"] if self.fast_nodes else [str(self._exe["flower-supernode"])]
        cmd = [
            *launcher,
            "--superlink", self.address,
            "--root-certificates", str(tls.ca_cert),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--max-retries", "10",
        ]  # fmt: skip
        if self._node_config_args[index]:
            cmd += ["--node-config", self._node_config_args[index]]
        keys = None
        if self.node_auth:
            keys = self._auth_keys(index)
            if register_key:
                self._register_keys([keys])
            cmd += ["--auth-supernode-private-key", str(keys.private_key)]
        log_file = self.directory / f"supernode-{index}.log"
        process: subprocess.Popen[bytes] | WarmProcess
        if self.fast_nodes and self._warm is not None:
            process = self._warm.spawn("privfl.flower.node:main", cmd[len(launcher):], log_file=log_file,
                                       env=self._env(f"node-{index}"), cwd=self.directory, name="privfl-node")  # fmt: skip
            self._tracked.add(process.pid)
        else:
            process = self._spawn(cmd, f"node-{index}", log_file)
        node = SuperNodeProcess(
            index=index,
            node_config=self.node_configs[index],
            process=process,
            runtime_port=port,
            log_file=log_file,
            auth_keys=keys,
        )
        self.supernodes.append(node)
        return node

    def add_supernode(
        self, node_config: Mapping[str, ConfigValue], *, register_key: bool = True, wait: bool = True
    ) -> SuperNodeProcess:
        """Start one more SuperNode while the deployment runs (a late joiner).

        Args:
            node_config: Its node config.
            register_key: With SuperNode authentication on, register its public key first;
                False starts a node the SuperLink must refuse (for tests).
            wait: Return only once it has registered (raises if it exits first).

        Returns:
            The new node; ``index`` is its position in `supernodes`.

        Raises:
            DeploymentError: If the deployment is not running, or ``wait`` and the node exits or does not
                register within ``startup_timeout``.
        """
        if self.superlink is None or self.superlink.poll() is not None:
            raise DeploymentError("the deployment is not running")
        index = len(self.node_configs)
        self.node_configs.append(dict(node_config))
        self._node_config_args.append(_kv_args(node_config, "node_config"))
        node = self._spawn_supernode(index, _free_ports(1)[0], register_key=register_key)
        if wait:
            self._wait_registered([node], time.monotonic() + self.startup_timeout)
        return node

    def _spawn_superlink(self, num_ports: int, extra_args: list[str]) -> None:
        """Write TLS material and the CLI connection, start the SuperLink (`_wait_superlink` waits for it).

        Sets ``_ports``: ``num_ports`` free loopback ports; the first is the SuperLink's.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self.tls = tls = generate_tls_material(self.directory / "tls")
        self._ports = ports = _free_ports(num_ports)
        self.port = ports[0]
        self._write_cli_config()
        cmd = [
            str(self._exe["flower-superlink"]),
            "--ssl-ca-certfile", str(tls.ca_cert),
            "--ssl-certfile", str(tls.server_cert),
            "--ssl-keyfile", str(tls.server_key),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--disable-runtime-dependency-installation",
            *extra_args,
        ]  # fmt: skip
        self.superlink = self._spawn(cmd, "superlink", self.directory / "superlink.log")
        self._superlink_deadline = time.monotonic() + self.startup_timeout

    def _wait_superlink(self) -> None:
        log_file = self.directory / "superlink.log"
        deadline = self._superlink_deadline
        assert self.port is not None
        while not _port_open(self.port):
            self._check_alive(self.superlink, log_file, "flower-superlink")
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"flower-superlink did not open 127.0.0.1:{self.port} within {self.startup_timeout:g} s; "
                    f"see {log_file}"
                )
            time.sleep(0.1)

    def _wait_registered(self, nodes: Sequence[SuperNodeProcess], deadline: float) -> None:
        while True:
            self._track_descendants()
            self._check_alive(self.superlink, self.directory / "superlink.log", "flower-superlink")
            pending = []
            for node in nodes:
                if node.node_id is None:
                    match = _NODE_ID_RE.search(node.log_file.read_text(errors="replace"))
                    if match:
                        node.node_id = int(match.group(1))
                if node.node_id is None:
                    self._check_alive(node.process, node.log_file, f"flower-supernode {node.index}")
                    pending.append(node.index)
            if not pending:
                return
            if time.monotonic() > deadline:
                logs = ", ".join(str(self.supernodes[i].log_file) for i in pending)
                raise DeploymentError(
                    f"SuperNodes {pending} did not register within {self.startup_timeout:g} s; see {logs}"
                )
            time.sleep(0.3)

    def stop(self) -> None:
        """Stop every process this deployment started, and their descendants.

        SIGTERM to each process group and each tracked descendant, then SIGKILL to whatever is
        left after ``stop_grace`` seconds. Safe to call twice. A KeyboardInterrupt during the grace
        period skips straight to SIGKILL.
        """
        try:
            if self._control:  # the SuperLink's graceful shutdown waits for open connections
                self._control.close()
            self._control = None
            self._track_descendants()
            for proc in self._leaders:
                _signal_group(proc.pid, signal.SIGTERM)
            for pid in list(self._tracked.procs):
                self._tracked.signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_grace
            try:
                while time.monotonic() < deadline and self._anything_alive():
                    self._track_descendants()
                    time.sleep(0.05)
            except KeyboardInterrupt:
                pass
        finally:
            self._track_descendants()
            for proc in self._leaders:
                _signal_group(proc.pid, signal.SIGKILL)
            for pid in list(self._tracked.procs):
                self._tracked.signal(pid, signal.SIGKILL)
            for proc in self._leaders:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            for handle in self._log_handles:
                handle.close()
            self._log_handles.clear()
            if self._warm is not None:
                self._warm.close(grace=0.5)
            if self._warm_socket_dir is not None:
                shutil.rmtree(self._warm_socket_dir, ignore_errors=True)

    def started_pids(self) -> list[int]:
        """Every pid this deployment started or saw descend from one (for leak checks)."""
        self._track_descendants()
        return sorted(self._tracked.procs)

    def kill_supernode(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Kill one SuperNode (its process group and descendants), e.g. to test dropouts mid-run.

        With SIGKILL the node stays registered at the SuperLink until its heartbeat times out;
        with SIGTERM it deregisters on the way out.

        Args:
            index: The node's position in ``node_configs``.
            sig: The signal to send.

        Raises:
            ConfigError: If ``index`` names no node.
        """
        if not 0 <= index < len(self.supernodes):
            raise ConfigError("index", index, f"must be in [0, {len(self.supernodes)})")
        node = self.supernodes[index]
        self._track_descendants()
        descendants = _descendants([node.pid])
        _signal_group(node.pid, sig)
        for pid in descendants:
            self._tracked.signal(pid, sig)
        try:
            node.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._kill_tree(node.pid)
            node.process.wait(timeout=5)

    # -- runs ---------------------------------------------------------------------------------------

    def start_run(
        self, app_dir: str | os.PathLike[str], *, run_config: Mapping[str, ConfigValue] | None = None
    ) -> RunHandle:
        """Submit an app directory with ``flwr run --stream`` and return at once.

        Args:
            app_dir: A directory with the app's pyproject.toml (see `write_app_dir`).
            run_config: Overrides of keys declared in the app's ``[tool.flwr.app.config]``.

        Returns:
            A handle to `RunHandle.wait` on.

        Raises:
            DeploymentError: If the deployment is not running.
        """
        if self.superlink is None or self.superlink.poll() is not None:
            raise DeploymentError("the deployment is not running")
        self._runs += 1
        log_file = self.directory / f"run-{self._runs}.log"
        cmd = [str(self._exe["flwr"]), "run", str(Path(app_dir).resolve()), _CONNECTION, "--stream"]
        if run_config:
            cmd += ["--run-config", _kv_args(run_config, "run_config")]
        cmd += self._run_extra_args()
        proc = self._spawn(cmd, "cli", log_file)
        return RunHandle(process=proc, log_file=log_file, started=time.monotonic(), _deployment=self)

    def run_app(
        self,
        app_dir: str | os.PathLike[str],
        *,
        run_config: Mapping[str, ConfigValue] | None = None,
        timeout: float = 600.0,
    ) -> RunResult:
        """Run an app to completion: `start_run` then `RunHandle.wait`.

        Args:
            app_dir: A directory with the app's pyproject.toml.
            run_config: Overrides of the app's run config.
            timeout: Seconds to wait for the run.

        Returns:
            The run's result; check `RunResult.ok`.

        Raises:
            DeploymentError: If the deployment is not running or the run exceeds ``timeout``.
        """
        return self.start_run(app_dir, run_config=run_config).wait(timeout)

    def run_status(self, run_id: int) -> str:
        """Flower's status of a run, e.g. ``"running"``, ``"finished:completed"``, ``"finished:failed"``.

        Args:
            run_id: The run id.

        Returns:
            The status, or ``"unknown"`` if the SuperLink could not be asked.
        """
        client = self._control_client()
        if client is not None:
            return client.run_status(run_id)
        proc = self._flwr(["ls", _CONNECTION, "--run-id", str(run_id), "--format", "json"], timeout=60)
        try:
            runs = json.loads(proc.stdout)["runs"]
            return str(runs[0]["status"])
        except (ValueError, KeyError, IndexError, TypeError):
            return "unknown"

    # -- internals ----------------------------------------------------------------------------------

    def _run_extra_args(self) -> list[str]:
        return []

    def _env(self, role: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self._extra_env)
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        if role == "superlink" and self._shim_dir is not None:  # it and its SuperExec find the warm commands first
            env["PATH"] = str(self._shim_dir) + os.pathsep + env["PATH"]
        home = self.directory / "home" / role
        home.mkdir(parents=True, exist_ok=True)
        env["FLWR_HOME"] = str(home)
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env["FLWR_TELEMETRY_ENABLED"] = "0"
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # no `uv sync`, no network
        env["PYTHONUNBUFFERED"] = "1"
        env["NO_COLOR"] = "1"
        # SuperExec looks for a new task (a ClientApp or ServerApp to start) once a second by default.
        # A plain SuperNode starts a ClientApp per message through it (a privfl round is several
        # message exchanges, each waiting on that poll); the SuperLink's starts one ServerApp per run.
        # (A fast node runs no SuperExec: its own executor, privfl.flower.node, is woken, not polled.)
        # A ServerApp forked from the warm launcher waits for the launcher's imports anyway, which
        # take longer than Flower's own 1 s poll; there the SuperExec polls at its default, for less CPU.
        superlink_poll = "1.0" if self._shim_dir is not None else "0.25"
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", superlink_poll if role == "superlink" else "0.05")
        return env

    def _write_cli_config(self) -> None:
        assert self.tls is not None
        home = self.directory / "home" / "cli"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            "[superlink]\n"
            f'default = "{_CONNECTION}"\n\n'
            f"[superlink.{_CONNECTION}]\n"
            f"address = {json.dumps(self.address)}\n"
            f"root-certificates = {json.dumps(str(self.tls.ca_cert))}\n"
        )

    def _spawn(self, cmd: list[str], role: str, log_file: Path) -> subprocess.Popen[bytes]:
        handle = open(log_file, "ab")  # closed in stop()
        self._log_handles.append(handle)
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=self._env(role),
            cwd=self.directory,
            start_new_session=True,  # own session and process group: killpg reaches its children
        )
        self._leaders.append(proc)
        self._tracked.add(proc.pid)
        return proc

    def _flwr(self, args: list[str], *, timeout: float, check: bool = False) -> subprocess.CompletedProcess[str]:
        try:
            proc = subprocess.run(
                [str(self._exe["flwr"]), *args],
                capture_output=True,
                text=True,
                env=self._env("cli"),
                cwd=self.directory,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as err:
            raise DeploymentError(f"flwr {' '.join(args)} did not finish within {timeout:g} s") from err
        if check and proc.returncode != 0:
            raise DeploymentError(f"flwr {' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def _check_alive(self, proc: subprocess.Popen[bytes] | WarmProcess | None, log_file: Path, what: str) -> None:
        if proc is not None and proc.poll() is not None:
            raise DeploymentError(
                f"{what} exited with code {proc.returncode}; see {log_file}:\n{_log_tail(log_file)}"
            )

    def _track_descendants(self) -> None:
        self._tracked.refresh()
        roots = [p.pid for p in self._leaders if p.poll() is None]
        roots += [pid for pid in self._tracked.procs if self._tracked.same_process(pid)]
        for pid in _descendants(roots) + self._tracked.orphans():
            self._tracked.add(pid)

    def _anything_alive(self) -> bool:
        if any(p.poll() is None for p in self._leaders):
            return True
        return any(self._tracked.same_process(pid) for pid in self._tracked.procs)

    def _kill_tree(self, pid: int) -> None:
        for child in _descendants([pid]):
            self._tracked.add(child)
            self._tracked.signal(child, signal.SIGKILL)
        _signal_group(pid, signal.SIGKILL)


class LocalSimulation(LocalDeployment):
    """A SuperLink in simulation mode on 127.0.0.1 (TLS): ``flwr run`` executes apps in Flower's Simulation Engine.

    The ClientApps run as ``num_supernodes`` virtual nodes inside one ``flwr-simulation`` process
    (Ray actors), not as SuperNode processes; each node's ``context.node_config`` holds only
    ``partition-id`` and ``num-partitions``, so per-site settings must reach the app another way
    (e.g. a run-config entry the ClientApp indexes by ``partition-id``). Needs Ray:
    ``pip install "flwr[simulation]==1.42.0"``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        num_supernodes: int,
        *,
        federation_config: Mapping[str, ConfigValue] | None = None,
        startup_timeout: float = 90.0,
        stop_grace: float = 5.0,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        """Describe the simulation; nothing starts before `start` (or ``with``).

        Args:
            directory: Working directory for TLS files, logs and Flower state.
            num_supernodes: How many virtual SuperNodes each run gets.
            federation_config: More ``flwr run --federation-config`` entries, e.g.
                ``{"client-resources-num-cpus": 1, "init-args-num-cpus": 2}``.
            startup_timeout: Seconds to wait for the SuperLink.
            stop_grace: Seconds between SIGTERM and SIGKILL on shutdown.
            extra_env: More environment variables for every process.

        Raises:
            ConfigError: If ``num_supernodes`` is below 1 or a key is malformed.
            ImportError: If Flower's executables are not installed next to ``sys.executable``.
        """
        if num_supernodes < 1:
            raise ConfigError("num_supernodes", num_supernodes, "must be at least 1")
        super().__init__(
            directory,
            [{}],
            startup_timeout=startup_timeout,
            stop_grace=stop_grace,
            extra_env=extra_env,
        )
        self.node_configs = []
        self._node_config_args = []
        self.num_supernodes = num_supernodes
        self._federation_args = _kv_args({"num-supernodes": num_supernodes, **(federation_config or {})}, "federation_config")

    def _start(self) -> None:
        self._spawn_superlink(1, ["--simulation"])
        self._wait_superlink()

    def start_superlink(self) -> None:
        """Not for simulations: `start` (or ``with``) starts the SuperLink in simulation mode."""
        raise DeploymentError("a simulation starts with start() (or with LocalSimulation(...) as sim)")

    def start_nodes(self) -> None:
        """Not for simulations: their nodes are virtual."""
        raise DeploymentError("a simulation has no SuperNodes to start")

    def _run_extra_args(self) -> list[str]:
        return ["--federation-config", self._federation_args]
