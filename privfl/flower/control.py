"""The SuperLink's Control API from this process: node-key registration and run status.

``flwr supernode register`` and ``flwr ls`` each start a Python process that imports Flower (about
1 s of CPU each); a local deployment needs one registration per site and one status query per run,
on a machine that is also starting every site. :class:`ControlClient` makes the same requests
(``RegisterNode``, ``ListRuns``) over one TLS connection from the calling process, with the headers
the ``flwr`` CLI sends. It uses Flower's Control API client, which is not a public API: it is used
only with the Flower minor version :mod:`privfl.flower.node` was written for, and
:func:`control_client` returns None otherwise, so callers fall back to the ``flwr`` commands.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from privfl.errors import DeploymentError

__all__ = ["ControlClient", "control_client"]


def _supported() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    from privfl.flower.node import SUPPORTED_FLOWER

    try:
        installed = version("flwr")
    except PackageNotFoundError:
        return False
    return installed == SUPPORTED_FLOWER or installed.startswith(SUPPORTED_FLOWER + ".")


class ControlClient:
    """One connection to a SuperLink's Control API (TLS, verified against ``ca_cert``).

    Args:
        address: ``HOST:PORT`` of the SuperLink.
        ca_cert: The CA certificate (PEM file) the SuperLink's certificate chains to.
    """

    def __init__(self, address: str, ca_cert: str | Path) -> None:
        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        self._client: Any = ControlHttpClient.from_server_address(
            server_address=address,
            insecure=False,
            root_certificates=Path(ca_cert).read_bytes(),
            interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        )

    def register_nodes(self, public_keys: Sequence[Path]) -> list[int]:
        """Registers each public key (an OpenSSH ECDSA key file, as ``flwr supernode register`` takes) as a
        SuperNode allowed to join.

        Returns:
            The node id the SuperLink gave each key, in order.

        Raises:
            DeploymentError: A key could not be read, or the SuperLink refused one (the message names it).
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=no-name-in-module

        ids = []
        for path in public_keys:
            try:
                key = serialization.load_ssh_public_key(Path(path).read_bytes())
            except (OSError, ValueError) as exc:
                raise DeploymentError(f"cannot read the node key {path}: {exc}") from exc
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise DeploymentError(f"the node key {path} is not an ECDSA key")
            pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            try:
                response = self._client.RegisterNode(RegisterNodeRequest(public_key=pem))
            except Exception as exc:  # Flower raises its own transport and API error types
                raise DeploymentError(f"could not register {Path(path).name} with the SuperLink: {exc}") from exc
            if not response.node_id:
                raise DeploymentError(f"the SuperLink did not register {Path(path).name}")
            ids.append(int(response.node_id))
        return ids

    def run_status(self, run_id: int) -> str:
        """Flower's status of a run as ``flwr ls`` shows it (``"running"``, ``"finished:completed"``, ...).

        Returns ``"unknown"`` if the SuperLink could not be asked or does not know the run.
        """
        import logging
        import time

        from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=no-name-in-module

        for attempt in range(3):
            try:
                response = self._client.ListRuns(ListRunsRequest(run_id=int(run_id)))
                run = response.run_dict[int(run_id)]
                break
            except Exception as exc:  # a transport glitch: ask again; a lasting failure reads as unknown
                if attempt == 2:
                    logging.getLogger("privfl").warning("could not read the status of run %s: %s", run_id, exc)
                    return "unknown"
                time.sleep(0.5)
        status, sub_status = str(run.status.status), str(run.status.sub_status)
        return f"{status}:{sub_status}" if sub_status else status

    def close(self) -> None:
        self._client.close()


def control_client(address: str, ca_cert: str | Path) -> ControlClient | None:
    """A :class:`ControlClient`, or None when the installed Flower is not the supported version (or its
    Control API client is not where this module expects it)."""
    if not _supported():
        return None
    try:
        return ControlClient(address, ca_cert)
    except ImportError:
        return None
