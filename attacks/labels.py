"""Label recovery from the classifier layer's gradient: iDLG for one sample, label counts for a batch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from privfl.errors import AttackError

from ._model import ModelView, check_alignment
from .base import (
    AggregateObservation,
    Attack,
    CiphertextObservation,
    GradientObservation,
    Observation,
    Reconstruction,
    UpdateObservation,
)

__all__ = ["LabelRecovery", "batch_fit", "label_counts", "noise_confidence", "observed_mean_gradient", "recover_labels"]


def observed_mean_gradient(observation: Observation) -> tuple[torch.Tensor, ...]:
    """The observation expressed as a mean-loss gradient, the quantity label recovery reads.

    For a FedAvg update this is ``-delta / (lr * local_steps)``, the average gradient along the client's
    trajectory; it equals the gradient exactly for one full-batch step and approximates it otherwise.

    Args:
        observation: A readable observation.

    Returns:
        One tensor per model parameter.

    Raises:
        AttackError: For a ciphertext or an unknown observation type.
    """
    if isinstance(observation, AggregateObservation):
        return observation.mean_gradients()
    if isinstance(observation, GradientObservation):  # includes DPGradientObservation
        return observation.gradients
    if isinstance(observation, UpdateObservation):
        scale = -1.0 / (observation.lr * observation.local_steps)
        return tuple(d * scale for d in observation.delta)
    if isinstance(observation, CiphertextObservation):
        raise AttackError("a ciphertext reveals no gradient: there is nothing to recover labels from")
    raise AttackError(f"no gradient in a {type(observation).__name__}")


def batch_fit(model: torch.nn.Module, observation: Observation, labels: torch.Tensor) -> float:
    """How well the model already predicts the observed batch: 0 for uniform predictions, 1 for the labels.

    With mean softmax cross-entropy the classifier bias gradient is ``mean_i p_i - mean_i e_{y_i}``, so the
    batch's mean prediction ``p = g_b + y`` is read exactly off the observation once the labels are known
    (``y`` is the labels' mean one-hot). The fit is ``|p - u| / |y - u|`` against the uniform prediction
    ``u``, clipped to [0, 1]: an untrained model sits near 0 (0.01 to 0.07 on the photograph crops of
    docs/attacks.md), one trained for 300 steps at 0.36 to 0.82 (crop sets 0 to 15). A noised observation (DP-SGD) reads
    its noise as fit.

    Args:
        model: The model; its last ``nn.Linear`` must produce the logits.
        observation: A readable observation.
        labels: The batch's labels, integer ``(n,)`` or soft ``(n, classes)``.

    Returns:
        The fit, or 0.0 when it cannot be read (no classifier bias, a ciphertext, shapes that do not line up).
    """
    try:
        view = ModelView(model)
        gradients = observed_mean_gradient(observation)
        check_alignment(view, gradients)
        _, b_idx, classes = view.last_linear()
    except AttackError:
        return 0.0
    if b_idx is None:
        return 0.0
    bias_grad = gradients[b_idx].detach().to(torch.float64).cpu().reshape(-1)
    labels = labels.detach().cpu()
    if labels.ndim == 1:
        if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= classes:
            return 0.0
        target = torch.nn.functional.one_hot(labels.long(), classes).to(torch.float64).mean(0)
    elif labels.ndim == 2 and labels.shape[1] == classes:
        target = labels.to(torch.float64).mean(0)
    else:
        return 0.0
    if bias_grad.numel() != classes:
        return 0.0
    uniform = torch.full((classes,), 1.0 / classes, dtype=torch.float64)
    spread = float((target - uniform).norm())
    fit = float((bias_grad + target - uniform).norm()) / spread if spread > 0 else 0.0
    return min(1.0, fit) if fit == fit else 0.0  # NaN (a non-finite observation) reads as no fit


def noise_confidence(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    *,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    probes: int = 64,
    seed: int = 0,
) -> float:
    """How confidently the model classifies random inputs: 0 for uniform outputs, 1 for one-hot ones.

    ``1 - H / log C``, with ``H`` the mean entropy of the softmax over ``probes`` random inputs (uniform in
    ``bounds``, standard normal without), ``C`` the number of classes. A model at its random initialization
    answers noise almost uniformly (below 0.03 on the photograph ConvNets of docs/attacks.md, ReLU and
    sigmoid, 16x16 and 32x32); one trained for 300 steps on photographs, 0.50. It reads nothing of the
    observation, only the model, which the server sent. Its own generator: the caller's random stream is
    untouched.

    Returns:
        The confidence in [0, 1]; 0.0 for a model whose output is not ``(n, classes)`` logits with C >= 2.
    """
    view = ModelView(model)
    generator = torch.Generator().manual_seed(seed)
    if bounds is None:
        inputs = torch.randn((probes, *input_shape), generator=generator)
    else:
        low, high = bounds
        inputs = low + (high - low) * torch.rand((probes, *input_shape), generator=generator)
    with torch.no_grad():
        logits = view.logits(inputs.to(view.device, view.dtype))
    if logits.ndim != 2 or logits.shape[0] != probes or logits.shape[1] < 2:
        return 0.0
    log_probs = torch.log_softmax(logits.to(torch.float64), dim=1)
    entropy = float(-(log_probs.exp() * log_probs).sum(dim=1).mean())
    confidence = 1.0 - entropy / math.log(logits.shape[1])
    return min(1.0, max(0.0, confidence)) if math.isfinite(confidence) else 0.0


def _single_label(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> int:
    # iDLG (Zhao et al. 2020): with softmax cross-entropy, dL/dz_c = p_c - y_c is negative only for the
    # true class. The bias gradient is dL/dz itself; the weight gradient's row c is (p_c - y_c) * h, so its
    # row sums carry the same signs times sum(h) (positive after a ReLU; if not, the odd sign out wins).
    if bias_grad is not None:
        return int(torch.argmin(bias_grad).item())
    sums = weight_grad.sum(dim=1)
    negative = (sums < 0).nonzero().flatten()
    positive = (sums > 0).nonzero().flatten()
    if negative.numel() == 1:
        return int(negative.item())
    if positive.numel() == 1:
        return int(positive.item())
    return int(torch.argmin(sums).item())


# A per-input fit is accepted when its misfit (summed over the inputs) is below this; otherwise the counts come
# from the probe estimate. Measured on photo crops: fits that found the labels ended between 1e-13 and 3e-2,
# failed ones at 0.2 and above (0.5 and above on untrained sigmoid models, where the probe estimate is right).
FIT_TOLERANCE = 0.05


def _fit_instances(
    weight: torch.Tensor,
    bias: torch.Tensor,
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor,
    num_samples: int,
    *,
    starts: torch.Tensor,
    seed: int,
    steps: int = 400,
) -> tuple[torch.Tensor, float] | None:
    """Labels of each input of a batch, fitted to the classifier layer's gradient; ``None`` if it cannot apply.

    For a linear classifier ``z = W h + b`` and mean cross-entropy over B inputs, the gradient of ``[W, b]``
    is ``(1/B) sum_i g_i [h_i, 1]^T`` with ``g_i = p_i - e_{y_i}`` and ``p_i = softmax(W h_i + b)``: rank B
    while ``B < C``. Its top-B right singular vectors ``V`` span the ``[h_i, 1]``, so each input is ``B``
    coordinates ``c_i`` (``[h_i, 1] = V c_i``, the last entry pinning the scale), and ``B [dW, db] V = G^T C``
    then gives every ``g_i`` from the coordinates. The coordinates are right when every ``p_i - g_i`` is
    one-hot: that is the label. The search minimizes ``sum_i min_c |p_i - g_i - e_c|^2`` over the
    coordinates (Adam, float64), from many starts at once: the probe inputs' features projected on the span
    and random points. This reads the softmax on the client's own inputs, where the probe estimate reads
    it on random ones, which a trained model treats differently (the instance-wise idea of Ma et al. 2023).

    Args:
        weight, bias: The classifier's parameters, ``(C, d)`` and ``(C,)``.
        weight_grad, bias_grad: Their mean-loss gradients.
        num_samples: Batch size B, ``2 <= B < C``.
        starts: Features of probe inputs, ``(n, d)``; every B of them make one start.
        seed: Seed of the random starts.
        steps: Adam steps.

    Returns:
        Labels ``(B,)`` and the misfit of the best start, or ``None`` for a batch the fit cannot express.
    """
    b_count, classes = num_samples, weight.shape[0]
    if not 2 <= b_count < classes:
        return None
    dtype = torch.float64
    observed = torch.cat([weight_grad.detach().cpu().to(dtype), bias_grad.detach().cpu().to(dtype)[:, None]], dim=1) * b_count
    if not torch.isfinite(observed).all() or float(observed.abs().max()) == 0.0:
        return None
    u, s, vh = torch.linalg.svd(observed, full_matrices=False)
    span = vh[:b_count].T  # (d + 1, B)
    us = u[:, :b_count] * s[:b_count]  # (C, B) = G^T C
    logit_map = torch.cat([weight.detach().cpu().to(dtype), bias.detach().cpu().to(dtype)[:, None]], dim=1) @ span  # logits = logit_map c
    last = span[-1]  # c . last = 1: the constant feature of the bias
    if not float(last.norm()) > 0.0:
        return None
    anchor = last / last.dot(last)
    q, _ = torch.linalg.qr(torch.cat([last[:, None], torch.eye(b_count, dtype=dtype)], dim=1))
    free = q[:, 1:b_count]  # (B, B - 1): directions that keep the constraint
    scale = float(anchor.norm())
    generator = torch.Generator().manual_seed(seed)
    projected = torch.cat([starts.to(dtype), torch.ones(len(starts), 1, dtype=dtype)], dim=1) @ span
    projected = projected + (1.0 - projected @ last)[:, None] * anchor
    from_probe = ((projected - anchor) @ free)[: (len(starts) // b_count) * b_count].reshape(-1, b_count, b_count - 1)
    random = torch.randn((max(3 * len(from_probe), 16), b_count, b_count - 1), generator=generator, dtype=dtype) * scale
    offsets = torch.cat([from_probe, random]).requires_grad_(True)
    num_starts = len(offsets)

    def misfit(offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        coords = anchor + offsets @ free.T  # (S, B, B)
        probs = torch.softmax(coords @ logit_map.T, dim=-1)  # (S, B, C)
        # G^T C = us, so C^T G = us^T: one solve per start gives every g_i.
        g = torch.linalg.solve(coords.transpose(1, 2), us.T.expand(num_starts, b_count, classes))
        targets = probs - g  # (S, B, C): one-hot where the coordinates are right
        per_input = (targets**2).sum(-1) - 2 * targets.max(-1).values + 1
        return torch.nan_to_num(per_input.sum(-1), nan=1e6, posinf=1e6), targets

    optimizer = torch.optim.Adam([offsets], lr=0.05 * scale)
    for step in range(steps):
        optimizer.zero_grad()
        loss = misfit(offsets)[0]
        if step % 50 == 49 and float(loss.detach().min()) < 1e-8:
            break  # one start already explains the gradient: its labels will not change
        loss.sum().backward()
        optimizer.step()
    with torch.no_grad():
        loss, targets = misfit(offsets)
        best = int(torch.argmin(loss))
        return targets[best].argmax(-1), float(loss[best])


def label_counts(
    view: ModelView,
    gradients: tuple[torch.Tensor, ...],
    num_samples: int,
    *,
    probe: torch.Tensor,
    seed: int = 0,
) -> torch.Tensor:
    """Estimates how many of the ``num_samples`` inputs carry each label.

    With a classifier bias and fewer inputs than classes, the labels of the inputs are first fitted one by
    one to the classifier layer's gradient (see ``_fit_instances``); the fit is used when its misfit is
    below ``FIT_TOLERANCE``. Otherwise, and for larger batches or no bias: with mean cross-entropy over B
    inputs the classifier bias gradient is ``g_c = mean_i p_ic - n_c / B``, so ``n_c = B * (mean_i p_ic -
    g_c)``. The mean softmax is unknown; it is estimated on ``probe`` inputs (Geng et al. 2021's zero-shot
    estimate), which is close for an untrained or little-trained model and not for a trained one. Without a
    bias the row sums of the weight gradient are used, divided by the mean feature sum on the probe. Any
    class with ``g_c < 0`` is certainly present and gets at least one.

    Args:
        view: The model.
        gradients: Mean-loss gradient, one tensor per parameter.
        num_samples: Batch size B.
        probe: Inputs used to estimate the mean softmax and feature magnitude, and to start the fit.
        seed: Seed of the fit's random starts.

    Returns:
        Integer counts, shape ``(num_classes,)``, summing to ``num_samples``.
    """
    w_idx, b_idx, num_classes = view.last_linear()
    with torch.no_grad():
        features: list[torch.Tensor] = []
        linear = [m for m in view.model.modules() if isinstance(m, torch.nn.Linear)][-1]
        handle = linear.register_forward_hook(lambda _m, inp, _out: features.append(inp[0].detach()))
        try:
            probs = torch.softmax(view.logits(probe), dim=1).mean(dim=0)
        finally:
            handle.remove()
    if b_idx is not None and features[0].dim() == 2:
        params = view.parameters()
        fitted = _fit_instances(params[w_idx], params[b_idx], gradients[w_idx], gradients[b_idx], num_samples,
                                starts=features[0].cpu(), seed=seed)
        if fitted is not None and fitted[1] < FIT_TOLERANCE:
            return torch.bincount(fitted[0], minlength=num_classes).to(gradients[b_idx].device)
    if b_idx is not None:
        signal = gradients[b_idx].to(probs)
    else:
        feature_sum = features[0].sum(dim=1).mean().clamp_min(1e-12)
        signal = gradients[w_idx].to(probs).sum(dim=1) / feature_sum
    estimate = (num_samples * (probs - signal)).clamp_min(0.0)
    present = signal < 0
    counts = torch.floor(estimate).long()
    counts = torch.where(present & (counts == 0), torch.ones_like(counts), counts)
    # Largest-remainder rounding to make the counts sum to B, then trim the largest if we overshot.
    while int(counts.sum()) < num_samples:
        remainder = estimate - counts.to(estimate)
        counts[int(torch.argmax(remainder))] += 1
    while int(counts.sum()) > num_samples:
        excess = counts.to(estimate) - estimate
        excess[counts <= present.long()] = -float("inf")
        counts[int(torch.argmax(excess))] -= 1
    if counts.numel() != num_classes:
        raise AttackError(f"classifier has {num_classes} outputs but the gradient gives {counts.numel()}")
    return counts


def recover_labels(
    model: torch.nn.Module,
    observation: Observation,
    *,
    seed: int = 0,
) -> torch.Tensor:
    """Recovers the labels behind an observation from the gradient of the model's last linear layer.

    One sample: iDLG, exact for softmax cross-entropy. Several samples: per-class counts (see
    ``label_counts``), returned sorted by class, since the order of inputs in a batch is not observable.
    Labels the observation already carries are returned as they are.

    Args:
        model: The model; its last ``nn.Linear`` must produce the logits.
        observation: A readable observation.
        seed: Seed for the random probe inputs of the batch estimate.

    Returns:
        Integer labels, shape ``(num_samples,)``.

    Raises:
        AttackError: For a ciphertext, a model without a final ``nn.Linear``, or a gradient that does not
            line up with the model's parameters.
    """
    known = getattr(observation, "labels", None)
    if known is not None:
        return known.clone()
    view = ModelView(model)
    gradients = observed_mean_gradient(observation)
    check_alignment(view, gradients)
    w_idx, b_idx, _ = view.last_linear()
    n = observation.num_samples
    if n == 1:
        label = _single_label(gradients[w_idx], None if b_idx is None else gradients[b_idx])
        return torch.tensor([label], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    probe = torch.rand((64, *observation.input_shape), generator=generator).to(view.device, view.dtype)
    counts = label_counts(view, gradients, n, probe=probe, seed=seed)
    return torch.repeat_interleave(torch.arange(counts.numel()), counts.cpu())


@dataclass(frozen=True, kw_only=True, slots=True)
class LabelRecovery(Attack):
    """Label recovery as an :class:`Attack`: the labels behind an observation, and no inputs.

    A one-step gradient (plaintext, DP-SGD or an aggregate) goes to :func:`recover_labels`; a FedAvg update
    to :func:`~privfl.attacks.fedavg.update_label_counts`, which follows the client's local steps instead of
    reading the update as one gradient. Labels of a batch are returned sorted by class (their order is not
    observable). Labels the observation already carries are returned as they are. The returned
    ``inputs`` are NaN: this attack recovers labels only, so score it on ``labels``.

    Attributes:
        seed: Seed of the random probe inputs of the batch estimates.
    """

    seed: int = 0
    name: ClassVar[str] = "labels"

    def _reconstruct(self, model: torch.nn.Module, observation: Observation) -> Reconstruction:
        if isinstance(observation, UpdateObservation) and observation.labels is None:
            from .fedavg import update_label_counts  # fedavg builds on this module

            counts = update_label_counts(model, observation, seed=self.seed)
            labels = torch.repeat_interleave(torch.arange(counts.numel()), counts.cpu())
        else:
            labels = recover_labels(model, observation, seed=self.seed).cpu()
        n = observation.num_samples
        return Reconstruction(
            inputs=torch.full((n, *observation.input_shape), float("nan")),
            labels=labels.long(),
            attack=self.name,
            note="labels only",
        )
