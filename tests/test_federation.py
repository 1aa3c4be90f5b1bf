"""The round driver: end-to-end training, budgets, drops, resume, reproducibility."""

from __future__ import annotations

import json

import pytest
from torch import nn

from privfl.accounting import LedgerKey, PrivacyLedger
from privfl.config import ClientDPConfig, ClientSampling, DPConfig, FederationConfig, ProtectionKind, TrainingConfig
from privfl.data import dirichlet_partition, labels_of, load_breast_cancer, subsets
from privfl.errors import ConfigError
from privfl.federation import LEDGER_FILE, LEDGER_KEY_FILE, Federation, planned_rounds
from privfl.models import LogisticRegression


@pytest.fixture(scope="module")
def split():
    return load_breast_cancer()


@pytest.fixture(scope="module")
def clients(split):
    parts = dirichlet_partition(labels_of(split.train), 4, alpha=1.0, seed=0, min_size=20)
    return {f"site-{i}": s for i, s in enumerate(subsets(split.train, parts))}


def _federation(
    clients, split, *, dp=None, protection=ProtectionKind.PLAINTEXT, rounds=3, transport=None, fraction=1.0, seed=0, noise_seed=None
):
    return Federation(
        model_fn=lambda: LogisticRegression(30, 2),
        clients=clients,
        test_set=split.test,
        training=TrainingConfig(batch_size=16, learning_rate=0.5, dp=dp or DPConfig(noise_multiplier=1.0)),
        federation=FederationConfig(
            rounds=rounds, protection=protection, client_fraction=fraction, seed=seed, noise_seed=noise_seed
        ),
        transport=transport,
        progress=False,
    )


def test_federation_trains_with_ckks_within_budget(clients, split, tmp_path):
    result = _federation(clients, split, dp=DPConfig(target_epsilon=2.0), protection=ProtectionKind.CKKS, rounds=4).run(tmp_path / "run")
    summary = result.summary
    assert summary["final_accuracy"] >= 0.9
    assert summary["protection"] == "ckks" and summary["rounds"] == 4
    for info in summary["clients"].values():
        assert info["epsilon"] <= 2.0 and info["rounds_trained"] == 4 and info["rounds_skipped"] == 0
        assert info["epsilon"] >= 1.8  # calibrated for the whole run: the budget is used, not wasted
    assert summary["upload_bytes_per_client_round"] > summary["plaintext_bytes_per_client_round"]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("final_accuracy", "rounds", "protection", "clients", "upload_bytes_per_client_round", "plaintext_bytes_per_client_round"):
        assert key in on_disk
    assert len(list((tmp_path / "run" / "checkpoints").glob("round-*.pt"))) == 4
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    eps = [h["max_epsilon"] for h in history]
    assert eps == sorted(eps) and len(history) == 4


def test_budget_is_enforced_and_skips_are_recorded(clients, split):
    # A fixed sigma with a small cap: clients can afford only some rounds (the smaller the site, the
    # larger its sample rate and the fewer; with sigma 1.0 no site could afford one).
    dp = DPConfig(noise_multiplier=2.0, budget_epsilon=1.5)
    result = _federation(clients, split, dp=dp, rounds=6).run()
    skipped_any = False
    for info in result.summary["clients"].values():
        assert info["epsilon"] <= 1.5
        assert info["rounds_trained"] + info["rounds_skipped"] == 6
        skipped_any |= info["rounds_skipped"] > 0
    assert skipped_any
    assert any(0 < info["rounds_trained"] < 6 for info in result.summary["clients"].values())
    assert any(h["skipped"] for h in result.history)


class _BreakOne:
    """A network that corrupts one client's uploads."""

    def __init__(self, victim):
        self.victim = victim

    def deliver(self, sender, receiver, step, payload):
        if sender == self.victim and step == "update":
            return payload[:-7]
        return payload


