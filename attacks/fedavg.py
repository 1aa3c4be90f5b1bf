"""FedAvg-update inversion: replay the client's local SGD steps differentiably and match the observed update.

A FedAvg client starts from the global parameters ``w_0``, takes ``K = local_steps`` plain SGD steps
``w_{k+1} = w_k - lr * grad L(w_k; x_{b_k}, y_{b_k})`` on the mini-batches ``b_k`` (its inputs in order,
``batch_size`` at a time, wrapping around) and sends ``delta = w_K - w_0``. The attacker (the
honest-but-curious server) knows ``w_0``, ``K``, ``lr``, ``batch_size`` and ``num_samples`` (it chose or is
told them) and, where known, the labels. It optimizes candidate inputs for all local steps jointly so that
the simulated update, computed by a functional unroll of the same K steps with ``create_graph=True``, points
the same way as the observed one (Geiping et al. 2020, Sec. 6; Dimitrov et al. 2022). One objective
evaluation costs K forward passes and K double backward passes.

Label counts for an unknown batch (`update_label_counts`): where every input was used equally often and
there are fewer inputs than classes, each input's label is first fitted to the classifier layer's part of
the averaged gradient ``-delta / (lr K)``, as for a one-step gradient (`labels.recover_labels`). Otherwise
they are read from the update of the classifier's bias (or weight row sums): averaged over the K steps,
``-delta_b / (lr K) = mean_k (mean_i p^(k)_i - n^(k) / B)``; the mean softmax along the trajectory is
estimated on probe inputs at K points between ``w_0`` and ``w_0 + delta``, the two ends the server holds
(Geng et al. 2021, FedAvg variant).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch.func import functional_call

from privfl._validate import positive
from privfl.errors import AttackError, ConfigError

from ._matching import total_variation
from ._model import ModelView, check_alignment
from .base import (
    AggregateObservation,
    Attack,
    GradientObservation,
    Observation,
    Reconstruction,
    UpdateObservation,
    _check_positive_int,
    _check_positive_number,
)
from .inverting import check_bounds, check_tv_weight, choose_tv_weight
from .labels import FIT_TOLERANCE, _fit_instances, noise_confidence, observed_mean_gradient

__all__ = ["TRAINED_CONFIDENCE", "FedAvgInversion", "LocalTraining", "as_update", "step_indices", "update_label_counts"]

TRAINED_CONFIDENCE = (0.1, 0.4)
"""``noise_confidence`` of a model from which `FedAvgInversion`'s prior starts to hold (below: it falls to the
model's weight, as on an untrained model) and at which it holds throughout. Photograph ConvNets at their
initialization read below 0.03, the one trained for 300 steps 0.50 (docs/attacks.md)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LocalTraining:
    """The client's local training as the attacker replays it.

    Attributes:
        num_samples: Inputs the client holds.
        local_steps: SGD steps taken.
        batch_size: Inputs per step.
        lr: Local learning rate.
    """

    num_samples: int
    local_steps: int
    batch_size: int
    lr: float

    def __post_init__(self) -> None:
        for name in ("num_samples", "local_steps", "batch_size"):
            _check_positive_int(name, getattr(self, name))
        if self.batch_size > self.num_samples:
            raise ConfigError("batch_size", self.batch_size, f"must be <= num_samples={self.num_samples}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (
            self.lr > 0 and math.isfinite(self.lr)
        ):
            raise ConfigError("lr", self.lr, "must be a finite float > 0")

    def batches(self) -> list[list[int]]:
        """Indices of the inputs each local step used (in order, ``batch_size`` at a time, wrapping around)."""
        return step_indices(self.num_samples, self.local_steps, self.batch_size)

    def uses(self) -> torch.Tensor:
        """How many local steps used each input, shape ``(num_samples,)``."""
        counts = torch.zeros(self.num_samples, dtype=torch.long)
        for batch in self.batches():
            for i in batch:
                counts[i] += 1
        return counts


def step_indices(num_samples: int, local_steps: int, batch_size: int) -> list[list[int]]:
    """Which inputs each local step takes: in order, ``batch_size`` at a time, wrapping around (FedAvg)."""
    return [[(k * batch_size + j) % num_samples for j in range(batch_size)] for k in range(local_steps)]


def as_update(observation: Observation) -> tuple[UpdateObservation, bool]:
    """Expresses a readable observation as a FedAvg update.

    A one-step mean-loss gradient ``g`` over ``n`` inputs is the update of one full-batch step at learning
    rate 1: ``delta = -g``. That lets one attack compare what gradients and updates leak at equal budgets.

    Args:
        observation: An ``UpdateObservation``, or a (DP, aggregate) gradient observation.

    Returns:
        The update, and whether it was converted from a gradient.

    Raises:
        AttackError: For anything without a plaintext gradient or update (e.g. a ciphertext).
    """
    if isinstance(observation, UpdateObservation):
        return observation, False
    if isinstance(observation, (GradientObservation, AggregateObservation)):
        gradients = observed_mean_gradient(observation)
        update = UpdateObservation(
            delta=tuple(-g for g in gradients),
            input_shape=observation.input_shape,
            num_samples=observation.num_samples,
            local_steps=1,
            lr=1.0,
            batch_size=observation.num_samples,
            labels=observation.labels,
        )
        return update, True
    raise AttackError(f"FedAvg inversion needs an update or a gradient, not a {type(observation).__name__}")


