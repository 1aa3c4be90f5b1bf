"""The shared round for one-message protocols (plaintext, CKKS): protect, sum on the server, finalize.

Each client sends one message; the server checks every message on its own and folds the good ones
into the aggregate without decoding anything it should not (the plaintext server adds them; the CKKS
server, which cannot read them, forwards the checked, signed ciphertexts for the key holder to sum);
a message that fails any check drops its sender with the reason, and nothing already accepted is
touched. The aggregate then goes back to the client side, which turns the weighted sum into the
average.
"""

from __future__ import annotations

import struct
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from privfl.errors import MessageError, PrivflError, ProtocolAbort
from privfl.protocols.base import SERVER, ClientUpdate, NoisePlacement, Protection, RoundResult, Transport
from privfl.protocols.wire import decode_frame, encode_frame

__all__ = ["OneShotProtection", "OneShotServer", "ServerAggregate", "decode_average", "encode_average"]

KIND_UPDATE = 1
KIND_AGGREGATE = 2
KIND_AVERAGE = 3
_WEIGHT = struct.Struct(">d")

_Parsed = TypeVar("_Parsed")


@dataclass(frozen=True, slots=True)
class ServerAggregate:
    """What the server holds after a round: the aggregate message and who is in it."""

    payload: bytes
    accepted: tuple[str, ...]
    rejected: dict[str, str] = field(default_factory=dict)


class OneShotServer(Generic[_Parsed]):
    """Server side: checks each message, then folds it into the sum (``_Parsed``: one checked message)."""

    @abstractmethod
    def _parse(self, round_index: int, sender: str, message: bytes) -> _Parsed:
        """Decodes and checks one message completely (raises MessageError), without touching the sum."""

    @abstractmethod
    def _add(self, parsed: _Parsed) -> None:
        """Adds a parsed message to the running sum."""

    @abstractmethod
    def _reset(self) -> None:
        """Starts an empty sum."""

    @abstractmethod
    def _payload(self, round_index: int) -> bytes:
        """Serializes the sum."""

    def aggregate(self, round_index: int, messages: Mapping[str, bytes]) -> ServerAggregate:
        """Sums the round's valid messages.

        Args:
            round_index: the round every message must carry.
            messages: sender id -> the bytes that arrived from it.

        Returns:
            The aggregate (empty payload when nothing was accepted), accepted ids and rejection reasons.
        """
        self._reset()
        accepted: list[str] = []
        rejected: dict[str, str] = {}
        for sender, message in messages.items():
            try:
                parsed = self._parse(round_index, sender, message)
            except MessageError as exc:
                rejected[sender] = exc.reason
                continue
            self._add(parsed)
            accepted.append(sender)
        payload = self._payload(round_index) if accepted else b""
        return ServerAggregate(payload=payload, accepted=tuple(accepted), rejected=rejected)


def encode_average(round_index: int, average: np.ndarray, total_weight: float) -> bytes:
    """The message that carries the round's average back to every client."""
    return encode_frame(
        KIND_AVERAGE, round_index, SERVER, [_WEIGHT.pack(total_weight), average.astype("<f8").tobytes()]
    )


def decode_average(round_index: int, message: bytes, dim: int) -> tuple[np.ndarray, float]:
    """Parses :func:`encode_average`'s message.

    Raises:
        MessageError: malformed, not ``dim`` values, a total weight that is not a finite number
            > 0, or an average that is not finite (a NaN or an infinity would otherwise flow into
            every client's model).
    """
    frame = decode_frame(message, kind=KIND_AVERAGE, round_index=round_index, max_bytes=8 * dim + 1024)
    if len(frame.parts) != 2 or len(frame.parts[0]) != 8 or len(frame.parts[1]) != 8 * dim:
        raise MessageError(f"average message has the wrong shape (expected {dim} values)")
    (total_weight,) = _WEIGHT.unpack(frame.parts[0])
    if not (np.isfinite(total_weight) and total_weight > 0):
        raise MessageError(f"average message carries total weight {total_weight!r}, not a finite number > 0")
    average = np.frombuffer(frame.parts[1], dtype="<f8").copy()
    if not np.all(np.isfinite(average)):
        raise MessageError("average message holds non-finite values")
    return average, total_weight


class OneShotProtection(Protection):
    """A protection whose clients send one message each per round.

    Attributes:
        release_noise: optional ``f(weighted_sum) -> noised_sum`` applied by whoever first sees the
            decoded sum (the plaintext server, the CKKS key holder) before it is released to
            anyone else: central DP noise is in place before the sum leaves that party.
    """

    release_noise: Callable[[np.ndarray], np.ndarray] | None = None
    noise_placement: ClassVar[NoisePlacement] = NoisePlacement.CENTRAL
    server: OneShotServer[Any] | None
    """The server side of the latest round (set by :meth:`run_round`)."""

    @abstractmethod
    def _protect(self, round_index: int, client: str, update: ClientUpdate, num_participants: int) -> bytes:
        """Client side: turns an update into the bytes it uploads."""

    @abstractmethod
    def _server(self, dim: int) -> OneShotServer[Any]:
        """The server side for a round with updates of length ``dim``."""

    @abstractmethod
    def _finalize(self, round_index: int, aggregate: bytes, dim: int, transport: Transport) -> tuple[np.ndarray, float, int]:
        """Client side: turns the aggregate into (weighted sum, total weight, bytes downloaded per client)."""

    def run_round(
        self,
        round_index: int,
        updates: Mapping[str, ClientUpdate],
        transport: Transport,
        *,
        release_noise: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> RoundResult:
        """See :meth:`Protection.run_round`; ``release_noise`` applies to this round only."""
        if release_noise is None:
            return self._run_round(round_index, updates, transport)
        standing, self.release_noise = self.release_noise, release_noise
        try:
            return self._run_round(round_index, updates, transport)
        finally:
            self.release_noise = standing

    def _run_round(self, round_index: int, updates: Mapping[str, ClientUpdate], transport: Transport) -> RoundResult:
        if not updates:
            raise ProtocolAbort(f"round {round_index}: no client updates", survivors=0, threshold=1)
        dims = {len(u.delta) for u in updates.values()}
        if len(dims) != 1:
            raise ProtocolAbort(f"round {round_index}: updates of different lengths {sorted(dims)}")
        (dim,) = dims
        upload: dict[str, int] = {}
        dropped: dict[str, str] = {}
        arrived: dict[str, bytes] = {}
        for client, update in updates.items():
            try:
                message = self._protect(round_index, client, update, len(updates))
            except PrivflError as exc:
                # e.g. a value too large for the CKKS parameters: that client is dropped, loudly,
                # and the round goes on; its budget was already charged (its data was used).
                dropped[client] = f"could not protect the update: {exc}"
                continue
            upload[client] = len(message)
            received = transport.deliver(client, SERVER, "update", message)
            if received is None:
                dropped[client] = "update lost in transit (client dropped)"
            else:
                arrived[client] = received
        server = self._server(dim)
        self.server = server
        result = server.aggregate(round_index, arrived)
        dropped.update({c: f"update rejected by the server: {why}" for c, why in result.rejected.items()})
        if not result.accepted:
            raise ProtocolAbort(
                f"round {round_index}: no valid update among {len(updates)} clients", survivors=0, threshold=1
            )
        weighted_sum, total_weight, download = self._finalize(round_index, result.payload, dim, transport)
        return RoundResult(
            average=weighted_sum / total_weight,
            total_weight=total_weight,
            contributors=result.accepted,
            dropped=dropped,
            upload_bytes=upload,
            download_bytes={c: download for c in updates},
        )
