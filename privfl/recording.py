"""Recording what the server observes, so that attacks run on the bytes a real run produced.

:class:`ServerViewRecorder` is a :class:`~privfl.protocols.base.Transport` that passes every message
on (through an inner transport) and writes down the ones the server sees: each message it receives,
each message it sends, and the released average on its way to the clients. A run directory's
``observed/`` folder then holds, per round, exactly those bytes plus a hash of the global model the
round started from; ``privfl attack --run RUN_DIR`` (:func:`privfl.attacks.recorded.attack_recording`)
decodes them the way the server would and runs the bundled attacks on what it can read.

The recording is a copy of the server's view, nothing more: under plaintext it holds every site's
update in the clear (which the server held anyway), under CKKS ciphertexts and under secure
aggregation masked vectors. It is off by default; a run directory with a recording deserves the
same care as the server's own storage.

Layout::

    observed/index.jsonl        one JSON line per round start and per message
    observed/round-0003/0007.bin  the bytes of message 7 of round 3, as they arrived
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from privfl.errors import ConfigError
from privfl.protocols.base import KEY_HOLDER, SERVER, DirectTransport, Transport

__all__ = [
    "OBSERVED_DIR",
    "RecordedMessage",
    "RecordedRound",
    "ServerViewRecorder",
    "load_server_view",
    "parameters_digest",
]

OBSERVED_DIR = "observed"
INDEX_FILE = "index.jsonl"
# The key holder's released average reaches the sites through the server in any deployment.
_RELAYED_SENDERS = frozenset({SERVER, KEY_HOLDER})


def parameters_digest(params: np.ndarray) -> str:
    """SHA-256 of a flat parameter vector as float32 little-endian bytes (what a checkpoint holds)."""
    return hashlib.sha256(np.ascontiguousarray(params, dtype="<f4").tobytes()).hexdigest()


class ServerViewRecorder:
    """A transport that records everything the server observes into ``directory``.

    Args:
        directory: where the recording goes (created; a run's ``observed/`` folder). An existing
            recording is appended to, so a resumed run continues it; a round started again
            supersedes what its interrupted start recorded.
        inner: the transport that actually carries the messages (default: in-process, lossless).
            What is recorded is what *arrived*: a message the inner transport loses is not.

    Call :meth:`begin_round` at the start of every round.
    """

    def __init__(self, directory: str | os.PathLike[str], inner: Transport | None = None) -> None:
        self.directory = Path(directory)
        self.inner: Transport = inner or DirectTransport()
        self._round: int | None = None
        self._seq = 0
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError("record", str(self.directory), f"cannot be created: {exc.strerror or exc}") from None

    def __repr__(self) -> str:
        return f"ServerViewRecorder(directory={str(self.directory)!r}, round={self._round})"

    def begin_round(self, round_index: int, global_params: np.ndarray) -> None:
        """Starts recording round ``round_index``, which begins from ``global_params``."""
        self._round = int(round_index)
        self._seq = 0
        folder = self._round_dir(self._round)
        folder.mkdir(exist_ok=True)
        for stale in folder.glob("*.bin"):  # an interrupted earlier start of this round
            stale.unlink()
        self._append({"event": "round", "round": self._round, "dim": len(global_params),
                      "global_sha256": parameters_digest(global_params)})

    def deliver(self, sender: str, receiver: str, step: str, payload: bytes) -> bytes | None:
        arrived = self.inner.deliver(sender, receiver, step, payload)
        if arrived is not None and self._round is not None and (receiver == SERVER or sender in _RELAYED_SENDERS):
            name = f"{self._seq:04d}.bin"
            (self._round_dir(self._round) / name).write_bytes(arrived)
            self._append({"event": "message", "round": self._round, "seq": self._seq, "sender": sender,
                          "receiver": receiver, "step": step, "file": name, "bytes": len(arrived),
                          "sha256": hashlib.sha256(arrived).hexdigest()})
            self._seq += 1
        return arrived

    def _round_dir(self, round_index: int) -> Path:
        return self.directory / f"round-{round_index:04d}"

    def _append(self, entry: dict[str, object]) -> None:
        with open(self.directory / INDEX_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")


@dataclass(frozen=True, slots=True)
class RecordedMessage:
    """One message the server observed: who sent it to whom, at which protocol step, and its bytes."""

    seq: int
    sender: str
    receiver: str
    step: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class RecordedRound:
    """One round of a recording: the global model it started from (by hash) and the messages."""

    round: int
    dim: int
    global_sha256: str
    messages: tuple[RecordedMessage, ...]

    def received(self, step: str) -> Iterator[RecordedMessage]:
        """The messages the server received at ``step`` (e.g. ``"update"``), in arrival order."""
        return (m for m in self.messages if m.receiver == SERVER and m.step == step)


def _bad(path: Path, line: int, why: str) -> ConfigError:
    return ConfigError(OBSERVED_DIR, f"{path}:{line}", f"is not a usable recording: {why}")


def load_server_view(run_dir: str | os.PathLike[str]) -> list[RecordedRound]:
    """Reads a run's recording, checking every message against the hash written with it.

    Returns:
        The rounds in order; for a round recorded more than once (a resumed run), the last start.

    Raises:
        ConfigError: no recording in ``run_dir`` (the run was made without ``--record``), or a line,
            file or hash that does not check out.
    """
    directory = Path(run_dir) / OBSERVED_DIR
    index = directory / INDEX_FILE
    if not index.is_file():
        from privfl.rundir import AGGREGATOR_FILE

        how = (
            "`privfl deploy local --record` (or Aggregator(..., record=True))"
            if (Path(run_dir) / AGGREGATOR_FILE).is_file()  # a deployment's server run directory
            else "`privfl run --record` (or Federation(..., record=True))"
        )
        raise ConfigError("run", str(run_dir), f"holds no recording of what the server observed; make the run with {how}")
    rounds: dict[int, tuple[int, str, list[tuple[int, RecordedMessage, str]]]] = {}
    with open(index, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            try:
                entry = json.loads(line)
                event, r = entry["event"], entry["round"]
                if not isinstance(r, int) or isinstance(r, bool) or r < 0:
                    raise TypeError("round")
                if event == "round":
                    dim, digest = entry["dim"], entry["global_sha256"]
                    if not (isinstance(dim, int) and dim > 0 and isinstance(digest, str)):
                        raise TypeError("round start")
                    rounds[r] = (dim, digest, [])
                    continue
                if event != "message":
                    raise TypeError(f"event {event!r}")
                seq, name, digest = entry["seq"], entry["file"], entry["sha256"]
                if not (isinstance(seq, int) and isinstance(name, str) and name == f"{seq:04d}.bin"):
                    raise TypeError("file name")
                sender, receiver, step = (str(entry[k]) for k in ("sender", "receiver", "step"))
            except (ValueError, KeyError, TypeError) as exc:
                if not line.endswith("\n"):
                    break  # a torn last line: the run stopped while writing it
                raise _bad(index, number, f"malformed entry ({exc})") from None
            if r not in rounds:
                raise _bad(index, number, f"a message of round {r} before the round's start")
            rounds[r][2].append((number, RecordedMessage(seq=seq, sender=sender, receiver=receiver, step=step, payload=b""), digest))
    # Files are read once the index is parsed: a round started again has replaced the files of its
    # interrupted start, whose index lines the new start made obsolete.
    out = []
    for r, (dim, digest, entries) in sorted(rounds.items()):
        messages = []
        for number, message, file_digest in entries:
            name = f"{message.seq:04d}.bin"
            try:
                payload = (directory / f"round-{r:04d}" / name).read_bytes()
            except OSError as exc:
                raise _bad(index, number, f"{name} of round {r} cannot be read ({exc.strerror or exc})") from None
            if hashlib.sha256(payload).hexdigest() != file_digest:
                raise _bad(index, number, f"{name} of round {r} does not match its recorded hash")
            messages.append(RecordedMessage(message.seq, message.sender, message.receiver, message.step, payload))
        out.append(RecordedRound(round=r, dim=dim, global_sha256=digest, messages=tuple(messages)))
    return out
