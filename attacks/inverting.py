"""Inverting Gradients (Geiping et al. 2020): cosine gradient matching with a TV prior, signed Adam, restarts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from privfl.errors import ConfigError

from ._matching import MatchingProblem, cosine_distance, total_variation
from .base import Attack, Observation, Reconstruction, _check_positive_int, _check_positive_number
from .labels import recover_labels

__all__ = ["InvertingGradients", "check_bounds"]


def check_bounds(bounds: object) -> None:
    """Validates an optional ``(low, high)`` box for the inputs.

    Raises:
        ConfigError: If ``bounds`` is neither ``None`` nor a pair with ``low < high``.
    """
    if bounds is None:
        return
    if (
        not isinstance(bounds, tuple)
        or len(bounds) != 2
        or not all(isinstance(b, (int, float)) for b in bounds)
        or not bounds[0] < bounds[1]
    ):
        raise ConfigError("bounds", bounds, "must be None or a (low, high) tuple of floats with low < high")


@dataclass(frozen=True, kw_only=True, slots=True)
class InvertingGradients(Attack):
    """Recovers inputs whose gradient (or FedAvg update) points the same way as the observed one.

    Minimizes ``1 - cos(g(x), g*) + tv_weight * TV(x)`` over candidate inputs ``x`` (Geiping et al. 2020).
    The cosine ignores the gradient's scale, so it is unaffected by DP-SGD clipping of a single sample and by
    the learning rate of an update. Labels come from ``recover_labels`` (iDLG or counts) unless the
    observation carries them. Adam follows the sign of the gradient, its step size drops tenfold at 3/8, 5/8
    and 7/8 of the run, and the best of ``restarts`` random starts (by final objective) is kept.

    The attacker needs: the model (the server sent it), the observation, the input shape and count, and
    optionally the data range (``bounds``), a prior every image pipeline reveals.

    Attributes:
        max_iterations: Optimizer steps per restart.
        restarts: Independent random starts; the one with the lowest objective wins. One suffices on small
            untrained models; raise it for trained models or batches, at proportional cost.
        lr: Adam step size (the step is ``lr`` per pixel at first, since the gradient's sign is used).
        tv_weight: Weight of the total-variation prior (0 disables it; ignored for tabular inputs).
        bounds: ``(low, high)`` box the inputs are projected into after each step, or ``None``.
        signed: Use the sign of the gradient in Adam, as in the paper.
        seed: Seed of the ``torch.Generator`` drawing the random starts.
    """

    max_iterations: int = 2000
    restarts: int = 1
    lr: float = 0.1
    tv_weight: float = 1e-2
    bounds: tuple[float, float] | None = (0.0, 1.0)
    signed: bool = True
    seed: int = 0
    name: ClassVar[str] = "inverting-gradients"

    def __post_init__(self) -> None:
        for field_name in ("max_iterations", "restarts"):
            _check_positive_int(field_name, getattr(self, field_name))
        _check_positive_number("lr", self.lr)
        if not isinstance(self.tv_weight, (int, float)) or not self.tv_weight >= 0:
            raise ConfigError("tv_weight", self.tv_weight, "must be >= 0")
        check_bounds(self.bounds)
        if not isinstance(self.seed, int):
            raise ConfigError("seed", self.seed, "must be an int")

    def _reconstruct(self, model: torch.nn.Module, observation: Observation) -> Reconstruction:
        problem = MatchingProblem(model, observation)
        view = problem.view
        labels = recover_labels(model, observation, seed=self.seed).to(view.device)
        shape = (observation.num_samples, *observation.input_shape)
        generator = torch.Generator().manual_seed(self.seed)
        milestones = [int(self.max_iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]

        best_inputs: torch.Tensor | None = None
        best_objective = float("inf")
        for _ in range(self.restarts):
            start = torch.randn(shape, generator=generator, dtype=view.dtype)
            if self.bounds is not None:
                low, high = self.bounds
                # Start inside the box, around its middle, so projection does not flatten the first step.
                start = ((low + high) / 2 + (high - low) / 4 * start).clamp(low, high)
            candidate = start.to(view.device).requires_grad_(True)
            optimizer = torch.optim.Adam([candidate], lr=self.lr)
            schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
            for _ in range(self.max_iterations):
                optimizer.zero_grad(set_to_none=True)
                objective = self._objective(problem, candidate, labels)
                (grad,) = torch.autograd.grad(objective, [candidate])
                candidate.grad = grad.sign() if self.signed else grad
                optimizer.step()
                schedule.step()
                if self.bounds is not None:
                    with torch.no_grad():
                        candidate.clamp_(*self.bounds)
            final = float(self._objective(problem, candidate, labels).detach())
            if final < best_objective or best_inputs is None:
                best_objective, best_inputs = final, candidate.detach().clone()
        assert best_inputs is not None  # restarts >= 1 is validated
        return Reconstruction(inputs=best_inputs, labels=labels.cpu(), attack=self.name, objective=best_objective)

    def _objective(self, problem: MatchingProblem, candidate: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = cosine_distance(problem.simulate(candidate, labels), problem.target)
        if self.tv_weight > 0:
            loss = loss + self.tv_weight * total_variation(candidate)
        return loss
