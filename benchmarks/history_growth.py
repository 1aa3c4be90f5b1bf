"""How a round's cost grows with the round index: history.json appended in place against rewritten whole.

Usage: ``python benchmarks/history_growth.py [--clients 1000] [--fraction 0.02] [--rounds 300] [--repeats 2]``

A run of ``privfl.federation.Federation`` with a run directory, plaintext protection, ``--clients``
sites of 20 synthetic examples each (30 features, ``benchmarks/scaling.py``'s data) of which a
fraction ``--fraction`` is sampled per round. Each round record names every site's epsilon, so
history.json grows by O(sites) per round. Two variants over the same sites and seeds:

- ``append`` (what privfl does): ``privfl.rundir.HistoryWriter`` replaces the file on the first
  round and appends each later record in place (one fsync of one record).
- ``rewrite``: the same writer with ``HistoryWriter.append = False``, which replaces the whole file
  every round (temporary file, fsync, rename, directory fsync): what privfl did before.

The clock is read each time the driver finishes a round (its progress hook, after history.json and
the checkpoint are written), in CPU (``time.process_time``) and wall time. Each variant runs in a
fresh child process with one torch / OpenMP thread; the variants alternate, and their order swaps
every repeat. The table gives, per variant, the median CPU of the first and the last tenth of the
rounds (round 0, which pays the imports, left out), the run's total, and history.json's final size; then the per-repeat ratios rewrite / append
(median and min) of the last tenth's CPU and of the whole run's CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import scaling  # benchmarks/scaling.py, beside this script: its synthetic sites and child runner

VARIANTS = ("append", "rewrite")


def child(args) -> None:
    import torch

    import privfl.federation as fed_module
    from privfl.config import DPConfig, FederationConfig, ProtectionKind, TrainingConfig
    from privfl.data import ArrayDataset
    from privfl.federation import Federation
    from privfl.models import LogisticRegression
    from privfl.rundir import HISTORY_FILE, HistoryWriter

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    HistoryWriter.append = args.one == "append"
    data = scaling.client_data(scaling.client_sizes(args.clients, "homogeneous", args.seed), args.seed)
    clients = {f"site-{k:05d}": ArrayDataset(x, y) for k, (x, y) in enumerate(data)}
    stamps: list[tuple[float, float]] = []
    progress_cls = fed_module._Progress
    original_enter, original_advance = progress_cls.__enter__, progress_cls.advance

    def enter(self):
        stamps.append((time.process_time(), time.perf_counter()))
        return original_enter(self)

    def advance(self, record):
        stamps.append((time.process_time(), time.perf_counter()))
        return original_advance(self, record)

    progress_cls.__enter__, progress_cls.advance = enter, advance
    root = tempfile.mkdtemp(prefix="privfl-history-", dir=args.tmp_dir)
    try:
        fed = Federation(
            model_fn=lambda: LogisticRegression(scaling.FEATURES, 2), clients=clients,
            training=TrainingConfig(local_epochs=1, batch_size=32, learning_rate=0.1, dp=DPConfig(noise_multiplier=1.0)),
            federation=FederationConfig(rounds=args.rounds, client_fraction=args.fraction, protection=ProtectionKind.PLAINTEXT,
                                        seed=0, noise_seed=0, device="cpu"),
            progress=False,
        )
        out = os.path.join(root, "run")
        fed.run(out)
        size = os.path.getsize(os.path.join(out, HISTORY_FILE))
    finally:
        progress_cls.__enter__, progress_cls.advance = original_enter, original_advance
        shutil.rmtree(root, ignore_errors=True)
    cpu = [b[0] - a[0] for a, b in itertools.pairwise(stamps)]
    wall = [b[1] - a[1] for a, b in itertools.pairwise(stamps)]
    print(json.dumps({"variant": args.one, "round_cpu": cpu, "round_wall": wall, "history_bytes": size}))


def spawn(args, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", variant, "--clients", str(args.clients),
           "--fraction", str(args.fraction), "--rounds", str(args.rounds), "--seed", str(args.seed)]
    if args.tmp_dir:
        cmd += ["--tmp-dir", args.tmp_dir]
    return scaling.run_child(cmd, threads=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--fraction", type=float, default=0.02, help="client_fraction: sites sampled per round")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp-dir", help="where the run directories go (default: the system's)")
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 10:
        parser.error("--rounds must be at least 10 (the table compares the first and last tenth)")
    if args.one:
        child(args)
        return

    print("command: " + shlex.join([os.path.relpath(sys.executable), *sys.argv]))
    print(f"threads per child: torch 1, OMP/MKL/OpenBLAS 1; {os.cpu_count()} CPUs; "
          f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{args.clients} sites of 20 examples, client_fraction {args.fraction}, {args.rounds} rounds, "
          f"plaintext, sigma 1.0, batch 32, run directory on {args.tmp_dir or tempfile.gettempdir()}; {args.repeats} repeats")
    samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for repeat in range(args.repeats):
        order = VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            result = spawn(args, variant)
            samples[variant].append(result)
            print(f"  #{repeat} {variant}: run CPU {sum(result['round_cpu']):.1f} s, history.json "
                  f"{result['history_bytes'] / 1e6:.1f} MB", file=sys.stderr, flush=True)
    tenth = max(1, args.rounds // 10)

    def first(r):  # round 0 is left out: it pays the lazy imports (Opacus) and warms the caches
        return statistics.median(r["round_cpu"][1 : 1 + tenth])

    def last(r):
        return statistics.median(r["round_cpu"][-tenth:])

    print(f"\n| history.json | round CPU s, rounds 1-{tenth} (median) | round CPU s, last {tenth} rounds (median) "
          "| run CPU s | run wall s | history.json MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant in VARIANTS:
        runs = samples[variant]
        print(f"| {variant} | {statistics.median(first(r) for r in runs):.3f} | {statistics.median(last(r) for r in runs):.3f} "
              f"| {statistics.median(sum(r['round_cpu']) for r in runs):.1f} | {statistics.median(sum(r['round_wall']) for r in runs):.1f} "
              f"| {statistics.median(r['history_bytes'] for r in runs) / 1e6:.1f} |")
    late = [last(r) / last(a) for r, a in zip(samples["rewrite"], samples["append"], strict=True)]
    total = [sum(r["round_cpu"]) / sum(a["round_cpu"]) for r, a in zip(samples["rewrite"], samples["append"], strict=True)]
    print(f"\nrewrite / append, per repeat: last-tenth round CPU median {statistics.median(late):.2f} (min {min(late):.2f}); "
          f"run CPU median {statistics.median(total):.2f} (min {min(total):.2f})")
    growth = [last(a) / first(a) for a in samples["append"]]
    print(f"append, last tenth / first tenth round CPU: median {statistics.median(growth):.2f}")


if __name__ == "__main__":
    main()
