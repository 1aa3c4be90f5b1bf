"""Local training on one client with DP-SGD, through Opacus or privfl's book-keeping clipping.

A client trains a fresh copy of the global model on its own data with Poisson sampling (each
example joins a step's batch independently with probability q = 1 / ceil(n_k / batch_size), the rate
Opacus' DPDataLoader uses), per-example clipping to ``max_grad_norm`` and Gaussian noise of standard
deviation ``noise_multiplier * max_grad_norm``. The clipping mode (Opacus' per-sample hooks or ghost
clipping, or :mod:`privfl.bookkeeping`) changes how the clipped sum is computed, never the step
released or the event charged. What happened is returned as a
:class:`~privfl.accounting.DPEvent`; the federation charges it to the client's ledger, so the
accounting spans every round the client takes part in.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from privfl import _validate
from privfl.accounting import DPEvent
from privfl.bookkeeping import BookKeeping, bookkeeping_unsupported, check_gradient_coverage
from privfl.config import ClippingMode, TrainingConfig
from privfl.errors import ConfigError, ProtocolError

__all__ = [
    "DPConversion",
    "LayerChange",
    "LocalResult",
    "check_labels",
    "choose_clipping",
    "convert_for_dp",
    "evaluate",
    "flatten_parameters",
    "load_flat_parameters",
    "make_private_compatible",
    "prepare_dataset",
    "resolve_device",
    "sampling_plan",
    "train_dp_sgd",
    "warn_conversion",
]

GHOST_LINEAR_THRESHOLD = 16_384
"""Under AUTO, ghost clipping is used (where book-keeping cannot be) when a linear layer has at least this many weights.

