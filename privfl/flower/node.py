"""A Flower SuperNode for privfl sites: short polls, ClientApp processes forked warm.

``python -m privfl.flower.node [--poll SECONDS] FLOWER_SUPERNODE_ARGS...`` starts Flower's own
SuperNode (``flower-supernode``, same arguments, same gRPC/TLS/node-authentication code) with two
changes that matter for privfl, whose rounds are several message exchanges each:

- **Polls.** Flower 1.42's SuperNode waits a fixed 3 s after asking the SuperLink for a message
  and finding none, and 0.5 s between looks for the ClientApp's reply. Every privfl protocol step
  pays the first (the node is idle while the other sites train). Here a node asks again
  ``--poll`` seconds (0.05 by default) after a message, then waits 1.25 times longer after each
  empty answer, up to ``--idle-poll`` (0.25 s by default): about 6 asks in the first 0.6 s, when
  the next protocol step usually comes, and 4 a second when idle (each costs the SuperLink a few
  milliseconds of CPU). It looks for the ClientApp's reply (in its own memory) every 10 ms.
- **ClientApp processes.** Flower runs every message in a new ``flwr-clientapp`` process, which
  imports Flower first (1-2 s on a small machine). Here the SuperNode runs in Flower's ``process``
  isolation mode and this module starts its own task executor next to it (forked from the
  SuperNode once Flower is imported, so it imports nothing again): a process that has imported
  Flower and privfl's ClientApp once and forks one child per message (the SuperNode
  wakes it through a pipe when it has stored a message; it looks by itself only every
  ``--idle-poll`` seconds). Each child runs
  Flower's own ClientApp runtime (``run_clientapp``: pull the message over the local Runtime API,
  call the ClientApp, push the reply) and exits, as ``flwr-clientapp`` would. What a message can
  reach is unchanged: the child is a fresh process with nothing of the previous message in it
  beyond what was imported before the fork (no site data, no keys: a site's state is in its
  state directory or its long-lived worker).

Both changes touch Flower internals that are not a public API, so this module checks the
installed Flower version and refuses any other minor version than the one it was written for; the
plain ``flower-supernode`` always works (slower) and needs nothing from here.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Collection, Sequence
from typing import NoReturn

__all__ = ["DEFAULT_IDLE_POLL_SECONDS", "DEFAULT_POLL_SECONDS", "SUPPORTED_FLOWER", "flower_version_supported", "main", "run_executor"]

DEFAULT_POLL_SECONDS = 0.05
DEFAULT_IDLE_POLL_SECONDS = 0.25
_BACKOFF = 1.25
_LOCAL_WAIT = 0.01
SUPPORTED_FLOWER = "1.42"
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
_TASK_STOP_GRACE = 1.0  # seconds a stopping executor waits for its tasks (the SuperNode gives it 2 s)


def flower_version_supported() -> bool:
    """Whether the installed Flower is the minor version whose internals this module adjusts."""
    from importlib.metadata import version

    installed = version("flwr")
    return installed == SUPPORTED_FLOWER or installed.startswith(SUPPORTED_FLOWER + ".")


def _check_flower_version() -> None:
    from importlib.metadata import version

    if not flower_version_supported():
        installed = version("flwr")
        raise SystemExit(
            f"privfl.flower.node is written for Flower {SUPPORTED_FLOWER}.x and found flwr {installed}; "
            "use the plain flower-supernode command instead"
        )


def _poll(value: str) -> float:
    seconds = float(value)
    if not 0.005 <= seconds <= 5.0:
        raise argparse.ArgumentTypeError("must be between 0.005 and 5 seconds")
    return seconds


class _PollClock:
    """A stand-in for the ``time`` module of Flower's SuperNode loop (every other name is the real one).

    ``sleep`` of Flower's idle wait (3 s: the SuperLink had no message) waits ``poll`` seconds after
    a message and 1.25 times longer after each further empty answer, up to ``idle_poll``; its shorter
    waits (for the ClientApp's reply, for a payload: looks at the node's own memory) wait at most
    10 ms. `activity` (a message arrived) brings the idle wait back to ``poll``.
    """

    def __init__(self, poll: float, idle_poll: float) -> None:
        self.poll = poll
        self.idle_poll = max(poll, idle_poll)
        self._idle = poll

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if float(seconds) >= 1.0:  # Flower's idle wait
            wait, self._idle = self._idle, min(self._idle * _BACKOFF, self.idle_poll)
        else:  # a look at the node's own state (the ClientApp's reply, a payload): no network, cheap
            wait = min(float(seconds), self.poll, _LOCAL_WAIT)
        time.sleep(wait)

    def activity(self) -> None:
        self._idle = self.poll


def _announce_messages(module: object, clock: _PollClock, wake_fd: int | None) -> bool:
    """Wrap ``module._pull_and_store_message`` (Flower's SuperNode loop): when it has stored a message,
    reset ``clock``'s idle wait and write a byte to ``wake_fd`` (the executor's pipe). False (and
    nothing changed) if the function is not there."""
    import functools

    original = getattr(module, "_pull_and_store_message", None)
    if original is None or getattr(original, "_privfl_wrapped", False):
        return False

    @functools.wraps(original)
    def pull_and_store(*args, **kwargs):
        run_id = original(*args, **kwargs)
        if run_id is not None:
            clock.activity()
            if wake_fd is not None:
                try:
                    os.write(wake_fd, b"\0")
                except OSError:  # a full pipe already holds a wake-up; a closed one has no reader
                    pass
        return run_id

    pull_and_store._privfl_wrapped = True  # type: ignore[attr-defined]
    vars(module)["_pull_and_store_message"] = pull_and_store
    return True


def _wait_for_task(wake_fd: int | None, poll: float, idle_poll: float) -> None:
    """The executor's wait between looks for a task: until woken (at most ``idle_poll``), else ``poll``."""
    import select

    if wake_fd is None:
        time.sleep(poll)
    elif select.select([wake_fd], [], [], idle_poll)[0]:
        try:
            os.read(wake_fd, 4096)  # every wake-up so far: one look for tasks answers them all
        except BlockingIOError:
            pass


