"""Accounting: known answers against an independent accountant, monotonicity, calibration, ledger."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privfl.accounting import (
    ClientBudget,
    DPEvent,
    LedgerStatus,
    PrivacyLedger,
    epsilon,
    epsilon_of_events,
    noise_multiplier,
)
from privfl.errors import BudgetExceededError, ConfigError, LedgerError

dp_accounting = pytest.importorskip("dp_accounting")


def _independent_epsilon(sigma: float, q: float, steps: int, delta: float, kind: str) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    if kind == "rdp":
        acc = dp_accounting.rdp.RdpAccountant()
    else:
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(event)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "delta"),
    [
        (1.1, 256 / 60000, 60 * 235, 1e-5),  # Abadi et al. 2016's MNIST setting
        (1.0, 0.01, 1000, 1e-5),
        (2.0, 0.2, 50, 1e-5),
        (0.8, 0.05, 200, 1e-6),
    ],
)
@pytest.mark.parametrize("kind", ["prv", "rdp"])
def test_epsilon_matches_independent_accountant_within_one_percent(sigma, q, steps, delta, kind):
    ours = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant=kind)
    theirs = _independent_epsilon(sigma, q, steps, delta, kind)
    assert ours == pytest.approx(theirs, rel=0.01)


def test_abadi_mnist_known_value():
    # Opacus' and TF-Privacy's RDP figure for sigma=1.1, q=256/60000, 60 epochs, delta=1e-5 is about 2.9.
    eps = epsilon(noise_multiplier=1.1, sample_rate=256 / 60000, steps=60 * 235, delta=1e-5, accountant="rdp")
    assert 2.6 < eps < 3.1
    # PRV is tighter than RDP, never looser.
    assert epsilon(noise_multiplier=1.1, sample_rate=256 / 60000, steps=60 * 235, delta=1e-5) < eps


@settings(max_examples=15, deadline=None)
@given(
    sigma=st.floats(0.6, 4.0),
    q=st.floats(0.01, 0.5),
    steps=st.integers(1, 200),
    extra=st.integers(1, 200),
)
def test_epsilon_only_grows_with_steps(sigma, q, steps, extra):
    a = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5, accountant="rdp")
    b = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps + extra, delta=1e-5, accountant="rdp")
    assert b >= a


@pytest.mark.parametrize(("target", "q", "steps"), [(3.0, 0.2, 50), (1.0, 0.05, 400), (8.0, 0.5, 10)])
def test_calibration_round_trips(target, q, steps):
    sigma = noise_multiplier(target_epsilon=target, sample_rate=q, steps=steps, delta=1e-5)
    reached = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)
    assert reached <= target
    assert reached >= 0.97 * target  # the tightest sigma, not a wasteful one
    assert epsilon(noise_multiplier=sigma * 0.97, sample_rate=q, steps=steps, delta=1e-5) > target


def test_composition_of_events_equals_one_event():
    one = epsilon(noise_multiplier=1.5, sample_rate=0.1, steps=60, delta=1e-5)
    split = epsilon_of_events(
        [DPEvent(noise_multiplier=1.5, sample_rate=0.1, steps=s) for s in (10, 20, 30)], delta=1e-5
    )
    assert split == pytest.approx(one, rel=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"noise_multiplier": 0.0, "sample_rate": 0.1, "steps": 1, "delta": 1e-5}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 1, "delta": 1e-5}, "sample_rate"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": -1, "delta": 1e-5}, "steps"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1, "delta": 1.0}, "delta"),
    ],
)
def test_bad_accounting_input_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        epsilon(**kwargs)
    assert info.value.field == field


def _ledger() -> PrivacyLedger:
    ledger = PrivacyLedger()
    ledger.register("a", ClientBudget(epsilon=2.0, delta=1e-5))
    ledger.register("b", ClientBudget(epsilon=math.inf, delta=1e-5))
    return ledger


def test_ledger_is_monotone_and_enforces_the_budget():
    ledger = _ledger()
    event = DPEvent(noise_multiplier=2.0, sample_rate=0.1, steps=10)
    spent = []
    round_index = 0
    while ledger.can_afford("a", event):
        assert ledger.refusal("a", event) is None
        ledger.charge(round_index, "a", event)
        spent.append(ledger.epsilon("a"))
        round_index += 1
    assert len(spent) >= 2
    assert spent == sorted(spent)
    assert spent[-1] <= 2.0
    reason = ledger.refusal("a", event)
    assert reason == f"another round would spend epsilon {ledger.epsilon_if('a', event):.3f} > budget 2.000"
    with pytest.raises(BudgetExceededError):
        ledger.charge(round_index, "a", event)
    assert ledger.epsilon("a") == spent[-1]  # a refused charge records nothing
    ledger.record_skip(round_index, "a", reason="budget")
    assert ledger.rounds("a", LedgerStatus.TRAINED) == len(spent)
    assert ledger.rounds("a", LedgerStatus.SKIPPED_BUDGET) == 1


def test_ledger_persists_and_restores_spending(tmp_path):
    ledger = _ledger()
    event = DPEvent(noise_multiplier=3.0, sample_rate=0.2, steps=10)
    ledger.charge(0, "a", event)
    ledger.charge(0, "b", event)
    ledger.charge(1, "b", event)
    path = tmp_path / "ledger.jsonl"
    ledger.save(path)
    for line in path.read_text().splitlines():
        json.loads(line)  # valid JSON lines (an uncapped budget is null, not Infinity)
    restored = PrivacyLedger.load(path)
    assert restored.epsilon("a") == pytest.approx(ledger.epsilon("a"))
    assert restored.epsilon("b") == pytest.approx(ledger.epsilon("b"))
    assert restored.budget("b").epsilon == math.inf
    assert restored.entries == ledger.entries
    # re-registering with a different budget cannot reset or loosen it
    with pytest.raises(ConfigError):
        restored.register("a", ClientBudget(epsilon=5.0, delta=1e-5))


def test_ledger_load_rejects_garbage(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"format_version": 1, "entries": 3}\n')
    with pytest.raises(LedgerError, match=r"ledger\.jsonl"):
        PrivacyLedger.load(path)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_noise_multiplier_for_the_rest_of_a_run_counts_what_was_spent(accountant):
    spent = [DPEvent(noise_multiplier=1.5, sample_rate=0.1, steps=20)] * 2  # two rounds at an older plan
    already = epsilon_of_events(spent, delta=1e-5, accountant=accountant)
    assert already < 3.0
    sigma = noise_multiplier(target_epsilon=3.0, sample_rate=0.1, steps=60, delta=1e-5, accountant=accountant, spent=spent)
    rest = [DPEvent(noise_multiplier=sigma, sample_rate=0.1, steps=60)]
    total = epsilon_of_events([*spent, *rest], delta=1e-5, accountant=accountant)
    assert 2.95 <= total <= 3.0  # the whole budget, and no more
    # a little less noise would pass the target: the search found (nearly) the smallest sigma
    assert epsilon_of_events([*spent, DPEvent(noise_multiplier=sigma * 0.99, sample_rate=0.1, steps=60)], delta=1e-5, accountant=accountant) > 3.0
    # more noise than from zero, since part of the budget is gone
    assert sigma > noise_multiplier(target_epsilon=3.0, sample_rate=0.1, steps=60, delta=1e-5, accountant=accountant)
    with pytest.raises(ConfigError, match="unreachable"):  # nothing left: no sigma fits another step
        noise_multiplier(target_epsilon=already, sample_rate=0.1, steps=60, delta=1e-5, accountant=accountant, spent=[*spent, *spent])