Materialising per-example gradients costs batch x in x out memory traffic per linear layer, which
dominates on wide layers (a 30x+ slowdown on CPU for 1024-wide MLPs); ghost clipping needs only
activations and output gradients. Measured by ``benchmarks/dp_sgd.py``.
"""


@dataclass(frozen=True, kw_only=True, slots=True)
class LocalResult:
    """The outcome of one client's local training in one round.

    Attributes:
        delta: new parameters minus the global parameters, flattened (float32).
        num_examples: n_k, the client's training-set size (its FedAvg weight).
        event: the DP-SGD steps taken, for the ledger.
        mean_loss: mean training loss over the steps.
        clipping: the clipping mode actually used.
    """

    delta: np.ndarray
    num_examples: int
    event: DPEvent
    mean_loss: float
    clipping: ClippingMode


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA when present, else the CPU.

    Raises:
        ConfigError: CUDA was asked for but is not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", device, "CUDA is not available on this machine; use 'auto' or 'cpu'")
    return torch.device(device)


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerChange:
    """One layer :func:`convert_for_dp` replaced.

    Attributes:
        module: the layer's dotted path in the model (``""`` for the model itself).
        before: the layer as built, e.g. ``"BatchNorm1d(16)"``.
        after: what DP-SGD trains instead, e.g. ``"GroupNorm(1, 16)"``.
    """

    module: str
    before: str
    after: str

    def __str__(self) -> str:
        return f"{self.module or '<model>'} {self.before} -> {self.after}"


@dataclass(frozen=True, kw_only=True, slots=True)
class DPConversion:
    """A model made DP-SGD compatible, and what was changed to make it so.

    Attributes:
        model: the model to train (the input itself when nothing had to change).
        changes: the layers replaced, in module order (empty when nothing had to change).
    """

    model: nn.Module
    changes: tuple[LayerChange, ...]


# The layer types Opacus' ModuleValidator has validators for (tests/test_training.py keeps
# this in step with the installed Opacus). A model in training mode without any of them validates
# clean, so it needs no conversion, and no Opacus import: an aggregator process builds the initial
# model this way and never trains, and importing Opacus costs it 1-2 s of CPU before its first round.
_OPACUS_VALIDATED = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.GRU, nn.LSTM, nn.MultiheadAttention,
)  # fmt: skip


def _nothing_to_convert(model: nn.Module) -> bool:
    """True when Opacus' validation is sure to pass: training mode, none of its validated layer types,
    and Opacus not imported yet (once it is, a user may have registered validators of their own)."""
    import sys

    if "opacus.validators" in sys.modules or not model.training:
        return False
    return not any(isinstance(module, _OPACUS_VALIDATED) for module in model.modules())


def convert_for_dp(model: nn.Module) -> DPConversion:
    """The model Opacus can train with DP-SGD, and the layers changed to get it (no warning).

    BatchNorm mixes examples within a batch, which breaks per-example clipping: BatchNorm1d(C)
    becomes GroupNorm(1, C), other BatchNorms Opacus' GroupNorm(min(32, C), C). The conversion is
    deterministic, so building the same model and converting it again gives the same architecture
    (what :func:`privfl.export.load_model` relies on).

    Raises:
        ConfigError: the model has layers that cannot be made DP-compatible.
    """
    if _nothing_to_convert(model):
        return DPConversion(model=model, changes=())
    from opacus.validators import ModuleValidator

    if not ModuleValidator.validate(model, strict=False):
        return DPConversion(model=model, changes=())
    # Described before fixing: _replace_batchnorm1d replaces layers of ``model`` in place.
    before = {path: _short_layer(module) for path, module in model.named_modules()}
    name = type(model).__name__
    fixed = ModuleValidator.fix(_replace_batchnorm1d(model))
    remaining = ModuleValidator.validate(fixed, strict=False)
    if remaining:
        raise ConfigError("model", name, f"cannot be trained with DP-SGD: {remaining[0]}")
    after = {path: _short_layer(module) for path, module in fixed.named_modules()}
    changes = tuple(
        LayerChange(module=path, before=layer, after=after.get(path, "removed"))
        for path, layer in before.items()
        if after.get(path) != layer
    )
    return DPConversion(model=fixed, changes=changes)


def make_private_compatible(model: nn.Module) -> nn.Module:
    """Returns a model Opacus can train with DP-SGD, fixing what it can (with a one-line warning).

    See :func:`convert_for_dp` for what is changed. The warning names the model and the layers
    replaced, and points at the first caller outside privfl (the user's code, not privfl's).

    Raises:
        ConfigError: the model has layers that cannot be made DP-compatible.
    """
    name = type(model).__name__
    conversion = convert_for_dp(model)
    warn_conversion(name, conversion)
    return conversion.model


def seeded_initial_model(seed: int, build: Callable[[], nn.Module], *, warn: bool) -> nn.Module:
    """A run's initial model, as every party builds it: torch seeded with ``federation.seed``, the
    model built, checked and made DP-compatible (:func:`make_private_compatible`).

    ``privfl run``'s driver, the Aggregator and every Site call this, so all start from
    bit-identical parameters and buffers. ``warn``: say which layers were changed (where the run
    starts; the other parties stay quiet).

    Raises:
        ConfigError: ``build`` does not return a ``torch.nn.Module``, or the model cannot be made
            DP-compatible.
    """
    torch.manual_seed(seed)
    model = build()
    if not isinstance(model, nn.Module):
        raise ConfigError("model_fn", type(model).__name__, "must return a torch.nn.Module")
    if warn:
        return make_private_compatible(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return make_private_compatible(model)


def warn_conversion(model_name: str, conversion: DPConversion) -> None:
    """One line naming the model and the layers :func:`convert_for_dp` replaced (nothing if none).

    The warning points at the first caller outside privfl: the user's line that built or loaded
    the model, not a line of privfl.
    """
    if not conversion.changes:
        return
    shown = ", ".join(str(change) for change in conversion.changes[:2])
    more = f" and {len(conversion.changes) - 2} more" if len(conversion.changes) > 2 else ""
    warnings.warn(f"model {model_name} changed for DP-SGD: {shown}{more}", UserWarning, stacklevel=_user_stacklevel())


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first caller outside privfl, seen from the function that warns.

    A warning attributed to a line of privfl tells the user nothing; the line of their own code
    that led to it (``Federation.run``, ``load_model``) is what they can act on or filter.
    """
    frame = sys._getframe(2)  # the caller of the function that warns
    level = 2
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level


def _short_layer(module: nn.Module) -> str:
    """A layer in a few characters: its type and, for normalisation layers, its channels and groups."""
    kind = type(module).__name__
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return f"{kind}({module.num_features})"
    if isinstance(module, nn.GroupNorm):
        return f"GroupNorm({module.num_groups}, {module.num_channels})"
    return kind


def _replace_batchnorm1d(module: nn.Module) -> nn.Module:
    # Opacus' generic fix turns BatchNorm1d(C) into GroupNorm(min(32, C), C). On (N, C) features
    # with C <= 32 every group is then a single value, normalised to zero: the layer's output is
    # constant and the model cannot learn. GroupNorm(1, C) normalises across the C features of
    # each example (LayerNorm-like), which keeps the signal and is still per-example.
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d):
            setattr(module, name, nn.GroupNorm(1, child.num_features, eps=child.eps, affine=child.affine))
        else:
            _replace_batchnorm1d(child)
    return module


