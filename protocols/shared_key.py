"""Shared-key homomorphic aggregation: the sites share an RLWE secret key, the server holds none.

This is the trust model NVIDIA FLARE runs its homomorphic-encryption aggregation with, on a cheaper
ciphertext (:mod:`privfl.protocols.rlwe`): every site holds the same secret key, encrypts its update
with it, and the server adds ciphertexts it cannot read; the sites decrypt the sum. Because the
encryption is symmetric, a ciphertext is one polynomial plus a 32-byte seed, and because the plaintext
is integers in the high bits of a 32- or 64-bit modulus, one value costs 4 bytes per prime: about 1x
or 2x the float32 upload (the key-holder CKKS mode, :mod:`privfl.protocols.ckks`, costs 7.5x).

Roles:

* **Setup** (out of band, by the sites or a dealer that then forgets it): one :class:`SecretKey`, a
  random public ``run_id``, and each site's Ed25519 identity key registered with every site. The
  server gets the public parameters and the sites' public identity keys, never the secret key.
* **Site, encrypting**: clips its update to ``[-c, c]``, scales it by r_k = n_k / W (W the public
  weight bound), appends r_k c, quantizes to integers with stochastic rounding at a step sized to the
  round (:class:`RoundEncoding`), encrypts, and signs (run_id, round, site, seed, SHA-256 of c0).
* **Server**: checks each message (frame, sizes, every word below its prime, a fresh seed, the
  signature), adds the c0 polynomials and forwards the sum with the signed (site, seed, digest) list.
  Its work per site is one pass over the words: the same order as a plaintext sum.
* **Site, decrypting** (one site only: see :class:`SharedKeyDecryptor`): checks every signature, at
  least ``min_contributors`` distinct registered sites besides itself and no seed twice, expands the
  ``a`` polynomials from the signed seeds itself, each bound to its run, round and sender (so the
  server can neither choose them nor replay a seed elsewhere), decrypts, and refuses unless every
  coefficient rounds within the honest error bound and the padding decrypts to zero. It decrypts at
  most one sum per round, and nothing more after a refused sum.

What this protects: an honest-but-curious server (or an eavesdropper) learns nothing about any
update (RLWE). An active server cannot get the decrypting site to decrypt a ciphertext whose ``a`` it
chose, a sum of fewer than ``min_contributors`` other sites, two different subsets of one round, a
ciphertext replayed from another round or under another name, one counted twice, or a sum from which
a c0 was left out (each of these decrypts to values spread over Z_Q and is refused). An honest run's
decryption is exact, so a released sum says nothing about the encryption errors. What an active
server can still do with the c0 sum, which nobody but it sees: add a multiple of Delta (a shift of
the decrypted sum by whole quantization steps of its choice, like a server that sends a wrong model),
or a small offset in the coefficient domain that rounds away or, near the bound, turns the site's
accept-or-refuse into one bit about the errors; the site stops decrypting after its first refusal,
so that is one bit per run. A site that sends a validly signed garbage ciphertext makes the
decryption fail without saying which site it was (the check is on the sum); with the fail-closed
rule that ends the run's decryptions.

What it does not protect: every site can decrypt every other site's ciphertext. A server colluding
with any one site reads every update: this mode trusts each site not to collude with the server,
where the key-holder CKKS mode trusts one key holder. It places no client-level DP noise (the
``NoisePlacement`` is NONE: the decrypting site sees the un-noised sum), so client-level DP is refused with it.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from privfl.errors import ConfigError, DecryptionError, MessageError, ProtocolAbort
from privfl.protocols.base import SERVER, ClientUpdate, NoisePlacement, ReleaseNoise, RoundResult, Transport
from privfl.protocols.ckks_params import HE_STANDARD_MAX_LOGQ_128
from privfl.protocols.ckks_signing import (
    RUN_ID_BYTES,
    SIGNATURE_BYTES,
    SiteIdentity,
    SiteRegistry,
    load_public_key,
    verify_contribution,
)
from privfl.protocols.oneshot import KIND_AGGREGATE, KIND_UPDATE, OneShotProtection, OneShotServer
from privfl.protocols.rlwe import (
    ERROR_BOUND,
    PRIMES,
    SEED_BYTES,
    SecretKey,
    decrypt_sum,
    encrypt,
    expand_a,
    reduce_sum,
)
from privfl.protocols.secagg.prg import uniform_floats
from privfl.protocols.wire import decode_frame, encode_frame

__all__ = [
    "RoundEncoding",
    "SecretKey",
    "SharedKeyClient",
    "SharedKeyConfig",
    "SharedKeyDecryptor",
    "SharedKeyProtection",
    "SharedKeyServer",
]

_KIND_ENTRY = 40
_COUNT = struct.Struct(">I")
_DIGEST_BYTES = 32
_PRIME_BITS = 32
_MAX_VALUE_BITS = 50  # float64 keeps the stochastic rounding's offset to within 2^-2 of a step up to here


@dataclass(frozen=True, kw_only=True, slots=True)
class SharedKeyConfig:
    """Settings of :class:`SharedKeyProtection`.

    Args:
        poly_modulus_degree: ring dimension N (values per polynomial); 4096 or more.
        limbs: primes of about 32 bits in the modulus Q: 1 (about 1x the float32 upload; about
            31 - log2(42 n) bits per value, so the quantization step grows with the round size n) or
            2 (about 2x; about 63 - log2(42 n) bits, capped at 50).
        clip_range: each coordinate of an update is clipped to [-clip_range, clip_range] (clipped
            coordinates are counted in :attr:`SharedKeyProtection.clipped`).
        weight_bound: public upper bound W on any FedAvg weight n_k; None uses the round's largest
            weight (which then becomes public).
        min_contributors: the fewest distinct registered sites a sum must hold for a site to decrypt
            it (>= 2): no site ever decrypts a single other site's update.
    """

    poly_modulus_degree: int = 4096
    limbs: int = 2
    clip_range: float = 1.0
    weight_bound: float | None = None
    min_contributors: int = 2

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if n not in HE_STANDARD_MAX_LOGQ_128 or n < 2048:
            raise ConfigError("poly_modulus_degree", n, "must be one of 2048, 4096, 8192, 16384, 32768")
        if isinstance(self.limbs, bool) or self.limbs not in (1, 2):
            raise ConfigError("limbs", self.limbs, "must be 1 or 2")
        if _PRIME_BITS * self.limbs > HE_STANDARD_MAX_LOGQ_128[n]:
            raise ConfigError(
                "limbs",
                self.limbs,
                f"a {_PRIME_BITS * self.limbs}-bit modulus exceeds {HE_STANDARD_MAX_LOGQ_128[n]} bits, the 128-bit-security "
                f"limit for N={n} (HE standard); use poly_modulus_degree >= 4096",
            )
        if not (isinstance(self.clip_range, (int, float)) and math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ConfigError("clip_range", self.clip_range, "must be a finite number > 0")
        if self.weight_bound is not None and not (
            isinstance(self.weight_bound, (int, float)) and math.isfinite(self.weight_bound) and self.weight_bound > 0
        ):
            raise ConfigError("weight_bound", self.weight_bound, "must be None or a finite number > 0")
        if isinstance(self.min_contributors, bool) or not (isinstance(self.min_contributors, int) and self.min_contributors >= 2):
            raise ConfigError("min_contributors", self.min_contributors, "must be an integer >= 2: no site decrypts a single update")
        if n > 16384:
            raise ConfigError("poly_modulus_degree", n, "must be at most 16384 (the primes are 1 mod 2^15)")


@dataclass(frozen=True, slots=True)
class RoundEncoding:
    """How one round's values become integers: public, derived from the settings and the round size.

    Attributes:
        rows: polynomials per update (the update and its weight coordinate, padded with zeros).
        delta_bits: d, with Delta = 2^d > 2 * 21 * participants (the error sum rounds away).
        value_bits: k, with sum_k |m_k| < 2^(k-1) for any ``participants`` values in [-levels, levels].
        levels: quantization levels either side of zero: a value v becomes about v / step.
        step: clip_range / levels.
    """

    dim: int
    participants: int
    n: int
    limbs: int
    rows: int
    delta_bits: int
    value_bits: int
    levels: int
    step: float

    @classmethod
    def for_round(cls, config: SharedKeyConfig, dim: int, participants: int) -> RoundEncoding:
        """The encoding of a round of ``participants`` sites with updates of length ``dim``.

        Raises:
            ConfigError: the modulus leaves no quantization level for this many sites.
        """
        if not (isinstance(participants, int) and participants >= 1):
            raise ConfigError("participants", participants, "must be an int >= 1")
        delta_bits = (2 * ERROR_BOUND * participants).bit_length()
        value_bits = min(_PRIME_BITS * config.limbs - 1 - delta_bits, _MAX_VALUE_BITS)
        levels = ((1 << value_bits) - 1) // (2 * participants) if value_bits > 1 else 0
        if levels < 1:
            raise ConfigError(
                "limbs", config.limbs, f"a {config.limbs}-prime modulus cannot hold a sum of {participants} sites' values; use limbs=2"
            )
        n = config.poly_modulus_degree
        return cls(
            dim=dim,
            participants=participants,
            n=n,
            limbs=config.limbs,
            rows=math.ceil((dim + 1) / n),
            delta_bits=delta_bits,
            value_bits=value_bits,
            levels=levels,
            step=float(config.clip_range) / levels,
        )

    @property
    def words(self) -> int:
        """Words (uint32) in one c0: limbs x rows x N."""
        return self.limbs * self.rows * self.n

    def max_error(self, summed: int) -> float:
        """Largest per-coordinate quantization error of a decoded sum of ``summed`` updates (< one step each)."""
        return summed * self.step

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Stochastic rounding of values already within [-c, c] onto the grid: int64 (rows, N), zero-padded."""
        scaled = values / self.step + uniform_floats(secrets.token_bytes(32), values.shape[0])
        plain = np.zeros(self.rows * self.n, dtype=np.int64)
        plain[: values.shape[0]] = np.clip(np.floor(scaled), -self.levels, self.levels).astype(np.int64)
        return plain.reshape(self.rows, self.n)


