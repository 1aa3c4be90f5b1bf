"""Site identities for CKKS: Ed25519-signed contributions, so the key holder decrypts only real sums.

Why: the key holder cannot tell a sum of ciphertexts from one site's ciphertext. Without this, a
malicious server forwards alice's ciphertext alone (or with Enc(0)s of its own) and the key holder
decrypts alice's update for it. Each site signs::

    "privfl/ckks/contribution/v1" | run_id (16 bytes) | round (u32) | len(site) (u16) | site | SHA-256(body)

where ``body`` is the update frame without the signature. The key holder verifies each signature
against the site's key registered at setup, and so knows which distinct sites' ciphertexts, made for
this run and this round, it is summing. Under client-level DP a site also signs the clip norm S it
clipped its update to (domain ``privfl/ckks/contribution-clip/v1``, S as a big-endian float64 after
the site): the key holder checks the signatures against the S it noises for, so it never releases a
sum whose updates were clipped to another S than its noise is planned for.

In a deployment the public context reaches the sites through the server, which must not be able to
swap in a context of its own (it would then hold the secret key of every site's ciphertext). The
key holder vouches for the context it made::

    "privfl/ckks/context/v1" | len(run) (u16) | run | SHA-256(run config) | run_id (16 bytes) | SHA-256(public context)

(``run`` names the deployment's run, the run config is the TOML text the party received), and each
site checks that signature against the key holder's identity key, which it got out of band, and
against its own copy of the run config (:func:`vouch_context`, :func:`check_context`): the server
cannot hand the key holder another config (say, less client-level noise) than the sites.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from privfl.errors import ConfigError, MessageError

__all__ = [
    "RUN_ID_BYTES",
    "SIGNATURE_BYTES",
    "SiteIdentity",
    "SiteRegistry",
    "check_context",
    "contribution_statement",
    "load_public_key",
    "verify_contribution",
    "vouch_context",
]

_DOMAIN = b"privfl/ckks/contribution/v1"
_CLIP_DOMAIN = b"privfl/ckks/contribution-clip/v1"
_CONTEXT_DOMAIN = b"privfl/ckks/context/v1"
RUN_ID_BYTES = 16
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
_STATEMENT = struct.Struct(">IH")


@dataclass(frozen=True, slots=True)
class SiteIdentity:
    """A site's long-term Ed25519 signing key; the public half is registered with the key holder.

    Args:
        site: the site id it signs for.
        private_key: the signing key (never printed).
    """

    site: str
    private_key: Ed25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls, site: str) -> SiteIdentity:
        """A fresh identity (the key comes from the OS's cryptographic generator via ``cryptography``)."""
        return cls(site=site, private_key=Ed25519PrivateKey.generate())

    def public_bytes(self) -> bytes:
        """The 32-byte raw public key to register."""
        return self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, run_id: bytes, round_index: int, body: bytes, *, clip_norm: float | None = None) -> bytes:
        """Signs one contribution (the update frame ``body``, without signature; under client-level
        DP with the clip norm the update was clipped to)."""
        return self.private_key.sign(contribution_statement(run_id, round_index, self.site, body, clip_norm=clip_norm))


def contribution_statement(run_id: bytes, round_index: int, site: str, body: bytes, *, clip_norm: float | None = None) -> bytes:
    """The exact bytes a site signs for one round's contribution (``clip_norm``: see the module doc)."""
    site_bytes = site.encode("utf-8")
    if len(run_id) != RUN_ID_BYTES or not 0 <= round_index < 2**32 or len(site_bytes) >= 2**16:
        raise ConfigError("contribution", (len(run_id), round_index, len(site_bytes)), "run id, round or site id out of range")
    head = [_DOMAIN, run_id, _STATEMENT.pack(round_index, len(site_bytes)), site_bytes]
    if clip_norm is not None:
        head = [_CLIP_DOMAIN, run_id, _STATEMENT.pack(round_index, len(site_bytes)), site_bytes, struct.pack(">d", float(clip_norm))]
    return b"".join([*head, hashlib.sha256(body).digest()])


