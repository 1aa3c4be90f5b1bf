"""The accountant's cost with many distinct client sizes (sample rates).

The PRV path's per-(sigma, q) pieces are computed more cheaply than before: the mesh's Renyi tail
bound in closed form at integer orders (dp-accounting's fractional-order series only where it could
give a smaller answer), and the discretised step with one cdf pass instead of Opacus' two. These
tests pin the new pieces to the reference ones (dp-accounting's Renyi values, Opacus' own
``discretize``, and the whole epsilon computed with both reference pieces patched back in), and
count the expensive steps instead of timing them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from privfl import accounting
from privfl.accounting import Accountant, ClientBudget, DPEvent, PrivacyLedger, epsilon_of_events, noise_multiplier

DELTA = 1e-5

# (sigma, q, steps): small and large noise, sample rates from 1/2000 to 1 (no amplification), a
# handful to tens of thousands of steps, epsilons from ~0.05 to the hundreds.
CASES = [
    (1.0, 1 / 20, 20),
    (1.0, 1 / 7, 35),
    (0.8, 0.01, 1000),
    (1.0, 1.0, 5),
    (2.0, 0.5, 40),
    (0.6, 0.2, 200),
    (5.0, 0.001, 10_000),
    (1.1, 1 / 160, 320),
    (0.7, 1 / 3, 9),
    (3.0, 0.0005, 50_000),
    (0.5, 1.0, 3),
    (1.3, 1 / 64, 6400),
]


def _reference_discretize(q: float, sigma: float, domain):
    """Opacus' own discretize of its own truncated PRV (its mean by its own quadrature): the old path."""
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, TruncatedPrivacyRandomVariable, discretize

    with np.errstate(divide="ignore"):
        prv = TruncatedPrivacyRandomVariable(PoissonSubsampledGaussianPRV(q, sigma), domain.t_min, domain.t_max)
        dprv = discretize(prv, domain)
    return dprv.pmf, dprv.domain


def _reference_tail_epsilon(history, delta):
    """dp-accounting's Renyi accountant over every tail order (the old path)."""
    return accounting._rdp_epsilon(history, delta, accounting._RDP_TAIL_ORDERS)


@pytest.mark.parametrize("sigma", [0.3, 0.5, 0.8, 1.0, 2.0, 7.0, 50.0])
@pytest.mark.parametrize("q", [1e-4, 0.003, 0.05, 1 / 3, 0.9, 1.0])
def test_integer_order_renyi_curve_matches_dp_accounting(sigma, q):
    from dp_accounting.rdp.rdp_privacy_accountant import _compute_rdp_poisson_subsampled_gaussian

    ours = accounting._rdp_tail_per_step(sigma, q)
    theirs = _compute_rdp_poisson_subsampled_gaussian(q, sigma, [float(a) for a in accounting._RDP_TAIL_INTEGER_ORDERS])
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-15)  # per step; tiny q: ~1e-17 of rounding either way


@pytest.mark.parametrize(("sigma", "q", "steps"), [*CASES, (0.3, 1.0, 400), (0.4, 0.5, 3000), (0.55, 0.9, 64)])
@pytest.mark.parametrize("delta", [1e-5 / 4000, 1e-9])
def test_tail_bound_is_dp_accountings_minimum_over_every_tail_order(sigma, q, steps, delta):
    # The fractional orders are skipped only where they cannot give a smaller answer, so the bound is
    # the same minimum (to rounding); the last three cases are large epsilons, where they do win.
    history = ((sigma, q, steps),)
    ours = accounting._rdp_tail_epsilon(history, delta)
    assert ours == pytest.approx(_reference_tail_epsilon(history, delta), rel=1e-9)


def test_tail_bound_never_computes_fractional_orders_where_they_cannot_win(monkeypatch):
    computed = []
    real = accounting._rdp_epsilon

    def counting(history, delta, orders=accounting._RDP_ORDERS):
        computed.append(tuple(orders))
        return real(history, delta, orders)

    monkeypatch.setattr(accounting, "_rdp_epsilon", counting)
    for k in range(1, 21):
        accounting._rdp_tail_epsilon(((1.0, 1 / k, k),), DELTA / 4000)  # one round of 20 client sizes
    assert computed == []  # epsilons of 4 to 8: integer orders give the minimum
    accounting._rdp_tail_epsilon(((0.3, 1.0, 400),), DELTA / 4000)  # epsilon in the thousands
    assert computed == [accounting._RDP_TAIL_FRACTIONAL_ORDERS]


@pytest.mark.parametrize(("sigma", "q", "steps"), [CASES[i] for i in (0, 1, 2, 3, 4, 7, 8, 10)])  # PRV meshes under the cap
def test_discretised_step_matches_opacus(sigma, q, steps):
    domain = accounting._prv_domain(((sigma, q, steps),), 0.01, DELTA / 1000)
    assert domain is not None
    pmf, shifted = accounting._discretize_step(q, sigma, domain)
    ref_pmf, ref_shifted = _reference_discretize(q, sigma, domain)
    assert pmf.shape == ref_pmf.shape
    assert np.max(np.abs(pmf - ref_pmf)) < 1e-12
    assert abs(pmf.sum() - 1.0) < 1e-9
    assert abs(shifted.t_min - ref_shifted.t_min) < 1e-6 * domain.dt


