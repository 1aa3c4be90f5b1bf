"""Inverting Gradients releases its TV prior over the run, and strengthens it on a batch the model already fits."""

from __future__ import annotations

import pytest
import torch

from privfl.attacks import CiphertextObservation, GradientObservation, InvertingGradients
from privfl.attacks._matching import MatchingProblem, cosine_distance
from privfl.attacks.evaluate import client_gradient
from privfl.attacks.labels import batch_fit
from privfl.errors import ConfigError


def head(bias: list[float], *, with_bias: bool = True) -> torch.nn.Module:
    """Flatten + Linear(64 -> 3) with zero weights: every input gets the logits ``bias``."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, len(bias), bias=with_bias))
    with torch.no_grad():
        model[1].weight.zero_()
        if with_bias:
            model[1].bias.copy_(torch.tensor(bias))
    return model


def observe(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> GradientObservation:
    return GradientObservation(gradients=client_gradient(model, x, y), input_shape=tuple(x.shape[1:]),
                               num_samples=len(x), labels=y)


X = torch.rand((4, 1, 8, 8), generator=torch.Generator().manual_seed(0))


def test_fit_is_zero_for_uniform_predictions_and_one_when_the_model_predicts_the_labels() -> None:
    y = torch.tensor([0, 0, 1, 2])
    uniform = head([0.0, 0.0, 0.0])
    assert batch_fit(uniform, observe(uniform, X, y), y) == pytest.approx(0.0, abs=1e-6)  # float32 gradients
    # Every input gets probability ~1 for class 0, and every label is 0: the prediction is the labels.
    sure = head([40.0, 0.0, 0.0])
    zeros = torch.zeros(4, dtype=torch.long)
    assert batch_fit(sure, observe(sure, X, zeros), zeros) == pytest.approx(1.0, abs=1e-6)
    # Halfway: the mean prediction is half-way between uniform and the labels' mean one-hot.
    p0 = 2 / 3  # softmax of (log 4, 0, 0)
    half = head([float(torch.log(torch.tensor(4.0))), 0.0, 0.0])
    expected = (p0 - 1 / 3) / (1 - 1 / 3)
    assert batch_fit(half, observe(half, X, zeros), zeros) == pytest.approx(expected, rel=1e-5)


def test_fit_reads_soft_labels_and_is_clipped_to_one() -> None:
    wrong = head([40.0, 0.0, 0.0])
    ones = torch.ones(4, dtype=torch.long)
    # Sure of class 0 while every label is 1: far from uniform, further than the labels are. Clipped to 1.
    assert batch_fit(wrong, observe(wrong, X, ones), ones) == 1.0
    soft = torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.long), 3).float()
    sure = head([40.0, 0.0, 0.0])
    zeros = torch.zeros(4, dtype=torch.long)
    assert batch_fit(sure, observe(sure, X, zeros), soft) == pytest.approx(1.0, abs=1e-6)


def test_fit_is_zero_when_it_cannot_be_read() -> None:
    y = torch.tensor([0, 1, 2, 0])
    no_bias = head([0.0, 0.0, 0.0], with_bias=False)
    assert batch_fit(no_bias, observe(no_bias, X, y), y) == 0.0
    model = head([1.0, 0.0, 0.0])
    cipher = CiphertextObservation(ciphertexts=(b"\x00" * 16,), input_shape=(1, 8, 8), num_samples=4)
    assert batch_fit(model, cipher, y) == 0.0
    assert batch_fit(model, observe(model, X, y), torch.tensor([0, 1, 5, 0])) == 0.0  # a label the model lacks
    assert batch_fit(model, observe(model, X, y), torch.zeros((4, 7))) == 0.0  # soft labels of the wrong width


def test_fit_factor_needs_a_batch_and_a_gain() -> None:
    sure = head([40.0, 0.0, 0.0])
    zeros = torch.zeros(4, dtype=torch.long)
    batch = observe(sure, X, zeros)
    assert InvertingGradients(tv_fit_gain=12.0).fit_factor(sure, batch, zeros) == pytest.approx(1 + 12 * 0.75, rel=1e-5)
    assert InvertingGradients(tv_fit_gain=0.0).fit_factor(sure, batch, zeros) == 1.0
    one = observe(sure, X[:1], zeros[:1])
    assert InvertingGradients(tv_fit_gain=12.0).fit_factor(sure, one, zeros[:1]) == 1.0
    uniform = head([0.0, 0.0, 0.0])
    assert InvertingGradients().fit_factor(uniform, observe(uniform, X, zeros), zeros) == pytest.approx(1.0, abs=1e-6)


def test_tv_level_holds_then_falls_linearly_to_zero() -> None:
    attack = InvertingGradients(max_iterations=80, tv_fade=(0.25, 0.75))
    assert [attack.tv_level(s) for s in (0, 10, 20)] == [1.0, 1.0, 1.0]
    assert attack.tv_level(40) == pytest.approx(0.5)
    assert attack.tv_level(30) == pytest.approx(0.75)
    assert [attack.tv_level(s) for s in (60, 79, 80)] == [0.0, 0.0, 0.0]
    constant = InvertingGradients(max_iterations=80, tv_fade=None)
    assert {constant.tv_level(s) for s in (0, 40, 80)} == {1.0}
    step = InvertingGradients(max_iterations=80, tv_fade=(0.5, 0.5))  # start == end: a cut at half-way
    assert (step.tv_level(40), step.tv_level(41)) == (1.0, 0.0)


def cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 64, 3))


def test_with_the_prior_released_a_restart_is_judged_by_the_match_alone() -> None:
    model = cnn()
    x, y = X[:2], torch.tensor([0, 2])
    obs = observe(model, x, y)
    result = InvertingGradients(max_iterations=20, seed=0, tv_weight=0.5).reconstruct(model, obs)
    problem = MatchingProblem(model, obs)

    def match_of(inputs: torch.Tensor) -> float:
        return float(cosine_distance(problem.simulate(inputs, y), problem.target).detach())

    match = match_of(result.inputs)
    assert result.objective == pytest.approx(match, rel=1e-5, abs=1e-7)
    # Kept to the end, the prior is part of the final objective (and changes the path).
    held = InvertingGradients(max_iterations=20, seed=0, tv_weight=0.5, tv_fade=None).reconstruct(model, obs)
    held_match = match_of(held.inputs)
    assert held.objective > held_match + 1e-4
    assert not torch.equal(held.inputs, result.inputs)


@pytest.mark.parametrize("value", [(0.5,), (0.8, 0.2), (-0.1, 0.5), (0.2, 1.5), [0.2, 0.8], (True, 0.5), "0.5"])
def test_tv_fade_validation(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        InvertingGradients(tv_fade=value)  # type: ignore[arg-type]
    assert info.value.field == "tv_fade"


@pytest.mark.parametrize("value", [-1.0, float("nan"), "2"])
def test_tv_fit_gain_validation(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        InvertingGradients(tv_fit_gain=value)  # type: ignore[arg-type]
    assert info.value.field == "tv_fit_gain"


def image_head(bias: list[float]) -> torch.nn.Module:
    """Conv + Linear head for 8x8 images whose logits are ``bias`` whatever the input (zero weights)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(2 * 64, len(bias)))
    with torch.no_grad():
        model[3].weight.zero_()
        model[3].bias.copy_(torch.tensor(bias))
    return model


