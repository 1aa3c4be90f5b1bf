"""Round-driver paths no other test reaches: an aborted round, and the resume refusals.

Uses the three IID breast-cancer sites of tests/conftest.py (fixtures ``split`` and ``clients``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from privfl.config import DPConfig, FederationConfig, ProtectionKind, TrainingConfig
from privfl.errors import ConfigError
from privfl.federation import CHECKPOINT_DIR, HISTORY_FILE, LEDGER_FILE, Federation
from privfl.protocols.base import DirectTransport
from privfl.rundir import checkpoint_path, load_checkpoint
from privfl.training import flatten_parameters

NUM_PARAMETERS = 30 * 2 + 2  # nn.Linear(30, 2)


def _federation(clients, split, *, rounds=2, transport=None, seed=0, batch_size=64):
    return Federation(
        model_fn=lambda: nn.Linear(30, 2),
        clients=clients,
        test_set=split.test,
        training=TrainingConfig(batch_size=batch_size, learning_rate=0.5, dp=DPConfig(noise_multiplier=1.0)),
        federation=FederationConfig(rounds=rounds, protection=ProtectionKind.PLAINTEXT, seed=seed, noise_seed=0, device="cpu"),
        transport=transport,
        progress=False,
    )


class _LoseAggregate(DirectTransport):
    """Loses the server's aggregate on its way back to the clients in one round (counted by arrival)."""

    def __init__(self, lost_round):
        self.lost_round = lost_round
        self.aggregates = 0

    def deliver(self, sender, receiver, step, payload):
        if step == "aggregate":
            self.aggregates += 1
            if self.aggregates == self.lost_round + 1:
                return None
        return payload


def _snapshot(out):
    """Every file of the run directory but its lock, as bytes."""
    return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "run.lock"}


# -- an aborted round ---------------------------------------------------------------------------------
def test_an_aborted_round_keeps_the_model_charges_the_clients_and_the_run_goes_on(clients, split, tmp_path):
    # federation.py `_round`: `except ProtocolAbort` (aborted, dropped "round aborted", no update)
    out = tmp_path / "run"
    transport = _LoseAggregate(lost_round=1)
    result = _federation(clients, split, rounds=3, transport=transport).run(out)
    history = result.history
    assert transport.aggregates == 3 and len(history) == 3  # round 2 ran after the abort

    aborted = history[1]
    assert aborted["aborted"] is not None and "aggregate was lost" in aborted["aborted"]
    assert aborted["dropped"] == {name: "round aborted" for name in clients}
    assert aborted["contributors"] == [] and sorted(aborted["trained"]) == sorted(clients)
    for record in (history[0], history[2]):
        assert record["aborted"] is None and record["dropped"] == {}
        assert sorted(record["contributors"]) == sorted(clients)

    # The global model did not move in round 1, and moved in rounds 0 and 2.
    params = [load_checkpoint(out, r, NUM_PARAMETERS) for r in range(3)]
    np.testing.assert_array_equal(params[1], params[0])
    assert not np.array_equal(params[2], params[1])
    assert aborted["test_loss"] == history[0]["test_loss"]

    # Every client was still charged for round 1: the data was used and updates left the sites.
    for name in clients:
        assert history[0]["epsilon"][name] < history[1]["epsilon"][name] < history[2]["epsilon"][name]
        charged = sorted(e.round for e in result.ledger.entries if e.client == name and e.status.value == "trained")
        assert charged == [0, 1, 2]
        notes = {e.round: e.note for e in result.ledger.entries if e.client == name}
        assert "update not aggregated in round 1: round aborted" in notes[1]
        assert notes[0] == "" and notes[2] == ""
        info = result.summary["clients"][name]
        assert info["rounds_trained"] == 3 and info["epsilon"] == pytest.approx(history[2]["epsilon"][name])

    assert result.summary["aborted_rounds"] == [1]
    assert result.summary["dropped_clients"] == {"1": {name: "round aborted" for name in clients}}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["aborted_rounds"] == [1]
    assert json.loads((out / HISTORY_FILE).read_text())[1]["aborted"] == aborted["aborted"]


def test_a_run_whose_last_round_aborted_resumes_and_its_ledger_matches_its_history(clients, split, tmp_path):
    # _restore: check_ledger_against_history accepts an aborted round (its clients trained and were charged)
    out = tmp_path / "run"
    first = _federation(clients, split, rounds=2, transport=_LoseAggregate(lost_round=1)).run(out)
    assert first.summary["aborted_rounds"] == [1]
    resumed = _federation(clients, split, rounds=3).run(out, resume=True)
    assert [h["round"] for h in resumed.history] == [0, 1, 2]
    assert resumed.summary["aborted_rounds"] == [1]
    assert resumed.history[2]["aborted"] is None
    # resumed from the aborted round's checkpoint, which is round 0's model
    np.testing.assert_array_equal(load_checkpoint(out, 1, NUM_PARAMETERS), load_checkpoint(out, 0, NUM_PARAMETERS))
    for name in clients:
        assert resumed.ledger.epsilon(name) > first.ledger.epsilon(name)
    assert resumed.ledger.superseded() == frozenset()  # nothing was interrupted