def _context(run_id: bytes, round_index: int, site: str) -> bytes:
    # Bound into each ciphertext's ``a`` with its seed: the run, the round and the sender (last, so the
    # fixed-length prefix keeps the encoding unambiguous).
    return run_id + round_index.to_bytes(4, "big") + site.encode("utf-8")


def _signed_body(round_index: int, site: str, seed: bytes, digest: bytes) -> bytes:
    # What a site signs (by hash): its seed and the hash of its c0, bound to the round and the site.
    return encode_frame(KIND_UPDATE, round_index, site, [seed, digest])


def _parse_words(data: bytes, encoding: RoundEncoding, what: str, sender: str | None) -> np.ndarray:
    """Checks and reads ``limbs x rows x N`` little-endian words, each below its limb's prime."""
    if len(data) != 4 * encoding.words:
        raise MessageError(f"{what} has {len(data)} bytes, expected {4 * encoding.words}", sender=sender)
    words = np.frombuffer(data, dtype="<u4").reshape(encoding.limbs, encoding.rows, encoding.n)
    for limb in range(encoding.limbs):
        if int(words[limb].max()) >= PRIMES[limb]:
            raise MessageError(f"{what} holds a word outside Z_q", sender=sender)
    return words


class SharedKeyClient:
    """A site's encrypting half.

    Args:
        key: the shared secret key.
        config: the shared settings.
        run_id: the run's public 16-byte id (bound into every signature).
    """

    def __init__(self, key: SecretKey, config: SharedKeyConfig, *, run_id: bytes) -> None:
        if key.n != config.poly_modulus_degree:
            raise ConfigError("key", repr(key), f"is for N={key.n}, the settings say {config.poly_modulus_degree}")
        if not isinstance(run_id, bytes) or len(run_id) != RUN_ID_BYTES:
            raise ConfigError("run_id", f"<{len(run_id) if hasattr(run_id, '__len__') else run_id!r}>", f"must be {RUN_ID_BYTES} bytes")
        self._key = key
        self.config = config
        self.run_id = run_id

    def __repr__(self) -> str:
        return f"SharedKeyClient(config={self.config!r}, key=<hidden>)"

    def encrypt(
        self, round_index: int, update: ClientUpdate, encoding: RoundEncoding, *, weight_bound: float, identity: SiteIdentity
    ) -> tuple[bytes, int]:
        """Clips, weights, quantizes, encrypts and signs one update.

        Returns:
            (the message, how many coordinates were clipped).

        Raises:
            ConfigError: the weight is above ``weight_bound``, or the update's length is not the round's.
        """
        if update.delta.shape[0] != encoding.dim:
            raise ConfigError("delta", update.delta.shape[0], f"the round's updates have {encoding.dim} values")
        if not update.weight <= weight_bound:
            raise ConfigError("weight_bound", weight_bound, f"site {identity.site!r} has weight {update.weight} above it")
        c = float(self.config.clip_range)
        delta = update.delta.astype(np.float64)
        clipped = int(np.count_nonzero(np.abs(delta) > c))
        ratio = update.weight / weight_bound
        values = np.empty(encoding.dim + 1)
        np.multiply(np.clip(delta, -c, c), ratio, out=values[: encoding.dim])
        values[encoding.dim] = ratio * c
        seed, c0 = encrypt(
            self._key, encoding.quantize(values), encoding.delta_bits, encoding.limbs,
            context=_context(self.run_id, round_index, identity.site),
        )
        data = c0.astype("<u4").tobytes()
        signature = identity.sign(self.run_id, round_index, _signed_body(round_index, identity.site, seed, hashlib.sha256(data).digest()))
        return encode_frame(KIND_UPDATE, round_index, identity.site, [signature, seed, data]), clipped