def choose_clipping(model: nn.Module, mode: ClippingMode) -> ClippingMode:
    """Resolves AUTO: the fastest clipping mode for ``model`` that can train it.

    Without convolutions: book-keeping when every trainable layer is one it clips (1.4x a
    non-private step on a small MLP where hooks cost 3.7x, about 2x on a 2M-parameter MLP where
    ghost clipping costs 3.8x); otherwise ghost clipping when a linear layer has
    :data:`GHOST_LINEAR_THRESHOLD` weights or more. Per-sample gradients (Opacus hooks) for
    everything else. Measured by ``benchmarks/dp_sgd.py``.
    """
    if mode is not ClippingMode.AUTO:
        return mode
    has_conv = any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in model.modules())
    if has_conv:
        # Ghost norms of convolutions go through unfolded activations and book-keeping
        # instantiates their per-example gradients: neither beats hooks on small images.
        return ClippingMode.PER_SAMPLE
    if bookkeeping_unsupported(model) is None:
        return ClippingMode.BOOKKEEPING
    widest = max((m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)), default=0)
    return ClippingMode.GHOST if widest >= GHOST_LINEAR_THRESHOLD else ClippingMode.PER_SAMPLE


def sampling_plan(num_examples: int, config: TrainingConfig) -> tuple[float, int]:
    """The Poisson sampling rate and steps per round for a client with ``num_examples`` examples.

    Returns:
        (sample_rate, steps): q = 1 / ceil(n / batch_size) and ``local_epochs * ceil(n / batch_size)``.
    """
    batches = math.ceil(num_examples / config.batch_size)
    return 1.0 / batches, config.local_epochs * batches


_MT_WORDS = 624  # mt19937's state: 624 32-bit words
_CPU_STATE_BYTES = 5056  # torch's CPU generator state: seed, left, seeded, next, 624 words as u64, normal cache


def secret_generator(device: torch.device) -> torch.Generator:
    """A torch generator whose whole state comes from the OS's cryptographic source.

    ``manual_seed`` is not enough on the CPU: torch's mt19937 generator keeps only the low 32 bits
    of the seed, so noise seeded with ``secrets.randbits(63)`` has 2^32 possible streams, which a
    server can search (test each candidate seed against a released update) and which repeat
    across sites and rounds by the birthday bound. Here the CPU generator's 624 state words (19,968
    bits) are filled from ``secrets``. mt19937 is still not a cryptographic generator: its state can
    be computed from 624 consecutive exact outputs; DP-SGD never releases its draws exactly, only
    added to a data-dependent sum (docs/concepts.md says what remains). A CUDA generator (Philox)
    keeps its whole 64-bit seed, drawn from ``secrets``.

    Raises:
        RuntimeError: this torch's CPU generator state has another layout (a torch upgrade changed it).
    """
    generator = torch.Generator(device=device)
    if generator.device.type != "cpu":
        return generator.manual_seed(secrets.randbits(64))
    state = generator.get_state().numpy().copy()
    if state.shape != (_CPU_STATE_BYTES,):
        raise RuntimeError(f"torch's CPU generator state is {state.shape[0]} bytes, not {_CPU_STATE_BYTES}: "
                           "its layout changed; privfl cannot fill it from the OS's random source")
    header = np.zeros(24, dtype=np.uint8)
    header[:8] = np.frombuffer(secrets.token_bytes(8), dtype=np.uint8)  # the seed torch reports
    header[8:12] = np.array([1], dtype="<i4").view(np.uint8)  # left = 1: the next draw regenerates the block
    header[12:16] = np.array([1], dtype="<i4").view(np.uint8)  # seeded
    words = np.frombuffer(secrets.token_bytes(4 * _MT_WORDS), dtype="<u4").astype("<u8")
    state[:24] = header
    state[24 : 24 + 8 * _MT_WORDS] = words.view(np.uint8)
    state[24 + 8 * _MT_WORDS :] = 0  # no cached normal sample
    generator.set_state(torch.from_numpy(state))
    return generator


def _poisson_loader(dataset: Dataset, sample_rate: float, steps: int, generator: torch.Generator) -> DataLoader:
    """Poisson sampling with an explicit number of steps and its own generator.

    Opacus' own loader derives the steps as int(1 / q), which for some batch counts (93, 99, ...)
    is one fewer than 1 / q in floating point; the plan fixes both. Empty batches come out as
    zero-length tensors of the right shape.
    """
    from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from torch.utils.data.dataloader import default_collate

    sampler = UniformWithReplacementSampler(
        num_samples=len(dataset),  # type: ignore[arg-type]  # torch's Dataset declares no __len__; map-style datasets have one
        sample_rate=sample_rate,
        generator=generator,
        steps=steps,
    )
    first = dataset[0]
    collate = wrap_collate_with_empty(
        collate_fn=default_collate,
        batch_first=True,
        rand_on_empty=False,
        sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
        dtypes=[dtype_safe(x) for x in first],
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _as_tensor(value: object) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, np.generic, int, float, bool)):
        return torch.as_tensor(np.asarray(value))
    return None


