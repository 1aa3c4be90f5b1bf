"""What one Inverting Gradients attack costs: 500 steps on the 8x8-digits ConvNet, one torch thread.

    python benchmarks/attack_cost.py               # 5 trials
    python benchmarks/attack_cost.py --steps 2000 --trials 3

Prints the median and min of CPU (``time.process_time``) and wall seconds over the trials, each on a
fresh seed-0 model and one test digit (the setting of docs/attacks.md's measured table).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attacks_quality import convnet  # the benchmark's own model, one definition

from privfl.attacks import InvertingGradients
from privfl.attacks.evaluate import ObservationSpec, build_observation
from privfl.data import load_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    split = load_digits()
    x, y = split.test.features[:1], split.test.targets[:1]
    cpu, wall = [], []
    for trial in range(args.trials):
        model = convnet()
        observation = build_observation(model, x, y, ObservationSpec())
        w, c = time.perf_counter(), time.process_time()
        InvertingGradients(max_iterations=args.steps, restarts=1, seed=trial).reconstruct(model, observation)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    print(f"{args.steps} Inverting Gradients steps, 8x8 digits ConvNet, 1 torch thread, {args.trials} trials: "
          f"CPU median {statistics.median(cpu):.2f} s (min {min(cpu):.2f}); "
          f"wall median {statistics.median(wall):.2f} s (min {min(wall):.2f})")


if __name__ == "__main__":
    main()