@dataclass(frozen=True, slots=True)
class _Accepted:
    site: str
    seed: bytes = field(repr=False)  # public (it travels in the aggregate), but no repr needs it
    digest: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    words: np.ndarray = field(repr=False)


class SharedKeyServer(OneShotServer[_Accepted]):
    """Server side: checks each signed ciphertext and adds the c0 polynomials. Holds no key.

    Args:
        encoding: the round's public encoding.
        run_id: the run's public id.
        sites: registered site id -> raw Ed25519 public key; None skips the signature check here (the
            decrypting sites check every signature anyway).
    """

    def __init__(self, encoding: RoundEncoding, *, run_id: bytes, sites: Mapping[str, bytes] | None = None) -> None:
        self.encoding = encoding
        self.run_id = run_id
        self._keys = None if sites is None else {site: load_public_key(site, raw) for site, raw in sites.items()}
        self._max_bytes = 4 * encoding.words + SIGNATURE_BYTES + SEED_BYTES + (1 << 16) + 64
        self._reset()

    def _reset(self) -> None:
        self._sum = np.zeros((self.encoding.limbs, self.encoding.rows, self.encoding.n), dtype=np.uint64)
        self._entries: list[bytes] = []
        self._seeds: set[bytes] = set()
        self.accepted_sites: list[str] = []

    def _parse(self, round_index: int, sender: str, message: bytes) -> _Accepted:
        frame = decode_frame(message, kind=KIND_UPDATE, round_index=round_index, sender=sender, max_bytes=self._max_bytes, max_parts=3)
        if len(frame.parts) != 3:
            raise MessageError(f"{len(frame.parts)} parts, expected 3 (signature, seed, c0)", sender=sender)
        signature, seed, data = frame.parts
        if len(signature) != SIGNATURE_BYTES or len(seed) != SEED_BYTES:
            raise MessageError("signature or seed has the wrong length", sender=sender)
        if seed in self._seeds:
            raise MessageError("a seed already used this round", sender=sender)
        words = _parse_words(data, self.encoding, "c0", sender)
        digest = hashlib.sha256(data).digest()
        if self._keys is not None:
            verify_contribution(self._keys, self.run_id, round_index, sender, body=_signed_body(round_index, sender, seed, digest), signature=signature)
        return _Accepted(sender, bytes(seed), digest, bytes(signature), words)

    def _add(self, parsed: _Accepted) -> None:
        self._sum += parsed.words
        self._seeds.add(parsed.seed)
        self.accepted_sites.append(parsed.site)
        self._entries.append(encode_frame(_KIND_ENTRY, 0, parsed.site, [parsed.seed, parsed.digest, parsed.signature]))

    def _payload(self, round_index: int) -> bytes:
        total = reduce_sum(self._sum.copy(), len(self._entries)).astype("<u4")
        return encode_frame(KIND_AGGREGATE, round_index, SERVER, [total.tobytes(), *self._entries])


