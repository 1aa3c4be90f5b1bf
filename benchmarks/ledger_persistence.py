"""Ledger persistence cost per charge: the append-only journal against rewriting the whole ledger.

Usage: ``python benchmarks/ledger_persistence.py [--clients 300] [--rounds 10] [--reopen-lines 100 1000 5000]``

Format 1 rewrote the whole ledger (one JSON document) after every charge, so a charge cost grew
with the number of entries before it: quadratic over a run. The journal appends one fsynced line.
Both are measured here on the same charges (accountant time excluded: the in-memory ledger makes
the same charges first, so every epsilon is cached). ``save()`` writes a whole ledger the way
format 1 did after each charge (temporary file, fsync, rename), so it stands in for the old cost.

A deployed site reaches its ledger once per request. ``--reopen-lines`` times that access for a
one-site ledger of that many lines: ``PrivacyLedger.open`` (every line verified again, what each
request cost before) against ``reopen()`` (the file checked to be as the site left it), median of
20 accesses each, taking turns.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from privfl.accounting import ClientBudget, DPEvent, LedgerKey, PrivacyLedger


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--reopen-lines", type=int, nargs="*", default=[100, 1000, 5000])
    args = parser.parse_args()
    event = DPEvent(noise_multiplier=1.1, sample_rate=0.05, steps=20)
    clients = [f"site-{i}" for i in range(args.clients)]
    budget = ClientBudget(epsilon=1e6, delta=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        memory = PrivacyLedger()
        journal = PrivacyLedger.create(Path(tmp) / "ledger.jsonl", key=LedgerKey.generate())
        for client in clients:
            memory.register(client, budget)
            journal.register(client, budget)
        rewrite, append = [], []
        for round_index in range(args.rounds):
            for client in clients:
                memory.charge(round_index, client, event)  # warms the accountant cache
                t0 = time.perf_counter()
                memory.save(Path(tmp) / "whole.jsonl")  # what every charge cost before
                rewrite.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                journal.charge(round_index, client, event)
                append.append(time.perf_counter() - t0)
        journal.close()
    n = args.clients * args.rounds
    print(f"{args.clients} clients x {args.rounds} rounds = {n} charges")
    print(f"{'':24} {'mean ms':>8} {'last-round ms':>14} {'total s':>8}")
    for name, times in (("rewrite whole ledger", rewrite), ("append journal line", append)):
        last = statistics.mean(times[-args.clients :]) * 1e3
        print(f"{name:24} {statistics.mean(times) * 1e3:8.3f} {last:14.3f} {sum(times):8.2f}")
    if args.reopen_lines:
        print(f"\n{'one-site ledger lines':>22} {'open ms (median)':>17} {'reopen ms (median)':>19}")
        for lines in args.reopen_lines:
            times = _access_times(lines, event)
            print(f"{lines:22d} {statistics.median(t[0] for t in times) * 1e3:17.3f} {statistics.median(t[1] for t in times) * 1e3:19.3f}")


def _access_times(lines: int, event: DPEvent, repeats: int = 20) -> list[tuple[float, float]]:
    """(open, reopen) seconds of ``repeats`` accesses to a one-site ledger of ``lines`` lines, taking turns."""
    with tempfile.TemporaryDirectory() as tmp:
        key = LedgerKey.generate()
        path = Path(tmp) / "ledger.jsonl"
        ledger = PrivacyLedger.create(path, key=key, accountant="rdp")  # RDP: building the file stays quick
        ledger.register("site", ClientBudget(epsilon=1e6, delta=1e-5))
        while ledger.lines < lines:
            ledger.charge(ledger.lines, "site", event)
        ledger.close()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            PrivacyLedger.open(path, key=key).close()
            t1 = time.perf_counter()
            assert ledger.reopen()
            t2 = time.perf_counter()
            ledger.close()
            times.append((t1 - t0, t2 - t1))
        return times


if __name__ == "__main__":
    main()
