"""What build_observation hands an attack: the DP-SGD view is one step of the training sites run."""

from __future__ import annotations

import pytest
import torch

from privfl.attacks import DPGradientObservation, ServerView
from privfl.attacks._model import ModelView
from privfl.attacks.evaluate import ObservationSpec, build_observation, dp_sgd_gradient
from privfl.errors import ConfigError


def _cnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 64, 10)
    )


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )


def _victims(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def _clipped_mean(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, c: float) -> list[torch.Tensor]:
    """sum_i clip(g_i, C) / n, each g_i the gradient of one input's loss, clipped in total L2 norm (Opacus' rule)."""
    view = ModelView(model)
    total = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
    for i in range(x.shape[0]):
        grads = [g.double() for g in view.gradients(x[i : i + 1], y[i : i + 1])]
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        factor = min(1.0, c / (norm + 1e-6))
        total = [t + g * factor for t, g in zip(total, grads, strict=True)]
    return [t / x.shape[0] for t in total]


@pytest.mark.parametrize("build", [_cnn, _mlp], ids=["convnet", "mlp"])  # the clipping modes auto picks for each
def test_dp_observation_without_noise_is_the_clipped_mean_gradient(build) -> None:
    model, (x, y) = build(), _victims(6)
    # C small enough that every per-example gradient is clipped: a missed or doubled clip shows.
    expected = _clipped_mean(model, x, y, c=0.05)
    observed = dp_sgd_gradient(model, x, y, noise_multiplier=1e-9, max_grad_norm=0.05, seed=0)
    scale = max(float(e.abs().max()) for e in expected)
    assert scale > 1e-3
    for got, want in zip(observed, expected, strict=True):
        assert got.shape == want.shape
        assert torch.allclose(got.double(), want, atol=1e-6, rtol=0)
    before = [p.detach().clone() for p in build().parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # model untouched


def test_dp_observation_noise_is_sigma_c_over_n_and_seeded() -> None:
    model, (x, y) = _cnn(), _victims(4)
    spec = ObservationSpec(view=ServerView.DP_SGD, noise_multiplier=2.0, max_grad_norm=0.5, seed=7)
    obs = build_observation(model, x, y, spec)
    assert isinstance(obs, DPGradientObservation)
    assert obs.noise_multiplier == 2.0 and obs.max_grad_norm == 0.5 and obs.num_samples == 4 and obs.labels is None
    again = build_observation(model, x, y, spec)
    assert all(torch.equal(a, b) for a, b in zip(obs.gradients, again.gradients, strict=True))
    other = build_observation(model, x, y, ObservationSpec(view=ServerView.DP_SGD, noise_multiplier=2.0,
                                                           max_grad_norm=0.5, seed=8))
    assert not torch.equal(obs.gradients[0], other.gradients[0])
    signal = _clipped_mean(model, x, y, c=0.5)
    noise = torch.cat([(g.double() - s).flatten() for g, s in zip(obs.gradients, signal, strict=True)])
    # std of the released noise: sigma * C / n = 0.25, over ~2,600 coordinates.
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.05)


def test_dp_observation_refuses_a_model_clients_would_not_train_as_given() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.ReLU(), torch.nn.Linear(8, 10))
    x, y = _victims(2)
    with pytest.raises(ConfigError, match="convert_for_dp"):
        dp_sgd_gradient(model, x, y, noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    with pytest.raises(ConfigError) as info:
        dp_sgd_gradient(_cnn(), x, y, noise_multiplier=0.0, max_grad_norm=1.0, seed=0)
    assert info.value.field == "noise_multiplier"


def test_none_is_the_former_name_of_plaintext() -> None:
    assert ServerView("none") is ServerView.PLAINTEXT
    with pytest.raises(ValueError):
        ServerView("homomorphic")