def _reference_epsilon(history, delta, monkeypatch) -> float:
    """The whole PRV epsilon with the old pieces (dp-accounting tail bound, Opacus discretize) patched in."""
    with monkeypatch.context() as patch:
        patch.setattr(accounting, "_rdp_tail_epsilon", _reference_tail_epsilon)
        patch.setattr(accounting, "_discretize_step", _reference_discretize)
        accounting.clear_caches()
        try:
            return accounting._prv_epsilon(history, delta)
        finally:
            accounting.clear_caches()


@pytest.mark.parametrize(("sigma", "q", "steps"), CASES)
def test_prv_epsilon_matches_the_old_path(sigma, q, steps, monkeypatch):
    history = ((sigma, q, steps),)
    accounting.clear_caches()
    ours = accounting._prv_epsilon(history, DELTA)
    theirs = _reference_epsilon(history, DELTA, monkeypatch)
    # Both are Opacus' PRV answer (an upper bound within 0.01); they differ only by the rounding
    # of the cdf's two formulations, far below that.
    assert ours == pytest.approx(theirs, abs=1e-6, rel=1e-7)


def test_many_client_histories_match_the_old_path(monkeypatch):
    # 20 distinct sample rates (20 client sizes), each after 1 to 4 rounds, and two mixed histories.
    histories = [((1.0, 1 / k, r * k),) for k in range(1, 21) for r in (1, 4)]
    histories += [((1.0, 0.05, 60), (1.4, 0.02, 100)), ((0.9, 1 / 3, 9), (1.2, 1 / 11, 44), (2.0, 1.0, 2))]
    accounting.clear_caches()
    ours = [accounting._prv_epsilon(h, DELTA) for h in histories]
    theirs = [_reference_epsilon(h, DELTA, monkeypatch) for h in histories]
    np.testing.assert_allclose(ours, theirs, rtol=1e-7, atol=1e-6)


def test_calibration_matches_the_old_path(monkeypatch):
    for q, steps in [(1.0, 5), (1 / 7, 35), (0.01, 1000)]:
        accounting.clear_caches()
        ours = noise_multiplier(target_epsilon=3.0, sample_rate=q, steps=steps, delta=DELTA)
        with monkeypatch.context() as patch:
            patch.setattr(accounting, "_rdp_tail_epsilon", _reference_tail_epsilon)
            patch.setattr(accounting, "_discretize_step", _reference_discretize)
            accounting.clear_caches()
            theirs = noise_multiplier(target_epsilon=3.0, sample_rate=q, steps=steps, delta=DELTA)
        assert ours == pytest.approx(theirs, rel=1e-3)  # the search's own resolution
        assert epsilon_of_events([DPEvent(noise_multiplier=ours, sample_rate=q, steps=steps)], delta=DELTA) <= 3.0
    accounting.clear_caches()


def test_a_round_of_many_distinct_sizes_computes_each_plans_expensive_pieces_once(monkeypatch):
    # 20 clients, 20 sample rates, 16 rounds: the per-(sigma, q) Renyi curve is computed once per
    # plan for the whole run (not once per plan per round), dp-accounting's fractional-order series
    # never, Opacus' two-pass discretize never, and a discretisation only when a client's total
    # passes a power of two (at most 5 times each over 16 rounds).
    from opacus.accountants.analysis import prv as opacus_prv

    def refuse(*args, **kwargs):
        raise AssertionError("Opacus' two-pass discretize was called")

    monkeypatch.setattr(opacus_prv, "discretize", refuse)
    series = []
    real = accounting._rdp_epsilon
    monkeypatch.setattr(accounting, "_rdp_epsilon", lambda h, d, orders=accounting._RDP_ORDERS: series.append(orders) or real(h, d, orders))
    discretised = []
    real_discretize = accounting._discretize_step
    monkeypatch.setattr(accounting, "_discretize_step", lambda q, s, dom: discretised.append((q, s)) or real_discretize(q, s, dom))
    accounting.clear_caches()
    ledger = PrivacyLedger(accountant=Accountant.PRV)
    events = {}
    for k in range(1, 21):
        ledger.register(f"c{k}", ClientBudget(epsilon=math.inf, delta=DELTA))
        events[f"c{k}"] = DPEvent(noise_multiplier=1.0, sample_rate=1 / k, steps=k)
    for round_index in range(16):
        for name, event in events.items():
            ledger.epsilon_if(name, event)
            ledger.charge(round_index, name, event)
    assert accounting._rdp_tail_per_step.cache_info().misses == 20
    assert series == []
    assert len(discretised) <= 20 * 5
    per_plan = {q: sum(1 for d in discretised if d[0] == q) for q, _ in discretised}
    assert max(per_plan.values()) <= 5
    accounting.clear_caches()
