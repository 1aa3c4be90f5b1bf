"""Accountant cost of a federation's ledger calls, with many distinct client sizes.

Usage: ``python benchmarks/ledger_cost.py [--clients 20] [--rounds 10] [--accountant prv] [--module FILE]``

``--module`` times another revision of privfl/accounting.py, e.g. the one before the accountant's results were shared between clients of one size:
``git show 3853b09:privfl/accounting.py > /tmp/accounting_before.py`` then ``--module /tmp/accounting_before.py``.

Simulates what the round driver asks the ledger (privfl/federation.py): at plan time one noise
calibration per distinct (sample rate, steps) over the whole run, then every round, for every
client, ``epsilon_if`` (the budget check), ``charge`` and ``epsilon`` (the round record). Every
client has a different dataset size, so a different sample rate, step count and noise multiplier:
the case where the accountant had to be evaluated once per client per round.
Prints process (CPU) time and wall time per phase; one thread for numpy's FFTs is not forced, so
run it with ``OMP_NUM_THREADS=1`` for CPU figures that compare across machines.

Measured 2026-11-30 (shared 2-core container under load, so CPU time; ``OMP_NUM_THREADS=1``),
this revision against 3853b09 (``--module``), PRV, 20 clients of 20 sizes x 10 rounds:

| run | calibration CPU s | ledger calls CPU s | per round CPU s |
|---|---|---|---|
| default (batch 32, calibrated to epsilon 3) | 5.2 (was 27.5) | 1.7 (was 9.5) | 0.09-0.34 (was 0.81-1.27) |
| ``--skip-calibration`` | - | 1.3 (was 6.3) | 0.09-0.20 (was 0.55-0.70) |
| ``--skip-calibration --batch-size 8`` | - | 1.8 (was 7.7) | 0.12-0.24 (was 0.52-1.06) |
| ``--skip-calibration --distinct 1`` | - | 0.03 (was 0.11) | <= 0.02 |
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time


def _clock() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--distinct", type=int, default=0, help="distinct client sizes (default: one per client)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--target-epsilon", type=float, default=3.0)
    parser.add_argument("--accountant", default="prv")
    parser.add_argument("--skip-calibration", action="store_true", help="use sigma = 1.0 + size / 1000 instead")
    parser.add_argument("--module", help="load privfl.accounting from this file (another revision)")
    args = parser.parse_args()
    if args.module:
        spec = importlib.util.spec_from_file_location("privfl.accounting", args.module)
        module = importlib.util.module_from_spec(spec)
        sys.modules["privfl.accounting"] = module
        spec.loader.exec_module(module)
    from privfl.accounting import ClientBudget, DPEvent, PrivacyLedger, epsilon, noise_multiplier

    epsilon(noise_multiplier=1.0, sample_rate=0.5, steps=3, delta=1e-5, accountant=args.accountant)  # imports, not timed
    delta = 1e-5
    distinct = args.distinct or args.clients
    sizes = [200 + 97 * (k % distinct) for k in range(args.clients)]  # distinct sizes: distinct q, steps, sigma
    plans = []
    c0, w0 = _clock()
    for k, n in enumerate(sizes):
        batches = math.ceil(n / args.batch_size)
        q, steps = 1.0 / batches, batches
        if args.skip_calibration:
            sigma = 1.0 + n / 1000
        else:
            sigma = noise_multiplier(
                target_epsilon=args.target_epsilon, sample_rate=q, steps=steps * args.rounds, delta=delta, accountant=args.accountant
            )
        plans.append((f"site-{k}", DPEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)))
    c1, w1 = _clock()
    ledger = PrivacyLedger(accountant=args.accountant)
    for name, _ in plans:
        ledger.register(name, ClientBudget(epsilon=args.target_epsilon * 1.001, delta=delta))
    per_round = []
    for round_index in range(args.rounds):
        r0 = _clock()
        for name, event in plans:
            if ledger.epsilon_if(name, event) <= ledger.budget(name).epsilon:
                ledger.charge(round_index, name, event)
            else:
                ledger.record_skip(round_index, name, reason="budget")
        final = {name: ledger.epsilon(name) for name, _ in plans}
        r1 = _clock()
        per_round.append((r1[0] - r0[0], r1[1] - r0[1]))
    c2, w2 = _clock()
    print(f"{args.clients} clients of {len(set(sizes))} sizes x {args.rounds} rounds, accountant {args.accountant}")
    print(f"calibration (plan):  cpu {c1 - c0:8.2f} s  wall {w1 - w0:8.2f} s")
    print(f"ledger calls (run):  cpu {c2 - c1:8.2f} s  wall {w2 - w1:8.2f} s")
    print("per round cpu s: " + " ".join(f"{c:.2f}" for c, _ in per_round))
    cache = getattr(sys.modules["privfl.accounting"], "_STEP_PRVS", None)
    if cache is not None:
        print(f"PRV step cache: {cache.hits} hits, {cache.misses} misses, {cache._bytes / 2**20:.0f} MiB held")
    print(f"max epsilon after the run: {max(final.values()):.4f} (target {args.target_epsilon})")
    print("epsilons: " + " ".join(f"{final[name]:.4f}" for name, _ in plans))


if __name__ == "__main__":
    main()
