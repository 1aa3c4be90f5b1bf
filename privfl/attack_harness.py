"""The attack matrix behind ``privfl attack``: every attack against every protection, scored against chance.

Threat model: an honest-but-curious server holds one round's global model and whatever the protection lets
it see of a client's update (a plaintext gradient, a DP-SGD gradient, the decrypted average of ``k`` clients,
a CKKS ciphertext, or a FedAvg update). The victim inputs are drawn from a dataset's test split; the client
side is simulated by :func:`privfl.attacks.evaluate.build_observation`, the one place that touches client
data, and each attack sees only the returned observation. Models are small and untrained (seeded
initialisation), the setting in which gradient inversion is strongest.

Each row states the epsilon the privacy ledger would charge for the setting. For DP-SGD that is the
sample-level epsilon of the one released step, ``epsilon(noise_multiplier=sigma, sample_rate=q, steps=1,
delta)`` with ``q = batch_size / client_examples``: one Poisson-sampled DP-SGD step of a client holding
``client_examples`` examples. Plaintext, aggregate and FedAvg rows are not differentially private
(epsilon infinite); ciphertext rows are infinite too, but the server has no access to read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from privfl.accounting import epsilon as dp_epsilon
from privfl.config import DatasetKind, _positive, _positive_int, dataclass_from_dict, load_toml
from privfl.errors import AttackError, ConfigError

__all__ = [
    "AggregateSettings",
    "AttackKind",
    "AttackMatrixConfig",
    "AttackMatrixInterrupted",
    "AttackMatrixResult",
    "AttackRow",
    "DLGSettings",
    "DPSettings",
    "DatasetMatrix",
    "FedAvgSettings",
    "InvertingSettings",
    "MatrixProtection",
    "attack_config_from_dict",
    "default_attack_config",
    "load_attack_config",
    "print_attack_summary",
    "run_attack_matrix",
]

logger = logging.getLogger(__name__)

RECOVERED = "recovered"
PARTIAL = "partial"
NOT_ABOVE_CHANCE = "not above chance"
NO_ACCESS = "no access"


class AttackKind(str, Enum):
    """Attacks the matrix can run."""

    LABELS = "labels"
    """Label recovery only (iDLG for one input, label counts for a batch)."""
    ANALYTIC = "analytic"
    """Closed-form read-off from a first linear layer with bias (on an MLP)."""
    DLG = "dlg"
    """Deep Leakage from Gradients: L2 gradient matching with L-BFGS."""
    INVERTING = "inverting"
    """Inverting Gradients: cosine gradient matching with a TV prior."""


class MatrixProtection(str, Enum):
    """Protections the matrix compares; each expands into one or more settings (rows)."""

    NONE = "none"
    """One client's plaintext gradient."""
    DP = "dp"
    """One client's DP-SGD gradient, one row per ``dp.noise_multipliers`` entry."""
    AGGREGATE = "aggregate"
    """The decrypted average of ``k`` clients (SecAgg, or CKKS after decryption), one row per ``k``."""
    CIPHERTEXT = "ciphertext"
    """A CKKS ciphertext before decryption: nothing readable."""
    FEDAVG = "fedavg"
    """One client's FedAvg parameter change after ``fedavg.local_steps`` local SGD steps."""


def _enum_tuple(name: str, values: object, enum: type[Enum]) -> None:
    if not isinstance(values, tuple) or not values:
        raise ConfigError(name, values, f"must be a non-empty list of {[m.value for m in enum]}")
    for i, v in enumerate(values):
        if not isinstance(v, enum):
            raise ConfigError(f"{name}[{i}]", v, f"must be one of {[m.value for m in enum]}")
    if len(set(values)) != len(values):
        raise ConfigError(name, [v.value for v in values], "lists a name twice")


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetMatrix:
    """One dataset's part of the matrix.

    Args:
        name: A bundled dataset. Images (digits) are attacked on a small ConvNet, and ``analytic`` on an
            MLP; tabular data on an MLP.
        attacks: Attacks to run.
        protections: Protections to run them against.
    """

    name: DatasetKind
    attacks: tuple[AttackKind, ...] = tuple(AttackKind)
    protections: tuple[MatrixProtection, ...] = (
        MatrixProtection.NONE,
        MatrixProtection.DP,
        MatrixProtection.AGGREGATE,
        MatrixProtection.CIPHERTEXT,
    )

    def __post_init__(self) -> None:
        if not isinstance(self.name, DatasetKind):
            raise ConfigError("name", self.name, f"must be one of {[d.value for d in DatasetKind]}")
        _enum_tuple("attacks", self.attacks, AttackKind)
        _enum_tuple("protections", self.protections, MatrixProtection)


