"""CKKS homomorphic encryption of client updates (TenSEAL), hardened against active parties.

Roles and threat model:

* The **key holder** (run at one client site, or by a separate key dealer that does not collude
  with the server) creates the CKKS context with its secret key and a random ``run_id``. It
  publishes only the public context (encryption key and parameters; no secret key, no
  relinearisation or Galois keys are needed since aggregation only adds, and none are shipped).
  Each site's Ed25519 identity key is registered with it at setup.
* **Clients** (sites) encrypt ``[n_k * delta_k, n_k]`` with the public key across as many
  ciphertexts as the model needs (N/2 values each), and sign (run_id, round, site, SHA-256 of the
  ciphertexts) with their identity key.
* The **server** holds the public context and the sites' public keys only. It parses every
  ciphertext with :mod:`privfl.protocols.ckks_wire` (field by field against the public context and
  the config; TenSEAL never sees a peer's bytes), checks the signature, and forwards the accepted
  signed contributions to the key holder.
* The key holder re-checks everything, requires at least ``min_contributors`` distinct registered
  sites, signed for this run and this round, decrypts at most once per round, sums the ciphertexts
  itself (so the server cannot substitute), floods the decryption with fresh noise
  (:mod:`privfl.protocols.ckks_release`) and sends the clients the weighted average.

What this protects: an honest-but-curious server learns nothing about individual updates (CKKS is
IND-CPA under RLWE); an active server cannot make the key holder decrypt fewer than
``min_contributors`` sites' updates, one site twice, or another round's ciphertexts; a malicious site
or server cannot crash the server or the key holder with crafted bytes. It does not protect against a
key holder that colludes with the server, nor against a server colluding with
``min_contributors - 1`` registered sites (they can form a "sum" of one honest update and their own
zeros), nor against a server that alters the model it sends (see docs/concepts.md and docs/ckks.md).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from privfl.errors import ConfigError, DecryptionError, MessageError, ProtocolAbort
from privfl.protocols.base import KEY_HOLDER, SERVER, ClientUpdate, Transport
from privfl.protocols.ckks_params import CkksConfig
from privfl.protocols.ckks_release import FLOOD_FACTOR, flood_and_round, measure_fresh_error
from privfl.protocols.ckks_signing import (
    RUN_ID_BYTES,
    SIGNATURE_BYTES,
    SiteIdentity,
    SiteRegistry,
    load_public_key,
    verify_contribution,
)
from privfl.protocols.ckks_wire import CiphertextLayout, add_ciphertexts, encode_vector, parse_vector
from privfl.protocols.oneshot import (
    KIND_AGGREGATE,
    KIND_UPDATE,
    OneShotProtection,
    OneShotServer,
    decode_average,
    encode_average,
)
from privfl.protocols.wire import decode_frame, encode_frame

__all__ = [
    "CkksClient",
    "CkksKeyHolder",
    "CkksProtection",
    "CkksServer",
    "DecryptedSum",
    "SiteIdentity",
    "require_tenseal",
]

_KIND_KEY_HOLDER_STATE = 30


def require_tenseal() -> ModuleType:
    """Imports TenSEAL or raises ImportError naming the install command."""
    try:
        import tenseal
    except ImportError as exc:  # pragma: no cover - tenseal is a core dependency
        raise ImportError("CKKS protection needs TenSEAL: pip install tenseal") from exc
    module: ModuleType = tenseal  # tenseal ships no type hints
    return module


def _load_context(data: bytes) -> Any:
    """Deserializes a TenSEAL context, or raises ConfigError (SEAL raises several types).

    The public context comes from the key holder at setup, not from an arbitrary peer.
    """
    ts = require_tenseal()
    try:
        return ts.context_from(data)
    except Exception as exc:
        raise ConfigError("public_context", f"<{len(data)} bytes>", f"is not a TenSEAL context ({type(exc).__name__})") from None


def _num_ciphertexts(dim: int, slots: int) -> int:
    # One extra slot carries the weight n_k.
    return math.ceil((dim + 1) / slots)


def _chunk_sizes(dim: int, slots: int) -> list[int]:
    return [min(slots, dim + 1 - i * slots) for i in range(_num_ciphertexts(dim, slots))]


def _update_body(round_index: int, site: str, ciphertexts: list[bytes] | tuple[bytes, ...]) -> bytes:
    # What a site signs (by hash): the update frame without its signature part.
    return encode_frame(KIND_UPDATE, round_index, site, list(ciphertexts))


@dataclass(frozen=True, slots=True)
class _Contribution:
    site: str
    ciphertexts: list[np.ndarray]
    digest: bytes


class _Verifier:
    """Checks one signed update message completely (frame, signature, every ciphertext)."""

    def __init__(
        self, layout: CiphertextLayout, dim: int, run_id: bytes, keys: Mapping[str, Any] | None, clip_norm: float | None = None
    ) -> None:
        self.layout = layout
        self.sizes = _chunk_sizes(dim, layout.slots)
        self.run_id = run_id
        self.keys = keys
        self.clip_norm = clip_norm

    @property
    def max_message_bytes(self) -> int:
        return len(self.sizes) * (self.layout.max_vector_bytes + 8) + SIGNATURE_BYTES + 8 + (1 << 16) + 64

    def check(self, round_index: int, message: bytes, sender: str | None) -> _Contribution:
        frame = decode_frame(
            message,
            kind=KIND_UPDATE,
            round_index=round_index,
            sender=sender,
            max_bytes=self.max_message_bytes,
            max_parts=len(self.sizes) + 1,
        )
        site = frame.sender
        signature, *parts = frame.parts or (b"",)
        if len(parts) != len(self.sizes):
            raise MessageError(f"{len(parts)} ciphertexts, expected {len(self.sizes)}", sender=site)
        ciphertexts = []
        for i, (part, size) in enumerate(zip(parts, self.sizes, strict=True)):
            try:
                ciphertexts.append(parse_vector(part, self.layout, size))
            except MessageError as exc:
                raise MessageError(f"ciphertext {i} does not deserialize: {exc.reason}", sender=site) from None
        body = _update_body(round_index, site, parts)
        if self.keys is not None:
            verify_contribution(self.keys, self.run_id, round_index, site, body=body, signature=signature, clip_norm=self.clip_norm)
        # The digest is over the coefficients, not the message: a colluding site that signs a copy of
        # another site's ciphertexts under its own name (or recompresses them) is caught as a duplicate.
        digest = hashlib.sha256(b"".join(c.tobytes() for c in ciphertexts)).digest()
        return _Contribution(site=site, ciphertexts=ciphertexts, digest=digest)


@dataclass(frozen=True, slots=True)
class DecryptedSum:
    """What the key holder releases for one round.

    Attributes:
        weighted_sum: sum_k n_k delta_k (flooded and rounded, see :mod:`privfl.protocols.ckks_release`).
        total_weight: sum_k n_k (same treatment).
        contributors: the distinct sites whose signed ciphertexts were summed.
    """

    weighted_sum: np.ndarray
    total_weight: float
    contributors: tuple[str, ...]


class CkksKeyHolder(SiteRegistry):
    """Creates the CKKS keys and decrypts only verified sums. Lives on the client side.

    Args:
        config: CKKS parameters; ``config.min_contributors`` is the fewest distinct registered
            sites a sum must contain to be decrypted.
    """

    def __init__(self, config: CkksConfig) -> None:
        ts = require_tenseal()
        self.config = config
        self.min_contributors = config.min_contributors
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
        self.run_id: bytes = secrets.token_bytes(RUN_ID_BYTES)
        """Public: binds every signed contribution to this key holder's run."""
        self.layout = CiphertextLayout.from_context(public, config.scale_bits)
        self.fresh_error = measure_fresh_error(self._secret_context, public, config.slots)
        self._keys: dict[str, Any] = {}
        self._public_keys: dict[str, bytes] = {}
        self._decrypted_rounds: set[int] = set()

    def __repr__(self) -> str:
        return (
            f"CkksKeyHolder(config={self.config!r}, min_contributors={self.min_contributors}, "
            f"sites={len(self._keys)}, secret_key=<hidden>)"
        )

    def to_bytes(self) -> bytes:
        """The key holder's whole state, secret key included: for its own state directory only.

        A networked key holder answers each request in a fresh process; this is what it reloads.
        Never send it anywhere (it is not the default serialization of anything, and no repr shows it).
        """
        import json

        secret = self._secret_context.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
        meta = json.dumps(
            {
                "run_id": self.run_id.hex(),
                "fresh_error": self.fresh_error,
                "sites": {site: key.hex() for site, key in sorted(self._public_keys.items())},
                "decrypted_rounds": sorted(self._decrypted_rounds),
            }
        ).encode()
        return encode_frame(_KIND_KEY_HOLDER_STATE, 0, KEY_HOLDER, [meta, secret, self._public_bytes])

    @classmethod
    def from_bytes(cls, data: bytes, config: CkksConfig) -> CkksKeyHolder:
        """Reloads :meth:`to_bytes` (from the key holder's own state directory).

        Raises:
            ConfigError: the state is malformed, or was made with other CKKS parameters.
        """
        import json

        ts = require_tenseal()
        try:
            frame = decode_frame(data, kind=_KIND_KEY_HOLDER_STATE, round_index=0, sender=KEY_HOLDER, max_parts=3)
            meta = json.loads(frame.parts[0])
            holder = cls.__new__(cls)
            holder.config = config
            holder.min_contributors = config.min_contributors
            holder._secret_context = ts.context_from(frame.parts[1])
            holder._secret_context.global_scale = 2.0**config.scale_bits
            holder._public_bytes = frame.parts[2]
            holder.run_id = bytes.fromhex(meta["run_id"])
            public = _load_context(holder._public_bytes)
            holder.layout = CiphertextLayout.from_context(public, config.scale_bits)
            if holder.layout.poly_modulus_degree != config.poly_modulus_degree or holder.layout.modulus.bit_length() != config.data_bits:
                raise ConfigError("ckks", "state", "was made with other CKKS parameters")
            holder.fresh_error = float(meta["fresh_error"])
            holder._keys = {}
            holder._public_keys = {}
            holder._decrypted_rounds = {int(r) for r in meta["decrypted_rounds"]}
            for site, key in meta["sites"].items():
                holder.register_site(site, bytes.fromhex(key))
        except ConfigError:
            raise
        except Exception as exc:  # a corrupt state file is one error, whatever broke
            raise ConfigError("key holder state", "<corrupt>", f"cannot be loaded: {exc}") from exc
        return holder

    def public_context(self) -> bytes:
        """The serialized public context (no secret key) to hand to clients and the server."""
        return self._public_bytes

    def decrypt_sum(self, round_index: int, aggregate: bytes, dim: int, *, clip_norm: float | None = None) -> DecryptedSum:
        """Verifies the server's forwarded contributions, sums them itself and decrypts the sum.

        The aggregate must hold, for this round, signed updates from at least ``min_contributors``
        distinct registered sites, each ciphertext valid for the public context, no site and no
        set of ciphertexts twice (compared on the coefficients, whatever their encoding); each
        round is decrypted at most once. With ``clip_norm`` (client-level DP: the S the key holder
        noises the sum for) every contribution must be signed for that S.

        Returns:
            The released sum (see :class:`DecryptedSum`).

        Raises:
            DecryptionError: anything above fails (deliberately opaque; the cause is chained for debugging).
        """
        try:
            return self._decrypt_sum(round_index, aggregate, dim, clip_norm)
        except DecryptionError:
            raise
        except Exception as exc:  # every failure is reported the same opaque way
            raise DecryptionError() from exc

    def _decrypt_sum(self, round_index: int, aggregate: bytes, dim: int, clip_norm: float | None) -> DecryptedSum:
        ts = require_tenseal()
        verifier = _Verifier(self.layout, dim, self.run_id, self._keys, clip_norm)
        frame = decode_frame(
            aggregate,
            kind=KIND_AGGREGATE,
            round_index=round_index,
            sender=SERVER,
            max_bytes=max(len(self._keys), 1) * (verifier.max_message_bytes + 8) + 1024,
            max_parts=len(self._keys),
        )
        if round_index in self._decrypted_rounds:
            # A second sum for the same round (another subset of sites) would let the server
            # difference two releases down to one site's update.
            raise ProtocolAbort(f"round {round_index} was already decrypted")
        sites: list[str] = []
        digests: set[bytes] = set()
        total: list[np.ndarray] | None = None
        for message in frame.parts:
            contribution = verifier.check(round_index, message, sender=None)
            if contribution.site in sites or contribution.digest in digests:
                raise MessageError("a site or a set of ciphertexts appears twice in the aggregate")
            sites.append(contribution.site)
            digests.add(contribution.digest)
            total = (
                contribution.ciphertexts
                if total is None
                else [add_ciphertexts([a, b], self.layout.modulus) for a, b in zip(total, contribution.ciphertexts, strict=True)]
            )
        if len(sites) < self.min_contributors or total is None:
            raise ProtocolAbort(f"{len(sites)} contributors < min_contributors {self.min_contributors}")
        self._decrypted_rounds.add(round_index)
        # TenSEAL only ever loads the canonical bytes built here from checked coefficient arrays.
        values = np.concatenate(
            [
                np.asarray(ts.ckks_vector_from(self._secret_context, encode_vector(c, self.layout, size)).decrypt())
                for c, size in zip(total, verifier.sizes, strict=True)
            ]
        )
        if values.shape != (dim + 1,) or not np.all(np.isfinite(values)):
            raise MessageError("decrypted sum has the wrong shape or is not finite")
        released = flood_and_round(values, self.fresh_error, len(sites), FLOOD_FACTOR)
        return DecryptedSum(weighted_sum=released[:dim], total_weight=float(released[dim]), contributors=tuple(sites))


