"""Client-level DP under secure aggregation: the range is derived from the noise, the aggregate noise is the charged one, clipping fails closed."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import stats

from privfl.client_dp import (
    CLIP_TAIL_FRACTION,
    ClientDPPlan,
    delta_noise_multiplier,
    distributed_noise,
    plan_client_dp,
    secagg_range,
)
from privfl.config import ClientDPConfig, DPConfig, FederationConfig, ProtectionKind, TrainingConfig
from privfl.data import iid_partition, make_credit, subsets
from privfl.errors import ConfigError, ProtocolAbort
from privfl.federation import Federation
from privfl.models import MLP
from privfl.noise import SeededRandom
from privfl.protocols.base import ClientUpdate
from privfl.protocols.secagg import SecAggConfig, SecAggProtection

# The example of docs/client-dp.md: adaptive clipping from S = 0.5, target epsilon 2 at delta 1e-4,
# one site in ten per round (Poisson).
DOCS_EXAMPLE = ClientDPConfig(target_epsilon=2.0, delta=1e-4, clip_norm=0.5, adaptive=True, target_quantile=0.5)


def _plan(z: float, bit_std: float = 0.0) -> ClientDPPlan:
    z_delta = delta_noise_multiplier(z, bit_std) if bit_std else z
    return ClientDPPlan(
        noise_multiplier=z, accounted_noise_multiplier=z, delta_noise_multiplier=z_delta,
        bit_noise_std=bit_std, sample_rate=1.0, expected_clients=10.0,
    )


def test_range_covers_the_noise_with_the_stated_tail_bound():
    # the docs' example with its noise fixed (1.55 is what its epsilon 2 calibrates to over 50 rounds)
    fixed = dataclasses.replace(DOCS_EXAMPLE, target_epsilon=None, noise_multiplier=1.55)
    plan = plan_client_dp(fixed, num_clients=100, client_fraction=0.1, rounds=50)
    kw = dict(dim=2818, adaptive=True, shares=7, max_clients=100, rounds=50, delta=1e-4)
    derived = secagg_range(plan, clip_norm=0.5, **kw)
    update, bit = derived.noise.update, derived.noise.bit
    # c >= bound + grid (1 + k s) in both blocks: a coordinate clips only if its share exceeds k s
    assert derived.clip_range >= 0.5 + update.grid * (1 + derived.tail_sigmas * update.sigma_steps)
    assert derived.clip_range >= 0.5 + bit.grid * (1 + derived.tail_sigmas * bit.sigma_steps)
    # 2 n (d + 1) exp(-k^2 / 2) <= p (sub-Gaussian tail, union bound), p = delta 2^-10 / (T (1 + e^32))
    coords = 100 * 2819
    assert 2 * coords * math.exp(-derived.tail_sigmas**2 / 2) <= derived.clip_probability * (1 + 1e-9)
    assert derived.clip_probability * 50 * (1 + math.exp(32)) == pytest.approx(1e-4 * CLIP_TAIL_FRACTION, rel=1e-9)
    assert derived.tail_delta == pytest.approx(1e-4 * CLIP_TAIL_FRACTION)
    # the quantizer step divides every grid, and the modulus holds 100 clients' encodings
    step = 2.0**-derived.fraction_bits
    assert update.grid % step == 0 and bit.grid % step == 0 and derived.clip_range % step == 0
    assert 2 * 100 * round(derived.clip_range / step) + 1 <= 2**32 and derived.bits_needed <= 32
    # the shares still sum (over t) to at least the accounted noise
    assert update.sigma_steps * update.grid * math.sqrt(7) >= plan.delta_noise_multiplier * 0.5
    # re-derived when adaptive clipping moves S: the range follows S
    bigger = secagg_range(plan, clip_norm=4.0, **kw)
    assert bigger.clip_range == pytest.approx(8 * derived.clip_range, rel=0.01)
    # the default clip range (1.0) is far below what these shares need (the setting)
    assert derived.clip_range > 10.0


def test_range_covers_a_large_bit_noise_and_coarsens_to_fit_few_bits():
    # The centred bit's share is clipped by the same c: a large sigma_b must widen the range.
    plan = _plan(1.0, bit_std=50.0)
    derived = secagg_range(plan, clip_norm=0.1, dim=50, adaptive=True, shares=3, max_clients=10, rounds=5, delta=1e-5)
    bit = derived.noise.bit
    assert derived.clip_range >= 0.5 + bit.grid * (1 + derived.tail_sigmas * bit.sigma_steps) > 50.0 / math.sqrt(3) * 8
    # few modulus bits: the step is coarsened (the extra rounding folded into the share scale)
    narrow = secagg_range(_plan(1.0), clip_norm=1.0, dim=10_000, adaptive=False, shares=5, max_clients=50, rounds=10, delta=1e-5, bits=24)
    wide = secagg_range(_plan(1.0), clip_norm=1.0, dim=10_000, adaptive=False, shares=5, max_clients=50, rounds=10, delta=1e-5)
    assert narrow.bits_needed <= 24 and narrow.fraction_bits < wide.fraction_bits
    assert narrow.noise.update.sigma_steps * narrow.noise.update.grid * math.sqrt(5) >= 1.0
    with pytest.raises(ConfigError, match="bits"):
        secagg_range(_plan(1.0), clip_norm=1.0, dim=10_000, adaptive=False, shares=5, max_clients=50, rounds=10, delta=1e-5, bits=8)


def test_shares_never_reach_the_derived_range():
    plan = _plan(2.0, bit_std=3.0)
    derived = secagg_range(plan, clip_norm=1.0, dim=20_000, adaptive=True, shares=2, max_clients=4, rounds=1, delta=1e-3)
    step = 2.0**-derived.fraction_bits
    worst = 0.0
    for seed in range(4):
        vector = np.concatenate([np.full(20_000, 1.0 / math.sqrt(20_000)), [0.5]])
        vector[0] = 1.0 - 1e-9  # one coordinate at the L2 bound
        share = distributed_noise(vector, plan=plan, clip_norm=1.0, adaptive=True, threshold=2, source=SeededRandom(seed), min_grid=step)
        worst = max(worst, float(np.max(np.abs(share))))
    assert worst < derived.clip_range / 2  # k is about 9.6 share std here; the draws stay below 5


def test_fail_on_clip_aborts_before_anything_is_sent():
    sent = []

    class Spy:
        def deliver(self, sender, receiver, step, payload):
            sent.append(step)
            return payload

    updates = {f"c{i}": ClientUpdate(delta=np.full(8, 0.1 * i), weight=1.0) for i in range(4)}
    strict = SecAggProtection(SecAggConfig(threshold=3, clip_range=0.25, fraction_bits=12, fail_on_clip=True))
    with pytest.raises(ProtocolAbort, match="fail_on_clip"):
        strict.run_round(0, updates, Spy())
    assert sent == []
    # without it, the same round clips and goes on (plain FedAvg)
    lenient = SecAggProtection(SecAggConfig(threshold=3, clip_range=0.25, fraction_bits=12))
    lenient.run_round(0, updates, Spy())
    assert lenient.clipped == {"c0": 0, "c1": 0, "c2": 0, "c3": 8} and sent
    with pytest.raises(ConfigError, match="fail_on_clip"):
        SecAggConfig(fail_on_clip=1)


@pytest.fixture(scope="module")
def credit_sites():
    split = make_credit(num_rows=3000, seed=2)
    parts = iid_partition(len(split.train), 30, seed=0)
    return split, {f"site-{i:02d}": s for i, s in enumerate(subsets(split.train, parts))}


def _federation(sites, *, rounds=3, seed=0):
    _split, clients = sites
    return Federation(
        model_fn=lambda: MLP(8, 2, hidden=256),  # 2818 parameters: a chi-squared test with power
        clients=clients,
        training=TrainingConfig(batch_size=32, learning_rate=0.5, dp=DPConfig(noise_multiplier=1.0)),
        federation=FederationConfig(
            rounds=rounds, seed=seed, client_fraction=0.1, protection=ProtectionKind.SECAGG, noise_seed=11,
            secagg=SecAggConfig(threshold=2 / 3), client_dp=DOCS_EXAMPLE,
        ),
        progress=False,
    )


def test_aggregate_noise_is_the_charged_noise_at_the_docs_settings(credit_sites, monkeypatch):
    import privfl.federation as federation_module

    fed = _federation(credit_sites)
    calls = []  # (clean vector, noised vector) per site and round
    real_noise = federation_module.distributed_noise

    def recording_noise(vector, **kw):
        out = real_noise(vector, **kw)
        calls.append((np.array(vector), out))
        return out

    monkeypatch.setattr(federation_module, "distributed_noise", recording_noise)
    rounds = []
    real_run_round = SecAggProtection.run_round

    def recording_run_round(self, round_index, updates, transport):
        outcome = real_run_round(self, round_index, updates, transport)
        rounds.append((dict(updates), outcome, dict(self.clipped), self.config, fed._secagg_range))
        return outcome

    monkeypatch.setattr(SecAggProtection, "run_round", recording_run_round)
    result = fed.run()
    assert all(h["aborted"] is None or "needs at least" in h["aborted"] for h in result.history)
    plan = fed._client_plan
    normalised, charged_ratio = [], []
    by_output = {id(out): clean for clean, out in calls}
    for updates, outcome, clipped, config, derived in rounds:
        assert sum(clipped.values()) == 0  # nothing was clipped...
        assert config.fail_on_clip and config.clip_range == derived.clip_range  # ...by the derived range
        clean = sum(by_output[id(updates[u].delta)] for u in outcome.contributors)
        noise = outcome.average * outcome.total_weight - clean
        n = len(outcome.contributors)
        update, bit = derived.noise.update, derived.noise.bit
        # the sum of n shares: variance n (s gamma)^2 plus the rounding (at most gamma^2 / 4 per share)
        std_update = math.sqrt(n * ((update.sigma_steps * update.grid) ** 2 + update.grid**2 / 4))
        std_bit = math.sqrt(n * ((bit.sigma_steps * bit.grid) ** 2 + bit.grid**2 / 4))
        normalised += [*(noise[:-1] / std_update), noise[-1] / std_bit]
        # the charged noise z_delta S: the sum carries it times sqrt(rho) whatever n is, no less
        charged = plan.delta_noise_multiplier * update.sensitivity  # sensitivity = this round's S
        charged_ratio.append(math.sqrt(n) * update.sigma_steps * update.grid / (charged * math.sqrt(fed._noise_ratio)))
    normalised = np.array(normalised)
    assert normalised.size > 2800  # at least one released round
    chi2 = float(np.sum(normalised**2))
    p = stats.chi2.sf(chi2, df=normalised.size)
    print(f"chi2/df {chi2 / normalised.size:.4f} (df {normalised.size}), p {p:.3f}, KS p {stats.kstest(normalised, 'norm').pvalue:.3f}, "
          f"{len(rounds)} released rounds, clip ranges {[round(r[4].clip_range, 3) for r in rounds]}")
    assert 1e-4 < p < 1 - 1e-4, (chi2, normalised.size)  # variance as planned, neither less nor more
    assert stats.kstest(normalised, "norm").pvalue > 1e-4  # and Gaussian
    # the planned sum is the charged noise (z_delta S sqrt(rho)), inflated only by the grid (< 2^-9)
    assert all(1.0 <= r < 1 + 2.0**-9 for r in charged_ratio), charged_ratio


def test_a_round_forced_to_clip_is_aborted_and_still_charged(credit_sites, monkeypatch, tmp_path):
    import privfl.client_dp as client_dp_module

    real = client_dp_module.secagg_range

    def too_narrow(plan, **kw):
        derived = real(plan, **kw)
        # one share std: most noised coordinates would be clipped
        narrow = kw["clip_norm"] + derived.noise.update.grid * derived.noise.update.sigma_steps
        step = 2.0**-derived.fraction_bits
        return dataclasses.replace(derived, clip_range=math.ceil(narrow / step) * step)

    monkeypatch.setattr(client_dp_module, "secagg_range", too_narrow)
    fed = _federation(credit_sites, rounds=2)
    result = fed.run(tmp_path / "run")
    trained = [h for h in result.history if len(h["trained"]) >= 2]
    assert trained
    for h in trained:
        assert "fail_on_clip" in h["aborted"] and h["contributors"] == []
    # nothing was released, and every round was charged all the same
    level = result.summary["client_level"]
    assert level["rounds_released"] == 2 and level["epsilon"] > 0
    # the recorded delta includes the clipping tail the derived range allows (delta 2^-10)
    configured = fed.config.client_dp.delta
    assert level["delta"] == configured + configured * 2.0**-10
    assert all(h["client_level"]["delta"] == level["delta"] for h in result.history)

    # the audit states the adjacency, against whom it holds, and the rounds aborted this way
    import json

    from privfl.audit import audit_run

    (finding,) = [f for f in audit_run(tmp_path / "run").findings if f.code == "PFA016"]
    assert finding.severity.value == "info" and "zero-out" in finding.message and "server" in finding.message
    assert f"{len(trained)} round(s)" in finding.message
    # a secagg run from before the derived range (no adjacency recorded) is flagged: its noise could be clipped
    summary_path = tmp_path / "run" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["federation"]["client_dp"].pop("adjacency")
    summary_path.write_text(json.dumps(summary))
    (old,) = [f for f in audit_run(tmp_path / "run").findings if f.code == "PFA016"]
    assert old.severity.value == "error" and "clip" in old.message
