"""The accountant interface: one contract every adapter runs, known answers, and the ledger on top of it."""

from __future__ import annotations

import functools
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq
from scipy.stats import norm

from privfl import accounting
from privfl.accounting import (
    Accountant,
    ClientBudget,
    DPEvent,
    FixedSizeSampledGaussian,
    PLDAccountant,
    PoissonSampledGaussian,
    PrivacyAccountant,
    PrivacyLedger,
    PRVAccountant,
    RDPAccountant,
    epsilon_of_events,
    make_accountant,
)
from privfl.errors import ConfigError, LedgerError

dp_accounting = pytest.importorskip("dp_accounting")

DELTA = 1e-5


def _gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism with sensitivity 1 (Balle and Wang 2018, Theorem 8)."""

    def excess(eps: float) -> float:
        return norm.cdf(-eps * sigma + 1 / (2 * sigma)) - math.exp(eps) * norm.cdf(-eps * sigma - 1 / (2 * sigma)) - delta

    return brentq(excess, 0.0, 100.0, xtol=1e-12)


@functools.cache
def _dp_accounting_epsilon(sigma: float, q: float, steps: int, method: str) -> float:
    """dp-accounting's own answer: its RDP accountant, or its PLD accountant on a 1e-4 loss grid."""
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    if method == "rdp":
        acc = dp_accounting.rdp.RdpAccountant()
    else:
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    return acc.compose(event).get_epsilon(DELTA)


class AccountantContract:
    """What every accountant must do. Subclasses set ``kind`` and how close to the reference it must be."""

    kind: Accountant
    cls: type[PrivacyAccountant]
    tight: bool  # within 0.02 of the exact or fine-grid answer (PRV, PLD); RDP is only an upper bound

    def make(self) -> PrivacyAccountant:
        return make_accountant(self.kind)

    def reference(self, sigma: float, q: float, steps: int) -> float:
        return _dp_accounting_epsilon(sigma, q, steps, "rdp" if self.kind is Accountant.RDP else "pld")

    def test_factory_gives_this_adapter(self):
        acc = self.make()
        assert type(acc) is self.cls and isinstance(acc, PrivacyAccountant)

    def test_nothing_composed_is_epsilon_zero(self):
        assert self.make().get_epsilon(DELTA) == 0.0
        assert self.make().compose(PoissonSampledGaussian(sample_rate=0.1, noise_multiplier=1.0), count=0).get_epsilon(DELTA) == 0.0

    @pytest.mark.parametrize(("sigma", "q", "steps"), [(1.1, 256 / 60000, 2350), (2.0, 0.2, 50), (1.0, 0.05, 300)])
    def test_matches_dp_accounting_directly(self, sigma, q, steps):
        ours = self.make().compose(PoissonSampledGaussian(sample_rate=q, noise_multiplier=sigma), steps).get_epsilon(DELTA)
        theirs = self.reference(sigma, q, steps)
        if self.tight:
            # Both upper bounds: PRV within its eps_error (0.01) of the truth, PLD on a grid fitted to the answer.
            assert abs(ours - theirs) <= 0.02 + 1e-3 * theirs
        else:
            assert ours == pytest.approx(theirs, rel=0.01)  # a wider order grid than dp-accounting's default

    @pytest.mark.parametrize(("sigma", "steps"), [(2.0, 1), (4.0, 16), (10.0, 100)])
    def test_gaussian_known_answer(self, sigma, steps):
        # k Gaussian releases at sigma are one Gaussian release at sigma / sqrt(k).
        exact = _gaussian_epsilon(sigma / math.sqrt(steps), DELTA)
        ours = self.make().compose(PoissonSampledGaussian(sample_rate=1.0, noise_multiplier=sigma), steps).get_epsilon(DELTA)
        assert ours >= exact * (1 - 1e-6)  # an upper bound
        assert ours <= (exact + 0.02 if self.tight else exact * 1.35)

    def test_compose_count_k_equals_k_composes(self):
        event = PoissonSampledGaussian(sample_rate=0.05, noise_multiplier=1.3)
        once = self.make().compose(event, 7)
        several = self.make()
        for _ in range(7):
            several.compose(event)
        assert once.get_epsilon(DELTA) == several.get_epsilon(DELTA)

    def test_order_of_events_does_not_matter(self):
        a = PoissonSampledGaussian(sample_rate=0.05, noise_multiplier=1.3)
        b = FixedSizeSampledGaussian(sample_size=10, population_size=100, noise_multiplier=8.0)
        forward = self.make().compose(a, 30).compose(b, 3)
        backward = self.make().compose(b, 2).compose(a, 30).compose(b)
        assert forward.get_epsilon(DELTA) == backward.get_epsilon(DELTA)

    # Inherited by one class per accountant: the differing executors are the point of a contract suite.
    @settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.differing_executors])
    @given(sigma=st.floats(0.8, 4.0), q=st.floats(0.01, 0.5), steps=st.integers(1, 60), extra=st.integers(1, 60))
    def test_epsilon_only_grows_with_composition(self, sigma, q, steps, extra):
        event = PoissonSampledGaussian(sample_rate=q, noise_multiplier=sigma)
        acc = self.make().compose(event, steps)
        before = acc.get_epsilon(DELTA)
        after = acc.compose(event, extra).get_epsilon(DELTA)
        assert after >= before - (0.01 if self.kind is Accountant.PRV else 0.0)  # PRV: within its eps_error

    def test_fixed_size_sampling_is_recorded_as_itself_and_counted_without_amplification(self):
        event = FixedSizeSampledGaussian(sample_size=5, population_size=50, noise_multiplier=6.0)
        acc = self.make().compose(event, 20)
        assert acc.events == ((event, 20),)
        # One member moves the sum by 2C: the same numbers as the Gaussian at sigma / 2 and q = 1.
        same = self.make().compose(PoissonSampledGaussian(sample_rate=1.0, noise_multiplier=3.0), 20)
        assert acc.get_epsilon(DELTA) == same.get_epsilon(DELTA)
        assert acc.get_epsilon(DELTA) == epsilon_of_events([DPEvent(noise_multiplier=3.0, sample_rate=1.0, steps=20)], delta=DELTA, accountant=self.kind)

    def test_bad_input_is_refused_with_the_field(self):
        acc = self.make()
        with pytest.raises(ConfigError) as info:
            acc.compose(DPEvent(noise_multiplier=1.0, sample_rate=0.1, steps=3))  # a ledger record, not an event
        assert info.value.field == "event"
        with pytest.raises(ConfigError) as info:
            acc.compose(PoissonSampledGaussian(sample_rate=0.1, noise_multiplier=1.0), count=-1)
        assert info.value.field == "count"
        with pytest.raises(ConfigError) as info:
            acc.get_epsilon(0.0)
        assert info.value.field == "delta"


