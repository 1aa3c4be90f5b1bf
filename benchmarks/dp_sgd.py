"""Cost of one DP-SGD step (Opacus, through privfl's training path) against one non-private step.

Same model, same batch, same optimizer; per-sample clipping (hooks) and ghost clipping are both
measured, and privfl's AUTO choice is marked. Prints one table of ratios measured in this run:

    python benchmarks/dp_sgd.py
    python benchmarks/dp_sgd.py --steps 20 --batch-size 64
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

from privfl.config import ClippingMode
from privfl.models import MLP, SmallCNN
from privfl.training import choose_clipping


class CifarCNN(nn.Module):
    """A small CNN on 3x32x32 inputs (about 120k parameters), GroupNorm so DP-SGD applies."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(256, 10),
        )

    def forward(self, x):
        return self.net(x)


def _make_step(model_fn, inputs, labels, mode: str | None):
    """Builds the model (private or not) and returns a function doing one optimizer step."""
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = model_fn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = nn.CrossEntropyLoss()
    if mode is not None:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=len(labels))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            made = PrivacyEngine().make_private(
                module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
                noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode,
            )
        if mode == "ghost":
            model, optimizer, criterion, _ = made
        else:
            model, optimizer, _ = made

    def one():
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up
        one()
    return one


def _interleaved_medians(steppers: dict, steps: int, repeats: int = 5) -> dict:
    # The variants take turns, so a burst of load from elsewhere on a shared machine hits all of
    # them alike; the median of the repeats is reported.
    samples = {name: [] for name in steppers}
    for _ in range(repeats):
        for name, one in steppers.items():
            start = time.perf_counter()
            for _ in range(steps):
                one()
            samples[name].append((time.perf_counter() - start) / steps)
    return {name: sorted(s)[len(s) // 2] for name, s in samples.items()}


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    b = args.batch_size
    cases = [
        ("small CNN 8x8 (digits)", lambda: SmallCNN(10), torch.rand(b, 1, 8, 8)),
        ("small CNN 3x32x32", CifarCNN, torch.rand(b, 3, 32, 32)),
        ("wide MLP 1024-1024-1024-10", lambda: MLP(1024, 10, hidden=1024), torch.rand(b, 1024)),
    ]
    print(f"one optimizer step, batch {b}, {args.steps} timed steps, {torch.get_num_threads()} threads")
    header = f"| {'model':<28} | {'params':>9} | {'non-private s':>13} | {'DP hooks s':>10} | {'DP ghost s':>10} | {'hooks/np':>8} | {'ghost/np':>8} | {'privfl auto':>11} |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name, model_fn, inputs in cases:
        labels = torch.randint(0, 10, (b,))
        params = sum(p.numel() for p in model_fn().parameters())
        steppers = {mode: _make_step(model_fn, inputs, labels, mode) for mode in (None, "hooks", "ghost")}
        times = _interleaved_medians(steppers, args.steps)
        base, hooks, ghost = times[None], times["hooks"], times["ghost"]
        auto = choose_clipping(model_fn(), ClippingMode.AUTO)
        chosen = ghost if auto is ClippingMode.GHOST else hooks
        print(f"| {name:<28} | {params:>9,} | {base:13.4f} | {hooks:10.4f} | {ghost:10.4f} | {hooks / base:8.2f} | {ghost / base:8.2f} | {auto.value + f' {chosen / base:.2f}x':>11} |")


if __name__ == "__main__":
    main()
