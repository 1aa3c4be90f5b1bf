"""`privfl lint` and the run plan every client identically (one computation: privfl.plan.plan_site)."""

from __future__ import annotations

import dataclasses

import pytest

from privfl.audit.lint import _calibrated_sigma, _plans
from privfl.config import ClientDPConfig, ClientSampling, default_config
from privfl.federation import Federation
from privfl.models import build_model
from privfl.runner import load_dataset, split_clients


@pytest.mark.parametrize(
    "fraction, rounds, client_dp",
    [(1.0, 10, None), (0.3, 20, None), (0.6, 7, None), (0.5, 12, ClientDPConfig(noise_multiplier=1.0, clip_norm=1.0, sampling=ClientSampling.POISSON))],
)
def test_lint_and_run_plan_every_client_the_same(fraction, rounds, client_dp):
    base = default_config()
    config = dataclasses.replace(
        base, federation=dataclasses.replace(base.federation, client_fraction=fraction, rounds=rounds, client_dp=client_dp)
    )
    split = load_dataset(config)
    clients = split_clients(config, split)
    federation = Federation(
        model_fn=lambda: build_model(config.model, split.train.input_shape, split.train.num_classes),
        clients=clients, training=config.training, federation=config.federation, progress=False,
    )
    run_plans = {plan.name: plan for plan in federation._plans()}
    lint_plans = {plan.client: plan for plan in _plans(config, {name: len(ds) for name, ds in clients.items()})}
    assert set(run_plans) == set(lint_plans) == set(clients)
    for name, run in run_plans.items():
        lint = lint_plans[name]
        assert lint.sample_rate == run.sample_rate
        assert lint.steps_per_round == run.steps_per_round
        assert _calibrated_sigma(config, lint) == run.noise_multiplier


def test_the_audit_finds_what_lint_planned(tmp_path):
    # The audit reads what ran (the ledger); lint plans it from the config: for every client they agree.
    from privfl.audit.report import audit_run

    base = default_config()
    config = dataclasses.replace(base, federation=dataclasses.replace(base.federation, client_fraction=0.6, rounds=4))
    split = load_dataset(config)
    clients = split_clients(config, split)
    Federation(
        model_fn=lambda: build_model(config.model, split.train.input_shape, split.train.num_classes),
        clients=clients, training=config.training, federation=config.federation, progress=False,
    ).run(tmp_path / "run")
    lint_plans = {plan.client: plan for plan in _plans(config, {name: len(ds) for name, ds in clients.items()})}
    report = audit_run(tmp_path / "run", out_dir=tmp_path / "audit")
    audited = {c.client: c for c in report.clients}
    assert set(audited) == set(lint_plans)
    trained = 0
    for name, lint in lint_plans.items():
        client = audited[name]
        trained += client.rounds_trained
        if client.rounds_trained:
            assert client.noise_multipliers == (_calibrated_sigma(config, lint),)
            assert client.sample_rates == (lint.sample_rate,)
            assert client.steps == client.rounds_trained * lint.steps_per_round
    assert trained > 0
