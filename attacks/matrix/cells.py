"""The attack matrix's cells: data, models, one row per (attack, setting), scored against chance.

The client side is simulated by :func:`privfl.attacks.evaluate.build_observation`, the one place that
touches client data; each attack, label recovery included, sees only the returned observation through
:meth:`privfl.attacks.Attack.reconstruct`.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from privfl.accounting import epsilon as dp_epsilon
from privfl.config import DatasetKind
from privfl.errors import AttackError, ConfigError
from privfl.training import convert_for_dp

from ..analytic import AnalyticLinear
from ..base import Attack, CiphertextObservation, Observation, Reconstruction, ServerView
from ..dlg import DLG
from ..evaluate import ObservationSpec, Score, build_observation, score
from ..fedavg import FedAvgInversion
from ..inverting import InvertingGradients
from ..labels import LabelRecovery
from ..metrics import best_match, chance_baseline, label_accuracy, pairwise_psnr
from .config import AttackKind, AttackMatrixConfig

__all__ = ["NOT_ABOVE_CHANCE", "NO_ACCESS", "PARTIAL", "RECOVERED", "AttackRow", "GridCell", "count_cells", "run_cells"]

RECOVERED = "recovered"
PARTIAL = "partial"
NOT_ABOVE_CHANCE = "not above chance"
NO_ACCESS = "no access"


class Progress(Protocol):
    """Where the cells report progress (a progress bar, or nothing)."""

    def show(self, cell: str) -> None: ...

    def advance(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Data:
    """One dataset as the matrix uses it: the victims' pool, the public prior and how to score."""

    name: str
    test_inputs: torch.Tensor
    test_labels: torch.Tensor
    baseline: torch.Tensor  # the dataset-mean input, the guess of an attacker who learned nothing
    data_range: float
    chance_label_accuracy: float  # always guessing the most frequent class
    is_image: bool


def _load(kind: DatasetKind, seed: int) -> _Data:
    from privfl.data import load_breast_cancer, load_digits, make_credit

    loaders = {
        DatasetKind.DIGITS: load_digits, DatasetKind.BREAST_CANCER: load_breast_cancer, DatasetKind.CREDIT: make_credit
    }
    split = loaders[kind](seed=seed)
    train_x = split.train.features
    is_image = train_x.ndim == 4
    # Images are scaled to [0, 1]; standardized rows have no natural range, so PSNR uses the spread of the
    # training data, the same convention as the attacks' quality benchmark.
    data_range = 1.0 if is_image else float(train_x.max() - train_x.min())
    counts = torch.bincount(split.train.targets)
    return _Data(
        name=kind.value,
        test_inputs=split.test.features,
        test_labels=split.test.targets,
        baseline=chance_baseline(train_x).to(train_x.dtype),
        data_range=data_range,
        chance_label_accuracy=float(counts.max()) / float(counts.sum()),
        is_image=is_image,
    )


def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    # fork_rng keeps the caller's global torch RNG untouched: the matrix must not perturb a user's run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    # The model the clients train: made DP-SGD compatible as a site makes it (train_dp_sgd needs it), so
    # every row, DP or not, attacks the same model.
    return convert_for_dp(model).model


def _convnet(classes: int, seed: int) -> torch.nn.Module:
    """Conv(1->16) ReLU Conv(16->32, stride 2) ReLU Linear(512->classes), for 8x8 images."""
    nn = torch.nn
    return _seeded(
        seed,
        lambda: nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 16, classes),
        ),
    )


def _mlp(features: int, hidden: int, classes: int, seed: int) -> torch.nn.Module:
    """Flatten, Linear(features->hidden) with bias, ReLU, Linear(hidden->classes): what AnalyticLinear needs."""
    nn = torch.nn
    return _seeded(
        seed, lambda: nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    )


def _models(data: _Data, seed: int) -> tuple[dict[str, torch.nn.Module], dict[AttackKind, str]]:
    """The untrained models and which one each attack runs on."""
    classes = int(data.test_labels.max()) + 1
    features = math.prod(data.test_inputs.shape[1:])
    if data.is_image:
        models = {"convnet": _convnet(classes, seed), "mlp": _mlp(features, 64, classes, seed)}
        use = {AttackKind.LABELS: "convnet", AttackKind.DLG: "convnet", AttackKind.INVERTING: "convnet",
               AttackKind.ANALYTIC: "mlp"}
        return models, use
    return {"mlp": _mlp(features, 32, classes, seed)}, {kind: "mlp" for kind in AttackKind}


# --------------------------------------------------------------------------------------------------
# Settings (rows of the matrix)


@dataclass(frozen=True, slots=True)
class _Setting:
    view: ServerView
    label: str
    spec: ObservationSpec
    num_inputs: int
    epsilon: float  # math.inf when the setting is not differentially private
    privacy: str
    noise_multiplier: float | None = None
    num_clients: int | None = None


