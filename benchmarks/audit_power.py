"""Power and validity of the one-run audits on the Gaussian mechanism with Dirac canaries.

Run: .venv/bin/python benchmarks/audit_power.py [--seeds 50] [--null-reps 300]

Power: m Dirac canaries (``simulate_dirac_canaries``, one full-batch step, so the mechanism is
exactly (1/sigma)-GDP and its epsilon at delta = 1e-5 is known), sigma chosen so that the true
epsilon is 2, 3 or 4; each analysis's certified epsilon as a share of the true one (mean, min,
max over seeds), with the ceiling for that m (a perfect attack with the same guesses).

Validity: (a) no signal (scores independent of membership), where any positive bound is a false
discovery, and (b) at the true mu, where the f-DP (Gaussian-DP) test must reject the mechanism's
own mu at most alpha of the time. Each rate must be at most alpha = 0.05 up to sampling error
(sd ~ 0.013 at 300 repetitions).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import optimize

from privfl.audit.empirical import gaussian_mechanism_epsilon
from privfl.audit.one_run import OneRunAnalysis, f_dp_guess_grid, one_run_epsilon_lower_bound, simulate_dirac_canaries

DELTA = 1e-5
ALPHA = 0.05
EPS_DP = OneRunAnalysis.EPSILON_DP
F_DP = OneRunAnalysis.GAUSSIAN_DP


def sigma_for(epsilon: float) -> float:
    return optimize.brentq(lambda s: gaussian_mechanism_epsilon(s, DELTA) - epsilon, 0.2, 50.0)


def analyses(m: int) -> list[tuple[str, OneRunAnalysis, dict]]:
    k = m // 20
    return [
        (f"eps-DP (Steinke et al.), k = ({k}, {k})", EPS_DP, dict(k_plus=k, k_minus=k)),
        (f"f-DP / GDP (Mahloujifar et al.), k = ({k}, {k})", F_DP, dict(k_plus=k, k_minus=k)),
        (f"f-DP / GDP, k = ({2 * k}, {2 * k})", F_DP, dict(k_plus=2 * k, k_minus=2 * k)),
        (f"f-DP / GDP, f_dp_guess_grid (Bonferroni over {len(f_dp_guess_grid(m))})", F_DP, {}),
    ]


def power(m: int, seeds: int) -> None:
    print(f"\nPower, m = {m}, {seeds} seeds, {1 - ALPHA:.0%} confidence, delta = {DELTA:g}\n")
    print("| true eps | mu | analysis | mean of true | min | max | ceiling |")
    print("|---|---|---|---|---|---|---|")
    for target in (2.0, 3.0, 4.0):
        sigma = sigma_for(target)
        trials = [simulate_dirac_canaries(dimension=m, num_canaries=m, noise_multiplier=sigma, seed=s) for s in range(seeds)]
        for label, analysis, kw in analyses(m):
            bounds = [one_run_epsilon_lower_bound(t.scores, t.included, delta=DELTA, alpha=ALPHA, analysis=analysis, **kw) for t in trials]
            share = np.array([b.epsilon for b in bounds]) / target
            print(
                f"| {target:g} | {1 / sigma:.3f} | {label} | {share.mean():.0%} | {share.min():.0%} | {share.max():.0%} "
                f"| {bounds[0].ceiling:.2f} |",
                flush=True,
            )


def validity(m: int, reps: int) -> None:
    print(f"\nValidity, m = {m}, {reps} repetitions, alpha = {ALPHA}\n")
    print("| case | analysis | rate | count |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(12345)
    nulls = [(rng.normal(size=m), rng.random(m) < 0.5) for _ in range(reps)]
    for label, analysis, kw in analyses(m):
        hits = sum(one_run_epsilon_lower_bound(s, inc, delta=DELTA, alpha=ALPHA, analysis=analysis, **kw).epsilon > 0 for s, inc in nulls)
        print(f"| no signal: bound > 0 | {label} | {hits / reps:.3f} | {hits} / {reps} |", flush=True)
    for target in (2.0, 4.0):
        sigma = sigma_for(target)
        mu = 1 / sigma
        trials = [simulate_dirac_canaries(dimension=m, num_canaries=m, noise_multiplier=sigma, seed=10_000 + s) for s in range(reps)]
        for label, analysis, kw in analyses(m):
            if analysis is not F_DP:
                continue
            hits = sum(one_run_epsilon_lower_bound(t.scores, t.included, delta=DELTA, alpha=ALPHA, analysis=analysis, **kw).mu > mu for t in trials)
            print(f"| true mu = {mu:.3f} (eps {target:g}) rejected | {label} | {hits / reps:.3f} | {hits} / {reps} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--null-reps", type=int, default=300)
    parser.add_argument("--m", type=int, nargs="+", default=[1000])
    args = parser.parse_args()
    start = time.perf_counter()
    for m in args.m:
        power(m, args.seeds)
    validity(1000, args.null_reps)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