def test_malformed_update_drops_that_client_and_the_round_completes(clients, split):
    result = _federation(clients, split, rounds=2, transport=_BreakOne("site-1")).run()
    for record in result.history:
        assert "site-1" in record["dropped"] and "truncated" in record["dropped"]["site-1"]
        assert set(record["contributors"]) == {"site-0", "site-2", "site-3"}
    assert result.summary["clients"]["site-1"]["rounds_dropped"] == 2
    # its budget was still spent: the data was used and a message did leave the site
    assert result.summary["clients"]["site-1"]["epsilon"] > 0
    assert result.summary["final_accuracy"] > 0.85
    notes = [e.note for e in result.ledger.entries if e.client == "site-1"]
    assert all("not aggregated" in n for n in notes)


def test_seed_reproduces_the_run(clients, split):
    a = _federation(clients, split, rounds=2, fraction=0.5, seed=3, noise_seed=11).run()
    b = _federation(clients, split, rounds=2, fraction=0.5, seed=3, noise_seed=11).run()
    assert [h["sampled"] for h in a.history] == [h["sampled"] for h in b.history]
    assert a.history[-1]["test_loss"] == b.history[-1]["test_loss"]
    assert "reproducible" in a.summary["noise"]


def test_noise_is_unpredictable_without_a_noise_seed(clients, split):
    # Same public seed, no noise_seed: every client takes part (fraction 1), the DP noise differs.
    a = _federation(clients, split, rounds=1, seed=3).run()
    b = _federation(clients, split, rounds=1, seed=3).run()
    assert [h["sampled"] for h in a.history] == [h["sampled"] for h in b.history]
    assert a.history[-1]["test_loss"] != b.history[-1]["test_loss"]
    assert "OS entropy" in a.summary["noise"]


def test_resume_never_resets_a_budget(clients, split, tmp_path):
    out = tmp_path / "run"
    _federation(clients, split, rounds=2).run(out)
    spent = PrivacyLedger.load(out / LEDGER_FILE, key=LedgerKey.read(out / LEDGER_KEY_FILE))
    # a fresh run into the same directory would reset budgets: refused
    with pytest.raises(ConfigError, match="resume"):
        _federation(clients, split, rounds=4).run(out)
    resumed = _federation(clients, split, rounds=4).run(out, resume=True)
    assert resumed.summary["rounds"] == 4
    for name in clients:
        assert resumed.ledger.epsilon(name) > spent.epsilon(name)
        assert resumed.summary["clients"][name]["rounds_trained"] == 4
    # resuming a finished run is refused: it trains and spends nothing more, and leaves the ledger (whose
    # head an exported model records) and the summary exactly as they were
    before = {name: (out / name).read_bytes() for name in (LEDGER_FILE, "summary.json", "history.json")}
    with pytest.raises(ConfigError, match="has finished: 4 rounds recorded"):
        _federation(clients, split, rounds=4).run(out, resume=True)
    assert {name: (out / name).read_bytes() for name in before} == before


def test_user_module_with_batchnorm_is_fixed_and_trains(clients, split):
    def model_fn():
        return nn.Sequential(nn.Linear(30, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))

    fed = Federation(
        model_fn=model_fn,
        clients=clients,
        test_set=split.test,
        training=TrainingConfig(batch_size=16, learning_rate=0.2, dp=DPConfig(noise_multiplier=1.0)),
        federation=FederationConfig(rounds=2, protection=ProtectionKind.PLAINTEXT),
        progress=False,
    )
    with pytest.warns(UserWarning, match="BatchNorm"):
        result = fed.run()
    assert result.summary["final_accuracy"] > 0.8


def test_bad_arguments_are_named(clients, split):
    with pytest.raises(ConfigError, match="clients"):
        Federation(model_fn=lambda: LogisticRegression(30, 2), clients={}, training=TrainingConfig(), federation=FederationConfig())
    with pytest.raises(ConfigError, match="model_fn"):
        Federation(model_fn=None, clients=clients, training=TrainingConfig(), federation=FederationConfig())


def test_planned_rounds_uses_the_participation_quantile():
    assert planned_rounds(10, 1.0, 0.99) == 10
    assert 2 <= planned_rounds(20, 0.1, 0.99) <= 7


def _sample_many(fed, rounds=40):
    plans = fed._plans()
    return [tuple(p.name for p in fed._sample(r, plans)) for r in range(rounds)]