class _AdaptedDataset(Dataset):
    """Converts each example where it is safe: float64 inputs to the model's dtype, integer-valued labels to int64."""

    def __init__(self, dataset: Dataset, *, input_dtype: torch.dtype | None, site: str) -> None:
        self.dataset = dataset
        self.input_dtype = input_dtype
        self.site = site

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # torch's Dataset declares no __len__; map-style datasets have one

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, label = _split_example(self.dataset[index], self.site, index)
        if self.input_dtype is not None and inputs.is_floating_point():
            inputs = inputs.to(self.input_dtype)
        return inputs, _class_label(label, self.site, index)


def _split_example(example: object, site: str, index: int) -> tuple[torch.Tensor, object]:
    if not isinstance(example, (tuple, list)) or len(example) != 2:
        raise ConfigError(
            f"dataset[{site}]",
            f"example {index} of type {type(example).__name__}",
            "each example must be an (input, class label) pair, as torch's TensorDataset yields",
        )
    inputs = _as_tensor(example[0])
    if inputs is None:
        raise ConfigError(
            f"dataset[{site}]",
            f"input of example {index} of type {type(example[0]).__name__}",
            "an input must be a torch tensor or a numpy array",
        )
    return inputs, example[1]


def _class_label(label: object, site: str, index: int) -> torch.Tensor:
    tensor = _as_tensor(label)
    if tensor is None:
        raise ConfigError(
            f"dataset[{site}]", f"label of example {index} of type {type(label).__name__}", "a class label must be an integer"
        )
    if tensor.shape == (1,):
        # A label stored as a length-1 vector (a common CSV / pandas artefact) is one class id.
        tensor = tensor.reshape(())
    if tensor.ndim != 0:
        raise ConfigError(
            f"dataset[{site}]",
            f"label of example {index} with shape {tuple(tensor.shape)}",
            "a class label must be one integer per example (no one-hot vectors or soft labels)",
        )
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        value = float(tensor)
        if not (math.isfinite(value) and value == round(value) and value >= 0):
            raise ConfigError(
                f"dataset[{site}]",
                f"label {value!r} of example {index}",
                "a class label must be a whole number >= 0 (cross-entropy classification); "
                "map your classes to 0..C-1",
            )
        return torch.tensor(int(value), dtype=torch.int64)
    if tensor.is_complex():
        raise ConfigError(f"dataset[{site}]", f"label of example {index}", "a class label must be an integer")
    if int(tensor) < 0:
        raise ConfigError(
            f"dataset[{site}]", f"label {int(tensor)} of example {index}",
            "a class label must be a whole number >= 0 (cross-entropy classification); map your classes to 0..C-1",
        )
    return tensor.to(torch.int64)


def prepare_dataset(dataset: Dataset, model: nn.Module, *, site: str = "dataset") -> Dataset:
    """Checks a user's Dataset against the model and adapts it where that is safe.

    The first example decides: float64 inputs are cast to the model's dtype; float labels that hold
    whole numbers, and labels of shape (1,), become int64 class ids. When the first example needs no
    change the dataset is returned as it is.

    Args:
        dataset: yields (input, class label) pairs.
        model: the model that will train on it (its parameters' dtype is the target dtype).
        site: the site's name, for error messages.

    Returns:
        ``dataset`` itself, or a converting view of it.

    Raises:
        ConfigError: the dataset is empty, or an example cannot be used safely (names the site,
            the example and the fix).
    """
    if len(dataset) == 0:  # type: ignore[arg-type]  # torch's Dataset declares no __len__; map-style datasets have one
        raise ConfigError(f"dataset[{site}]", 0, "a site needs at least one training example")
    inputs, label = _split_example(dataset[0], site, 0)
    _class_label(label, site, 0)  # raises on a label that cannot be a class id
    target_dtype = _model_dtype(model)
    needs_cast = inputs.is_floating_point() and inputs.dtype != target_dtype
    label_ok = isinstance(label, torch.Tensor) and label.dtype == torch.int64 and label.ndim == 0
    if not needs_cast and label_ok and isinstance(dataset[0][0], torch.Tensor):
        return dataset
    return _AdaptedDataset(dataset, input_dtype=target_dtype if needs_cast else None, site=site)


