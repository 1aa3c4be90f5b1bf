"""Targets a test WarmLauncher forks (imported in the launcher through PYTHONPATH)."""

from __future__ import annotations

import json
import os
import sys
import time


def report(argv: list[str]) -> int:
    """Writes what the child sees to argv[0], prints a line, returns argv[1] as the exit status."""
    with open(argv[0], "w") as handle:
        json.dump({
            "pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0), "cwd": os.getcwd(),
            "env": os.environ.get("WARM_TEST"), "argv": sys.argv, "stdin": sys.stdin.read(),
            "comm": open("/proc/self/comm").read().strip() if os.path.exists("/proc/self/comm") else None,
        }, handle)  # fmt: skip
    print("hello from the child")
    return int(argv[1])


def sleep(argv: list[str]) -> int:
    time.sleep(float(argv[0]))
    return 0


def fail(argv: list[str]) -> int:
    raise RuntimeError("the target failed: " + " ".join(argv))
