"""The gradient-matching problem shared by DLG and Inverting Gradients: target, simulator and priors."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch

from privfl.errors import AttackError

from ._model import ModelView, check_alignment
from .base import AggregateObservation, GradientObservation, Observation, UpdateObservation

__all__ = ["MatchingProblem", "cosine_distance", "l2_distance", "total_variation", "total_variation_per_input"]

Simulator = Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]]


class MatchingProblem:
    """What the attacker must reproduce, and how to compute it for candidate inputs.

    For a one-step gradient (plain, DP-noised or aggregated) the simulator is the model's mean-loss gradient
    on the candidate batch. For a FedAvg update it replays the client's ``local_steps`` SGD steps on the
    candidates with ``create_graph=True`` and returns the parameter change, so the whole local training is
    differentiated (Geiping et al. 2020, Sec. 6).

    Args:
        model: The global model.
        observation: A readable observation.

    Raises:
        AttackError: For an observation without a gradient or update, or one that does not fit the model.
    """

    def __init__(self, model: torch.nn.Module, observation: Observation) -> None:
        self.view = ModelView(model)
        self._update_obs: UpdateObservation | None = None
        if isinstance(observation, AggregateObservation):
            target = observation.mean_gradients()
            self.simulate: Simulator = self._gradient
        elif isinstance(observation, GradientObservation):
            target = observation.gradients
            self.simulate = self._gradient
        elif isinstance(observation, UpdateObservation):
            target = observation.delta
            self._update_obs = observation
            self.simulate = self._update
        else:
            raise AttackError(f"gradient matching needs a gradient or an update, not a {type(observation).__name__}")
        check_alignment(self.view, target)
        self.target = [t.to(self.view.device, self.view.dtype) for t in target]

    def _gradient(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        return self.view.gradients(inputs, targets, create_graph=True)

    def _update(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        obs = self._update_obs
        if obs is None:  # only reachable by calling the private method directly
            raise AttackError("no update observation to replay")
        start = {n: p.detach() for n, p in self.view.params.items()}
        params = dict(start)
        n = obs.num_samples
        for step in range(obs.local_steps):
            # The client walks through its data in order, batch_size at a time, wrapping around.
            idx = torch.tensor([(step * obs.batch_size + j) % n for j in range(obs.batch_size)], device=inputs.device)
            grads = self.view.gradients(inputs[idx], targets[idx], params=params, create_graph=True)
            params = {name: params[name] - obs.lr * g for name, g in zip(self.view.names, grads, strict=True)}
        return [params[name] - start[name] for name in self.view.names]


def cosine_distance(simulated: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """``1 - <g, g*> / (|g| |g*|)`` over all parameters concatenated (Geiping et al. 2020, eq. 4)."""
    dot = sum((s * t).sum() for s, t in zip(simulated, target, strict=True))
    s_norm = torch.sqrt(cast(torch.Tensor, sum((s * s).sum() for s in simulated)))
    t_norm = torch.sqrt(cast(torch.Tensor, sum((t * t).sum() for t in target)))
    return 1.0 - dot / (s_norm * t_norm).clamp_min(1e-20)


def l2_distance(simulated: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """``sum ||g - g*||^2`` over all parameters (Zhu et al. 2019)."""
    return cast(torch.Tensor, sum(((s - t) ** 2).sum() for s, t in zip(simulated, target, strict=True)))


def total_variation(inputs: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation, mean absolute difference of neighbouring pixels.

    Applies to the last two dimensions of inputs shaped ``(n, C, H, W)`` or ``(n, H, W)``; for anything else
    (tabular rows) there are no neighbours and the prior is zero.
    """
    if inputs.ndim < 3 or min(inputs.shape[-2:]) < 2:
        return inputs.new_zeros(())
    dx = (inputs[..., :, 1:] - inputs[..., :, :-1]).abs().mean()
    dy = (inputs[..., 1:, :] - inputs[..., :-1, :]).abs().mean()
    return dx + dy


def total_variation_per_input(inputs: torch.Tensor) -> torch.Tensor:
    """`total_variation` of each input on its own, shape ``(n,)``; their mean is the batch's `total_variation`.

    Zeros for inputs without two spatial dimensions (tabular rows).
    """
    if inputs.ndim < 3 or min(inputs.shape[-2:]) < 2:
        return inputs.new_zeros(inputs.shape[:1])
    dx = (inputs[..., :, 1:] - inputs[..., :, :-1]).abs().flatten(1).mean(1)
    dy = (inputs[..., 1:, :] - inputs[..., :-1, :]).abs().flatten(1).mean(1)
    return dx + dy
