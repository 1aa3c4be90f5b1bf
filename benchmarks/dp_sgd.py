"""Cost of one DP-SGD step through privfl's training path (``train_dp_sgd``) against one non-private step.

Every private variant is a whole ``train_dp_sgd`` call (Poisson loader, clipping, noise, optimizer,
the DP bookkeeping around it): per-sample gradients (Opacus hooks), ghost clipping (Opacus, two
backward passes) and book-keeping (privfl, one backward pass). The baseline is a plain PyTorch loop
(mean cross-entropy, backward, SGD step) over the same Poisson batches from the same loader.

A step's cost is measured by differencing: each variant runs on a dataset of ``short`` and of
``long`` batches (batch size 64, so ``short`` and ``long`` steps), and the cost of one step is
``(t(long) - t(short)) / (long - short)``, which cancels the fixed set-up of a call (Opacus'
make_private, the first parameter copy). The variants take turns within each repeat, so a burst of
load from elsewhere hits all of them alike; each repeat gives one ratio per variant, and the table
shows the median and the min of the ratios, for CPU time (``time.process_time``) and wall time.
The "noise draw" row times only the Gaussian draws of one step (one per parameter, torch's CPU
generator), the part of a DP-SGD step no clipping method removes. Threads are pinned
(``--threads``, 1 by default, and OMP_NUM_THREADS). Prints one table:

    python benchmarks/dp_sgd.py
    python benchmarks/dp_sgd.py --models wide-mlp --repeats 7 --short 4 --long 24
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

VARIANTS = ("non-private", "per_sample", "ghost", "bookkeeping", "noise draw")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", default="digits-cnn,cifar-cnn,small-mlp,wide-mlp", help="comma-separated subset")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--short", type=int, default=4, help="steps of the short run")
    parser.add_argument("--long", type=int, default=24, help="steps of the long run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS[1:]), help="private variants, comma-separated")
    args = parser.parse_args()
    args.variants = ("non-private", *(v.strip() for v in args.variants.split(",") if v.strip() != "non-private"))
    if not set(args.variants) <= set(VARIANTS):
        sys.exit(f"unknown variant(s) in {args.variants}; choose from {VARIANTS[1:]}")
    # Before torch loads: its OpenMP pool reads this once.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    cases = _cases()
    chosen = [name.strip() for name in args.models.split(",")]
    unknown = [name for name in chosen if name not in cases]
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; choose from {sorted(cases)}")

    print(
        f"per-step cost by differencing {args.short} and {args.long} steps, expected batch {args.batch_size}, "
        f"{args.repeats} interleaved repeats, {torch.get_num_threads()} thread(s), torch {torch.__version__}"
    )
    header = (
        "| model | params | variant | ms/step CPU | / non-private CPU (median, min) | / non-private wall (median, min) |"
    )
    print(header)
    print("|---|---:|---|---:|---|---|")
    for name in chosen:
        title, build, shape = cases[name]
        _report(title, build, shape, args)


def _cases() -> dict[str, tuple[str, Callable, tuple[int, ...]]]:
    from torch import nn

    from privfl.models import MLP, SmallCNN

    def cifar_cnn() -> nn.Module:
        # A small CNN on 3x32x32 inputs, GroupNorm so DP-SGD applies.
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(256, 10),
        )  # fmt: skip

    return {
        "digits-cnn": ("small CNN 8x8 (digits)", lambda: SmallCNN(10), (1, 8, 8)),
        "cifar-cnn": ("small CNN 3x32x32", cifar_cnn, (3, 32, 32)),
        "wide-mlp": ("wide MLP 1024-1024-1024-10", lambda: MLP(1024, 10, hidden=1024), (1024,)),
        "small-mlp": ("small MLP 30-64-64-10", lambda: MLP(30, 10, hidden=64), (30,)),
    }


def _report(title: str, build: Callable, shape: tuple[int, ...], args: argparse.Namespace) -> None:
    import torch

    from privfl.config import ClippingMode
    from privfl.training import choose_clipping

    generator = torch.Generator().manual_seed(0)
    datasets = {}
    for steps in (args.short, args.long):
        n = steps * args.batch_size  # ceil(n / batch) = steps batches of one epoch
        inputs = torch.rand((n, *shape), generator=generator)
        labels = torch.randint(0, 10, (n,), generator=generator)
        datasets[steps] = torch.utils.data.TensorDataset(inputs, labels)
    torch.manual_seed(0)
    initial = build()
    params = sum(p.numel() for p in initial.parameters())
    auto = choose_clipping(initial, ClippingMode.AUTO).value

    variants: tuple[str, ...] = args.variants
    for variant in variants:  # warm-up: first calls pay for imports and allocator growth
        _timed(variant, initial, datasets[args.short], args.batch_size)
    per_step: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for repeat in range(args.repeats):
        # The variants take turns, each repeat starting one further along.
        order = variants[repeat % len(variants) :] + variants[: repeat % len(variants)]
        for variant in order:
            short_cpu, short_wall = _timed(variant, initial, datasets[args.short], args.batch_size)
            long_cpu, long_wall = _timed(variant, initial, datasets[args.long], args.batch_size)
            steps = args.long - args.short
            per_step[variant].append(((long_cpu - short_cpu) / steps, (long_wall - short_wall) / steps))
    base = per_step["non-private"]
    for variant in variants:
        cpu_ms = statistics.median(c for c, _ in per_step[variant]) * 1000
        label = variant + (" (auto)" if variant == auto else "")
        if variant == "non-private":
            ratios = "1 | 1"
        else:
            cpu = [c / b for (c, _), (b, _) in zip(per_step[variant], base, strict=True)]
            wall = [w / b for (_, w), (_, b) in zip(per_step[variant], base, strict=True)]
            ratios = f"{statistics.median(cpu):.2f}x, {min(cpu):.2f}x | {statistics.median(wall):.2f}x, {min(wall):.2f}x"
        print(f"| {title} | {params:,} | {label} | {cpu_ms:.1f} | {ratios} |", flush=True)


def _timed(variant: str, initial, dataset, batch_size: int) -> tuple[float, float]:
    """CPU and wall seconds of one training call of ``variant`` on a fresh copy of ``initial``."""
    import copy

    import torch
    from torch import nn

    from privfl.config import DPConfig, TrainingConfig
    from privfl.training import _poisson_loader, sampling_plan, train_dp_sgd

    model = copy.deepcopy(initial)
    cpu = torch.device("cpu")
    clipping = variant if variant in ("per_sample", "ghost", "bookkeeping") else "per_sample"
    config = TrainingConfig(
        batch_size=batch_size, learning_rate=0.01, dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, clipping=clipping)
    )
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    if variant == "noise draw":
        # The floor of any DP-SGD step: one Gaussian per parameter from torch's generator, as drawn.
        buffers = [torch.empty_like(p) for p in model.parameters()]
        generator = torch.Generator().manual_seed(0)
        for _ in range(len(dataset) // batch_size):
            for buffer in buffers:
                buffer.normal_(0.0, 1.0, generator=generator)
    elif variant == "non-private":
        # The same Poisson batches (same seed) as train_dp_sgd draws, through a plain PyTorch step.
        sample_rate, steps = sampling_plan(len(dataset), config)
        loader = _poisson_loader(dataset, sample_rate, steps, torch.Generator().manual_seed(0 ^ 0x5A5A5A5A))
        optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
        criterion = nn.CrossEntropyLoss()
        model.train()
        for inputs, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(labels):
                criterion(model(inputs), labels).backward()
                optimizer.step()
    else:
        train_dp_sgd(model, dataset, config=config, noise_multiplier=1.0, device=cpu, seed=0)
    return time.process_time() - start_cpu, time.perf_counter() - start_wall


if __name__ == "__main__":
    main()
