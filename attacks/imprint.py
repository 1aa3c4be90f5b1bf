"""The malicious-server imprint attack (Fowl et al. 2022): the tampered model and the read-out of its gradient.

The check a site runs on a received model lives on the client side, in :mod:`privfl.received_model`.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch

from privfl import _validate
from privfl.errors import AttackError, ConfigError, ModelTamperError  # ModelTamperError is re-exported here

from ._model import ModelView, check_alignment
from .base import AggregateObservation, Attack, GradientObservation, Observation, Reconstruction

__all__ = [
    "ImprintAttack",
    "ImprintBlock",
    "ImprintConfig",
    "ImprintReconstruction",
    "ModelTamperError",
    "Placement",
    "Statistic",
    "imprint_model",
]


# --- the malicious server's model ---------------------------------------------------------------------------


class Statistic(Enum):
    """The linear statistic ``s(x) = <w, x>`` that every imprint unit measures."""

    BRIGHTNESS = "brightness"  # w = 1/d: the mean feature (mean pixel brightness for images)
    RANDOM = "random"  # w: a seeded random unit direction; fewer ties between inputs than brightness


class Placement(Enum):
    """Where the server puts the imprint units."""

    PREPEND = "prepend"  # a new block in front of the agreed model: the architecture changes
    REUSE_FIRST_LINEAR = "reuse-first-linear"  # overwrite the agreed first Linear: the architecture is unchanged


@dataclass(frozen=True, kw_only=True, slots=True)
class ImprintConfig:
    """How the malicious server builds its imprint layer.

    Attributes:
        num_bins: Imprint units, one per bin of the statistic. With ``REUSE_FIRST_LINEAR`` it must equal the
            reused layer's ``out_features``.
        statistic: The statistic every unit measures.
        placement: Prepend a block, or overwrite the agreed model's first linear layer.
        seed: Seed of the random direction (``Statistic.RANDOM``) and of the reused layer's readout.
    """

    num_bins: int = 64
    statistic: Statistic = Statistic.RANDOM
    placement: Placement = Placement.PREPEND
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.num_bins, int) or isinstance(self.num_bins, bool) or self.num_bins < 2:
            raise ConfigError("num_bins", self.num_bins, "must be an int >= 2")
        if not isinstance(self.statistic, Statistic):
            raise ConfigError("statistic", self.statistic, f"must be one of {[s.value for s in Statistic]}")
        if not isinstance(self.placement, Placement):
            raise ConfigError("placement", self.placement, f"must be one of {[p.value for p in Placement]}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError("seed", self.seed, "must be an int")


class ImprintBlock(torch.nn.Module):
    """Flatten, ``Linear(d, k)`` imprint units, ReLU, ``Linear(k, d)`` readout with equal columns, reshape.

    Every row of the imprint layer is the same direction ``w`` and unit ``i`` has bias ``-t_i``, so it fires
    exactly for inputs with ``<w, x> > t_i``. The readout gives every unit the same column, so for any input
    ``dL/dh_i`` is the same for all firing units; that is what makes consecutive units' gradients cancel
    except for the inputs between their thresholds. The output has the input's shape, so the agreed model
    runs on it unchanged.

    Args:
        input_shape: Shape of one input.
        direction: ``w``, shape ``(d,)``.
        thresholds: ``t``, shape ``(k,)``, ascending.
    """

    def __init__(self, input_shape: tuple[int, ...], direction: torch.Tensor, thresholds: torch.Tensor) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        d, k = math.prod(self.input_shape), int(thresholds.numel())
        self.linear = torch.nn.Linear(d, k)
        self.spread = torch.nn.Linear(k, d)
        with torch.no_grad():
            self.linear.weight.copy_(direction.reshape(1, d).expand(k, d))
            self.linear.bias.copy_(-thresholds)
            self.spread.weight.fill_(1.0 / k)
            self.spread.bias.zero_()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.linear(inputs.flatten(1)))
        return self.spread(hidden).reshape(inputs.shape[0], *self.input_shape)


def _statistic_direction(config: ImprintConfig, d: int) -> torch.Tensor:
    if config.statistic is Statistic.BRIGHTNESS:
        return torch.full((d,), 1.0 / d, dtype=torch.float64)
    direction = torch.randn(d, generator=torch.Generator().manual_seed(config.seed), dtype=torch.float64)
    return direction / direction.norm()


def _thresholds(statistic: torch.Tensor, num_bins: int) -> torch.Tensor:
    # Equal-mass bins: t_i is the i/k quantile, so an input lands in each bin with probability about 1/k.
    # The lowest threshold sits one standard deviation below the smallest auxiliary value so that the first
    # bin also catches inputs slightly darker than anything in the auxiliary data.
    levels = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)[:-1]
    thresholds = torch.quantile(statistic, levels)
    thresholds[0] = statistic.min() - statistic.std()
    return thresholds


def _sequential_first_linear(model: torch.nn.Module, d: int) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    children = list(model.children()) if isinstance(model, torch.nn.Sequential) else []
    for i, child in enumerate(children):
        if isinstance(child, torch.nn.Linear):
            ok = (
                i + 2 < len(children)
                and child.in_features == d
                and child.bias is not None
                and all(not list(c.parameters()) for c in children[:i])
                and isinstance(children[i + 1], torch.nn.ReLU)
            )
            second = children[i + 2] if i + 2 < len(children) else None
            if ok and isinstance(second, torch.nn.Linear):
                return child, second
            break
        if list(child.parameters()):
            break
    raise ConfigError(
        "placement",
        Placement.REUSE_FIRST_LINEAR.value,
        f"needs an nn.Sequential whose first parametric layers are Linear({d}, k, bias) -> ReLU -> Linear",
    )


def imprint_model(
    model: torch.nn.Module,
    *,
    input_shape: tuple[int, ...],
    auxiliary_inputs: torch.Tensor,
    num_bins: int = 64,
    statistic: Statistic = Statistic.RANDOM,
    placement: Placement = Placement.PREPEND,
    seed: int = 0,
) -> torch.nn.Module:
    """Builds the model a malicious server sends instead of the agreed one (Fowl et al. 2022, "Robbing the Fed").

    Threat model: an *active* server that may change the model it distributes. The bin thresholds are the
    quantiles of the statistic over ``auxiliary_inputs``, public data from the clients' distribution (in the
    tests and benchmarks: the dataset's training split, while the victims come from the test split).

    Args:
        model: The agreed model; it is copied, never modified.
        input_shape: Shape of one input.
        auxiliary_inputs: Public inputs ``(N, *input_shape)`` that fix the bin thresholds.
        num_bins: Imprint units (see ``ImprintConfig``).
        statistic: The statistic the units measure.
        placement: Prepend an ``ImprintBlock`` (named ``imprint``, the agreed model follows as ``model``), or
            overwrite the agreed model's first ``Linear`` and give the next ``Linear`` equal columns.
        seed: Seed of the random direction and readout.

    Returns:
        The imprinted model. It maps inputs to logits like the agreed one and trains in any client loop.

    Raises:
        ConfigError: On a bad configuration, auxiliary data of the wrong shape, or a model the placement
            cannot be applied to.
    """
    config = ImprintConfig(num_bins=num_bins, statistic=statistic, placement=placement, seed=seed)
    if not isinstance(input_shape, tuple) or not input_shape or not all(
        isinstance(v, int) and v > 0 for v in input_shape
    ):
        raise ConfigError("input_shape", input_shape, "must be a non-empty tuple of positive ints")
    aux = torch.as_tensor(auxiliary_inputs)
    if aux.ndim != len(input_shape) + 1 or tuple(aux.shape[1:]) != input_shape or aux.shape[0] < 2:
        raise ConfigError(
            "auxiliary_inputs", tuple(aux.shape), f"must be (N >= 2, *{input_shape}) public inputs"
        )
    d = math.prod(input_shape)
    direction = _statistic_direction(config, d)
    thresholds = _thresholds(aux.detach().double().flatten(1) @ direction, config.num_bins)
    dtype = next(iter(model.parameters())).dtype if list(model.parameters()) else torch.float32

    if config.placement is Placement.PREPEND:
        block = ImprintBlock(input_shape, direction.to(dtype), thresholds.to(dtype))
        return torch.nn.Sequential(OrderedDict(imprint=block, model=copy.deepcopy(model)))

    tampered = copy.deepcopy(model)
    first, readout = _sequential_first_linear(tampered, d)
    if first.out_features != config.num_bins:
        raise ConfigError("num_bins", num_bins, f"must equal the reused layer's out_features={first.out_features}")
    generator = torch.Generator().manual_seed(config.seed + 1)
    column = torch.randn(readout.out_features, generator=generator, dtype=torch.float64)
    column = column / column.norm()
    with torch.no_grad():
        first.weight.copy_(direction.to(first.weight.dtype).reshape(1, d).expand_as(first.weight))
        first.bias.copy_(-thresholds.to(first.bias.dtype))
        readout.weight.copy_(column.to(readout.weight.dtype).reshape(-1, 1).expand_as(readout.weight))
    return tampered


# --- the attack ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ImprintReconstruction(Reconstruction):
    """An imprint reconstruction: one row per non-empty bin.

    Attributes:
        bins: Bin index of each row, in threshold order (``(n,)``, int64).
        single: Per row, ``True`` when the bin's gradients are those of one input with one label: replaying
            the row through the model reproduces the bin's bias gradient (see ``ImprintAttack``). Such rows
            are, with rare exceptions (docs/attacks.md), exact copies of a client input; the others are
            mixtures or noise.
    """

    bins: torch.Tensor
    single: torch.Tensor

    def __post_init__(self) -> None:
        Reconstruction.__post_init__(self)
        n = self.inputs.shape[0]
        if self.bins.shape != (n,) or self.single.shape != (n,) or self.single.dtype != torch.bool:
            raise ConfigError(
                "single", tuple(self.single.shape), f"bins and single must have shape ({n},), single bool"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class ImprintAttack(Attack):
    """Reads inputs out of an imprinted model's gradient, one bin at a time (Fowl et al. 2022).

    Unit ``i`` of the imprint layer (rows ordered by threshold ``t_i = -b_i / |w_i|``) fires for the inputs
    with ``<w, x> > t_i``. Per input, ``dL/dW_i = g(x) x`` and ``dL/db_i = g(x)`` with the same ``g(x)`` for
    every firing unit, so in a mean gradient over ``N`` inputs

        (dL/dW_i - dL/dW_{i+1}) / (dL/db_i - dL/db_{i+1}) = sum_{x in bin i} g(x) x / sum_{x in bin i} g(x),

    which is the input itself when bin ``i`` holds one. It makes no difference whether the gradient is one
    client's or the secure aggregate of many: inputs of different clients land in different bins and the sum
    keeps them apart. That is the point of the attack: SecAgg and CKKS do not stop it.

    A row is flagged ``single`` when the recovered input, replayed through the model with some label ``c``,
    reproduces the bin's bias gradient ``(dL/db_i - dL/db_{i+1}) * N`` within ``match_rtol``; the label is
    then ``c`` (otherwise ``-1``). The replay assumes per-sample gradients that do not interact, i.e. no
    BatchNorm in training mode.

    Attributes:
        layer: Name of the imprint ``nn.Linear`` in ``model.named_modules()``; ``None`` takes the ``linear``
            of the first ``ImprintBlock``.
        min_bias_grad: Bins whose |bias gradient difference| is below this times the largest |bias gradient|
            count as empty.
        match_rtol: Relative tolerance of the single-input replay.
        bounds: Clamp recovered inputs into ``(low, high)``; ``None`` returns them as computed.
    """

    layer: str | None = None
    min_bias_grad: float = 1e-5
    match_rtol: float = 1e-3
    bounds: tuple[float, float] | None = None
    name: ClassVar[str] = "imprint"

    def __post_init__(self) -> None:
        if not (isinstance(self.min_bias_grad, (int, float)) and 0 <= self.min_bias_grad < 1):
            raise ConfigError("min_bias_grad", self.min_bias_grad, "must be in [0, 1)")
        _validate.open_unit_interval("match_rtol", self.match_rtol)
        if self.bounds is not None and not (
            isinstance(self.bounds, tuple) and len(self.bounds) == 2 and self.bounds[0] < self.bounds[1]
        ):
            raise ConfigError("bounds", self.bounds, "must be None or (low, high) with low < high")

    def _find_layer(self, model: torch.nn.Module) -> torch.nn.Linear:
        modules = dict(model.named_modules())
        if self.layer is not None:
            found = modules.get(self.layer)
            if not isinstance(found, torch.nn.Linear) or found.bias is None:
                raise AttackError(f"no nn.Linear with a bias named {self.layer!r} in the model")
            return found
        for module in modules.values():
            if isinstance(module, ImprintBlock):
                return module.linear
        raise AttackError("the model has no ImprintBlock; name the imprint layer with ImprintAttack(layer=...)")

    @staticmethod
    def _check_sees_raw_input(view: ModelView, linear: torch.nn.Linear, input_shape: tuple[int, ...]) -> None:
        # dL/dW_i = g(x) x holds only if the layer's input is the raw input itself: check it on a probe.
        seen: list[torch.Tensor] = []
        handle = linear.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].detach()))
        ramp = torch.linspace(0.1, 0.9, math.prod(input_shape), device=view.device, dtype=view.dtype)
        probe = torch.stack([ramp, ramp.flip(0)])
        try:
            with torch.no_grad():
                view.logits(probe.reshape(2, *input_shape))
        finally:
            handle.remove()
        if not seen or not torch.allclose(seen[0].reshape(2, -1), probe, atol=1e-6):
            raise AttackError("the imprint layer's input is not the flattened raw input (some layer transforms it)")

    def _reconstruct(self, model: torch.nn.Module, observation: Observation) -> ImprintReconstruction:
        if isinstance(observation, AggregateObservation):
            gradients = observation.mean_gradients()
        elif isinstance(observation, GradientObservation):  # includes DP-SGD gradients
            gradients = observation.gradients
        else:
            raise AttackError(f"the imprint attack reads one-step gradients, not a {type(observation).__name__}")
        view = ModelView(model)
        check_alignment(view, gradients)
        linear = self._find_layer(model)
        d = math.prod(observation.input_shape)
        if linear.in_features != d:
            raise AttackError(f"the imprint layer takes {linear.in_features} features, an input has {d}")
        self._check_sees_raw_input(view, linear, observation.input_shape)
        index = {id(p): i for i, p in enumerate(model.parameters())}
        w_idx, b_idx = index[id(linear.weight)], index[id(linear.bias)]

        weight, bias = linear.weight.detach().double(), linear.bias.detach().double()
        order = torch.argsort(-bias / weight.norm(dim=1).clamp_min(1e-30), stable=True)
        grad_w = gradients[w_idx].detach().double()[order]
        grad_b = gradients[b_idx].detach().double()[order]
        diff_w = grad_w - torch.cat([grad_w[1:], torch.zeros_like(grad_w[:1])])
        diff_b = grad_b - torch.cat([grad_b[1:], torch.zeros_like(grad_b[:1])])
        scale = float(grad_b.abs().max())
        occupied = (diff_b.abs() > self.min_bias_grad * scale).nonzero().flatten() if scale > 0 else order[:0]
        estimates = diff_w[occupied] / diff_b[occupied, None]
        if self.bounds is not None:
            estimates = estimates.clamp(*self.bounds)

        inputs = estimates.reshape(-1, *observation.input_shape).to(view.dtype)
        single, labels = self._replay(
            view, inputs, order, occupied, diff_b=diff_b, b_idx=b_idx, num_samples=observation.num_samples
        )
        return ImprintReconstruction(
            inputs=inputs,
            labels=labels,
            attack=self.name,
            bins=occupied.clone(),
            single=single,
            note=f"{occupied.numel()} of {order.numel()} bins occupied, {int(single.sum())} hold one input",
        )

    def _replay(
        self,
        view: ModelView,
        inputs: torch.Tensor,
        order: torch.Tensor,
        occupied: torch.Tensor,
        *,
        diff_b: torch.Tensor,
        b_idx: int,
        num_samples: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Per input x with label c, the mean gradient over N inputs carries (1/N) * dL(x, c)/db. A bin holding
        # exactly x reproduces that amount; a mixture of inputs, or noise, almost never does for any label.
        single = torch.zeros(inputs.shape[0], dtype=torch.bool)
        labels = torch.full((inputs.shape[0],), -1, dtype=torch.long)
        if inputs.shape[0] == 0:
            return single, labels
        _, _, num_classes = view.last_linear()
        for row, bin_index in enumerate(occupied.tolist()):
            x = inputs[row : row + 1].to(view.device)
            observed = float(diff_b[bin_index])
            for c in range(num_classes):
                grad_b = view.gradients(x, torch.tensor([c], device=view.device))[b_idx].detach().double()[order]
                # Only unit i's own gradient: x lies below t_{i+1}, and a replay of x that rounds onto the
                # upper threshold must not cancel itself.
                predicted = float(grad_b[bin_index]) / num_samples
                if abs(predicted - observed) <= self.match_rtol * abs(observed):
                    single[row], labels[row] = True, c
                    break
        return single, labels
