"""CKKS homomorphic encryption of client updates (TenSEAL): the server sums ciphertexts it cannot read.

Roles and threat model:

* The **key holder** (run at one client site, or by a separate key dealer that does not collude
  with the server) creates the CKKS context with its secret key. It publishes only the public
  context (encryption key and parameters; no secret key, no relinearisation or Galois keys are
  needed since aggregation only adds, and none are shipped).
* **Clients** encrypt with the public key. Each client packs ``[n_k * delta_k, n_k]`` across as many
  ciphertexts as the model needs (N/2 values each), so any model size works.
* The **server** holds the public context only. It deserializes each client's ciphertexts, checks
  their count and size, and adds them. It can neither decrypt an individual update nor the sum;
  a test asserts it holds no secret key.
* The key holder decrypts the summed ciphertext and sends the clients the weighted average.

What this protects: an honest-but-curious server learns nothing about individual updates (CKKS is
IND-CPA under RLWE). It does not protect against a key holder that colludes with the server (then
individual updates can be decrypted), nor against a server that alters the model it sends
(see docs/concepts.md). Parameters: see :class:`~privfl.config.CkksConfig` and docs/ckks.md.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from privfl.config import CkksConfig
from privfl.errors import ConfigError, DecryptionError, MessageError, ProtocolAbort
from privfl.protocols.base import SERVER, ClientUpdate, Transport
from privfl.protocols.oneshot import (
    KIND_AGGREGATE,
    KIND_UPDATE,
    OneShotProtection,
    OneShotServer,
    decode_average,
    encode_average,
)
from privfl.protocols.wire import decode_frame, encode_frame

__all__ = ["CkksKeyHolder", "CkksClient", "CkksServer", "CkksProtection", "require_tenseal"]

KEY_HOLDER = "key-holder"


def require_tenseal():
    """Imports TenSEAL or raises ImportError naming the install command."""
    try:
        import tenseal
    except ImportError as exc:  # pragma: no cover - tenseal is a core dependency
        raise ImportError("CKKS protection needs TenSEAL: pip install tenseal") from exc
    return tenseal


def _load_context(data: bytes):
    """Deserializes a TenSEAL context, or raises ConfigError (SEAL raises several types)."""
    ts = require_tenseal()
    try:
        return ts.context_from(data)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError("public_context", f"<{len(data)} bytes>", f"is not a TenSEAL context ({type(exc).__name__})") from None


def _num_ciphertexts(dim: int, slots: int) -> int:
    # One extra slot carries the weight n_k.
    return math.ceil((dim + 1) / slots)


def _max_ciphertext_bytes(config: CkksConfig) -> int:
    # Two polynomials of N coefficients at one 64-bit RNS limb, plus serialization headers.
    return 2 * config.poly_modulus_degree * 8 + 4096


class CkksKeyHolder:
    """Creates the CKKS keys and decrypts only aggregates. Lives on the client side.

    Args:
        config: CKKS parameters.
    """

    def __init__(self, config: CkksConfig) -> None:
        ts = require_tenseal()
        self.config = config
        self._secret_context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=config.poly_modulus_degree,
            coeff_mod_bit_sizes=[config.data_bits, config.special_bits],
        )
        self._secret_context.global_scale = 2.0**config.scale_bits
        public = self._secret_context.copy()
        public.make_context_public()
        # Additions need neither relinearisation nor Galois keys: they are not shipped.
        self._public_bytes: bytes = public.serialize(
            save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
        )

    def __repr__(self) -> str:
        return f"CkksKeyHolder(config={self.config!r}, secret_key=<hidden>)"

    def public_context(self) -> bytes:
        """The serialized public context (no secret key) to hand to clients and the server."""
        return self._public_bytes

    def decrypt_sum(self, round_index: int, aggregate: bytes, dim: int) -> tuple[np.ndarray, float]:
        """Decrypts the server's summed ciphertexts.

        Returns:
            (sum_k n_k * delta_k, sum_k n_k).

        Raises:
            DecryptionError: the aggregate cannot be parsed or decrypted (deliberately opaque).
        """
        ts = require_tenseal()
        count = _num_ciphertexts(dim, self.config.slots)
        try:
            frame = decode_frame(
                aggregate,
                kind=KIND_AGGREGATE,
                round_index=round_index,
                sender=SERVER,
                max_bytes=count * _max_ciphertext_bytes(self.config) + 1024,
            )
            if len(frame.parts) != count:
                raise MessageError("wrong ciphertext count")
            values = np.concatenate(
                [np.asarray(ts.ckks_vector_from(self._secret_context, part).decrypt()) for part in frame.parts]
            )
        except Exception as exc:  # noqa: BLE001 - every failure is reported the same opaque way
            raise DecryptionError() from exc
        if values.shape != (dim + 1,) or not np.all(np.isfinite(values)):
            raise DecryptionError()
        return values[:dim], float(values[dim])


class CkksClient:
    """Client side: encrypts ``[n_k * delta_k, n_k]`` with the public key.

    Args:
        public_context: bytes from :meth:`CkksKeyHolder.public_context`.
        config: the same CKKS parameters.

    Raises:
        ConfigError: the context holds a secret key (a client must not be handed one by mistake
            through this path) or does not match ``config``.
    """

    def __init__(self, public_context: bytes, config: CkksConfig) -> None:
        self.config = config
        self._context = _load_context(public_context)
        if self._context.has_secret_key():
            raise ConfigError("public_context", "<context with secret key>", "encrypting clients get the public context only")
        self._context.global_scale = 2.0**config.scale_bits

    def encrypt(self, round_index: int, client: str, update: ClientUpdate, num_participants: int) -> bytes:
        """Encrypts one update.

        Raises:
            ConfigError: a weighted value is too large for the parameters to sum without wrapping.
        """
        ts = require_tenseal()
        values = np.concatenate([update.weight * update.delta.astype(np.float64), [update.weight]])
        largest = float(np.max(np.abs(values))) * num_participants
        if largest >= self.config.max_magnitude:
            raise ConfigError(
                "ckks.data_bits",
                self.config.data_bits,
                f"a sum of {num_participants} weighted updates may reach {largest:.3g} >= "
                f"{self.config.max_magnitude:.3g}; raise data_bits or lower scale_bits",
            )
        slots = self.config.slots
        parts = [
            ts.ckks_vector(self._context, values[i : i + slots]).serialize() for i in range(0, len(values), slots)
        ]
        return encode_frame(KIND_UPDATE, round_index, client, parts)


class CkksServer(OneShotServer):
    """Server side: adds ciphertexts under the public context. Holds no secret key.

    Args:
        public_context: bytes from :meth:`CkksKeyHolder.public_context`.
        config: CKKS parameters.
        dim: update length.
    """

    def __init__(self, public_context: bytes, config: CkksConfig, dim: int) -> None:
        self.config = config
        self.dim = dim
        self.context = _load_context(public_context)
        if self.context.has_secret_key():
            raise ConfigError("public_context", "<context with secret key>", "the server must never hold the secret key")
        self.count = _num_ciphertexts(dim, config.slots)
        self._sizes = [min(config.slots, dim + 1 - i * config.slots) for i in range(self.count)]
        self._sum: list | None = None

    def _reset(self) -> None:
        self._sum = None

    def _parse(self, round_index: int, sender: str, message: bytes) -> list:
        ts = require_tenseal()
        frame = decode_frame(
            message,
            kind=KIND_UPDATE,
            round_index=round_index,
            sender=sender,
            max_bytes=self.count * _max_ciphertext_bytes(self.config) + 1024,
            max_parts=self.count,
        )
        if len(frame.parts) != self.count:
            raise MessageError(f"{len(frame.parts)} ciphertexts, expected {self.count}", sender=sender)
        vectors = []
        for i, part in enumerate(frame.parts):
            try:
                vector = ts.ckks_vector_from(self.context, part)
            except Exception as exc:  # noqa: BLE001 - SEAL raises several types on bad input
                raise MessageError(f"ciphertext {i} does not deserialize ({type(exc).__name__})", sender=sender) from None
            if vector.size() != self._sizes[i]:
                raise MessageError(f"ciphertext {i} holds {vector.size()} values, expected {self._sizes[i]}", sender=sender)
            vectors.append(vector)
        if self._sum is not None:
            # Try the additions on the side first: a ciphertext at another level fails here and
            # the running sum is left untouched.
            try:
                return [s + v for s, v in zip(self._sum, vectors)]
            except Exception as exc:  # noqa: BLE001
                raise MessageError(f"ciphertexts do not add ({type(exc).__name__})", sender=sender) from None
        return vectors

    def _add(self, parsed: list) -> None:
        self._sum = parsed

    def _payload(self, round_index: int) -> bytes:
        assert self._sum is not None
        return encode_frame(KIND_AGGREGATE, round_index, SERVER, [v.serialize() for v in self._sum])

    def can_decrypt(self) -> bool:
        """Whether this server object holds a secret key (it never should)."""
        return bool(self.context.has_secret_key())


class CkksProtection(OneShotProtection):
    """CKKS-encrypted weighted FedAvg.

    Args:
        config: CKKS parameters.
    """

    name: ClassVar[str] = "ckks"

    def __init__(self, config: CkksConfig | None = None) -> None:
        self.config = config or CkksConfig()
        self.key_holder = CkksKeyHolder(self.config)
        public = self.key_holder.public_context()
        self._client = CkksClient(public, self.config)
        self._public = public
        self.server: CkksServer | None = None

    def __repr__(self) -> str:
        return f"CkksProtection(config={self.config!r})"

    def _protect(self, round_index: int, client: str, update: ClientUpdate, num_participants: int) -> bytes:
        return self._client.encrypt(round_index, client, update, num_participants)

    def _server(self, dim: int) -> CkksServer:
        # The server is built from the public bytes alone, exactly as a remote server would be.
        return CkksServer(self._public, self.config, dim)

    def _finalize(self, round_index: int, aggregate: bytes, dim: int, transport: Transport) -> tuple[np.ndarray, float, int]:
        received = transport.deliver(SERVER, KEY_HOLDER, "aggregate", aggregate)
        if received is None:
            raise ProtocolAbort(f"round {round_index}: the encrypted aggregate was lost on its way to the key holder")
        try:
            weighted_sum, total_weight = self.key_holder.decrypt_sum(round_index, received, dim)
        except DecryptionError as exc:
            raise ProtocolAbort(f"round {round_index}: the key holder could not decrypt the aggregate") from exc
        if not total_weight > 0:
            raise ProtocolAbort(f"round {round_index}: decrypted total weight {total_weight} is not positive")
        if self.release_noise is not None:
            # Central DP noise is added here, by the key holder, before the average leaves it.
            weighted_sum = self.release_noise(weighted_sum)
        average_message = encode_average(round_index, weighted_sum / total_weight, total_weight)
        delivered = transport.deliver(KEY_HOLDER, "clients", "average", average_message)
        if delivered is None:
            raise ProtocolAbort(f"round {round_index}: the average was lost on its way to the clients")
        try:
            average, weight = decode_average(round_index, delivered, dim)
        except MessageError as exc:
            raise ProtocolAbort(f"round {round_index}: the average message is malformed ({exc.reason})") from exc
        return average * weight, weight, len(delivered)
