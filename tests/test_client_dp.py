"""Client-level DP (DP-FedAvg): noise scale, distributed noise, adaptive clipping, accounting in a federation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privfl.accounting import DPEvent, epsilon, epsilon_of_events
from privfl.client_dp import (
    ClientDPPlan,
    clip_update,
    delta_noise_multiplier,
    distributed_noise,
    next_clip_norm,
    plan_client_dp,
    release_noise,
)
from privfl.config import ClientDPConfig, ClientSampling, DPConfig, FederationConfig, ProtectionKind, TrainingConfig
from privfl.data import iid_partition, make_credit, subsets
from privfl.errors import ConfigError
from privfl.federation import Federation
from privfl.models import LogisticRegression
from privfl.noise import SeededRandom


def test_central_noise_has_the_calibrated_scale():
    # The one central release the driver uses (Federation._central_noise): release_noise(...).apply.
    source = SeededRandom(0)
    z, clip = 1.3, 0.5
    noise = release_noise(_plan(z), clip_norm=clip, dim=200_000, adaptive=False)
    samples = noise.apply(np.zeros(200_000), source)
    assert samples.std() == pytest.approx(z * clip, rel=0.01)
    assert abs(samples.mean()) < 5 * z * clip / math.sqrt(len(samples))


def _plan(z: float, bit_std: float = 0.0) -> ClientDPPlan:
    z_delta = delta_noise_multiplier(z, bit_std) if bit_std else z
    return ClientDPPlan(
        noise_multiplier=z, accounted_noise_multiplier=z, delta_noise_multiplier=z_delta,
        bit_noise_std=bit_std, sample_rate=1.0, expected_clients=10.0,
    )


@pytest.mark.parametrize("survivors", [4, 7, 10])
def test_distributed_noise_sum_is_at_least_the_accounted_variance(survivors):
    threshold, total_std, dim = 4, 2.0, 50_000
    source = SeededRandom(survivors)
    plan = _plan(total_std)  # z = 2 with clip norm 1: the accounted noise std is 2
    shares = [
        distributed_noise(np.zeros(dim), plan=plan, clip_norm=1.0, adaptive=False, threshold=threshold, source=source)
        for _ in range(survivors)
    ]
    grid = release_noise(plan, clip_norm=1.0, dim=dim, adaptive=False, shares=threshold).update.grid
    for share in shares:  # every share lies exactly on the grid
        assert np.array_equal(share, np.round(share / grid) * grid)
    total = sum(shares)
    assert total.var() == pytest.approx(total_std**2 * survivors / threshold, rel=0.03)
    assert total.var() >= 0.97 * total_std**2  # dropouts never leave less noise than accounted


def test_distributed_noise_respects_the_quantizer_grid_and_the_bit_block():
    plan = _plan(1.0, bit_std=3.0)
    vector = np.concatenate([np.full(100, 0.01), [0.5]])
    out = distributed_noise(vector, plan=plan, clip_norm=1.0, adaptive=True, threshold=3, source=SeededRandom(1), min_grid=2.0**-8)
    noise = release_noise(plan, clip_norm=1.0, dim=100, adaptive=True, shares=3, min_grid=2.0**-8)
    assert noise.update.grid >= 2.0**-8 and noise.bit.grid >= 2.0**-8
    # multiples of the quantizer's step 2^-8: the quantizer maps them to integers exactly
    assert np.array_equal(out * 2.0**8, np.round(out * 2.0**8))
    # the share scale folds the rounding in and splits the whole noise over t = 3 shares
    whole_update = plan.delta_noise_multiplier * 1.0
    assert noise.update.sigma_steps * noise.update.grid * math.sqrt(3) >= whole_update
    assert noise.bit.sigma_steps * noise.bit.grid * math.sqrt(3) >= 3.0
    with pytest.raises(ConfigError, match="threshold"):
        distributed_noise(vector, plan=plan, clip_norm=1.0, adaptive=True, threshold=0, source=SeededRandom(1))
    with pytest.raises(ConfigError, match="min_grid"):
        release_noise(plan, clip_norm=1.0, dim=100, adaptive=True, min_grid=0.3)


def test_distributed_shares_pass_the_secagg_quantizer_exactly():
    """With a power-of-two quantizer step, what the server unmasks is exactly the sum of the shares."""
    from privfl.protocols.secagg import Quantizer
    from privfl.protocols.secagg.simulate import rounding_key

    quantizer = Quantizer(clip_range=4.0, bits=32, num_clients=3, fraction_bits=16)
    plan = _plan(1.0, bit_std=2.0)
    rng = np.random.default_rng(0)
    shares = []
    for seed in range(3):
        clipped, within = clip_update(rng.normal(size=40) * 0.1, 0.5)
        vector = np.concatenate([clipped, [float(within) - 0.5]])
        shares.append(distributed_noise(
            vector, plan=plan, clip_norm=0.5, adaptive=True, threshold=2, source=SeededRandom(seed), min_grid=quantizer.step,
        ))
    assert all(np.max(np.abs(share)) < quantizer.clip_range for share in shares)  # no clipping in this example
    words = sum(quantizer.encode(share, rounding_key())[0].astype(np.uint64) for share in shares) & np.uint64(quantizer.modulus_mask)
    assert np.array_equal(quantizer.decode_sum(words), np.sum(shares, axis=0))


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
    import warnings

    with warnings.catch_warnings():
        # under secagg the clip range is derived from the noise (no more "clip_range too small" warning)
        warnings.filterwarnings("error", message=".*clip_range.*")
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


def test_adaptive_split_matches_an_independent_accountant():
    # Releasing the update sum (noise z_delta S, sensitivity S) and the centred bit sum (noise
    # sigma_b, sensitivity 1/2) is one Gaussian mechanism of multiplier z: check with dp-accounting.
    dp_accounting = pytest.importorskip("dp_accounting")
    z, sigma_b, q, rounds, delta = 1.0, 2.5, 0.2, 40, 1e-5
    z_delta = delta_noise_multiplier(z, sigma_b)
    both = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            q,
            dp_accounting.ComposedDpEvent(
                [dp_accounting.GaussianDpEvent(z_delta), dp_accounting.GaussianDpEvent(2 * sigma_b)]
            ),
        ),
        rounds,
    )
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(both)
    ours = epsilon(noise_multiplier=z, sample_rate=q, steps=rounds, delta=delta, accountant="rdp")
    assert ours == pytest.approx(acc.get_epsilon(delta), rel=0.01)


def test_fixed_size_sampling_is_accounted_at_double_sensitivity():
    config = ClientDPConfig(noise_multiplier=2.0, sampling=ClientSampling.FIXED)
    plan = plan_client_dp(config, num_clients=10, client_fraction=0.8, rounds=5)
    assert plan.accounted_noise_multiplier == 1.0 and plan.sample_rate == 1.0
    target = plan_client_dp(ClientDPConfig(target_epsilon=3.0, sampling=ClientSampling.FIXED), num_clients=10, client_fraction=0.8, rounds=5)
    reached = epsilon(noise_multiplier=target.accounted_noise_multiplier, sample_rate=1.0, steps=5, delta=1e-5)
    assert reached <= 3.0 and target.noise_multiplier == pytest.approx(2 * target.accounted_noise_multiplier)


class _Spy:
    """Records every message (and lets it through)."""

    def __init__(self):
        self.seen = []

    def deliver(self, sender, receiver, step, payload):
        self.seen.append((sender, receiver, step, payload))
        return payload


def test_a_round_with_nobody_sampled_passes_under_distributed_noise(credit_clients):
    _split, clients = credit_clients
    seed, q = 2, 1e-6  # with 20 clients, nobody is sampled (but with probability 2e-5; noise_seed fixes it)
    fed = Federation(
        model_fn=lambda: LogisticRegression(8, 2),
        clients=clients,
        training=TrainingConfig(batch_size=32, learning_rate=1.0, dp=DPConfig(noise_multiplier=1.0)),
        federation=FederationConfig(
            rounds=1, seed=seed, client_fraction=q, protection=ProtectionKind.SECAGG, noise_seed=3,
            client_dp=ClientDPConfig(noise_multiplier=1.0, clip_norm=0.5),
        ),
        progress=False,
    )
    result = fed.run()
    assert result.history[0]["sampled"] == [] and result.summary["client_level"]["rounds_released"] == 1


@pytest.mark.parametrize("protection", [ProtectionKind.PLAINTEXT, ProtectionKind.CKKS])
def test_central_noise_is_in_place_before_the_sum_leaves(credit_clients, protection):
    from privfl.protocols.oneshot import decode_average
    from privfl.protocols.wire import decode_frame

    split, clients = credit_clients
    spy = _Spy()
    clip = 0.05
    fed = Federation(
        model_fn=lambda: LogisticRegression(8, 2),
        clients=clients,
        test_set=split.test,
        training=TrainingConfig(batch_size=32, learning_rate=1.0, dp=DPConfig(noise_multiplier=1.0)),
        federation=FederationConfig(
            rounds=1, protection=protection, noise_seed=1,
            client_dp=ClientDPConfig(noise_multiplier=4.0, clip_norm=clip, adaptive=True, sampling=ClientSampling.FIXED),
        ),
        transport=spy,
        progress=False,
    )
    fed.run()
    dim = 18 + 1  # LogisticRegression(8, 2) parameters and the centred bit
    if protection is ProtectionKind.PLAINTEXT:
        # the individual (plaintext) uploads carry clipped updates and a centred bit of +-1/2
        uploads = [decode_frame(p, kind=1, round_index=0) for s, r, step, p in spy.seen if step == "update"]
        vectors = [np.frombuffer(f.parts[1], "<f4").astype(np.float64) for f in uploads]
        assert all(abs(v[-1]) == 0.5 and np.linalg.norm(v[:-1]) <= clip * 1.0001 for v in vectors)
        exact = np.sum(vectors, axis=0)
        released = [p for s, r, step, p in spy.seen if step == "aggregate"]
        total = np.frombuffer(decode_frame(released[0], kind=2, round_index=0).parts[1], "<f8")
    else:
        released = [p for s, r, step, p in spy.seen if step == "average"]
        average, weight = decode_average(0, released[0], dim)
        total = average * weight
        exact = None
    assert len(released) == 1
    if exact is not None:
        noise = total[:-1] - exact[:-1]
        plan = plan_client_dp(fed.config.client_dp, num_clients=len(clients), client_fraction=1.0, rounds=1)
        expected = plan.delta_noise_multiplier * clip  # z_delta S per coordinate
        assert 0.5 * expected < noise.std() < 2.0 * expected
        # What leaves the server is on the noise grid: no low-order float bit depends on the sum.
        grids = release_noise(plan, clip_norm=clip, dim=dim - 1, adaptive=True)
        for block, values in ((grids.update, total[:-1]), (grids.bit, total[-1:])):
            assert np.array_equal(values / block.grid, np.round(values / block.grid))
    else:
        # with CKKS, clipped updates sum to at most 20 x S in norm; the noise (about 4 S per
        # coordinate over 18 coordinates) dominates what the key holder releases
        assert np.linalg.norm(total[:-1]) > 20 * clip


def test_client_level_resume_uses_recorded_noise_and_refuses_other_settings(credit_clients, tmp_path):
    split, clients = credit_clients

    def fed(rounds, seed=0):
        return Federation(
            model_fn=lambda: LogisticRegression(8, 2),
            clients=clients,
            test_set=split.test,
            training=TrainingConfig(batch_size=32, learning_rate=1.0, dp=DPConfig(noise_multiplier=1.0)),
            federation=FederationConfig(
                rounds=rounds, seed=seed, client_fraction=0.5, protection=ProtectionKind.PLAINTEXT,
                client_dp=ClientDPConfig(target_epsilon=2.0, delta=1e-3, clip_norm=0.5),
            ),
            progress=False,
        )

    out = tmp_path / "run"
    first = fed(2).run(out)
    z2 = first.summary["client_level"]["accounted_noise_multiplier"]
    with pytest.raises(ConfigError, match="other settings or data"):
        fed(4, seed=1).run(out, resume=True)
    resumed = fed(4).run(out, resume=True)
    z4 = resumed.summary["client_level"]["accounted_noise_multiplier"]
    assert z4 > z2  # a longer plan needs more noise per round...
    expected = epsilon_of_events(
        [DPEvent(noise_multiplier=z2, sample_rate=0.5, steps=2), DPEvent(noise_multiplier=z4, sample_rate=0.5, steps=2)],
        delta=1e-3,
    )
    # ...but the first two rounds are charged at the noise they really used
    assert resumed.summary["client_level"]["epsilon"] == pytest.approx(expected, rel=1e-9)
