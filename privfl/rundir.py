"""The run directory: its file names, durable writes, the exclusive run lock, and typed loaders.

Everything a run writes must survive a power loss in a state a resume can trust, and two
processes must never run in one directory at once (both would charge budgets from the same
starting point and the last writer would erase the other's spending). So:

- every state file is written to a temporary file, fsynced, renamed over the old one with
  ``os.replace`` and then the directory is fsynced (:func:`durable_write_bytes`); a crash
  leaves either the old file or the new one, never a torn one;
- the privacy ledger is an append-only journal (see :mod:`privfl.accounting`) whose every line
  is fsynced when written;
- ``history.json`` holds one round record per line and grows by an fsynced in-place append per
  round (:class:`HistoryWriter`): rewriting it whole each round cost O(rounds x sites) per round.
  An append cut short by a crash leaves a last line that does not parse; :func:`load_history`
  drops it (that round was not checkpointed yet, or is recorded as interrupted on resume);
- :class:`RunLock` holds an exclusive ``flock`` on ``run.lock`` for the whole run and records
  who holds it (pid, host, start time), so a second run is refused with
  :class:`~privfl.errors.RunLockedError`. ``flock`` is advisory and local: it does not protect a
  directory shared over NFS between machines;
- loaders of run.json, history.json and checkpoints raise :class:`~privfl.errors.ConfigError`
  naming the file on anything they cannot trust, never a bare ``JSONDecodeError`` or
  ``KeyError``.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

from privfl.accounting import LedgerStatus, PrivacyLedger
from privfl.errors import ConfigError, LedgerError, RunLockedError
from privfl.results import RoundRecord

log = logging.getLogger("privfl")

__all__ = [
    "AGGREGATOR_FILE",
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "HISTORY_FILE",
    "LEDGER_FILE",
    "LEDGER_KEY_FILE",
    "LEGACY_LEDGER_FILE",
    "LOCK_FILE",
    "RUN_FILE",
    "RUN_TRACES",
    "SITE_FILE",
    "SUMMARY_FILE",
    "HistoryFollower",
    "HistoryWriter",
    "RunLock",
    "check_ledger_against_history",
    "check_ledger_presence",
    "check_run_directory",
    "checkpoint_path",
    "directory_kind",
    "durable_write_bytes",
    "durable_write_json",
    "filesystem_error",
    "fsync_directory",
    "interrupted_run_hint",
    "is_run_directory_error",
    "load_checkpoint",
    "load_history",
    "load_run_identity",
    "run_traces",
    "save_checkpoint",
]

RUN_FILE = "run.json"
LEDGER_FILE = "ledger.jsonl"
LEDGER_KEY_FILE = "ledger.key"
LEGACY_LEDGER_FILE = "ledger.json"
"""Format 1 ledgers (one JSON document, unchained); recognised only to refuse them clearly."""
HISTORY_FILE = "history.json"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.toml"
"""The run config as the run started it (``privfl run`` writes it; ``--resume`` without a config reads it)."""
AGGREGATOR_FILE = "aggregator.json"
"""In a deployment's server run directory: the run id, the config's SHA-256 and the sites (what a resume must match)."""
SITE_FILE = "site.json"
"""In a site's state directory: the name of the site it belongs to."""
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = "run.lock"
RUN_TRACES = (LEGACY_LEDGER_FILE, RUN_FILE, HISTORY_FILE, SUMMARY_FILE, CHECKPOINT_DIR)
"""Files whose presence means a run took place here (and so spent privacy)."""

_MAX_JSON_BYTES = 256 * 2**20
"""A state file above this size is refused rather than read (history of 10^5 rounds fits)."""


