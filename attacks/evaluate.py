"""Evaluation harness: simulate what a client releases under each protection, and score a reconstruction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import cast

import torch

from privfl import _validate
from privfl.errors import ConfigError

from ._model import ModelView
from .base import (
    AggregateObservation,
    CiphertextObservation,
    DPGradientObservation,
    GradientObservation,
    Observation,
    Reconstruction,
    Reduction,
    UpdateObservation,
)
from .metrics import best_match, chance_psnr, label_accuracy, max_abs_error, mse, pairwise_psnr, ssim

__all__ = [
    "ObservationSpec",
    "Protection",
    "Score",
    "build_observation",
    "client_gradient",
    "dp_sgd_gradient",
    "fedavg_update",
    "score",
]


class Protection(Enum):
    """What the honest-but-curious server gets to see of the clients' updates."""

    PLAINTEXT = "plaintext"  # one client's gradient, in the clear
    DP = "dp"  # one client's DP-SGD gradient (clipped per sample, Gaussian noise)
    AGGREGATE = "aggregate"  # the mean of num_clients gradients (SecAgg, or CKKS after decryption)
    CIPHERTEXT = "ciphertext"  # a CKKS ciphertext before decryption
    FEDAVG = "fedavg"  # one client's parameter change after local_steps of SGD


@dataclass(frozen=True, kw_only=True, slots=True)
class ObservationSpec:
    """How to turn client data into what the server observes.

    Attributes:
        protection: The threat model.
        noise_multiplier: DP-SGD sigma (``Protection.DP``).
        max_grad_norm: DP-SGD clipping bound C (``Protection.DP``).
        num_clients: Clients in the aggregate (``Protection.AGGREGATE``); the inputs are split evenly.
        local_steps: Local SGD steps (``Protection.FEDAVG``).
        lr: Local learning rate (``Protection.FEDAVG``).
        batch_size: Local batch size (``Protection.FEDAVG``); ``None`` means all inputs at once.
        seed: Seed of the ``torch.Generator`` for DP noise.
    """

    protection: Protection = Protection.PLAINTEXT
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    num_clients: int = 8
    local_steps: int = 5
    lr: float = 0.1
    batch_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.protection, Protection):
            raise ConfigError("protection", self.protection, f"must be one of {[p.value for p in Protection]}")
        _validate.positive("noise_multiplier", self.noise_multiplier, allow_zero=True, allow_numpy=True)
        _validate.positive("max_grad_norm", self.max_grad_norm, allow_numpy=True)
        for name in ("num_clients", "local_steps"):
            _validate.positive_int(name, getattr(self, name))
        if self.batch_size is not None:
            _validate.positive_int("batch_size", self.batch_size, hint="or None")
        _validate.positive("lr", self.lr, allow_numpy=True)


