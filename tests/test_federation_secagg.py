"""Secure aggregation as a federation protection: same DP-SGD clients and ledger, drops reported."""

from __future__ import annotations

import json

import pytest

from privfl.cli import main
from privfl.config import DPConfig, FederationConfig, ProtectionKind, TrainingConfig
from privfl.data import dirichlet_partition, labels_of, load_breast_cancer, subsets
from privfl.errors import ConfigError
from privfl.federation import Federation
from privfl.models import LogisticRegression
from privfl.protocols.secagg import SecAggConfig


@pytest.fixture(scope="module")
def setting():
    split = load_breast_cancer()
    parts = dirichlet_partition(labels_of(split.train), 5, alpha=0.5, seed=0, min_size=20)
    clients = {f"hospital-{c}": s for c, s in zip("abcde", subsets(split.train, parts), strict=True)}
    return split, clients


def _run(setting, protection, transport=None, rounds=6):
    split, clients = setting
    fed = Federation(
        model_fn=lambda: LogisticRegression(30, 2),
        clients=clients,
        test_set=split.test,
        training=TrainingConfig(batch_size=16, learning_rate=0.5, dp=DPConfig(target_epsilon=3.0)),
        # noise_seed: the two runs compared draw the same DP noise (a band test must not be a coin toss).
        federation=FederationConfig(rounds=rounds, protection=protection, secagg=SecAggConfig(threshold=3), noise_seed=0),
        transport=transport,
        progress=False,
    )
    return fed.run()


def test_secagg_trains_to_the_plaintext_accuracy_band(setting):
    secure = _run(setting, ProtectionKind.SECAGG)
    plain = _run(setting, ProtectionKind.PLAINTEXT)
    assert secure.summary["protection"] == "secagg"
    assert secure.summary["final_accuracy"] >= 0.9
    assert abs(secure.summary["final_accuracy"] - plain.summary["final_accuracy"]) <= 0.03
    for name, info in secure.summary["clients"].items():
        assert info["epsilon"] <= 3.0
        assert info["epsilon"] == pytest.approx(plain.summary["clients"][name]["epsilon"])  # same DP-SGD, same ledger
    # masked words are 32-bit: the upload stays near float32 size (plus the small key and share messages)
    assert secure.summary["upload_bytes_per_client_round"] < 40 * secure.summary["plaintext_bytes_per_client_round"]


class _DropMaskedInput:
    """One client vanishes after sharing its keys: its masked input never arrives."""

    def __init__(self, victim):
        self.victim = victim

    def deliver(self, sender, receiver, step, payload):
        if sender == self.victim and step == "masked_input":
            return None
        return payload


def test_dropped_client_is_reported_and_the_round_recovers(setting):
    result = _run(setting, ProtectionKind.SECAGG, transport=_DropMaskedInput("hospital-c"), rounds=2)
    for record in result.history:
        assert "hospital-c" in record["dropped"]
        assert set(record["contributors"]) == {"hospital-a", "hospital-b", "hospital-d", "hospital-e"}
        assert record["aborted"] is None
    assert result.summary["dropped_clients"]
    assert result.summary["clients"]["hospital-c"]["rounds_dropped"] == 2
    assert result.summary["final_accuracy"] >= 0.85


def test_cli_accepts_secagg(tmp_path):
    config = tmp_path / "secagg.toml"
    config.write_text(
        '[federation]\nrounds = 2\nprotection = "secagg"\n[federation.secagg]\nthreshold = 0.6\nneighbours = 2\n'
        "[training.dp]\ntarget_epsilon = 3.0\n"
    )
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protection"] == "secagg" and "dropped_clients" in summary


def test_graph_degree_adapts_to_an_odd_round(setting):
    # 5 clients with a configured degree of 3: no 3-regular graph on 5 vertices exists, so the
    # round uses degree 2 instead of crashing the federation. The threshold is 3: a round of 4
    # clients would have 4 share holders, and 2 is not more than half of them.
    split, clients = setting
    fed = Federation(
        model_fn=lambda: LogisticRegression(30, 2),
        clients=clients,
        test_set=split.test,
        training=TrainingConfig(batch_size=16, learning_rate=0.5, dp=DPConfig(noise_multiplier=1.0)),
        federation=FederationConfig(rounds=1, protection=ProtectionKind.SECAGG, secagg=SecAggConfig(threshold=3, neighbours=3)),
        progress=False,
    )
    result = fed.run()
    assert result.history[0]["aborted"] is None and len(result.history[0]["contributors"]) == 5
    assert SecAggConfig(neighbours=3).round_neighbours(5) == 2
    assert SecAggConfig(neighbours=8).round_neighbours(4) == 3


def _federation(setting, secagg, client_fraction=1.0, rounds=1):
    split, clients = setting
    return Federation(
        model_fn=lambda: LogisticRegression(30, 2),
        clients=clients,
        test_set=split.test,
        training=TrainingConfig(batch_size=16, learning_rate=0.5, dp=DPConfig(noise_multiplier=1.0)),
        federation=FederationConfig(rounds=rounds, client_fraction=client_fraction, protection=ProtectionKind.SECAGG, secagg=secagg),
        progress=False,
    )


@pytest.mark.parametrize(("client_fraction", "sampled", "threshold"), [(0.4, 2, 2), (0.6, 3, 2), (1.0, 5, 4)])
def test_default_threshold_runs_small_rounds_above_half(setting, client_fraction, sampled, threshold):
    # The default fraction 2/3 resolves above half of the holders in every round: 2 of 2, 2 of 3, 4 of 5.
    config = SecAggConfig()
    assert config.resolve_threshold(sampled) == threshold and 2 * threshold > sampled
    fed = _federation(setting, config, client_fraction=client_fraction, rounds=2)
    result = fed.run()
    for record in result.history:
        assert record["aborted"] is None
        assert len(record["contributors"]) == sampled
    assert fed.config.protection is ProtectionKind.SECAGG


@pytest.mark.parametrize(("secagg", "round_size"), [(SecAggConfig(threshold=2), 4), (SecAggConfig(threshold=2, neighbours=3), 4)])
def test_threshold_at_or_below_half_is_refused_before_training(setting, secagg, round_size, tmp_path):
    # threshold=2 with 4 share holders lets a server that lies about who dropped collect both shares
    # of one client. With neighbours=3 the 5-client round (degree 2, 3 holders) would pass; the
    # 4-client round (complete, 4 holders) is the one refused.
    fed = _federation(setting, secagg)
    with pytest.raises(ConfigError) as info:
        fed.run(tmp_path / "run")
    assert (info.value.field, info.value.value) == ("threshold", 2)
    assert f"round of {round_size} clients" in str(info.value) and "must be > 2" in str(info.value)
    # Refused before anything trains: no ledger, no history, no checkpoint (a run lock file at most).
    written = {p.name for p in (tmp_path / "run").iterdir()} if (tmp_path / "run").exists() else set()
    assert written <= {"run.lock"}, written