def flatten_parameters(model: nn.Module) -> np.ndarray:
    """All trainable parameters, in ``model.parameters()`` order, as one float32 vector."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters() if p.requires_grad]).numpy()


def load_flat_parameters(model: nn.Module, flat: np.ndarray) -> None:
    """Writes a vector made by :func:`flatten_parameters` back into ``model``.

    Raises:
        ConfigError: the vector's length does not match the model.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in params)
    if flat.shape != (total,):
        raise ConfigError("parameters", flat.shape, f"expected a vector of {total} values for this model")
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(torch.from_numpy(np.ascontiguousarray(flat[offset : offset + n])).view_as(p).to(p.dtype))
            offset += n


# Models whose gradient coverage was checked in this process, by structure (class, repr, parameter
# names, shapes and flags, input shape and dtype, device): the check runs once per kind of model,
# not once per site and round.
_COVERAGE_CHECKED: set[tuple[object, ...]] = set()


def _check_coverage(model: nn.Module, dataset: Dataset, device: torch.device) -> None:
    """Runs :func:`privfl.bookkeeping.check_gradient_coverage` on up to 8 of the site's examples."""
    from torch.utils.data import default_collate

    count = min(8, len(dataset))  # type: ignore[arg-type]  # map-style Datasets have __len__
    inputs, labels = default_collate([dataset[i] for i in range(count)])[:2]
    key = (
        type(model).__module__, type(model).__qualname__, repr(model),
        tuple((name, tuple(p.shape), p.requires_grad) for name, p in model.named_parameters()),
        tuple(inputs.shape[1:]), inputs.dtype, str(device),
    )
    if key in _COVERAGE_CHECKED:
        return
    check_gradient_coverage(model, inputs.to(device), labels.to(device), nn.CrossEntropyLoss(reduction="sum"))
    _COVERAGE_CHECKED.add(key)


def train_dp_sgd(
    model: nn.Module,
    dataset: Dataset,
    *,
    config: TrainingConfig,
    noise_multiplier: float,
    device: torch.device,
    seed: int | None = None,
    site: str = "dataset",
) -> LocalResult:
    """Trains ``model`` in place with DP-SGD on ``dataset`` for one round.

    Args:
        model: the model, already holding the global parameters (DP-compatible; see
            :func:`make_private_compatible`).
        dataset: the client's training data, yielding (input, class label) pairs.
        config: local training settings (epochs, batch size, learning rate, clipping norm).
        noise_multiplier: sigma for this client (calibrated by the federation).
        device: where to train.
        seed: seeds batch sampling and noise, for reproducible simulations; ``None`` (the
            default) draws a fresh seed from the OS, so nobody can regenerate the noise.
        site: the site's name, for error messages about its data.

    Returns:
        The update and the DP event to charge.

    Raises:
        ConfigError: ``noise_multiplier`` is not a finite number > 0; a parameter is used outside
            its layer (weight tying, a direct use in forward) or a layer does not keep the examples
            along its first dimension (the message names it); the dataset is empty or holds
            examples that cannot be trained on safely
            (see :func:`prepare_dataset`), or ``clipping = "bookkeeping"`` was asked for a model
            with a layer book-keeping cannot clip (the message names it).
    """
    # Before any work: a step without noise is no DP-SGD step, and the event charged would be wrong.
    _validate.positive("noise_multiplier", noise_multiplier)
    dataset = prepare_dataset(dataset, model, site=site)
    num_examples = len(dataset)  # type: ignore[arg-type]  # torch's Dataset declares no __len__; map-style datasets have one
    sample_rate, steps = sampling_plan(num_examples, config)
    model = model.to(device)
    # Before choosing a clipping mode: a parameter whose gradient partly bypasses its own layer
    # (weight tying, a direct use in forward) cannot be clipped per example by any mode; ghost
    # clipping would even release that part unclipped.
    with _model_data_errors(site, dataset):
        _check_coverage(model, dataset, device)
    clipping = choose_clipping(model, config.dp.clipping)
    # Checked before any step: a layer book-keeping cannot clip is a ConfigError naming it.
    keeper = None
    if clipping is ClippingMode.BOOKKEEPING:
        keeper = BookKeeping(model, max_grad_norm=config.dp.max_grad_norm)
    start = flatten_parameters(model)
    model.train()

    if seed is None:
        # Unpredictable to anyone who reads the run's config: both generators' whole states come
        # from the OS's cryptographic source (see secret_generator), independently of each other.
        generator = secret_generator(device)
        sampling = secret_generator(torch.device("cpu"))
    else:
        generator = torch.Generator(device=device).manual_seed(seed)
        sampling = torch.Generator().manual_seed(seed ^ 0x5A5A5A5A)
    loader = _poisson_loader(dataset, sample_rate, steps // config.local_epochs, sampling)
    # Only what trains: a frozen parameter holding a stale .grad must not move (nor enter the delta).
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=config.learning_rate, momentum=config.momentum)
    expected_batch_size = _expected_batch_size(num_examples, len(loader))
    with _model_data_errors(site, dataset):
        losses = _train_local(
            model, loader, optimizer, keeper=keeper, clipping=clipping, config=config, steps=steps, sample_rate=sample_rate,
            noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size, generator=generator, device=device,
        )
    delta = flatten_parameters(model) - start
    return LocalResult(
        delta=delta.astype(np.float32),
        num_examples=num_examples,
        event=DPEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps),
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
        clipping=clipping,
    )