class CkksClient:
    """Client side: encrypts ``[n_k * delta_k, n_k]`` with the public key and signs the ciphertexts.

    Args:
        public_context: bytes from :meth:`CkksKeyHolder.public_context`.
        config: the same CKKS parameters.
        run_id: the key holder's :attr:`CkksKeyHolder.run_id`.

    Raises:
        ConfigError: the context holds a secret key (a client must not be handed one by mistake
            through this path) or does not match ``config``, or ``run_id`` is not 16 bytes.
    """

    def __init__(self, public_context: bytes, config: CkksConfig, *, run_id: bytes) -> None:
        self.config = config
        self._context = _load_context(public_context)
        if self._context.has_secret_key():
            raise ConfigError("public_context", "<context with secret key>", "encrypting clients get the public context only")
        if not isinstance(run_id, bytes) or len(run_id) != RUN_ID_BYTES:
            raise ConfigError("run_id", f"<{len(run_id) if hasattr(run_id, '__len__') else run_id!r}>", f"must be {RUN_ID_BYTES} bytes")
        self._context.global_scale = 2.0**config.scale_bits
        self.run_id = run_id

    def encrypt(
        self,
        round_index: int,
        client: str,
        update: ClientUpdate,
        num_participants: int,
        *,
        identity: SiteIdentity,
        clip_norm: float | None = None,
    ) -> bytes:
        """Encrypts and signs one update (under client-level DP, with the clip norm it was clipped to).

        Raises:
            ConfigError: a weighted value is too large for the parameters to sum without wrapping,
                or ``identity`` belongs to another site.
        """
        ts = require_tenseal()
        if identity.site != client:
            raise ConfigError("identity", identity.site, f"signs for another site than {client!r}")
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
        signature = identity.sign(self.run_id, round_index, _update_body(round_index, client, parts), clip_norm=clip_norm)
        return encode_frame(KIND_UPDATE, round_index, client, [signature, *parts])


