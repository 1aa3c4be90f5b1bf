"""The accountant's cost against the number of distinct client sizes.

Usage: ``python benchmarks/accountant_sizes.py [--repeats 3] [--distinct 1 5 20 100]``
(about three minutes on two cores; five before this change). ``--repo PATH`` imports privfl from another checkout (for
example ``git archive`` of an older commit unpacked there), to compare before and after.

Client i holds 8 * m_i examples with batch size 8, so its DP-SGD plan is q_i = 1 / m_i and m_i
steps per round (one local epoch); d distinct sizes are d distinct sample rates, spread around the
same mean so the work per round is about the same for every d. Sigma is fixed at 1.0 unless
said otherwise; delta 1e-5; the default (PRV) accountant. Three measurements, each in a fresh
child process per (measurement, d) so no cache carries over, the d values interleaved (their
order rotates every repeat), torch and OpenMP/MKL/OpenBLAS pinned to one thread:

- ``ledger``: 100 clients, m_i = 60 + (i mod d) - d // 2. Each round asks the privacy ledger what
  the federation's round driver asks per sampled client: ``epsilon_if`` (the budget check) then
  ``charge`` (the journal entry's epsilon). Rounds 2 to 5 are timed (round 1 also computes each
  plan's first per-step pieces and is reported apart as "first"); per d the table gives the median
  CPU and wall seconds of a round and the median and min over repeats of the ratio to d = 1.
- ``calibrate``: the same 100 clients' noise calibration to epsilon 3 over 10 rounds
  (:func:`privfl.accounting.noise_multiplier` once per distinct (q, steps), as
  :func:`privfl.plan.plan_site` memoizes it): the run's set-up cost.
- ``round``: a whole federation round against a bare Opacus loop, 20 clients, m_i = 11 + (i mod
  d) - d // 2 (d up to 20), plaintext protection, no run directory, round 2 of 2 timed; the bare
  loop and privfl's round come from benchmarks/scaling.py (``run_bare``, ``run_privfl``), so they
  are the loops that benchmark reports. Ratio privfl / bare per repeat, median and min.

CPU is ``time.process_time`` (the child, all threads), wall is ``time.perf_counter``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import warnings

BATCH = 8
DELTA = 1e-5
LEDGER_CLIENTS = 100
ROUND_CLIENTS = 20
TIMED_ROUNDS = 4


def multiples(num_clients: int, distinct: int, center: int) -> list[int]:
    """m_i: batches per epoch of client i; ``distinct`` values centred on ``center``."""
    return [center + (i % distinct) - distinct // 2 for i in range(num_clients)]


def measure_ledger(distinct: int) -> dict:
    from privfl.accounting import ClientBudget, DPEvent, PrivacyLedger

    ms = multiples(LEDGER_CLIENTS, distinct, 60)
    ledger = PrivacyLedger()
    events = {}
    for i, m in enumerate(ms):
        ledger.register(f"c{i:03d}", ClientBudget(epsilon=1e9, delta=DELTA))
        events[f"c{i:03d}"] = DPEvent(noise_multiplier=1.0, sample_rate=1 / m, steps=m)
    rounds = []
    for round_index in range(1 + TIMED_ROUNDS):
        c0, w0 = time.process_time(), time.perf_counter()
        for name, event in events.items():
            ledger.epsilon_if(name, event)
            ledger.charge(round_index, name, event)
        rounds.append((time.process_time() - c0, time.perf_counter() - w0))
    timed = rounds[1:]
    return {
        "first_cpu": rounds[0][0],
        "cpu": statistics.median(c for c, _ in timed),
        "wall": statistics.median(w for _, w in timed),
        "distinct_q": len(set(ms)),
    }


def measure_calibrate(distinct: int) -> dict:
    from privfl.accounting import noise_multiplier

    plans = sorted(set(multiples(LEDGER_CLIENTS, distinct, 60)))
    c0, w0 = time.process_time(), time.perf_counter()
    for m in plans:
        noise_multiplier(target_epsilon=3.0, sample_rate=1 / m, steps=10 * m, delta=DELTA)
    return {"cpu": time.process_time() - c0, "wall": time.perf_counter() - w0, "distinct_q": len(plans)}


def measure_round(distinct: int, variant: str) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import scaling

    ms = multiples(ROUND_CLIENTS, distinct, 11)
    data = scaling.client_data([BATCH * m for m in ms], seed=0)
    args = argparse.Namespace(batch_size=BATCH, sigma=1.0, target_epsilon=None, clipping="auto", tmp_dir=None)
    result = scaling.run_bare(args, data) if variant == "bare" else scaling.run_privfl(args, data, with_dir=False)
    return {"cpu": result["round_cpu"], "wall": result["round_wall"], "distinct_q": len(set(ms))}


def child(args) -> None:
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.one in ("ledger", "calibrate"):
        from privfl import accounting

        # Imports (Opacus, SciPy, dp-accounting) happen here, not in the timed part; nothing is kept.
        accounting.epsilon(noise_multiplier=2.0, sample_rate=0.5, steps=3, delta=DELTA)
        accounting.clear_caches()
    if args.one == "ledger":
        result = measure_ledger(args.d)
    elif args.one == "calibrate":
        result = measure_calibrate(args.d)
    else:
        result = measure_round(args.d, args.one)
    result.update(kind=args.one, d=args.d, threads=torch.get_num_threads())
    print(json.dumps(result))


def spawn(args, kind: str, distinct: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", kind, "--d", str(distinct)]
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = "1"
    repo = os.path.abspath(args.repo) if args.repo else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed ({shlex.join(cmd)}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rotations(values: list[int], repeat: int) -> list[int]:
    shift = repeat % len(values)
    return values[shift:] + values[:shift]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--distinct", type=int, nargs="+", default=[1, 5, 20, 100])
    parser.add_argument("--skip", nargs="*", default=[], choices=["ledger", "calibrate", "round"], help="measurements to leave out")
    parser.add_argument("--repo", help="import privfl from this checkout instead of this one")
    parser.add_argument("--one", choices=["ledger", "calibrate", "bare", "privfl"], help=argparse.SUPPRESS)
    parser.add_argument("--d", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        child(args)
        return

    print("command: " + shlex.join([os.path.relpath(sys.executable), *sys.argv]))
    print(f"privfl from {os.path.abspath(args.repo) if args.repo else 'this checkout'}; threads: torch 1, OMP/MKL/OpenBLAS 1; "
          f"{os.cpu_count()} CPUs; load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    ledger_ds = [d for d in args.distinct if d <= LEDGER_CLIENTS]
    round_ds = [d for d in args.distinct if d <= ROUND_CLIENTS]
    samples: dict[tuple[str, int], list[dict]] = {}
    for repeat in range(args.repeats):
        for kind in ("ledger", "calibrate"):
            if kind in args.skip:
                continue
            for d in _rotations(ledger_ds, repeat):
                result = spawn(args, kind, d)
                samples.setdefault((kind, d), []).append(result)
                print(f"  #{repeat} {kind} d={d}: cpu {result['cpu']:.3f} s, wall {result['wall']:.3f} s", file=sys.stderr, flush=True)
        if "round" not in args.skip:
            for d in _rotations(round_ds, repeat):
                for variant in ("bare", "privfl") if repeat % 2 == 0 else ("privfl", "bare"):
                    result = spawn(args, variant, d)
                    samples.setdefault((variant, d), []).append(result)
                    print(f"  #{repeat} round {variant} d={d}: cpu {result['cpu']:.3f} s, wall {result['wall']:.3f} s",
                          file=sys.stderr, flush=True)
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    med = statistics.median
    for kind, title in (("ledger", f"ledger round, {LEDGER_CLIENTS} clients (epsilon_if + charge each)"),
                        ("calibrate", f"noise calibration, {LEDGER_CLIENTS} clients (once per distinct plan)")):
        if kind in args.skip:
            continue
        print(f"\n{title}; ratio to d = {ledger_ds[0]} per repeat")
        print("| distinct q | CPU s | wall s | CPU ratio med (min) | wall ratio med |" + (" first round CPU s |" if kind == "ledger" else ""))
        print("|---:|---:|---:|---:|---:|" + ("---:|" if kind == "ledger" else ""))
        base = samples[kind, ledger_ds[0]]
        for d in ledger_ds:
            rows = samples[kind, d]
            r_cpu = [x["cpu"] / b["cpu"] for x, b in zip(rows, base, strict=True)]
            r_wall = [x["wall"] / b["wall"] for x, b in zip(rows, base, strict=True)]
            extra = f" {med(x['first_cpu'] for x in rows):.3f} |" if kind == "ledger" else ""
            print(f"| {rows[0]['distinct_q']} | {med(x['cpu'] for x in rows):.3f} | {med(x['wall'] for x in rows):.3f} "
                  f"| {med(r_cpu):.2f} ({min(r_cpu):.2f}) | {med(r_wall):.2f} |{extra}")
    if "round" not in args.skip:
        print(f"\nfederation round 2 of 2, {ROUND_CLIENTS} clients, plaintext, sigma 1.0; privfl / bare Opacus per repeat")
        print("| distinct q | bare CPU s | privfl CPU s | CPU ratio med (min) | wall ratio med |")
        print("|---:|---:|---:|---:|---:|")
        for d in round_ds:
            bare, ours = samples["bare", d], samples["privfl", d]
            r_cpu = [p["cpu"] / b["cpu"] for p, b in zip(ours, bare, strict=True)]
            r_wall = [p["wall"] / b["wall"] for p, b in zip(ours, bare, strict=True)]
            print(f"| {ours[0]['distinct_q']} | {med(b['cpu'] for b in bare):.3f} | {med(p['cpu'] for p in ours):.3f} "
                  f"| {med(r_cpu):.2f} ({min(r_cpu):.2f}) | {med(r_wall):.2f} |")


if __name__ == "__main__":
    main()