@dataclass(frozen=True, slots=True)
class DecryptedSum:
    """What a site decrypts for one round.

    Attributes:
        values: sum_k r_k clip(delta_k) followed by c sum_k r_k (dim + 1 values, float64).
        contributors: the distinct registered sites whose ciphertexts the sum holds.
    """

    values: np.ndarray
    contributors: tuple[str, ...]


class SharedKeyDecryptor(SiteRegistry):
    """A site's decrypting half: decrypts only verified sums, each round at most once.

    Only one site of a federation may decrypt (the in-process simulation's one decryptor; in a
    deployment the site with ``role = "key-holder"``): two decrypting sites could each be handed a
    different subset of one round's ciphertexts, and the difference of the two sums is one site's
    update. It counts ``min_contributors`` among the *other* sites (it could subtract its own update),
    and after a sum fails the cryptographic check it decrypts nothing more (``halted``): each refusal
    tells the server one bit about the errors it probed, so it gets at most one.

    Args:
        key: the shared secret key.
        config: the shared settings.
        run_id: the run's public id.
        site: the decrypting site's own id when it contributes to the sums (None: it never does).
        halted: start halted (a site reloading its state after a refused sum).

    Raises:
        ConfigError: the key's ring dimension is not the settings'.
    """

    def __init__(self, key: SecretKey, config: SharedKeyConfig, *, run_id: bytes, site: str | None = None, halted: bool = False) -> None:
        if key.n != config.poly_modulus_degree:
            raise ConfigError("key", repr(key), f"is for N={key.n}, the settings say {config.poly_modulus_degree}")
        self._key = key
        self.config = config
        self.run_id = run_id
        self.site = site
        self.halted = halted
        self._keys: dict[str, Any] = {}
        self._public_keys: dict[str, bytes] = {}
        self._decrypted_rounds: set[int] = set()

    def __repr__(self) -> str:
        return f"SharedKeyDecryptor(config={self.config!r}, sites={len(self._keys)}, key=<hidden>)"

    def decrypt(self, round_index: int, aggregate: bytes, encoding: RoundEncoding) -> DecryptedSum:
        """Verifies the server's aggregate and decrypts it.

        Raises:
            DecryptionError: anything fails (deliberately opaque; the cause is chained for debugging).
        """
        try:
            return self._decrypt(round_index, aggregate, encoding)
        except DecryptionError:
            raise
        except Exception as exc:
            raise DecryptionError() from exc

    def _decrypt(self, round_index: int, aggregate: bytes, encoding: RoundEncoding) -> DecryptedSum:
        entry_bytes = SEED_BYTES + _DIGEST_BYTES + SIGNATURE_BYTES + (1 << 16) + 64
        frame = decode_frame(
            aggregate,
            kind=KIND_AGGREGATE,
            round_index=round_index,
            sender=SERVER,
            max_bytes=4 * encoding.words + encoding.participants * (entry_bytes + 8) + 1024,
            max_parts=encoding.participants + 1,
        )
        if self.halted:
            raise ProtocolAbort("an earlier sum failed the check: this site decrypts nothing more in this run")
        if round_index in self._decrypted_rounds:
            # A second sum for the same round (another subset of sites) would difference down to one update.
            raise ProtocolAbort(f"round {round_index} was already decrypted")
        if not frame.parts:
            raise MessageError("empty aggregate")
        c0_sum = _parse_words(frame.parts[0], encoding, "c0 sum", SERVER)
        sites: list[str] = []
        seeds: list[bytes] = []
        for part in frame.parts[1:]:
            entry = decode_frame(part, kind=_KIND_ENTRY, round_index=0, max_bytes=entry_bytes, max_parts=3)
            if len(entry.parts) != 3:
                raise MessageError("an aggregate entry has the wrong shape")
            seed, digest, signature = entry.parts
            if len(seed) != SEED_BYTES or len(digest) != _DIGEST_BYTES:
                raise MessageError("an aggregate entry has the wrong shape")
            if entry.sender in sites or seed in seeds:
                raise MessageError("a site or a seed appears twice in the aggregate")
            body = _signed_body(round_index, entry.sender, seed, digest)
            verify_contribution(self._keys, self.run_id, round_index, entry.sender, body=body, signature=signature)
            sites.append(entry.sender)
            seeds.append(bytes(seed))
        others = len(sites) - (self.site in sites)
        if others < self.config.min_contributors:
            raise ProtocolAbort(f"{others} contributors besides this site < min_contributors {self.config.min_contributors}")
        self._decrypted_rounds.add(round_index)
        a_sum = expand_a(
            [(seed, _context(self.run_id, round_index, site)) for seed, site in zip(seeds, sites, strict=True)],
            encoding.limbs, encoding.rows, encoding.n,
        )
        try:
            plain = decrypt_sum(self._key, c0_sum.astype(np.uint64), a_sum, encoding.delta_bits, len(sites)).reshape(-1)
            if np.any(plain[encoding.dim + 1 :]) or int(np.max(np.abs(plain))) > len(sites) * encoding.levels:
                raise DecryptionError()
        except DecryptionError:
            self.halted = True  # fail closed: the next probe gets nothing
            raise
        return DecryptedSum(values=plain[: encoding.dim + 1] * encoding.step, contributors=tuple(sites))


