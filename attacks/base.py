"""What an attacker observes (Observation types), what it returns (Reconstruction) and the Attack interface."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

import torch

from privfl import _validate
from privfl.errors import ConfigError

__all__ = [
    "AggregateObservation",
    "Attack",
    "CiphertextObservation",
    "DPGradientObservation",
    "GradientObservation",
    "Observation",
    "Reconstruction",
    "Reduction",
    "ServerView",
    "UpdateObservation",
]


class ServerView(Enum):
    """What an honest-but-curious server observes of a client's update: one value per Observation type.

    This is the attacks' side of a protection (``privfl.protocols``): not how a protocol runs, but what it
    leaves readable. ``"none"``, the attack matrix's former name for a plaintext gradient, is accepted as
    ``PLAINTEXT``.
    """

    PLAINTEXT = "plaintext"
    """One client's gradient in the clear (a ``GradientObservation``)."""
    DP_SGD = "dp"
    """One client's DP-SGD gradient, clipped per sample and noised (a ``DPGradientObservation``)."""
    AGGREGATE = "aggregate"
    """The decrypted mean of several clients' gradients, as SecAgg or CKKS reveal it (an ``AggregateObservation``)."""
    CIPHERTEXT = "ciphertext"
    """A CKKS ciphertext before decryption: nothing readable (a ``CiphertextObservation``)."""
    FEDAVG = "fedavg"
    """One client's FedAvg parameter change after several local SGD steps (an ``UpdateObservation``)."""

    @classmethod
    def _missing_(cls, value: object) -> ServerView | None:
        return cls.PLAINTEXT if value == "none" else None


def _check_shape(input_shape: object) -> tuple[int, ...]:
    if not isinstance(input_shape, tuple) or not input_shape:
        raise ConfigError("input_shape", input_shape, "must be a non-empty tuple of positive ints, e.g. (1, 8, 8)")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape):
        raise ConfigError("input_shape", input_shape, "every dimension must be a positive int")
    return input_shape


# The shared numeric checks, under the names the attack modules import from here.
_check_positive_int = _validate.positive_int
_check_positive_number = _validate.positive


def _check_tensors(name: str, tensors: object) -> None:
    if not isinstance(tensors, tuple) or not tensors:
        raise ConfigError(name, type(tensors).__name__, "must be a non-empty sequence of tensors")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{name}[{i}]", type(t).__name__, "must be a torch.Tensor")
        if not torch.isfinite(t).all():
            raise ConfigError(f"{name}[{i}]", "non-finite", "contains NaN or inf")


def _check_labels(labels: torch.Tensor | None, num_samples: int) -> None:
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor) or labels.shape != (num_samples,) or labels.is_floating_point():
        raise ConfigError(
            "labels", getattr(labels, "shape", labels), f"must be an integer tensor of shape ({num_samples},) or None"
        )


