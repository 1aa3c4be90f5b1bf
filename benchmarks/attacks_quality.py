"""Measures gradient-inversion quality on digits and breast-cancer under each threat model and prints a table.

``--photos`` runs the photograph scenario set instead: 16x16 crops of scikit-learn's sample photographs,
one-step gradients against FedAvg updates, Inverting Gradients against FedAvg inversion at equal budgets.
``--smooth`` runs Inverting Gradients variants (TV weight, layer weighting, initialisation, warm-up, float64
cosine) on one photograph through sigmoid and ReLU ConvNets, crop by crop.
``--breaching`` compares privfl with breaching's Inverting Gradients on the photograph scenario set at equal
budgets (benchmarks/breaching_compare.py; its columns are skipped when breaching does not import).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from sklearn.datasets import load_breast_cancer, load_digits, load_sample_images

from privfl.attacks import (
    DLG,
    AggregateObservation,
    AnalyticLinear,
    Attack,
    FedAvgInversion,
    GradientObservation,
    InvertingGradients,
    ServerView,
    UpdateObservation,
    recover_labels,
)
from privfl.attacks.evaluate import (
    ObservationSpec,
    Score,
    build_observation,
    client_gradient,
    fedavg_update,
    score,
)
from privfl.attacks.metrics import best_match, chance_baseline, label_accuracy, pairwise_psnr, psnr


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
    *,
    spec: ObservationSpec,
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


def photo_crop_positions(count: int, *, size: int = 16, seed: int = 0, zoom: int = 4) -> list[tuple[int, int, int]]:
    """``(photograph, top, left)`` of each crop ``photo_crops`` draws with the same arguments."""
    images = load_sample_images().images
    generator = torch.Generator().manual_seed(seed)
    side = size * zoom
    out = []
    for i in range(count):
        image = images[i % 2]
        top = int(torch.randint(0, image.shape[0] - side, (1,), generator=generator))
        left = int(torch.randint(0, image.shape[1] - side, (1,), generator=generator))
        out.append((i % 2, top, left))
    return out


def photo_crops(count: int, *, size: int = 16, seed: int = 0, zoom: int = 4) -> torch.Tensor:
    """``count`` crops of the two scikit-learn sample photographs, ``(size*zoom)^2`` pixels averaged down to size^2.

    Returns:
        ``(count, 3, size, size)`` in [0, 1]; crop ``i`` comes from photograph ``i % 2`` at a seeded position.
    """
    return _cut(photo_crop_positions(count, size=size, seed=seed, zoom=zoom), size=size, zoom=zoom)


def _cut(positions: list[tuple[int, int, int]], *, size: int, zoom: int) -> torch.Tensor:
    images = load_sample_images().images
    side = size * zoom
    out = []
    for photo, top, left in positions:
        crop = images[photo][top : top + side, left : left + side]
        crop = torch.tensor(crop, dtype=torch.float32).permute(2, 0, 1) / 255
        out.append(torch.nn.functional.avg_pool2d(crop.unsqueeze(0), zoom)[0])
    return torch.stack(out)


def photo_quadrant_labels(positions: list[tuple[int, int, int]], *, size: int = 16, zoom: int = 4) -> torch.Tensor:
    """Class of each crop: ``4 * photograph + quadrant`` of the crop's centre (0 top left, 1 top right, 2, 3)."""
    images = load_sample_images().images
    half = size * zoom // 2
    labels = []
    for photo, top, left in positions:
        height, width = images[photo].shape[:2]
        quadrant = 2 * int(top + half >= height / 2) + int(left + half >= width / 2)
        labels.append(4 * photo + quadrant)
    return torch.tensor(labels)


VICTIM_SEEDS = range(64)  # crop sets are drawn with these seeds; training crops avoid all their crops