def shorten_object_pulls(module: object, name: str, poll: float) -> bool:
    """Make Flower's object pulls in ``module`` retry after ``poll`` seconds instead of 1 s.

    A Flower message is announced before its objects (the payload) have arrived; whoever pulls it
    in that gap retries with an exponential backoff that starts at 1 s (``PULL_INITIAL_BACKOFF``).
    A SuperNode stores a message before it has pulled its objects, and a reply reaches the
    SuperLink before its objects, so with fast polls that gap is hit on most exchanges. This wraps
    the pull function named ``name`` in ``module`` so its backoff starts at ``poll`` (doubling, at
    most 1 s). Returns False (and changes nothing) if the function is not there or does not take
    the backoff arguments.
    """
    import functools
    import inspect

    func = getattr(module, name, None)
    if func is None or isinstance(func, functools.partial):
        return False
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    if "initial_backoff" not in params or "backoff_cap" not in params:
        return False
    setattr(module, name, functools.partial(func, initial_backoff=poll, backoff_cap=1.0))
    return True


def _runtime_address(args: Sequence[str]) -> str:
    """The SuperNode's Runtime API address, from its ``--host``/``--port`` (Flower's defaults otherwise)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9094)
    parser.add_argument("--ssl-certfile")
    parser.add_argument("--isolation")
    known, _ = parser.parse_known_args(list(args))
    if known.ssl_certfile:
        raise SystemExit("privfl.flower.node runs its Runtime API on loopback without TLS; drop --ssl-certfile")
    if known.isolation not in (None, "process"):
        raise SystemExit("privfl.flower.node runs Flower's 'process' isolation itself; drop --isolation")
    host = known.host
    return f"[{host}]:{known.port}" if ":" in host and not host.startswith("[") else f"{host}:{known.port}"


def run_executor(
    runtime_api_address: str, *, poll: float, parent_pid: int, wake_fd: int | None = None, idle_poll: float = DEFAULT_IDLE_POLL_SECONDS
) -> None:
    """Take ClientApp tasks from the SuperNode's Runtime API; run each in a forked child.

    With ``wake_fd`` (a pipe the SuperNode writes a byte to when it has stored a message) it asks for
    a task when woken and otherwise every ``idle_poll`` seconds; without, every ``poll`` seconds.
    Returns when the parent SuperNode has gone (or on SIGTERM/SIGINT).
    """
    import importlib

    import flwr.supernode.runtime.run_clientapp as _rc
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import RetryInvoker, exponential
    from flwr.supercore.runtime import RuntimeHttpClient
    for module in ("privfl.flower.apps", "privfl.flower.worker"):  # warm: each child finds them imported
        importlib.import_module(module)

    from privfl.flower.warm import die_with_parent

    die_with_parent(None)  # loads the C library's prctl once, for every task child to find loaded
    shorten_object_pulls(_rc, "pull_and_inflate_object_from_tree", poll)
    # Flower builds a telemetry payload at every task start and end, even with telemetry off, and
    # platform.architecture() runs `file -b` on the interpreter each time (uname is cached): two
    # fork+exec per message. The answer cannot change within this process, so it is computed once,
    # here, and every forked child inherits it.
    import functools
    import platform

    platform.uname()
    if not hasattr(platform.architecture, "cache_info"):
        platform.architecture = functools.cache(platform.architecture)  # type: ignore[assignment]
    platform.architecture()

    stopping = False

    def _stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    # One try per ask: this loop retries itself, between looks at SIGTERM and at its parent. Flower's
    # default invoker retries a refused connection forever, so an executor whose SuperNode had just gone
    # (a stopped deployment) stayed blocked in its ask, orphaned, its stop flag never read.
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=RetryInvoker(exponential, Exception, max_tries=1, max_time=None),
    )
    children: set[int] = set()
    failing = False
    request = AcquireTaskRequest(supported_task_types=[str(TaskType.CLIENT_APP)])
    try:
        while not stopping and os.getppid() == parent_pid:
            _reap(children)
            try:
                reply = client.AcquireTask(request)
            except Exception as exc:  # the SuperNode may not be up yet, or be stopping
                if not failing:  # once per streak: a SuperNode starting up is not answering for a while
                    print(f"privfl node executor: Runtime API not answering ({type(exc).__name__})", file=sys.stderr)
                failing = True
                _wait_for_task(wake_fd, poll, idle_poll)  # woken as soon as the SuperNode holds a message
                continue
            failing = False
            if reply.HasField("task") and reply.token:
                # SIGTERM and SIGINT wait until the child has its own handling (and is bound to this
                # process's life); one that comes meanwhile reaches it then, not this loop's handler.
                mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
                executor_pid = os.getpid()
                try:
                    pid = os.fork()
                    if pid == 0:  # the child: one ClientApp task, then exit
                        _run_task(runtime_api_address, reply.token, wake_fd, parent_pid=executor_pid, mask=mask)
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                children.add(pid)
                continue  # there may be another task waiting
            _wait_for_task(wake_fd, poll, idle_poll)
    finally:
        client.close()
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        # A task ends on SIGTERM by reporting its status to the SuperNode: a short wait for that, since a
        # task still running when this process exits is killed outright (`die_with_parent`).
        deadline = time.monotonic() + _TASK_STOP_GRACE
        while children and time.monotonic() < deadline:
            _reap(children)
            time.sleep(0.02)


def _reap(children: set[int]) -> None:
    """Waits for (without blocking) and forgets the ended ones among ``children``."""
    for pid in list(children):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            children.discard(pid)


def _run_task(runtime_api_address: str, token: str, wake_fd: int | None, *, parent_pid: int, mask: Collection[int]) -> NoReturn:
    """A forked executor child: runs one ClientApp task and exits (never returns into the executor's loop).

    It is killed when the executor ends (`die_with_parent`): a task forked just as the deployment
    stopped its executor would otherwise run on, orphaned, retrying a SuperNode that is gone.
    ``mask`` is the signal mask to restore (the executor blocks SIGTERM and SIGINT across the fork).
    """
    code = 1
    try:
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        from privfl.flower.warm import die_with_parent

        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        die_with_parent(parent_pid)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if wake_fd is not None:
            os.close(wake_fd)
        run_clientapp(
            runtime_api_address=runtime_api_address,
            token=token,
            insecure=True,
            certificates=None,
            parent_pid=None,
            runtime_dependency_install=False,
        )
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # the child must not return into the loop
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: ``python -m privfl.flower.node [--poll S] FLOWER_SUPERNODE_ARGS...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m privfl.flower.node",
        description="Flower's SuperNode with short polls and warm-forked ClientApp processes "
        "(all other arguments go to flower-supernode).",
    )
    parser.add_argument("--poll", type=_poll, default=DEFAULT_POLL_SECONDS, help="wait after a message before asking again, seconds")
    parser.add_argument("--idle-poll", type=_poll, default=DEFAULT_IDLE_POLL_SECONDS, help="longest wait between asks when idle, seconds")
    parser.add_argument("--executor", metavar="RUNTIME_API_ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--wake-fd", type=int, help=argparse.SUPPRESS)
    ours, rest = parser.parse_known_args(argv)
    _check_flower_version()
    if ours.executor:
        if ours.wake_fd is not None:
            os.set_blocking(ours.wake_fd, False)
        run_executor(ours.executor, poll=ours.poll, parent_pid=ours.parent_pid or os.getppid(),
                     wake_fd=ours.wake_fd, idle_poll=ours.idle_poll)  # fmt: skip
        return

    address = _runtime_address(rest)
    import flwr.supernode.start_client_internal as internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    clock = _PollClock(ours.poll, ours.idle_poll)
    internal.time = clock  # type: ignore[assignment]
    shorten_object_pulls(internal, "pull_objects", ours.poll)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    if not _announce_messages(internal, clock, wake_write):
        raise SystemExit("privfl.flower.node: Flower's SuperNode loop is not where this module expects it")
    node_pid = os.getpid()
    executor = os.fork()  # the executor: this process as it is now, Flower and the ClientApp imported
    if executor == 0:
        code = 0
        try:
            from privfl.flower.warm import die_with_parent, set_process_name

            set_process_name("privfl-executor")
            die_with_parent(node_pid, signal.SIGTERM)  # a SuperNode killed outright takes its executor along
            os.close(wake_write)
            os.set_blocking(wake_read, False)
            run_executor(address, poll=ours.poll, parent_pid=node_pid, wake_fd=wake_read, idle_poll=ours.idle_poll)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(wake_read)
    sys.argv = ["flower-supernode", *rest, "--isolation", "process"]
    try:
        flower_supernode()
    finally:
        _stop_executor(executor)


def _stop_executor(pid: int, grace: float = 2.0) -> None:
    """SIGTERM to the node's executor, SIGKILL if it is still there after ``grace`` seconds; reaps it."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


if __name__ == "__main__":
    main()
