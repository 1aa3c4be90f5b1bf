"""Key material for secure aggregation: X25519 pairs, Ed25519 identities, HKDF-SHA256, AES-GCM shares, AES-GMAC tags.

Every derivation binds a domain label and the context (round, client ids) into HKDF's ``info`` with
length prefixes, so two different contexts can never yield the same key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privfl.errors import MessageError

__all__ = [
    "KEY_BYTES",
    "SIGNATURE_BYTES",
    "TAG_BYTES",
    "IdentityKey",
    "KeyPair",
    "agree",
    "hkdf",
    "info",
    "open_sealed",
    "private_key_from_bytes",
    "public_key_from_bytes",
    "seal",
    "tag",
    "verify_signature",
    "verify_tag",
]

KEY_BYTES = 32
TAG_BYTES = 16
SIGNATURE_BYTES = 64
_NONCE_BYTES = 12
_DOMAIN = b"privfl-secagg-v1"
_RAW = serialization.Encoding.Raw


def info(*parts: bytes | str | int) -> bytes:
    """Builds an unambiguous HKDF ``info`` string: the domain, then each part length-prefixed.

    Args:
        *parts: labels, ids (str, UTF-8 encoded) and integers (8-byte big endian).

    Returns:
        The info bytes.
    """
    chunks = [_DOMAIN]
    for part in parts:
        if isinstance(part, int):
            raw = part.to_bytes(8, "big")
        elif isinstance(part, str):
            raw = part.encode("utf-8")
        else:
            raw = bytes(part)
        chunks.append(len(raw).to_bytes(4, "big"))
        chunks.append(raw)
    return b"".join(chunks)


def hkdf(secret: bytes, *context: bytes | str | int) -> bytes:
    """HKDF-SHA256 of ``secret`` to 32 bytes under the given context.

    Args:
        secret: input keying material.
        *context: parts passed to :func:`info`.

    Returns:
        32 derived bytes.
    """
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info(*context)).derive(secret)


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An X25519 key pair; the private half never shows in a repr."""

    private: X25519PrivateKey = field(repr=False)
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        """Makes a fresh pair from the operating system's CSPRNG."""
        private = X25519PrivateKey.generate()
        return cls(private=private, public=private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))

    def private_bytes(self) -> bytes:
        """The raw 32-byte private key (only for Shamir-sharing it)."""
        return self.private.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


@dataclass(frozen=True, slots=True)
class IdentityKey:
    """A client's long-term Ed25519 signing key (authenticated mode); the private half never shows in a repr.

    ``public`` is what the public-key infrastructure hands to every other client, out of band.
    """

    private: Ed25519PrivateKey = field(repr=False)
    public: bytes

    @classmethod
    def generate(cls) -> IdentityKey:
        """Makes a fresh identity from the operating system's CSPRNG."""
        private = Ed25519PrivateKey.generate()
        return cls(private=private, public=private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))

    def sign(self, statement: bytes) -> bytes:
        """Ed25519 signature (64 bytes) of ``statement``."""
        return self.private.sign(statement)


def verify_signature(public: bytes, signature: bytes, statement: bytes, *, signer: str) -> None:
    """Checks an Ed25519 signature by ``signer`` (whose registered key is ``public``).

    Raises:
        MessageError: malformed key or signature, or the signature does not verify.
    """
    if len(public) != KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        raise MessageError("malformed identity key or signature", sender=signer)
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, statement)
    except (InvalidSignature, ValueError) as exc:
        raise MessageError(f"signature of {signer!r} does not verify", sender=signer) from exc


def public_key_from_bytes(raw: bytes, *, sender: str | None = None) -> X25519PublicKey:
    """Parses a raw X25519 public key.

    Raises:
        MessageError: not 32 bytes.
    """
    if len(raw) != KEY_BYTES:
        raise MessageError(f"public key of {len(raw)} bytes, expected {KEY_BYTES}", sender=sender)
    return X25519PublicKey.from_public_bytes(raw)


def private_key_from_bytes(raw: bytes) -> X25519PrivateKey:
    """Parses a raw X25519 private key (after Shamir reconstruction)."""
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: X25519PrivateKey, peer_public: bytes, *, sender: str | None = None) -> bytes:
    """X25519 shared secret with a peer's raw public key.

    Raises:
        MessageError: the peer's key is malformed or a low-order point (all-zero shared secret).
    """
    try:
        return private.exchange(public_key_from_bytes(peer_public, sender=sender))
    except ValueError as exc:
        raise MessageError("public key yields no shared secret", sender=sender) from exc


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM with a random 96-bit nonce; returns nonce || ciphertext || tag."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes, *, sender: str | None = None) -> bytes:
    """Inverse of :func:`seal`.

    Raises:
        MessageError: too short, or the tag does not verify (altered, misrouted or replayed).
    """
    if len(sealed) < _NONCE_BYTES + TAG_BYTES:
        raise MessageError("sealed share too short", sender=sender)
    try:
        return AESGCM(key).decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], associated)
    except InvalidTag as exc:
        raise MessageError("share failed authentication", sender=sender) from exc


_ZERO_NONCE = bytes(_NONCE_BYTES)


def tag(key: bytes, data: bytes | memoryview) -> bytes:
    """AES-256-GMAC tag (GCM over empty plaintext, ``data`` as associated data).

    ``key`` must authenticate one message only (derive it per step and direction), which is what makes
    the fixed nonce safe. GMAC runs several times faster than Poly1305 here (carry-less multiply), which
    matters because the server authenticates every masked vector.
    """
    return AESGCM(key).encrypt(_ZERO_NONCE, b"", data)


def verify_tag(key: bytes, data: bytes | memoryview, expected: bytes, *, sender: str | None = None) -> None:
    """Checks a :func:`tag` (constant time inside OpenSSL).

    Raises:
        MessageError: the tag does not match.
    """
    if len(expected) != TAG_BYTES:
        raise MessageError("message failed authentication", sender=sender)
    try:
        AESGCM(key).decrypt(_ZERO_NONCE, expected, data)
    except InvalidTag as exc:
        raise MessageError("message failed authentication", sender=sender) from exc
