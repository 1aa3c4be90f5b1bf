"""DP-SGD local training through Opacus."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from privfl.config import ClippingMode, DPConfig, TrainingConfig
from privfl.data import ArrayDataset, load_breast_cancer
from privfl.errors import ConfigError
from privfl.models import MLP, LogisticRegression
from privfl.training import (
    choose_clipping,
    flatten_parameters,
    load_flat_parameters,
    make_private_compatible,
    resolve_device,
    sampling_plan,
    train_dp_sgd,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return load_breast_cancer()


def _config(**dp):
    return TrainingConfig(batch_size=16, learning_rate=0.5, dp=DPConfig(**({"noise_multiplier": 1.0} | dp)))


def test_dp_sgd_round_reports_its_event_and_learns(data):
    torch.manual_seed(0)
    model = LogisticRegression(30, 2)
    before = flatten_parameters(model)
    result = train_dp_sgd(model, data.train, config=_config(), noise_multiplier=1.0, device=CPU, seed=0)
    q, steps = sampling_plan(len(data.train), _config())
    assert result.event.sample_rate == q and result.event.steps == steps
    assert result.num_examples == len(data.train)
    np.testing.assert_allclose(flatten_parameters(model) - before, result.delta, atol=1e-6)
    assert np.linalg.norm(result.delta) > 0
    logits = model(data.test.features)
    assert (logits.argmax(1) == data.test.targets).float().mean() > 0.85


def test_noise_scales_with_noise_multiplier(data):
    # With a zero learning-rate signal removed, the update norm is dominated by noise: more noise, bigger update.
    norms = []
    for sigma in (0.5, 8.0):
        torch.manual_seed(0)
        model = LogisticRegression(30, 2)
        result = train_dp_sgd(model, data.train, config=_config(), noise_multiplier=sigma, device=CPU, seed=1)
        norms.append(np.linalg.norm(result.delta))
    assert norms[1] > 4 * norms[0]


def test_seed_makes_training_reproducible(data):
    deltas = []
    for _ in range(2):
        torch.manual_seed(0)
        model = LogisticRegression(30, 2)
        deltas.append(train_dp_sgd(model, data.train, config=_config(), noise_multiplier=1.0, device=CPU, seed=7).delta)
    np.testing.assert_array_equal(deltas[0], deltas[1])


def test_ghost_clipping_matches_per_sample_clipping(data):
    # Same batches, same noise stream: the two ways of clipping must give the same update.
    deltas = {}
    for mode in (ClippingMode.PER_SAMPLE, ClippingMode.GHOST):
        torch.manual_seed(0)
        model = MLP(30, 2, hidden=32)
        cfg = TrainingConfig(batch_size=16, learning_rate=0.1, dp=DPConfig(noise_multiplier=1.0, max_grad_norm=0.1, clipping=mode))
        deltas[mode] = train_dp_sgd(model, data.train, config=cfg, noise_multiplier=1.0, device=CPU, seed=3).delta
    np.testing.assert_allclose(deltas[ClippingMode.PER_SAMPLE], deltas[ClippingMode.GHOST], rtol=1e-3, atol=1e-5)


def test_auto_clipping_picks_bookkeeping_for_linear_models():
    assert choose_clipping(MLP(30, 2, hidden=1024), ClippingMode.AUTO) is ClippingMode.BOOKKEEPING
    assert choose_clipping(LogisticRegression(30, 2), ClippingMode.AUTO) is ClippingMode.BOOKKEEPING


def test_batchnorm_is_fixed_with_a_warning():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match="BatchNorm"):
        fixed = make_private_compatible(model)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fixed.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_private_compatible(LogisticRegression(4, 2)) is not None


def test_device_auto_and_errors():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError):
            resolve_device("cuda")


def test_flat_parameter_round_trip_and_shape_check():
    model = MLP(5, 3, hidden=7)
    flat = flatten_parameters(model)
    load_flat_parameters(model, flat * 2)
    np.testing.assert_allclose(flatten_parameters(model), flat * 2)
    with pytest.raises(ConfigError):
        load_flat_parameters(model, flat[:-1])


@pytest.mark.gpu
def test_dp_sgd_on_cuda(data):
    model = LogisticRegression(30, 2)
    result = train_dp_sgd(model, data.train, config=_config(), noise_multiplier=1.0, device=torch.device("cuda"), seed=0)
    assert np.isfinite(result.delta).all() and np.linalg.norm(result.delta) > 0


def test_empty_poisson_batches_take_noise_only_steps():
    # batch_size 1 on 10 examples: about a third of the batches are empty; each still takes a step.
    data = ArrayDataset(np.random.default_rng(0).normal(size=(10, 4)), np.arange(10) % 2)
    for mode in ("per_sample", "ghost"):
        cfg = TrainingConfig(batch_size=1, learning_rate=0.1, dp=DPConfig(noise_multiplier=1.0, clipping=mode))
        result = train_dp_sgd(MLP(4, 2, hidden=8), data, config=cfg, noise_multiplier=1.0, device=CPU, seed=0)
        assert result.event.steps == 10 and np.isfinite(result.delta).all()


@pytest.mark.parametrize("batches", [93, 99, 105])
def test_batch_counts_where_one_over_q_rounds_down(batches):
    # int(1 / (1 / 93)) == 92 in floating point: the loader must still take the planned 93 steps.
    n = 16 * batches
    data = ArrayDataset(np.random.default_rng(0).normal(size=(n, 3)), np.arange(n) % 2)
    cfg = TrainingConfig(batch_size=16, dp=DPConfig(noise_multiplier=1.0))
    result = train_dp_sgd(LogisticRegression(3, 2), data, config=cfg, noise_multiplier=1.0, device=CPU, seed=0)
    assert result.event.steps == batches and result.event.sample_rate == 1 / batches


def test_seed_controls_batch_sampling_too(data):
    # The global torch RNG must not leak into the batches: same seed, different global state, same update.
    deltas = []
    for global_seed in (1, 2):
        torch.manual_seed(0)
        model = LogisticRegression(30, 2)
        torch.manual_seed(global_seed)
        deltas.append(train_dp_sgd(model, data.train, config=_config(), noise_multiplier=1.0, device=CPU, seed=5).delta)
    np.testing.assert_array_equal(deltas[0], deltas[1])


def test_a_step_without_noise_is_refused_before_training():
    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    data = ArrayDataset(np.zeros((4, 3), dtype=np.float32), np.zeros(4, dtype=np.int64))
    with pytest.raises(ConfigError, match="noise_multiplier"):
        train_dp_sgd(model, data, config=TrainingConfig(), noise_multiplier=0.0, device=torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_secret_generators_fill_the_whole_state_from_the_os():
    # torch's CPU generator keeps 32 bits of a seed: two seeds equal below bit 32 give the same stream.
    same = [torch.Generator().manual_seed(5 + k * (1 << 40)) for k in range(2)]
    assert torch.equal(torch.randn(4, generator=same[0]), torch.randn(4, generator=same[1]))
    from privfl.training import secret_generator

    draws = [torch.randn(1000, generator=secret_generator(torch.device("cpu"))) for _ in range(3)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    for d in draws:  # standard normal draws: mean 0, std 1 (5 standard errors)
        assert abs(float(d.mean())) < 5 / 1000**0.5 and abs(float(d.std()) - 1) < 5 * (0.5 / 1000) ** 0.5
    words = secret_generator(torch.device("cpu")).get_state().numpy()[24 : 24 + 8 * 624].view("<u8")
    assert words.max() < 2**32 and len(set(words.tolist())) > 600  # 624 independent 32-bit words


def test_training_without_a_seed_never_repeats_its_noise(data):
    train = data.train
    deltas = []
    for _ in range(2):
        model = LogisticRegression(30, 2)
        torch.manual_seed(0)
        model.load_state_dict(LogisticRegression(30, 2).state_dict())
        config = TrainingConfig(batch_size=len(train), learning_rate=1.0, dp=DPConfig(noise_multiplier=1.0))
        deltas.append(train_dp_sgd(model, train, config=config, noise_multiplier=1.0, device=torch.device("cpu")).delta)
    assert not np.allclose(deltas[0], deltas[1])


@pytest.mark.parametrize("clipping", [ClippingMode.PER_SAMPLE, ClippingMode.BOOKKEEPING])
def test_a_frozen_layer_with_a_stale_gradient_does_not_move(data, clipping):
    model = nn.Sequential(nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 2))
    frozen = model[0].weight
    frozen.requires_grad_(False)
    frozen.grad = torch.ones_like(frozen)  # left over from the caller's own use of the model
    before = frozen.detach().clone()
    config = TrainingConfig(batch_size=16, learning_rate=0.5, dp=DPConfig(noise_multiplier=1.0, clipping=clipping))
    train_dp_sgd(model, data.train, config=config, noise_multiplier=1.0, device=torch.device("cpu"), seed=0)
    assert torch.equal(frozen.detach(), before)


class _DirectUse(nn.Module):
    """A wide layer whose weight is also used directly in forward (a skip path through fc.weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(30, 600)
        self.act = nn.PReLU()  # no book-keeping support: auto used to pick ghost clipping for this model
        self.head = nn.Linear(600, 2)

    def forward(self, x):
        return self.head(self.act(self.fc(x)) + x @ self.fc.weight.T)


@pytest.mark.parametrize("clipping", list(ClippingMode))
def test_a_parameter_used_outside_its_layer_is_refused_in_every_mode(data, clipping):
    # Ghost clipping released that part of the gradient unclipped (per-example norm 1.9 at C = 1).
    model = _DirectUse()
    before = [p.detach().clone() for p in model.parameters()]
    config = TrainingConfig(batch_size=16, dp=DPConfig(noise_multiplier=1.0, clipping=clipping))
    with pytest.raises(ConfigError, match=r"fc\.weight"):
        train_dp_sgd(model, data.train, config=config, noise_multiplier=1.0, device=torch.device("cpu"), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_the_layers_checked_without_opacus_are_the_ones_opacus_validates():
    from opacus.validators import ModuleValidator

    from privfl.training import _OPACUS_VALIDATED

    registered = {cls for cls in ModuleValidator.VALIDATORS if isinstance(cls, type)}
    assert registered == set(_OPACUS_VALIDATED)


def test_a_model_needing_no_conversion_does_not_import_opacus():
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from privfl.training import convert_for_dp\n"
        "model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))\n"
        "assert convert_for_dp(model).changes == ()\n"
        "assert 'opacus' not in sys.modules, 'opacus imported'\n"
        "bn = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))\n"
        "assert convert_for_dp(bn).changes, 'BatchNorm not converted'\n"
        "assert 'opacus' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