# -- resume refusals ------------------------------------------------------------------------------------
def test_resume_without_a_run_directory_is_a_config_error(clients, split):
    # federation.py `_restore`: `if out is None: if resume: raise ConfigError("resume", True, ...)`
    with pytest.raises(ConfigError, match="needs a run directory") as info:
        _federation(clients, split).run(None, resume=True)
    assert info.value.field == "resume"


@pytest.mark.parametrize(
    ("change", "named", "unnamed"),
    [
        ({"batch_size": 32}, "training", "federation"),
        ({"seed": 1}, "federation", "training"),
    ],
)
def test_resume_with_other_settings_names_what_differs_and_writes_nothing(clients, split, tmp_path, change, named, unnamed):
    # federation.py `_restore`: `if recorded != identity: raise ConfigError("resume", ..., "(... differ)")`
    out = tmp_path / "run"
    _federation(clients, split, rounds=1).run(out)
    before = _snapshot(out)
    with pytest.raises(ConfigError, match="other settings or data") as info:
        _federation(clients, split, rounds=2, **change).run(out, resume=True)
    assert f"({named} differ)" in str(info.value) and unnamed not in info.value.reason
    assert info.value.field == "resume"
    assert _snapshot(out) == before  # no resume marker, no history, no checkpoint


def test_resume_with_other_client_data_names_the_clients(clients, split, tmp_path):
    out = tmp_path / "run"
    _federation(clients, split, rounds=1).run(out)
    lines = (out / LEDGER_FILE).read_text().count("\n")
    swapped = {"site-0": clients["site-1"], "site-1": clients["site-0"], "site-2": clients["site-2"]}
    with pytest.raises(ConfigError, match=r"\(clients differ\)"):
        _federation(swapped, split, rounds=2).run(out, resume=True)
    assert (out / LEDGER_FILE).read_text().count("\n") == lines


def test_more_checkpoints_than_history_records_is_a_config_error_and_appends_nothing(clients, split, tmp_path):
    # federation.py `_restore`: "history.json holds {n} of the {done} checkpointed rounds"
    out = tmp_path / "run"
    _federation(clients, split, rounds=2).run(out)
    history = json.loads((out / HISTORY_FILE).read_text())
    (out / HISTORY_FILE).write_text(json.dumps(history[:1]))  # a history that lost its last record
    before = _snapshot(out)
    with pytest.raises(ConfigError, match=r"history\.json holds 1 of the 2 checkpointed rounds"):
        _federation(clients, split, rounds=3).run(out, resume=True)
    assert _snapshot(out) == before


def test_a_missing_last_checkpoint_redoes_that_round_and_keeps_its_charge(clients, split, tmp_path):
    # federation.py `_restore`: `history = history[:done]` (a record without its checkpoint is redone)
    out = tmp_path / "run"
    first = _federation(clients, split, rounds=2).run(out)
    checkpoint_path(out, 1).unlink()
    resumed = _federation(clients, split, rounds=2).run(out, resume=True)
    assert [h["round"] for h in resumed.history] == [0, 1]
    assert checkpoint_path(out, 1).exists()
    # round 1's first attempt stays charged, apart from the rerun's charges
    assert len(resumed.ledger.superseded()) == len(clients)
    for name in clients:
        assert resumed.ledger.epsilon(name) > first.ledger.epsilon(name)
        assert sum(1 for e in resumed.ledger.entries if e.client == name and e.round == 1) == 2


def _bad_checkpoint(kind):
    if kind == "other round":
        return {"round": 0, "parameters": torch.zeros(NUM_PARAMETERS)}
    if kind == "other size":
        return {"round": 1, "parameters": torch.zeros(NUM_PARAMETERS + 1)}
    if kind == "float64":
        return {"round": 1, "parameters": torch.zeros(NUM_PARAMETERS, dtype=torch.float64)}
    assert kind == "non-finite"
    return {"round": 1, "parameters": torch.full((NUM_PARAMETERS,), float("nan"))}


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("other round", "is not the checkpoint of round 1"),
        ("other size", r"holds \(63,\) torch\.float32 parameters; the model has 62 float32"),
        ("float64", r"holds \(62,\) torch\.float64 parameters"),
        ("non-finite", "holds non-finite parameters"),
    ],
)
def test_a_wrong_checkpoint_to_resume_from_is_a_typed_error(clients, split, tmp_path, kind, message):
    # rundir.py `load_checkpoint`, called by federation.py `_restore` for round start_round - 1, before
    # the ledger is marked as resumed: a refused resume leaves the directory exactly as it was.
    out = tmp_path / "run"
    _federation(clients, split, rounds=2).run(out)
    torch.save(_bad_checkpoint(kind), checkpoint_path(out, 1))
    before = _snapshot(out)
    with pytest.raises(ConfigError, match=message) as info:
        _federation(clients, split, rounds=3).run(out, resume=True)
    assert info.value.field == "round-0001.pt"
    assert _snapshot(out) == before  # no resume marker, no model.json rewrite, no history, no checkpoint
    assert sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir()) == ["round-0000.pt", "round-0001.pt"]
    assert len(json.loads((out / HISTORY_FILE).read_text())) == 2