def test_noise_confidence_is_zero_for_uniform_outputs_and_one_for_sure_ones() -> None:
    from privfl.attacks.labels import noise_confidence

    assert noise_confidence(image_head([0.0, 0.0, 0.0]), (1, 8, 8)) == pytest.approx(0.0, abs=1e-12)
    assert noise_confidence(image_head([60.0, 0.0, 0.0]), (1, 8, 8)) == pytest.approx(1.0, abs=1e-12)
    # p = (1/2, 1/4, 1/4): entropy 1.5 log 2, over log 3.
    import math

    half = image_head([math.log(2.0), 0.0, 0.0])
    assert noise_confidence(half, (1, 8, 8)) == pytest.approx(1 - 1.5 * math.log(2) / math.log(3), rel=1e-6)
    assert noise_confidence(half, (1, 8, 8), bounds=None) == pytest.approx(1 - 1.5 * math.log(2) / math.log(3), rel=1e-6)


def test_noise_confidence_leaves_the_global_generator_alone() -> None:
    from privfl.attacks.labels import noise_confidence

    model = image_head([1.0, 0.0, 0.0])  # built first: building a module draws from the global generator
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    noise_confidence(model, (1, 8, 8))
    assert torch.equal(torch.rand(4), expected)


def test_fedavg_prior_holds_on_a_model_that_is_sure_of_noise() -> None:
    import math

    from privfl.attacks import FedAvgInversion
    from privfl.attacks.fedavg import TRAINED_CONFIDENCE

    attack = FedAvgInversion()
    shape = (1, 8, 8)
    assert attack.final_tv_weight(image_head([0.0, 0.0, 0.0]), shape) == 1e-2  # untrained: the model's weight
    assert attack.final_tv_weight(image_head([60.0, 0.0, 0.0]), shape) == attack.tv_start  # holds throughout
    # Between the two thresholds the weight moves linearly from 1e-2 to tv_start.
    low, high = TRAINED_CONFIDENCE
    target = (low + high) / 2  # confidence 1 - H / log 3 for p = (q, (1-q)/2, (1-q)/2): solve for q
    lo_q, hi_q = 1 / 3, 1.0
    for _ in range(60):
        q = (lo_q + hi_q) / 2
        entropy = -(q * math.log(q) + (1 - q) * math.log((1 - q) / 2))
        lo_q, hi_q = (q, hi_q) if 1 - entropy / math.log(3) < target else (lo_q, q)
    middle = image_head([math.log(q / ((1 - q) / 2)), 0.0, 0.0])
    assert attack.final_tv_weight(middle, shape) == pytest.approx(1e-2 + 0.5 * (attack.tv_start - 1e-2), rel=1e-4)
    # An explicit weight, a smooth model, and tabular inputs keep their weight.
    assert FedAvgInversion(tv_weight=0.03).final_tv_weight(image_head([60.0, 0.0, 0.0]), shape) == 0.03
    sigmoid = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 3))
    assert FedAvgInversion().final_tv_weight(sigmoid, shape) == 0.0
    rows = torch.nn.Sequential(torch.nn.Linear(5, 3))
    with torch.no_grad():
        rows[0].weight.zero_()
        rows[0].bias.copy_(torch.tensor([60.0, 0.0, 0.0]))
    assert FedAvgInversion().final_tv_weight(rows, (5,)) == 1e-2
