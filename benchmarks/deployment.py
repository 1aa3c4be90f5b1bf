"""Wall and CPU time of `privfl deploy local` (TLS SuperLink, a SuperNode and a worker per site, over
Flower) against `privfl run` (the single-process simulation) on the same config and sites.

Both run as commands, variants interleaved (in-process, deployment, in-process, ...); CPU time is that
of the command and every process it started: RUSAGE_CHILDREN for `privfl run`; for the deployment, the
sum over its processes sampled from /proc while it runs (RUSAGE_CHILDREN misses those re-parented when
their parent stops first), or RUSAGE_CHILDREN where that is larger. Each process may use its default
thread count; sites train with one thread each. Prints a table and the median and min of the ratios,
and where the deployment's CPU time goes by kind of process (sampled from /proc while it runs).

    python benchmarks/deployment.py --sites 3 --repeats 2
    python benchmarks/deployment.py --sites 3 --idle-seconds 10   # an idle deployment's polling CPU
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path


def _config(sites: int, rounds: int | None) -> str:
    text = resources.files("privfl").joinpath("defaults/healthcare.toml").read_text()
    text = re.sub(r"(?m)^num_clients = \d+", f"num_clients = {sites}", text)
    text = re.sub(r"(?m)^client_names = .*\n", "", text)
    if rounds is not None:
        text = re.sub(r"(?m)^rounds = \d+", f"rounds = {rounds}", text)
    return text


_NAMED = {  # process name (/proc/PID/comm) -> role: processes forked by privfl.flower.warm keep its command line
    "privfl-warm": "warm launcher (imports once, forks nodes and workers)",
    "privfl-node": "SuperNode",
    "privfl-executor": "site executor (+ its forked ClientApp children)",
    "privfl-worker": "site worker",
    "privfl-server": "ServerApp",
    "privfl-sexec": "SuperExec (starts the ServerApp)",
}
_ROLES = (  # (role, what its command line contains), first match wins
    ("site executor (+ its forked ClientApp children)", "privfl.flower.node --poll"),
    ("SuperNode", "privfl.flower.node"),
    ("site worker", "privfl.flower.worker"),
    ("SuperLink", "flower-superlink"),
    ("SuperExec (starts the ServerApp)", "flower-superexec"),
    ("ServerApp", "flwr-serverapp"),
    ("flwr CLI (run --stream)", "/flwr "),
    ("privfl deploy local itself", "privfl deploy"),
)


class _CpuByRole(threading.Thread):
    """Samples /proc every 0.2 s for the processes under ``root`` and keeps each one's latest CPU time.

    Own user+system time per process; executors also count their reaped children (the ClientApp
    processes they fork per message, too short-lived to sample). Processes that exit between two samples
    lose their last 0.2 s; what no sample saw shows up as "unattributed".
    """

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.cpu: dict[int, tuple[str, float]] = {}
        self.done = threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")

    def _sample(self) -> None:
        parents: dict[int, list[int]] = {}
        stats: dict[int, list[str]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2 :].split()
            stats[int(entry)] = fields
            parents.setdefault(int(fields[1]), []).append(int(entry))
        todo, seen = [self.root], []
        while todo:
            pid = todo.pop()
            seen.append(pid)
            todo.extend(parents.get(pid, []))
        for pid in seen:
            if pid not in stats:
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            try:
                role = _NAMED.get(Path(f"/proc/{pid}/comm").read_text().strip())
            except OSError:
                continue
            role = role or next((name for name, needle in _ROLES if needle in cmd), None)
            if role is None:
                continue
            fields = stats[pid]
            parent = int(fields[1])
            if role.startswith("site executor") and self.cpu.get(parent, ("",))[0] == role:
                continue  # a ClientApp forked by an executor: counted in the executor's reaped children
            own = (int(fields[11]) + int(fields[12])) / self.tick
            children = (int(fields[13]) + int(fields[14])) / self.tick if role.startswith("site executor") else 0.0
            self.cpu[pid] = (role, own + children)

    def run(self) -> None:
        while not self.done.wait(0.2):
            self._sample()

    def by_role(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for role, seconds in self.cpu.values():
            totals[role] = totals.get(role, 0.0) + seconds
        return totals


def _timed(command: list[str], *, monitor: bool = False) -> tuple[float, float, str, dict[str, float]]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = _CpuByRole(proc.pid) if monitor else None
    if sampler is not None:
        sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    if sampler is not None:
        sampler.done.set()
        sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, stdout, sampler.by_role() if sampler is not None else {}


def _round_seconds(run_dir: Path) -> tuple[float, float]:
    """(first round, median of the other rounds) in seconds, from the run's history.json."""
    import json

    seconds = [float(r["seconds"]) for r in json.loads((run_dir / "history.json").read_text())]
    return seconds[0], statistics.median(seconds[1:]) if len(seconds) > 1 else float("nan")


