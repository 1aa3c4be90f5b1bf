"""Configuration objects for a federated run, validated on construction, and their TOML loader.

Every config is a frozen, keyword-only dataclass checked in ``__post_init__``; a bad value raises
:class:`~privfl.errors.ConfigError` naming the field and the value. Choices are enums. The CLI only
parses a TOML file into these same objects.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

from privfl import _validate
from privfl.accounting import Accountant
from privfl.errors import ConfigError
from privfl.protocols.ckks_params import CkksConfig
from privfl.protocols.secagg.protection import SecAggConfig
from privfl.protocols.shared_key import SharedKeyConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "Adjacency",
    "CkksConfig",
    "ClientDPConfig",
    "ClientSampling",
    "ClippingMode",
    "DPConfig",
    "DataConfig",
    "DatasetKind",
    "FederationConfig",
    "ModelConfig",
    "ModelKind",
    "PartitionKind",
    "ProtectionKind",
    "RunConfig",
    "SecAggConfig",
    "SharedKeyConfig",
    "TrainingConfig",
    "config_from_dict",
    "dataclass_from_dict",
    "default_config",
    "load_config",
    "load_toml",
]


class ProtectionKind(str, Enum):
    """How a client's update is protected before it leaves the client."""

    PLAINTEXT = "plaintext"
    """No protection (baseline): the server sees every update."""
    CKKS = "ckks"
    """CKKS homomorphic encryption: the server sums ciphertexts it cannot decrypt."""
    SECAGG = "secagg"
    """Secure aggregation masks (Bonawitz et al. 2017 / SecAgg+): the server learns only the sum."""
    SHARED_KEY = "shared_key"
    """RLWE encryption under a key every site shares and the server never holds (about 1-2x the float32 upload)."""


class ClippingMode(str, Enum):
    """How DP-SGD computes per-example gradient norms."""

    AUTO = "auto"
    """Book-keeping for models of linear layers it supports, ghost or per-sample gradients otherwise."""
    PER_SAMPLE = "per_sample"
    """Materialise every per-example gradient (Opacus hooks)."""
    GHOST = "ghost"
    """Ghost clipping (Li et al. 2021; Bu et al. 2022): norms without per-example gradients, two backward passes."""
    BOOKKEEPING = "bookkeeping"
    """Book-keeping (Bu et al. 2023): ghost norms and the clipped sum from one backward pass (privfl.bookkeeping)."""


class PartitionKind(str, Enum):
    """How a dataset is split across clients."""

    IID = "iid"
    DIRICHLET = "dirichlet"
    """Label skew: each class's examples are spread by Dirichlet(alpha) proportions."""
    GROUP = "group"
    """One client per value of a group column (e.g. a site or region)."""


class DatasetKind(str, Enum):
    """Bundled datasets (all ship inside installed packages or are generated; nothing is downloaded)."""

    BREAST_CANCER = "breast_cancer"
    DIGITS = "digits"
    CREDIT = "credit"


class ModelKind(str, Enum):
    """Bundled model architectures for the CLI (library users pass their own ``nn.Module``)."""

    LOGISTIC = "logistic"
    MLP = "mlp"
    CNN = "cnn"


def _coerce_enum(config: object, name: str, enum: type[Enum]) -> None:
    """Accepts an enum member or its string value for field ``name`` (frozen dataclasses included)."""
    value = getattr(config, name)
    if isinstance(value, enum):
        return
    object.__setattr__(config, name, _validate.member(name, value, enum))


# The shared numeric checks, under the names this module (and the attack matrix's config) has always used.
_positive = _validate.positive
_positive_int = _validate.positive_int
_unit_interval = _validate.unit_interval