@pytest.mark.parametrize("poisson", [False, True])
def test_client_sampling_is_secret_without_a_noise_seed(clients, split, poisson):
    # The review's finding: the sample came from default_rng([seed, round]), so anyone holding the
    # config could recompute who took part. Two federations with the same config must now differ.
    def fed(noise_seed):
        client_dp = ClientDPConfig(noise_multiplier=1.0, sampling=ClientSampling.POISSON if poisson else ClientSampling.FIXED)
        return Federation(
            model_fn=lambda: LogisticRegression(30, 2),
            clients=clients,
            training=TrainingConfig(dp=DPConfig(noise_multiplier=1.0)),
            federation=FederationConfig(rounds=40, client_fraction=0.5, seed=0, noise_seed=noise_seed, client_dp=client_dp),
            progress=False,
        )

    a, b = _sample_many(fed(None)), _sample_many(fed(None))
    # 40 rounds of 2 out of 4 (or Poisson at 1/2): equal by chance with probability below 6^-40.
    assert a != b
    assert len(set(a)) > 3  # and it is a sample, not a fixed set
    # the simulation switch makes it reproducible, and only then
    assert _sample_many(fed(7)) == _sample_many(fed(7))


def test_summary_records_whether_sampling_was_secret(clients, split):
    secret = _federation(clients, split, rounds=1, fraction=0.5).run()
    assert secret.summary["client_sampling_secret"] is True and "secret" in secret.summary["client_sampling"]
    seeded = _federation(clients, split, rounds=1, fraction=0.5, noise_seed=5).run()
    assert seeded.summary["client_sampling_secret"] is False
    assert "does not hold" in seeded.summary["client_sampling"]


def test_resume_with_secret_sampling_keeps_the_recorded_samples(clients, split, tmp_path):
    out = tmp_path / "run"
    first = _federation(clients, split, rounds=2, fraction=0.5).run(out)
    resumed = _federation(clients, split, rounds=3, fraction=0.5).run(out, resume=True)
    assert [h["sampled"] for h in resumed.history[:2]] == [h["sampled"] for h in first.history]
    for name in clients:
        trained = sum(name in h["trained"] for h in resumed.history)
        assert resumed.summary["clients"][name]["rounds_trained"] == trained


def test_frozen_random_layers_are_the_same_in_every_client_and_evaluation_model():
    # A frozen, randomly initialised layer is not in the exchanged parameter vector: every model the
    # run builds must still carry the first model's values, or the recorded accuracy describes
    # another model than the one returned.
    import torch
    from torch import nn

    from privfl.config import DPConfig, FederationConfig, ProtectionKind, TrainingConfig
    from privfl.data import iid_partition, load_breast_cancer, subsets
    from privfl.federation import Federation
    from privfl.training import evaluate

    def model_fn():
        frozen = nn.Linear(30, 30)
        frozen.requires_grad_(False)
        return nn.Sequential(frozen, nn.Tanh(), nn.Linear(30, 2))

    split = load_breast_cancer()
    parts = iid_partition(len(split.train), 3, seed=0)
    fed = Federation(
        model_fn=model_fn,
        clients={f"s{i}": d for i, d in enumerate(subsets(split.train, parts))},
        test_set=split.test,
        training=TrainingConfig(batch_size=32, learning_rate=0.5, dp=DPConfig(noise_multiplier=0.5)),
        federation=FederationConfig(rounds=2, protection=ProtectionKind.PLAINTEXT, noise_seed=0),
        progress=False,
    )
    result = fed.run()
    _, accuracy = evaluate(result.model, split.test, device=torch.device("cpu"))
    assert result.history[-1]["test_accuracy"] == accuracy