def _settings(config: AttackMatrixConfig, views: tuple[ServerView, ...]) -> list[_Setting]:
    b = config.batch_size
    out: list[_Setting] = []
    for view in views:
        if view is ServerView.PLAINTEXT:
            spec = ObservationSpec(view=view)
            out.append(_Setting(view, "plaintext", spec, b, math.inf, "not private"))
        elif view is ServerView.DP_SGD:
            q = config.sample_rate
            for sigma in config.dp.noise_multipliers:
                eps = dp_epsilon(noise_multiplier=sigma, sample_rate=q, steps=1, delta=config.delta)
                spec = ObservationSpec(view=view, noise_multiplier=sigma, max_grad_norm=config.dp.max_grad_norm,
                                       seed=config.seed)
                out.append(_Setting(view, f"dp sigma={sigma:g}", spec, b, eps,
                                    f"sample-level DP, one DP-SGD step at q={q:.4g}, delta={config.delta:g}",
                                    noise_multiplier=sigma))
        elif view is ServerView.AGGREGATE:
            for k in config.aggregate.num_clients:
                spec = ObservationSpec(view=view, num_clients=k)
                out.append(_Setting(view, f"aggregate k={k}", spec, k * b, math.inf, "not private", num_clients=k))
        elif view is ServerView.CIPHERTEXT:
            spec = ObservationSpec(view=view, seed=config.seed)
            out.append(_Setting(view, "ciphertext", spec, b, math.inf, "no access"))
        else:
            f = config.fedavg
            spec = ObservationSpec(view=view, local_steps=f.local_steps, lr=f.lr, batch_size=f.batch_size)
            out.append(_Setting(view, f"fedavg {f.local_steps}x batch {f.batch_size}", spec,
                                f.inputs, math.inf, "not private"))
    return out


def _attack(kind: AttackKind, view: ServerView, config: AttackMatrixConfig, data: _Data) -> Attack:
    # Images live in [0, 1], a box every image pipeline reveals; standardized rows have no box.
    bounds = (0.0, 1.0) if data.is_image else None
    if kind is AttackKind.LABELS:
        return LabelRecovery(seed=config.seed)
    if kind is AttackKind.ANALYTIC:
        return AnalyticLinear()
    if kind is AttackKind.DLG:
        d = config.dlg
        return DLG(max_iterations=d.max_iterations, inner_iterations=d.inner_iterations, lr=d.lr, bounds=bounds,
                   seed=config.seed)
    i = config.inverting
    if view is ServerView.FEDAVG:
        # A FedAvg update is attacked with the replay built for it, at the same settings and budget.
        return FedAvgInversion(max_iterations=i.max_iterations, restarts=i.restarts, lr=i.lr, tv_weight=i.tv_weight,
                               bounds=bounds, seed=config.seed)
    return InvertingGradients(max_iterations=i.max_iterations, restarts=i.restarts, lr=i.lr, tv_weight=i.tv_weight,
                              bounds=bounds, seed=config.seed)




@dataclass(frozen=True, kw_only=True, slots=True)
class AttackRow:
    """One cell of the matrix: an attack against a protection on a dataset, averaged over trials.

    Reconstruction metrics are computed on the best one-to-one matching of reconstructed to true inputs and
    are NaN for label-only rows and for rows without access. ``max_abs_error`` is the largest over trials.

    Attributes:
        dataset: dataset name.
        model: the model attacked (``convnet`` or ``mlp``).
        attack: attack name (an :class:`AttackKind` value).
        view: what the server observed (a :class:`~privfl.attacks.ServerView` value).
        setting: the row's setting, e.g. ``"dp sigma=1"`` or ``"aggregate k=4"``.
        epsilon: the ledger's epsilon for the setting; ``math.inf`` when it is not DP.
        privacy: how to read ``epsilon`` ("sample-level DP ...", "not private", "no access").
        noise_multiplier: sigma of a DP row, else ``None``.
        num_clients: k of an aggregate row, else ``None``.
        num_inputs: victim inputs behind the observation.
        trials: victim draws averaged.
        psnr: mean PSNR (dB) of matched pairs.
        chance_psnr: PSNR of the dataset-mean guess on the same inputs.
        best_psnr: PSNR of the best matched pair (one input of a batch or aggregate).
        best_chance_psnr: the chance level for ``best_psnr``.
        ssim: mean SSIM (images only).
        mse: mean squared error.
        max_abs_error: largest absolute feature error of any matched pair.
        label_accuracy: label multiset accuracy.
        chance_label_accuracy: accuracy of always guessing the most frequent class.
        inputs_recovered: inputs whose matched reconstruction beats chance for that input by ``margin_db``
            (or is exact), averaged over trials.
        verdict: ``recovered``, ``partial`` (the mean is not above chance but some input is),
            ``not above chance`` or ``no access``.
        seconds: attack time summed over trials (the observation is built outside it).
        note: a remark, e.g. why an attack could not run.
    """

    dataset: str
    model: str
    attack: str
    view: str
    setting: str
    epsilon: float
    privacy: str
    noise_multiplier: float | None
    num_clients: int | None
    num_inputs: int
    trials: int
    psnr: float
    chance_psnr: float
    best_psnr: float
    best_chance_psnr: float
    ssim: float
    mse: float
    max_abs_error: float
    label_accuracy: float
    chance_label_accuracy: float
    inputs_recovered: float
    verdict: str
    seconds: float
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        """The row as JSON values: NaN becomes ``null``; an infinite epsilon becomes ``null`` (see ``privacy``)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            out[name] = value
        return out


def _verdict_reconstruction(
    *, psnr: float, chance: float, max_err: float, inputs_recovered: float, config: AttackMatrixConfig
) -> str:
    if max_err <= config.exact_tolerance or psnr > chance + config.margin_db:
        return RECOVERED
    # The mean hides a client whose input came through while the others did not.
    return PARTIAL if inputs_recovered > 0 else NOT_ABOVE_CHANCE


def _verdict_labels(accuracy: float, chance: float) -> str:
    if accuracy > chance and accuracy >= 1.0 - 1e-9:
        return RECOVERED
    return PARTIAL if accuracy > chance else NOT_ABOVE_CHANCE


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.fmean(finite) if finite else math.nan


@dataclass(slots=True)
class GridCell:
    """The first trial's inputs and matched reconstructions of one cell, for the grids."""

    originals: torch.Tensor
    reconstructions: torch.Tensor | None  # aligned with originals; None when there was no access


