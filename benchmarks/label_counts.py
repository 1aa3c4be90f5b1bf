"""Label counts read from FedAvg updates of photo crops: `update_label_counts` with its per-input fit, the bias
estimate alone (``fit=False``), and how often ``strict=True`` refuses.

Scenario as in benchmarks/attacks_quality.py: `photo_convnet` (ReLU or sigmoid, seed-0 initialization), untrained
or after 300 SGD steps on "which photograph, which quadrant" (`trained_photo_convnet`); crop set ``s`` is 4 crops
drawn with seed ``s``, labelled by their quadrant (trained model) or at random with seed ``s`` (untrained); the
update is `fedavg_update` of the 4 crops over K steps of batch B at learning rate lr. "Exact" counts crop sets
whose whole label multiset is right; "labels" is the multiset overlap summed over crop sets.

    OMP_NUM_THREADS=1 python benchmarks/label_counts.py --crop-sets 8-39
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attacks_quality import (
    photo_convnet,
    photo_crop_positions,
    photo_crops,
    photo_quadrant_labels,
    trained_photo_convnet,
)

from privfl.attacks import UpdateObservation
from privfl.attacks.evaluate import fedavg_update
from privfl.attacks.fedavg import update_label_counts
from privfl.errors import AttackError

INPUTS = 4
# (activation, trained steps, local steps K, batch B, lr)
ROWS = [
    ("relu", 0, 4, 2, 0.1),
    ("relu", 300, 4, 2, 0.1),
    ("relu", 300, 4, 4, 0.1),
    ("relu", 300, 4, 4, 0.01),
    ("relu", 300, 1, 4, 0.1),
    ("sigmoid", 0, 4, 2, 0.1),
    ("sigmoid", 300, 4, 2, 0.1),
]


def _victims(trained: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    crops = photo_crops(INPUTS, size=size, seed=seed)
    if trained:
        return crops, photo_quadrant_labels(photo_crop_positions(INPUTS, size=size, seed=seed), size=size)
    return crops, torch.randint(0, 10, (INPUTS,), generator=torch.Generator().manual_seed(seed))


def _score(counts: torch.Tensor, true: torch.Tensor) -> int:
    return int(torch.minimum(counts.cpu(), true).sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop-sets", default="8-39", help="LO-HI, inclusive (0-7 are the attack benchmarks' sets)")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lo, hi = (int(part) for part in args.crop_sets.split("-"))
    sets = range(lo, hi + 1)
    models: dict[tuple[str, int], torch.nn.Module] = {}
    print(f"{INPUTS} crops of {args.size}x{args.size} per update, crop sets {lo}-{hi}, {args.threads} thread(s)\n")
    print("| model | update | exact, with the fit | labels, with the fit | exact, bias alone | labels, bias alone "
          "| strict: refused (wrong among them) | s/call with the fit |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for activation, trained, steps, batch, lr in ROWS:
        key = (activation, trained)
        if key not in models:
            models[key] = (trained_photo_convnet(trained, size=args.size, activation=activation)[0] if trained
                           else photo_convnet(size=args.size, activation=activation))
        model = models[key]
        exact = labels = exact_bias = labels_bias = refused = refused_wrong = 0
        seconds = 0.0
        for seed in sets:
            crops, true_labels = _victims(trained, seed, args.size)
            delta = fedavg_update(model, crops, true_labels, local_steps=steps, lr=lr, batch_size=batch)
            observation = UpdateObservation(delta=tuple(delta), input_shape=tuple(crops.shape[1:]), num_samples=INPUTS,
                                            local_steps=steps, lr=lr, batch_size=batch)
            true = torch.bincount(true_labels, minlength=10)
            started = time.process_time()
            got = _score(update_label_counts(model, observation), true)
            seconds += time.process_time() - started
            labels, exact = labels + got, exact + (got == INPUTS)
            got_bias = _score(update_label_counts(model, observation, fit=False), true)
            labels_bias, exact_bias = labels_bias + got_bias, exact_bias + (got_bias == INPUTS)
            try:
                update_label_counts(model, observation, strict=True)
            except AttackError:
                refused += 1
                refused_wrong += got != INPUTS
        n = len(sets)
        name = f"{activation} {'trained ' + str(trained) + ' steps' if trained else 'untrained'}"
        print(f"| {name} | K={steps} B={batch} lr={lr} | {exact}/{n} | {labels}/{INPUTS * n} | {exact_bias}/{n} | "
              f"{labels_bias}/{INPUTS * n} | {refused} ({refused_wrong}) | {seconds / n:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
