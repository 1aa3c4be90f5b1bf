"""The ledger journal: one durable line per record, hash chain and MAC, torn tails, typed errors (fuzzed)."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privfl.accounting import ClientBudget, DPEvent, LedgerKey, LedgerStatus, PrivacyLedger
from privfl.errors import ConfigError, LedgerError, PrivflError
from privfl.rundir import checkpoint_path, load_checkpoint, load_history, load_run_identity, save_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
import ledger_fuzz  # the mutations shared with the campaign

EVENT = DPEvent(noise_multiplier=1.1, sample_rate=0.1, steps=10)


@pytest.fixture()
def key() -> LedgerKey:
    return LedgerKey.generate()


def _ledger(path: Path, key: LedgerKey | None) -> PrivacyLedger:
    ledger = PrivacyLedger.create(path, key=key)
    ledger.register("a", ClientBudget(epsilon=50.0, delta=1e-5))
    ledger.register("b", ClientBudget(epsilon=math.inf, delta=1e-5))
    return ledger


def test_every_record_is_one_fsynced_line_of_constant_size(tmp_path, key, monkeypatch):
    # The quadratic cost the journal replaces: the whole ledger was rewritten after every charge.
    path = tmp_path / "ledger.jsonl"
    ledger = _ledger(path, key)
    written: list[int] = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: written.append(len(data)) or real_write(fd, data))
    for round_index in range(30):
        before = path.read_bytes().count(b"\n")
        ledger.charge(round_index, "a", EVENT)
        assert path.read_bytes().count(b"\n") == before + 1  # on disk when charge() returns
    assert max(written) - min(written) < 40  # bytes per charge do not grow with the ledger
    ledger.close()
    assert PrivacyLedger.load(path, key=key).epsilon("a") == pytest.approx(ledger.epsilon("a"))


def test_round_trip_keeps_entries_notes_resumes_and_identity(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger.create(path, key=key, run_identity={"clients": {"a": "x"}})
    ledger.register("a", ClientBudget(epsilon=50.0, delta=1e-5))
    ledger.charge(0, "a", EVENT)
    ledger.annotate_last("a", "dropped")
    ledger.charge(1, "a", EVENT)
    ledger.mark_resume(1)
    ledger.charge(1, "a", EVENT)
    ledger.close()
    loaded = PrivacyLedger.load(path, key=key)
    assert loaded.entries == ledger.entries and loaded.entries[0].note == "dropped"
    assert loaded.superseded() == {1}  # the interrupted attempt at round 1: still charged
    assert loaded.epsilon("a") == pytest.approx(ledger.epsilon("a")) and len(loaded.events("a")) == 3
    assert loaded.run_identity == {"clients": {"a": "x"}} and loaded.authenticated
    assert loaded.head == ledger.head and loaded.lines == ledger.lines
    # save() of an in-memory ledger writes the same history (another key, another chain)
    other = tmp_path / "copy.jsonl"
    loaded.save(other)
    copy = PrivacyLedger.load(other)
    assert copy.entries == loaded.entries and copy.superseded() == {1} and not copy.authenticated


def test_the_header_of_a_federation_of_many_sites_loads_and_other_lines_stay_bounded(tmp_path, key):
    # The header names every site's data fingerprint: 1,000 sites made an 81 KB first line, which the
    # 64 KiB line bound refused as corrupt, so such a run could be neither resumed nor audited.
    sites = {f"site-{k:05d}": "f" * 64 for k in range(3000)}
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger.create(path, key=key, run_identity={"clients": sites})
    ledger.register("site-00000", ClientBudget(epsilon=50.0, delta=1e-5))
    ledger.charge(0, "site-00000", EVENT)
    ledger.close()
    assert len(path.read_bytes().split(b"\n", 1)[0]) > 1 << 17
    loaded = PrivacyLedger.load(path, key=key)
    assert loaded.run_identity == {"clients": sites} and loaded.epsilon("site-00000") == pytest.approx(ledger.epsilon("site-00000"))
    # Any other line that long is still refused before it is parsed.
    lines = path.read_bytes().split(b"\n")
    lines[1] = b"{" + b" " * (1 << 17) + b"}"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(LedgerError, match="bytes long; not a ledger line"):
        PrivacyLedger.load(path, key=key)


def test_key_is_never_shown_and_is_private(tmp_path, key):
    assert "hidden" in repr(key) and key._secret.hex() not in repr(key)
    key.write(tmp_path / "ledger.key")
    assert (tmp_path / "ledger.key").stat().st_mode & 0o777 == 0o600
    assert LedgerKey.read(tmp_path / "ledger.key").mac(b"x") == key.mac(b"x")


def test_authentication_cannot_be_stripped_or_skipped(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    _ledger(path, key).close()
    with pytest.raises(LedgerError, match="authenticated"):
        PrivacyLedger.load(path)  # no key: refused, not silently unverified
    plain = tmp_path / "plain.jsonl"
    _ledger(plain, None).close()
    with pytest.raises(LedgerError, match="MAC"):
        PrivacyLedger.load(plain, key=key)  # MACs stripped (a rewritten ledger): refused


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in records))


@pytest.mark.parametrize("authenticated", [True, False])
def test_an_edit_names_the_file_and_the_first_bad_line(tmp_path, key, authenticated):
    path = tmp_path / "ledger.jsonl"
    ledger = _ledger(path, key if authenticated else None)
    for round_index in range(4):
        ledger.charge(round_index, "a", EVENT)
        ledger.charge(round_index, "b", EVENT)
    ledger.close()
    records = _lines(path)
    # Raise b's noise multiplier in round 1 (line 7): its epsilon would drop.
    assert records[6]["client"] == "b" and records[6]["round"] == 1
    records[6]["noise_multiplier"] = 2.0
    _write(path, records)
    with pytest.raises(LedgerError) as info:
        PrivacyLedger.load(path, key=key if authenticated else None)
    assert str(path) in str(info.value)
    if authenticated:
        assert "line 7 (entry of 'b', round 1): its MAC does not verify" in info.value.problem
    else:
        # Without a key the chain shows it at the next line.
        assert info.value.problem.startswith("line 8") and "does not follow line 7" in info.value.problem


def test_deleted_or_reordered_lines_are_refused(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    ledger = _ledger(path, key)
    for round_index in range(3):
        ledger.charge(round_index, "a", EVENT)
        ledger.charge(round_index, "b", EVENT)
    ledger.close()
    records = _lines(path)
    _write(path, [r for r in records if r.get("client") != "b" or r["kind"] != "entry"])
    with pytest.raises(LedgerError, match="does not follow line"):
        PrivacyLedger.load(path, key=key)
    records[4], records[5] = records[5], records[4]
    _write(path, records)
    with pytest.raises(LedgerError, match=r"line 5 .*does not follow line 4"):
        PrivacyLedger.load(path, key=key)


def test_a_torn_last_line_is_discarded_and_the_journal_repaired(tmp_path, key, caplog):
    path = tmp_path / "ledger.jsonl"
    ledger = _ledger(path, key)
    ledger.charge(0, "a", EVENT)
    ledger.close()
    complete = path.read_bytes()
    lines = complete.splitlines(keepends=True)
    torn_at = len(complete) - len(lines[-1])
    for cut in range(torn_at + 1, len(complete) - 1):
        path.write_bytes(complete[:cut])
        with caplog.at_level(logging.WARNING, logger="privfl"):
            loaded = PrivacyLedger.load(path, key=key)
        assert loaded.entries == () and "incomplete last line" in caplog.text
        caplog.clear()
    # A complete line without its newline is kept: counting a charge twice is safe, losing one is not.
    path.write_bytes(complete[:-1])
    assert len(PrivacyLedger.load(path, key=key).entries) == 1
    # ...and an edited last line is an edit, newline or not: it is not discarded as torn.
    edited = complete[:-1].replace(b'"steps":10', b'"steps":1')
    assert edited != complete[:-1]
    path.write_bytes(edited)
    with pytest.raises(LedgerError, match="MAC"):
        PrivacyLedger.load(path, key=key)
    # open() cuts a torn tail off before appending, so the next line follows a complete one.
    path.write_bytes(complete[: torn_at + 20])
    reopened = PrivacyLedger.open(path, key=key)
    reopened.charge(0, "b", EVENT)
    reopened.close()
    assert [e.client for e in PrivacyLedger.load(path, key=key).entries] == ["b"]


def test_only_the_final_line_may_be_torn(tmp_path, key):
    path = tmp_path / "ledger.jsonl"
    ledger = _ledger(path, key)
    ledger.charge(0, "a", EVENT)
    ledger.charge(1, "a", EVENT)
    ledger.close()
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([*lines[:3], lines[3][:30] + b"\n", lines[4]]))
    with pytest.raises(LedgerError, match="line 4: not a JSON line"):
        PrivacyLedger.load(path, key=key)


def test_a_failed_write_blocks_later_charges(tmp_path, key, monkeypatch):
    path = tmp_path / "ledger.jsonl"
    ledger = _ledger(path, key)

    def disk_full(fd, data):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", disk_full)
        with pytest.raises(OSError):
            ledger.charge(0, "a", EVENT)
    assert ledger.entries == () and ledger.epsilon("a") == 0  # not spent in memory either
    with pytest.raises(LedgerError, match="earlier write"):
        ledger.charge(0, "a", EVENT)


# -- fuzz: anything the loaders do not accept is a typed PrivflError ---------------------------------
@pytest.fixture(scope="module")
def journal(tmp_path_factory):
    directory = tmp_path_factory.mktemp("journal")
    key = LedgerKey.generate()
    path = ledger_fuzz.sample_ledger(directory, key=key)
    return path.read_bytes(), key, PrivacyLedger.load(path, key=key)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(seed=st.integers(0, 2**32 - 1))
def test_fuzzed_ledgers_are_accepted_prefixes_or_ledger_errors(journal, tmp_path_factory, seed):
    data, key, original = journal
    path = tmp_path_factory.mktemp("mutant") / "ledger.jsonl"
    path.write_bytes(ledger_fuzz.mutate(data, random.Random(seed)))
    logging.disable(logging.WARNING)
    try:
        outcome = ledger_fuzz.classify(path, key, original)
    finally:
        logging.disable(logging.NOTSET)
    assert outcome in ("prefix", "LedgerError")


@FUZZ
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes_are_ledger_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "ledger.jsonl"
    path.write_bytes(data)
    with pytest.raises(LedgerError):
        PrivacyLedger.load(path)


def _history_bytes(layout: str = "indented") -> bytes:
    """Two round records as history.json: indented (older runs), or one record per line (HistoryWriter)."""
    record = {
        "round": 0, "sampled": ["a", "b"], "trained": ["a"], "contributors": ["a"], "skipped": {"b": "budget"},
        "dropped": {}, "aborted": None, "test_loss": 0.5, "epsilon": {"a": 1.0, "b": 0.0}, "max_epsilon": 1.0,
        "client_level": {"accounted_noise_multiplier": 1.0, "sample_rate": 0.5, "clip_norm": 1.0, "next_clip_norm": 0.9},
        "ledger": {"lines": 4, "head": "ab"},
    }
    records = [record, {**record, "round": 1, "client_level": None}]
    if layout == "lines":
        return b"[\n" + b",\n".join(json.dumps(r).encode() for r in records) + b"\n]\n"
    return json.dumps(records, indent=2).encode()


@FUZZ
@given(seed=st.integers(0, 2**32 - 1), layout=st.sampled_from(["indented", "lines"]))
def test_fuzzed_history_is_loaded_or_a_config_error(tmp_path_factory, seed, layout):
    path = tmp_path_factory.mktemp("history") / "history.json"
    path.write_bytes(ledger_fuzz.mutate(_history_bytes(layout), random.Random(seed)))
    try:
        history = load_history(path)
    except ConfigError as exc:
        assert "history.json" in str(exc)
        return
    for index, record in enumerate(history):  # what resume and the audit read is well-typed
        assert record["round"] == index and all(isinstance(n, str) for n in record["trained"])


@FUZZ
@given(seed=st.integers(0, 2**32 - 1))
def test_fuzzed_run_identity_is_loaded_or_a_config_error(tmp_path_factory, seed):
    path = tmp_path_factory.mktemp("run") / "run.json"
    good = json.dumps({"training": {"batch_size": 16}, "federation": {"seed": 0}, "clients": {"a": "00ff"}}).encode()
    path.write_bytes(ledger_fuzz.mutate(good, random.Random(seed)))
    try:
        identity = load_run_identity(path)
    except ConfigError:
        return
    assert isinstance(identity["clients"], dict)


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(directory, 3, np.arange(12, dtype=np.float32))
    return checkpoint_path(directory, 3).read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_fuzzed_checkpoints_are_loaded_or_a_config_error(tmp_path_factory, checkpoint_bytes, seed):
    directory = tmp_path_factory.mktemp("mutant-ckpt")
    path = checkpoint_path(directory, 3)
    path.parent.mkdir(parents=True)
    path.write_bytes(ledger_fuzz.mutate(checkpoint_bytes, random.Random(seed)))
    try:
        params = load_checkpoint(directory, 3, 12)
    except PrivflError as exc:
        assert isinstance(exc, ConfigError) and "round-0003.pt" in str(exc)
        return
    assert params.shape == (12,) and np.isfinite(params).all()


def test_a_checkpoint_of_another_round_or_size_is_refused(tmp_path):
    save_checkpoint(tmp_path, 0, np.zeros(5, dtype=np.float32))
    with pytest.raises(ConfigError, match="the model has 6"):
        load_checkpoint(tmp_path, 0, 6)
    buffer = io.BytesIO()
    torch.save({"round": 1, "parameters": torch.zeros(5)}, buffer)
    checkpoint_path(tmp_path, 0).write_bytes(buffer.getvalue())
    with pytest.raises(ConfigError, match="not the checkpoint of round 0"):
        load_checkpoint(tmp_path, 0, 5)


def test_ledger_status_values_are_stable():
    # The journal stores these strings; renaming one would make old ledgers unreadable.
    assert [s.value for s in LedgerStatus] == ["trained", "skipped_budget"]


def _charged_ledger(tmp_path, key, charges=3):
    ledger = PrivacyLedger.create(tmp_path / "ledger.jsonl", key=key)
    ledger.register("a", ClientBudget(epsilon=100.0, delta=1e-5))
    for r in range(charges):
        ledger.charge(r, "a", DPEvent(noise_multiplier=1.0, sample_rate=0.1, steps=5))
    ledger.close()
    return ledger


def test_reopen_reattaches_only_a_file_exactly_as_the_ledger_left_it(tmp_path, key):
    ledger = _charged_ledger(tmp_path, key)
    assert ledger.reopen()  # untouched: reattached without re-verifying
    ledger.charge(3, "a", DPEvent(noise_multiplier=1.0, sample_rate=0.1, steps=5))
    ledger.close()
    again = PrivacyLedger.open(tmp_path / "ledger.jsonl", key=key)
    assert [e.round for e in again.entries] == [0, 1, 2, 3] and again.head == ledger.head
    again.charge(4, "a", DPEvent(noise_multiplier=1.0, sample_rate=0.1, steps=5))  # another writer appends
    again.close()
    assert not ledger.reopen()  # the file grew behind its back: load it afresh
    assert not ledger.reopen()
    # An edit of the last line that keeps the size, and a mere touch, are refused alike.
    fresh = PrivacyLedger.open(tmp_path / "ledger.jsonl", key=key)
    fresh.close()
    path = tmp_path / "ledger.jsonl"
    data = bytearray(path.read_bytes())
    data[-10] = ord("0") if data[-10] != ord("0") else ord("1")
    path.write_bytes(bytes(data))
    assert not fresh.reopen()
    (tmp_path / "b").mkdir()
    other = _charged_ledger(tmp_path / "b", key)
    os.utime(tmp_path / "b" / "ledger.jsonl", ns=(1, 1))
    assert not other.reopen()
    # An edit of an earlier line that keeps the size, with the modification time put back: the change
    # time still moved, so it is not reattached (a full open then finds the edit).
    (tmp_path / "c").mkdir()
    edited = _charged_ledger(tmp_path / "c", key)
    path = tmp_path / "c" / "ledger.jsonl"
    before = path.stat()
    data = path.read_bytes()
    lines = data.split(b"\n")
    lines[2] = lines[2].replace(b'"steps":5', b'"steps":1', 1)
    path.write_bytes(b"\n".join(lines))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.read_bytes() != data
    assert not edited.reopen()
    with pytest.raises(LedgerError):
        PrivacyLedger.open(path, key=key)
    # A ledger that was never closed, or has no journal, is not reopened either.
    memory = PrivacyLedger()
    assert not memory.reopen()


def test_a_site_reuses_its_verified_ledger_between_requests_until_someone_else_writes(split, clients, tmp_path, run_toml, monkeypatch):
    from privfl.aggregator import Aggregator, LocalSites
    from privfl.site import Site, _parse_config

    opened = []
    original = PrivacyLedger.open.__func__

    def counting(cls, path, **kwargs):
        opened.append(Path(path).parent.name)
        return original(cls, path, **kwargs)

    monkeypatch.setattr(PrivacyLedger, "open", classmethod(counting))
    sites = [Site(name, data, tmp_path / name, allow_noise_seed=True) for name, data in clients.items()]
    text = run_toml("plaintext", rounds=3)
    aggregator = Aggregator(text, input_shape=split.train.input_shape, num_classes=split.train.num_classes, progress=False)
    aggregator.run(LocalSites(sites))
    assert opened == []  # created at hello, then reattached for each of the 3 trainings
    # Another process (here: another Site object over the same state directory) writes in between.
    Aggregator(text, input_shape=split.train.input_shape, num_classes=split.train.num_classes, progress=False).run(
        LocalSites([Site("site-0", clients["site-0"], tmp_path / "site-0", allow_noise_seed=True), *sites[1:]])
    )
    assert opened == ["site-0"]  # the other object's first open; its own later requests reattach
    spent = sites[0].spent(_parse_config(text))[0]
    assert opened == ["site-0", "site-0"]  # the first object saw the file change: verified afresh
    assert spent > 0