@dataclass(frozen=True, kw_only=True, slots=True)
class DPSettings:
    """DP-SGD rows.

    Args:
        noise_multipliers: sigma of each row (each > 0, so the row has a finite epsilon).
        max_grad_norm: per-example clipping bound C.
    """

    noise_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0)
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.noise_multipliers, tuple) or not self.noise_multipliers:
            raise ConfigError("noise_multipliers", self.noise_multipliers, "must be a non-empty list of numbers > 0")
        for i, sigma in enumerate(self.noise_multipliers):
            _positive(f"noise_multipliers[{i}]", sigma)
        _positive("max_grad_norm", self.max_grad_norm)


@dataclass(frozen=True, kw_only=True, slots=True)
class AggregateSettings:
    """Secure-aggregate rows: what SecAgg or CKKS reveals after decryption, the average of ``k`` clients.

    Args:
        num_clients: ``k`` of each row; every client holds ``batch_size`` victim inputs.
    """

    num_clients: tuple[int, ...] = (1, 4, 16)

    def __post_init__(self) -> None:
        if not isinstance(self.num_clients, tuple) or not self.num_clients:
            raise ConfigError("num_clients", self.num_clients, "must be a non-empty list of integers >= 1")
        for i, k in enumerate(self.num_clients):
            _positive_int(f"num_clients[{i}]", k)


@dataclass(frozen=True, kw_only=True, slots=True)
class FedAvgSettings:
    """The optional FedAvg row: plain local SGD over the client's ``batch_size`` inputs.

    Args:
        local_steps: local SGD steps before the update is sent.
        lr: local learning rate.
    """

    local_steps: int = 5
    lr: float = 0.1

    def __post_init__(self) -> None:
        _positive_int("local_steps", self.local_steps)
        _positive("lr", self.lr)


@dataclass(frozen=True, kw_only=True, slots=True)
class InvertingSettings:
    """Inverting Gradients knobs (see :class:`privfl.attacks.InvertingGradients`).

    Args:
        max_iterations: signed-Adam steps per restart; the main cost and strength knob.
        restarts: random starts, the best kept.
        lr: step size.
        tv_weight: total-variation prior weight (images only); None: chosen from the model (0 for
            sigmoid/tanh networks, 1e-2 otherwise; docs/attacks.md, "Smooth models").
    """

    max_iterations: int = 2000
    restarts: int = 1
    lr: float = 0.1
    tv_weight: float | None = None

    def __post_init__(self) -> None:
        _positive_int("max_iterations", self.max_iterations)
        _positive_int("restarts", self.restarts)
        _positive("lr", self.lr)
        if self.tv_weight is not None:
            _positive("tv_weight", self.tv_weight, allow_zero=True)


@dataclass(frozen=True, kw_only=True, slots=True)
class DLGSettings:
    """DLG knobs (see :class:`privfl.attacks.DLG`).

    Args:
        max_iterations: outer L-BFGS steps.
        inner_iterations: function evaluations per L-BFGS step.
        lr: L-BFGS step size.
    """

    max_iterations: int = 30
    inner_iterations: int = 20
    lr: float = 1.0

    def __post_init__(self) -> None:
        _positive_int("max_iterations", self.max_iterations)
        _positive_int("inner_iterations", self.inner_iterations)
        _positive("lr", self.lr)


def _default_datasets() -> tuple[DatasetMatrix, ...]:
    return (DatasetMatrix(name=DatasetKind.DIGITS), DatasetMatrix(name=DatasetKind.BREAST_CANCER))


