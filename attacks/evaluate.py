"""Simulate what the server observes of a client's update (a ``ServerView``), and score a reconstruction."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

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
    ServerView,
    UpdateObservation,
)
from .metrics import best_match, chance_psnr, label_accuracy, max_abs_error, mse, pairwise_psnr, ssim

__all__ = [
    "ObservationSpec",
    "Score",
    "build_observation",
    "client_gradient",
    "dp_sgd_gradient",
    "fedavg_update",
    "score",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class ObservationSpec:
    """How to turn client data into what the server observes.

    Attributes:
        view: What the server observes.
        noise_multiplier: DP-SGD sigma (``ServerView.DP_SGD``).
        max_grad_norm: DP-SGD clipping bound C (``ServerView.DP_SGD``).
        num_clients: Clients in the aggregate (``ServerView.AGGREGATE``); the inputs are split evenly.
        local_steps: Local SGD steps (``ServerView.FEDAVG``).
        lr: Local learning rate (``ServerView.FEDAVG``).
        batch_size: Local batch size (``ServerView.FEDAVG``); ``None`` means all inputs at once.
        seed: Seed of the DP-SGD step's noise (``ServerView.DP_SGD``) and of the stand-in ciphertext.
    """

    view: ServerView = ServerView.PLAINTEXT
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    num_clients: int = 8
    local_steps: int = 5
    lr: float = 0.1
    batch_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.view, ServerView):
            raise ConfigError("view", self.view, f"must be one of {[v.value for v in ServerView]}")
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
    seed: int,
) -> list[torch.Tensor]:
    """One DP-SGD step's released gradient: ``(sum_i clip(g_i, C) + N(0, (sigma C)^2 I)) / n``.

    The step is the one sites run, :func:`privfl.training.train_dp_sgd` (Opacus, flat per-sample clipping),
    on a copy of the model: one local epoch with ``batch_size = n``, so one step at sample rate 1 takes
    every input (``sampling_plan``), with learning rate 1 and no momentum. The gradient is read off the
    parameter change, ``-(new - old) / lr``; Opacus divides the noised sum by the expected batch size ``n``.

    Args:
        model: The client's model, DP-SGD compatible (see :func:`privfl.training.convert_for_dp`); it is
            not modified.
        inputs: ``(n, *input_shape)``.
        labels: ``(n,)``.
        noise_multiplier: sigma, > 0 (the step is charged to a ledger).
        max_grad_norm: C.
        seed: Seeds the step's noise (simulation only; a site draws its seed from the OS).

    Returns:
        One tensor per parameter, in ``model.parameters()`` order.

    Raises:
        ConfigError: If ``noise_multiplier`` is not > 0, or the model is not DP-SGD compatible as it is
            (the client would train another one).
    """
    from torch.utils.data import TensorDataset

    from privfl.config import DPConfig, TrainingConfig
    from privfl.training import convert_for_dp, train_dp_sgd

    # The step a site runs charges its ledger a DP event, which needs sigma > 0: check before training.
    _validate.positive("noise_multiplier", noise_multiplier, allow_numpy=True)
    client = copy.deepcopy(model)
    conversion = convert_for_dp(client)
    if conversion.changes:
        raise ConfigError(
            "model", ", ".join(str(c) for c in conversion.changes),
            "is not DP-SGD compatible as given: attack the model clients train, convert_for_dp(model).model",
        )
    lr = 1.0  # the gradient is then the parameter change itself, with no rescaling error
    n = int(inputs.shape[0])
    # train_dp_sgd takes sigma as an argument and reads only the clipping settings from config.dp.
    config = TrainingConfig(local_epochs=1, batch_size=n, learning_rate=lr, momentum=0.0,
                            dp=DPConfig(max_grad_norm=max_grad_norm))
    device = next(iter(client.parameters())).device
    before = [p.detach().clone() for p in client.parameters()]
    train_dp_sgd(client, TensorDataset(inputs.detach().to(device), labels.detach().to(device)), config=config,
                 noise_multiplier=noise_multiplier, device=device, seed=seed)
    return [(old - new.detach()) / lr for old, new in zip(before, client.parameters(), strict=True)]


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
        The observation for ``spec.view``.

    Raises:
        ConfigError: If the inputs do not split evenly over ``num_clients``, or (DP-SGD) the model is not
            DP-SGD compatible as given.
    """
    shape = tuple(inputs.shape[1:])
    n = int(inputs.shape[0])
    if spec.view is ServerView.PLAINTEXT:
        return GradientObservation(gradients=tuple(client_gradient(model, inputs, labels)), input_shape=shape, num_samples=n)
    if spec.view is ServerView.DP_SGD:
        grads = dp_sgd_gradient(
            model,
            inputs,
            labels,
            noise_multiplier=spec.noise_multiplier,
            max_grad_norm=spec.max_grad_norm,
            seed=spec.seed,
        )
        return DPGradientObservation(
            gradients=tuple(grads),
            input_shape=shape,
            num_samples=n,
            noise_multiplier=spec.noise_multiplier,
            max_grad_norm=spec.max_grad_norm,
        )
    if spec.view is ServerView.AGGREGATE:
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
    if spec.view is ServerView.FEDAVG:
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