DEFAULT_TARGET_EPSILON = 3.0
"""Each site's sample-level epsilon for the whole run when a config sets neither epsilon nor sigma."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DPConfig:
    """DP-SGD settings for every client (sample-level DP: each record in a client's data).

    At most one of ``noise_multiplier`` and ``target_epsilon`` is set; with neither,
    ``target_epsilon`` is :data:`DEFAULT_TARGET_EPSILON` (3.0). With ``target_epsilon`` the
    noise multiplier is calibrated per client for the whole planned run (every round the client
    may take part in), never per round.

    Args:
        target_epsilon: each client's epsilon budget for the whole run (default 3.0 when no
            ``noise_multiplier`` is given).
        noise_multiplier: a fixed sigma instead (the budget is then ``budget_epsilon``, if set).
        budget_epsilon: with a fixed ``noise_multiplier``, the epsilon a client may not exceed
            (``None``: no cap).
        delta: the delta every client's guarantee is stated at.
        max_grad_norm: per-example clipping norm C.
        accountant: composition method for the ledger and calibration.
        clipping: per-sample gradients, ghost clipping or book-keeping.
        planned_participation_quantile: with client sampling below 1, calibration plans for this
            quantile of the Binomial(rounds, client_fraction) number of rounds a client is
            sampled in; the ledger skips a client in the rare rounds beyond it.
    """

    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    budget_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: Accountant = Accountant.PRV
    clipping: ClippingMode = ClippingMode.AUTO
    planned_participation_quantile: float = 0.99

    def __post_init__(self) -> None:
        if self.target_epsilon is not None and self.noise_multiplier is not None:
            raise ConfigError(
                "target_epsilon/noise_multiplier",
                (self.target_epsilon, self.noise_multiplier),
                "set at most one of them (a fixed sigma, or an epsilon to calibrate it to)",
            )
        if self.target_epsilon is None and self.noise_multiplier is None:
            # A [training.dp] table that sets only, say, max_grad_norm keeps the documented default.
            object.__setattr__(self, "target_epsilon", DEFAULT_TARGET_EPSILON)
        if self.target_epsilon is not None:
            _positive("target_epsilon", self.target_epsilon)
            if self.budget_epsilon is not None:
                raise ConfigError("budget_epsilon", self.budget_epsilon, "is implied by target_epsilon; leave it unset")
        if self.noise_multiplier is not None:
            _positive("noise_multiplier", self.noise_multiplier)
        if self.budget_epsilon is not None:
            _positive("budget_epsilon", self.budget_epsilon)
        if not (isinstance(self.delta, float) and 0 < self.delta < 1):
            raise ConfigError("delta", self.delta, "must be a float in (0, 1)")
        _positive("max_grad_norm", self.max_grad_norm)
        _unit_interval("planned_participation_quantile", self.planned_participation_quantile)
        _coerce_enum(self, "accountant", Accountant)
        _coerce_enum(self, "clipping", ClippingMode)

    @property
    def epsilon_budget(self) -> float:
        """The epsilon cap the ledger enforces (infinite when none is set)."""
        if self.target_epsilon is not None:
            return self.target_epsilon
        return self.budget_epsilon if self.budget_epsilon is not None else math.inf


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingConfig:
    """Local training on each client.

    Args:
        local_epochs: passes over the client's data per round (in expectation, with Poisson sampling).
        batch_size: expected batch size; the sampling rate is q = 1 / ceil(n_k / batch_size)
            (about batch_size / n_k) for ceil(n_k / batch_size) steps per epoch.
        learning_rate: SGD step size.
        momentum: SGD momentum.
        dp: DP-SGD settings.
    """

    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.1
    momentum: float = 0.0
    dp: DPConfig = field(default_factory=DPConfig)

    def __post_init__(self) -> None:
        _positive_int("local_epochs", self.local_epochs)
        _positive_int("batch_size", self.batch_size)
        _positive("learning_rate", self.learning_rate)
        _positive("momentum", self.momentum, allow_zero=True)
        if not isinstance(self.dp, DPConfig):
            raise ConfigError("dp", self.dp, "must be a DPConfig")


class ClientSampling(str, Enum):
    """How clients are sampled each round when client-level DP is on."""

    POISSON = "poisson"
    """Each client independently with probability client_fraction (amplification is accounted)."""
    FIXED = "fixed"
    """Exactly round(client_fraction x K) clients (accounted conservatively, without amplification)."""


class Adjacency(str, Enum):
    """Which pairs of federations client-level DP makes indistinguishable (docs/client-dp.md, "Adjacency")."""

    ZERO_OUT = "zero-out"
    """The K sites are public; one site's contribution is replaced by none (its data, or its taking part in
    a round, is what is protected). Holds under every protection: the released noise never depends on
    how many sites took part (distributed shares are scaled for the round's count, and a round with a
    dropout is not released)."""
    ADD_REMOVE = "add-remove"
    """One site is added to or removed from the federation (K itself is protected). Holds for central
    noise (plaintext, CKKS); refused with secure aggregation, where a withheld round's probability
    depends on how many sites could drop out."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientDPConfig:
    """Client-level DP (DP-FedAvg): protects a whole site's participation, not only its records.

    Exactly one of ``target_epsilon`` and ``noise_multiplier`` is set. See :mod:`privfl.client_dp`
    for the mechanism and how it is accounted.

    Args:
        target_epsilon: client-level epsilon for the whole run; z is calibrated to it.
        noise_multiplier: a fixed z instead.
        delta: client-level delta (keep it well below 1 / number of clients).
        clip_norm: L2 clip norm S of each client's update (the initial one with ``adaptive``).
        adaptive: adapt S to the ``target_quantile`` of update norms (Andrew et al. 2021).
        target_quantile: gamma, the fraction of updates that should be unclipped.
        clip_learning_rate: eta of the geometric clip update.
        bit_noise_std: sigma_b, noise on the count of unclipped updates (default: max(expected clients / 20, 0.51 z), the
            smallest that keeps the noise split of Andrew et al. defined).
        sampling: Poisson (default) or fixed-size client sampling.
        accountant: composition method.
        adjacency: the neighbouring relation the epsilon is stated for (zero-out with K public by default).
    """

    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = 1e-5
    clip_norm: float = 1.0
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    bit_noise_std: float | None = None
    sampling: ClientSampling = ClientSampling.POISSON
    accountant: Accountant = Accountant.PRV
    adjacency: Adjacency = Adjacency.ZERO_OUT

    def __post_init__(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ConfigError(
                "target_epsilon/noise_multiplier", (self.target_epsilon, self.noise_multiplier), "set exactly one of them"
            )
        if self.target_epsilon is not None:
            _positive("target_epsilon", self.target_epsilon)
        if self.noise_multiplier is not None:
            _positive("noise_multiplier", self.noise_multiplier)
        if not (isinstance(self.delta, float) and 0 < self.delta < 1):
            raise ConfigError("delta", self.delta, "must be a float in (0, 1)")
        _positive("clip_norm", self.clip_norm)
        if not isinstance(self.adaptive, bool):
            raise ConfigError("adaptive", self.adaptive, "must be true or false")
        if not 0 < self.target_quantile < 1:
            raise ConfigError("target_quantile", self.target_quantile, "must be in (0, 1)")
        _positive("clip_learning_rate", self.clip_learning_rate)
        if self.bit_noise_std is not None:
            _positive("bit_noise_std", self.bit_noise_std)
        _coerce_enum(self, "sampling", ClientSampling)
        _coerce_enum(self, "accountant", Accountant)
        _coerce_enum(self, "adjacency", Adjacency)


@dataclass(frozen=True, kw_only=True, slots=True)
class FederationConfig:
    """The round driver.

    Args:
        rounds: number of federated rounds.
        client_fraction: fraction of clients sampled (uniformly, without replacement) per round.
        protection: how updates are protected.
        ckks: CKKS parameters (used when ``protection`` is ``ckks``).
        secagg: secure-aggregation settings (used when ``protection`` is ``secagg``).
        shared_key: shared-key encryption settings (used when ``protection`` is ``shared_key``).
        seed: fixes only the data partitioning and the model initialisation (public choices;
            client sampling, DP noise and cryptographic randomness never come from it).
        noise_seed: makes client sampling, batch sampling and DP noise reproducible. ``None``
            (the default) draws them from fresh OS entropy every run: anyone who reads a config
            or summary with a fixed ``noise_seed`` can recompute who took part (so amplification
            by client sampling does not hold against them) and regenerate the noise and subtract
            it, so set it for simulations and tests only (lint rule PFL022).
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        server_learning_rate: the global model moves by this times the average update.
        client_dp: client-level DP (DP-FedAvg) on top of DP-SGD; ``None`` for none.
    """

    rounds: int = 10
    client_fraction: float = 1.0
    protection: ProtectionKind = ProtectionKind.CKKS
    ckks: CkksConfig = field(default_factory=CkksConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    shared_key: SharedKeyConfig = field(default_factory=SharedKeyConfig)
    seed: int = 0
    noise_seed: int | None = None
    device: str = "auto"
    server_learning_rate: float = 1.0
    client_dp: ClientDPConfig | None = None

    def __post_init__(self) -> None:
        _positive_int("rounds", self.rounds)
        if self.client_dp is not None and not isinstance(self.client_dp, ClientDPConfig):
            raise ConfigError("client_dp", self.client_dp, "must be a ClientDPConfig")
        _unit_interval("client_fraction", self.client_fraction)
        _coerce_enum(self, "protection", ProtectionKind)
        if (
            self.client_dp is not None
            and self.client_dp.adjacency is Adjacency.ADD_REMOVE
            and self.protection is ProtectionKind.SECAGG
        ):
            # Distributed noise is released only when no sampled site drops out; how likely that is
            # depends on how many sites there are, so K cannot be protected (docs/client-dp.md).
            raise ConfigError(
                "client_dp.adjacency", self.client_dp.adjacency.value, "secure aggregation supports zero-out adjacency only"
            )
        if self.client_dp is not None and self.protection is ProtectionKind.SHARED_KEY:
            # Every site decrypts the un-noised sum: there is no single party to add central noise.
            raise ConfigError(
                "client_dp", "set", "the shared-key mode cannot place client-level DP noise; use ckks, secagg or plaintext"
            )
        if not isinstance(self.ckks, CkksConfig):
            raise ConfigError("ckks", self.ckks, "must be a CkksConfig")
        if not isinstance(self.secagg, SecAggConfig):
            raise ConfigError("secagg", self.secagg, "must be a privfl.protocols.secagg.SecAggConfig")
        if not isinstance(self.shared_key, SharedKeyConfig):
            raise ConfigError("shared_key", self.shared_key, "must be a privfl.protocols.shared_key.SharedKeyConfig")
        _positive_int("seed", self.seed, minimum=0)
        if self.noise_seed is not None:
            _positive_int("noise_seed", self.noise_seed, minimum=0)
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise ConfigError("device", self.device, "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        _positive("server_learning_rate", self.server_learning_rate)


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """Which bundled dataset a CLI run uses and how it is split.

    Args:
        dataset: the bundled dataset.
        num_clients: number of clients (sites).
        partition: IID, Dirichlet label skew, or by group column.
        alpha: Dirichlet concentration (smaller = more skew).
        group_column: for ``partition = "group"``, the dataset's group column name.
        test_fraction: share of the data held out for evaluation.
        min_client_size: a Dirichlet split is redrawn until every client has at least this many examples.
        client_names: optional names, one per client (default ``client-0`` ...).
    """

    dataset: DatasetKind = DatasetKind.BREAST_CANCER
    num_clients: int = 5
    partition: PartitionKind = PartitionKind.DIRICHLET
    alpha: float = 0.5
    group_column: str | None = None
    test_fraction: float = 0.2
    min_client_size: int = 10
    client_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _coerce_enum(self, "dataset", DatasetKind)
        _coerce_enum(self, "partition", PartitionKind)
        _positive_int("num_clients", self.num_clients, minimum=1)
        _positive("alpha", self.alpha)
        if not 0 < self.test_fraction < 1:
            raise ConfigError("test_fraction", self.test_fraction, "must be in (0, 1)")
        _positive_int("min_client_size", self.min_client_size)
        if self.partition is PartitionKind.GROUP and not self.group_column:
            raise ConfigError("group_column", self.group_column, "is required when partition = 'group'")
        if self.client_names is not None:
            if len(self.client_names) != self.num_clients:
                raise ConfigError("client_names", self.client_names, f"needs exactly num_clients={self.num_clients} names")
            if len(set(self.client_names)) != len(self.client_names):
                raise ConfigError("client_names", self.client_names, "names must be unique")


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """A bundled model for CLI runs.

    Args:
        kind: logistic regression, a multi-layer perceptron, or a small CNN (images only).
        hidden: hidden width of the MLP.
    """

    kind: ModelKind = ModelKind.LOGISTIC
    hidden: int = 64

    def __post_init__(self) -> None:
        _coerce_enum(self, "kind", ModelKind)
        _positive_int("hidden", self.hidden)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """Everything ``privfl run`` needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)

    def __post_init__(self) -> None:
        if self.model.kind is ModelKind.CNN and self.data.dataset is not DatasetKind.DIGITS:
            raise ConfigError("model.kind", self.model.kind.value, "the CNN needs image data (dataset = 'digits')")


def _convert(value: Any, annotation: Any, path: str) -> Any:
    """Converts a TOML value to the field's annotated type, or raises ConfigError naming ``path``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for option in options:
            try:
                return _convert(value, option, path)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[-1]
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(path, value, "must be a list")
        (item_type, _ellipsis) = typing.get_args(annotation)
        return tuple(_convert(v, item_type, f"{path}[{i}]") for i, v in enumerate(value))
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return _validate.member(path, value, annotation)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(path, value, "must be a table")
        return _build(annotation, value, path)
    scalar = _SCALARS.get(annotation)
    return value if scalar is None else scalar(value, path)


def _to_float(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, value, "must be a number")
    try:
        return float(value)
    except OverflowError:
        raise ConfigError(path, f"<integer of {len(str(value))} digits>", "is too large for a float") from None


def _to_int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, value, "must be an integer")
    return value


def _to_bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, value, "must be true or false")
    return value


def _to_str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, value, "must be a string")
    return value


