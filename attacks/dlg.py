"""Deep Leakage from Gradients (Zhu et al. 2019): L2 gradient matching with L-BFGS."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from privfl.errors import ConfigError

from ._matching import MatchingProblem, l2_distance
from .base import Attack, Observation, Reconstruction, _check_positive_int, _check_positive_number
from .inverting import check_bounds
from .labels import recover_labels

__all__ = ["DLG"]


@dataclass(frozen=True, kw_only=True, slots=True)
class DLG(Attack):
    """Finds inputs whose gradient equals the observed one in Euclidean distance.

    Minimizes ``sum_l ||g_l(x) - g*_l||^2`` with L-BFGS (Zhu et al. 2019). By default the labels are
    recovered first with iDLG / label counts and held fixed (Zhao et al. 2020), which is more reliable; with
    ``optimize_labels=True`` soft labels are optimized jointly, as in the original DLG. The L2 distance is
    scale-sensitive, so unlike Inverting Gradients it is thrown off by DP-SGD clipping and by aggregation.

    The attacker needs: the model, the observation, the input shape and count.

    Attributes:
        max_iterations: Outer L-BFGS steps.
        inner_iterations: Function evaluations per L-BFGS step (``max_iter`` of ``torch.optim.LBFGS``).
        lr: L-BFGS step size.
        bounds: ``(low, high)`` box the inputs are projected into after each step, or ``None``.
        optimize_labels: Optimize soft labels jointly instead of recovering them analytically.
        seed: Seed of the ``torch.Generator`` drawing the random start.
    """

    max_iterations: int = 30
    inner_iterations: int = 20
    lr: float = 1.0
    bounds: tuple[float, float] | None = None
    optimize_labels: bool = False
    seed: int = 0
    name: ClassVar[str] = "dlg"

    def __post_init__(self) -> None:
        for field_name in ("max_iterations", "inner_iterations"):
            _check_positive_int(field_name, getattr(self, field_name))
        _check_positive_number("lr", self.lr)
        check_bounds(self.bounds)
        if not isinstance(self.seed, int):
            raise ConfigError("seed", self.seed, "must be an int")

    def _reconstruct(self, model: torch.nn.Module, observation: Observation) -> Reconstruction:
        problem = MatchingProblem(model, observation)
        view = problem.view
        generator = torch.Generator().manual_seed(self.seed)
        shape = (observation.num_samples, *observation.input_shape)
        candidate = torch.randn(shape, generator=generator, dtype=view.dtype).to(view.device).requires_grad_(True)
        variables = [candidate]
        if self.optimize_labels:
            _, _, num_classes = view.last_linear()
            label_logits = (
                torch.randn((observation.num_samples, num_classes), generator=generator, dtype=view.dtype)
                .to(view.device)
                .requires_grad_(True)
            )
            variables.append(label_logits)
        else:
            fixed = recover_labels(model, observation, seed=self.seed).to(view.device)

        def targets() -> torch.Tensor:
            return torch.softmax(label_logits, dim=1) if self.optimize_labels else fixed

        optimizer = torch.optim.LBFGS(
            variables, lr=self.lr, max_iter=self.inner_iterations, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = l2_distance(problem.simulate(candidate, targets()), problem.target)
            loss.backward()
            return loss.detach()

        last = candidate.detach().clone()
        last_loss = float("inf")
        for _ in range(self.max_iterations):
            loss = float(optimizer.step(closure))
            if self.bounds is not None:
                with torch.no_grad():
                    candidate.clamp_(*self.bounds)
            if not (torch.isfinite(candidate).all() and loss == loss):
                break  # L-BFGS diverged (it can on noisy targets); keep the last finite iterate
            last, last_loss = candidate.detach().clone(), loss
        labels = targets().argmax(dim=1) if self.optimize_labels else fixed
        return Reconstruction(inputs=last, labels=labels.detach().cpu(), attack=self.name, objective=last_loss)