@dataclass(frozen=True, kw_only=True, slots=True)
class AttackMatrixConfig:
    """Everything ``privfl attack`` needs.

    Args:
        datasets: the datasets, each with its attacks and protections.
        batch_size: victim inputs behind one client's gradient (per client in an aggregate).
        client_examples: the client's dataset size n; DP rows are accounted at ``q = batch_size / n``.
        delta: the delta DP epsilons are stated at.
        trials: independent victim draws per cell; metrics are averaged over them.
        seed: seeds the data split, the victim draws, model initialisation, DP noise and the attacks.
        threads: torch intra-op threads while the matrix runs (restored afterwards); 0 keeps torch's
            setting. The models are tiny, so more threads gain little and stall badly on a shared machine.
        margin_db: a reconstruction counts as recovered when its PSNR beats chance by more than this.
        exact_tolerance: ... or when every feature is within this of the truth (the analytic attack).
        dp: DP-SGD rows.
        aggregate: secure-aggregate rows.
        fedavg: the FedAvg row (run when a dataset lists ``fedavg``).
        inverting: Inverting Gradients settings.
        dlg: DLG settings.
    """

    datasets: tuple[DatasetMatrix, ...] = field(default_factory=_default_datasets)
    batch_size: int = 1
    client_examples: int = 32
    delta: float = 1e-5
    trials: int = 3
    seed: int = 0
    threads: int = 1
    margin_db: float = 3.0
    exact_tolerance: float = 1e-4
    dp: DPSettings = field(default_factory=DPSettings)
    aggregate: AggregateSettings = field(default_factory=AggregateSettings)
    fedavg: FedAvgSettings = field(default_factory=FedAvgSettings)
    inverting: InvertingSettings = field(default_factory=InvertingSettings)
    dlg: DLGSettings = field(default_factory=DLGSettings)

    def __post_init__(self) -> None:
        if not isinstance(self.datasets, tuple) or not self.datasets:
            raise ConfigError("datasets", self.datasets, "must list at least one dataset")
        for i, d in enumerate(self.datasets):
            if not isinstance(d, DatasetMatrix):
                raise ConfigError(f"datasets[{i}]", d, "must be a DatasetMatrix")
        names = [d.name.value for d in self.datasets]
        if len(set(names)) != len(names):
            raise ConfigError("datasets", names, "lists a dataset twice")
        _positive_int("batch_size", self.batch_size)
        _positive_int("client_examples", self.client_examples)
        if self.client_examples < self.batch_size:
            raise ConfigError("client_examples", self.client_examples, f"must be >= batch_size={self.batch_size}")
        if not (isinstance(self.delta, float) and 0 < self.delta < 1):
            raise ConfigError("delta", self.delta, "must be a float in (0, 1)")
        _positive_int("trials", self.trials)
        _positive_int("seed", self.seed, minimum=0)
        _positive_int("threads", self.threads, minimum=0)
        _positive("margin_db", self.margin_db, allow_zero=True)
        _positive("exact_tolerance", self.exact_tolerance, allow_zero=True)
        for name, cls in (
            ("dp", DPSettings),
            ("aggregate", AggregateSettings),
            ("fedavg", FedAvgSettings),
            ("inverting", InvertingSettings),
            ("dlg", DLGSettings),
        ):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(name, getattr(self, name), f"must be a {cls.__name__}")

    @property
    def sample_rate(self) -> float:
        """q of a DP row: ``batch_size / client_examples``."""
        return self.batch_size / self.client_examples

    def to_json(self) -> dict[str, Any]:
        """The config as plain JSON values (enums by value)."""
        return _plain(self)


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__}
    return value


def attack_config_from_dict(table: dict[str, Any]) -> AttackMatrixConfig:
    """Builds an :class:`AttackMatrixConfig` from a parsed TOML table.

    Raises:
        ConfigError: an unknown key or a bad value (the message names its dotted path).
    """
    return dataclass_from_dict(AttackMatrixConfig, table)


def load_attack_config(path: str | os.PathLike[str]) -> AttackMatrixConfig:
    """Reads a TOML attack-matrix config.

    Raises:
        ConfigError: the file is missing, is not TOML, or holds a bad value.
    """
    return attack_config_from_dict(load_toml(path))


