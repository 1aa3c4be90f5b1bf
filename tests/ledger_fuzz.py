"""Mutations of run-directory files for the fuzz tests and the campaign (not a test module).

``python tests/ledger_fuzz.py --count 20000`` runs the campaign: it mutates a real ledger journal
``count`` times and loads each mutant, counting what happened. Every outcome must be an accepted
prefix of the original (a torn or cut tail) or a LedgerError; anything else is a bug.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import random
import sys
import tempfile
import time
from pathlib import Path

from privfl.accounting import ClientBudget, DPEvent, LedgerKey, PrivacyLedger
from privfl.errors import LedgerError

TOKENS = [b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"\n", b"null", b"true", b"-1", b"1e999", b"NaN", b"0", b" ", b"\x00", b"\xff", b"[[[[[[[[[[" * 400]


def sample_ledger(directory: Path, *, key: LedgerKey | None) -> Path:
    """A small journal with every kind of line: header, budgets, charges, a skip, a note, a resume."""
    path = directory / "ledger.jsonl"
    ledger = PrivacyLedger.create(path, key=key, run_identity={"training": {}, "federation": {"seed": 0}, "clients": {}})
    ledger.register("site-a", ClientBudget(epsilon=8.0, delta=1e-5))
    ledger.register("site-b", ClientBudget(epsilon=math.inf, delta=1e-5))
    event = DPEvent(noise_multiplier=1.1, sample_rate=0.1, steps=10)
    for round_index in range(3):
        ledger.charge(round_index, "site-a", event)
        ledger.charge(round_index, "site-b", event)
    ledger.annotate_last("site-b", "update not aggregated in round 2: dropped")
    ledger.mark_resume(3)
    ledger.record_skip(3, "site-a", reason="budget")
    ledger.close()
    return path


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three random edits: byte flips, deletions, insertions, truncation, line swaps or duplicates."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif op == 1:
            del out[pos : pos + rng.randint(1, 40)]
        elif op == 2:
            out[pos:pos] = rng.choice(TOKENS)
        elif op == 3:
            del out[pos:]
        else:
            lines = bytes(out).split(b"\n")
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            if op == 4:
                lines[i], lines[j] = lines[j], lines[i]
            elif op == 5:
                lines.insert(j, lines[i])
            else:
                del lines[i]
            out = bytearray(b"\n".join(lines))
    return bytes(out)


def classify(path: Path, key: LedgerKey | None, original: PrivacyLedger) -> str:
    """``'prefix'`` (accepted, a prefix of the original), ``'LedgerError'``, or a bug's name."""
    try:
        loaded = PrivacyLedger.load(path, key=key)
    except LedgerError:
        return "LedgerError"
    except Exception as exc:  # the campaign counts every untyped error
        return f"BUG {type(exc).__name__}"
    entries = loaded.entries
    same = len(entries) <= len(original.entries) and all(
        # A cut can fall between an entry and a later note on it: notes may be shorter.
        dataclasses.replace(a, note="") == dataclasses.replace(b, note="") and b.note.startswith(a.note)
        for a, b in zip(entries, original.entries, strict=False)
    )
    if not same or loaded.clients != original.clients[: len(loaded.clients)]:
        return "BUG accepted an edit"
    return "prefix"


def campaign(count: int, seed: int) -> collections.Counter:
    rng = random.Random(seed)
    counts: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        key = LedgerKey.generate()
        base = sample_ledger(Path(tmp), key=key)
        original = PrivacyLedger.load(base, key=key)
        data = base.read_bytes()
        mutant = Path(tmp) / "mutant.jsonl"
        for _ in range(count):
            mutant.write_bytes(mutate(data, rng))
            counts[classify(mutant, key, original)] += 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)  # each torn tail logs a warning
    started = time.perf_counter()
    counts = campaign(args.count, args.seed)
    for outcome, n in sorted(counts.items()):
        print(f"{outcome:24} {n}")
    print(f"{args.count} mutants in {time.perf_counter() - started:.1f}s")
    return 1 if any(k.startswith("BUG") for k in counts) else 0


if __name__ == "__main__":
    sys.exit(main())
