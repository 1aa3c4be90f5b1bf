"""Inverting Gradients (Geiping et al. 2020): cosine gradient matching with a TV prior, signed Adam, restarts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from privfl._validate import positive
from privfl.errors import ConfigError

from ._matching import MatchingProblem, cosine_distance, total_variation, total_variation_per_input
from .base import Attack, Observation, Reconstruction, _check_positive_int, _check_positive_number
from .labels import batch_fit, recover_labels

__all__ = [
    "DEFAULT_TV_WEIGHT",
    "SMOOTH_TV_WEIGHT",
    "TV_CONFIDENCE_CAP",
    "TV_FADE",
    "TV_FIT_GAIN",
    "InvertingGradients",
    "check_bounds",
    "check_tv_weight",
    "choose_tv_weight",
    "has_smooth_activations",
]

DEFAULT_TV_WEIGHT = 1e-2
"""TV weight when ``tv_weight=None`` and the model has no smooth activation module (ReLU networks)."""
SMOOTH_TV_WEIGHT = 0.0
"""TV weight when ``tv_weight=None`` and the model has an ``nn.Sigmoid`` or ``nn.Tanh`` module."""
_SMOOTH_ACTIVATIONS = (torch.nn.Sigmoid, torch.nn.Tanh)
TV_CONFIDENCE_CAP = 20.0
"""Largest ratio ``max_j err_j / err_i`` used by the per-input TV scaling (before the power ``tv_confidence``)."""

TV_FADE = (0.375, 0.875)
"""Default fractions of a run between which Inverting Gradients' TV weight falls linearly to 0 (the step size's
first and last drops)."""
TV_FIT_GAIN = 12.0
"""Default gain of the TV weight on a batch the model already fits (see ``InvertingGradients.tv_fit_gain``)."""

_INITS = ("box", "randn", "uniform")
_LAYER_WEIGHTINGS = ("uniform", "linear")


def has_smooth_activations(model: torch.nn.Module) -> bool:
    """Whether ``model`` registers an ``nn.Sigmoid`` or ``nn.Tanh`` module (functional calls are not seen)."""
    return any(isinstance(m, _SMOOTH_ACTIVATIONS) for m in model.modules())


def check_tv_weight(tv_weight: float | None) -> None:
    """Raises ConfigError unless ``tv_weight`` is None (chosen from the model) or a finite number >= 0."""
    if tv_weight is not None:
        positive("tv_weight", tv_weight, allow_zero=True, hint="or None to choose it from the model")


def choose_tv_weight(tv_weight: float | None, model: torch.nn.Module) -> float:
    """``tv_weight`` when set; else `SMOOTH_TV_WEIGHT` for sigmoid/tanh models, `DEFAULT_TV_WEIGHT` otherwise.

    Shared by the optimization attacks (Inverting Gradients, FedAvg inversion); see
    `InvertingGradients.tv_weight_for` for why smooth models get no prior.
    """
    if tv_weight is not None:
        return float(tv_weight)
    return SMOOTH_TV_WEIGHT if has_smooth_activations(model) else DEFAULT_TV_WEIGHT


def _weighted_cosine_distance(
    simulated: list[torch.Tensor], target: list[torch.Tensor], weights: list[float] | None, *, double: bool
) -> torch.Tensor:
    """``1 - cos`` over the concatenated gradients, each tensor's terms scaled by its weight (1 when ``None``)."""
    if weights is None:
        weights = [1.0] * len(target)
    if double:
        simulated, target = [s.double() for s in simulated], [t.double() for t in target]
    dot = torch.stack([w * (s * t).sum() for w, s, t in zip(weights, simulated, target, strict=True)]).sum()
    norm_s = torch.stack([w * (s * s).sum() for w, s in zip(weights, simulated, strict=True)]).sum()
    norm_t = torch.stack([w * (t * t).sum() for w, t in zip(weights, target, strict=True)]).sum()
    return 1.0 - dot / (torch.sqrt(norm_s) * torch.sqrt(norm_t)).clamp_min(1e-20)


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

    Minimizes ``1 - cos(g(x), g*) + tv_weight * TV(x)`` over candidate inputs ``x`` (Geiping et al. 2020); in a
    batch each input's TV term is scaled up the more confidently the model classifies it (``tv_confidence``).
    The cosine ignores the gradient's scale, so it is unaffected by DP-SGD clipping of a single sample and by
    the learning rate of an update. Labels come from ``recover_labels`` (iDLG or counts) unless the
    observation carries them. Adam follows the sign of the gradient, its step size drops tenfold at 3/8, 5/8
    and 7/8 of the run, and the best of ``restarts`` random starts (by final objective) is kept. The TV prior
    steers the start and is then released (``tv_fade``): it falls to 0 while the step size drops, so the
    end of the run matches the observation alone and the prior's bias does not stay in the image.

    The attacker needs: the model (the server sent it), the observation, the input shape and count, and
    optionally the data range (``bounds``), a prior every image pipeline reveals.

    Attributes:
        max_iterations: Optimizer steps per restart.
        restarts: Independent random starts; the one with the lowest objective wins. One suffices on small
            untrained models; raise it for trained models or batches, at proportional cost.
        lr: Adam step size (the step is ``lr`` per pixel at first, since the gradient's sign is used).
        tv_weight: Weight of the total-variation prior (0 disables it; ignored for tabular inputs). ``None``
            (the default) picks it from the model: ``SMOOTH_TV_WEIGHT`` (0) when the model contains an
            ``nn.Sigmoid`` or ``nn.Tanh`` module, ``DEFAULT_TV_WEIGHT`` (1e-2) otherwise; see
            :meth:`tv_weight_for`. Activations applied as functions (``torch.sigmoid`` in a ``forward``)
            are not seen, so pass the weight explicitly for such models.
        bounds: ``(low, high)`` box the inputs are projected into after each step, or ``None``.
        signed: Use the sign of the gradient in Adam, as in the paper.
        seed: Seed of the ``torch.Generator`` drawing the random starts.
        init: Distribution of the random starts: ``"box"`` (normal around the middle of ``bounds``, a quarter
            of its width wide, clipped into it), ``"randn"`` (standard normal, clipped into ``bounds``) or
            ``"uniform"`` (uniform over ``bounds``; needs ``bounds``).
        layer_weighting: How the cosine weighs the parameter tensors: ``"uniform"`` (one cosine over all
            of them concatenated, the paper's form) or ``"linear"`` (each tensor's terms scaled by a weight
            falling linearly from 1 for the first parameter to ``1/n`` for the last, favouring the layers
            nearest the input).
        warmup: Steps over which the step size ramps linearly up to ``lr`` (0: no warm-up).
        double: Accumulate the cosine's dot product and norms in float64.
        tv_confidence: Power of the per-input scaling of the TV prior in a batch (0: one weight for every
            input). Input ``i`` gets ``tv_weight * min(TV_CONFIDENCE_CAP, max_j err_j / err_i) **
            tv_confidence``, where ``err_i = |softmax(model(x_i)) - onehot(y_i)|`` is the model's output error
            at the current candidate, recomputed every step. Each input's terms in the gradient are scaled by
            its output error, so an input the model already classifies confidently is weakly constrained by
            the observation, and the prior carries more of it (on a briefly trained ConvNet, batch 4, TV 0.2
            instead of 1e-2 gained 3.0 dB on inputs with true-class probability >= 0.5 and 0.5 dB on the
            others). A single input, and a batch the model treats alike (an untrained model), keep
            ``tv_weight``. See :meth:`tv_scales`.
        tv_fade: ``(start, end)`` fractions of each restart's iterations: the TV weight holds until
            ``start`` and falls linearly to 0 at ``end`` (``None``: constant). The default, 3/8 to 7/8, spans
            the step size's drops. Measured on the photograph crops at 500 iterations (docs/attacks.md,
            "Releasing the prior"): one image through the untrained ReLU ConvNet 38.8 -> 46.7 dB median at
            16x16, 33.3 -> 45.3 dB at 32x32.
        tv_fit_gain: On a batch of ``n > 1`` inputs the TV weight is multiplied by ``1 + tv_fit_gain * fit *
            (1 - 1/n)``, where ``fit`` (:func:`~privfl.attacks.labels.batch_fit`, read off the classifier
            bias gradient) is 0 when the model's predictions on the batch are uniform (an untrained model)
            and 1 when they are the labels. A model that already fits its inputs has small error terms, so
            its gradient pins a mixed batch down less and the prior must carry more (a briefly trained ReLU
            ConvNet, batch 4, with the fade: 21.6 -> 26.2 dB median on the crop sets it was chosen on; on
            held-out ones the median is level and the mean 25.1 -> 26.2 dB). 0 disables it.
    """

    max_iterations: int = 2000
    restarts: int = 1
    lr: float = 0.1
    tv_weight: float | None = None
    bounds: tuple[float, float] | None = (0.0, 1.0)
    signed: bool = True
    seed: int = 0
    init: str = "box"
    layer_weighting: str = "uniform"
    warmup: int = 0
    double: bool = False
    tv_confidence: float = 2.0
    tv_fade: tuple[float, float] | None = TV_FADE
    tv_fit_gain: float = TV_FIT_GAIN
    name: ClassVar[str] = "inverting-gradients"

    def __post_init__(self) -> None:
        for field_name in ("max_iterations", "restarts"):
            _check_positive_int(field_name, getattr(self, field_name))
        _check_positive_number("lr", self.lr)
        check_tv_weight(self.tv_weight)
        check_bounds(self.bounds)
        if not isinstance(self.seed, int):
            raise ConfigError("seed", self.seed, "must be an int")
        if self.init not in _INITS:
            raise ConfigError("init", self.init, f"must be one of {_INITS}")
        if self.init == "uniform" and self.bounds is None:
            raise ConfigError("init", self.init, "'uniform' needs bounds")
        if self.layer_weighting not in _LAYER_WEIGHTINGS:
            raise ConfigError("layer_weighting", self.layer_weighting, f"must be one of {_LAYER_WEIGHTINGS}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError("warmup", self.warmup, "must be an int >= 0")
        if not isinstance(self.double, bool):
            raise ConfigError("double", self.double, "must be a bool")
        positive("tv_confidence", self.tv_confidence, allow_zero=True, hint="0 gives every input the same TV weight")
        fade = self.tv_fade
        if fade is not None and not (
            isinstance(fade, tuple)
            and len(fade) == 2
            and all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in fade)
            and 0 <= fade[0] <= fade[1] <= 1
        ):
            raise ConfigError("tv_fade", fade, "must be None or a (start, end) pair of fractions with 0 <= start <= end <= 1")
        positive("tv_fit_gain", self.tv_fit_gain, allow_zero=True, hint="0 keeps the TV weight whatever the model's fit")

    def _reconstruct(self, model: torch.nn.Module, observation: Observation) -> Reconstruction:
        problem = MatchingProblem(model, observation)
        view = problem.view
        labels = recover_labels(model, observation, seed=self.seed).to(view.device)
        shape = (observation.num_samples, *observation.input_shape)
        generator = torch.Generator().manual_seed(self.seed)
        milestones = [int(self.max_iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        warmup = self.warmup

        def factor(step: int) -> float:
            # Linear warm-up to lr, then a tenfold drop at each milestone.
            ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
            return ramp * 0.1 ** sum(step >= m for m in milestones)

        weights = self._layer_weights(len(problem.target))
        tv_weight = self.tv_weight_for(model)
        if tv_weight > 0:
            tv_weight *= self.fit_factor(model, observation, labels)

        best_inputs: torch.Tensor | None = None
        best_objective = float("inf")
        for _ in range(self.restarts):
            candidate = self._start(shape, generator, view.dtype).to(view.device).requires_grad_(True)
            optimizer = torch.optim.Adam([candidate], lr=self.lr)
            schedule: torch.optim.lr_scheduler.LRScheduler = (
                torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
                if warmup > 0
                else torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
            )
            for step in range(self.max_iterations):
                optimizer.zero_grad(set_to_none=True)
                objective = self._objective(problem, candidate, labels, weights, tv_weight * self.tv_level(step))
                (grad,) = torch.autograd.grad(objective, [candidate])
                candidate.grad = grad.sign() if self.signed else grad
                optimizer.step()
                schedule.step()
                if self.bounds is not None:
                    with torch.no_grad():
                        candidate.clamp_(*self.bounds)
            # Judged as the run ended: with the prior released, by how well it matches the observation.
            final = float(self._objective(problem, candidate, labels, weights, tv_weight * self.tv_level(self.max_iterations)).detach())
            if final < best_objective or best_inputs is None:
                best_objective, best_inputs = final, candidate.detach().clone()
        assert best_inputs is not None  # restarts >= 1 is validated
        return Reconstruction(inputs=best_inputs, labels=labels.cpu(), attack=self.name, objective=best_objective)

    def tv_level(self, step: int) -> float:
        """The fraction of the TV weight in force at ``step`` of a restart (``tv_fade``)."""
        if self.tv_fade is None:
            return 1.0
        start, end = self.tv_fade
        progress = step / self.max_iterations
        if progress <= start:
            return 1.0
        if progress >= end:
            return 0.0
        return 1.0 - (progress - start) / (end - start)

    def fit_factor(self, model: torch.nn.Module, observation: Observation, labels: torch.Tensor) -> float:
        """The TV weight's multiplier for this batch, ``1 + tv_fit_gain * fit * (1 - 1/n)`` (1 for one input)."""
        n = observation.num_samples
        if n < 2 or self.tv_fit_gain == 0:
            return 1.0
        return 1.0 + self.tv_fit_gain * batch_fit(model, observation, labels) * (1.0 - 1.0 / n)

    def tv_weight_for(self, model: torch.nn.Module) -> float:
        """The total-variation weight used against ``model``: ``tv_weight`` if set, else chosen from the model.

        Through sigmoid or tanh networks the cosine's gradient with respect to the input is orders of
        magnitude smaller than through ReLU networks (median 5e-7 against 8e-4 per pixel at the random start,
        16x16 photographs), below the TV prior's 3e-5 at weight 1e-2; signed Adam keeps only the sign, so the
        prior alone steers most pixels and holds the image away from the solution. Without it, one photograph
        is recovered to float32 precision on a sigmoid ConvNet (docs/attacks.md, "Smooth models").
        """
        return choose_tv_weight(self.tv_weight, model)

    def _start(self, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        if self.init == "uniform":
            assert self.bounds is not None  # validated
            low, high = self.bounds
            return low + (high - low) * torch.rand(shape, generator=generator, dtype=dtype)
        start = torch.randn(shape, generator=generator, dtype=dtype)
        if self.bounds is None:
            return start
        low, high = self.bounds
        if self.init == "box":
            # Inside the box, around its middle, so projection does not flatten the first step.
            start = (low + high) / 2 + (high - low) / 4 * start
        return start.clamp(low, high)

    def _layer_weights(self, count: int) -> list[float] | None:
        if self.layer_weighting == "uniform":
            return None
        return [(count - i) / count for i in range(count)]

    def _objective(
        self,
        problem: MatchingProblem,
        candidate: torch.Tensor,
        labels: torch.Tensor,
        weights: list[float] | None = None,
        tv_weight: float = DEFAULT_TV_WEIGHT,
    ) -> torch.Tensor:
        simulated, target = problem.simulate(candidate, labels), problem.target
        if weights is None and not self.double:
            loss = cosine_distance(simulated, target)
        else:
            loss = _weighted_cosine_distance(simulated, target, weights, double=self.double).to(candidate.dtype)
        if tv_weight > 0:
            scales = self.tv_scales(problem, candidate, labels)
            if scales is None:
                loss = loss + tv_weight * total_variation(candidate)
            else:
                loss = loss + tv_weight * (scales * total_variation_per_input(candidate)).mean()
        return loss

    def tv_scales(
        self, problem: MatchingProblem, candidate: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor | None:
        """Per-input factors of the TV weight (see ``tv_confidence``), or ``None`` when all are 1.

        ``None`` for a single input, ``tv_confidence == 0``, inputs without two spatial dimensions (no TV),
        and models whose output is not ``(n, classes)`` logits. Computed without gradient: the factors are
        weights, not part of what is optimized.
        """
        if self.tv_confidence == 0 or candidate.shape[0] < 2 or candidate.ndim < 3:
            return None
        with torch.no_grad():
            logits = problem.view.logits(candidate.detach())
            if logits.ndim != 2 or logits.shape[0] != candidate.shape[0]:
                return None
            probs = torch.softmax(logits, dim=1)
            target = (
                torch.nn.functional.one_hot(labels, probs.shape[1]).to(probs.dtype)
                if labels.ndim == 1
                else labels.to(probs.dtype)
            )
            err = (probs - target).norm(dim=1)
            ratio = (err.max() / err.clamp_min(1e-12)).clamp(max=TV_CONFIDENCE_CAP)
            return ratio.pow(self.tv_confidence).to(candidate.dtype)
