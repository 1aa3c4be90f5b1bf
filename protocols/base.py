"""The update-protection interface: how a round of client updates becomes one weighted average.

Threat model (stated once, tested everywhere): the server is honest-but-curious. It follows the
protocol and tries to learn individual updates from what it receives. Everything a client sends
crosses the client/server boundary as ``bytes`` through a :class:`Transport`, exactly as it would on a
network, so the in-process simulation runs the real cryptography and a transport can lose or corrupt
any message. A message that fails to parse drops its sender from the round (the reason is recorded);
the round completes with the others.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar, Protocol

import numpy as np

from privfl.errors import ConfigError

__all__ = [
    "KEY_HOLDER",
    "SERVER",
    "ClientUpdate",
    "DirectTransport",
    "DistributedNoiseProtection",
    "NoisePlacement",
    "Protection",
    "RoundResult",
    "Transport",
]


@dataclass(frozen=True, slots=True)
class ClientUpdate:
    """One client's contribution to a round.

    Args:
        delta: the flattened model update (new weights minus global weights), 1-D.
        weight: the FedAvg weight n_k (usually the client's number of training examples), > 0.
    """

    delta: np.ndarray
    weight: float

    def __post_init__(self) -> None:
        if not isinstance(self.delta, np.ndarray) or self.delta.ndim != 1:
            raise ConfigError("delta", getattr(self.delta, "shape", type(self.delta)), "must be a 1-D numpy array")
        if not np.all(np.isfinite(self.delta)):
            raise ConfigError("delta", "non-finite values", "an update must be finite")
        if not (self.weight > 0 and np.isfinite(self.weight)):
            raise ConfigError("weight", self.weight, "must be a finite number > 0")


@dataclass(frozen=True, slots=True)
class RoundResult:
    """What a round of a protection protocol yields to the clients.

    Attributes:
        average: weighted average sum_k n_k delta_k / sum_k n_k over ``contributors`` (float64).
        total_weight: sum of the contributors' weights n_k.
        contributors: ids of the clients whose update is in the average.
        dropped: client id -> reason, for clients that took part but whose update is not in it.
        upload_bytes: client id -> bytes that client sent this round (all protocol steps).
        download_bytes: client id -> bytes that client received this round.
    """

    average: np.ndarray
    total_weight: float
    contributors: tuple[str, ...]
    dropped: Mapping[str, str] = field(default_factory=dict)
    upload_bytes: Mapping[str, int] = field(default_factory=dict)
    download_bytes: Mapping[str, int] = field(default_factory=dict)


class Transport(Protocol):
    """Carries one message between a client and the server.

    ``deliver`` returns the bytes that arrive (possibly altered) or ``None`` when the message is lost,
    which the protocol treats as the sender dropping out at that step.
    """

    def deliver(self, sender: str, receiver: str, step: str, payload: bytes) -> bytes | None: ...


class DirectTransport:
    """The in-process transport: every message arrives unchanged."""

    def deliver(self, sender: str, receiver: str, step: str, payload: bytes) -> bytes | None:
        return payload


SERVER = "server"
"""The name the server goes by as a sender or receiver on a :class:`Transport`."""

KEY_HOLDER = "key-holder"
"""The name the CKKS key holder goes by on a :class:`Transport` (its release reaches the sites through the server)."""


class NoisePlacement(str, Enum):
    """Where client-level DP noise goes under a protection (what the round driver needs to know).

    - ``CENTRAL``: the party that first sees the decoded sum (the plaintext server, the CKKS key
      holder) adds it before the sum goes anywhere: the driver passes ``release_noise``.
    - ``DISTRIBUTED``: each site adds a share before it protects its update, and no party ever sees
      an un-noised sum (secure aggregation); the protection is a `DistributedNoiseProtection`.
    - ``NONE``: the protection cannot place noise; client-level DP is refused with it.
    """

    CENTRAL = "central"
    DISTRIBUTED = "distributed"
    NONE = "none"


ReleaseNoise = Callable[[np.ndarray], np.ndarray]
"""``f(weighted_sum) -> noised_sum``, applied to the decoded sum before it is released."""


class Protection(ABC):
    """A way of turning a round of client updates into their weighted average.

    Implementations keep the client side and the server side in separate objects that exchange
    only bytes through the transport; the server side never holds what would let it read an
    individual update (a CKKS secret key, an unmasked vector).
    """

    name: ClassVar[str]
    noise_placement: ClassVar[NoisePlacement] = NoisePlacement.NONE
    """Where client-level DP noise goes (a user protection that takes ``release_noise`` says CENTRAL)."""

    def check_fits(self, num_clients: int) -> None:  # noqa: B027 (optional hook: the default accepts any size)
        """Raises ConfigError if the settings cannot serve rounds of up to ``num_clients`` sites.

        Called once before anyone trains; the default accepts any size.
        """

    @property
    def min_participants(self) -> int:
        """The fewest client updates a round needs to complete.

        The round driver skips a round that has fewer trainable participants *before* anyone
        trains, so no site spends privacy budget on a round certain to abort.
        """
        return 1

    @abstractmethod
    def run_round(
        self,
        round_index: int,
        updates: Mapping[str, ClientUpdate],
        transport: Transport,
        *,
        release_noise: ReleaseNoise | None = None,
    ) -> RoundResult:
        """Protects each update on its client, aggregates on the server, and finalizes on the clients.

        Args:
            round_index: the federation round (bound into every message, so a replay from another
                round is rejected).
            updates: client id -> that client's update; every delta has the same length.
            transport: carries each message; may drop or alter it.
            release_noise: central DP noise for this round (only passed to CENTRAL protections):
                applied by whoever first sees the decoded sum, before it is released. The driver
                never passes it to a protection whose ``noise_placement`` is not CENTRAL, so a user
                protection without client-level DP may leave the keyword out of its signature.

        Returns:
            The weighted average over the clients that completed the protocol.

        Raises:
            ProtocolAbort: no client (or fewer than the protocol's threshold) completed the round.
        """


class DistributedNoiseProtection(Protection):
    """A protection under which each site adds its share of client-level DP noise (DISTRIBUTED).

    What the round driver needs from it to size the noise shares and keep them intact.
    """

    noise_placement: ClassVar[NoisePlacement] = NoisePlacement.DISTRIBUTED

    @abstractmethod
    def share_threshold(self, num_clients: int) -> int:
        """The fewest surviving shares a round of ``num_clients`` sites completes with."""

    @property
    @abstractmethod
    def word_bits(self) -> int:
        """Bits per aggregated word (the noise range must fit them)."""

    @abstractmethod
    def use_noise_range(self, clip_range: float, fraction_bits: int) -> None:
        """Fixes the value range and grid for noised updates, and fails closed from now on.

        A coordinate beyond ``clip_range`` aborts the round before anything is sent (clipping a noise
        share would change the mechanism), and a round with a dropout withholds its average (its
        noise would be below the charged amount).
        """
