"""Measures gradient-inversion quality on digits and breast-cancer under each threat model and prints a table."""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from sklearn.datasets import load_breast_cancer, load_digits

from privfl.attacks import DLG, AggregateObservation, AnalyticLinear, Attack, InvertingGradients, recover_labels
from privfl.attacks.evaluate import ObservationSpec, Protection, Score, build_observation, score
from privfl.attacks.metrics import chance_baseline, label_accuracy, pairwise_psnr


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    return torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1), torch.tensor(data.target)


def cancer() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float32)
    return (x - x.mean(0)) / x.std(0), torch.tensor(data.target)


def convnet() -> torch.nn.Module:
    """Small ConvNet for 8x8 digits (9.9k parameters), at its seed-0 initialization."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1, stride=2), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(32 * 16, 10),
    )


def mlp(inputs: int, hidden: int, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(inputs, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes)
    )


@dataclass
class Row:
    attack: str
    model: str
    seen: str
    trials: int
    psnr: float
    chance: float
    best: float
    best_chance: float
    ssim: float
    labels: float
    max_err: float
    seconds: float


def run_row(
    attack: Attack,
    model: torch.nn.Module,
    model_name: str,
    seen: str,
    data: tuple[torch.Tensor, torch.Tensor],
    spec: ObservationSpec,
    *,
    per_trial: int,
    trials: int,
    baseline: torch.Tensor,
    data_range: float,
) -> Row:
    x, y = data
    scores: list[Score] = []
    seconds: list[float] = []
    for trial in range(trials):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + trial))[:per_trial]
        obs = build_observation(model, x[idx], y[idx], spec)
        start = time.perf_counter()
        rec = attack.reconstruct(model, obs)
        seconds.append(time.perf_counter() - start)
        scores.append(score(rec, x[idx], y[idx], baseline=baseline, data_range=data_range))

    def mean(get: Callable[[Score], float]) -> float:
        return statistics.fmean(get(s) for s in scores)

    return Row(
        attack=attack.name, model=model_name, seen=seen, trials=trials,
        psnr=mean(lambda s: s.psnr), chance=mean(lambda s: s.chance_psnr),
        best=max(s.best_psnr for s in scores) if per_trial > 1 else math.nan,
        best_chance=max(s.best_chance_psnr for s in scores) if per_trial > 1 else math.nan,
        ssim=mean(lambda s: s.ssim), labels=mean(lambda s: s.label_accuracy),
        max_err=max(s.max_abs_error for s in scores), seconds=statistics.fmean(seconds),
    )


def naive_aggregate_row(model: torch.nn.Module, data, spec: ObservationSpec, *, clients: int, trials: int,
                        baseline: torch.Tensor, attack: InvertingGradients) -> Row:
    """Attacker who ignores that the aggregate mixes clients and inverts it as one input."""
    x, y = data
    best, best_chance, seconds = [], [], []
    for trial in range(trials):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + trial))[:clients]
        agg = build_observation(model, x[idx], y[idx], spec)
        assert isinstance(agg, AggregateObservation)
        as_one = AggregateObservation(gradients=agg.gradients, input_shape=agg.input_shape, num_clients=1)
        start = time.perf_counter()
        rec = attack.reconstruct(model, as_one)
        seconds.append(time.perf_counter() - start)
        best.append(float(pairwise_psnr(rec.inputs, x[idx]).max()))
        best_chance.append(float(pairwise_psnr(baseline.unsqueeze(0), x[idx]).max()))
    nan = math.nan
    return Row(attack=attack.name + " (as 1 input)", model="convnet", seen=f"aggregate {clients}x1", trials=trials,
               psnr=nan, chance=nan, best=max(best), best_chance=max(best_chance), ssim=nan, labels=nan,
               max_err=nan, seconds=statistics.fmean(seconds))


def label_row(model: torch.nn.Module, data, *, per_trial: int, trials: int) -> Row:
    x, y = data
    accs, seconds = [], []
    for trial in range(trials):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + trial))[:per_trial]
        obs = build_observation(model, x[idx], y[idx], ObservationSpec())
        start = time.perf_counter()
        labels = recover_labels(model, obs)
        seconds.append(time.perf_counter() - start)
        accs.append(label_accuracy(labels, y[idx], ordered=per_trial == 1))
    nan = math.nan
    name = "labels (iDLG)" if per_trial == 1 else "labels (counts)"
    return Row(attack=name, model="convnet", seen=f"plaintext, batch {per_trial}", trials=trials, psnr=nan,
               chance=nan, best=nan, best_chance=nan, ssim=nan, labels=statistics.fmean(accs), max_err=nan,
               seconds=statistics.fmean(seconds))


def fmt(value: float, digits: int = 2) -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=8, help="inputs per single-sample row")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t = args.trials
    img, tab = digits(), cancer()
    img_base, tab_base = chance_baseline(img[0]), chance_baseline(tab[0])
    tab_range = float(tab[0].max() - tab[0].min())
    cnn, dmlp, tmlp = convnet(), mlp(64, 64, 10), mlp(30, 32, 2)
    ig, dlg, analytic = InvertingGradients(seed=0), DLG(seed=0), AnalyticLinear()
    plain = ObservationSpec()

    def dp(sigma: float) -> ObservationSpec:
        return ObservationSpec(protection=Protection.DP, noise_multiplier=sigma, max_grad_norm=1.0)

    agg = ObservationSpec(protection=Protection.AGGREGATE, num_clients=8)
    common = {"baseline": img_base, "data_range": 1.0}
    rows = [
        run_row(ig, cnn, "convnet", "plaintext", img, plain, per_trial=1, trials=t, **common),
        run_row(dlg, cnn, "convnet", "plaintext", img, plain, per_trial=1, trials=t, **common),
        run_row(analytic, dmlp, "mlp", "plaintext", img, plain, per_trial=1, trials=t, **common),
        run_row(analytic, tmlp, "tabular mlp", "plaintext", tab, plain, per_trial=1, trials=50,
                baseline=tab_base, data_range=tab_range),
        label_row(cnn, img, per_trial=1, trials=200),
        label_row(cnn, img, per_trial=8, trials=20),
        run_row(ig, cnn, "convnet", "DP sigma=0.01 C=1", img, dp(0.01), per_trial=1, trials=max(2, t // 2), **common),
        run_row(ig, cnn, "convnet", "DP sigma=0.1 C=1", img, dp(0.1), per_trial=1, trials=max(2, t // 2), **common),
        run_row(ig, cnn, "convnet", "DP sigma=1 C=1", img, dp(1.0), per_trial=1, trials=t, **common),
        run_row(dlg, cnn, "convnet", "DP sigma=1 C=1", img, dp(1.0), per_trial=1, trials=t, **common),
        run_row(analytic, tmlp, "tabular mlp", "DP sigma=1 C=1", tab, dp(1.0), per_trial=1, trials=t,
                baseline=tab_base, data_range=tab_range),
        run_row(ig, cnn, "convnet", "aggregate 8x1", img, agg, per_trial=8, trials=2, **common),
        naive_aggregate_row(cnn, img, agg, clients=8, trials=2, baseline=img_base, attack=ig),
        run_row(analytic, dmlp, "mlp", "aggregate 8x1", img, agg, per_trial=8, trials=2, **common),
        run_row(ig, cnn, "convnet", "aggregate 8x16", img, agg, per_trial=128, trials=1, **common),
        run_row(ig, cnn, "convnet", "FedAvg 4 inputs, 5 steps", img,
                ObservationSpec(protection=Protection.FEDAVG, local_steps=5, lr=0.1, batch_size=2),
                per_trial=4, trials=2, **common),
        run_row(ig, cnn, "convnet", "ciphertext", img, ObservationSpec(protection=Protection.CIPHERTEXT),
                per_trial=1, trials=1, **common),
    ]
    header = ("| attack | model | server sees | trials | PSNR dB | chance dB | gain dB | best-match dB | "
              "best chance dB | SSIM | label acc | max abs err | s/attack |")
    print(header)
    print("|" + "---|" * 13)
    for r in rows:
        gain = r.psnr - r.chance
        shown_psnr = "no access" if r.seen == "ciphertext" else fmt(r.psnr)
        print(f"| {r.attack} | {r.model} | {r.seen} | {r.trials} | {shown_psnr} | {fmt(r.chance)} | {fmt(gain)} | "
              f"{fmt(r.best)} | {fmt(r.best_chance)} | {fmt(r.ssim, 3)} | {fmt(r.labels)} | "
              f"{'—' if math.isnan(r.max_err) else f'{r.max_err:.1e}'} | {r.seconds:.2f} |")


if __name__ == "__main__":
    main()