def _to_bytes(value: Any, path: str) -> bytes:
    if isinstance(value, bytes):
        return value  # a table built in Python
    # TOML has no byte strings: seeds are written in hex.
    if not isinstance(value, str):
        raise ConfigError(path, value, "must be a hex string, e.g. 32 hex digits for 16 bytes")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ConfigError(path, value, "must be a hex string, e.g. 32 hex digits for 16 bytes") from None


_SCALARS: dict[Any, Callable[[Any, str], Any]] = {
    float: _to_float, int: _to_int, bool: _to_bool, str: _to_str, bytes: _to_bytes,
}


def _build(cls: type, table: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        import difflib

        near = difflib.get_close_matches(unknown[0], sorted(names), n=1, cutoff=0.75)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ConfigError(where, table[unknown[0]], f"unknown setting; {hint}known ones are {sorted(names)}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.name not in table and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ConfigError(where, None, "is required and missing")
    kwargs = {}
    for name, value in table.items():
        path = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], path)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if prefix and not exc.field.startswith(prefix):
            raise ConfigError(f"{prefix}.{exc.field}", exc.value, exc.reason) from None
        raise


def dataclass_from_dict(cls: type, table: dict[str, Any], prefix: str = "") -> Any:
    """Builds any validated config dataclass from a parsed TOML table.

    Nested dataclasses, enums, tuples and optional fields are converted; an unknown key or a bad
    value raises :class:`ConfigError` naming its dotted path (prefixed with ``prefix``).
    """
    return _build(cls, table, prefix)


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a TOML file, or raises :class:`ConfigError` naming the file and what is wrong with it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("config", str(path), f"cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("config", str(path), f"is not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", str(path), f"is not valid TOML: {exc}") from None
    except RecursionError:
        # tomllib recurses once per nested array or inline table.
        raise ConfigError("config", str(path), "nests arrays or tables too deeply to be a config") from None


def config_from_dict(table: dict[str, Any]) -> RunConfig:
    """Builds a :class:`RunConfig` from a parsed TOML table.

    Raises:
        ConfigError: an unknown key or a bad value (the message names its dotted path).
    """
    return _build(RunConfig, table, "")


def load_config(path: str | os.PathLike[str]) -> RunConfig:
    """Reads a TOML run config.

    Raises:
        ConfigError: the file is missing, is not TOML, or holds a bad value.
    """
    return config_from_dict(load_toml(path))


def default_config_text() -> str:
    """The embedded default config's TOML text."""
    return resources.files("privfl").joinpath("defaults/healthcare.toml").read_text()


def default_config() -> RunConfig:
    """The embedded default: breast cancer over 5 hospitals, Dirichlet(0.5), DP-SGD epsilon 3, CKKS."""
    return config_from_dict(tomllib.loads(default_config_text()))
