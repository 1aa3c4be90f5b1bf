"""history.json grows by an in-place append per round (privfl.rundir.HistoryWriter), and a crash
during an append loses only the record being appended (privfl.rundir.load_history).

Uses the three IID breast-cancer sites of tests/conftest.py (fixtures ``split`` and ``clients``).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from torch import nn

import privfl.rundir as rundir
from privfl.config import DPConfig, FederationConfig, ProtectionKind, TrainingConfig
from privfl.errors import ConfigError
from privfl.federation import Federation
from privfl.rundir import HISTORY_FILE, HistoryFollower, HistoryWriter, checkpoint_path, load_history
from privfl.training import flatten_parameters


def _record(r: int, sites: int = 3) -> dict:
    names = [f"site-{k}" for k in range(sites)]
    return {
        "round": r, "sampled": names, "trained": names, "contributors": names, "skipped": {},
        "dropped": {"site-9": "a reason with\na newline and \"quotes\""} if r == 1 else {}, "aborted": None,
        "train_loss": None, "test_loss": 0.5, "test_accuracy": 0.9, "epsilon": {n: 0.1 * (r + 1) for n in names},
        "max_epsilon": 0.1 * (r + 1), "client_level": None, "upload_bytes": {n: 100 for n in names}, "seconds": 0.1,
        "ledger": None,
    }


def test_each_round_after_the_first_is_appended_in_place_and_the_file_stays_json(tmp_path):
    path = tmp_path / HISTORY_FILE
    writer = HistoryWriter(path)
    history: list = []
    inodes = []
    for r in range(4):
        history.append(_record(r))
        writer.write(history)
        assert json.loads(path.read_text()) == history
        assert load_history(path) == history
        inodes.append(os.stat(path).st_ino)
    # the first write replaces the file (a new inode); the three appends keep it
    assert len(set(inodes[1:])) == 1 and inodes[1] == inodes[0]
    assert path.read_bytes().count(b"\n") == len(history) + 2  # "[", one line per record, "]"


def test_a_new_writer_or_an_edited_tail_rewrites_the_file_whole(tmp_path):
    path = tmp_path / HISTORY_FILE
    history = [_record(0), _record(1)]
    HistoryWriter(path).write(history)
    first = os.stat(path).st_ino
    writer = HistoryWriter(path)  # a resumed run: its first write is whole
    history.append(_record(2))
    writer.write(history)
    assert os.stat(path).st_ino != first and load_history(path) == history
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # someone edited the tail
    history.append(_record(3))
    writer.write(history)
    assert load_history(path) == history
    shorter = history[:2]  # the history shortened (a resume that drops an unfinished round)
    writer.write(shorter)
    assert load_history(path) == shorter


def test_a_crash_at_any_byte_of_an_append_loses_only_that_record(tmp_path, caplog):
    path = tmp_path / HISTORY_FILE
    writer = HistoryWriter(path)
    history = [_record(0), _record(1)]
    writer.write(history[:1])
    writer.write(history)
    before = path.read_bytes()
    history.append(_record(2))
    writer.write(history)
    after = path.read_bytes()
    start = len(before) - len(b"\n]\n")  # the append overwrote the bracket from here
    assert after[:start] == before[:start]
    line_end = after.rindex(b"\n]\n")  # the new record's line ends here
    for cut in range(start, len(after)):
        path.write_bytes(after[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="privfl"):
            loaded = load_history(path)
        # complete up to its own line's end: the record is kept (its round was fully written)
        assert loaded == (history if cut >= line_end else history[:2]), cut
        warned = any("cut short" in r.getMessage() for r in caplog.records)
        assert warned == (cut < line_end + 2), cut  # from its closing bracket on, the file is whole JSON
    path.write_bytes(after[:start] + b",\n" + b"\0" * 40)  # a power loss can leave zeros where the tail was
    assert load_history(path) == history[:2]


@pytest.mark.parametrize(
    "text",
    [
        '[{"round": 0, "sampled": ',  # not the writer's format, cut short: not salvaged
        "[\n",  # no record at all
        "[\n  {\n",  # an indented history cut short
        "[\n{\"round\": 0},\n]\n",  # a comma before the bracket
        "[\n{\"round\": 0}\n{\"round\": 1}\n]\n",  # a missing comma between records
        "[\n{\"round\": 0}\n]\n{}\n",  # something after the bracket
        "[\nnot json,\n{\"round\": 1}\n]\n",  # a bad line before the last
    ],
)
def test_anything_but_a_torn_last_append_stays_a_config_error(tmp_path, text):
    path = tmp_path / HISTORY_FILE
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"history\.json"):
        load_history(path)


def test_a_history_larger_than_one_json_document_may_be_still_loads(tmp_path, monkeypatch):
    path = tmp_path / HISTORY_FILE
    history = [_record(r, sites=50) for r in range(5)]
    HistoryWriter(path).write(history)
    monkeypatch.setattr(rundir, "_MAX_JSON_BYTES", len(path.read_bytes()) // 2)
    assert load_history(path) == history  # read line by line
    path.write_text(json.dumps(history, indent=2))  # an indented one is one document: refused past the cap
    with pytest.raises(ConfigError, match="larger than"):
        load_history(path)


def _overwrite_in_place(path, data: bytes) -> None:
    with path.open("r+b") as fh:  # the same inode, as an append in progress leaves it
        fh.write(data)
        fh.truncate()


def test_a_follower_reads_each_append_once_and_never_a_record_half_written(tmp_path):
    path = tmp_path / HISTORY_FILE
    writer, follower = HistoryWriter(path), HistoryFollower(path)
    assert follower.read() == []  # not written yet
    history = [_record(0)]
    writer.write(history)
    assert follower.read() == history
    history.append(_record(1))
    writer.write(history)
    before = path.read_bytes()
    assert follower.read() == history
    offset = follower._offset
    history.append(_record(2))
    writer.write(history)
    after = path.read_bytes()
    start = len(before) - len(b"\n]\n")
    line_end = after.rindex(b"\n]\n")
    for cut in range(start, len(after) + 1):
        # the append has landed up to byte `cut`; the old bytes after it are still there
        _overwrite_in_place(path, after[:cut] + before[cut:])
        fresh = HistoryFollower(path)  # one that starts reading mid-append: complete records only
        got = fresh.read()
        assert got == history[: len(got)] and len(got) >= (3 if cut > line_end else 1), cut
        _overwrite_in_place(path, after)
        assert fresh.read() == history, cut
        _overwrite_in_place(path, before)
        follower.records, follower._offset = list(history[:2]), offset  # as it stood before the append
        _overwrite_in_place(path, after[:cut] + before[cut:])
        assert follower.read() == history[:2] + ([history[2]] if cut > line_end else []), cut
        _overwrite_in_place(path, after)
        assert follower.read() == history, cut  # and the rest once it lands
    HistoryWriter(path).write(history[:1])  # replaced whole (a new inode): read again from the start
    assert follower.read() == history[:1]
    path.write_text(json.dumps(history))  # another layout: parsed whole
    assert HistoryFollower(path).read() == history


def _federation(clients, split):
    return Federation(
        model_fn=lambda: nn.Linear(30, 2),
        clients=clients,
        test_set=split.test,
        training=TrainingConfig(batch_size=64, learning_rate=0.5, dp=DPConfig(noise_multiplier=1.0)),
        federation=FederationConfig(rounds=3, protection=ProtectionKind.PLAINTEXT, seed=0, noise_seed=0, device="cpu"),
        progress=False,
    )


def test_a_run_that_died_during_an_append_resumes_and_reaches_the_same_model(clients, split, tmp_path):
    out = tmp_path / "run"
    whole = _federation(clients, split).run(out)
    text = (out / HISTORY_FILE).read_bytes()
    assert json.loads(text) == whole.history
    # Killed while appending round 2's record (history is written before the checkpoint): the record
    # is cut short, round 2 has no checkpoint, and the run has not finished.
    (out / HISTORY_FILE).write_bytes(text[: text.rindex(b"\n]\n") - 25])
    checkpoint_path(out, 2).unlink()
    (out / "summary.json").unlink()
    resumed = _federation(clients, split).run(out, resume=True)
    assert [h["round"] for h in resumed.history] == [0, 1, 2]
    assert load_history(out / HISTORY_FILE) == resumed.history
    np.testing.assert_array_equal(flatten_parameters(resumed.model), flatten_parameters(whole.model))
    # the cut-short attempt at round 2 stays charged, apart from the rerun's charges
    assert len(resumed.ledger.superseded()) == len(clients)
