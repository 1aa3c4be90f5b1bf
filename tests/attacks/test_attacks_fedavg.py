"""FedAvg-update inversion: recovers a known batch through several local steps, counts labels, rejects bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
from sklearn.datasets import load_digits

from privfl.attacks import (
    AggregateObservation,
    FedAvgInversion,
    GradientObservation,
    Observation,
    UpdateObservation,
    update_label_counts,
)
from privfl.attacks.evaluate import client_gradient, fedavg_update
from privfl.attacks.fedavg import LocalTraining, as_update, step_indices
from privfl.attacks.metrics import best_match
from privfl.errors import AttackError, ConfigError


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    return torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1), torch.tensor(data.target)


def small_cnn(seed: int = 0, bias: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 64, 10, bias=bias)
    )


def update_of(model, x, y, *, local_steps: int, batch_size: int, lr: float, labels=None) -> UpdateObservation:
    delta = fedavg_update(model, x, y, local_steps=local_steps, lr=lr, batch_size=batch_size)
    return UpdateObservation(delta=delta, input_shape=tuple(x.shape[1:]), num_samples=len(x),
                             local_steps=local_steps, lr=lr, batch_size=batch_size, labels=labels)


def mean_psnr(reconstructed: torch.Tensor, truth: torch.Tensor) -> float:
    return float(best_match(reconstructed, truth, data_range=1.0).psnr.mean())


# --- recovery ---------------------------------------------------------------------------------------------


def test_recovers_four_inputs_through_four_local_steps_of_distinct_batches(digits) -> None:
    # Four digits, four local steps of batch 2 (two epochs), the model moving at lr 0.1 between steps:
    # every candidate must be recovered through the chained replay.
    x, y = digits[0][[0, 1, 2, 3]], digits[1][[0, 1, 2, 3]]
    model = small_cnn()
    obs = update_of(model, x, y, local_steps=4, batch_size=2, lr=0.1, labels=y)
    rec = FedAvgInversion(max_iterations=60, seed=0).reconstruct(model, obs)
    assert rec.inputs.shape == x.shape and torch.equal(rec.labels, y)
    per_input = best_match(rec.inputs, x, data_range=1.0).psnr
    assert float(per_input.min()) >= 25.0, per_input
    assert rec.objective is not None and rec.objective < 0.05


def test_recovers_a_batch_with_labels_estimated_from_the_update(digits) -> None:
    x, y = digits[0][[10, 11, 12]], digits[1][[10, 11, 12]]
    model = small_cnn(seed=1)
    obs = update_of(model, x, y, local_steps=3, batch_size=3, lr=0.05)  # full batch: no assignment ambiguity
    rec = FedAvgInversion(max_iterations=100, seed=0).reconstruct(model, obs)
    assert sorted(rec.labels.tolist()) == sorted(y.tolist())
    assert mean_psnr(rec.inputs, x) >= 25.0
    assert "estimated" in rec.note


def test_unknown_labels_are_placed_in_the_right_local_steps(digits) -> None:
    # Two distinct batches per epoch and no labels: which input (so which label) sat in which step changes
    # the update; the attack must find the placement, then every input.
    x, y = digits[0][40:44], digits[1][40:44]
    model = small_cnn()
    obs = update_of(model, x, y, local_steps=4, batch_size=2, lr=0.1)
    rec = FedAvgInversion(max_iterations=120, seed=0).reconstruct(model, obs)
    match = best_match(rec.inputs, x, data_range=1.0)
    assert torch.equal(rec.labels[match.reconstruction_index], y[match.target_index])
    assert float(match.psnr.min()) >= 25.0, match.psnr
    steps = [{int(rec.labels[i]) for i in batch} for batch in step_indices(4, 4, 2)]
    assert steps[:2] == [{int(y[0]), int(y[1])}, {int(y[2]), int(y[3])}]


def test_a_gradient_is_inverted_as_one_full_batch_step(digits) -> None:
    x, y = digits[0][:1], digits[1][:1]
    model = small_cnn()
    obs = GradientObservation(gradients=client_gradient(model, x, y), input_shape=(1, 8, 8), num_samples=1)
    update, converted = as_update(obs)
    assert converted and update.local_steps == 1 and update.batch_size == 1 and update.lr == 1.0
    rec = FedAvgInversion(max_iterations=100, seed=0).reconstruct(model, obs)
    assert int(rec.labels[0]) == int(y[0])
    assert mean_psnr(rec.inputs, x) >= 25.0


# --- label counts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("local_steps", "batch_size", "lr"), [(1, 6, 0.1), (4, 3, 0.1), (5, 6, 0.05)])
def test_update_label_counts_recover_a_known_multiset(digits, local_steps: int, batch_size: int, lr: float) -> None:
    x, y = digits[0][20:26], digits[1][20:26]
    model = small_cnn()
    obs = update_of(model, x, y, local_steps=local_steps, batch_size=batch_size, lr=lr)
    counts = update_label_counts(model, obs)
    assert counts.shape == (10,) and int(counts.sum()) == 6
    assert torch.equal(counts, torch.bincount(y, minlength=10)), (counts, y)


def test_update_label_counts_without_bias_use_the_weight_rows(digits) -> None:
    x, y = digits[0][30:34], digits[1][30:34]
    model = small_cnn(bias=False)
    obs = update_of(model, x, y, local_steps=2, batch_size=4, lr=0.05)
    assert torch.equal(update_label_counts(model, obs), torch.bincount(y, minlength=10))


def test_update_label_counts_need_a_classifier_layer() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 10, 8), torch.nn.Flatten())  # logits from a convolution
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([1, 2])
    obs = update_of(model, x, y, local_steps=2, batch_size=2, lr=0.1)
    with pytest.raises(AttackError, match=r"nn\.Linear"):
        update_label_counts(model, obs)
    with pytest.raises(AttackError, match=r"nn\.Linear"):
        FedAvgInversion(max_iterations=1).reconstruct(model, obs)


# --- inconsistent observations and settings -----------------------------------------------------------------


def test_update_that_does_not_fit_the_model_is_rejected(digits) -> None:
    x, y = digits[0][:2], digits[1][:2]
    obs = update_of(small_cnn(), x, y, local_steps=2, batch_size=1, lr=0.1)
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(AttackError, match="tensors but the model has"):
        FedAvgInversion(max_iterations=1).reconstruct(other, obs)
    wrong_shape = UpdateObservation(delta=(obs.delta[0][:2], *obs.delta[1:]), input_shape=(1, 8, 8), num_samples=2,
                                    local_steps=2, lr=0.1, batch_size=1)
    with pytest.raises(AttackError, match="shape"):
        FedAvgInversion(max_iterations=1).reconstruct(small_cnn(), wrong_shape)


def test_an_all_zero_update_is_rejected() -> None:
    model = small_cnn()
    zeros = UpdateObservation(delta=tuple(torch.zeros_like(p) for p in model.parameters()), input_shape=(1, 8, 8),
                              num_samples=2, local_steps=1, lr=0.1, batch_size=2)
    with pytest.raises(AttackError, match="all zeros"):
        FedAvgInversion(max_iterations=1).reconstruct(model, zeros)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"batch_size": 3}, "batch_size"),  # more than num_samples
        ({"lr": 0.0}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"local_steps": 0}, "local_steps"),
        ({"labels": torch.tensor([1])}, "labels"),
        ({"labels": torch.tensor([0.5, 1.0])}, "labels"),
    ],
)
def test_inconsistent_update_fields_raise_config_error(change: dict, field: str) -> None:
    fields = {"delta": (torch.ones(3),), "input_shape": (3,), "num_samples": 2, "local_steps": 2, "lr": 0.1,
              "batch_size": 2}
    fields.update(change)
    with pytest.raises(ConfigError) as info:
        UpdateObservation(**fields)
    assert info.value.field == field


def test_missing_update_fields_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="local_steps"):
        UpdateObservation(  # type: ignore[call-arg]
            delta=(torch.ones(3),), input_shape=(3,), num_samples=2, lr=0.1, batch_size=2
        )


def test_observation_without_gradient_or_update_is_rejected() -> None:
    with pytest.raises(AttackError, match="needs an update or a gradient"):
        FedAvgInversion(max_iterations=1).reconstruct(small_cnn(), Observation(input_shape=(1, 8, 8), num_samples=1))


def test_an_aggregate_is_inverted_as_one_step_over_all_inputs(digits) -> None:
    model = small_cnn()
    grads = client_gradient(model, digits[0][:2], digits[1][:2])
    agg = AggregateObservation(gradients=grads, input_shape=(1, 8, 8), num_clients=2)
    update, converted = as_update(agg)
    assert converted and update.num_samples == 2 and update.batch_size == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_iterations": 0}, "max_iterations"),
        ({"restarts": 0}, "restarts"),
        ({"lr": -1.0}, "lr"),
        ({"tv_weight": -0.1}, "tv_weight"),
        ({"warmup": 1.0}, "warmup"),
        ({"continuation": -0.1}, "continuation"),
        ({"tv_start": -0.2}, "tv_start"),
        ({"tv_start": float("nan")}, "tv_start"),
        ({"tv_anneal": 1.0}, "tv_anneal"),
        ({"bounds": (1.0, 0.0)}, "bounds"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_attack_settings_are_validated(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        FedAvgInversion(**kwargs)
    assert info.value.field == field


def test_local_training_batches_wrap_around_in_order() -> None:
    assert step_indices(5, 3, 2) == [[0, 1], [2, 3], [4, 0]]
    training = LocalTraining(num_samples=5, local_steps=3, batch_size=2, lr=0.1)
    assert training.uses().tolist() == [2, 1, 1, 1, 1]
    with pytest.raises(ConfigError):
        LocalTraining(num_samples=2, local_steps=1, batch_size=3, lr=0.1)


# --- analytic recovery of batches ---------------------------------------------------------------------------


@pytest.mark.parametrize("start", [0, 8, 16])
def test_analytic_reads_inputs_alone_in_a_unit_exactly_out_of_a_batch(digits, start: int) -> None:
    from privfl.attacks import AnalyticLinear

    x, y = digits[0][start : start + 4], digits[1][start : start + 4]
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    )
    obs = GradientObservation(gradients=client_gradient(model, x, y), input_shape=(1, 8, 8), num_samples=4)
    rec = AnalyticLinear().reconstruct(model, obs)
    match = best_match(rec.inputs.float(), x, data_range=1.0)
    errors = (rec.inputs[match.reconstruction_index].float() - x[match.target_index]).abs().flatten(1).max(1).values
    exact = int((errors < 1e-4).sum())
    assert exact >= 3, errors
    assert f"{exact} of 4 inputs" in rec.note


def test_total_variation_weight_follows_the_model_unless_set():
    from torch import nn

    from privfl.attacks import FedAvgInversion

    smooth = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2))
    relu = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert FedAvgInversion().tv_weight_for(smooth) == 0.0
    assert FedAvgInversion().tv_weight_for(relu) == 1e-2
    assert FedAvgInversion(tv_weight=0.05).tv_weight_for(smooth) == 0.05


def test_total_variation_weight_falls_from_its_start_to_the_final_weight():
    from torch import nn

    from privfl.attacks.fedavg import _Replay

    relu = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    replay = _Replay.__new__(_Replay)  # only the final weight is read
    replay.tv_weight = FedAvgInversion().tv_weight_for(relu)
    attack = FedAvgInversion(tv_start=0.2, tv_anneal=0.5)
    weights = [attack._tv_at(replay, it, 100) for it in range(100)]
    assert weights[0] == pytest.approx(0.2)
    assert all(a >= b for a, b in itertools.pairwise(weights))  # never rises
    assert weights[25] == pytest.approx((0.2 + 1e-2) / 2)
    assert all(w == pytest.approx(1e-2) for w in weights[50:])  # the final weight for the second half
    # Annealing off, or a start below the final weight: the final weight throughout.
    assert {FedAvgInversion(tv_anneal=0.0)._tv_at(replay, it, 100) for it in (0, 10, 99)} == {1e-2}
    assert {FedAvgInversion(tv_start=0.0)._tv_at(replay, it, 100) for it in (0, 10, 99)} == {1e-2}
    # The default falls over the first three quarters: still above the final weight at 70 %, at it from 75 %.
    default = FedAvgInversion()
    assert default._tv_at(replay, 70, 100) > 1e-2 + 1e-4
    assert all(default._tv_at(replay, it, 100) == pytest.approx(1e-2) for it in range(75, 100))


@pytest.mark.parametrize(("local_steps", "batch_size", "anchored"), [(4, 4, True), (4, 2, False), (1, 4, False)])
def test_only_full_batch_epochs_start_on_the_anchored_replay(digits, local_steps: int, batch_size: int,
                                                             anchored: bool, monkeypatch) -> None:
    # Anchoring to the straight line w_0 -> w_K helps when every step used all the inputs; with distinct
    # batches the trajectory zigzags and the attack replays faithfully from the first iteration.
    from privfl.attacks.fedavg import _Replay

    x, y = digits[0][:4], digits[1][:4]
    model = small_cnn()
    obs = update_of(model, x, y, local_steps=local_steps, batch_size=batch_size, lr=0.1, labels=y)
    calls: list[bool] = []
    original = _Replay.cosine_distance

    def spy(self, inputs, labels, *, anchored: bool = False):
        calls.append(anchored)
        return original(self, inputs, labels, anchored=anchored)

    monkeypatch.setattr(_Replay, "cosine_distance", spy)
    FedAvgInversion(max_iterations=8, continuation=0.5, seed=0).reconstruct(model, obs)
    assert calls[:4] == [anchored] * 4
    assert calls[4:8] == [False] * 4


def sigmoid_cnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Sigmoid(), torch.nn.Flatten(), torch.nn.Linear(4 * 64, 10)
    )


@pytest.mark.parametrize("start", [16, 36, 44, 52, 56])
def test_replay_search_reads_sigmoid_label_counts_where_the_bias_estimate_fails(digits, start: int) -> None:
    # An untrained sigmoid model moves far in 4 steps of batch 2 at lr 0.1, so the straight line from w_0 to w_K
    # misdescribes the steps and the bias estimate is wrong on these updates; its features hardly depend on the
    # input, so replaying the steps on random stand-ins with the right labels reproduces the bias update.
    x, y = digits[0][start : start + 4], digits[1][start : start + 4]
    model = sigmoid_cnn()
    obs = update_of(model, x, y, local_steps=4, batch_size=2, lr=0.1)
    true = torch.bincount(y, minlength=10)
    assert not torch.equal(update_label_counts(model, obs, fit=False), true)
    assert torch.equal(update_label_counts(model, obs), true)


def test_replay_search_declines_batches_that_overlap_or_a_search_too_large(digits) -> None:
    from privfl.attacks._model import ModelView
    from privfl.attacks.fedavg import _replay_labels

    model = sigmoid_cnn()
    view = ModelView(model)
    estimate = torch.zeros(10, dtype=torch.long)
    # 5 inputs in batches of 2 wrap around: the batches do not partition the inputs.
    x, y = digits[0][:5], digits[1][:5]
    estimate[0] = 5
    assert _replay_labels(view, update_of(model, x, y, local_steps=3, batch_size=2, lr=0.1), estimate, seed=0) is None
    # One batch of 8 over 10 classes: 24,310 multisets, more replays than REPLAY_MAX_EVALUATIONS.
    x, y = digits[0][:8], digits[1][:8]
    estimate[0] = 8
    assert _replay_labels(view, update_of(model, x, y, local_steps=2, batch_size=8, lr=0.1), estimate, seed=0) is None
    # 1,000 classes in batches of 2: about 500,000 multisets per batch, declined before any is listed.
    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1000))
    x, y = digits[0][:4], digits[1][:4]
    wide_estimate = torch.bincount(y, minlength=1000)
    wide_obs = update_of(wide, x, y, local_steps=2, batch_size=2, lr=0.1)
    assert _replay_labels(ModelView(wide), wide_obs, wide_estimate, seed=0) is None
