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
  would (a function without parameters reads ``sys.argv``, as a console script does), and exits
  with its status.

Processes that another program starts by name (the SuperLink starts ``flower-superexec``, which
starts ``flwr-serverapp``) reach the launcher through `forward_to_launcher`: a script of that name
first on the program's PATH passes its arguments, environment and standard streams over a Unix
socket (``--listen``; only the ``--allow`` targets), and the child uses those streams instead.

What a child inherits from the launcher is imported code and nothing else: the launcher reads no
site's data, keys or configuration and draws no random number. privfl draws keys and noise seeds
from ``os.urandom`` / ``secrets`` when it needs them, in the child; Python's ``random`` reseeds
itself in a forked child; numpy's global generator (seeded at import) is the same in every child,
and privfl draws nothing secret from it. The children are separate processes from the fork on
(copy-on-write memory), so one site cannot read another's state.

The launcher reaps its children and reports each exit status to the process that started it; a
`WarmProcess` answers ``pid``, ``poll``, ``wait``, ``returncode``, ``send_signal``, ``terminate``
and ``kill`` as a ``subprocess.Popen`` does. A launcher whose parent goes away (its stdin closes)
exits; its children run on until stopped, as separately started processes would.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from privfl.errors import DeploymentError

__all__ = [
    "NODE_MODULES",
    "SERVERAPP_MODULES",
    "SERVERAPP_TARGET",
    "SUPEREXEC_MODULES",
    "SUPEREXEC_TARGET",
    "WORKER_MODULES",
    "WarmLauncher",
    "WarmProcess",
    "die_with_parent",
    "forward_to_launcher",
    "main",
    "set_process_name",
]

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


def die_with_parent(parent_pid: int | None, sig: int = signal.SIGKILL) -> bool:
    """Has the kernel send ``sig`` to this process when its parent ends (Linux: ``PR_SET_PDEATHSIG``).

    For a process forked as a helper: if whoever forked it is killed, it must not run on as an
    orphan that nothing tracks. ``parent_pid`` is the parent this process was forked from; if
    that parent has already ended (the process was reparented before the call), ``sig`` is sent
    at once, as the kernel would have. Returns False, and changes nothing, where the call is not
    available (not Linux). A process that forks such helpers calls it once beforehand (with
    ``parent_pid=None``: nothing is set) so that its children find the C library already loaded.
    """
    prctl = _prctl()
    if prctl is None or parent_pid is None:
        return False
    if prctl(1, int(sig), 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
        return False
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)
    return True