class TestPRV(AccountantContract):
    kind, cls, tight = Accountant.PRV, PRVAccountant, True


class TestRDP(AccountantContract):
    kind, cls, tight = Accountant.RDP, RDPAccountant, False


class TestPLD(AccountantContract):
    kind, cls, tight = Accountant.PLD, PLDAccountant, True


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: PoissonSampledGaussian(sample_rate=0.0, noise_multiplier=1.0), "sample_rate"),
        (lambda: PoissonSampledGaussian(sample_rate=0.5, noise_multiplier=math.inf), "noise_multiplier"),
        (lambda: FixedSizeSampledGaussian(sample_size=0, population_size=5, noise_multiplier=1.0), "sample_size"),
        (lambda: FixedSizeSampledGaussian(sample_size=6, population_size=5, noise_multiplier=1.0), "population_size"),
        (lambda: make_accountant("moments"), "accountant"),
    ],
)
def test_events_validate_their_fields(make, field):
    with pytest.raises(ConfigError) as info:
        make()
    assert info.value.field == field


def test_abadi_mnist_known_value_through_the_interface():
    # Opacus' and TF-Privacy's RDP figure for sigma 1.1, q 256/60000, 60 epochs, delta 1e-5 is about 2.9.
    event = PoissonSampledGaussian(sample_rate=256 / 60000, noise_multiplier=1.1)
    rdp = RDPAccountant().compose(event, 60 * 235).get_epsilon(DELTA)
    prv = PRVAccountant().compose(event, 60 * 235).get_epsilon(DELTA)
    assert 2.6 < rdp < 3.1
    assert prv < rdp


def test_a_ledger_record_is_its_mechanism_composed_steps_times():
    record = DPEvent(noise_multiplier=1.4, sample_rate=0.02, steps=150)
    assert record.mechanism == PoissonSampledGaussian(sample_rate=0.02, noise_multiplier=1.4)
    direct = PRVAccountant().compose(record.mechanism, record.steps).get_epsilon(DELTA)
    assert epsilon_of_events([record], delta=DELTA) == direct


