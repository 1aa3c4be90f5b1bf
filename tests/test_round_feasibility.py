"""Rounds that cannot complete are refused or skipped before any site trains: no budget is spent on them."""

from __future__ import annotations

import pytest

from privfl.accounting import LedgerStatus
from privfl.config import (
    CkksConfig,
    ClientDPConfig,
    ClientSampling,
    DPConfig,
    FederationConfig,
    ProtectionKind,
    TrainingConfig,
)
from privfl.data import iid_partition, subsets
from privfl.errors import ConfigError
from privfl.federation import Federation
from privfl.models import LogisticRegression


def _federation(split, num_clients, **federation):
    parts = iid_partition(len(split.train), num_clients, seed=0)
    clients = {f"site-{i}": s for i, s in enumerate(subsets(split.train, parts))}
    return Federation(
        model_fn=lambda: LogisticRegression(30, 2),
        clients=clients,
        test_set=split.test,
        training=TrainingConfig(batch_size=32, learning_rate=0.5, dp=DPConfig(target_epsilon=3.0)),
        federation=FederationConfig(**federation),
        progress=False,
    )


@pytest.mark.parametrize(
    ("num_clients", "federation"),
    [
        (1, {"rounds": 3, "protection": ProtectionKind.SECAGG}),
        (4, {"rounds": 3, "protection": ProtectionKind.SECAGG, "client_fraction": 0.25}),
        (1, {"rounds": 3, "protection": ProtectionKind.CKKS}),
        (5, {"rounds": 3, "protection": ProtectionKind.CKKS, "ckks": CkksConfig(min_contributors=3), "client_fraction": 0.4}),
    ],
    ids=["secagg-one-site", "secagg-one-sampled", "ckks-one-site", "ckks-two-of-three"],
)
def test_a_federation_whose_every_round_would_abort_is_refused_before_training(split, tmp_path, num_clients, federation):
    fed = _federation(split, num_clients, **federation)
    with pytest.raises(ConfigError, match="every round would abort") as info:
        fed.run(tmp_path / "run")
    assert info.value.field == "federation.client_fraction"
    # Nothing was charged: no ledger line beyond what a refused start may leave.
    assert not (tmp_path / "run" / "ledger.jsonl").exists()


def test_poisson_rounds_with_too_few_sites_are_skipped_without_charges(split):
    # Client-level DP with Poisson sampling at q = 0.3 over 4 sites: some rounds sample fewer than
    # the 2 sites the CKKS key holder needs. Those rounds must be skipped before anyone trains.
    fed = _federation(
        split,
        4,
        rounds=12,
        protection=ProtectionKind.CKKS,
        client_fraction=0.3,
        noise_seed=3,
        client_dp=ClientDPConfig(noise_multiplier=1.0, delta=1e-3, sampling=ClientSampling.POISSON),
    )
    result = fed.run()
    skipped_rounds = [r for r in result.history if (r.get("aborted") or "").startswith("round skipped before training")]
    completed = [r for r in result.history if not r.get("aborted")]
    assert skipped_rounds, "the seed was chosen so that some rounds sample fewer than 2 sites"
    assert completed, "and some rounds complete"
    trained_in = {(e.round, e.client) for e in result.ledger.entries if e.status is LedgerStatus.TRAINED}
    for record in skipped_rounds:
        assert len(record["sampled"]) < 2
        assert record["trained"] == [] and record["contributors"] == []
        assert not any(r == record["round"] for r, _ in trained_in)
    for record in completed:
        assert len(record["trained"]) >= 2
        assert {(record["round"], c) for c in record["trained"]} <= trained_in



def test_a_run_whose_rounds_all_abort_exits_non_zero(tmp_path, capsys):
    from privfl.cli import main

    config = tmp_path / "run.toml"
    config.write_text(
        """
[data]
num_clients = 3
[federation]
rounds = 2
protection = "ckks"
client_fraction = 0.001
noise_seed = 1
[federation.client_dp]
noise_multiplier = 1.0
delta = 1e-3
sampling = "poisson"
"""
    )
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    assert "all 2 rounds aborted" in capsys.readouterr().err