def default_attack_config() -> AttackMatrixConfig:
    """The embedded default (``privfl/defaults/attack.toml``): digits and breast cancer, every attack."""
    text = resources.files("privfl").joinpath("defaults/attack.toml").read_text()
    return attack_config_from_dict(tomllib.loads(text))


# --------------------------------------------------------------------------------------------------
# Data and models


@dataclass(frozen=True, slots=True)
class _Data:
    """One dataset as the harness uses it: the victims' pool, the public prior and how to score."""

    name: str
    test_inputs: torch.Tensor
    test_labels: torch.Tensor
    baseline: torch.Tensor  # the dataset-mean input, the guess of an attacker who learned nothing
    data_range: float
    chance_label_accuracy: float  # always guessing the most frequent class
    is_image: bool


def _load(kind: DatasetKind, seed: int) -> _Data:
    from privfl.attacks.metrics import chance_baseline
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


def _seeded(seed: int, build: Any) -> torch.nn.Module:
    # fork_rng keeps the caller's global torch RNG untouched: the harness must not perturb a user's run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


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
    kind: MatrixProtection
    label: str
    spec: Any  # attacks.evaluate.ObservationSpec
    num_inputs: int
    epsilon: float  # math.inf when the setting is not differentially private
    privacy: str
    noise_multiplier: float | None = None
    num_clients: int | None = None


def _settings(config: AttackMatrixConfig, protections: tuple[MatrixProtection, ...]) -> list[_Setting]:
    from privfl.attacks.evaluate import ObservationSpec, Protection

    b = config.batch_size
    out: list[_Setting] = []
    for kind in protections:
        if kind is MatrixProtection.NONE:
            spec = ObservationSpec(protection=Protection.PLAINTEXT)
            out.append(_Setting(kind, "none", spec, b, math.inf, "not private"))
        elif kind is MatrixProtection.DP:
            q = config.sample_rate
            for sigma in config.dp.noise_multipliers:
                eps = dp_epsilon(noise_multiplier=sigma, sample_rate=q, steps=1, delta=config.delta)
                spec = ObservationSpec(protection=Protection.DP, noise_multiplier=sigma,
                                       max_grad_norm=config.dp.max_grad_norm, seed=config.seed)
                out.append(_Setting(kind, f"dp sigma={sigma:g}", spec, b, eps,
                                    f"sample-level DP, one DP-SGD step at q={q:.4g}, delta={config.delta:g}",
                                    noise_multiplier=sigma))
        elif kind is MatrixProtection.AGGREGATE:
            for k in config.aggregate.num_clients:
                spec = ObservationSpec(protection=Protection.AGGREGATE, num_clients=k)
                out.append(_Setting(kind, f"aggregate k={k}", spec, k * b, math.inf, "not private", num_clients=k))
        elif kind is MatrixProtection.CIPHERTEXT:
            spec = ObservationSpec(protection=Protection.CIPHERTEXT, seed=config.seed)
            out.append(_Setting(kind, "ciphertext", spec, b, math.inf, "no access"))
        else:
            f = config.fedavg
            spec = ObservationSpec(protection=Protection.FEDAVG, local_steps=f.local_steps, lr=f.lr, batch_size=b)
            out.append(_Setting(kind, f"fedavg {f.local_steps} steps", spec, b, math.inf, "not private"))
    return out


def _attack(kind: AttackKind, config: AttackMatrixConfig, data: _Data) -> Any:
    from privfl.attacks import DLG, AnalyticLinear, InvertingGradients

    # Images live in [0, 1], a box every image pipeline reveals; standardized rows have no box.
    bounds = (0.0, 1.0) if data.is_image else None
    if kind is AttackKind.ANALYTIC:
        return AnalyticLinear()
    if kind is AttackKind.DLG:
        d = config.dlg
        return DLG(max_iterations=d.max_iterations, inner_iterations=d.inner_iterations, lr=d.lr, bounds=bounds,
                   seed=config.seed)
    if kind is AttackKind.INVERTING:
        i = config.inverting
        return InvertingGradients(max_iterations=i.max_iterations, restarts=i.restarts, lr=i.lr,
                                  tv_weight=i.tv_weight, bounds=bounds, seed=config.seed)
    return None  # labels: recover_labels, a function


