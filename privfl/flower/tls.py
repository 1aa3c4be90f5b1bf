"""TLS and SuperNode-authentication key material for a Flower deployment (a private CA, a SuperLink certificate).

The CA and the server certificate use ECDSA on P-256 with SHA-256, which gRPC, uvicorn/OpenSSL and
httpx all accept. The server certificate names ``127.0.0.1``, ``::1`` and ``localhost`` (and any extra
hosts the caller adds) as subject alternative names: SuperNodes, ``flwr run`` and Flower's internal
SuperExec check the name they dialled against these, so an address missing here fails the TLS handshake.

Threat model: the CA key never leaves the directory it is written to (mode 0600) and is used once,
to sign the server certificate; anyone who can read it can impersonate the SuperLink.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privfl.errors import ConfigError

__all__ = ["NodeAuthKeys", "TlsMaterial", "generate_node_auth_keys", "generate_tls_material"]

_DEFAULT_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True, kw_only=True, slots=True)
class TlsMaterial:
    """Paths of the PEM files written by `generate_tls_material`.

    Attributes:
        ca_cert: The CA certificate: SuperNodes' ``--root-certificates``, the SuperLink's
            ``--ssl-ca-certfile`` and ``root-certificates`` of a ``flwr`` CLI connection.
        ca_key: The CA private key (mode 0600); only needed to sign more certificates.
        server_cert: The SuperLink certificate (``--ssl-certfile``).
        server_key: The SuperLink private key (``--ssl-keyfile``, mode 0600).
        hosts: The names and addresses the server certificate is valid for.
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeAuthKeys:
    """One SuperNode's authentication key pair, in the OpenSSH formats Flower reads.

    Attributes:
        private_key: OpenSSH private key file (mode 0600): ``flower-supernode --auth-supernode-private-key``.
        public_key: OpenSSH public key file (``ecdsa-sha2-nistp256 ...``): what
            ``flwr supernode register`` takes to let the node in when the SuperLink runs with
            ``--enable-supernode-auth``.
    """

    private_key: Path
    public_key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only, never briefly world-readable."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def _key_usage(*, key_cert_sign: bool = False, crl_sign: bool = False, key_agreement: bool = False) -> x509.KeyUsage:
    """Digital signatures, plus what the certificate's role needs (a CA signs certificates and CRLs)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def generate_tls_material(
    directory: str | os.PathLike[str],
    *,
    extra_hosts: Sequence[str] = (),
    valid_days: int = 30,
) -> TlsMaterial:
    """Create a private CA and a SuperLink server certificate signed by it.

    Writes ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` into ``directory`` (created if
    missing; existing files are replaced). Key files get mode 0600.

    Args:
        directory: Where to write the PEM files.
        extra_hosts: More DNS names or IP addresses for the server certificate, beyond
            ``127.0.0.1``, ``::1`` and ``localhost``.
        valid_days: Validity of both certificates, from one hour ago (clock skew) on.

    Returns:
        The paths of the four files and the hosts the server certificate names.

    Raises:
        ConfigError: If ``valid_days`` is not positive or a host is empty.
    """
    if valid_days < 1:
        raise ConfigError("valid_days", valid_days, "must be at least 1")
    hosts = tuple(dict.fromkeys((*_DEFAULT_HOSTS, *extra_hosts)))
    for host in hosts:
        if not host or not host.strip():
            raise ConfigError("extra_hosts", host, "a host name or address must not be empty")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    now = _dt.datetime.now(_dt.timezone.utc)
    not_before = now - _dt.timedelta(hours=1)
    not_after = now + _dt.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "privfl local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "privfl superlink")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(key_agreement=True), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    no_encryption = serialization.NoEncryption()
    pkcs8 = serialization.PrivateFormat.PKCS8
    pem = serialization.Encoding.PEM
    material = TlsMaterial(
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
        hosts=hosts,
    )
    material.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    _write_private(material.ca_key, ca_key.private_bytes(pem, pkcs8, no_encryption))
    material.server_cert.write_bytes(server_cert.public_bytes(pem))
    _write_private(material.server_key, server_key.private_bytes(pem, pkcs8, no_encryption))
    return material


def generate_node_auth_keys(directory: str | os.PathLike[str], name: str) -> NodeAuthKeys:
    """Create one SuperNode's ECDSA P-256 authentication key pair in OpenSSH format.

    Flower 1.42 authenticates SuperNodes (when the SuperLink runs with ``--enable-supernode-auth``)
    by a signature with this key on every Fleet API request; the public key must first be
    registered with ``flwr supernode register``.

    Args:
        directory: Where to write ``{name}`` (private, mode 0600) and ``{name}.pub``.
        name: File stem, e.g. ``"node-0"``; letters, digits, ``-``, ``_`` and ``.`` only.

    Returns:
        The paths of the private and the public key files.

    Raises:
        ConfigError: If ``name`` is empty or contains other characters.
    """
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name) or name.startswith("."):
        raise ConfigError("name", name, "use letters, digits, '-', '_' and '.' only, not starting with '.'")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    keys = NodeAuthKeys(private_key=out / name, public_key=out / f"{name}.pub")
    _write_private(
        keys.private_key,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    keys.public_key.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" privfl-{name}\n".encode()
    )
    return keys
