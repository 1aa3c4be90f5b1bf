"""Warm starts: a local deployment's long-lived processes forked from one that imported their code once.

``privfl deploy local`` runs, per site, a site worker (torch, Opacus, TenSEAL) and a SuperNode
(Flower), each its own process. Started as fresh interpreters, every one of them imports the same
modules again: about 2.5 s of CPU per site worker and 1-1.5 s per SuperNode, which on a small
machine is most of a deployment's start-up. `WarmLauncher` starts one process
(``python -m privfl.flower.warm MODULE...``) that imports those modules and then only waits for
requests; each request forks one child that:

- starts a new session (its own process group, no controlling terminal), as
  ``subprocess.Popen(start_new_session=True)`` would;
- reads ``/dev/null`` and writes its stdout and stderr to its own log file;
- takes the environment and working directory given in the request;
- runs ``module:function(argv)`` (e.g. ``privfl.flower.worker:main``) as ``python -m module argv``
  would, and exits with its status.

What a child inherits from the launcher is imported code and nothing else: the launcher reads no
site's data, keys or configuration. Random state: privfl draws keys and noise seeds from
``os.urandom`` / ``secrets`` when it needs them, in the child; Python's ``random`` reseeds itself in
a forked child; the launcher makes no numpy or torch generator. The children are separate
processes from the fork on (copy-on-write memory), so one site cannot read another's state.

The launcher reaps its children and reports each exit status to the process that started it; a
`WarmProcess` answers ``pid``, ``poll``, ``wait``, ``returncode``, ``send_signal``, ``terminate``
and ``kill`` as a ``subprocess.Popen`` does. A launcher whose parent goes away (its stdin closes)
exits; its children run on until stopped, as separately started processes would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from privfl.errors import DeploymentError

__all__ = ["NODE_MODULES", "WORKER_MODULES", "WarmLauncher", "WarmProcess", "main", "set_process_name"]

# What a site worker imports (privfl.flower.worker.main and the Site it builds; what its first
# training imports is `privfl.site.TRAIN_MODULES`, which `privfl deploy local` preloads too).
WORKER_MODULES = ("torch", "opacus", "tenseal", "privfl.site", "privfl.flower.worker")
# What privfl's SuperNode (privfl.flower.node) and its ClientApp executor import.
NODE_MODULES = (
    "flwr.supernode.start_client_internal",
    "flwr.supernode.cli.flower_supernode",
    "flwr.supernode.runtime.run_clientapp",
    "privfl.flower.node",
    "privfl.flower.apps",
)


def set_process_name(name: str) -> None:
    """Names this process in ``ps`` / ``top`` (Linux: ``/proc/self/comm``, at most 15 bytes); no-op elsewhere.

    A forked process keeps its parent's command line; the name tells the pieces of a deployment apart.
    """
    try:
        with open("/proc/self/comm", "w") as handle:
            handle.write(name[:15])
    except OSError:
        pass


class WarmProcess:
    """A child of a `WarmLauncher`, with the parts of ``subprocess.Popen``'s interface a deployment uses."""

    def __init__(self, launcher: WarmLauncher, pid: int, args: list[str]) -> None:
        self._launcher = launcher
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit status once the process has ended (negative: the signal that ended it), else None."""
        if self.returncode is None:
            self.returncode = self._launcher._status(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Waits for the process to end and returns its status.

        Raises:
            subprocess.TimeoutExpired: still running after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signals the process if it has not ended (a reaped pid is never signalled)."""
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"WarmProcess(pid={self.pid}, returncode={self.returncode})"