def test_summary_sigma_is_what_the_sites_trained_with_after_a_resume_with_more_rounds(tmp_path, caplog):
    # Resuming a finished 2-round run as a 4-round one recalibrates sigma for 4 rounds; the budget
    # is already spent, so no site trains again: the summary must report the sigma that ran.
    import logging

    from privfl.config import DPConfig, FederationConfig, ProtectionKind, TrainingConfig
    from privfl.data import iid_partition, load_breast_cancer, subsets
    from privfl.federation import Federation
    from privfl.models import LogisticRegression

    split = load_breast_cancer()
    clients = dict(zip(["a", "b"], subsets(split.train, iid_partition(len(split.train), 2, seed=0)), strict=True))

    def federation(rounds):
        return Federation(
            model_fn=lambda: LogisticRegression(30, 2),
            clients=clients,
            test_set=split.test,
            training=TrainingConfig(batch_size=64, learning_rate=0.5, dp=DPConfig(target_epsilon=1.0)),
            federation=FederationConfig(rounds=rounds, protection=ProtectionKind.PLAINTEXT, noise_seed=0),
            progress=False,
        )

    with caplog.at_level(logging.INFO, logger="privfl"):
        first = federation(2).run(tmp_path / "run")
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("round ")] == ["round 0", "round 1"]
    resumed = federation(4).run(tmp_path / "run", resume=True)
    for name in clients:
        used = first.summary["clients"][name]["noise_multiplier"]
        info = resumed.summary["clients"][name]
        assert info["rounds_trained"] == 2 and info["rounds_skipped"] == 2
        assert info["noise_multiplier"] == used and info["noise_multipliers_used"] == [used]
        assert info["planned_noise_multiplier"] > used  # recalibrated for 4 rounds, never run


def test_federation_takes_a_users_own_protection(split, clients):
    """Any Protection plugs in: here one that records what it was asked to aggregate."""
    from privfl.protocols.plaintext import PlaintextProtection

    class Counting(PlaintextProtection):
        name = "counting"

        def __init__(self):
            self.rounds = []

        def run_round(self, round_index, updates, transport):
            self.rounds.append((round_index, sorted(updates)))
            return super().run_round(round_index, updates, transport)

    protection = Counting()
    federation = Federation(
        model_fn=lambda: nn.Linear(30, 2),
        clients=clients,
        training=TrainingConfig(dp=DPConfig(noise_multiplier=1.0)),
        federation=FederationConfig(rounds=2, noise_seed=1),
        protection=protection,
        progress=False,
    )
    result = federation.run()
    assert protection.rounds == [(0, sorted(clients)), (1, sorted(clients))]
    assert result.summary["protection"] == "counting"
    with pytest.raises(ConfigError, match="Protection"):
        Federation(model_fn=lambda: nn.Linear(30, 2), clients=clients, training=TrainingConfig(),
                   federation=FederationConfig(), protection=object())


def test_client_level_dp_reaches_a_users_protection_only_through_its_declared_noise_placement(split, clients):
    """The driver passes release noise as an argument to a CENTRAL protection and refuses one that cannot place it."""
    import numpy as np

    from privfl.protocols.base import NoisePlacement, Protection, RoundResult

    class Mean(Protection):
        """A user protection: averages in the clear; applies release noise when it is given."""

        name = "mean"

        def __init__(self, placement):
            self.noise_placement = placement
            self.noised = []

        def run_round(self, round_index, updates, transport, *, release_noise=None):
            total_weight = sum(u.weight for u in updates.values())
            total = sum(u.weight * u.delta.astype(np.float64) for u in updates.values())
            self.noised.append(release_noise is not None)
            if release_noise is not None:
                total = release_noise(total)
            return RoundResult(average=total / total_weight, total_weight=total_weight, contributors=tuple(sorted(updates)))

    def federation(protection):
        return Federation(
            model_fn=lambda: nn.Linear(30, 2),
            clients=clients,
            training=TrainingConfig(dp=DPConfig(noise_multiplier=1.0)),
            federation=FederationConfig(rounds=2, noise_seed=1, client_dp=ClientDPConfig(noise_multiplier=1.0, clip_norm=0.5)),
            protection=protection,
            progress=False,
        )

    central = Mean(NoisePlacement.CENTRAL)
    result = federation(central).run()
    assert central.noised == [True, True]
    assert result.summary["client_level"]["noise"].startswith("central")
    # A protection that cannot place the noise would have run without it: refused before anyone trains.
    silent = Mean(NoisePlacement.NONE)
    with pytest.raises(ConfigError, match="cannot place client-level DP noise"):
        federation(silent)
    assert silent.noised == []