def _check_update(view: ModelView, observation: UpdateObservation) -> None:
    # The dataclass validated each field; here the fields must agree with each other and with the model.
    check_alignment(view, observation.delta)
    if observation.labels is not None and observation.labels.shape != (observation.num_samples,):
        raise ConfigError("labels", tuple(observation.labels.shape), f"must have shape ({observation.num_samples},)")
    if all(float(d.abs().max()) == 0.0 for d in observation.delta):
        raise AttackError("the update is all zeros: the client's data left no trace to invert")


# A per-input fit to an update of several steps is accepted below this misfit (FIT_TOLERANCE, 0.05, for one
# step, where the update is an exact gradient). Along K > 1 steps the inputs' features and softmax move, so
# a wrong fit can end lower. On photo crops (ReLU and sigmoid ConvNets, trained and untrained, 4 inputs, 12
# settings of 32 updates) 0.02 cost one exact count against the probe estimate (sigmoid, trained: 15 -> 14
# of 32) and 0.05 cost seven (15 -> 11 there, 28 -> 25 on the untrained ReLU model with 4 steps of 4).
STEPS_FIT_TOLERANCE = 0.02

# Half the L1 norm of the bias gradient averaged over the steps, about the mean over input uses of
# 1 - p_label (less where inputs' terms cancel). Below this the model already gave the client's labels most
# of their probability, the bias update is mostly the softmax of the client's own inputs, and the probe
# estimate of it is unreliable. On the same 384 photo-crop updates, 115 fell below 0.3 without a fit
# accepted; 92 of those estimates were wrong (of 152 wrong in all) and 23 right, 19 of them on sigmoid models.
MIN_LABEL_SIGNAL = 0.3

# The replay search (`_replay_labels`) is accepted when the K steps replayed on random stand-in inputs, with its
# labelling, reproduce the observed bias update to this cosine. On held-out photo crops (4 inputs, 4 steps of
# batch 2, lr 0.1, crop sets 8-39): sigmoid untrained 31 accepted, 28 right; ReLU untrained 19 accepted, 18
# right; trained models (whose features depend on the input, so stand-ins do not reproduce them) 0 accepted.
REPLAY_MIN_COSINE = 0.995
# Replays the search may run (each is K forward and backward passes of the model, no double backward).
REPLAY_MAX_EVALUATIONS = 1500