# -- filesystem errors ---------------------------------------------------------------------------------
_ERRNO_ADVICE = {
    errno.ENOSPC: "free space first",
    errno.EDQUOT: "the disk quota is exhausted; free space first",
    errno.EROFS: "the file system is read-only; choose a directory on a writable one",
    errno.EACCES: "permission denied; choose a directory you can write to",
    errno.EPERM: "operation not permitted; choose a directory you can write to",
    errno.EEXIST: "a file of that name exists; choose a directory path",
    errno.ENOTDIR: "a component of the path is a file, not a directory; choose a directory path",
    errno.ENOENT: "nothing can be created at that path (a missing parent, or a file system such as /proc); choose another directory",
}


def filesystem_error(
    exc: OSError, field: str, path: str | os.PathLike[str], action: str, *, then: str | None = None
) -> ConfigError:
    """The typed error for an ``OSError`` met while ``action`` (e.g. "write summary.json") under ``path``.

    The message names the path, the operation, the system's reason and what to do (``then``, e.g.
    how to resume), so that the command line prints one clear line (exit 2) instead of a traceback.
    """
    reason = exc.strerror or str(exc)
    advice = [a for a in (_ERRNO_ADVICE.get(exc.errno or 0), then) if a]
    where = f" ({os.fsdecode(exc.filename)})" if exc.filename and os.fsdecode(exc.filename) != str(path) else ""
    return ConfigError(field, str(path), f"cannot {action}{where}: {reason}" + "".join(f"; {a}" for a in advice))


def is_run_directory_error(exc: OSError, run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``exc`` came from writing ``run_dir``: a path inside it, or no path and a storage errno.

    Writes through an open file descriptor (the ledger journal, fsync) carry no file name; the
    errnos below are the storage failures such writes meet.
    """
    if exc.filename is None:
        return exc.errno in {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}
    try:
        root = Path(run_dir).absolute()
        path = Path(os.fsdecode(exc.filename)).absolute()
    except (TypeError, ValueError):
        return False
    return path == root or root in path.parents


# -- durable writes -----------------------------------------------------------------------------------
def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Makes a rename or a new file in ``path`` durable (POSIX: the entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write_bytes(path: Path, data: bytes) -> None:
    """Replaces ``path`` with ``data`` so that a crash at any point leaves the old or the new file.

    The temporary file is created with mode 0600 (``mkstemp``); a file that must be readable by
    others is chmodded by the caller.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A KeyboardInterrupt mid-write must not leave temporary files behind either.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def durable_write_json(path: Path, data: Any, *, default: Callable[[Any], Any] | None = None) -> None:
    """Writes ``data`` as JSON (no NaN or infinity) with :func:`durable_write_bytes`."""
    text = json.dumps(data, indent=2, default=default, allow_nan=False)
    durable_write_bytes(path, text.encode())


# -- the run lock -------------------------------------------------------------------------------------
class RunLock:
    """An exclusive lock on a run directory, held from start to finish of a run.

    Args:
        run_dir: the run directory (created if missing).

    Raises on enter:
        RunLockedError: another process (or another open of the lock in this process) holds it;
            the error names the holder's pid, host and start time.
        ConfigError: the directory or its lock file cannot be created (a file is in the way,
            a read-only or full file system, no permission).

    The lock is ``fcntl.flock`` on ``run.lock``; the kernel drops it when the holder exits, so
    a killed run never leaves a stale lock. The file is never deleted (deleting it would let a
    newcomer lock a fresh inode while an old holder still holds the old one).
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        import fcntl  # POSIX only; privfl runs on Linux and macOS

        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # No O_TRUNC: a process that fails to get the lock must not erase the holder's record.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise filesystem_error(exc, "out_dir", self.run_dir, f"create the run directory and its {LOCK_FILE}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(str(self.run_dir), holder) from None
        except BaseException:
            os.close(fd)
            raise
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
        try:
            # Not fsynced: the record only names the holder to a process refused while it runs (the
            # page cache shows it), and after a crash the kernel has dropped the lock it describes.
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode() + b"\n", 0)
        except OSError as exc:
            # Closing drops the lock: a failed start must not hold the directory until exit.
            os.close(fd)
            raise filesystem_error(exc, "out_dir", self.run_dir, f"record the holder in {LOCK_FILE}") from None
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # no stale holder record once released
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _probe_lock(run_dir: Path) -> None:
    """Raises RunLockedError if a run holds ``run_dir``'s lock now; takes and drops it otherwise, writing nothing."""
    import fcntl

    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return  # unreadable or gone: RunLock itself will say what is wrong
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunLockedError(str(run_dir), _read_holder(fd)) from None
    except OSError:
        return
    finally:
        os.close(fd)  # closing drops a lock we took


def _read_holder(fd: int) -> str:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode())
        return f"pid {int(info['pid'])} on {info['host']} since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        # The holder may not have written its record yet (it locks first, then writes).
        return "another process (holder not recorded yet)"