_LABEL_OUTSIDE_OUTPUTS = (
    "a class label is outside the model's outputs: labels must be 0..C-1 for a model with C outputs "
    "(map the classes to 0..C-1, or widen the model's last layer)"
)


def check_labels(model: nn.Module, datasets: Mapping[str, Dataset]) -> None:
    """Before anything trains: every site's inputs fit the model, and every label it holds in memory
    is one of the model's classes.

    A site whose data does not fit the model fails in its first training, which in a federation that
    samples sites can come many rounds (and many other sites' charges) in. Each site's first example
    is run through the model (no gradient, its train/eval mode restored), once per distinct input
    shape and dtype; that also gives the class count. The labels are read without loading examples
    (`privfl.data.known_labels`: ``.targets``, a ``TensorDataset``'s labels, through
    ``Subset``/``ConcatDataset``); a dataset that holds none has its labels checked when it first
    trains, as before, and so does every site when the model cannot be probed this way (a model
    that does not run in eval mode on one example, or whose output is not one row of class scores).
    Of the ways a model can fail to take a site's inputs, the one recognised here is a first
    linear layer of another width than the site's features (torch's "shapes cannot be
    multiplied"); any other error of the probe leaves the site to its first training.

    Raises:
        ConfigError: a site's inputs of another width than the model's first linear layer (names
            the site and the input shape), a label below 0 or at or above the number of outputs
            (names the dataset, the label and the count), or an empty dataset or a first example that
            is not an (input, label) pair of numbers (as training would say).
    """
    from privfl.data import known_labels

    probed: dict[tuple, int | None] = {}  # (input shape, dtype) -> the model's class count (None: not told)
    for name, dataset in datasets.items():
        prepared = prepare_dataset(dataset, model, site=name)
        inputs, _ = _split_example(prepared[0], name, 0)
        key = (tuple(inputs.shape), inputs.dtype)
        if key not in probed:
            probed[key] = _output_count(model, inputs, name, prepared)
        outputs = probed[key]
        labels = known_labels(dataset)
        if outputs is None or labels is None or labels.size == 0 or not np.issubdtype(labels.dtype, np.number):
            continue
        low, high = labels.min(), labels.max()
        if low < 0 or high >= outputs:
            bad = low if low < 0 else high
            raise ConfigError(
                f"dataset[{name}]", f"label {bad:g} for a model with {outputs} outputs", _LABEL_OUTSIDE_OUTPUTS
            )


