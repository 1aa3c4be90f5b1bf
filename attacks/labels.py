"""Label recovery from the classifier layer's gradient: iDLG for one sample, label counts for a batch."""

from __future__ import annotations

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

__all__ = ["LabelRecovery", "label_counts", "observed_mean_gradient", "recover_labels"]


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


def label_counts(
    view: ModelView,
    gradients: tuple[torch.Tensor, ...],
    num_samples: int,
    *,
    probe: torch.Tensor,
) -> torch.Tensor:
    """Estimates how many of the ``num_samples`` inputs carry each label.

    With mean cross-entropy over B inputs the classifier bias gradient is
    ``g_c = mean_i p_ic - n_c / B``, so ``n_c = B * (mean_i p_ic - g_c)``. The mean softmax is unknown; it is
    estimated on ``probe`` inputs (Geng et al. 2021's zero-shot estimate), which is close for an untrained
    or little-trained model. Without a bias the row sums of the weight gradient are used, divided by the
    mean feature sum on the probe. Any class with ``g_c < 0`` is certainly present and gets at least one.

    Args:
        view: The model.
        gradients: Mean-loss gradient, one tensor per parameter.
        num_samples: Batch size B.
        probe: Inputs used to estimate the mean softmax and feature magnitude.

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
    counts = label_counts(view, gradients, n, probe=probe)
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