def trained_photo_convnet(steps: int, *, size: int = 16, activation: str = "relu", batch: int = 32,
                          lr: float = 0.05, pool: int = 2048, seed: int = 1_000_003) -> tuple[torch.nn.Module, str]:
    """``photo_convnet`` after ``steps`` plain SGD steps on "which photograph, which quadrant" (8 of its 10 classes).

    The training crops are a pool drawn with ``seed``, none at the position of a crop of the crop sets drawn with
    ``VICTIM_SEEDS`` (up to 16 crops each, so every crop set of the benchmarks is held out); they do overlap
    victim crops' pixels, being cut from the same two photographs. Batches are drawn with ``seed + 1``.

    Returns:
        The model and a one-line note: training accuracy and accuracy on held-out crop sets 0 to 7.
    """
    victims = {p for s in VICTIM_SEEDS for p in photo_crop_positions(16, size=size, seed=s)}
    positions = [p for p in photo_crop_positions(pool, size=size, seed=seed) if p not in victims]
    x, y = _cut(positions, size=size, zoom=4), photo_quadrant_labels(positions, size=size)
    model = photo_convnet(size=size, activation=activation)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    held = [p for s in range(8) for p in photo_crop_positions(4, size=size, seed=s)]
    with torch.no_grad():
        train_acc = float((model(x).argmax(1) == y).float().mean())
        held_acc = float((model(_cut(held, size=size, zoom=4)).argmax(1)
                          == photo_quadrant_labels(held, size=size)).float().mean())
    note = (f"{steps} SGD steps (batch {batch}, lr {lr}) on {len(x)} crops: training accuracy {train_acc:.2f}, "
            f"held-out crop sets 0-7 accuracy {held_acc:.2f} (chance 0.125)")
    return model, note


ACTIVATIONS: dict[str, type[torch.nn.Module]] = {"relu": torch.nn.ReLU, "sigmoid": torch.nn.Sigmoid,
                                                 "tanh": torch.nn.Tanh}