def _matched(
    rec: torch.Tensor, truth: torch.Tensor, data: _Data, config: AttackMatrixConfig
) -> tuple[torch.Tensor, int]:
    """Matches reconstructions to true inputs; returns them aligned to ``truth`` and how many are recovered.

    An input counts as recovered when its matched reconstruction beats the dataset-mean guess *for that
    input* by ``margin_db``, or is exact within ``exact_tolerance``; this is what a batch or an aggregate
    leaks about individual clients even when the mean over inputs is near chance.
    """
    match = best_match(rec, truth, data_range=data.data_range)
    pairs_rec = rec[match.reconstruction_index].detach().double().cpu()
    pairs_truth = truth[match.target_index].detach().double().cpu()
    chance = pairwise_psnr(data.baseline.unsqueeze(0), pairs_truth, data_range=data.data_range)[0]
    error = (pairs_rec - pairs_truth).abs().flatten(1).max(dim=1).values
    recovered = (match.psnr > chance + config.margin_db) | (error <= config.exact_tolerance)
    aligned = torch.full(truth.shape, math.nan, dtype=torch.float64)
    aligned[match.target_index] = pairs_rec
    return aligned, int(recovered.sum())


def _run_cell(
    *,
    kind: AttackKind,
    setting: _Setting,
    data: _Data,
    model_name: str,
    model: torch.nn.Module,
    observations: list[Observation],
    victims: list[tuple[torch.Tensor, torch.Tensor]],
    config: AttackMatrixConfig,
) -> tuple[AttackRow, GridCell | None]:
    attack = _attack(kind, setting.view, config, data)
    seconds = 0.0
    scores: list[Score] = []
    accuracies: list[float] = []
    shown: GridCell | None = None
    recovered_counts: list[int] = []
    note = ""
    for trial, (obs, (x, y)) in enumerate(zip(observations, victims, strict=True)):
        start = time.perf_counter()
        try:
            # Every attack, label recovery included, sees only the observation (a ciphertext gives no access).
            rec = attack.reconstruct(model, obs)
        except AttackError as exc:
            # A cell the attack cannot handle is a finding to report, not a reason to lose the matrix.
            seconds += time.perf_counter() - start
            note = str(exc)
            continue
        seconds += time.perf_counter() - start
        if kind is AttackKind.LABELS:
            # Labels only: the reconstruction's inputs are NaN by design and are not scored.
            if rec.accessible:
                accuracies.append(label_accuracy(rec.labels, y, ordered=False))
            else:
                note = rec.note
            continue
        if rec.accessible and not torch.isfinite(rec.inputs).all():
            # An optimizer that diverged returned nothing usable; score it as the chance guess would.
            rec = Reconstruction(inputs=torch.nan_to_num(rec.inputs, nan=0.0, posinf=0.0, neginf=0.0),
                                 labels=rec.labels, attack=rec.attack, note="non-finite values zeroed")
        if not rec.accessible:
            note = rec.note
        scores.append(score(rec, x, y, baseline=data.baseline, data_range=data.data_range))
        aligned = None
        if rec.accessible:
            aligned, count = _matched(rec.inputs, x, data, config)
            recovered_counts.append(count)
        if trial == 0:
            shown = GridCell(originals=x.detach().double().cpu(), reconstructions=aligned)

    nan = math.nan
    accessible = not isinstance(observations[0], CiphertextObservation)
    if kind is AttackKind.LABELS or not scores:
        acc = _mean(accuracies)
        if not accessible:
            verdict = NO_ACCESS
        elif math.isnan(acc):
            verdict = NOT_ABOVE_CHANCE  # every trial raised AttackError; the note says why
        else:
            verdict = _verdict_labels(acc, data.chance_label_accuracy)
        metrics = {"psnr": nan, "chance_psnr": nan, "best_psnr": nan, "best_chance_psnr": nan, "ssim": nan,
                   "mse": nan, "max_abs_error": nan, "label_accuracy": acc, "inputs_recovered": nan}
    else:
        metrics = {
            "psnr": _mean([s.psnr for s in scores]),
            "chance_psnr": _mean([s.chance_psnr for s in scores]),
            "best_psnr": _mean([s.best_psnr for s in scores]),
            "best_chance_psnr": _mean([s.best_chance_psnr for s in scores]),
            "ssim": _mean([s.ssim for s in scores]),
            "mse": _mean([s.mse for s in scores]),
            "max_abs_error": max(s.max_abs_error for s in scores),
            "label_accuracy": _mean([s.label_accuracy for s in scores]),
            "inputs_recovered": _mean([float(c) for c in recovered_counts]),
        }
        if not scores[0].accessible:
            verdict = NO_ACCESS
        else:
            verdict = _verdict_reconstruction(
                psnr=metrics["psnr"], chance=metrics["chance_psnr"], max_err=metrics["max_abs_error"],
                inputs_recovered=metrics["inputs_recovered"], config=config,
            )
    row = AttackRow(
        dataset=data.name, model=model_name, attack=kind.value, view=setting.view.value, setting=setting.label,
        epsilon=setting.epsilon, privacy=setting.privacy, noise_multiplier=setting.noise_multiplier,
        num_clients=setting.num_clients, num_inputs=setting.num_inputs, trials=len(observations),
        chance_label_accuracy=data.chance_label_accuracy, verdict=verdict, seconds=seconds, note=note, **metrics,
    )
    return row, shown


