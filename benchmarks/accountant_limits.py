"""Accountant limits: time of every accountant call over the documented grid, and its margin over PLD at 1e-5.

Run: .venv/bin/python benchmarks/accountant_limits.py [--quick]

For each (sigma, q, steps) it times ``privfl.accounting.epsilon`` per accountant (cache cleared)
and compares with dp-accounting's pessimistic PLD at a 1e-5 loss grid (1e-4 below sigma 1 or above
epsilon 50, where every epsilon is 0.3 or more, and 1e-3 above epsilon 2000, to keep the reference affordable; a coarser pessimistic grid
only raises the reference, so the check is, if anything, stricter there). A
negative margin would be under-reporting. It also times ``noise_multiplier`` on a few targets.
"""

from __future__ import annotations

import argparse
import itertools
import time

import dp_accounting

from privfl import accounting
from privfl.errors import PrivflError

DELTA = 1e-5


def reference(sigma: float, q: float, steps: int) -> float:
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    coarse = accounting._pld_at([(sigma, q, steps)], DELTA, 1e-3)
    interval = 1e-5 if coarse < 50 and sigma >= 1 else 1e-4 if coarse < 2000 else 1e-3
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=interval)
    acc.compose(event)
    return float(acc.get_epsilon(DELTA)), interval


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sigmas = (0.5, 1.0, 5.0, 50.0) if not args.quick else (0.5, 1.0, 50.0)
    rates = (0.001, 0.01, 0.2, 1.0) if not args.quick else (0.01, 0.5)
    step_counts = (1, 100, 5000, 50000) if not args.quick else (100, 50000)
    worst = {k: 0.0 for k in accounting.Accountant}
    # Import Opacus (and torch behind it) and dp-accounting before timing: a process pays that once.
    for kind in accounting.Accountant:
        accounting.epsilon(noise_multiplier=1.0, sample_rate=0.5, steps=3, delta=DELTA, accountant=kind)
    print("| sigma | q | steps | PLD reference (grid) | prv | t prv (s) | pld | t pld | rdp | t rdp |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for sigma, q, steps in itertools.product(sigmas, rates, step_counts):
        ref, interval = reference(sigma, q, steps)
        row = [f"{sigma:g}", f"{q:g}", str(steps), f"{ref:.5g} ({interval:g})"]
        for kind in (accounting.Accountant.PRV, accounting.Accountant.PLD, accounting.Accountant.RDP):
            accounting.clear_caches()
            start = time.perf_counter()
            try:
                eps = accounting.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant=kind)
            except PrivflError as exc:
                row += [f"error {exc}", "-"]
                continue
            spent = time.perf_counter() - start
            worst[kind] = max(worst[kind], spent)
            flag = "" if eps >= ref * (1 - 1e-9) else " UNDER"
            row += [f"{eps:.5g}{flag}", f"{spent:.2f}"]
        print("| " + " | ".join(row) + " |", flush=True)
    print("worst epsilon() seconds:", {k.value: round(v, 2) for k, v in worst.items()})
    print("\n| target | q | steps | accountant | sigma | seconds |")
    print("|---|---|---|---|---|---|")
    for target, q, steps in ((0.05, 1.0, 50000), (0.13, 0.01, 20000), (1.0, 0.01, 46000), (8.0, 0.5, 50000), (3.0, 0.2, 21480)):
        for kind in accounting.Accountant:
            accounting.clear_caches()
            start = time.perf_counter()
            try:
                sigma = f"{accounting.noise_multiplier(target_epsilon=target, sample_rate=q, steps=steps, delta=DELTA, accountant=kind):.5g}"
            except PrivflError as exc:
                sigma = f"error {exc}"
            print(f"| {target:g} | {q:g} | {steps} | {kind.value} | {sigma} | {time.perf_counter() - start:.2f} |", flush=True)


if __name__ == "__main__":
    main()