def _idle(sites: int, seconds: float) -> int:
    """CPU that an idle deployment (no run) spends polling, per kind of process, in cores."""
    from privfl.flower.deploy import LocalDeployment, _descendants

    tick = os.sysconf("SC_CLK_TCK")

    def cpu(pid: int) -> float:
        text = Path(f"/proc/{pid}/stat").read_text()
        fields = text[text.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / tick

    work = Path(tempfile.mkdtemp(prefix="privfl-bench-idle-"))
    try:
        with LocalDeployment(work, [{"site": f"site-{i}"} for i in range(sites)], node_auth=True) as dep:
            time.sleep(4.0)  # past start-up and the first idle polls
            assert dep.superlink is not None
            pids = {dep.superlink.pid: "SuperLink"}
            for node in dep.supernodes:
                pids[node.pid] = "SuperNode"
                pids.update({pid: "site executor" for pid in _descendants([node.pid])})
            before = {pid: cpu(pid) for pid in pids}
            time.sleep(seconds)
            used = {pid: cpu(pid) - before[pid] for pid in pids}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{sites} SuperNodes idle for {seconds:g} s (no run); CPU in cores (CPU seconds per second):\n")
    print("| process | cores, each | cores, all |")
    print("|---|---:|---:|")
    for role in ("SuperLink", "SuperNode", "site executor"):
        values = [used[pid] / seconds for pid, r in pids.items() if r == role]
        print(f"| {role} | {statistics.median(values):.3f} | {sum(values):.3f} |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, help="override the default config's rounds")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--idle-seconds", type=float, help="instead: measure an idle deployment's polling CPU for this long")
    args = parser.parse_args()
    if args.idle_seconds:
        return _idle(args.sites, args.idle_seconds)
    privfl = str(Path(sys.executable).parent / "privfl")
    work = Path(tempfile.mkdtemp(prefix="privfl-bench-deploy-"))
    config = work / "config.toml"
    config.write_text(_config(args.sites, args.rounds))
    rows = []
    breakdown: list[dict[str, float]] = []
    try:
        for repeat in range(args.repeats):
            wall_in, cpu_in, _out_in, _ = _timed([privfl, "run", str(config), "--quiet", "--out", str(work / f"in-{repeat}")])
            wall_dep, cpu_dep, out_dep, roles = _timed(
                [privfl, "deploy", "local", str(config), "--sites", str(args.sites), "--quiet", "--out", str(work / f"dep-{repeat}")],
                monitor=True,
            )
            # RUSAGE_CHILDREN misses processes whose parent stopped before them (they are re-parented
            # and reaped elsewhere: the SuperLink's SuperExec and ServerApp, each SuperNode's executor),
            # so the deployment's CPU is the larger of it and the per-process sum.
            sampled = sum(roles.values())
            if cpu_dep > sampled:
                roles["not sampled (processes too short-lived to see)"] = cpu_dep - sampled
            cpu_dep = max(cpu_dep, sampled)
            breakdown.append(roles)
            accuracy = re.search(r"final accuracy: ([0-9.]+)", out_dep)
            _, round_in = _round_seconds(work / f"in-{repeat}")
            first_dep, round_dep = _round_seconds(work / f"dep-{repeat}" / "run")
            rows.append((wall_in, cpu_in, wall_dep, cpu_dep, accuracy.group(1) if accuracy else "-", round_in, round_dep, first_dep))
            print(
                f"repeat {repeat}: in-process {wall_in:.1f} s wall / {cpu_in:.1f} s CPU; deployment {wall_dep:.1f} s wall / "
                f"{cpu_dep:.1f} s CPU (accuracy {rows[-1][4]}); a round after the first: in-process {round_in:.2f} s, "
                f"deployment {round_dep:.2f} s (its first round {first_dep:.2f} s); load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall_ratios = [r[2] / r[0] for r in rows]
    cpu_ratios = [r[3] / r[1] for r in rows]
    print()
    round_ratios = [r[6] / r[5] for r in rows]
    print("| sites | rounds | in-process wall s | deployment wall s | wall ratio | in-process CPU s | deployment CPU s "
          "| CPU ratio | round s in-process | round s deployment | round ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for wall_in, cpu_in, wall_dep, cpu_dep, _, round_in, round_dep, _ in rows:
        print(f"| {args.sites} | {args.rounds or 'default'} | {wall_in:.1f} | {wall_dep:.1f} | {wall_dep / wall_in:.2f} | "
              f"{cpu_in:.1f} | {cpu_dep:.1f} | {cpu_dep / cpu_in:.2f} | {round_in:.2f} | {round_dep:.2f} | {round_dep / round_in:.2f} |")
    print(f"\nwall ratio: median {statistics.median(wall_ratios):.2f}, min {min(wall_ratios):.2f}; "
          f"CPU ratio: median {statistics.median(cpu_ratios):.2f}, min {min(cpu_ratios):.2f}; "
          f"round ratio (median round after the first): median {statistics.median(round_ratios):.2f}, min {min(round_ratios):.2f}")
    print("\nWhere the deployment's CPU goes (seconds, median over repeats; all processes of that kind together):\n")
    print("| process | CPU s | share |")
    print("|---|---:|---:|")
    roles = sorted({role for b in breakdown for role in b}, key=lambda r: -statistics.median(b.get(r, 0.0) for b in breakdown))
    total = statistics.median(r[3] for r in rows)
    for role in roles:
        seconds = statistics.median(b.get(role, 0.0) for b in breakdown)
        print(f"| {role} | {seconds:.1f} | {seconds / total:.0%} |")
    print(f"| in-process `privfl run`, for comparison | {statistics.median(r[1] for r in rows):.1f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