# --------------------------------------------------------------------------------------------------
# Rows and results


@dataclass(frozen=True, kw_only=True, slots=True)
class AttackRow:
    """One cell of the matrix: an attack against a protection on a dataset, averaged over trials.

    Reconstruction metrics are computed on the best one-to-one matching of reconstructed to true inputs and
    are NaN for label-only rows and for rows without access. ``max_abs_error`` is the largest over trials.

    Attributes:
        dataset: dataset name.
        model: the model attacked (``convnet`` or ``mlp``).
        attack: attack name (an :class:`AttackKind` value).
        protection: protection name (a :class:`MatrixProtection` value).
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
    protection: str
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


@dataclass(frozen=True, kw_only=True, slots=True)
class AttackMatrixResult:
    """What :func:`run_attack_matrix` produced.

    Attributes:
        config: the config that ran.
        rows: one row per cell, in matrix order.
        out_dir: where the files were written.
        files: the files written (results.json, results.md, grid-<dataset>.png).
        seconds: wall-clock time of the whole matrix.
        overwrote: ``True`` when ``out_dir`` already held results, which were replaced.
        cells_planned: the cells the config asks for; ``len(rows)`` is smaller when interrupted.
    """

    config: AttackMatrixConfig
    rows: tuple[AttackRow, ...]
    out_dir: Path
    files: tuple[Path, ...]
    seconds: float
    overwrote: bool
    cells_planned: int = 0

    @property
    def complete(self) -> bool:
        """Whether every planned cell ran (False after an interrupt)."""
        return len(self.rows) >= self.cells_planned


class AttackMatrixInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_attack_matrix`, raised after the finished cells were written.

    A ``KeyboardInterrupt``, so code that stops on Ctrl-C still stops; it carries what was kept.

    Attributes:
        result: the finished cells and the files written, or ``None`` when no cell had finished
            (then nothing was written and earlier results in the directory are untouched).
        cells_planned: the cells the config asks for.
    """

    def __init__(self, result: AttackMatrixResult | None, cells_planned: int) -> None:
        self.result = result
        self.cells_planned = cells_planned
        done = 0 if result is None else len(result.rows)
        super().__init__(f"interrupted after {done} of {cells_planned} cells")


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
class _Shown:
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
    from privfl.attacks.metrics import best_match, pairwise_psnr

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
    observations: list[Any],
    victims: list[tuple[torch.Tensor, torch.Tensor]],
    config: AttackMatrixConfig,
) -> tuple[AttackRow, _Shown | None]:
    from privfl.attacks import CiphertextObservation, Reconstruction, recover_labels
    from privfl.attacks.evaluate import score
    from privfl.attacks.metrics import label_accuracy

    attack = _attack(kind, config, data)
    if kind is AttackKind.INVERTING and setting.kind is MatrixProtection.FEDAVG:
        # A FedAvg update is attacked with the replay built for it, at the same settings and budget.
        from privfl.attacks import FedAvgInversion

        i = config.inverting
        attack = FedAvgInversion(max_iterations=i.max_iterations, restarts=i.restarts, lr=i.lr,
                                 tv_weight=i.tv_weight, bounds=(0.0, 1.0) if data.is_image else None,
                                 seed=config.seed)
    seconds = 0.0
    scores: list[Any] = []
    accuracies: list[float] = []
    shown: _Shown | None = None
    recovered_counts: list[int] = []
    note = ""
    for trial, (obs, (x, y)) in enumerate(zip(observations, victims, strict=True)):
        start = time.perf_counter()
        try:
            if kind is AttackKind.LABELS:
                if isinstance(obs, CiphertextObservation):
                    rec = Reconstruction.no_access(obs, attack="labels", note="ciphertext: no labels to read")
                else:
                    labels = recover_labels(model, obs, seed=config.seed)
                    rec = None
                    accuracies.append(label_accuracy(labels, y, ordered=False))
            else:
                rec = attack.reconstruct(model, obs)
        except AttackError as exc:
            # A cell the attack cannot handle is a finding to report, not a reason to lose the matrix.
            seconds += time.perf_counter() - start
            note = str(exc)
            continue
        seconds += time.perf_counter() - start
        if rec is None:
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
        if trial == 0 and kind is not AttackKind.LABELS:
            shown = _Shown(originals=x.detach().double().cpu(), reconstructions=aligned)

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
        dataset=data.name, model=model_name, attack=kind.value, protection=setting.kind.value, setting=setting.label,
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