def load_public_key(site: str, raw: bytes) -> Ed25519PublicKey:
    """Parses a registered site key.

    Raises:
        ConfigError: not a 32-byte Ed25519 public key.
    """
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != PUBLIC_KEY_BYTES:
        raise ConfigError(f"sites[{site!r}]", f"<{len(raw) if hasattr(raw, '__len__') else raw!r}>", "must be a 32-byte Ed25519 public key")
    try:
        return Ed25519PublicKey.from_public_bytes(bytes(raw))
    except ValueError as exc:
        raise ConfigError(f"sites[{site!r}]", "<32 bytes>", "is not an Ed25519 public key") from exc


class SiteRegistry:
    """The registered sites' Ed25519 identity keys, held by whoever checks signed contributions.

    A mixin for the decrypting roles (the CKKS key holder, the shared-key decrypting site): they set
    ``_keys`` and ``_public_keys`` to empty dicts when made.
    """

    _keys: dict[str, Ed25519PublicKey]
    _public_keys: dict[str, bytes]

    def register_site(self, site: str, public_key: bytes) -> None:
        """Registers a site's Ed25519 identity key (at setup, over an authenticated channel).

        Raises:
            ConfigError: not an Ed25519 key, or the site is already registered with another key.
        """
        key = load_public_key(site, public_key)
        known = self._public_keys.get(site)
        if known is not None and known != bytes(public_key):
            raise ConfigError(f"sites[{site!r}]", "<another key>", "is already registered with a different key")
        self._keys[site] = key
        self._public_keys[site] = bytes(public_key)

    def sites(self) -> dict[str, bytes]:
        """The registered sites' public keys (public information, e.g. for the server)."""
        return dict(self._public_keys)


def verify_contribution(
    keys: Mapping[str, Ed25519PublicKey],
    run_id: bytes,
    round_index: int,
    site: str,
    *,
    body: bytes,
    signature: bytes,
    clip_norm: float | None = None,
) -> None:
    """Checks a contribution's signature against the site's registered key (and, under client-level
    DP, that the site signed this clip norm).

    Raises:
        MessageError: unknown site or a signature that does not verify.
    """
    key = keys.get(site)
    if key is None:
        raise MessageError(f"site {site!r} is not registered", sender=site)
    if len(signature) != SIGNATURE_BYTES:
        raise MessageError("signature has the wrong length", sender=site)
    try:
        key.verify(bytes(signature), contribution_statement(run_id, round_index, site, body, clip_norm=clip_norm))
    except InvalidSignature:
        raise MessageError("signature does not verify", sender=site) from None


def _context_statement(run: str, config: str, run_id: bytes, public_context: bytes) -> bytes:
    run_bytes = run.encode("utf-8")
    if len(run_id) != RUN_ID_BYTES or len(run_bytes) >= 2**16:
        raise MessageError("the CKKS run id must be 16 bytes and the run name shorter than 64 KiB")
    return b"".join([
        _CONTEXT_DOMAIN, struct.pack(">H", len(run_bytes)), run_bytes, hashlib.sha256(config.encode("utf-8")).digest(), run_id,
        hashlib.sha256(public_context).digest(),
    ])


def vouch_context(private_key: Ed25519PrivateKey, run: str, config: str, run_id: bytes, public_context: bytes) -> bytes:
    """The key holder's signature on the public context it made for ``run`` under the run config ``config``
    (the TOML text it received: it noises client-level releases by it), with its CKKS ``run_id``."""
    return private_key.sign(_context_statement(run, config, run_id, public_context))


def check_context(key_holder_key: bytes, run: str, config: str, run_id: bytes, public_context: bytes, *, signature: bytes) -> None:
    """Checks that the key holder whose identity key is ``key_holder_key`` made this context for ``run``
    under the same run config as this site's (``config``, the TOML text).

    Raises:
        MessageError: the signature is missing, malformed or does not verify (a context from anyone
            else, one the key holder made for another run, or under another config).
        ConfigError: ``key_holder_key`` is not an Ed25519 public key.
    """
    key = load_public_key("key-holder", key_holder_key)
    if len(signature) != SIGNATURE_BYTES:
        raise MessageError("the CKKS public context carries no valid key-holder signature")
    try:
        key.verify(bytes(signature), _context_statement(run, config, run_id, public_context))
    except InvalidSignature:
        raise MessageError(
            "the CKKS public context is not signed by this site's key holder for this run and this run config: "
            "refusing to encrypt under it"
        ) from None