def photo_convnet(size: int = 16, classes: int = 10, activation: str = "relu") -> torch.nn.Module:
    """ConvNet for 3-channel size x size inputs (two convolutions, one linear), at its seed-0 initialization.

    ``activation`` is ``"relu"`` (the default), ``"sigmoid"`` or ``"tanh"``, used after both convolutions.
    """
    act = ACTIVATIONS[activation]
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), act(),
        torch.nn.Conv2d(16, 32, 3, padding=1, stride=2), act(),
        torch.nn.Flatten(), torch.nn.Linear(32 * (size // 2) ** 2, classes),
    )


@dataclass(frozen=True)
class PhotoCase:
    """One photograph scenario: what the client held and what it sent."""

    name: str
    num_samples: int
    local_steps: int | None  # None: a one-step gradient
    batch_size: int
    lr: float = 0.1
    labels_known: bool = False
    activation: str = "relu"  # of photo_convnet
    size: int = 16  # crop side in pixels
    train_steps: int = 0  # > 0: trained_photo_convnet(train_steps); the client's labels are then the true classes

    @property
    def model_label(self) -> str:
        """The model column of the tables: activation, then the size and training when not the defaults."""
        parts = [self.activation] + ([f"{self.size}x{self.size}"] if self.size != 16 else [])
        return ", ".join(parts + ([f"trained {self.train_steps} steps"] if self.train_steps else []))


def photo_model(case: PhotoCase) -> tuple[torch.nn.Module, str]:
    """The model for ``case`` and a note on its training (empty when untrained)."""
    if case.train_steps:
        return trained_photo_convnet(case.train_steps, size=case.size, activation=case.activation)
    return photo_convnet(size=case.size, activation=case.activation), ""


def photo_victims(case: PhotoCase, crop_set: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop set ``crop_set`` for ``case`` and its labels: random classes, or the true classes on trained models."""
    x = photo_crops(case.num_samples, size=case.size, seed=crop_set)
    if case.train_steps:
        positions = photo_crop_positions(case.num_samples, size=case.size, seed=crop_set)
        return x, photo_quadrant_labels(positions, size=case.size)
    return x, torch.randint(0, 10, (case.num_samples,), generator=torch.Generator().manual_seed(crop_set))


PHOTO_CASES = (
    PhotoCase("gradient, 1 image", 1, None, 1),
    PhotoCase("gradient, batch 4", 4, None, 4),
    PhotoCase("gradient, batch 16", 16, None, 16),
    PhotoCase("FedAvg 4 images, 4 steps of batch 4, lr 0.1", 4, 4, 4),
    PhotoCase("FedAvg 4 images, 4 steps of batch 2, lr 0.1", 4, 4, 2),
    PhotoCase("FedAvg 4 images, 4 steps of batch 2, lr 0.1, labels known", 4, 4, 2, labels_known=True),
    PhotoCase("FedAvg 16 images, 4 steps of batch 4, lr 0.1, labels known", 16, 4, 4, labels_known=True),
    PhotoCase("FedAvg 4 images, 4 steps of batch 4, lr 0.01", 4, 4, 4, lr=0.01),
    PhotoCase("gradient, 1 image, sigmoid convnet", 1, None, 1, activation="sigmoid"),
)


def photo_observation(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, case: PhotoCase):
    """What the server sees for ``case``; labels only when the case says the attacker knows them."""
    known = y if case.labels_known else None
    shape = tuple(x.shape[1:])
    if case.local_steps is None:
        return GradientObservation(gradients=client_gradient(model, x, y), input_shape=shape,
                                   num_samples=len(x), labels=known)
    delta = fedavg_update(model, x, y, local_steps=case.local_steps, lr=case.lr, batch_size=case.batch_size)
    return UpdateObservation(delta=delta, input_shape=shape, num_samples=len(x), local_steps=case.local_steps,
                             lr=case.lr, batch_size=case.batch_size, labels=known)


def photo_rows(*, iterations: int, crop_sets: int, cases: tuple[PhotoCase, ...] = PHOTO_CASES) -> list[Row]:
    """Inverting Gradients and FedAvg inversion on each case, same iterations, same crops, one restart."""
    attacks: list[Attack] = [InvertingGradients(max_iterations=iterations, seed=0),
                             FedAvgInversion(max_iterations=iterations, seed=0)]
    pool = photo_crops(256, seed=12345)
    baseline = chance_baseline(pool)
    rows = []
    for case in cases:
        model = photo_convnet(activation=case.activation)
        for attack in attacks:
            scores, seconds = [], []
            for crop_set in range(crop_sets):
                x = photo_crops(case.num_samples, seed=crop_set)
                y = torch.randint(0, 10, (case.num_samples,), generator=torch.Generator().manual_seed(crop_set))
                obs = photo_observation(model, x, y, case)
                start = time.perf_counter()
                rec = attack.reconstruct(model, obs)
                seconds.append(time.perf_counter() - start)
                scores.append(score(rec, x, y, baseline=baseline))
            rows.append(Row(
                attack=attack.name, model=f"{case.activation} convnet 16x16", seen=case.name, trials=crop_sets,
                psnr=statistics.fmean(s.psnr for s in scores),
                chance=statistics.fmean(s.chance_psnr for s in scores),
                best=min(s.psnr for s in scores), best_chance=max(s.psnr for s in scores),
                ssim=statistics.fmean(s.ssim for s in scores),
                labels=statistics.fmean(s.label_accuracy for s in scores), max_err=math.nan,
                seconds=statistics.fmean(seconds),
            ))
            print(f"  done: {attack.name} on {case.name}", flush=True)
    return rows


SMOOTH_VARIANTS: dict[str, dict[str, object]] = {
    "default (tv_weight=None)": {},
    "tv_weight=1e-2 (old default)": {"tv_weight": 1e-2},
    "tv_weight=0.2": {"tv_weight": 0.2},
    "tv_weight=1e-3": {"tv_weight": 1e-3},
    "tv_weight=1e-4": {"tv_weight": 1e-4},
    "tv_weight=1e-6": {"tv_weight": 1e-6},
    "tv_weight=0": {"tv_weight": 0.0},
    "tv 1e-2, layer_weighting=linear": {"tv_weight": 1e-2, "layer_weighting": "linear"},
    "tv 1e-2, init=randn": {"tv_weight": 1e-2, "init": "randn"},
    "tv 1e-2, init=uniform": {"tv_weight": 1e-2, "init": "uniform"},
    "tv 1e-2, warmup=50": {"tv_weight": 1e-2, "warmup": 50},
    "tv 1e-2, double=True": {"tv_weight": 1e-2, "double": True},
}


def smooth_table(*, iterations: int, crops: int, activations: tuple[str, ...] = ("sigmoid", "relu")) -> None:
    """Inverting Gradients variants on one 16x16 photograph through photo_convnet, per crop: PSNR dB and median."""
    print("| model | variant | " + " | ".join(f"crop {c}" for c in range(crops)) + " | median |")
    print("|" + "---|" * (crops + 3))
    for activation in activations:
        model = photo_convnet(activation=activation)
        case = PhotoCase("gradient, 1 image", 1, None, 1, activation=activation)
        for variant, options in SMOOTH_VARIANTS.items():
            attack = InvertingGradients(max_iterations=iterations, seed=0, **options)  # type: ignore[arg-type]
            values = []
            for crop in range(crops):
                x = photo_crops(1, seed=crop)
                y = torch.randint(0, 10, (1,), generator=torch.Generator().manual_seed(crop))
                rec = attack.reconstruct(model, photo_observation(model, x, y, case))
                values.append(psnr(rec.inputs.float(), x))
            print(f"| {activation} | {variant} | " + " | ".join(f"{v:.1f}" for v in values)
                  + f" | {statistics.median(values):.1f} |", flush=True)


def analytic_photo_table(*, crop_sets: int) -> None:
    """AnalyticLinear on batches of photographs through Flatten + Linear(768, width) + ReLU: exact inputs counted."""
    print("| first layer width | batch | crop sets | PSNR dB (mean) | inputs recovered exactly (max abs err < 1e-4) |")
    print("|---|---|---|---|---|")
    for width in (64, 256, 1024):
        for batch in (4, 8):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(768, width), torch.nn.ReLU(),
                                        torch.nn.Linear(width, 10))
            psnrs, exact = [], 0
            for crop_set in range(crop_sets):
                x = photo_crops(batch, seed=crop_set)
                y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(crop_set))
                obs = GradientObservation(gradients=client_gradient(model, x, y), input_shape=(3, 16, 16),
                                          num_samples=batch)
                rec = AnalyticLinear().reconstruct(model, obs)
                match = best_match(rec.inputs.float(), x, data_range=1.0)
                errors = (rec.inputs[match.reconstruction_index].float() - x[match.target_index]).abs()
                exact += int((errors.flatten(1).max(dim=1).values < 1e-4).sum())
                psnrs.append(float(match.psnr.mean()))
            mean_psnr = statistics.fmean(psnrs)
            print(f"| {width} | {batch} | {crop_sets} | {mean_psnr:.1f} | {exact} of {batch * crop_sets} |")


def print_photo_table(rows: list[Row]) -> None:
    print("| attack | server sees | crop sets | PSNR dB (mean) | min | max | chance dB | SSIM | label acc | s/attack |")
    print("|" + "---|" * 10)
    for r in rows:
        print(f"| {r.attack} | {r.seen} | {r.trials} | {fmt(r.psnr)} | {fmt(r.best)} | {fmt(r.best_chance)} | "
              f"{fmt(r.chance)} | {fmt(r.ssim, 3)} | {fmt(r.labels)} | {r.seconds:.1f} |")


def fmt(value: float, digits: int = 2) -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=8, help="inputs per single-sample row")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--photos", action="store_true", help="run the photograph scenario set instead")
    parser.add_argument("--iterations", type=int, default=500, help="optimizer steps per attack (--photos)")
    parser.add_argument("--crop-sets", type=int, default=4, help="crop sets per scenario (--photos, --smooth)")
    parser.add_argument("--smooth", action="store_true",
                        help="run the Inverting Gradients variant table on sigmoid and ReLU ConvNets instead")
    parser.add_argument("--breaching", action="store_true",
                        help="compare with breaching on the photograph scenario set instead (needs breaching)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.breaching:
        from breaching_compare import compare, print_tables  # a sibling script, on sys.path when run as one

        print_tables(compare(iterations=args.iterations, crop_sets=args.crop_sets))
        return
    if args.smooth:
        smooth_table(iterations=args.iterations, crops=args.crop_sets)
        return
    if args.photos:
        analytic_photo_table(crop_sets=args.crop_sets)
        print()
        print_photo_table(photo_rows(iterations=args.iterations, crop_sets=args.crop_sets))
        return
    t = args.trials
    img, tab = digits(), cancer()
    img_base, tab_base = chance_baseline(img[0]), chance_baseline(tab[0])
    tab_range = float(tab[0].max() - tab[0].min())
    cnn, dmlp, tmlp = convnet(), mlp(64, 64, 10), mlp(30, 32, 2)
    ig, dlg, analytic = InvertingGradients(seed=0), DLG(seed=0), AnalyticLinear()
    plain = ObservationSpec()

    def dp(sigma: float) -> ObservationSpec:
        return ObservationSpec(view=ServerView.DP_SGD, noise_multiplier=sigma, max_grad_norm=1.0)

    agg = ObservationSpec(view=ServerView.AGGREGATE, num_clients=8)
    common = {"baseline": img_base, "data_range": 1.0}
    rows = [
        run_row(ig, cnn, "convnet", "plaintext", img, spec=plain, per_trial=1, trials=t, **common),
        run_row(dlg, cnn, "convnet", "plaintext", img, spec=plain, per_trial=1, trials=t, **common),
        run_row(analytic, dmlp, "mlp", "plaintext", img, spec=plain, per_trial=1, trials=t, **common),
        run_row(analytic, tmlp, "tabular mlp", "plaintext", tab, spec=plain, per_trial=1, trials=50,
                baseline=tab_base, data_range=tab_range),
        label_row(cnn, img, per_trial=1, trials=200),
        label_row(cnn, img, per_trial=8, trials=20),
        run_row(ig, cnn, "convnet", "DP sigma=0.01 C=1", img, spec=dp(0.01), per_trial=1, trials=max(2, t // 2), **common),
        run_row(ig, cnn, "convnet", "DP sigma=0.1 C=1", img, spec=dp(0.1), per_trial=1, trials=max(2, t // 2), **common),
        run_row(ig, cnn, "convnet", "DP sigma=1 C=1", img, spec=dp(1.0), per_trial=1, trials=t, **common),
        run_row(dlg, cnn, "convnet", "DP sigma=1 C=1", img, spec=dp(1.0), per_trial=1, trials=t, **common),
        run_row(analytic, tmlp, "tabular mlp", "DP sigma=1 C=1", tab, spec=dp(1.0), per_trial=1, trials=t,
                baseline=tab_base, data_range=tab_range),
        run_row(ig, cnn, "convnet", "aggregate 8x1", img, spec=agg, per_trial=8, trials=2, **common),
        naive_aggregate_row(cnn, img, agg, clients=8, trials=2, baseline=img_base, attack=ig),
        run_row(analytic, dmlp, "mlp", "aggregate 8x1", img, spec=agg, per_trial=8, trials=2, **common),
        run_row(ig, cnn, "convnet", "aggregate 8x16", img, spec=agg, per_trial=128, trials=1, **common),
        run_row(ig, cnn, "convnet", "FedAvg 4 inputs, 5 steps", img,
                spec=ObservationSpec(view=ServerView.FEDAVG, local_steps=5, lr=0.1, batch_size=2),
                per_trial=4, trials=2, **common),
        run_row(ig, cnn, "convnet", "ciphertext", img, spec=ObservationSpec(view=ServerView.CIPHERTEXT),
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