def _freeze(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    # Detached copies: the observation is a snapshot of what was received, never a live view of a model.
    return tuple(t.detach().clone() for t in tensors)


@dataclass(frozen=True, kw_only=True, slots=True)
class Observation:
    """Base of everything an attacker can hold. Says the shape of one input and how many inputs are behind it.

    Attributes:
        input_shape: Shape of one input, without the batch dimension, e.g. ``(1, 8, 8)`` or ``(30,)``.
        num_samples: Number of inputs that produced the observation (the attacker is assumed to know it;
            in FedAvg the server learns it because it weights updates by it).
    """

    input_shape: tuple[int, ...]
    num_samples: int

    def __post_init__(self) -> None:
        if isinstance(self.input_shape, list):
            object.__setattr__(self, "input_shape", tuple(self.input_shape))
        _check_shape(self.input_shape)
        _check_positive_int("num_samples", self.num_samples)


@dataclass(frozen=True, kw_only=True, slots=True)
class GradientObservation(Observation):
    """One client's plaintext gradient from one step (FedSGD), averaged over its ``num_samples`` inputs.

    The gradient is of the mean cross-entropy loss of the model's logits, one tensor per entry of
    ``model.parameters()``, in that order.

    Attributes:
        gradients: One tensor per model parameter, in ``model.parameters()`` order.
        labels: The labels, when the attacker knows them (e.g. a one-class client); ``None`` otherwise.
    """

    gradients: tuple[torch.Tensor, ...]
    labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        Observation.__post_init__(self)
        if isinstance(self.gradients, (list, tuple)):
            _check_tensors("gradients", tuple(self.gradients))
            object.__setattr__(self, "gradients", _freeze(self.gradients))
        else:
            _check_tensors("gradients", self.gradients)
        _check_labels(self.labels, self.num_samples)


@dataclass(frozen=True, kw_only=True, slots=True)
class DPGradientObservation(GradientObservation):
    """A DP-SGD gradient: per-sample gradients clipped to ``max_grad_norm``, summed, plus Gaussian noise.

    The payload is ``(sum_i clip(g_i, C) + N(0, (noise_multiplier * C)^2 I)) / num_samples``, the
    quantity a DP-SGD client releases after one step (Abadi et al. 2016). The attacker knows the mechanism's
    parameters (they are public in any privacy ledger) but not the noise draw.

    Attributes:
        noise_multiplier: sigma, the noise standard deviation in units of ``max_grad_norm``.
        max_grad_norm: C, the per-sample clipping bound.
    """

    noise_multiplier: float
    max_grad_norm: float

    def __post_init__(self) -> None:
        GradientObservation.__post_init__(self)
        _validate.positive("noise_multiplier", self.noise_multiplier, allow_zero=True)
        _validate.positive("max_grad_norm", self.max_grad_norm)


@dataclass(frozen=True, kw_only=True, slots=True)
class UpdateObservation(Observation):
    """One client's FedAvg update after several local SGD steps: ``delta = new_params - global_params``.

    The model given to an attack holds the global parameters the client started from. The client ran
    ``local_steps`` plain SGD steps with learning rate ``lr`` on mean cross-entropy, taking its
    ``num_samples`` inputs in order, ``batch_size`` at a time, wrapping around (McMahan et al. 2017).

    Attributes:
        delta: One tensor per model parameter, ``new - old``, in ``model.parameters()`` order.
        local_steps: Number of local SGD steps the client took.
        lr: Local learning rate.
        batch_size: Local mini-batch size (at most ``num_samples``).
        labels: The labels when known; ``None`` otherwise.
    """

    delta: tuple[torch.Tensor, ...]
    local_steps: int
    lr: float
    batch_size: int
    labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        Observation.__post_init__(self)
        if isinstance(self.delta, (list, tuple)):
            _check_tensors("delta", tuple(self.delta))
            object.__setattr__(self, "delta", _freeze(self.delta))
        else:
            _check_tensors("delta", self.delta)
        _check_positive_int("local_steps", self.local_steps)
        _check_positive_int("batch_size", self.batch_size)
        if self.batch_size > self.num_samples:
            raise ConfigError("batch_size", self.batch_size, f"must be <= num_samples={self.num_samples}")
        _validate.positive("lr", self.lr)
        _check_labels(self.labels, self.num_samples)

    @classmethod
    def from_parameters(
        cls,
        *,
        old: Sequence[torch.Tensor],
        new: Sequence[torch.Tensor],
        input_shape: tuple[int, ...],
        num_samples: int,
        local_steps: int,
        lr: float,
        batch_size: int,
        labels: torch.Tensor | None = None,
    ) -> UpdateObservation:
        """Builds the observation from the global parameters and the parameters the client sent back.

        Args:
            old: Global parameters the client started from, in ``model.parameters()`` order.
            new: Parameters the client returned, same order.
            input_shape: Shape of one input.
            num_samples: Number of client inputs.
            local_steps: Local SGD steps.
            lr: Local learning rate.
            batch_size: Local batch size.
            labels: Known labels or ``None``.

        Returns:
            The update observation with ``delta = new - old``.

        Raises:
            ConfigError: If the two parameter lists do not line up.
        """
        if len(old) != len(new) or any(a.shape != b.shape for a, b in zip(old, new, strict=True)):
            raise ConfigError("new", len(new), f"must match old parameters ({len(old)} tensors, same shapes)")
        return cls(
            delta=tuple(b.detach() - a.detach() for a, b in zip(old, new, strict=True)),
            input_shape=input_shape,
            num_samples=num_samples,
            local_steps=local_steps,
            lr=lr,
            batch_size=batch_size,
            labels=labels,
        )


class Reduction(Enum):
    """How client gradients were combined into an aggregate."""

    SUM = "sum"
    MEAN = "mean"


@dataclass(frozen=True, kw_only=True, slots=True)
class AggregateObservation(Observation):
    """The decrypted aggregate of ``num_clients`` one-step gradients (what SecAgg or CKKS lets the server see).

    Each client computed a mean-loss gradient over ``samples_per_client`` inputs; the server sees their sum
    or mean, never a single one. ``num_samples`` is ``num_clients * samples_per_client``.

    Attributes:
        gradients: The aggregate, one tensor per model parameter.
        num_clients: Number of clients in the aggregate.
        samples_per_client: Inputs behind each client's gradient.
        reduction: Whether the aggregate is the sum or the mean of client gradients.
        labels: Known labels of all ``num_samples`` inputs, or ``None``.
    """

    gradients: tuple[torch.Tensor, ...]
    num_clients: int
    samples_per_client: int = 1
    reduction: Reduction = Reduction.MEAN
    labels: torch.Tensor | None = None
    num_samples: int = 0  # derived; kept as a field so every Observation answers num_samples

    def __post_init__(self) -> None:
        _check_positive_int("num_clients", self.num_clients)
        _check_positive_int("samples_per_client", self.samples_per_client)
        total = self.num_clients * self.samples_per_client
        if self.num_samples not in (0, total):
            raise ConfigError("num_samples", self.num_samples, f"must equal num_clients * samples_per_client = {total}")
        object.__setattr__(self, "num_samples", total)
        Observation.__post_init__(self)
        if not isinstance(self.reduction, Reduction):
            raise ConfigError("reduction", self.reduction, "must be a Reduction")
        if isinstance(self.gradients, (list, tuple)):
            _check_tensors("gradients", tuple(self.gradients))
            object.__setattr__(self, "gradients", _freeze(self.gradients))
        _check_labels(self.labels, total)

    def mean_gradients(self) -> tuple[torch.Tensor, ...]:
        """The aggregate as one mean-loss gradient over all ``num_samples`` inputs (clients weigh equally)."""
        if self.reduction is Reduction.MEAN:
            return self.gradients
        return tuple(g / self.num_clients for g in self.gradients)


@dataclass(frozen=True, kw_only=True, slots=True)
class CiphertextObservation(Observation):
    """What the server holds under encryption (CKKS) before decryption: opaque bytes.

    Without the secret key these bytes are indistinguishable from random to the server (IND-CPA), so every
    attack returns a ``Reconstruction`` with ``accessible=False`` instead of running.

    Attributes:
        ciphertexts: Serialized ciphertexts, as received.
        scheme: Name of the scheme, for reports (e.g. ``"ckks"``).
    """

    ciphertexts: tuple[bytes, ...] = field(repr=False)
    scheme: str = "ckks"

    def __post_init__(self) -> None:
        Observation.__post_init__(self)
        if isinstance(self.ciphertexts, (bytes, bytearray)):
            object.__setattr__(self, "ciphertexts", (bytes(self.ciphertexts),))
        elif isinstance(self.ciphertexts, list):
            object.__setattr__(self, "ciphertexts", tuple(self.ciphertexts))
        if not isinstance(self.ciphertexts, tuple) or not all(isinstance(c, (bytes, bytearray)) for c in self.ciphertexts):
            raise ConfigError("ciphertexts", type(self.ciphertexts).__name__, "must be bytes or a sequence of bytes")


@dataclass(frozen=True, kw_only=True, slots=True)
class Reconstruction:
    """What an attack recovered.

    Attributes:
        inputs: Reconstructed inputs, shape ``(num_samples, *input_shape)``. All NaN when not accessible.
        labels: Recovered labels, shape ``(num_samples,)``, int64. All ``-1`` when not accessible.
        attack: Name of the attack that produced it.
        accessible: ``False`` when the observation gave the attacker nothing to work on (a ciphertext);
            the evaluation matrix records this as "no access" rather than as a failed attack.
        objective: Final value of the attack's matching objective (lower is better), if it optimizes one.
        note: Short human-readable remark, e.g. why there was no access.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    attack: str
    accessible: bool = True
    objective: float | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.inputs.ndim < 2 or self.labels.shape != (self.inputs.shape[0],):
            raise ConfigError(
                "labels", tuple(self.labels.shape), f"must have shape ({self.inputs.shape[0]},) matching inputs"
            )

    @property
    def num_samples(self) -> int:
        """Number of reconstructed inputs."""
        return int(self.inputs.shape[0])

    @classmethod
    def no_access(cls, observation: Observation, *, attack: str, note: str) -> Reconstruction:
        """A placeholder for an observation the attacker cannot read (NaN inputs, ``-1`` labels).

        Args:
            observation: The unreadable observation; only its shape is used.
            attack: Name of the attack.
            note: Why there is no access.

        Returns:
            A ``Reconstruction`` with ``accessible=False``.
        """
        n = observation.num_samples
        return cls(
            inputs=torch.full((n, *observation.input_shape), float("nan")),
            labels=torch.full((n,), -1, dtype=torch.long),
            attack=attack,
            accessible=False,
            note=note,
        )


class Attack(abc.ABC):
    """An attack on what an honest-but-curious server observes. It never sees client data."""

    name: ClassVar[str] = "attack"

    def reconstruct(self, model: torch.nn.Module, observation: Observation) -> Reconstruction:
        """Reconstructs the inputs (and labels) behind an observation.

        Ciphertexts are answered with ``Reconstruction.no_access``; every other observation goes to
        ``_reconstruct``. The model is never modified.

        Args:
            model: The model the clients trained, holding the parameters the observation was computed at
                (the global model of the round).
            observation: What the server observed.

        Returns:
            The reconstruction.

        Raises:
            AttackError: If the attack cannot handle this observation or model.
        """
        if isinstance(observation, CiphertextObservation):
            return Reconstruction.no_access(
                observation,
                attack=self.name,
                note=f"{observation.scheme} ciphertext: no plaintext without the secret key",
            )
        return self._reconstruct(model, observation)

    @abc.abstractmethod
    def _reconstruct(self, model: torch.nn.Module, observation: Observation) -> Reconstruction:
        """Runs the attack on a readable observation."""