class CkksServer(OneShotServer[tuple[str, bytes, bytes]]):
    """Server side: checks each signed update and forwards the accepted ones. Holds no secret key.

    Args:
        public_context: bytes from :meth:`CkksKeyHolder.public_context`.
        config: CKKS parameters.
        dim: update length.
        run_id: the key holder's run id (to check signatures).
        sites: registered site id -> raw Ed25519 public key; when given, an update with a missing
            or bad signature is rejected here instead of spoiling the whole aggregate at the key holder.
        clip_norm: under client-level DP, the clip norm the sites were asked to sign (an update
            signed for another is rejected here, as the key holder would refuse the sum).
    """

    def __init__(
        self,
        public_context: bytes,
        config: CkksConfig,
        dim: int,
        *,
        run_id: bytes | None = None,
        sites: Mapping[str, bytes] | None = None,
        clip_norm: float | None = None,
    ) -> None:
        self.config = config
        self.dim = dim
        self.context = _load_context(public_context)
        if self.context.has_secret_key():
            raise ConfigError("public_context", "<context with secret key>", "the server must never hold the secret key")
        self.layout = CiphertextLayout.from_context(self.context, config.scale_bits)
        self.count = _num_ciphertexts(dim, config.slots)
        keys = None if sites is None else {site: load_public_key(site, raw) for site, raw in sites.items()}
        if keys is not None and (run_id is None or len(run_id) != RUN_ID_BYTES):
            raise ConfigError("run_id", run_id, f"must be {RUN_ID_BYTES} bytes to check signatures")
        self._verifier = _Verifier(self.layout, dim, run_id or bytes(RUN_ID_BYTES), keys, clip_norm)
        self._accepted: list[bytes] = []
        self.accepted_sites: list[str] = []
        self._digests: set[bytes] = set()

    def _reset(self) -> None:
        self._accepted = []
        self.accepted_sites = []
        self._digests = set()

    def _parse(self, round_index: int, sender: str, message: bytes) -> tuple[str, bytes, bytes]:
        contribution = self._verifier.check(round_index, message, sender)
        if contribution.digest in self._digests:
            raise MessageError("the same ciphertexts arrived from another site", sender=sender)
        return sender, bytes(message), contribution.digest

    def _add(self, parsed: tuple[str, bytes, bytes]) -> None:
        sender, message, digest = parsed
        self.accepted_sites.append(sender)
        self._accepted.append(message)
        self._digests.add(digest)

    def _payload(self, round_index: int) -> bytes:
        # The key holder sums the signed ciphertexts itself, so the server forwards them as they came.
        return encode_frame(KIND_AGGREGATE, round_index, SERVER, self._accepted)

    def can_decrypt(self) -> bool:
        """Whether this server object holds a secret key (it never should)."""
        return bool(self.context.has_secret_key())