def _victims(data: _Data, count: int, trials: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``trials`` seeded draws of ``count`` distinct test inputs; every setting takes a prefix of a draw."""
    if count > len(data.test_labels):
        raise ConfigError(
            "aggregate.num_clients", count,
            f"k x batch_size = {count} victim inputs exceed the {len(data.test_labels)} test inputs of {data.name}",
        )
    draws = []
    for trial in range(trials):
        order = torch.randperm(len(data.test_labels), generator=torch.Generator().manual_seed(seed * 1000 + trial))
        idx = order[:count]
        draws.append((data.test_inputs[idx], data.test_labels[idx]))
    return draws


def count_cells(config: AttackMatrixConfig) -> int:
    """How many cells the config asks for."""
    return sum(len(d.attacks) * len(_settings(config, d.protections)) for d in config.datasets)


def run_cells(
    config: AttackMatrixConfig, bar: Progress
) -> Iterator[tuple[str, AttackRow, GridCell | None, float]]:
    """The cells in order: (dataset, row, what the grid shows, seconds spent building observations)."""
    for entry in config.datasets:
        data = _load(entry.name, config.seed)
        models, use = _models(data, config.seed)
        settings = _settings(config, entry.protections)
        victims = _victims(data, max(s.num_inputs for s in settings), config.trials, config.seed)
        for setting in settings:
            observations: dict[str, list[Observation]] = {}
            build_seconds = 0.0
            for kind in entry.attacks:
                bar.show(f"{data.name} · {setting.label} · {kind.value}")
                name = use[kind]
                if name not in observations:
                    start = time.perf_counter()
                    observations[name] = [
                        # The one call that touches client data; the attack gets only what it returns.
                        build_observation(models[name], x[: setting.num_inputs], y[: setting.num_inputs],
                                          _trial_spec(setting.spec, trial))
                        for trial, (x, y) in enumerate(victims)
                    ]
                    build_seconds += time.perf_counter() - start
                cut = [(x[: setting.num_inputs], y[: setting.num_inputs]) for x, y in victims]
                row, shown = _run_cell(kind=kind, setting=setting, data=data, model_name=name, model=models[name],
                                       observations=observations[name], victims=cut, config=config)
                bar.advance()
                yield data.name, row, shown, build_seconds
                build_seconds = 0.0


def _trial_spec(spec: ObservationSpec, trial: int) -> ObservationSpec:
    # A fresh DP noise draw per trial, reproducible from the config's seed.
    return replace(spec, seed=spec.seed + trial)