def test_a_resume_with_another_architecture_is_refused_and_changes_nothing(clients, split, tmp_path):
    # federation.py `_run`: check_recorded_architecture before `_restore` marks the ledger
    out = tmp_path / "run"
    _federation(clients, split, rounds=1).run(out)
    before = _snapshot(out)
    other = Federation(
        model_fn=lambda: nn.Sequential(nn.Linear(30, 2)),  # the same parameter count, another module tree
        clients=clients,
        test_set=split.test,
        training=TrainingConfig(batch_size=64, learning_rate=0.5, dp=DPConfig(noise_multiplier=1.0)),
        federation=FederationConfig(rounds=2, protection=ProtectionKind.PLAINTEXT, seed=0, noise_seed=0, device="cpu"),
        progress=False,
    )
    with pytest.raises(ConfigError, match=r"does not build the architecture the run in .* trained") as info:
        other.run(out, resume=True)
    assert "layer 0" in info.value.reason
    assert _snapshot(out) == before
    resumed = _federation(clients, split, rounds=2).run(out, resume=True)  # the run's own model resumes
    assert resumed.summary["rounds"] == 2


def test_a_budget_no_site_can_spend_one_round_of_is_refused_before_anything_is_written(clients, split, tmp_path):
    # federation.py `_check_one_round_fits`: the run would otherwise "succeed" with the untrained model
    out = tmp_path / "run"
    federation = Federation(
        model_fn=lambda: nn.Linear(30, 2),
        clients=clients,
        training=TrainingConfig(batch_size=64, dp=DPConfig(noise_multiplier=0.5, budget_epsilon=0.1)),
        federation=FederationConfig(rounds=2, protection=ProtectionKind.PLAINTEXT, device="cpu"),
        progress=False,
    )
    with pytest.raises(ConfigError, match=r"no site can train a single round within it") as info:
        federation.run(out)
    assert info.value.field == "training.dp.budget_epsilon"
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # no ledger, no trace of a run: the directory stays usable
    # a budget that one round fits runs
    federation.training = TrainingConfig(batch_size=64, dp=DPConfig(noise_multiplier=4.0, budget_epsilon=1.0))
    result = federation.run(tmp_path / "fits")
    assert any(h["trained"] for h in result.history)


def _calibrated(clients, split, rounds):
    return Federation(
        model_fn=lambda: nn.Linear(30, 2),
        clients=clients,
        training=TrainingConfig(batch_size=64, learning_rate=0.5, dp=DPConfig(target_epsilon=3.0)),
        federation=FederationConfig(rounds=rounds, protection=ProtectionKind.PLAINTEXT, seed=0, noise_seed=0, device="cpu"),
        progress=False,
    )


def _interrupted_after(clients, split, tmp_path, monkeypatch, *, rounds, trained_rounds):
    """A run of ``rounds`` stopped (Ctrl-C) when its round ``trained_rounds`` starts training."""
    import privfl.federation as federation_module

    real = federation_module.train_dp_sgd
    calls = []

    def train(*args, **kwargs):
        calls.append(1)
        if len(calls) > trained_rounds * len(clients):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / f"run-{rounds}"
    with monkeypatch.context() as patch:
        patch.setattr(federation_module, "train_dp_sgd", train)
        with pytest.raises(KeyboardInterrupt):
            _calibrated(clients, split, rounds).run(out)
    return out


@pytest.mark.parametrize(("first", "then"), [(4, 8), (8, 4)])
def test_a_resume_with_other_rounds_spends_the_budget_left_over_the_rounds_left(clients, split, tmp_path, monkeypatch, first, then):
    # federation.py `_replan_remaining`: with sigma planned for `then` rounds from zero, 4 -> 8 ran out of
    # budget before the last rounds (they were skipped) and 8 -> 4 left budget unspent.
    out = _interrupted_after(clients, split, tmp_path, monkeypatch, rounds=first, trained_rounds=2)
    result = _calibrated(clients, split, then).run(out, resume=True)
    for name, info in result.summary["clients"].items():
        assert info["rounds_trained"] == then and info["rounds_skipped"] == 0, name
        assert 2.9 <= info["epsilon"] <= 3.0, (name, info["epsilon"])
        assert len(info["noise_multipliers_used"]) == 2  # the first plan's, then the one for what was left
    # a resume with the rounds it started with trains at its plan's sigma, as an uninterrupted run does
    same = _interrupted_after(clients, split, tmp_path / "same", monkeypatch, rounds=4, trained_rounds=2)
    resumed = _calibrated(clients, split, 4).run(same, resume=True)
    whole = _calibrated(clients, split, 4).run(tmp_path / "whole")
    np.testing.assert_array_equal(flatten_parameters(resumed.model), flatten_parameters(whole.model))
