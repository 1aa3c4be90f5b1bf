"""The audit of a federation of many sites: every client and finding in audit.json, a report a person can
read (the spread over clients, the first findings of each code, worst first), and work that grows with what
the ledger holds, not with clients x rounds."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

import privfl.audit.report as report_module
from privfl.audit.report import audit_run
from privfl.config import DPConfig, FederationConfig, ProtectionKind, TrainingConfig
from privfl.data import ArrayDataset
from privfl.federation import Federation
from privfl.models import LogisticRegression
from privfl.results import SHOWN_ONE_BY_ONE

CLIENTS = 30
ROUNDS = 8


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    """30 sites, a third sampled per round, sigma 0.8 and no epsilon cap: PFA009 for every site, PFA001 for many
    (the run's result; its directory is ``run_dir``)."""
    rng = np.random.default_rng(0)
    clients = {}
    for k in range(CLIENTS):
        x = rng.normal(size=(20, 5)).astype(np.float32)
        clients[f"site-{k:02d}"] = ArrayDataset(x, (x[:, 0] > 0).astype(np.int64))
    out = tmp_path_factory.mktemp("many") / "run"
    return Federation(
        model_fn=lambda: LogisticRegression(5, 2), clients=clients,
        training=TrainingConfig(local_epochs=1, batch_size=20, learning_rate=0.1, dp=DPConfig(noise_multiplier=0.8)),
        federation=FederationConfig(rounds=ROUNDS, client_fraction=0.34, protection=ProtectionKind.PLAINTEXT, seed=0, noise_seed=0, device="cpu"),
        progress=False,
    ).run(out)  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(run) -> Path:
    return run.out_dir


def test_the_end_of_run_table_shows_the_sites_that_spent_most_and_the_spread(run) -> None:
    from rich.console import Console

    from privfl.report import print_run_report

    console = Console(record=True, width=200)
    print_run_report(run, console=console)
    text = console.export_text()
    clients = run.summary["clients"]
    rows = [line.split()[0] for line in text.splitlines() if re.match(r"^\s*site-\d\d ", line)]
    assert len(rows) == SHOWN_ONE_BY_ONE
    spent = sorted((c["epsilon"] for c in clients.values()), reverse=True)
    assert [clients[name]["epsilon"] for name in rows] == spent[:SHOWN_ONE_BY_ONE]
    assert f"the {SHOWN_ONE_BY_ONE} of {CLIENTS} clients that spent most" in text
    assert f"all {CLIENTS} clients: epsilon min {spent[-1]:.3f}, median {float(np.median(spent)):.3f}, max {spent[0]:.3f}" in text


def test_many_sites_are_summarized_in_the_report_and_kept_whole_in_the_json(run_dir: Path) -> None:
    assert CLIENTS > SHOWN_ONE_BY_ONE
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. matplotlib's "constrained_layout not applied" under a legend of 30 entries
        report = audit_run(run_dir)
    markdown = report.markdown
    data = json.loads(report.paths.json.read_text())
    assert len(data["sample_level"]) == CLIENTS

    # The per-round table: the spread over clients, one row per round, and who is ahead.
    table = markdown.split("### Epsilon after each round", 1)[1].split("\n## ", 1)[0]
    assert "| round |" in table and "client at max" in table and "site-00" not in table.splitlines()[4]
    rows = [line for line in table.splitlines() if re.match(r"^\|\s+\d+ \|", line)]
    assert len(rows) == ROUNDS
    for r, row in enumerate(rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        values = [c.epsilon_by_round[r] for c in report.clients]
        assert float(cells[3]) == pytest.approx(max(values), abs=1e-3)
        assert float(cells[2]) == pytest.approx(float(np.median(values)), abs=1e-3)
        assert next(c for c in report.clients if c.client == cells[4]).epsilon_by_round[r] == max(values)

    # Findings: all in the JSON; in the report, the first few of each code, then the others by field.
    uncapped = [f for f in report.findings if f.code == "PFA009"]
    assert len(uncapped) == CLIENTS and sum(1 for f in data["findings"] if f["code"] == "PFA009") == CLIENTS
    assert markdown.count("**WARNING PFA009** `") == 3
    assert f"**WARNING PFA009**, {CLIENTS - 3} more of this code (every one is in audit.json)" in markdown
    assert f"and {CLIENTS - 3 - 10} more" in markdown
    # A per-client finding is listed worst first.
    high = [f for f in report.findings if f.code == "PFA001"]
    assert len(high) > 3
    spent = {c.client: c.epsilon for c in report.clients}
    named = [spent[re.search(r"clients\.(site-\d+)\.", f.field).group(1)] for f in high]
    assert named == sorted(named, reverse=True)


def test_the_accountant_runs_when_a_client_spent_not_once_per_client_and_round(run_dir: Path, monkeypatch, tmp_path: Path) -> None:
    calls = []
    real = report_module._epsilon
    monkeypatch.setattr(report_module, "_epsilon", lambda events, *a, **k: calls.append(len(events)) or real(events, *a, **k))
    report = audit_run(run_dir, out_dir=tmp_path)
    trained = sum(c.rounds_trained for c in report.clients)
    assert trained < CLIENTS * ROUNDS / 2  # most clients sat out most rounds
    # A client's series: once for no event, once per round it trained, the cross-check and the final
    # comparison with the ledger's record (PRV requested and enforced: no second composition per round).
    assert len(calls) <= 2 * CLIENTS + trained + 10, (len(calls), CLIENTS * ROUNDS)


def test_pfa004_names_at_most_twelve_clients_at_their_budget(tmp_path: Path) -> None:
    # A cap of about one round: every site that trained once cannot afford another (PFA004 for each).
    rng = np.random.default_rng(1)
    clients = {}
    for k in range(CLIENTS):
        x = rng.normal(size=(20, 5)).astype(np.float32)
        clients[f"site-{k:02d}"] = ArrayDataset(x, (x[:, 0] > 0).astype(np.int64))
    Federation(
        model_fn=lambda: LogisticRegression(5, 2), clients=clients,
        training=TrainingConfig(local_epochs=1, batch_size=20, learning_rate=0.1, dp=DPConfig(noise_multiplier=2.0, budget_epsilon=3.0)),
        federation=FederationConfig(rounds=ROUNDS, client_fraction=0.5, protection=ProtectionKind.PLAINTEXT, seed=0, noise_seed=0, device="cpu"),
        progress=False,
    ).run(tmp_path / "run")  # fmt: skip
    report = audit_run(tmp_path / "run")
    (at_budget,) = [f for f in report.findings if f.code == "PFA004"]
    exhausted = [c for c in report.clients if c.rounds_skipped]
    assert len(exhausted) > SHOWN_ONE_BY_ONE
    assert at_budget.message.count("'site-") == SHOWN_ONE_BY_ONE
    assert f"and {len(exhausted) - SHOWN_ONE_BY_ONE} more (audit.json's sample_level has each)" in at_budget.message
