"""Wall and CPU time of `privfl deploy local` (TLS SuperLink, a SuperNode and a worker per site, over
Flower) against `privfl run` (the single-process simulation) on the same config and sites.

Both run as commands, variants interleaved (in-process, deployment, in-process, ...); CPU time is that
of the command and every process it started (RUSAGE_CHILDREN). Each process may use its default
thread count; sites train with one thread each. Prints a table and the median and min of the ratios.

    python benchmarks/deployment.py --sites 3 --repeats 2
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


def _timed(command: list[str]) -> tuple[float, float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def _round_seconds(run_dir: Path) -> tuple[float, float]:
    """(first round, median of the other rounds) in seconds, from the run's history.json."""
    import json

    seconds = [float(r["seconds"]) for r in json.loads((run_dir / "history.json").read_text())]
    return seconds[0], statistics.median(seconds[1:]) if len(seconds) > 1 else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, help="override the default config's rounds")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    privfl = str(Path(sys.executable).parent / "privfl")
    work = Path(tempfile.mkdtemp(prefix="privfl-bench-deploy-"))
    config = work / "config.toml"
    config.write_text(_config(args.sites, args.rounds))
    rows = []
    try:
        for repeat in range(args.repeats):
            wall_in, cpu_in, _out_in = _timed([privfl, "run", str(config), "--quiet", "--out", str(work / f"in-{repeat}")])
            wall_dep, cpu_dep, out_dep = _timed(
                [privfl, "deploy", "local", str(config), "--sites", str(args.sites), "--quiet", "--out", str(work / f"dep-{repeat}")]
            )
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