def run_traces(run_dir: Path) -> list[str]:
    """The names in ``run_dir`` that show a run took place there (see :data:`RUN_TRACES`)."""
    return [name for name in RUN_TRACES if (run_dir / name).exists()]


def check_run_directory(run_dir: str | os.PathLike[str], *, resume: bool) -> None:
    """Refuses a run directory that cannot take this run, before any costly work.

    Noise calibration, loading data and building models take seconds to minutes; a run that will be
    refused for its directory must be refused first. These checks only read: they create nothing.
    :meth:`privfl.federation.Federation.run` repeats the ledger checks under the run lock, which
    is what makes them authoritative (a directory can change between the two).

    Args:
        run_dir: the run directory (``--out``).
        resume: whether the run resumes the one in ``run_dir``.

    Raises:
        ConfigError: ``run_dir`` is a file, cannot be created or written, holds a ledger and
            ``resume`` is False, or holds no ledger and ``resume`` is True.
        LedgerError: ``run_dir`` holds traces of a run (or a format-1 ledger) but no ledger.
        RunLockedError: a run holds ``run_dir`` now.
    """
    out = Path(run_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("out_dir", str(out), "is an existing file, not a directory; choose a directory path")
    # The nearest existing ancestor is where the directory would be created.
    existing = out.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError("out_dir", str(out), f"cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("out_dir", str(out), f"cannot be written: no write permission on {existing}; choose another directory")
    if (out / LOCK_FILE).is_file():
        # A run in progress is the first thing to say: its ledger may not exist yet.
        _probe_lock(out)
    check_ledger_presence(out, resume)


def directory_kind(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` is if it is a privfl directory of another kind than a ``privfl run`` directory, else None.

    A ``privfl deploy local`` directory, a deployment's server run directory, or a site's state
    directory; each is named with what to do with it instead.
    """
    root = Path(path)
    if (root / "run" / AGGREGATOR_FILE).is_file() or ((root / "sites").is_dir() and (root / "flower").is_dir()):
        return (
            "a privfl deploy local directory (resume it with `privfl deploy local CONFIG --resume --out "
            f"{root}`; audit it with `privfl audit {root}`)"
        )
    if (root / AGGREGATOR_FILE).is_file():
        return f"a deployment's server run directory (audit it with `privfl audit {root}`)"
    if (root / SITE_FILE).is_file():
        return f"a site's state directory (audit it with `privfl audit --site {root}`)"
    return None


def check_ledger_presence(out: Path, resume: bool) -> bool:
    """Whether ``out`` holds a ledger to resume; refuses every state in which a run would lose spending.

    Called before any work (by :func:`check_run_directory`) and again under the run lock, where the
    answer decides between creating a ledger and opening one.

    Returns:
        True when a ledger exists and ``resume`` is set; False when a fresh run may start.

    Raises:
        ConfigError: a fresh run where a ledger exists, or ``resume`` with nothing to resume.
        LedgerError: traces of a run without its ledger, or an old-format ledger.
    """
    other = directory_kind(out)
    if other is not None:
        # Its ledgers are elsewhere (each site's state) or it is a site's own: a privfl run here would
        # start a second, separate record of spending beside it, which no audit of that directory reads.
        raise ConfigError("out_dir", str(out), f"is {other}, not a privfl run directory; choose a new directory for this run")
    if (out / LEDGER_FILE).exists():
        if not resume:
            raise ConfigError(
                "out_dir", str(out), "already holds a run's privacy ledger; resume it (--resume) or choose a new directory"
            )
        return True
    traces = run_traces(out) if out.is_dir() else []
    if LEGACY_LEDGER_FILE in traces:
        raise LedgerError(
            str(out / LEGACY_LEDGER_FILE),
            "is a format-1 ledger (one JSON document, not hash-chained) that this privfl cannot verify; "
            "finish or audit that run with the privfl version that wrote it, or choose a new run directory",
        )
    if traces:
        raise LedgerError(
            str(out / LEDGER_FILE),
            f"is missing, but the run directory holds {', '.join(traces)}: a run took place there and spent "
            "privacy that a fresh start would forget. Restore the ledger and ledger.key from a backup, or "
            "choose a new run directory",
        )
    if resume:
        raise ConfigError("out_dir", str(out), f"holds no run to resume (no {LEDGER_FILE}); run it without --resume")
    return False


# -- typed loaders -------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    """JSON from ``path``; anything unreadable is a ConfigError naming the file."""
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise ConfigError(path.name, str(path), f"cannot be read: {exc.strerror or exc}") from None
    if len(data) > _MAX_JSON_BYTES:
        raise ConfigError(path.name, str(path), f"is larger than {_MAX_JSON_BYTES} bytes")
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        # RecursionError: deeply nested brackets; ValueError covers JSONDecodeError and bad UTF-8.
        raise ConfigError(path.name, str(path), f"is not valid JSON ({type(exc).__name__}): the file is corrupt") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _reasons(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


_LEVEL_NUMBERS = ("accounted_noise_multiplier", "sample_rate", "clip_norm")


def _history_problem(index: int, record: Any) -> str | None:
    """Why history record ``index`` cannot be trusted (None if it can)."""
    if not isinstance(record, dict):
        return "is not an object"
    if not (_is_int(record.get("round")) and record["round"] == index):
        return f"has round {record.get('round')!r}, expected {index} (records must be consecutive from 0)"
    for key in ("sampled", "trained", "contributors"):
        if not _names(record.get(key)):
            return f"{key!r} is not a list of client names"
    for key in ("skipped", "dropped"):
        if not _reasons(record.get(key)):
            return f"{key!r} is not a map of client name to reason"
    if not (record.get("aborted") is None or isinstance(record["aborted"], str)):
        return "'aborted' is neither null nor a reason"
    for key in ("train_loss", "test_loss", "test_accuracy", "max_epsilon"):
        if not (record.get(key) is None or _is_number(record[key])):
            return f"{key!r} is neither null nor a finite number"
    return _client_level_problem(record.get("client_level"))


def _client_level_problem(level: Any) -> str | None:
    """Why a round record's ``client_level`` cannot be trusted (None if it can, or is absent)."""
    if level is None:
        return None
    if not isinstance(level, dict):
        return "'client_level' is not an object"
    for key in _LEVEL_NUMBERS:
        if not _is_number(level.get(key)):
            return f"client_level.{key} is not a finite number"
    if "next_clip_norm" in level and not _is_number(level["next_clip_norm"]):
        return "client_level.next_clip_norm is not a finite number"
    return None


_HISTORY_TAIL = b"\n]\n"


class HistoryWriter:
    """Writes a run's ``history.json``: a JSON list with one round record per line.

    The first :meth:`write` of a writer (a fresh run, or the first round after a resume) replaces
    the file durably (:func:`durable_write_bytes`). Each later write that adds one record appends it
    in place: the closing bracket is overwritten by ``,``, the record's line and a new bracket,
    then the file is fsynced. A round's write so costs the record, not the whole history (which
    grows with rounds x sites: 36 MB after 300 rounds of 1,000 sites, all rewritten every round).

    A crash during an append leaves the records before it intact and a last line that does not
    parse, which :func:`load_history` drops. Anything else (the history shortened or edited, the
    file's tail not as this writer left it) is written whole again.

    Args:
        path: the ``history.json`` file.
        default: ``json.dumps``'s ``default`` for values JSON does not know (enums, numpy scalars).
    """

    append = True
    """Class switch for ``benchmarks/history_growth.py``: False rewrites the whole file every round (the old cost)."""

    def __init__(self, path: Path, *, default: Callable[[Any], Any] | None = None) -> None:
        self.path = Path(path)
        self.default = default
        self._written: int | None = None  # records in the file as this writer last left it

    def _line(self, record: Any) -> bytes:
        # No indent: json.dumps escapes every newline inside strings, so a record is exactly one line.
        return json.dumps(record, default=self.default, allow_nan=False).encode()

    def write(self, history: list[RoundRecord]) -> None:
        """Makes the file hold ``history`` (durably when this returns).

        Raises:
            OSError: the file cannot be written (the caller names the run directory).
        """
        count = len(history)
        if self.append and self._written is not None and self._written > 0 and count == self._written + 1:
            line = self._line(history[-1])  # before the file is touched: a record JSON refuses changes nothing
            if self._append(line):
                self._written = count
                return
        if history:
            data = b"[\n" + b",\n".join(self._line(record) for record in history) + _HISTORY_TAIL
        else:
            data = b"[]\n"
        durable_write_bytes(self.path, data)
        self._written = count

    def _append(self, line: bytes) -> bool:
        """Appends one record line in place; False (nothing written) if the tail is not this writer's."""
        with self.path.open("r+b") as fh:
            end = fh.seek(0, os.SEEK_END)
            if end < len(_HISTORY_TAIL):
                return False
            fh.seek(end - len(_HISTORY_TAIL))
            if fh.read(len(_HISTORY_TAIL)) != _HISTORY_TAIL:
                return False
            fh.seek(end - len(_HISTORY_TAIL))
            fh.write(b",\n" + line + _HISTORY_TAIL)
            fh.flush()
            os.fsync(fh.fileno())
        return True


class HistoryFollower:
    """The records of a ``history.json`` another process is writing, read as they arrive.

    For a live progress view. Each :meth:`read` reads only what was appended since the last one
    (the file of :class:`HistoryWriter`); a file replaced whole (a new inode: a fresh run, a resume)
    is read again from its start. A record still being appended is left for the next read. A file in
    another layout (a JSON list on one line) is parsed whole on every read.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records: list[Any] = []
        self._inode: int | None = None
        self._offset = 0  # where the next separator (",\n", or "\n" before the first record) starts

    def read(self) -> list[Any]:
        """Every complete record so far (the same list, grown), or the last ones read if the file is unreadable."""
        try:
            with self.path.open("rb") as fh:
                inode = os.fstat(fh.fileno()).st_ino
                if inode != self._inode:
                    head = fh.read(2)
                    if head != b"[\n":
                        fh.seek(0)
                        whole = json.loads(fh.read().decode("utf-8"))
                        self.records = whole if isinstance(whole, list) else []
                        return self.records
                    self._inode, self._offset, self.records = inode, 1, []
                fh.seek(self._offset)
                data = fh.read()
        except (OSError, ValueError, RecursionError):
            return self.records  # not written yet, or being replaced right now: read it next time
        pos = 0
        while True:
            if data.startswith(b",\n", pos):
                start = pos + 2
            elif data.startswith(b"\n", pos) and not self.records:
                start = pos + 1
            else:
                break  # the closing bracket, or an append that has not reached this byte yet
            end = data.find(b"\n", start)
            if end < 0:
                break
            line = data[start:end]
            content = line[:-1] if line.endswith(b",") else line
            try:
                self.records.append(json.loads(content.decode("utf-8")))
            except (ValueError, RecursionError):
                break  # "]", or a record still being written
            pos = start + len(content)  # its comma, if any, opens the next separator
        self._offset += pos
        return self.records


def _read_history_lines(path: Path) -> tuple[list[Any], bool] | None:
    """(records, torn) of a history in :class:`HistoryWriter`'s format, or None if it is not in it.

    Read line by line, so a history larger than the cap on one JSON document still loads. ``torn``:
    the file ends without its closing bracket, after a complete record or in a last line that does
    not parse (an append cut short by a crash: that line is dropped). Only a file holding at least
    one complete record can be torn this way; the writer replaces a file whole before it appends.
    """
    records: list[Any] = []
    closed = torn = False
    comma: bool | None = None  # whether the last record's line ended with a comma
    try:
        with path.open("rb") as fh:
            if fh.readline() != b"[\n":
                return None
            for raw in fh:
                if closed or torn or len(raw) > _MAX_JSON_BYTES:
                    return None  # nothing may follow the bracket or a torn line
                line = raw.rstrip(b"\n")
                if line == b"]":
                    if comma:
                        return None  # a comma before the bracket is not JSON
                    closed = True
                    continue
                if comma is False:
                    return None  # a record after one that ended without a comma
                body = line[:-1] if line.endswith(b",") else line
                try:
                    records.append(json.loads(body.decode("utf-8")))
                except (ValueError, RecursionError):
                    torn = True
                    continue
                comma = line.endswith(b",")
    except OSError:
        return None
    if closed:
        return records, False
    return (records, True) if records else None


def load_history(path: Path) -> list[RoundRecord]:
    """The per-round history of a run directory, checked record by record.

    A last record cut short by a crash during its append (:class:`HistoryWriter`) is dropped, with
    a warning: the round it described was not checkpointed yet (``privfl run``), or is recorded
    as interrupted when the run resumes (a deployment's aggregator).

    Returns:
        The records, round 0 first; an empty list if the file does not exist.

    Raises:
        ConfigError: the file is unreadable, not JSON, or a record is malformed (names the record).
    """
    if not path.exists():
        return []
    try:
        data = _read_json(path)
    except ConfigError:
        read = _read_history_lines(path)  # a torn last append, or more than one JSON document may hold
        if read is None:
            raise
        data, torn = read
        if torn:
            log.warning("%s: its last record was cut short (the run stopped while writing it); read without it", path)
    if not isinstance(data, list):
        raise ConfigError(path.name, str(path), "must hold a list of round records")
    for index, record in enumerate(data):
        problem = _history_problem(index, record)
        if problem is not None:
            raise ConfigError(path.name, str(path), f"record {index} {problem}: the file is corrupt or was edited")
    return cast("list[RoundRecord]", data)


def load_run_identity(path: Path) -> dict[str, Any]:
    """The run identity (settings and data fingerprint) recorded in ``run.json``.

    Raises:
        ConfigError: the file is missing, unreadable, or not a run identity.
    """
    if not path.exists():
        raise ConfigError(path.name, str(path), "is missing: the run's identity cannot be checked")
    data = _read_json(path)
    if not (isinstance(data, dict) and all(isinstance(data.get(k), dict) for k in ("training", "federation", "clients"))):
        raise ConfigError(path.name, str(path), "does not hold a run identity (training, federation, clients)")
    return data


def checkpoint_path(run_dir: Path, round_index: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"round-{round_index:04d}.pt"


def save_checkpoint(run_dir: Path, round_index: int, params: np.ndarray) -> None:
    """Writes the global parameters after ``round_index`` durably."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"round": round_index, "parameters": torch.from_numpy(np.array(params, dtype=np.float32))}, buffer)
    durable_write_bytes(checkpoint_path(run_dir, round_index), buffer.getvalue())


def load_checkpoint(run_dir: Path, round_index: int, num_parameters: int) -> np.ndarray:
    """The global parameters saved after ``round_index``.

    Raises:
        ConfigError: the checkpoint is missing, unreadable, for another round, of another model
            size, or holds non-finite values.
    """
    import torch

    path = checkpoint_path(run_dir, round_index)
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises many types (zip, pickle, EOF, Runtime) on corrupt files
        raise ConfigError(path.name, str(path), f"cannot be loaded ({type(exc).__name__}): the checkpoint is corrupt") from None
    if not (isinstance(state, dict) and state.get("round") == round_index and isinstance(state.get("parameters"), torch.Tensor)):
        raise ConfigError(path.name, str(path), f"is not the checkpoint of round {round_index}")
    tensor = state["parameters"]
    if tensor.dtype != torch.float32 or tensor.dim() != 1 or tensor.numel() != num_parameters:
        raise ConfigError(
            path.name, str(path), f"holds {tuple(tensor.shape)} {tensor.dtype} parameters; the model has {num_parameters} float32"
        )
    params = tensor.numpy().copy()
    if not np.isfinite(params).all():
        raise ConfigError(path.name, str(path), "holds non-finite parameters")
    return params


# -- consistency ---------------------------------------------------------------------------------------
def interrupted_run_hint(out_dir: str | os.PathLike[str]) -> str:
    """What to do after a run in ``out_dir`` was interrupted; true in every state the run can leave.

    A run creates its ledger before anything else that marks the directory, so: with a ledger,
    resuming works (even when nothing was charged yet); without one, nothing was spent and the
    directory holds no trace of a run, so running again works.
    """
    out = Path(out_dir)
    if (out / LEDGER_FILE).exists():
        return f"resume with --resume --out {out} (the ledger keeps what was spent)"
    return f"nothing was spent; run again with --out {out}"


def check_ledger_against_history(ledger: PrivacyLedger, history: list[RoundRecord], path: Path) -> None:
    """Checks that the ledger and the per-round history describe the same trainings.

    Every client the history says trained (or skipped) in round r has a ledger entry saying so for
    round r, and every such ledger entry of a recorded round is in the history. Entries of an
    interrupted attempt at a round (see :meth:`PrivacyLedger.superseded`) stay charged and are
    matched by nothing; entries of rounds past the history are the round in progress.

    Raises:
        LedgerError: the first mismatch, naming the client and the round.
    """
    superseded = ledger.superseded()
    in_ledger: dict[tuple[int, str, LedgerStatus], int] = {}
    for index, entry in enumerate(ledger.entries):
        if index not in superseded and entry.round < len(history):
            key = (entry.round, entry.client, entry.status)
            in_ledger[key] = in_ledger.get(key, 0) + 1
    in_history: dict[tuple[int, str, LedgerStatus], int] = {}
    for record in history:
        for name in record["trained"]:
            in_history[(record["round"], name, LedgerStatus.TRAINED)] = 1
        for name in record["skipped"]:
            in_history[(record["round"], name, LedgerStatus.SKIPPED_BUDGET)] = 1
    for key in sorted(set(in_history) | set(in_ledger), key=lambda k: (k[0], k[1], k[2].value)):
        round_index, client, status = key
        if in_history.get(key, 0) != in_ledger.get(key, 0):
            ledger_says = in_ledger.get(key, 0)
            raise LedgerError(
                str(path),
                f"history.json says client {client!r} {'trained' if status is LedgerStatus.TRAINED else 'was skipped'} "
                f"in round {round_index} {in_history.get(key, 0)} time(s), the ledger {ledger_says}: "
                "an entry was removed or added by hand, or the files come from different runs",
            )
    for record in history:
        anchor = record.get("ledger")
        if isinstance(anchor, dict) and _is_anchor(anchor):
            # Each round recorded where the ledger stood: a ledger cut short or swapped shows here.
            if ledger.line_hash(anchor["lines"]) != anchor["head"]:
                raise LedgerError(
                    str(path), f"line {anchor['lines']} is not the line history.json recorded after round {record['round']}: "
                    "the ledger was replaced or rewritten"
                )


def _is_anchor(anchor: Mapping[str, Any]) -> bool:
    lines = anchor.get("lines")
    return isinstance(lines, int) and not isinstance(lines, bool) and lines >= 1 and isinstance(anchor.get("head"), str)