def _output_count(model: nn.Module, inputs: torch.Tensor, site: str, prepared: Dataset) -> int | None:
    """The model's number of outputs per example (its class count), from one example's ``inputs``.

    None when that cannot be told this way (an output that is not (1, C), a model that does not run
    in eval mode on one example): the first training checks then.

    Raises:
        ConfigError: the model does not take the site's inputs (a matrix product of the wrong width).
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _model_data_errors(site, prepared):
            logits = model(inputs.unsqueeze(0).to(device))
    except ConfigError:
        raise  # the model does not take the site's inputs: as training would say
    except Exception:  # a model of its own kind: the first training checks the labels
        return None
    finally:
        model.train(was_training)
    return int(logits.shape[-1]) if isinstance(logits, torch.Tensor) and logits.ndim == 2 else None


@contextlib.contextmanager
def _model_data_errors(site: str, dataset: Dataset) -> Iterator[None]:
    """Turns torch's errors for a model that does not fit a site's data into ConfigErrors naming both.

    A label past the model's outputs (or negative) is an IndexError deep in the loss; inputs of
    another width than the model's first layer, a RuntimeError in a matrix product. Anything
    else passes through as it is.
    """
    try:
        yield
    except IndexError as exc:
        text = str(exc).strip()
        if not (text.startswith("Target") and "out of bounds" in text):
            raise
        raise ConfigError(f"dataset[{site}]", text, _LABEL_OUTSIDE_OUTPUTS) from exc
    except RuntimeError as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "shapes cannot be multiplied" not in text:
            raise  # other shape errors may come from inside the model: shown as torch raised them
        shape = None
        with contextlib.suppress(Exception):
            shape = tuple(_split_example(dataset[0], site, 0)[0].shape)
        raise ConfigError(
            "model_fn", text,
            f"the model does not take site {site}'s inputs (one example has shape {shape}): its first layer must "
            "match the data's features",
        ) from exc


def _train_local(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    keeper: BookKeeping | None,
    clipping: ClippingMode,
    config: TrainingConfig,
    steps: int,
    sample_rate: float,
    noise_multiplier: float,
    expected_batch_size: int,
    generator: torch.Generator,
    device: torch.device,
) -> list[float]:
    """One round of local DP-SGD steps: book-keeping clipping, or Opacus' hooks or ghost clipping."""
    if keeper is not None:
        return _train_bookkeeping(
            model,
            loader,
            optimizer,
            keeper=keeper,
            epochs=config.local_epochs,
            steps=steps,
            noise_multiplier=noise_multiplier,
            expected_batch_size=expected_batch_size,
            generator=generator,
            device=device,
        )
    return _train_opacus(
        model,
        loader,
        optimizer,
        mode="ghost" if clipping is ClippingMode.GHOST else "hooks",
        epochs=config.local_epochs,
        steps=steps,
        sample_rate=sample_rate,
        noise_multiplier=noise_multiplier,
        max_grad_norm=config.dp.max_grad_norm,
        expected_batch_size=expected_batch_size,
        generator=generator,
        device=device,
    )


