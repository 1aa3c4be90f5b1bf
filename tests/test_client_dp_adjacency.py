"""Client-level DP under secure aggregation: the released noise does not depend on how many sites took part (issue 13, item 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privfl.accounting import epsilon
from privfl.client_dp import ClientDPPlan, count_free_shares, release_noise, secagg_noise_ratio
from privfl.config import Adjacency, ClientDPConfig, FederationConfig, ProtectionKind
from privfl.errors import ConfigError, ProtocolAbort
from privfl.protocols.base import ClientUpdate, DirectTransport
from privfl.protocols.secagg import SecAggConfig, SecAggProtection


def _plan(z: float) -> ClientDPPlan:
    return ClientDPPlan(
        noise_multiplier=z, accounted_noise_multiplier=z, delta_noise_multiplier=z,
        bit_noise_std=0.0, sample_rate=1.0, expected_clients=1.0,
    )


def _released_multipliers(num_sites: int, z: float, dim: int = 100_000) -> dict[int, float]:
    """The noise multiplier of the sum of c planned shares (S = 1), for every round size c, as the federation plans them."""
    config = SecAggConfig()  # threshold 2/3: t(c) = ceil(2c/3), so c / t(c) varies with c
    rho = secagg_noise_ratio(config.resolve_threshold, num_sites)
    out = {}
    for c in range(2, num_sites + 1):
        share = release_noise(_plan(z), clip_norm=1.0, dim=dim, adaptive=False, shares=count_free_shares(c, rho)).update
        # a sum of c discrete Gaussians of scale s steps (variance below s^2, within exp(-pi^2 s^2)) plus rounding
        out[c] = math.sqrt(c) * share.sigma_steps * share.grid
    return out


@pytest.mark.parametrize("num_sites", [8, 10])
def test_released_noise_is_the_same_for_every_participant_count(num_sites):
    z = 2.0
    config = SecAggConfig()
    rho = secagg_noise_ratio(config.resolve_threshold, num_sites)
    old = {c / config.resolve_threshold(c) for c in range(2, num_sites + 1)}
    assert len(old) > 1  # shares of (zS)^2 / t(c): the variance c / t(c) (zS)^2 told c apart
    stds = _released_multipliers(num_sites, z)
    lowest, highest = min(stds.values()), max(stds.values())
    assert lowest >= z * math.sqrt(rho)  # never below the charged noise (rho >= 1)
    # equal across c up to the grid's ceil: relative spread below 2 / s_share (s_share ~ 10^5 steps here)
    assert highest / lowest - 1 < 1e-4
    for c in range(2, num_sites + 1):
        # t(c) survivors (the most dropouts the protocol allows) still carry the charged noise
        t = config.resolve_threshold(c)
        assert math.sqrt(t / c) * stds[c] >= z


@pytest.mark.parametrize(("num_sites", "q", "z", "rounds"), [(8, 0.8, 2.0, 10), (10, 0.5, 2.0, 10)])
def test_recorded_epsilon_holds_for_the_count_dependent_cases(num_sites, q, z, rounds):
    """The cases of issue 13: an exact analysis of the mechanism that runs, with dp-accounting's PLD.

    Under zero-out adjacency (K public) the target site is sampled with probability q, independently
    of everything else, and the release is B x + N(0, sigma^2 I) with sigma the same for every count c
    (above): exactly the Poisson-subsampled Gaussian at sigma / S >= z. Its epsilon (PLD, both
    directions of the pair) must not exceed what privfl records (z, q).
    """
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.pld import pld_privacy_accountant

    delta = 1e-5
    sigma = min(_released_multipliers(num_sites, z).values())
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds)
    actual = accountant.get_epsilon(delta)
    recorded = epsilon(noise_multiplier=z, sample_rate=q, steps=rounds, delta=delta)
    assert actual <= recorded
    # and the charged mechanism itself (sigma = z S) under PLD: privfl's record is no lower
    charged = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    charged.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    assert charged.get_epsilon(delta) <= recorded
    # the count-free shares cost noise only by rho (1.5 at most with threshold 2/3): here
    print(f"K={num_sites} q={q} z={z} T={rounds}: recorded {recorded:.4f}, exact (PLD) {actual:.4f}, sigma/S {sigma:.4f}")


def test_count_free_shares_and_ratio_errors():
    assert count_free_shares(6, 1.5) == 4.0
    assert secagg_noise_ratio(lambda c: c, 5) == 1.0
    with pytest.raises(ConfigError):
        count_free_shares(1, 1.5)
    with pytest.raises(ConfigError):
        count_free_shares(4, 0.5)

    def never(c):
        raise ConfigError("threshold", c, "cannot run")

    with pytest.raises(ConfigError, match="no round size"):
        secagg_noise_ratio(never, 5)


def test_adjacency_is_stated_and_add_remove_is_refused_with_secagg():
    assert ClientDPConfig(noise_multiplier=1.0).adjacency is Adjacency.ZERO_OUT
    add_remove = ClientDPConfig(noise_multiplier=1.0, adjacency="add-remove")
    assert add_remove.adjacency is Adjacency.ADD_REMOVE
    FederationConfig(protection=ProtectionKind.PLAINTEXT, client_dp=add_remove)  # central noise: fine
    with pytest.raises(ConfigError) as info:
        FederationConfig(protection=ProtectionKind.SECAGG, client_dp=add_remove)
    assert info.value.field == "client_dp.adjacency"
    with pytest.raises(ConfigError):
        ClientDPConfig(noise_multiplier=1.0, adjacency="neighbours")


class _Losing(DirectTransport):
    def __init__(self, lose):
        self.lose = set(lose)

    def deliver(self, sender, receiver, step, payload):
        return None if (sender, step) in self.lose else payload


def test_a_round_with_a_dropout_is_withheld_under_fail_on_dropout():
    rng = np.random.default_rng(0)  # test data only
    updates = {f"c{i}": ClientUpdate(delta=rng.normal(0, 0.1, 12), weight=1.0) for i in range(5)}
    lossy = {("c2", "masked_input")}
    strict = SecAggProtection(SecAggConfig(threshold=3, fail_on_dropout=True))
    with pytest.raises(ProtocolAbort, match="fail_on_dropout") as info:
        strict.run_round(0, updates, _Losing(lossy))
    assert info.value.survivors == 4
    assert strict.run_round(0, updates, _Losing(())).contributors  # nobody lost: released
    lenient = SecAggProtection(SecAggConfig(threshold=3))
    assert "c2" in lenient.run_round(0, updates, _Losing(lossy)).dropped


def test_a_federation_round_that_loses_a_site_is_withheld_and_charged():
    from privfl.config import DPConfig, TrainingConfig
    from privfl.data import iid_partition, make_credit, subsets
    from privfl.federation import Federation
    from privfl.models import LogisticRegression

    split = make_credit(num_rows=600, seed=3)
    clients = {f"s{i}": s for i, s in enumerate(subsets(split.train, iid_partition(len(split.train), 6, seed=0)))}

    class LoseOnce(DirectTransport):
        """Loses site s2's masked input in the first round only."""

        def __init__(self):
            self.lost = False

        def deliver(self, sender, receiver, step, payload):
            if sender == "s2" and step == "masked_input" and not self.lost:
                self.lost = True
                return None
            return payload

    fed = Federation(
        model_fn=lambda: LogisticRegression(8, 2),
        clients=clients,
        training=TrainingConfig(batch_size=32, learning_rate=1.0, dp=DPConfig(noise_multiplier=1.0)),
        federation=FederationConfig(
            rounds=2, client_fraction=1.0, protection=ProtectionKind.SECAGG, noise_seed=5,
            client_dp=ClientDPConfig(noise_multiplier=1.0, clip_norm=0.5),
        ),
        transport=LoseOnce(),
        progress=False,
    )
    result = fed.run()
    first, second = result.history
    assert "fail_on_dropout" in first["aborted"] and first["contributors"] == []
    assert second["aborted"] is None and len(second["contributors"]) == 6
    assert result.summary["client_level"]["rounds_released"] == 2  # the withheld round is charged too
