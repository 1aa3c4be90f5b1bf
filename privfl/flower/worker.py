"""A site worker: one long-lived process holding a Site, answering requests over a Unix socket.

Flower runs every ClientApp message in a fresh process, which then pays for importing torch and
Opacus (seconds) before it can train. A site that runs this worker next to its SuperNode keeps the
Site (its data loaded, torch imported) in one process; the ClientApp only forwards the request bytes
to the worker's socket and the reply back. The socket lives in the site's state directory and is
created readable and writable by its owner only, so only the site's own account can talk to it.

Framing on the socket: an 8-byte big-endian length, then the bytes; one request per connection.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import socketserver
import struct
import sys
from pathlib import Path

__all__ = ["call", "main", "serve"]

log = logging.getLogger("privfl")

_LENGTH = struct.Struct(">Q")
_MAX_MESSAGE = 1 << 34


def _read_exact(sock: socket.socket, count: int) -> bytes:
    chunks, remaining = [], count
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError("the peer closed the connection mid-message")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_message(sock: socket.socket) -> bytes:
    (length,) = _LENGTH.unpack(_read_exact(sock, _LENGTH.size))
    if length > _MAX_MESSAGE:
        raise ConnectionError(f"message of {length} bytes is over the limit")
    return _read_exact(sock, length)


def _send_message(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(payload)))
    sock.sendall(payload)


def call(socket_path: str | os.PathLike[str], payload: bytes, *, timeout: float = 3600.0) -> bytes:
    """Sends one request to a site worker and returns its reply.

    Raises:
        ConnectionError / OSError: the worker is not running or closed the connection.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        _send_message(sock, payload)
        return _read_message(sock)


def serve(site, socket_path: str | os.PathLike[str], *, faults: frozenset[tuple[str, int]] = frozenset()) -> None:
    """Serves ``site`` on a Unix socket until interrupted (SIGTERM or Ctrl-C).

    Args:
        faults: (step, round) pairs at which the worker closes the connection without an answer,
            as a site that died at that step would (fault injection for tests).

    Raises:
        OSError: the socket cannot be created (e.g. another worker holds it).
    """
    path = Path(socket_path)
    if path.exists():
        try:
            call(path, b"", timeout=2.0)
        except OSError:
            path.unlink()  # a stale socket of a worker that is gone
        else:
            raise OSError(f"another site worker is serving {path}")

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                request = _read_message(self.request)
            except (ConnectionError, OSError) as exc:
                log.warning("site worker: bad connection: %s", exc)
                return
            if faults and _step_of(request) in faults:
                log.warning("site worker: fault injected, no answer to %s", _step_of(request))
                return
            _send_message(self.request, site.handle(request))

    old = os.umask(0o177)  # the socket: owner read/write only
    try:
        server = socketserver.UnixStreamServer(str(path), Handler)
    finally:
        os.umask(old)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    log.info("site worker for %s listening on %s", site.name, path)
    try:
        with server:
            server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        path.unlink(missing_ok=True)


def _step_of(request: bytes) -> tuple[str, int] | None:
    from privfl.envelope import decode_request
    from privfl.errors import MessageError

    try:
        parsed = decode_request(request)
    except MessageError:
        return None
    return parsed.step.value, parsed.round_index


def _fault(value: str) -> tuple[str, int]:
    step, _, round_index = value.partition("@")
    if not step or not round_index.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: expected STEP@ROUND, e.g. secagg-unmask@0")
    return step, int(round_index)


def main(argv: list[str] | None = None) -> int:
    """``python -m privfl.flower.worker --site NAME --data SRC --state-dir DIR [...]``."""
    parser = argparse.ArgumentParser(prog="python -m privfl.flower.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--site", required=True)
    parser.add_argument("--data", required=True, help="CSV/Parquet file with a label column, or module:function")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--budget", type=float)
    parser.add_argument("--role", default="site", choices=["site", "key-holder"])
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--peers", help="secure aggregation: JSON file of the other sites' identity keys (name -> 64 hex digits), given out of band",
    )
    parser.add_argument(
        "--allow-noise-seed", action="store_true",
        help="join runs whose config fixes federation.noise_seed (simulations only: the server could then regenerate the noise)",
    )
    parser.add_argument(
        "--key-holder-key", help="the CKKS key holder's identity public key, 64 hex digits (`privfl identity STATE_DIR` prints it)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--socket", help="default: STATE_DIR/site.sock")
    parser.add_argument(
        "--fault", action="append", type=_fault, default=[], metavar="STEP@ROUND",
        help="for tests: close the connection without answering this step of this round (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from privfl.errors import PrivflError
    from privfl.site import Site, load_peer_keys, load_site_dataset

    torch.set_num_threads(args.threads)
    try:
        site = Site(
            args.site,
            load_site_dataset(args.data, label_column=args.label_column),
            args.state_dir,
            budget=args.budget,
            role=args.role,
            device=args.device,
            key_holder_key=args.key_holder_key,
            allow_noise_seed=args.allow_noise_seed,
            peer_keys=None if args.peers is None else load_peer_keys(args.peers),
        )
    except PrivflError as exc:
        # Bad input before serving (a missing file, a column that is not there): one line, as privfl's
        # commands say it (the flags are --data, --label-column, ...), not a traceback.
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    site.warm_up()
    serve(site, args.socket or Path(args.state_dir) / "site.sock", faults=frozenset(args.fault))
    return 0


if __name__ == "__main__":
    sys.exit(main())
