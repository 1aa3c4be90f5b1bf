"""The plaintext baseline: each client sends n_k and n_k * delta_k in the clear; the server sums.

Threat model: none. The server sees every individual update; this exists to measure what the
protections cost and to show, with the bundled attacks, what an unprotected update reveals.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import ClassVar

import numpy as np

from privfl.errors import MessageError, ProtocolAbort
from privfl.protocols.base import SERVER, ClientUpdate, Transport
from privfl.protocols.oneshot import (
    KIND_AGGREGATE,
    KIND_UPDATE,
    OneShotProtection,
    OneShotServer,
)
from privfl.protocols.wire import decode_frame, encode_frame

__all__ = ["PlaintextProtection", "PlaintextServer", "decode_aggregate", "decode_update", "encode_update"]

_WEIGHT = struct.Struct(">d")


def encode_update(round_index: int, client: str, update: ClientUpdate) -> bytes:
    """Client side: the update message, n_k and delta_k (float32) in the clear."""
    return encode_frame(KIND_UPDATE, round_index, client, [_WEIGHT.pack(update.weight), update.delta.astype("<f4").tobytes()])


def decode_update(message: bytes, *, round_index: int, sender: str, dim: int) -> tuple[float, np.ndarray]:
    """Server side: checks and parses one update message into (n_k, delta_k as float32).

    Raises:
        MessageError: the message is not ``sender``'s update for ``round_index`` with ``dim`` finite
            values and a finite weight > 0.
    """
    frame = decode_frame(message, kind=KIND_UPDATE, round_index=round_index, sender=sender, max_bytes=4 * dim + 1024)
    if len(frame.parts) != 2 or len(frame.parts[0]) != 8:
        raise MessageError("update has the wrong number of parts", sender=sender)
    if len(frame.parts[1]) != 4 * dim:
        raise MessageError(f"update has {len(frame.parts[1]) // 4} values, expected {dim}", sender=sender)
    (weight,) = _WEIGHT.unpack(frame.parts[0])
    delta = np.frombuffer(frame.parts[1], dtype="<f4")
    if not (np.isfinite(weight) and weight > 0) or not np.all(np.isfinite(delta)):
        raise MessageError("update holds a non-finite value or a non-positive weight", sender=sender)
    return weight, delta


class PlaintextServer(OneShotServer[tuple[float, np.ndarray]]):
    """Sums float32 updates (weighted by n_k) in float64."""

    def __init__(self, dim: int, release_noise: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.dim = dim
        self.release_noise = release_noise
        self._sum = np.zeros(dim)
        self._weight = 0.0

    def _reset(self) -> None:
        self._sum = np.zeros(self.dim)
        self._weight = 0.0

    def _parse(self, round_index: int, sender: str, message: bytes) -> tuple[float, np.ndarray]:
        weight, delta = decode_update(message, round_index=round_index, sender=sender, dim=self.dim)
        with np.errstate(over="ignore"):
            weighted = weight * delta.astype(np.float64)
        if not np.all(np.isfinite(weighted)):
            # Finite parts can still overflow together (a weight of 1e300): refuse before the sum sees it.
            raise MessageError("weighted update overflows", sender=sender)
        return weight, weighted

    def _add(self, parsed: tuple[float, np.ndarray]) -> None:
        weight, weighted = parsed
        self._sum += weighted
        self._weight += weight

    @property
    def weighted_sum(self) -> tuple[np.ndarray, float]:
        """The accepted updates' weighted sum and total weight (before any release noise)."""
        return self._sum, self._weight

    def _payload(self, round_index: int) -> bytes:
        total = self._sum if self.release_noise is None else self.release_noise(self._sum)
        return encode_frame(KIND_AGGREGATE, round_index, SERVER, [_WEIGHT.pack(self._weight), total.astype("<f8").tobytes()])


def decode_aggregate(round_index: int, message: bytes, dim: int) -> tuple[np.ndarray, float]:
    """The released sum and total weight of :class:`PlaintextServer`'s aggregate (noised, when it noises).

    Raises:
        ProtocolAbort: the aggregate is malformed or holds non-finite values.
    """
    try:
        frame = decode_frame(message, kind=KIND_AGGREGATE, round_index=round_index, max_bytes=8 * dim + 1024)
        if len(frame.parts) != 2 or len(frame.parts[0]) != 8 or len(frame.parts[1]) != 8 * dim:
            raise MessageError("aggregate has the wrong shape", sender=SERVER)
    except MessageError as exc:
        raise ProtocolAbort(f"round {round_index}: the aggregate is malformed ({exc.reason})") from exc
    (weight,) = _WEIGHT.unpack(frame.parts[0])
    total = np.frombuffer(frame.parts[1], dtype="<f8").copy()
    if not (np.isfinite(weight) and weight > 0 and np.all(np.isfinite(total))):
        raise ProtocolAbort(f"round {round_index}: the aggregate holds non-finite values")
    return total, weight


class PlaintextProtection(OneShotProtection):
    """No protection: the reference point for cost and for attacks."""

    name: ClassVar[str] = "plaintext"

    def _protect(self, round_index: int, client: str, update: ClientUpdate, num_participants: int) -> bytes:
        return encode_update(round_index, client, update)

    def _server(self, dim: int) -> PlaintextServer:
        # Central DP noise, when set, is added by the server to the sum before it leaves.
        return PlaintextServer(dim, self.release_noise)

    def _finalize(self, round_index: int, aggregate: bytes, dim: int, transport: Transport) -> tuple[np.ndarray, float, int]:
        received = transport.deliver(SERVER, "clients", "aggregate", aggregate)
        if received is None:
            raise ProtocolAbort(f"round {round_index}: the aggregate was lost on its way to the clients")
        total, weight = decode_aggregate(round_index, received, dim)
        return total, weight, len(received)