def test_answers_do_not_depend_on_what_is_cached():
    # The per-step pieces are cached; a cold call must give the same bits as a warm one.
    history = [DPEvent(noise_multiplier=1.2, sample_rate=1 / 30, steps=30 * r) for r in (1, 2, 3)]
    warm = {}
    for kind in Accountant:
        for n in range(1, 4):
            warm[kind, n] = epsilon_of_events(history[:n], delta=DELTA, accountant=kind)
    for kind in Accountant:
        for n in (3, 1, 2):
            accounting.clear_caches()
            assert epsilon_of_events(history[:n], delta=DELTA, accountant=kind) == warm[kind, n]


def test_a_client_growing_round_by_round_reuses_its_discretised_step():
    # One evaluation per client per round must not rediscretise the PRV every round.
    accounting.clear_caches()
    ledger = PrivacyLedger()
    ledger.register("a", ClientBudget(epsilon=math.inf, delta=DELTA))
    event = DPEvent(noise_multiplier=1.5, sample_rate=1 / 20, steps=20)
    for round_index in range(16):
        ledger.epsilon_if("a", event)
        ledger.charge(round_index, "a", event)
        ledger.epsilon("a")
    # 20 .. 320 steps: the mesh is redesigned when the total passes 32, 64, 128 and 256 steps.
    assert accounting._STEP_PRVS.misses <= 5
    assert accounting._STEP_PRVS.hits >= 11


def _ledger_with_history() -> PrivacyLedger:
    ledger = PrivacyLedger()
    ledger.register("a", ClientBudget(epsilon=5.0, delta=DELTA))
    ledger.register("b", ClientBudget(epsilon=math.inf, delta=DELTA))
    event = DPEvent(noise_multiplier=1.2, sample_rate=0.05, steps=40)
    ledger.charge(0, "a", event)
    ledger.record_skip(0, "b", reason="budget")
    ledger.mark_resume(1)
    ledger.charge(1, "a", event)
    ledger.annotate_last("a", "update not aggregated in round 1: dropped")
    return ledger


def test_ledger_from_json_round_trips():
    ledger = _ledger_with_history()
    data = json.loads(json.dumps(ledger.to_json()))
    again = PrivacyLedger.from_json(data)
    assert again.entries == ledger.entries
    assert again.superseded() == ledger.superseded()
    assert again.epsilon("a") == ledger.epsilon("a")
    assert again.budget("b").epsilon == math.inf
    assert again.to_json() == ledger.to_json()


def test_ledger_from_json_counts_with_another_accountant_on_request():
    ledger = _ledger_with_history()
    again = PrivacyLedger.from_json(ledger.to_json(), accountant="rdp")
    assert again.accountant is Accountant.RDP and again.recorded_accountant == "prv"
    assert again.epsilon("a") == epsilon_of_events(ledger.events("a"), delta=DELTA, accountant="rdp")
    assert again.epsilon("a") > ledger.epsilon("a")  # RDP is looser


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.pop("budgets"),
        lambda d: d.update(format_version=1),
        lambda d: d["entries"][0].update(steps=-3),
        lambda d: d["entries"][0].update(client="nobody"),
        lambda d: d["entries"][0].update(extra=1),
    ],
)
def test_ledger_from_json_refuses_what_no_run_writes(edit):
    data = json.loads(json.dumps(_ledger_with_history().to_json()))
    edit(data)
    with pytest.raises(LedgerError):
        PrivacyLedger.from_json(data)


def test_ledger_answers_are_the_interface_answers_bit_for_bit():
    # The ledger keeps a merged history per client; it must ask exactly what epsilon_of_events asks.
    ledger = PrivacyLedger()
    ledger.register("a", ClientBudget(epsilon=math.inf, delta=DELTA))
    events = [DPEvent(noise_multiplier=1.3, sample_rate=1 / 25, steps=25), DPEvent(noise_multiplier=0.9, sample_rate=1 / 25, steps=25)]
    for round_index in range(4):
        event = events[round_index % 2]
        would = ledger.epsilon_if("a", event)
        assert would == epsilon_of_events([*ledger.events("a"), event], delta=DELTA)
        ledger.charge(round_index, "a", event)
        assert ledger.epsilon("a") == would == ledger.entries[-1].epsilon
        acc = PRVAccountant()
        for e in ledger.events("a"):
            acc.compose(e.mechanism, e.steps)
        assert acc.get_epsilon(DELTA) == would