class SharedKeyProtection(OneShotProtection):
    """Weighted FedAvg under a secret key that the sites share and the server never holds.

    For the in-process simulation this object also plays the setup: one key, a run id, and a fresh
    Ed25519 identity per site the first time it takes part. In the simulation one site decrypts
    the sum and hands the average to all (they would all decrypt the same sum).

    Args:
        config: the settings (see :class:`SharedKeyConfig`).
    """

    name: ClassVar[str] = "shared_key"
    noise_placement: ClassVar[NoisePlacement] = NoisePlacement.NONE

    def __init__(self, config: SharedKeyConfig | None = None) -> None:
        self.config = config or SharedKeyConfig()
        key = SecretKey.generate(self.config.poly_modulus_degree)
        self.run_id = secrets.token_bytes(RUN_ID_BYTES)
        self._client = SharedKeyClient(key, self.config, run_id=self.run_id)
        self.decryptor = SharedKeyDecryptor(key, self.config, run_id=self.run_id)
        self._identities: dict[str, SiteIdentity] = {}
        self.server: SharedKeyServer | None = None
        self.clipped: dict[str, int] = {}
        self.max_error = 0.0
        self._encoding: RoundEncoding | None = None
        self._bound = 1.0

    def __repr__(self) -> str:
        return f"SharedKeyProtection(config={self.config!r}, key=<hidden>)"

    @property
    def min_participants(self) -> int:
        """No site decrypts a sum of fewer than ``config.min_contributors`` sites."""
        return self.config.min_contributors

    def check_fits(self, num_clients: int) -> None:
        """Raises ConfigError if the modulus leaves no quantization level for ``num_clients`` sites."""
        RoundEncoding.for_round(self.config, 1, num_clients)

    def _identity(self, client: str) -> SiteIdentity:
        identity = self._identities.get(client)
        if identity is None:
            identity = SiteIdentity.generate(client)
            self.decryptor.register_site(client, identity.public_bytes())
            self._identities[client] = identity
        return identity

    def run_round(
        self, round_index: int, updates: Mapping[str, ClientUpdate], transport: Transport, *, release_noise: ReleaseNoise | None = None
    ) -> RoundResult:
        """See :meth:`Protection.run_round` (``release_noise`` is refused: every site sees the un-noised sum)."""
        if release_noise is not None or self.release_noise is not None:
            raise ConfigError("release_noise", "given", "the shared-key mode has no single party to add central noise")
        dims = {u.delta.shape[0] for u in updates.values()}
        if len(dims) == 1:
            try:
                self._encoding = RoundEncoding.for_round(self.config, dims.pop(), len(updates))
            except ConfigError as exc:
                raise ProtocolAbort(f"round {round_index}: {exc}") from exc
        self._bound = float(self.config.weight_bound or max((u.weight for u in updates.values()), default=1.0))
        self.clipped = {}
        return super().run_round(round_index, updates, transport)

    def _protect(self, round_index: int, client: str, update: ClientUpdate, num_participants: int) -> bytes:
        if self._encoding is None or self._encoding.participants != num_participants:
            raise ProtocolAbort(f"round {round_index}: the round's encoding was not set up")
        message, clipped = self._client.encrypt(
            round_index, update, self._encoding, weight_bound=self._bound, identity=self._identity(client)
        )
        self.clipped[client] = clipped
        return message

    def _server(self, dim: int) -> SharedKeyServer:
        if self._encoding is None:
            raise ProtocolAbort("the round's encoding was not set up")
        # Built from public values alone, as a remote server would be.
        return SharedKeyServer(self._encoding, run_id=self.run_id, sites=self.decryptor.sites())

    def _finalize(self, round_index: int, aggregate: bytes, dim: int, transport: Transport) -> tuple[np.ndarray, float, int]:
        encoding = self._encoding
        if encoding is None or self.server is None:
            raise ProtocolAbort(f"round {round_index}: no server state")
        sites = tuple(self.server.accepted_sites)
        if len(sites) < self.config.min_contributors:
            raise ProtocolAbort(
                f"round {round_index}: {len(sites)} valid updates < min_contributors {self.config.min_contributors}; "
                "no site decrypts a smaller sum",
                survivors=len(sites),
                threshold=self.config.min_contributors,
            )
        received = transport.deliver(SERVER, "clients", "aggregate", aggregate)
        if received is None:
            raise ProtocolAbort(f"round {round_index}: the encrypted sum was lost on its way to the sites")
        try:
            released = self.decryptor.decrypt(round_index, received, encoding)
        except DecryptionError as exc:
            raise ProtocolAbort(f"round {round_index}: the sites refused or could not decrypt the sum") from exc
        if released.contributors != sites:
            raise ProtocolAbort(f"round {round_index}: the sum holds {released.contributors}, the server accepted {sites}")
        c = float(self.config.clip_range)
        ratio_sum = released.values[dim] / c
        if not ratio_sum > 0:
            raise ProtocolAbort(f"round {round_index}: the decrypted total weight is not positive")
        self.max_error = encoding.max_error(len(sites))
        return released.values[:dim] * self._bound, ratio_sum * self._bound, len(received)