@functools.cache
def _prctl():
    """The C library's ``prctl`` (its five arguments as unsigned longs), or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    prctl.restype = ctypes.c_int
    return prctl


# What Flower's ServerApp process (``flwr-serverapp``) hosting privfl's Aggregator imports, and its entry point;
# the same for the SuperLink's SuperExec (``flower-superexec``), which starts the ServerApp.
SERVERAPP_MODULES = ("flwr.superlink.cli.flwr_serverapp", "privfl.aggregator", "privfl.flower.apps")
SERVERAPP_TARGET = "flwr.superlink.cli.flwr_serverapp:flwr_serverapp"
SUPEREXEC_MODULES = ("flwr.supercore.cli.flower_superexec",)
SUPEREXEC_TARGET = "flwr.supercore.cli.flower_superexec:flower_superexec"


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
        listen: Also take requests on this Unix socket (see `forward_to_launcher`), for the
            ``allow`` targets only.
        allow: The targets (``"module:function"``) a request on the socket may name.

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
        listen: str | os.PathLike[str] | None = None,
        allow: Sequence[str] = (),
    ) -> None:
        for module in modules:
            if not all(part.isidentifier() for part in module.split(".")):
                raise DeploymentError(f"not a module name: {module!r}")
        self.start_timeout = start_timeout
        self.log_file = Path(log_file)
        self._log = open(self.log_file, "ab")  # closed in close()
        command = [sys.executable, "-m", "privfl.flower.warm"]
        if listen is not None:
            command += ["--listen", str(listen), *(f"--allow={target}" for target in allow)]
        self.process = subprocess.Popen(
            [*command, *modules],
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
        if listen is not None:  # bound before the imports, so this is a fraction of a second
            deadline = time.monotonic() + start_timeout
            while not os.path.exists(listen):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.close(grace=0)
                    raise DeploymentError(f"the warm launcher did not open {listen}; see {self.log_file}")
                time.sleep(0.01)

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


def _child(request: dict, ready_fd: int, keep: Sequence[int], stdio: Sequence[int] = ()) -> None:
    """In the forked child: become the requested process; never returns.

    ``stdio``: the requester's stdin, stdout and stderr (a request over the socket); otherwise stdin
    is /dev/null and stdout and stderr go to the request's log file.
    """
    code = 1
    try:
        os.setsid()
        set_process_name(str(request.get("name") or "privfl"))
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for fd in keep:
            if fd > 2 and fd not in stdio:  # 0, 1 and 2 are replaced below
                os.close(fd)
        if stdio:
            for target_fd, fd in enumerate(stdio):
                os.dup2(fd, target_fd)
            for fd in set(stdio):
                if fd > 2:
                    os.close(fd)
        else:
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
        import inspect

        func = getattr(importlib.import_module(module_name), function)
        takes_argv = bool(inspect.signature(func).parameters)  # else it reads sys.argv, as console scripts do
        result = func(list(request["argv"])) if takes_argv else func()
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


def _check_request(request: object) -> dict:
    if not isinstance(request, dict):
        raise ValueError("a request is a JSON object")
    if not isinstance(request.get("target"), str) or ":" not in request["target"]:
        raise ValueError("target must be 'module:function'")
    if not isinstance(request.get("argv"), list) or not all(isinstance(a, str) for a in request["argv"]):
        raise ValueError("argv must be a list of strings")
    if not isinstance(request.get("env"), dict):
        raise ValueError("env must be a mapping")
    return request


class _Launcher:
    """The launcher process's loop: requests on stdin and, optionally, on a listening socket."""

    def __init__(self, listener: socket.socket | None, listen: str | None, allow: Sequence[str]) -> None:
        import selectors

        self.allow = frozenset(allow)
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        # Nothing the launcher prints may reach the pipe its parent reads replies from.
        os.dup2(2, 1)
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)
        os.set_blocking(self.wake_read, False)
        signal.set_wakeup_fd(self.wake_write)
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        self.stdin_fd = sys.stdin.fileno()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.stdin_fd, selectors.EVENT_READ)
        self.selector.register(self.wake_read, selectors.EVENT_READ)
        self.listen = listen
        self.listener = listener
        if listener is not None:
            self.selector.register(listener.fileno(), selectors.EVENT_READ)
        self.pending = b""
        self.children: set[int] = set()
        self.callers: dict[int, socket.socket] = {}  # pid -> the connection that asked for it

    def fork(self, request: dict, stdio: Sequence[int] = ()) -> dict:
        ready_read, ready_write = os.pipe()
        keep = [self.stdin_fd, self.wake_read, self.wake_write, self.out.fileno(), *(c.fileno() for c in self.callers.values())]
        if self.listener is not None:
            keep.append(self.listener.fileno())
        pid = os.fork()
        if pid == 0:
            os.close(ready_read)
            _child(request, ready_write, keep, stdio)
        os.close(ready_write)
        started = os.read(ready_read, 1)  # the child has its session, output and environment
        os.close(ready_read)
        self.children.add(pid)
        return {"pid": pid} if started else {"error": "the child exited while starting", "pid": pid}

    def reap(self) -> None:
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if not done:
                continue
            self.children.discard(pid)
            message = json.dumps({"exit": pid, "code": _status_code(status)}) + "\n"
            self.out.write(message)
            caller = self.callers.pop(pid, None)
            if caller is not None:
                try:
                    caller.sendall(message.encode())
                except OSError:
                    pass
                caller.close()

    def serve_socket(self) -> None:
        assert self.listener is not None
        connection, _ = self.listener.accept()
        fds: list[int] = []
        try:
            connection.settimeout(10.0)
            data, fds, _, _ = socket.recv_fds(connection, 1 << 16, 3)
            while data and not data.endswith(b"\n"):
                more = connection.recv(1 << 16)
                if not more:
                    break
                data += more
            request = _check_request(json.loads(data))
            if request["target"] not in self.allow:
                raise ValueError(f"target {request['target']!r} is not allowed on the socket")
            if len(fds) != 3:
                raise ValueError("a request on the socket passes stdin, stdout and stderr")
            reply = self.fork(request, fds)
        except (OSError, ValueError) as exc:
            reply = {"error": str(exc)}
        finally:
            for fd in fds:
                os.close(fd)
        try:
            connection.sendall((json.dumps(reply) + "\n").encode())
        except OSError:
            pass
        if reply.get("pid") in self.children:
            self.callers[reply["pid"]] = connection
        else:
            connection.close()

    def serve_stdin(self) -> bool:
        """Answers the complete requests read from stdin; False once stdin has closed."""
        chunk = os.read(self.stdin_fd, 65536)
        if not chunk:
            return False
        self.pending += chunk
        while b"\n" in self.pending:
            line, self.pending = self.pending.split(b"\n", 1)
            try:
                request = _check_request(json.loads(line))
                if not isinstance(request.get("log"), str):
                    raise ValueError("log must be a path")
            except ValueError as exc:
                self.out.write(json.dumps({"error": str(exc)}) + "\n")
                continue
            reply = self.fork(request)
            if "error" in reply:
                reply["error"] += f"; see {request['log']}"
            self.out.write(json.dumps(reply) + "\n")
        return True

    def run(self) -> None:
        open_input = True
        while open_input:
            for key, _ in self.selector.select(timeout=1.0):
                if key.fd == self.wake_read:
                    try:
                        os.read(self.wake_read, 4096)
                    except BlockingIOError:
                        pass
                elif self.listener is not None and key.fd == self.listener.fileno():
                    self.serve_socket()
                elif not self.serve_stdin():
                    open_input = False
                    break
            self.reap()
        self.reap()
        if self.listener is not None and self.listen:
            self.listener.close()
            try:
                os.unlink(self.listen)
            except OSError:
                pass


