"""Inverting Gradients' per-input TV scaling: confidently classified inputs of a batch get a stronger prior."""

from __future__ import annotations

import pytest
import torch

from privfl.attacks import GradientObservation, InvertingGradients
from privfl.attacks._matching import MatchingProblem, total_variation, total_variation_per_input
from privfl.attacks.evaluate import client_gradient
from privfl.attacks.inverting import TV_CONFIDENCE_CAP
from privfl.errors import ConfigError


def linear_head(scale: float) -> torch.nn.Module:
    """Flatten + Linear(64 -> 3): an all-ones 8x8 input gets logits (scale, 0, 0), an all-zeros one (0, 0, 0)."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[0].fill_(scale / 64)
        model[1].bias.zero_()
    return model


def problem_for(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> MatchingProblem:
    obs = GradientObservation(gradients=client_gradient(model, x, y), input_shape=tuple(x.shape[1:]),
                              num_samples=len(x), labels=y)
    return MatchingProblem(model, obs)


def test_per_input_total_variation_averages_to_the_batch_value() -> None:
    x = torch.rand((3, 2, 5, 6), generator=torch.Generator().manual_seed(0))
    per_input = total_variation_per_input(x)
    assert per_input.shape == (3,)
    assert torch.allclose(per_input.mean(), total_variation(x))
    assert torch.allclose(per_input[1], total_variation(x[1:2]))
    assert torch.equal(total_variation_per_input(torch.ones((4, 7))), torch.zeros(4))  # tabular: no neighbours


def test_scales_follow_the_output_error_relative_to_the_least_confident_input() -> None:
    x = torch.stack([torch.ones(1, 8, 8), torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    y = torch.tensor([0, 0, 1])
    model = linear_head(1.0)
    problem = problem_for(model, x, y)
    probs = torch.softmax(model(x), dim=1)
    err = (probs - torch.nn.functional.one_hot(y, 3)).norm(dim=1)
    scales = InvertingGradients(tv_confidence=1.0).tv_scales(problem, x, y)
    assert scales is not None
    # Input 2 (all ones, labelled 1) is the least confident: its factor is 1; the others grow as their error falls.
    assert float(scales[2]) == pytest.approx(1.0)
    assert torch.allclose(scales, err.max() / err, rtol=1e-5)
    assert float(scales[0]) > float(scales[1]) > 1.0
    squared = InvertingGradients(tv_confidence=2.0).tv_scales(problem, x, y)
    assert squared is not None and torch.allclose(squared, scales**2, rtol=1e-5)


def test_scales_are_capped_for_an_input_the_model_is_sure_of() -> None:
    x = torch.stack([torch.ones(1, 8, 8), torch.zeros(1, 8, 8)])
    y = torch.tensor([0, 0])
    problem = problem_for(linear_head(30.0), x, y)  # input 0: p(class 0) = 1 - 2e-13, error ~1e-13
    scales = InvertingGradients(tv_confidence=2.0).tv_scales(problem, x, y)
    assert scales is not None
    assert float(scales[0]) == pytest.approx(TV_CONFIDENCE_CAP**2)
    assert float(scales[1]) == pytest.approx(1.0)


def test_no_scaling_for_one_input_for_power_zero_and_for_tabular_rows() -> None:
    model = linear_head(1.0)
    x, y = torch.ones(1, 1, 8, 8), torch.tensor([0])
    assert InvertingGradients().tv_scales(problem_for(model, x, y), x, y) is None
    x2, y2 = torch.stack([torch.ones(1, 8, 8), torch.zeros(1, 8, 8)]), torch.tensor([0, 1])
    assert InvertingGradients(tv_confidence=0).tv_scales(problem_for(model, x2, y2), x2, y2) is None
    rows = torch.nn.Sequential(torch.nn.Linear(5, 3))
    xr, yr = torch.rand(2, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 2])
    assert InvertingGradients().tv_scales(problem_for(rows, xr, yr), xr, yr) is None


def test_objective_weights_each_input_by_its_scale() -> None:
    x = torch.stack([torch.ones(1, 8, 8), torch.zeros(1, 8, 8)])
    x = x + 0.1 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 0])
    model = linear_head(5.0)
    problem = problem_for(model, x, y)
    attack = InvertingGradients(tv_confidence=2.0)
    scales = attack.tv_scales(problem, x, y)
    assert scales is not None and float(scales.max()) > 2.0
    plain = InvertingGradients(tv_confidence=0)._objective(problem, x, y, None, 0.5)
    scaled = attack._objective(problem, x, y, None, 0.5)
    tv = total_variation_per_input(x)
    # Same cosine term; the prior term moves from 0.5 * mean(tv) to 0.5 * mean(scale * tv).
    assert float((scaled - plain).detach()) == pytest.approx(0.5 * float((scales * tv).mean() - tv.mean()), rel=1e-4)


def test_single_input_reconstruction_is_unchanged_and_a_batch_one_is_not() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 64, 3))
    with torch.no_grad():
        model[3].weight.mul_(20.0)  # confident outputs, different per input
    x = torch.rand((3, 1, 8, 8), generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2])

    def run(inputs: torch.Tensor, labels: torch.Tensor, power: float) -> torch.Tensor:
        obs = GradientObservation(gradients=client_gradient(model, inputs, labels), input_shape=(1, 8, 8),
                                  num_samples=len(inputs), labels=labels)
        return InvertingGradients(max_iterations=15, seed=0, tv_confidence=power).reconstruct(model, obs).inputs

    assert torch.equal(run(x[:1], y[:1], 2.0), run(x[:1], y[:1], 0.0))
    assert not torch.equal(run(x, y, 2.0), run(x, y, 0.0))


@pytest.mark.parametrize("value", [-1.0, float("nan"), "2", True])
def test_tv_confidence_validation(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        InvertingGradients(tv_confidence=value)  # type: ignore[arg-type]
    assert info.value.field == "tv_confidence"