def update_label_counts(
    model: torch.nn.Module,
    observation: UpdateObservation,
    *,
    seed: int = 0,
    probes: int = 64,
    strict: bool = False,
    fit: bool = True,
) -> torch.Tensor:
    """Estimates how many of the client's inputs carry each label, from a FedAvg update.

    First, when every input was used by equally many steps and there are fewer inputs than classes, the
    update is read as one averaged gradient, ``-delta / (lr K)``, over ``num_samples`` inputs and each
    input's label is fitted to the classifier layer's part of it (``labels._fit_instances``, the fit
    ``recover_labels`` uses for one-step gradients), with the classifier at ``w_0 + (K - 1) / (2K) delta``,
    the mean of the points the K steps started from on the straight line to ``w_K``. The fit is used when
    its misfit is below ``FIT_TOLERANCE`` for one step (an exact gradient) and ``STEPS_FIT_TOLERANCE``
    for several.

    Otherwise the counts come from the classifier bias, which changes by
    ``delta_b = -lr * sum_k (mean_{i in b_k} p^(k)_i - n^(k) / B)`` over the K steps, where ``n^(k)``
    counts each label in step k's batch. Solving for ``sum_k n^(k)`` (label counts over all input *uses*)
    needs the mean softmax along the trajectory, estimated on random probe inputs at the parameters
    ``w_0 + (k / K) delta`` for ``k = 0..K-1`` (the server holds both ends). Dividing by how often each
    input was used (``K B / num_samples``, exact when every input was used equally often) gives counts
    per input. Close on untrained models; on a model that already predicts the client's inputs the bias
    barely moves and the counts rest on the softmax of those inputs, which random probes do not
    reproduce. That case is recognised by a small bias gradient (``MIN_LABEL_SIGNAL``).

    When the fit is not accepted and the steps' batches partition the inputs, a replay search comes before
    that estimate (``_replay_labels``): labellings are tried batch by batch, starting from the estimate, by
    replaying the K steps on random stand-in inputs; the best is used when it reproduces the observed bias
    update to a cosine of ``REPLAY_MIN_COSINE``. It reads the labels where the model's features hardly depend on the
    input but its steps move it far from the straight line, as in an untrained sigmoid ConvNet.

    Args:
        model: The global model the client started from; its last ``nn.Linear`` produces the logits.
        observation: The update.
        seed: Seed of the probe inputs, of the fit's random starts and of the replay search's stand-ins.
        probes: Number of probe inputs per point of the trajectory.
        strict: Raise instead of returning a probe estimate the update marks as unreliable.
        fit: Try the per-input fit and the replay search first (0.2-0.4 s and up to 3 s on one thread for a
            small ConvNet); False reads the counts from the bias alone (about 0.01 s).

    Returns:
        Integer counts, shape ``(num_classes,)``, summing to ``num_samples``.

    Raises:
        AttackError: If the model has no final ``nn.Linear`` or the update does not fit the model, or the
            estimate is not finite (the update is too far from the model for the linearization); with
            ``strict``, also when neither the fit nor the replay search was accepted and half the L1 norm of
            the averaged bias gradient is below ``MIN_LABEL_SIGNAL``.
    """
    view = ModelView(model)
    check_alignment(view, observation.delta)
    view.last_linear()  # raises AttackError when the model has no final nn.Linear
    generator = torch.Generator().manual_seed(seed)
    probe = torch.rand((probes, *observation.input_shape), generator=generator).to(view.device, view.dtype)
    k_steps = observation.local_steps
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]

    def at(frac: float) -> dict[str, torch.Tensor]:
        return {n: view.params[n] + frac * d.to(view.device, view.dtype)
                for n, d in zip(view.names, observation.delta, strict=True)}

    def read(point: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        features: list[torch.Tensor] = []
        handle = linear.register_forward_hook(lambda _m, inp, _out: features.append(inp[0].detach()))
        try:
            with torch.no_grad():
                probs = torch.softmax(view.logits(probe, point), dim=1)
        finally:
            handle.remove()
        return probs, features[0]

    mean_grad = observed_mean_gradient(observation)  # -delta / (lr K): the gradient averaged over the steps
    fitted = _fit_update(view, observation, mean_grad, read=read, at=at, seed=seed) if fit else None
    if fitted is not None:
        return fitted
    estimate, share = _bias_counts(view, observation, mean_grad, read=read, at=at)
    if fit:
        replayed = _replay_labels(view, observation, estimate, seed=seed)
        if replayed is not None:
            return replayed
    if strict and share is not None and share < MIN_LABEL_SIGNAL:
        raise AttackError(
            f"label counts cannot be read from this update: the averaged bias gradient's half L1 norm is "
            f"{share:.3f} (< {MIN_LABEL_SIGNAL}), so the model already gave the client's labels most of their "
            "probability and the counts would rest on the softmax of inputs the server does not have; neither "
            "the per-input fit nor the replay search matched"
        )
    return estimate


def _bias_counts(
    view: ModelView,
    observation: UpdateObservation,
    mean_grad: tuple[torch.Tensor, ...],
    *,
    read: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
    at: Callable[[float], dict[str, torch.Tensor]],
) -> tuple[torch.Tensor, float | None]:
    """Counts from the classifier bias's update and the probes' mean softmax along the line (see above).

    Also returns half the L1 norm of the averaged bias gradient (``None`` without a bias), the signal
    ``strict`` checks against ``MIN_LABEL_SIGNAL``.
    """
    w_idx, b_idx, num_classes = view.last_linear()
    k_steps = observation.local_steps
    probs, feature_sums = [], []
    for k in range(k_steps):
        # The parameters step k started from, approximated on the straight line from w_0 to w_K.
        step_probs, step_features = read(at(k / k_steps))
        probs.append(step_probs.mean(dim=0))
        feature_sums.append(step_features.sum(dim=1).mean())
    mean_prob = torch.stack(probs).mean(dim=0).double()
    if b_idx is not None:
        signal = mean_grad[b_idx].double()
    else:
        scale = torch.stack(feature_sums).mean().double()
        if not float(scale.abs()) > 1e-12:
            raise AttackError("label counts need a classifier bias or non-zero features; this model has neither")
        signal = mean_grad[w_idx].double().sum(dim=1) / scale
    if signal.shape != (num_classes,) or not torch.isfinite(signal).all():
        raise AttackError("label counts could not be estimated from this update (non-finite or misshapen signal)")
    share = 0.5 * float(signal.abs().sum()) if b_idx is not None else None
    per_step = observation.batch_size * (mean_prob.cpu() - signal.cpu())  # expected counts in one step's batch
    uses_per_input = k_steps * observation.batch_size / observation.num_samples
    estimate = per_step * k_steps / uses_per_input
    # A class whose averaged gradient is negative was certainly trained on.
    return _round_counts(estimate, observation.num_samples, present=signal.cpu() < 0), share


def _fit_update(
    view: ModelView,
    observation: UpdateObservation,
    mean_grad: tuple[torch.Tensor, ...],
    *,
    read: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
    at: Callable[[float], dict[str, torch.Tensor]],
    seed: int,
) -> torch.Tensor | None:
    """Counts from the per-input fit to the averaged gradient, or ``None`` where it does not apply or match."""
    w_idx, b_idx, num_classes = view.last_linear()
    k_steps, n = observation.local_steps, observation.num_samples
    if b_idx is None or (k_steps * observation.batch_size) % n != 0:
        return None  # no bias, or inputs used unequally often: the averaged gradient weighs them unequally
    point = at((k_steps - 1) / (2 * k_steps))
    _, features = read(point)
    if features.dim() != 2:
        return None
    names = view.names
    fitted = _fit_instances(point[names[w_idx]], point[names[b_idx]], mean_grad[w_idx], mean_grad[b_idx], n,
                            starts=features.cpu(), seed=seed)
    tolerance = FIT_TOLERANCE if k_steps == 1 else STEPS_FIT_TOLERANCE
    if fitted is None or not fitted[1] < tolerance:
        return None
    return torch.bincount(fitted[0], minlength=num_classes).cpu()


def _replay_labels(view: ModelView, observation: UpdateObservation, estimate: torch.Tensor, *, seed: int) -> torch.Tensor | None:
    """Counts from the labelling whose replay of the K local steps best matches the classifier bias's update.

    The steps are replayed on random stand-in inputs (the server does not have the client's), so this reads
    labels where the model's features hardly depend on the input, as in an untrained sigmoid ConvNet, whose
    steps move the classifier so far that the straight line from ``w_0`` to ``w_K`` (the bias estimate) no
    longer describes them. It searches labellings batch by batch: every multiset of ``batch_size`` labels for
    one batch's inputs with the others held, until no batch improves, from up to three placements of the bias
    estimate; the cosine between the replayed and the observed bias update ranks them. Accepted at
    ``REPLAY_MIN_COSINE``; ``None`` otherwise, or where the batches do not partition the inputs or the search
    would exceed ``REPLAY_MAX_EVALUATIONS`` replays.
    """
    _, b_idx, num_classes = view.last_linear()
    n, k_steps, b = observation.num_samples, observation.local_steps, observation.batch_size
    if b_idx is None or n % b != 0:
        return None
    blocks = n // b
    per_block = math.comb(num_classes + b - 1, b)  # label multisets of one batch
    sweeps = 1 if blocks == 1 else 4  # one block: a single sweep is already exhaustive
    if sweeps * blocks * per_block > REPLAY_MAX_EVALUATIONS:
        return None  # decided before listing them: with many classes the multisets alone would not fit
    generator = torch.Generator().manual_seed(seed)
    stand_in = torch.rand((n, *observation.input_shape), generator=generator).to(view.device, view.dtype)
    # Starts: the estimate's labels split into batches in up to three different ways (sorted, then shuffles).
    base = torch.repeat_interleave(torch.arange(num_classes), estimate)
    starts: list[tuple[int, ...]] = []
    for order in [base] + [base[torch.randperm(n, generator=generator)] for _ in range(30)]:
        start = tuple(int(v) for blk in order.split(b) for v in sorted(blk.tolist()))
        if start not in starts and len(starts) < 3:
            starts.append(start)
    while len(starts) * sweeps * blocks * per_block > REPLAY_MAX_EVALUATIONS:
        starts.pop()  # at least one start fits (checked above)
    combos = list(itertools.combinations_with_replacement(range(num_classes), b))
    training = LocalTraining(num_samples=n, local_steps=k_steps, batch_size=b, lr=observation.lr)
    replay = _Replay(view, training, observation, tv_weight=0.0)
    target = replay.target[b_idx].flatten()

    def score(labels: torch.Tensor) -> float:
        moved = replay.update(stand_in, labels, differentiable=False)[b_idx].flatten()
        return float(torch.nn.functional.cosine_similarity(moved, target, dim=0))

    best, found = -2.0, None
    for start in starts:
        current = torch.tensor(start, device=view.device)
        value = score(current)
        for _ in range(sweeps):
            improved = False
            for block in range(blocks):
                for combo in combos:
                    trial = current.clone()
                    trial[block * b:(block + 1) * b] = torch.tensor(combo, device=view.device)
                    trial_value = score(trial)
                    if trial_value > value + 1e-9:
                        value, current, improved = trial_value, trial, True
            if not improved:
                break
        if value > best:
            best, found = value, current
    if found is None or not best >= REPLAY_MIN_COSINE:
        return None
    return torch.bincount(found.cpu(), minlength=num_classes)


def _round_assignment(log_probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Hard labels with exactly ``counts`` of each class, maximizing the summed log-probabilities."""
    from scipy.optimize import linear_sum_assignment

    slots = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    cost = -log_probs[:, slots].detach().cpu().double().numpy()
    rows, cols = linear_sum_assignment(cost)
    labels = torch.empty(log_probs.shape[0], dtype=torch.long)
    labels[torch.as_tensor(rows)] = slots.cpu()[torch.as_tensor(cols)]
    return labels.to(counts.device)


def _round_counts(estimate: torch.Tensor, total: int, *, present: torch.Tensor) -> torch.Tensor:
    estimate = estimate.clamp_min(0.0)
    counts = torch.floor(estimate).long()
    counts = torch.where(present & (counts == 0), torch.ones_like(counts), counts)
    while int(counts.sum()) < total:
        counts[int(torch.argmax(estimate - counts.to(estimate)))] += 1
    while int(counts.sum()) > total:
        excess = counts.to(estimate) - estimate
        excess[counts <= 0] = -float("inf")
        counts[int(torch.argmax(excess))] -= 1
    return counts


@dataclass(frozen=True, kw_only=True, slots=True)
class FedAvgInversion(Attack):
    """Recovers a FedAvg client's inputs by replaying all its local steps and matching the update's direction.

    Minimizes ``1 - cos(delta(x), delta*) + tv_weight * TV(x)``, where ``delta(x)`` replays the client's
    ``local_steps`` SGD steps on the candidate inputs ``x`` (one candidate per client input; the steps share
    them exactly as the client's epochs did). A gradient observation is treated as one full-batch step, so
    the same attack measures gradients and updates at equal budgets.

    Optimization: Adam on the sign of the gradient, step size warmed up linearly over the first
    ``warmup`` fraction and then cosine-annealed to zero; candidates are projected into ``bounds``.
    On images the total-variation weight starts high (``tv_start``) and falls, cosine-shaped, to
    ``tv_weight`` over the first ``tv_anneal`` fraction of the iterations: a strong smoothness prior
    first keeps the candidates out of the high-contrast local minima where the chained replay
    otherwise stalls, and the weak one at the end lets fine detail through (docs/attacks.md, "Stalls
    of the faithful replay"). When every local step used all the site's inputs (full-batch local
    epochs), the first ``continuation`` fraction of iterations does not chain the steps: step k's
    gradient is taken at ``w_0 + (k / K) delta*``, on the straight line to the parameters the client
    sent back, which the server holds. That anchored problem is smoother (each term is a plain
    gradient, as in one-step inversion) and its solution is a good start for the faithful replay. When
    the steps used different batches, the trajectory zigzags between them and anchoring to the line
    measured worse than none, so it is skipped. The rest of the run, and the objective that ranks
    restarts, is always the faithful replay.

    Labels: those the observation carries, in order; otherwise counts from ``update_label_counts``. When
    the steps used distinct batches, which input carries which label changes the update (the label must
    sit in the right local step). Half the budget then searches that placement: three short runs each
    optimize one soft label per input jointly with throwaway inputs (soft totals held to the counts), round
    them to the counted multiset by an optimal assignment and try every swap of two positions, keeping
    those that lower the objective; the lowest objective wins. The other half recovers the inputs with that
    placement from a fresh start, rerunning the swap search (moving an input together with its label to
    another step) at 1/4, 1/2 and 3/4 of the way. Known labels, or more ``restarts``, make this surer.

    Attributes:
        max_iterations: Optimizer steps per restart; the cost is ``max_iterations * local_steps`` double
            backward passes.
        restarts: Random starts (and, with unknown labels, label assignment searches); the lowest final
            objective wins.
        lr: Peak Adam step size, in input units per step.
        tv_weight: Total-variation prior weight (images only) the run ends with. None (the default): 0
            for models with an ``nn.Sigmoid`` or ``nn.Tanh`` module, 1e-2 otherwise, as for Inverting
            Gradients (measured in docs/attacks.md, "Smooth models"), except on a model that classifies
            random inputs confidently (a trained one, :func:`~privfl.attacks.labels.noise_confidence`
            above ``TRAINED_CONFIDENCE[0]``): there the run ends nearer ``tv_start``, at it from
            ``TRAINED_CONFIDENCE[1]`` on (the prior then holds throughout; see :meth:`final_tv_weight`).
        tv_start: Total-variation weight at the first iteration (images only); it falls to ``tv_weight``
            over the first ``tv_anneal`` fraction. A start below ``tv_weight`` means no annealing.
        tv_anneal: Fraction of iterations over which the weight falls from ``tv_start`` to
            ``tv_weight`` (0: ``tv_weight`` throughout, the behaviour before annealing). 0.75 measured
            better than or level with 0.5 on every held-out FedAvg case, and 0.9 worse on the sigmoid
            model (docs/attacks.md, "The length of the prior's fall").
        warmup: Fraction of iterations over which the step size warms up.
        continuation: Fraction of iterations that match the anchored (unchained) replay first, when every
            local step used all the inputs and there were two or more steps (0 disables).
        bounds: ``(low, high)`` box for the inputs, or ``None``.
        signed: Use the sign of the gradient (as Inverting Gradients does).
        seed: Seed of the random starts, probes and label assignments.
    """

    max_iterations: int = 1000
    restarts: int = 1
    lr: float = 0.1
    tv_weight: float | None = None
    tv_start: float = 0.2
    tv_anneal: float = 0.75
    warmup: float = 0.05
    continuation: float = 0.5
    bounds: tuple[float, float] | None = (0.0, 1.0)
    signed: bool = True
    seed: int = 0
    name: ClassVar[str] = "fedavg-inversion"

    def __post_init__(self) -> None:
        for field_name in ("max_iterations", "restarts"):
            _check_positive_int(field_name, getattr(self, field_name))
        _check_positive_number("lr", self.lr)
        check_tv_weight(self.tv_weight)
        positive("tv_start", self.tv_start, allow_zero=True)
        for field_name in ("warmup", "continuation", "tv_anneal"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(field_name, value, "must be a fraction in [0, 1)")
        check_bounds(self.bounds)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError("seed", self.seed, "must be an int")

    def _reconstruct(self, model: torch.nn.Module, observation: Observation) -> Reconstruction:
        update, _ = as_update(observation)
        view = ModelView(model)
        _check_update(view, update)
        training = LocalTraining(
            num_samples=update.num_samples,
            local_steps=update.local_steps,
            batch_size=update.batch_size,
            lr=update.lr,
        )
        replay = _Replay(view, training, update, tv_weight=self.final_tv_weight(model, update.input_shape))
        generator = torch.Generator().manual_seed(self.seed)
        counts: torch.Tensor | None = None
        if update.labels is None:
            counts = update_label_counts(model, update, seed=self.seed).to(view.device)
            if training.local_steps == 1 or training.batch_size == training.num_samples:
                # Every step saw every input: which input carries which label does not change the update.
                labels = torch.repeat_interleave(torch.arange(counts.numel(), device=view.device), counts)
                counts = None
            else:
                labels = None
        else:
            labels = update.labels.to(view.device)

        shape = (update.num_samples, *update.input_shape)
        best: tuple[float, torch.Tensor, torch.Tensor] | None = None
        for _ in range(self.restarts):
            start = torch.randn(shape, generator=generator, dtype=view.dtype)
            if self.bounds is not None:
                low, high = self.bounds
                start = ((low + high) / 2 + (high - low) / 4 * start).clamp(low, high)
            start = start.to(view.device)
            found = labels
            iterations = self.max_iterations
            if found is None:
                assert counts is not None
                # Half the budget searches the assignment (LABEL_SEARCHES short tries, the best by objective),
                # half recovers the inputs with it.
                search = max(1, self.max_iterations // (2 * LABEL_SEARCHES))
                tries = []
                for _ in range(LABEL_SEARCHES):
                    init_logits = torch.randn((update.num_samples, counts.numel()), generator=generator,
                                              dtype=view.dtype).to(view.device)
                    tries.append(self._assign_labels(replay, start, counts, init_logits, search))
                found = min(tries, key=lambda t: t[0])[1]
                iterations = max(1, self.max_iterations - LABEL_SEARCHES * search)
            inputs, found = self._optimize(replay, start, found, iterations, swaps=labels is None)
            final = float(self._objective(replay, inputs, found).detach())
            if best is None or final < best[0]:
                best = (final, inputs, found)
        assert best is not None  # restarts >= 1 is validated
        objective, inputs, found = best
        note = "" if update.labels is not None else "labels: counts estimated from the update"
        if counts is not None:
            note += "; which input carries which label optimized jointly with the inputs"
        return Reconstruction(inputs=inputs.cpu(), labels=found.cpu(), attack=self.name, objective=objective,
                              note=note)

    def _assign_labels(
        self, replay: _Replay, start: torch.Tensor, counts: torch.Tensor, init_logits: torch.Tensor, iterations: int
    ) -> tuple[float, torch.Tensor]:
        # With unknown labels over several distinct batches, which input (hence which step) carries which
        # label changes the update. Each input gets a soft label, a softmax over the classes the counts say
        # are present, optimized jointly with the inputs on the faithful replay while the soft totals are
        # held to the counts; the soft labels are then rounded to the counted multiset by an optimal
        # assignment and improved by swaps. Only the labels and the objective are kept.
        candidate = start.clone().requires_grad_(True)
        soft = init_logits.to(start.device).requires_grad_(True)
        mask = torch.where(counts > 0, 0.0, -1e4).to(start)
        optimizer = torch.optim.Adam([candidate], lr=self.lr)
        label_optimizer = torch.optim.Adam([soft], lr=0.1)
        for it in range(iterations):
            for group in optimizer.param_groups:
                group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * it / iterations))
            targets = torch.softmax(soft + mask, dim=1)
            objective = self._objective(replay, candidate, targets, tv=self._tv_at(replay, it, iterations))
            objective = objective + ((targets.sum(dim=0) - counts) ** 2).sum() / targets.shape[0]
            grad, soft.grad = torch.autograd.grad(objective, [candidate, soft])
            candidate.grad = grad.sign() if self.signed else grad
            optimizer.step()
            label_optimizer.step()
            if self.bounds is not None:
                with torch.no_grad():
                    candidate.clamp_(*self.bounds)
        labels = _round_assignment(torch.log_softmax(soft.detach() + mask, dim=1), counts)
        best, order = self._improve_by_swaps(replay, candidate.detach(), labels)
        return best, labels[order]

    def _improve_by_swaps(
        self, replay: _Replay, inputs: torch.Tensor, labels: torch.Tensor
    ) -> tuple[float, torch.Tensor]:
        # Rounding, or an early wrong guess, can put an (input, label) pair into the wrong local step. Moving
        # a pair to another step is a swap of two positions; every swap of two positions with different labels
        # that lowers the objective (evaluations only, no backward pass) is kept.
        order = torch.arange(len(labels), device=labels.device)
        best = float(replay.cosine_distance(inputs, labels).detach())
        for _ in range(3):
            improved = False
            for i in range(len(labels)):
                for j in range(i + 1, len(labels)):
                    if labels[order[i]] == labels[order[j]]:
                        continue
                    trial = order.clone()
                    trial[i], trial[j] = order[j], order[i]
                    value = float(replay.cosine_distance(inputs[trial], labels[trial]).detach())
                    if value < best:
                        best, order, improved = value, trial, True
            if not improved:
                break
        return best, order

    def _optimize(
        self, replay: _Replay, start: torch.Tensor, labels: torch.Tensor, iterations: int, *, swaps: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        candidate = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([candidate], lr=self.lr)
        total = iterations
        warm = int(total * self.warmup)
        # The straight line from w_0 to w_K is a good stand-in for the trajectory when every step used all the
        # site's inputs (full-batch epochs); when the steps used different batches, the path zigzags between
        # them and anchoring to the line measured worse than no anchoring (docs/attacks.md), so it is skipped.
        training = replay.training
        full_batch = training.local_steps >= 2 and training.batch_size == training.num_samples
        cont = int(total * self.continuation) if full_batch else 0
        # Estimated labels over distinct batches: the swap search reruns as the inputs sharpen.
        checks = {total // 4, total // 2, 3 * total // 4} if swaps else set()
        for it in range(total):
            if it in checks and it > 0:
                _, order = self._improve_by_swaps(replay, candidate.detach(), labels)
                if not torch.equal(order, torch.arange(len(order), device=order.device)):
                    labels = labels[order]
                    with torch.no_grad():
                        candidate.copy_(candidate[order])
                        for state in optimizer.state.values():
                            for key in ("exp_avg", "exp_avg_sq"):
                                state[key].copy_(state[key][order])
            if it < warm:
                step = self.lr * (it + 1) / warm
            else:
                step = self.lr * 0.5 * (1 + math.cos(math.pi * (it - warm) / max(1, total - warm)))
            for group in optimizer.param_groups:
                group["lr"] = step
            optimizer.zero_grad(set_to_none=True)
            objective = self._objective(replay, candidate, labels, anchored=it < cont, tv=self._tv_at(replay, it, total))
            (grad,) = torch.autograd.grad(objective, [candidate])
            candidate.grad = grad.sign() if self.signed else grad
            optimizer.step()
            if self.bounds is not None:
                with torch.no_grad():
                    candidate.clamp_(*self.bounds)
        return candidate.detach(), labels

    def _objective(self, replay: _Replay, candidate: torch.Tensor, labels: torch.Tensor, *,
                   anchored: bool = False, tv: float | None = None) -> torch.Tensor:
        """Cosine distance of the replayed update plus the TV prior (``tv``: its weight now, else the final one)."""
        loss = replay.cosine_distance(candidate, labels, anchored=anchored)
        weight = replay.tv_weight if tv is None else tv
        if weight > 0:
            loss = loss + weight * total_variation(candidate)
        return loss

    def _tv_at(self, replay: _Replay, iteration: int, total: int) -> float:
        """The TV weight at ``iteration`` of ``total``: ``tv_start`` falling (cosine) to the final weight."""
        final = replay.tv_weight
        span = self.tv_anneal * total
        if span <= 0 or self.tv_start <= final:
            return final
        frac = min(1.0, iteration / span)
        return final + (self.tv_start - final) * 0.5 * (1 + math.cos(math.pi * frac))

    def tv_weight_for(self, model: torch.nn.Module) -> float:
        """The total-variation weight used against ``model`` (see ``tv_weight``)."""
        return choose_tv_weight(self.tv_weight, model)

    def final_tv_weight(self, model: torch.nn.Module, input_shape: tuple[int, ...]) -> float:
        """The TV weight the run ends with: ``tv_weight`` when set; else the model's weight, raised towards
        ``tv_start`` on a trained model.

        On a model trained for a few hundred steps the replay stalls near chance from most starts, and a prior
        that stays strong is what lifts it (docs/attacks.md, "The prior on trained models' FedAvg updates").
        Trained or not is read from the model alone: ``h = (c - low) / (high - low)`` clipped to [0, 1], with
        ``c`` its :func:`~privfl.attacks.labels.noise_confidence` and ``(low, high) = TRAINED_CONFIDENCE``; the
        weight is ``base + h * (tv_start - base)``. Untrained models (``c`` below ``low``) keep ``base``
        exactly; smooth models keep 0 (their prior is what holds them back).
        """
        base = self.tv_weight_for(model)
        if self.tv_weight is not None or base == 0 or self.tv_start <= base or len(input_shape) < 2:
            return base
        low, high = TRAINED_CONFIDENCE
        confidence = noise_confidence(model, input_shape, bounds=self.bounds, seed=self.seed)
        hold = min(1.0, max(0.0, (confidence - low) / (high - low)))
        return base + hold * (self.tv_start - base)


LABEL_SEARCHES = 3  # label-assignment tries per restart, unknown labels over distinct batches only


class _Replay:
    """The client's local training, replayed functionally on candidate inputs and compared with the update."""

    def __init__(self, view: ModelView, training: LocalTraining, update: UpdateObservation, *, tv_weight: float) -> None:
        self.view = view
        self.tv_weight = tv_weight
        self.training = training
        self.batches = [torch.tensor(b, device=view.device) for b in training.batches()]
        self.target = [d.to(view.device, view.dtype) for d in update.delta]
        self.target_norm = torch.sqrt(cast(torch.Tensor, sum((t * t).sum() for t in self.target)))

    def update(self, inputs: torch.Tensor, labels: torch.Tensor, *, anchored: bool = False,
               differentiable: bool = True) -> list[torch.Tensor]:
        """The simulated ``w_K - w_0`` on ``inputs``, differentiable with respect to them.

        Faithful: the K SGD steps chained, each at the parameters the previous one produced (K forward and
        K double backward passes). Anchored: step k's gradient at ``w_0 + (k / K) delta*`` instead.
        ``differentiable=False`` (faithful only): the same steps without the double-backward graph, for
        evaluations alone (K forward and K backward passes).
        """
        view = self.view
        names = view.names
        lr = self.training.lr
        params = {n: view.params[n].detach().requires_grad_(True) for n in names}
        start = dict(params)
        if anchored:
            # Each step's gradient at the point the straight line from w_0 to the observed w_K puts it at.
            total = [torch.zeros_like(params[n]) for n in names]
            for k, batch in enumerate(self.batches):
                frac = k / len(self.batches)
                point = {n: (view.params[n] + frac * t).detach().requires_grad_(True)
                         for n, t in zip(names, self.target, strict=True)}
                state = dict(point)
                state.update({b: v.clone() for b, v in view.buffers.items()})
                logits = functional_call(view.model, state, (inputs[batch],))
                loss = torch.nn.functional.cross_entropy(logits, labels[batch])
                grads = torch.autograd.grad(loss, [point[n] for n in names], create_graph=True, allow_unused=True)
                total = [t if g is None else t - lr * g for t, g in zip(total, grads, strict=True)]
            return total
        for batch in self.batches:
            if not differentiable:
                params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
            state = dict(params)
            state.update({k: v.clone() for k, v in view.buffers.items()})
            logits = functional_call(view.model, state, (inputs[batch],))
            loss = torch.nn.functional.cross_entropy(logits, labels[batch])
            grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=differentiable,
                                        allow_unused=True)
            params = {n: params[n] if g is None else params[n] - lr * g for n, g in zip(names, grads, strict=True)}
        moved = [params[n] - start[n] for n in names]
        return moved if differentiable else [m.detach() for m in moved]

    def cosine_distance(self, inputs: torch.Tensor, labels: torch.Tensor, *, anchored: bool = False) -> torch.Tensor:
        """``1 - cos(simulated update, observed update)`` over all parameters concatenated."""
        simulated = self.update(inputs, labels, anchored=anchored)
        dot = sum((s * t).sum() for s, t in zip(simulated, self.target, strict=True))
        norm = torch.sqrt(cast(torch.Tensor, sum((s * s).sum() for s in simulated)))
        return 1.0 - dot / (norm * self.target_norm).clamp_min(1e-20)
