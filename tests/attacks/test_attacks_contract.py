"""Observations, the Attack contract (ciphertext gives no access, model untouched), labels and the analytic attack."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_digits

from privfl.attacks import (
    DLG,
    AggregateObservation,
    AnalyticLinear,
    CiphertextObservation,
    DPGradientObservation,
    FedAvgInversion,
    GradientObservation,
    InvertingGradients,
    LabelRecovery,
    Reconstruction,
    ServerView,
    UpdateObservation,
    recover_labels,
    update_label_counts,
)
from privfl.attacks.evaluate import ObservationSpec, build_observation, client_gradient
from privfl.attacks.metrics import best_match, label_accuracy, max_abs_error
from privfl.errors import AttackError, ConfigError


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    return torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1), torch.tensor(data.target)


@pytest.fixture(scope="module")
def cancer() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float32)
    return (x - x.mean(0)) / x.std(0), torch.tensor(data.target)


def small_cnn(seed: int = 0, bias: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 64, 10, bias=bias),
    )


def mlp(inputs: int, hidden: int, classes: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(inputs, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes)
    )


ALL_ATTACKS = [
    InvertingGradients(max_iterations=5, restarts=1),
    DLG(max_iterations=1, inner_iterations=2),
    AnalyticLinear(),
    FedAvgInversion(max_iterations=5, restarts=1),
    LabelRecovery(),
]


# --- observations -----------------------------------------------------------------------------------------


def test_observation_is_frozen_snapshot() -> None:
    grad = torch.ones(3)
    obs = GradientObservation(gradients=[grad], input_shape=(3,), num_samples=1)
    grad.add_(1.0)  # mutating the source must not change what was observed
    assert torch.equal(obs.gradients[0], torch.ones(3))
    with pytest.raises(AttributeError):
        obs.num_samples = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"input_shape": (0, 8), "num_samples": 1}, "input_shape"),
        ({"input_shape": (1, 8, 8), "num_samples": 0}, "num_samples"),
        ({"input_shape": (4,), "num_samples": 2, "labels": torch.tensor([1])}, "labels"),
    ],
)
def test_gradient_observation_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        GradientObservation(gradients=[torch.zeros(2)], **kwargs)
    assert info.value.field == field


def test_other_observation_validation() -> None:
    with pytest.raises(ConfigError):
        GradientObservation(gradients=[torch.tensor([float("nan")])], input_shape=(1,), num_samples=1)
    with pytest.raises(ConfigError):
        DPGradientObservation(
            gradients=[torch.zeros(2)], input_shape=(2,), num_samples=1, noise_multiplier=-1.0, max_grad_norm=1.0
        )
    with pytest.raises(ConfigError):
        UpdateObservation(delta=[torch.zeros(2)], input_shape=(2,), num_samples=2, local_steps=1, lr=0.1, batch_size=3)
    obs = AggregateObservation(gradients=[torch.ones(2)], input_shape=(2,), num_clients=4, samples_per_client=2)
    assert obs.num_samples == 8
    with pytest.raises(ConfigError):
        InvertingGradients(bounds=(1.0, 0.0))
    with pytest.raises(ConfigError):
        DLG(max_iterations=0)


# --- the attack contract ----------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", ALL_ATTACKS, ids=lambda a: a.name)
def test_ciphertext_gives_no_access(attack, digits) -> None:
    obs = build_observation(small_cnn(), digits[0][:2], digits[1][:2], ObservationSpec(view=ServerView.CIPHERTEXT))
    assert isinstance(obs, CiphertextObservation)
    rec = attack.reconstruct(small_cnn(), obs)
    assert not rec.accessible
    assert rec.inputs.shape == (2, 1, 8, 8) and torch.isnan(rec.inputs).all()
    assert torch.equal(rec.labels, torch.tensor([-1, -1]))
    with pytest.raises(AttackError):
        recover_labels(small_cnn(), obs)


@pytest.mark.parametrize("attack", ALL_ATTACKS, ids=lambda a: a.name)
def test_attack_leaves_model_untouched_and_returns_shapes(attack, digits) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 10)
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Train mode with BatchNorm: an attack that forgot to work on copies would move the running statistics.
    obs = build_observation(model, digits[0][:2], digits[1][:2], ObservationSpec())
    rec = attack.reconstruct(model, obs)
    assert isinstance(rec, Reconstruction) and rec.accessible
    assert rec.inputs.shape == (2, 1, 8, 8) and rec.labels.shape == (2,) and rec.labels.dtype == torch.long
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_mismatched_gradient_raises(digits) -> None:
    obs = GradientObservation(gradients=[torch.zeros(3)], input_shape=(1, 8, 8), num_samples=1)
    with pytest.raises(AttackError):
        InvertingGradients(max_iterations=1, restarts=1).reconstruct(small_cnn(), obs)


# --- label recovery ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_single_sample_label_recovery_is_exact(digits, bias: bool) -> None:
    model = small_cnn(bias=bias)
    x, y = digits
    recovered = [
        int(recover_labels(model, GradientObservation(
            gradients=client_gradient(model, x[i : i + 1], y[i : i + 1]), input_shape=(1, 8, 8), num_samples=1
        ))[0])
        for i in range(40)
    ]
    assert recovered == y[:40].tolist()


def test_batch_label_counts(digits) -> None:
    model = small_cnn()
    x, y = digits
    scores = []
    for trial in range(5):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(trial))[:8]
        obs = build_observation(model, x[idx], y[idx], ObservationSpec())
        labels = recover_labels(model, obs)
        assert labels.shape == (8,)
        scores.append(label_accuracy(labels, y[idx], ordered=False))
    assert min(scores) == 1.0


def test_label_recovery_is_an_attack_returning_labels_only(digits) -> None:
    model = small_cnn()
    x, y = digits
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:8]
    obs = build_observation(model, x[idx], y[idx], ObservationSpec())
    rec = LabelRecovery().reconstruct(model, obs)
    assert rec.accessible and rec.attack == "labels" and torch.isnan(rec.inputs).all()
    assert torch.equal(rec.labels, recover_labels(model, obs))  # one implementation behind both
    assert label_accuracy(rec.labels, y[idx], ordered=False) == 1.0
    # A FedAvg update is read with the update's own label counts, not as one gradient.
    update = build_observation(model, x[idx], y[idx], ObservationSpec(view=ServerView.FEDAVG, local_steps=2,
                                                                      lr=0.1, batch_size=4))
    counts = update_label_counts(model, update)
    assert torch.equal(LabelRecovery().reconstruct(model, update).labels,
                       torch.repeat_interleave(torch.arange(10), counts))


def test_known_labels_are_passed_through() -> None:
    model = mlp(4, 3, 2)
    obs = GradientObservation(
        gradients=[torch.zeros_like(p) for p in model.parameters()], input_shape=(4,), num_samples=1,
        labels=torch.tensor([1]),
    )
    assert recover_labels(model, obs).tolist() == [1]


# --- analytic ---------------------------------------------------------------------------------------------


def test_analytic_recovers_tabular_row_exactly(cancer) -> None:
    x, y = cancer
    model = mlp(30, 32, 2)
    for i in range(20):
        obs = build_observation(model, x[i : i + 1], y[i : i + 1], ObservationSpec())
        rec = AnalyticLinear().reconstruct(model, obs)
        assert max_abs_error(rec.inputs, x[i : i + 1]) <= 1e-4
        assert int(rec.labels[0]) == int(y[i])


def test_analytic_recovers_image_through_flatten(digits) -> None:
    x, y = digits
    model = mlp(64, 32, 10)
    obs = build_observation(model, x[5:6], y[5:6], ObservationSpec())
    assert max_abs_error(AnalyticLinear().reconstruct(model, obs).inputs, x[5:6]) <= 1e-4


def test_analytic_reads_one_client_out_of_an_aggregate(digits) -> None:
    # Secure aggregation hides which client sent what, not what was sent: a hidden unit that fired for one
    # client only gives that client's input exactly.
    x, y = digits
    model = mlp(64, 64, 10)
    obs = build_observation(model, x[:8], y[:8], ObservationSpec(view=ServerView.AGGREGATE, num_clients=8))
    rec = AnalyticLinear().reconstruct(model, obs)
    assert float(best_match(rec.inputs, x[:8]).psnr.max()) > 60.0


def test_analytic_refuses_models_it_cannot_read(digits) -> None:
    x, y = digits
    model = small_cnn()  # a convolution sits before the linear layer
    obs = build_observation(model, x[:1], y[:1], ObservationSpec())
    with pytest.raises(AttackError):
        AnalyticLinear().reconstruct(model, obs)
    no_bias = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10, bias=False))
    obs = build_observation(no_bias, x[:1], y[:1], ObservationSpec())
    with pytest.raises(AttackError):
        AnalyticLinear().reconstruct(no_bias, obs)


# --- the imprint attack, which needs the malicious server's model ----------------------------------------


def _imprinted(digits) -> torch.nn.Module:
    from privfl.attacks import Placement, imprint_model

    return imprint_model(mlp(64, 16, 10), input_shape=(1, 8, 8), auxiliary_inputs=digits[0][:200], num_bins=16,
                         placement=Placement.PREPEND)


def test_imprint_attack_keeps_the_contract(digits) -> None:
    from privfl.attacks import ImprintAttack

    model = _imprinted(digits)
    cipher = build_observation(model, digits[0][:2], digits[1][:2], ObservationSpec(view=ServerView.CIPHERTEXT))
    rec = ImprintAttack().reconstruct(model, cipher)
    assert not rec.accessible and torch.isnan(rec.inputs).all()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    obs = build_observation(model, digits[0][:2], digits[1][:2], ObservationSpec())
    rec = ImprintAttack().reconstruct(model, obs)
    assert isinstance(rec, Reconstruction) and rec.accessible
    assert rec.inputs.shape[1:] == (1, 8, 8) and rec.labels.shape == (rec.inputs.shape[0],) and rec.labels.dtype == torch.long
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # An honest model has no imprint layer to read: a typed refusal, not a crash.
    with pytest.raises(AttackError):
        ImprintAttack().reconstruct(mlp(64, 16, 10), build_observation(mlp(64, 16, 10), digits[0][:2], digits[1][:2], ObservationSpec()))
