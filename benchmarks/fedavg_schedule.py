"""How `FedAvgInversion`'s TV prior starts and falls: PSNR on held-out crop sets for several ``tv_start`` weights
and ``tv_anneal`` fractions.

The attack starts its total-variation weight at ``tv_start`` (0.2) and lowers it, cosine-shaped, to the model's
own weight (1e-2 on ReLU models, 0 on sigmoid ones) over the first ``tv_anneal`` fraction of its iterations.
This script runs `FedAvgInversion(max_iterations=..., seed=0, tv_start=s, tv_anneal=a)` for each pair ``(s, a)`` on the
photograph scenarios of benchmarks/attacks_quality.py (`photo_model`, `photo_victims`, `photo_observation`), on
crop sets the comparison with breaching does not score (8 and up), the variants interleaved crop set by crop
set. It prints PSNR per crop set (best one-to-one match, pixels in [0, 1]) and the median, mean and minimum.

    OMP_NUM_THREADS=1 python benchmarks/fedavg_schedule.py --tv-anneal 0.5 0.75 --iterations 500
    OMP_NUM_THREADS=1 python benchmarks/fedavg_schedule.py --tv-start 0.2 0.5 --tv-anneal 0.75 --iterations 500

Every ``--tv-start`` runs with every ``--tv-anneal``; the first pair is the baseline of the last column.

``--cases`` picks rows by name (default: all of CASES); ``--crop-sets 8-23`` overrides each case's own range.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attacks_quality import PhotoCase, photo_model, photo_observation, photo_victims

from privfl.attacks import FedAvgInversion
from privfl.attacks.metrics import best_match
from privfl.errors import ConfigError

_KNOWN = "FedAvg 4 images, 4 steps of batch 2, lr 0.1, labels known"
_ESTIMATED = "FedAvg 4 images, 4 steps of batch 2, lr 0.1, labels estimated"
_FULL = "FedAvg 4 images, 4 full-batch steps, lr 0.1, labels known"

# name: (case, first crop set, last crop set). 16x16 cases with labels known use 16 crop sets; the slower 32x32,
# estimated-label and full-batch cases 8.
CASES: dict[str, tuple[PhotoCase, int, int]] = {
    "sigmoid": (PhotoCase(_KNOWN, 4, 4, 2, labels_known=True, activation="sigmoid"), 8, 23),
    "relu": (PhotoCase(_KNOWN, 4, 4, 2, labels_known=True), 8, 23),
    "relu-32": (PhotoCase(_KNOWN, 4, 4, 2, labels_known=True, size=32), 8, 15),
    "sigmoid-32": (PhotoCase(_KNOWN, 4, 4, 2, labels_known=True, activation="sigmoid", size=32), 8, 15),
    "relu-trained": (PhotoCase(_KNOWN, 4, 4, 2, labels_known=True, train_steps=300), 8, 23),
    "sigmoid-estimated": (PhotoCase(_ESTIMATED, 4, 4, 2, activation="sigmoid"), 8, 15),
    "relu-estimated": (PhotoCase(_ESTIMATED, 4, 4, 2), 8, 15),
    "relu-full-batch": (PhotoCase(_FULL, 4, 4, 4, labels_known=True), 8, 15),
    "sigmoid-full-batch": (PhotoCase(_FULL, 4, 4, 4, labels_known=True, activation="sigmoid"), 8, 15),
}


def _crop_range(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    low, high = int(first), int(last or first)
    if low < 0 or high < low:
        raise argparse.ArgumentTypeError(f"--crop-sets {text!r}: expected FIRST-LAST with 0 <= FIRST <= LAST")
    return low, high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tv-anneal", type=float, nargs="+", default=[0.5, 0.75], metavar="FRACTION")
    parser.add_argument("--tv-start", type=float, nargs="+", default=[0.2], metavar="WEIGHT")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--crop-sets", type=_crop_range, default=None, metavar="FIRST-LAST")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    variants = [(start, anneal) for start in args.tv_start for anneal in args.tv_anneal]
    try:  # settings the attack refuses are refused here, before any model is built
        for start, anneal in variants:
            FedAvgInversion(max_iterations=args.iterations, seed=0, tv_start=start, tv_anneal=anneal)
    except ConfigError as error:
        parser.error(str(error))

    def label(variant: tuple[float, float]) -> str:
        start, anneal = variant
        return f"tv_anneal {anneal:g}" if len(args.tv_start) == 1 else f"tv_start {start:g}, tv_anneal {anneal:g}"

    if args.threads < 1:
        parser.error(f"--threads {args.threads}: must be at least 1")
    torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}; {args.iterations} iterations; seed 0; tv_start {args.tv_start}; "
          f"tv_anneal {args.tv_anneal}", flush=True)
    rows = []
    for name in args.cases:
        case, low, high = CASES[name]
        if args.crop_sets is not None:
            low, high = args.crop_sets
        model, note = photo_model(case)
        if note:
            print(f"  {name}: {note}", flush=True)
        psnr: dict[tuple[float, float], list[float]] = {v: [] for v in variants}
        started = time.perf_counter()
        for crop_set in range(low, high + 1):
            x, y = photo_victims(case, crop_set)
            observation = photo_observation(model, x, y, case)
            for start, anneal in variants:
                attack = FedAvgInversion(max_iterations=args.iterations, seed=0, tv_start=start, tv_anneal=anneal)
                inputs = attack.reconstruct(model, observation).inputs
                psnr[start, anneal].append(float(best_match(inputs.float(), x, data_range=1.0).psnr.mean()))
            done = ", ".join(f"{label(v)}: {psnr[v][-1]:.1f}" for v in variants)
            print(f"  {name} crop set {crop_set} ({time.perf_counter() - started:.0f} s): {done}", flush=True)
        seconds = time.perf_counter() - started
        print(f"{name}: crop sets {low}-{high}, {seconds:.0f} s", flush=True)
        for variant, values in psnr.items():
            line = " ".join(f"{v:.1f}" for v in values)
            print(f"  {label(variant)}: {line} | median {statistics.median(values):.1f} "
                  f"mean {statistics.mean(values):.1f} min {min(values):.1f}", flush=True)
            rows.append((name, variant, values))
    print("\n| case | crop sets | " + " | ".join(f"{label(v)}: median / mean / min" for v in variants)
          + " | crop sets better / worse by > 1 dB (last vs first) |")
    print("|---|---|" + "---|" * (len(variants) + 1))
    for name in args.cases:
        by = {v: values for n, v, values in rows if n == name}
        first, last = by[variants[0]], by[variants[-1]]
        cells = [f"{statistics.median(v):.1f} / {statistics.mean(v):.1f} / {min(v):.1f}" for v in by.values()]
        better = sum(b - a > 1 for a, b in zip(first, last, strict=True))
        worse = sum(a - b > 1 for a, b in zip(first, last, strict=True))
        low, high = args.crop_sets or CASES[name][1:]
        print(f"| {name} | {low}-{high} | " + " | ".join(cells) + f" | {better} / {worse} |")


if __name__ == "__main__":
    main()