def _cells(config: AttackMatrixConfig) -> int:
    return sum(len(d.attacks) * len(_settings(config, d.protections)) for d in config.datasets)


class _Bar:
    """A rich progress bar over the matrix cells (silent when disabled)."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self._progress: Any = None
        self._task: Any = None
        self.total = total
        self.enabled = enabled

    def __enter__(self) -> _Bar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]attacks"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[cell]}"), console=Console(stderr=True), transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("attacks", total=self.total, cell="loading data")
        return self

    def show(self, cell: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, cell=cell)

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def _matrix(config: AttackMatrixConfig, bar: _Bar) -> Iterator[tuple[str, AttackRow, _Shown | None, float]]:
    from privfl.attacks.evaluate import build_observation

    for entry in config.datasets:
        data = _load(entry.name, config.seed)
        models, use = _models(data, config.seed)
        settings = _settings(config, entry.protections)
        victims = _victims(data, max(s.num_inputs for s in settings), config.trials, config.seed)
        for setting in settings:
            observations: dict[str, list[Any]] = {}
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


def _trial_spec(spec: Any, trial: int) -> Any:
    from dataclasses import replace

    # A fresh DP noise draw per trial, reproducible from the config's seed.
    return replace(spec, seed=spec.seed + trial)


# --------------------------------------------------------------------------------------------------
# Outputs


def _num(value: float, digits: int = 2) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _sci(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.1e}"


def _eps(row: AttackRow) -> str:
    return "inf" if math.isinf(row.epsilon) else f"{row.epsilon:.3g}"


def _markdown(rows: tuple[AttackRow, ...]) -> str:
    header = (
        "| dataset | attack | protection | ε | recovered / inputs | PSNR dB | chance dB | best-match dB "
        "| best chance dB | SSIM | MSE | max abs err | label acc | chance label acc | verdict | s |"
    )
    lines = [header, "|" + "---|" * 16]
    for r in rows:
        batch = r.num_inputs > 1
        psnr = "no access" if r.verdict == NO_ACCESS else _num(r.psnr)
        got = "—" if math.isnan(r.inputs_recovered) else f"{round(r.inputs_recovered, 1):g}"
        lines.append(
            f"| {r.dataset} | {r.attack} | {r.setting} | {_eps(r)} | {got} / {r.num_inputs} | {psnr} "
            f"| {_num(r.chance_psnr)} "
            f"| {_num(r.best_psnr) if batch else '—'} | {_num(r.best_chance_psnr) if batch else '—'} "
            f"| {_num(r.ssim, 3)} | {_sci(r.mse)} | {_sci(r.max_abs_error)} | {_num(r.label_accuracy)} "
            f"| {_num(r.chance_label_accuracy)} | {r.verdict} | {r.seconds:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _grid_images(path: Path, shown: dict[tuple[str, str], _Shown], settings: list[str], attacks: list[str]) -> None:
    """For each setting a row: the original inputs, then each attack's matched reconstructions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = max(min(4, s.originals.shape[0]) for s in shown.values())  # inputs shown per group
    groups = ["original", *attacks]
    cols = len(groups) * per + (len(groups) - 1)  # one blank column between groups
    fig, axes = plt.subplots(len(settings), cols, figsize=(0.62 * cols + 1.6, 0.7 * len(settings) + 0.6),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for r, setting in enumerate(settings):
        originals = next(s.originals for (st, _), s in shown.items() if st == setting)
        axes[r][0].text(-0.15, 0.5, setting, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8)
        for g, group in enumerate(groups):
            if group == "original":
                images: torch.Tensor | None = originals
            else:
                cell = shown.get((setting, group))
                if cell is None:
                    continue
                images = cell.reconstructions
            for i in range(min(per, originals.shape[0])):
                ax = axes[r][g * (per + 1) + i]
                if r == 0 and i == 0:
                    ax.set_title(group, fontsize=8, loc="left")
                if images is None:
                    ax.text(0.5, 0.5, "no\naccess", ha="center", va="center", fontsize=6, color="0.4")
                    continue
                # nearest: an 8x8 image blown up by interpolation would show detail that is not there.
                ax.imshow(images[i, 0].clamp(0, 1).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    fig.suptitle("originals (first inputs) and matched reconstructions; dark = ink", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _grid_rows(path: Path, shown: dict[tuple[str, str], _Shown], settings: list[str], attacks: list[str]) -> None:
    """A heatmap of the first victim row: original and each attack's reconstruction, per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels: list[str] = []
    values: list[np.ndarray] = []
    for setting in settings:
        originals = next(s.originals for (st, _), s in shown.items() if st == setting)
        labels.append(f"{setting} · original")
        values.append(originals[0].numpy())
        for attack in attacks:
            cell = shown.get((setting, attack))
            if cell is None:
                continue
            labels.append(f"{setting} · {attack}")
            rec = cell.reconstructions
            values.append(np.full(originals.shape[1:], np.nan) if rec is None else rec[0].numpy())
    table = np.stack(values)
    fig, ax = plt.subplots(figsize=(9, 0.22 * len(labels) + 1.4))
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.85")  # grey: no access
    # Standardized features: +-3 covers nearly all rows; larger errors saturate instead of hiding the rest.
    image = ax.imshow(np.ma.masked_invalid(table), aspect="auto", cmap=cmap, vmin=-3, vmax=3, interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("feature (standardized)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    for y, label in enumerate(labels):
        if label.endswith("original") and y:
            ax.axhline(y - 0.5, color="black", linewidth=0.8)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    ax.set_title("first victim row: original vs reconstructions (grey = no access)", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def run_attack_matrix(
    config: AttackMatrixConfig, out_dir: str | os.PathLike[str], *, progress: bool = True
) -> AttackMatrixResult:
    """Runs every configured attack against every configured protection and writes the report.

    Writes ``results.json`` (config, rows, timings), ``results.md`` (the table) and one
    ``grid-<dataset>.png`` per dataset into ``out_dir``. Results already there are overwritten (nothing
    is spent by an attack run), and a warning says so. On Ctrl-C the cells that finished are
    written (``results.json`` says ``"complete": false`` and how many of the planned cells ran,
    ``results.md`` says so first) and :class:`AttackMatrixInterrupted` is raised.

    Args:
        config: the matrix.
        out_dir: output directory, created if missing.
        progress: show a progress bar over the cells on stderr.

    Returns:
        The rows and the files written.

    Raises:
        ConfigError: ``out_dir`` is a file, or an aggregate asks for more victims than a test split holds.
        AttackMatrixInterrupted: Ctrl-C; the finished cells were written first.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("out", str(out), "exists and is not a directory")
    overwrote = (out / "results.json").exists()
    if overwrote:
        logger.warning("%s already holds attack results; overwriting them", out)
    out.mkdir(parents=True, exist_ok=True)

    previous_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run_and_write(config, out, overwrote=overwrote, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run_and_write(config: AttackMatrixConfig, out: Path, *, overwrote: bool, progress: bool) -> AttackMatrixResult:
    started = time.perf_counter()
    rows: list[AttackRow] = []
    shown: dict[str, dict[tuple[str, str], _Shown]] = {}
    per_dataset: dict[str, float] = {}
    build: dict[str, float] = {}
    planned = _cells(config)
    interrupted = False
    with _Bar(planned, enabled=progress) as bar:
        last = time.perf_counter()
        try:
            for dataset, row, cell, build_seconds in _matrix(config, bar):
                rows.append(row)
                if cell is not None:
                    shown.setdefault(dataset, {})[(row.setting, row.attack)] = cell
                now = time.perf_counter()
                per_dataset[dataset] = per_dataset.get(dataset, 0.0) + now - last
                build[dataset] = build.get(dataset, 0.0) + build_seconds
                last = now
        except KeyboardInterrupt:
            # A full matrix takes minutes to hours: the cells that finished are kept and written
            # below, marked incomplete; the interrupt is raised again once they are on disk.
            interrupted = True
    if interrupted and not rows:
        raise AttackMatrixInterrupted(None, planned)
    seconds = time.perf_counter() - started

    files = [out / "results.json", out / "results.md"]
    for dataset, cells in shown.items():
        settings = list(dict.fromkeys(r.setting for r in rows if r.dataset == dataset))
        attacks = list(dict.fromkeys(a for (_, a) in cells))
        path = out / f"grid-{dataset}.png"
        is_image = next(iter(cells.values())).originals.ndim == 4
        (_grid_images if is_image else _grid_rows)(path, cells, settings, attacks)
        files.append(path)

    result = AttackMatrixResult(config=config, rows=tuple(rows), out_dir=out, files=tuple(files), seconds=seconds,
                                overwrote=overwrote, cells_planned=planned)
    payload = {
        "config": config.to_json(),
        "complete": not interrupted,
        "cells": {"finished": len(rows), "planned": planned},
        "rows": [r.to_json() for r in rows],
        "timings": {
            "total_s": seconds,
            # The first dataset's time includes loading data and building models.
            "per_dataset_s": per_dataset,
            "observation_build_s": build,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "verdicts": {
            RECOVERED: f"PSNR > chance + {config.margin_db:g} dB, or every feature within {config.exact_tolerance:g}; "
            "labels: all recovered, above the majority-class guess",
            PARTIAL: "the mean is not above chance, but at least one input (in some trial) is: inputs_recovered > 0 "
            "(labels: above the majority-class guess, not all right)",
            NOT_ABOVE_CHANCE: "no better than guessing the dataset mean (labels: the majority class)",
            NO_ACCESS: "the server holds only ciphertext",
        },
        "epsilon": "null means not differentially private (infinite epsilon); see each row's privacy field",
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    status = (
        f"**Interrupted: {len(rows)} of {planned} cells finished; the others did not run.**\n\n" if interrupted else ""
    )
    (out / "results.md").write_text(
        f"{status}Attack matrix ({seconds:.0f} s). ε: sample-level epsilon of one DP-SGD step at q = "
        f"{config.batch_size}/{config.client_examples}, delta = {config.delta:g}; inf = not DP.\n\n"
        + _markdown(result.rows)
    )
    if interrupted:
        raise AttackMatrixInterrupted(result, planned)
    return result


def print_attack_summary(result: AttackMatrixResult, *, console: Any) -> None:
    """Prints a compact table of the matrix (fits 80 columns) and where the files went.

    Args:
        result: what :func:`run_attack_matrix` returned.
        console: a ``rich.console.Console``.
    """
    from rich import box
    from rich.console import JustifyMethod
    from rich.table import Table

    colours = {RECOVERED: "red", PARTIAL: "yellow", NOT_ABOVE_CHANCE: "green", NO_ACCESS: "cyan"}
    # One table per dataset, no vertical rules: the summary fits an 80-column terminal or log.
    for dataset in dict.fromkeys(r.dataset for r in result.rows):
        table = Table(title=dataset, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, collapse_padding=True)
        columns: tuple[tuple[str, JustifyMethod], ...] = (
            ("attack", "left"), ("protection", "left"), ("ε", "right"), ("PSNR dB", "right"),
            ("chance", "right"), ("labels", "right"), ("verdict", "left"),
        )
        for name, justify in columns:
            table.add_column(name, justify=justify, no_wrap=True, min_width=len(name))
        for r in (r for r in result.rows if r.dataset == dataset):
            quality = r.attack != AttackKind.LABELS.value and r.verdict != NO_ACCESS
            colour = colours.get(r.verdict, "white")
            table.add_row(r.attack, r.setting, _eps(r), _num(r.psnr, 1) if quality else "—",
                          _num(r.chance_psnr, 1) if quality else "—", _num(r.label_accuracy),
                          f"[{colour}]{r.verdict}[/]")
        console.print(table)
    console.print(f"{len(result.rows)} cells in {result.seconds:.0f} s; wrote "
                  + ", ".join(str(p) for p in result.files))
    if result.overwrote:
        console.print(f"[yellow]replaced earlier results in {result.out_dir}[/]")