def main(argv: Sequence[str] | None = None) -> int:
    """The launcher: ``python -m privfl.flower.warm [--listen SOCKET --allow TARGET...] MODULE...``.

    Requests come on stdin, one JSON line each (replies and exit statuses on stdout). With
    ``--listen``, also on that Unix socket (created owner-only), from `forward_to_launcher`: one
    request per connection, with the requester's stdin, stdout and stderr passed along, for the
    ``--allow`` targets only; the reply and later the exit status go back on the connection.
    """
    import argparse
    import importlib

    parser = argparse.ArgumentParser(prog="python -m privfl.flower.warm")
    parser.add_argument("--listen", help="also take requests on this Unix socket")
    parser.add_argument("--allow", action="append", default=[], help="a target requests on the socket may name")
    parser.add_argument("modules", nargs="*")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    set_process_name("privfl-warm")
    listener = None
    if args.listen:  # listening before the imports: a request that comes meanwhile waits for them
        old = os.umask(0o177)  # the socket: owner read/write only
        try:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(args.listen)
        finally:
            os.umask(old)
        listener.listen(8)
    for module in args.modules:
        importlib.import_module(module)
    _Launcher(listener, args.listen, args.allow).run()
    return 0


def forward_to_launcher(socket_path: str, target: str, fallback: str, *, name: str = "privfl-server") -> None:
    """Runs ``target`` in a process forked by a launcher listening on ``socket_path``, as this process.

    For a command another program starts by name (Flower's SuperExec starts ``flwr-serverapp``): a
    small script of that name, first on that program's PATH, calls this. The forked process gets
    this process's arguments, environment, working directory, stdin, stdout and stderr; this
    process forwards SIGTERM and SIGINT to it, waits for it and exits with its status. If the
    launcher cannot be reached, it runs ``fallback`` (the real command) in its place instead.
    ``name`` is the forked process's name (`set_process_name`).
    """
    request = {"target": target, "argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(), "name": name}
    try:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(socket_path)
        socket.send_fds(connection, [(json.dumps(request) + "\n").encode()], [0, 1, 2])
        reader = connection.makefile("rb")
        reply = json.loads(reader.readline() or b"{}")
        if "pid" not in reply:
            raise ValueError(reply.get("error", "the launcher closed the connection"))
        pid = int(reply["pid"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"privfl: the warm launcher at {socket_path} did not start {target} ({exc!r}); running {fallback}", file=sys.stderr)
        os.execv(fallback, [fallback, *sys.argv[1:]])  # never returns
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: os.kill(pid, signum))
    code = 1
    for line in reader:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if message.get("exit") == pid:
            code = int(message["code"])
            break
    if code < 0:  # ended by a signal: end the same way
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    sys.exit(main())