def _expected_batch_size(num_examples: int, batches: int) -> int:
    """E[B], what every clipping mode divides the noisy sum by: floor(n / batches) = floor(n q).

    Opacus computes it as ``int(n * (1 / batches))``, which floating point makes one less for some
    sizes (0 for 49 examples in 49 batches: a NaN update); the integer division does not.
    """
    return max(1, num_examples // batches)


def _train_bookkeeping(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    keeper: BookKeeping,
    epochs: int,
    steps: int,
    noise_multiplier: float,
    expected_batch_size: int,
    generator: torch.Generator,
    device: torch.device,
) -> list[float]:
    """DP-SGD steps with book-keeping clipping; returns each non-empty batch's mean loss."""
    criterion = nn.CrossEntropyLoss(reduction="sum")  # b_i is then the gradient of example i's own loss
    losses: list[float] = []
    taken = 0
    for _ in range(epochs):
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            # An empty Poisson batch still takes a step: noise only, as the analysis assumes.
            loss = keeper.private_gradients(
                inputs,
                labels,
                criterion,
                noise_multiplier=noise_multiplier,
                expected_batch_size=expected_batch_size,
                generator=generator,
            )
            optimizer.step()
            taken += 1
            if len(labels):
                losses.append(float(loss) / len(labels))
    optimizer.zero_grad(set_to_none=True)
    if taken != steps:
        raise ProtocolError(f"DP-SGD took {taken} steps, planned {steps}")
    return losses


def _train_opacus(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    mode: str,
    epochs: int,
    steps: int,
    sample_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    generator: torch.Generator,
    device: torch.device,
) -> list[float]:
    """DP-SGD steps through Opacus (``mode`` "hooks" or "ghost"); returns each non-empty batch's mean loss."""
    from opacus import PrivacyEngine

    before = _opacus_attributes(model)
    private_model = None
    try:
        criterion = nn.CrossEntropyLoss()
        with warnings.catch_warnings():
            # Opacus' secure_mode needs torchcsprng, which is unmaintained; the noise generator is
            # seeded from the OS instead (or from the simulation's noise_seed). The warning says so
            # on every round.
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
            warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
            engine = PrivacyEngine(accountant="prv")
            # The loader already samples with probability q for exactly the planned number of steps
            # (poisson_sampling=False keeps Opacus from re-wrapping it); Opacus reads q = 1/len(loader).
            made = engine.make_private(
                module=model,
                optimizer=optimizer,
                criterion=criterion,
                data_loader=loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                poisson_sampling=False,
                noise_generator=generator,
                grad_sample_mode=mode,
            )
            if mode == "ghost":
                private_model, private_optimizer, private_criterion, private_loader = made
            else:
                private_model, private_optimizer, private_loader = made
                private_criterion = criterion
            private_optimizer.expected_batch_size = expected_batch_size  # the same divisor in every mode

            losses: list[float] = []
            for _ in range(epochs):
                for inputs, labels in private_loader:
                    inputs, labels = inputs.to(device), labels.to(device)
                    private_optimizer.zero_grad(set_to_none=True)
                    outputs = private_model(inputs)
                    if len(labels) == 0 and mode == "hooks":
                        # An empty Poisson batch still takes a step: zero clipped gradients plus noise,
                        # as the analysis assumes. A zero loss on the empty output creates the
                        # (empty) per-example gradients Opacus needs.
                        (outputs.sum() * 0.0).backward()
                    else:
                        loss = private_criterion(outputs, labels)
                        loss.backward()
                        if len(labels):
                            losses.append(float(loss.detach()))
                    private_optimizer.step()
        taken = sum(n for _, _, n in engine.accountant.history)
        if taken != steps or any(abs(q - sample_rate) > 1e-12 for _, q, _ in engine.accountant.history):
            # Cannot happen with the loader above; if Opacus ever changes how it counts, the ledger
            # must not silently under-charge.
            raise ProtocolError(f"DP-SGD took {taken} steps at {engine.accountant.history}, planned {steps} at q={sample_rate}")
        return losses
    finally:
        # Also when the training fails: no hooks, per-example gradients or clipped sums stay on the caller's model.
        if private_model is not None and hasattr(private_model, "remove_hooks"):
            private_model.remove_hooks()
        _drop_opacus_leftovers(model, before)


# What Opacus' hooks and optimizer leave on the trained model after ``remove_hooks``: on each layer
# it hooked, an (emptied) activation list and a batch length; on each parameter the last batch's
# per-example gradients, their norms, the clipped sum and a forward counter.
_OPACUS_MODULE_LEFTOVERS = frozenset({"activations", "max_batch_len"})
_OPACUS_PARAMETER_LEFTOVERS = frozenset({"grad_sample", "_forward_counter", "summed_grad", "_norm_sample", "_current_grad_sample", "_processed"})


def _opacus_attributes(model: nn.Module) -> tuple[set[tuple[int, str]], set[int]]:
    """Before a training: the layers that already hold an attribute of an Opacus layer name (a user's
    own, which stays), and the layers that had no full backward hook yet."""
    held = {(id(m), name) for m in model.modules() for name in _OPACUS_MODULE_LEFTOVERS.intersection(m.__dict__)}
    unhooked = {id(module) for module in model.modules() if getattr(module, "_is_full_backward_hook", None) is None}
    return held, unhooked


def _drop_opacus_leftovers(model: nn.Module, before: tuple[set[tuple[int, str]], set[int]]) -> None:
    """Removes what a DP-SGD pass left on ``model``, and only that.

    The per-parameter names are Opacus' own (it writes and accumulates into them), so they are always
    removed, a previous failed pass's included. A layer's ``activations``/``max_batch_len`` go only
    on the layers Opacus hooks (those holding trainable parameters themselves) and only where the
    layer did not hold one before. So the last batch's unclipped per-example gradients do not outlive the training
    on the caller's model, their memory is freed, and the model is again the architecture it was:
    ``privfl.model_pool.ModelPool`` can reset it for the next training instead of copying one. A
    layer whose backward hooks are all gone again is marked as having none (torch marks a module on
    its first full backward hook and never unmarks it).
    """
    held, unhooked = before
    for parameter in model.parameters():
        for name in _OPACUS_PARAMETER_LEFTOVERS.intersection(parameter.__dict__):
            delattr(parameter, name)
    for module in model.modules():
        # Opacus hooks the layers that hold trainable parameters themselves (not containers).
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            for name in _OPACUS_MODULE_LEFTOVERS.intersection(module.__dict__):
                if (id(module), name) not in held:
                    delattr(module, name)
        if id(module) in unhooked and not module._backward_hooks and "_is_full_backward_hook" in module.__dict__:
            module._is_full_backward_hook = None


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, device: torch.device, batch_size: int = 512) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``dataset``."""
    model = model.to(device).eval()
    if len(dataset):  # type: ignore[arg-type]  # torch's Dataset declares no __len__; map-style datasets have one
        dataset = prepare_dataset(dataset, model, site="test_set")
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct, count = 0.0, 0, 0
    for inputs, labels in DataLoader(dataset, batch_size=batch_size):
        inputs, labels = inputs.to(device), labels.to(device)
        logits = model(inputs)
        total_loss += float(criterion(logits, labels))
        correct += int((logits.argmax(dim=1) == labels).sum())
        count += len(labels)
    return total_loss / max(count, 1), correct / max(count, 1)
