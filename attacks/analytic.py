"""Closed-form input recovery from the gradient of a fully-connected layer with a bias."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from privfl.errors import AttackError, ConfigError

from ._model import ModelView, check_alignment
from .base import Attack, Observation, Reconstruction
from .labels import observed_mean_gradient, recover_labels

__all__ = ["AnalyticLinear"]


@dataclass(frozen=True, kw_only=True, slots=True)
class AnalyticLinear(Attack):
    """Reads the input straight off the first linear layer's gradient (Phong et al. 2017; Geiping et al. 2020).

    For ``z = W x + b`` and one sample, ``dL/dW_i = (dL/dz_i) x`` and ``dL/db_i = dL/dz_i``, so every row with
    a non-zero bias gradient gives ``x = (dL/dW_i) / (dL/db_i)`` exactly. The attack needs: a plaintext
    (or decrypted) one-sample gradient, and a model whose first parametric layer is an ``nn.Linear`` with a
    bias applied to the flattened raw input (the usual tabular MLP, or Flatten + Linear on images).

    For several samples each row gives a weighted mix of the inputs that activated that unit; rows reached
    by one input alone (common behind a ReLU) still give that input exactly, and several such rows give it
    identically, while mixtures differ from row to row. The attack returns the row estimates that recur
    (exact inputs, most repeated first; their number is in the reconstruction's ``note``), then the most
    distinct remaining rows, strongest bias gradient first.

    Attributes:
        layer: Name of the linear layer in ``model.named_modules()``; ``None`` picks the first ``nn.Linear``.
        min_bias_grad: Rows whose |bias gradient| is below this times the largest are too noisy to divide by.
        distinct_tol: Two row estimates closer than this (max abs difference) count as the same input.
    """

    layer: str | None = None
    min_bias_grad: float = 1e-6
    distinct_tol: float = 1e-3
    name: ClassVar[str] = "analytic-linear"

    def __post_init__(self) -> None:
        if not (0 <= self.min_bias_grad < 1):
            raise ConfigError("min_bias_grad", self.min_bias_grad, "must be in [0, 1)")
        if not self.distinct_tol >= 0:
            raise ConfigError("distinct_tol", self.distinct_tol, "must be >= 0")

    def _find_layer(self, view: ModelView, input_shape: tuple[int, ...]) -> tuple[int, int, torch.nn.Linear]:
        modules = dict(view.model.named_modules())
        if self.layer is not None:
            if self.layer not in modules or not isinstance(modules[self.layer], torch.nn.Linear):
                raise AttackError(f"no nn.Linear named {self.layer!r} in the model")
            linear = modules[self.layer]
        else:
            linears = [m for m in view.model.modules() if isinstance(m, torch.nn.Linear)]
            if not linears:
                raise AttackError("the model has no nn.Linear layer to read the input from")
            linear = linears[0]
        if linear.bias is None:
            raise AttackError("the linear layer has no bias: the division x = dW_i / db_i needs one")
        if linear.in_features != math.prod(input_shape):
            raise AttackError(
                f"the linear layer takes {linear.in_features} features but an input has {math.prod(input_shape)}: "
                "it does not see the raw input"
            )
        # Check on a probe that the layer really sees the raw input (nothing learned or mixing before it).
        seen: list[torch.Tensor] = []
        handle = linear.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].detach()))
        ramp = torch.linspace(0.1, 0.9, math.prod(input_shape), device=view.device, dtype=view.dtype)
        probe = torch.stack([ramp, ramp.flip(0)])  # two rows, so BatchNorm in train mode can run
        try:
            with torch.no_grad():
                view.logits(probe.reshape(2, *input_shape))
        finally:
            handle.remove()
        if not seen or not torch.allclose(seen[0].reshape(2, -1), probe, atol=1e-6):
            raise AttackError("the linear layer's input is not the flattened raw input (some layer transforms it)")
        index = {id(p): i for i, p in enumerate(view.model.parameters())}
        return index[id(linear.weight)], index[id(linear.bias)], linear

    def _reconstruct(self, model: torch.nn.Module, observation: Observation) -> Reconstruction:
        view = ModelView(model)
        gradients = observed_mean_gradient(observation)
        check_alignment(view, gradients)
        w_idx, b_idx, _ = self._find_layer(view, observation.input_shape)
        weight_grad = gradients[w_idx].double()
        bias_grad = gradients[b_idx].double()
        strength = bias_grad.abs()
        if float(strength.max()) == 0.0:
            raise AttackError("every bias gradient of the layer is zero: no unit was active")
        usable = (strength > self.min_bias_grad * strength.max()).nonzero().flatten()
        usable = usable[torch.argsort(strength[usable], descending=True)]
        estimates = weight_grad[usable] / bias_grad[usable, None]

        # A unit that only one input activated gives that input exactly, and every other unit that input
        # activated alone gives the same row: exact inputs recur. A unit shared by several inputs gives a
        # mixture weighted by that unit's own dL/dz, different for every unit, so mixtures do not recur
        # (the separation idea behind binning attacks, Fowl et al. 2022). Recurring rows go first, the
        # most often repeated first; the rest is filled with the most distinct remaining rows.
        clusters: list[list[int]] = []
        for r, row in enumerate(estimates):
            for members in clusters:
                if float((row - estimates[members[0]]).abs().max()) <= self.distinct_tol:
                    members.append(r)
                    break
            else:
                clusters.append([r])
        recurring = sorted((c for c in clusters if len(c) >= 2), key=len, reverse=True)
        single = [c for c in clusters if len(c) == 1]
        chosen = [estimates[c].mean(dim=0) for c in recurring[: observation.num_samples]]
        exact = len(chosen)
        for c in single:
            if len(chosen) == observation.num_samples:
                break
            chosen.append(estimates[c[0]])
        while len(chosen) < observation.num_samples:
            # Fewer distinct units than samples: repeat the strongest estimate rather than invent one.
            chosen.append(chosen[0])
        inputs = torch.stack(chosen).reshape(observation.num_samples, *observation.input_shape)
        labels = recover_labels(model, observation)
        return Reconstruction(
            inputs=inputs.to(view.dtype),
            labels=labels,
            attack=self.name,
            note=f"{len(usable)} usable rows of the linear layer; {exact} of {observation.num_samples} inputs "
            "read identically off two or more rows (exact)",
        )