def client_gradient(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """The plaintext gradient a FedSGD client sends: mean cross-entropy over its inputs, at the model's parameters.

    The model is not modified.
    """
    return [g.detach() for g in ModelView(model).gradients(inputs, labels)]


def dp_sgd_gradient(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """One DP-SGD step's released gradient: ``(sum_i clip(g_i, C) + N(0, (sigma C)^2 I)) / n``.

    Per-sample gradients are computed one input at a time (works for any module) and clipped to total L2
    norm ``max_grad_norm`` across all parameters, as Opacus does with flat clipping.

    Args:
        model: The client's model.
        inputs: ``(n, *input_shape)``.
        labels: ``(n,)``.
        noise_multiplier: sigma.
        max_grad_norm: C.
        generator: Source of the Gaussian noise (simulation only; a deployment uses Opacus' secure RNG).

    Returns:
        One tensor per parameter.
    """
    view = ModelView(model)
    total = [torch.zeros_like(p) for p in view.parameters()]
    for i in range(inputs.shape[0]):
        grads = view.gradients(inputs[i : i + 1], labels[i : i + 1])
        norm = torch.sqrt(cast(torch.Tensor, sum((g.double() ** 2).sum() for g in grads)))
        factor = min(1.0, max_grad_norm / (float(norm) + 1e-12))
        total = [t + g.detach() * factor for t, g in zip(total, grads, strict=True)]
    std = noise_multiplier * max_grad_norm
    noisy = [
        t + std * torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in total
    ]
    return [t / inputs.shape[0] for t in noisy]


def fedavg_update(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    local_steps: int,
    lr: float,
    batch_size: int,
) -> list[torch.Tensor]:
    """A FedAvg client's parameter change: ``local_steps`` plain SGD steps over its inputs in order.

    Returns:
        ``new - old``, one tensor per parameter.
    """
    view = ModelView(model)
    params = {n: p.clone() for n, p in view.params.items()}
    n = inputs.shape[0]
    for step in range(local_steps):
        idx = torch.tensor([(step * batch_size + j) % n for j in range(batch_size)])
        grads = view.gradients(inputs[idx], labels[idx], params=params)
        params = {name: (params[name] - lr * g).detach() for name, g in zip(view.names, grads, strict=True)}
    return [params[name] - view.params[name] for name in view.names]


def build_observation(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    spec: ObservationSpec,
) -> Observation:
    """Simulates the client side and returns only what the server would observe.

    This is the one place that touches client data; the attack then sees only the returned observation.
    Labels are not passed on (the attacker must recover them).

    Args:
        model: The global model.
        inputs: Client inputs ``(n, *input_shape)``; for ``AGGREGATE`` they are split evenly over clients.
        labels: Client labels ``(n,)``.
        spec: The threat model and its parameters.

    Returns:
        The observation for ``spec.protection``.

    Raises:
        ConfigError: If the inputs do not split evenly over ``num_clients``.
    """
    shape = tuple(inputs.shape[1:])
    n = int(inputs.shape[0])
    if spec.protection is Protection.PLAINTEXT:
        return GradientObservation(gradients=tuple(client_gradient(model, inputs, labels)), input_shape=shape, num_samples=n)
    if spec.protection is Protection.DP:
        generator = torch.Generator().manual_seed(spec.seed)
        grads = dp_sgd_gradient(
            model,
            inputs,
            labels,
            noise_multiplier=spec.noise_multiplier,
            max_grad_norm=spec.max_grad_norm,
            generator=generator,
        )
        return DPGradientObservation(
            gradients=tuple(grads),
            input_shape=shape,
            num_samples=n,
            noise_multiplier=spec.noise_multiplier,
            max_grad_norm=spec.max_grad_norm,
        )
    if spec.protection is Protection.AGGREGATE:
        if n % spec.num_clients != 0:
            raise ConfigError("num_clients", spec.num_clients, f"must divide the {n} inputs evenly")
        per = n // spec.num_clients
        client_grads = [
            client_gradient(model, inputs[c * per : (c + 1) * per], labels[c * per : (c + 1) * per])
            for c in range(spec.num_clients)
        ]
        mean = [torch.stack(gs).mean(dim=0) for gs in zip(*client_grads, strict=True)]
        return AggregateObservation(
            gradients=tuple(mean), input_shape=shape, num_clients=spec.num_clients, samples_per_client=per,
            reduction=Reduction.MEAN,
        )
    if spec.protection is Protection.FEDAVG:
        batch = n if spec.batch_size is None else min(spec.batch_size, n)
        delta = fedavg_update(model, inputs, labels, local_steps=spec.local_steps, lr=spec.lr, batch_size=batch)
        return UpdateObservation(
            delta=tuple(delta), input_shape=shape, num_samples=n, local_steps=spec.local_steps, lr=spec.lr, batch_size=batch
        )
    # CIPHERTEXT: stand-in bytes; what matters is that nothing readable reaches the attack.
    generator = torch.Generator().manual_seed(spec.seed)
    blob = torch.randint(0, 256, (1024,), generator=generator, dtype=torch.uint8).numpy().tobytes()
    return CiphertextObservation(ciphertexts=(blob,), input_shape=shape, num_samples=n)


@dataclass(frozen=True, kw_only=True, slots=True)
class Score:
    """A reconstruction scored against the truth and against chance.

    All image metrics are computed on the best one-to-one matching of reconstructions to true inputs.

    Attributes:
        accessible: ``False`` when the attack had no access (ciphertext); every metric is then NaN.
        psnr: Mean PSNR (dB) of matched pairs.
        best_psnr: PSNR of the single best matched pair (the worst case for one client).
        chance_psnr: PSNR of the dataset-mean guess against the same true inputs.
        best_chance_psnr: PSNR of the dataset-mean guess against the true input it resembles most, the
            chance level to read ``best_psnr`` against.
        mse: Mean squared error of matched pairs.
        ssim: Mean SSIM of matched pairs (NaN for tabular inputs).
        max_abs_error: Largest absolute error of any matched feature.
        label_accuracy: Label multiset accuracy (order is unobservable in a batch).
    """

    accessible: bool
    psnr: float
    best_psnr: float
    chance_psnr: float
    best_chance_psnr: float
    mse: float
    ssim: float
    max_abs_error: float
    label_accuracy: float

    @property
    def gain_over_chance(self) -> float:
        """``psnr - chance_psnr`` in dB: how much the attack learned beyond the data prior."""
        return self.psnr - self.chance_psnr


def score(
    reconstruction: Reconstruction,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    baseline: torch.Tensor,
    data_range: float = 1.0,
) -> Score:
    """Scores a reconstruction on the best matching of reconstructed to true inputs.

    Args:
        reconstruction: The attack's output.
        inputs: True inputs ``(n, *input_shape)``.
        labels: True labels ``(n,)``.
        baseline: The chance guess (``metrics.chance_baseline``).
        data_range: Peak-to-peak range of the data.

    Returns:
        The score.
    """
    chance = chance_psnr(inputs, baseline, data_range=data_range)
    if not reconstruction.accessible:
        nan = math.nan
        best_chance = float(pairwise_psnr(baseline.unsqueeze(0), inputs, data_range=data_range).max())
        return Score(accessible=False, psnr=nan, best_psnr=nan, chance_psnr=chance, best_chance_psnr=best_chance,
                     mse=nan, ssim=nan, max_abs_error=nan, label_accuracy=nan)
    match = best_match(reconstruction.inputs, inputs, data_range=data_range)
    rec = reconstruction.inputs[match.reconstruction_index]
    truth = inputs[match.target_index]
    is_image = truth.ndim == 4 and min(truth.shape[-2:]) >= 3
    return Score(
        accessible=True,
        psnr=float(match.psnr.mean()),
        best_psnr=float(match.psnr.max()),
        chance_psnr=chance_psnr(truth, baseline, data_range=data_range),
        best_chance_psnr=float(pairwise_psnr(baseline.unsqueeze(0), truth, data_range=data_range).max()),
        mse=mse(rec, truth),
        ssim=ssim(rec, truth, data_range=data_range) if is_image else math.nan,
        max_abs_error=max_abs_error(rec, truth),
        label_accuracy=label_accuracy(reconstruction.labels, labels, ordered=False),
    )