class CkksProtection(OneShotProtection):
    """CKKS-encrypted weighted FedAvg, with signed contributions checked by the key holder.

    For the in-process simulation this object also plays the setup: it gives every site a fresh
    Ed25519 identity the first time the site takes part and registers its public key with the key
    holder. In a deployment each site keeps its own identity and registers it out of band.

    Args:
        config: CKKS parameters (``min_contributors`` included).
    """

    name: ClassVar[str] = "ckks"

    def __init__(self, config: CkksConfig | None = None) -> None:
        self.config = config or CkksConfig()
        self.key_holder = CkksKeyHolder(self.config)
        public = self.key_holder.public_context()
        self._client = CkksClient(public, self.config, run_id=self.key_holder.run_id)
        self._public = public
        self._identities: dict[str, SiteIdentity] = {}
        self.server: CkksServer | None = None

    def __repr__(self) -> str:
        return f"CkksProtection(config={self.config!r}, min_contributors={self.key_holder.min_contributors})"

    @property
    def min_participants(self) -> int:
        """The key holder decrypts no sum of fewer than ``config.min_contributors`` sites."""
        return self.config.min_contributors

    def _identity(self, client: str) -> SiteIdentity:
        identity = self._identities.get(client)
        if identity is None:
            identity = SiteIdentity.generate(client)
            self.key_holder.register_site(client, identity.public_bytes())
            self._identities[client] = identity
        return identity

    def _protect(self, round_index: int, client: str, update: ClientUpdate, num_participants: int) -> bytes:
        return self._client.encrypt(round_index, client, update, num_participants, identity=self._identity(client))

    def _server(self, dim: int) -> CkksServer:
        # The server is built from public bytes alone, exactly as a remote server would be.
        return CkksServer(self._public, self.config, dim, run_id=self.key_holder.run_id, sites=self.key_holder.sites())

    def _finalize(self, round_index: int, aggregate: bytes, dim: int, transport: Transport) -> tuple[np.ndarray, float, int]:
        sites = tuple(self.server.accepted_sites) if self.server is not None else ()
        accepted = len(sites)
        if accepted < self.key_holder.min_contributors:
            raise ProtocolAbort(
                f"round {round_index}: {accepted} valid updates < min_contributors {self.key_holder.min_contributors}; "
                "the key holder decrypts no smaller sum",
                survivors=accepted,
                threshold=self.key_holder.min_contributors,
            )
        received = transport.deliver(SERVER, KEY_HOLDER, "aggregate", aggregate)
        if received is None:
            raise ProtocolAbort(f"round {round_index}: the encrypted aggregate was lost on its way to the key holder")
        try:
            released = self.key_holder.decrypt_sum(round_index, received, dim)
        except DecryptionError as exc:
            raise ProtocolAbort(f"round {round_index}: the key holder refused or could not decrypt the aggregate") from exc
        if released.contributors != sites:
            # The round's contributor list comes from the server; the key holder's is the one that counts.
            raise ProtocolAbort(f"round {round_index}: the key holder summed {released.contributors}, the server accepted {sites}")
        weighted_sum, total_weight = released.weighted_sum, released.total_weight
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
