"""The attack matrix's configuration: datasets, attacks, what the server observes, and the attacks' settings."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from privfl import _validate
from privfl.config import DatasetKind, dataclass_from_dict, load_toml
from privfl.errors import ConfigError

from ..base import ServerView

__all__ = [
    "AggregateSettings",
    "AttackKind",
    "AttackMatrixConfig",
    "DLGSettings",
    "DPSettings",
    "DatasetMatrix",
    "FedAvgSettings",
    "InvertingSettings",
    "attack_config_from_dict",
    "default_attack_config",
    "load_attack_config",
]


class AttackKind(str, Enum):
    """Attacks the matrix can run, each an :class:`~privfl.attacks.Attack`."""

    LABELS = "labels"
    """Label recovery only (:class:`~privfl.attacks.LabelRecovery`: iDLG for one input, label counts for a batch)."""
    ANALYTIC = "analytic"
    """Closed-form read-off from a first linear layer with bias (on an MLP)."""
    DLG = "dlg"
    """Deep Leakage from Gradients: L2 gradient matching with L-BFGS."""
    INVERTING = "inverting"
    """Inverting Gradients: cosine gradient matching with a TV prior."""


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
        protections: What the server observes, one entry per protection compared (a
            :class:`~privfl.attacks.ServerView`; ``"none"`` is read as ``"plaintext"``). ``dp`` expands
            into one row per ``dp.noise_multipliers`` entry, ``aggregate`` into one per ``aggregate.num_clients``.
    """

    name: DatasetKind
    attacks: tuple[AttackKind, ...] = tuple(AttackKind)
    protections: tuple[ServerView, ...] = (
        ServerView.PLAINTEXT,
        ServerView.DP_SGD,
        ServerView.AGGREGATE,
        ServerView.CIPHERTEXT,
    )

    def __post_init__(self) -> None:
        if not isinstance(self.name, DatasetKind):
            raise ConfigError("name", self.name, f"must be one of {[d.value for d in DatasetKind]}")
        _enum_tuple("attacks", self.attacks, AttackKind)
        _enum_tuple("protections", self.protections, ServerView)


@dataclass(frozen=True, kw_only=True, slots=True)
class DPSettings:
    """DP-SGD rows: each observes one step of :func:`privfl.training.train_dp_sgd` over the victims.

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
            _validate.positive(f"noise_multipliers[{i}]", sigma)
        _validate.positive("max_grad_norm", self.max_grad_norm)


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
            _validate.positive_int(f"num_clients[{i}]", k)


@dataclass(frozen=True, kw_only=True, slots=True)
class FedAvgSettings:
    """The FedAvg row: what a site sends, the change of its model after local SGD on mini-batches.

    The client holds ``inputs`` victim inputs and takes ``local_steps`` plain SGD steps on mini-batches
    of ``batch_size`` of them, in order, wrapping around (4 inputs, 4 steps of 2: each input is used
    twice); the attacker knows these settings (the server chose them) but not the labels.

    Args:
        inputs: victim inputs behind the update.
        local_steps: local SGD steps before the update is sent.
        batch_size: local mini-batch size (at most ``inputs``).
        lr: local learning rate.
    """

    inputs: int = 4
    local_steps: int = 4
    batch_size: int = 2
    lr: float = 0.1

    def __post_init__(self) -> None:
        _validate.positive_int("inputs", self.inputs)
        _validate.positive_int("local_steps", self.local_steps)
        _validate.positive_int("batch_size", self.batch_size)
        _validate.positive("lr", self.lr)
        if self.batch_size > self.inputs:
            raise ConfigError("fedavg.batch_size", self.batch_size, f"must be <= fedavg.inputs={self.inputs}")


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
        _validate.positive_int("max_iterations", self.max_iterations)
        _validate.positive_int("restarts", self.restarts)
        _validate.positive("lr", self.lr)
        if self.tv_weight is not None:
            _validate.positive("tv_weight", self.tv_weight, allow_zero=True)


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
        _validate.positive_int("max_iterations", self.max_iterations)
        _validate.positive_int("inner_iterations", self.inner_iterations)
        _validate.positive("lr", self.lr)


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
        _validate.positive_int("batch_size", self.batch_size)
        _validate.positive_int("client_examples", self.client_examples)
        if self.client_examples < self.batch_size:
            raise ConfigError("client_examples", self.client_examples, f"must be >= batch_size={self.batch_size}")
        if not (isinstance(self.delta, float) and 0 < self.delta < 1):
            raise ConfigError("delta", self.delta, "must be a float in (0, 1)")
        _validate.positive_int("trials", self.trials)
        _validate.positive_int("seed", self.seed, minimum=0)
        _validate.positive_int("threads", self.threads, minimum=0)
        _validate.positive("margin_db", self.margin_db, allow_zero=True)
        _validate.positive("exact_tolerance", self.exact_tolerance, allow_zero=True)
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