class WarmLauncher:
    """One process that imports ``modules`` once and forks a child per `spawn` (see the module docstring).

    Args:
        modules: Modules the launcher imports before it takes requests.
        log_file: Where the launcher's own output goes (its children write to their own logs).
        env: The launcher's environment (each child gets its own in `spawn`).
        start_timeout: Seconds `spawn` waits for the launcher to finish its imports and answer.

    The launcher is a ``subprocess.Popen`` in its own session (``process``); stop it with `close`,
    or let whoever stops the deployment signal it: its children are not in its process group.
    """

    def __init__(
        self,
        modules: Sequence[str],
        *,
        log_file: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        start_timeout: float = 180.0,
    ) -> None:
        for module in modules:
            if not all(part.isidentifier() for part in module.split(".")):
                raise DeploymentError(f"not a module name: {module!r}")
        self.start_timeout = start_timeout
        self.log_file = Path(log_file)
        self._log = open(self.log_file, "ab")  # closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "privfl.flower.warm", *modules],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._replies: list[dict] = []
        self._exits: dict[int, int] = {}
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="privfl-warm-launcher", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                if "exit" in message:
                    self._exits[int(message["exit"])] = int(message["code"])
                else:
                    self._replies.append(message)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _status(self, pid: int) -> int | None:
        with self._lock:
            if pid in self._exits:
                return self._exits[pid]
            closed = self._closed
        if closed:  # the launcher is gone: it can no longer report; look at the process itself
            from privfl.flower.deploy import pid_alive

            return None if pid_alive(pid) else -signal.SIGKILL
        return None

    def spawn(
        self,
        target: str,
        argv: Sequence[str],
        *,
        log_file: str | os.PathLike[str],
        env: Mapping[str, str],
        cwd: str | os.PathLike[str] | None = None,
        name: str | None = None,
    ) -> WarmProcess:
        """Forks a child that runs ``target`` (``"module:function"``) with ``argv``; returns once it exists.

        ``name`` is the child's process name (`set_process_name`; default: the target's module).

        Raises:
            DeploymentError: the launcher exited, refused the request, or did not answer in time.
        """
        request = {"target": target, "argv": list(argv), "log": str(Path(log_file).resolve()),
                   "env": dict(env), "cwd": None if cwd is None else str(cwd),
                   "name": name or target.partition(":")[0].rsplit(".", 1)[-1]}  # fmt: skip
        deadline = time.monotonic() + self.start_timeout
        with self._cond:
            if self._closed or self.process.stdin is None:
                raise DeploymentError(f"the warm launcher has exited; see {self.log_file}")
            try:
                self.process.stdin.write((json.dumps(request) + "\n").encode())
                self.process.stdin.flush()
            except OSError as exc:
                raise DeploymentError(f"the warm launcher has exited; see {self.log_file}") from exc
            while not self._replies:
                if self._closed:
                    raise DeploymentError(f"the warm launcher has exited; see {self.log_file}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeploymentError(f"the warm launcher did not answer within {self.start_timeout:g} s; see {self.log_file}")
                self._cond.wait(remaining)
            reply = self._replies.pop(0)
        if "pid" not in reply:
            raise DeploymentError(f"the warm launcher could not start {target}: {reply.get('error', reply)}")
        return WarmProcess(self, int(reply["pid"]), [target, *argv])

    def close(self, grace: float = 5.0) -> None:
        """Stops the launcher (its children run on: stop them first). Safe to call twice."""
        if self.process.poll() is None:
            try:
                if self.process.stdin is not None:
                    self.process.stdin.close()  # the launcher exits when its stdin closes
            except OSError:
                pass
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._reader.join(timeout=5)
        self._log.close()


# --- the launcher process ---------------------------------------------------------------------------


def _child(request: dict, ready_fd: int, keep: Sequence[int]) -> None:
    """In the forked child: become the requested process; never returns."""
    code = 1
    try:
        os.setsid()
        set_process_name(str(request.get("name") or "privfl"))
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for fd in keep:
            if fd > 2:  # 0, 1 and 2 are replaced below
                os.close(fd)
        log_fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.close(null_fd)
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(write_through=True)  # type: ignore[union-attr]
        os.environ.clear()
        os.environ.update(request["env"])
        if request.get("cwd"):
            os.chdir(request["cwd"])
        module_name, _, function = request["target"].partition(":")
        sys.argv = [module_name, *request["argv"]]
        os.write(ready_fd, b"1")
        os.close(ready_fd)
        import importlib

        result = getattr(importlib.import_module(module_name), function)(list(request["argv"]))
        code = result if isinstance(result, int) else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            import atexit

            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _status_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def main(argv: Sequence[str] | None = None) -> int:
    """The launcher: ``python -m privfl.flower.warm MODULE...`` (requests on stdin, one JSON line each)."""
    import importlib
    import selectors

    modules = list(sys.argv[1:] if argv is None else argv)
    set_process_name("privfl-warm")
    for module in modules:
        importlib.import_module(module)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    # Nothing the launcher prints may reach the pipe its parent reads replies from.
    os.dup2(2, 1)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    os.set_blocking(wake_read, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    stdin_fd = sys.stdin.fileno()
    selector = selectors.DefaultSelector()
    selector.register(stdin_fd, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    pending = b""
    children: set[int] = set()

    def reap() -> None:
        for pid in list(children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                children.discard(pid)
                out.write(json.dumps({"exit": pid, "code": _status_code(status)}) + "\n")

    open_input = True
    while open_input:
        for key, _ in selector.select(timeout=1.0):
            if key.fd == wake_read:
                try:
                    os.read(wake_read, 4096)
                except BlockingIOError:
                    pass
                continue
            chunk = os.read(stdin_fd, 65536)
            if not chunk:
                open_input = False
                break
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                try:
                    request = json.loads(line)
                    if not isinstance(request.get("target"), str) or ":" not in request["target"]:
                        raise ValueError("target must be 'module:function'")
                    if not isinstance(request.get("argv"), list) or not isinstance(request.get("env"), dict):
                        raise ValueError("argv must be a list and env a mapping")
                except ValueError as exc:
                    out.write(json.dumps({"error": str(exc)}) + "\n")
                    continue
                ready_read, ready_write = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(ready_read)
                    _child(request, ready_write, (stdin_fd, wake_read, wake_write, out.fileno()))
                os.close(ready_write)
                started = os.read(ready_read, 1)  # the child has its session, log and environment
                os.close(ready_read)
                children.add(pid)
                if started:
                    out.write(json.dumps({"pid": pid}) + "\n")
                else:
                    out.write(json.dumps({"error": f"the child exited while starting; see {request.get('log')}"}) + "\n")
        reap()
    reap()
    return 0


if __name__ == "__main__":
    sys.exit(main())
