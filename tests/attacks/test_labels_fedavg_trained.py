"""Label counts from FedAvg updates of a trained model: the per-input fit, and a clear error where they cannot be read."""

from __future__ import annotations

import pytest
import torch

import privfl.attacks.fedavg as fedavg_module
from privfl.attacks import UpdateObservation, update_label_counts
from privfl.attacks.evaluate import fedavg_update
from privfl.errors import AttackError


def _updates(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, local_steps: int, batch_size: int,
             lr: float, trials: int = 8):
    for trial in range(trials):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(trial))[:4]
        delta = fedavg_update(model, x[idx], y[idx], local_steps=local_steps, lr=lr, batch_size=batch_size)
        obs = UpdateObservation(delta=tuple(delta), input_shape=(1, 8, 8), num_samples=4, local_steps=local_steps,
                                lr=lr, batch_size=batch_size)
        yield obs, torch.bincount(y[idx], minlength=10)


def _exact(model: torch.nn.Module, updates) -> int:
    return sum(torch.equal(update_label_counts(model, obs), want) for obs, want in updates)


@pytest.mark.parametrize(("local_steps", "batch_size", "lr", "at_least"), [(1, 4, 0.1, 8), (4, 4, 0.01, 7), (4, 2, 0.1, 7)])
def test_trained_model_counts_come_from_the_per_input_fit(
    trained, monkeypatch: pytest.MonkeyPatch, local_steps: int, batch_size: int, lr: float, at_least: int
) -> None:
    model, x, y = trained
    updates = list(_updates(model, x, y, local_steps=local_steps, batch_size=batch_size, lr=lr))
    assert _exact(model, updates) >= at_least
    # The probe estimate alone (the fit switched off) does worse on the same updates: its mean softmax on
    # random inputs is not the trained model's softmax on these digits.
    monkeypatch.setattr(fedavg_module, "FIT_TOLERANCE", -1.0)
    monkeypatch.setattr(fedavg_module, "STEPS_FIT_TOLERANCE", -1.0)
    assert _exact(model, updates) < at_least


def test_strict_raises_on_an_update_whose_bias_barely_moved(trained) -> None:
    # At lr 1 the trained model fits the four digits within the first steps: the bias update is then mostly
    # the softmax of inputs the server does not have, and the probe estimate is a guess.
    model, x, y = trained
    obs, _ = next(_updates(model, x, y, local_steps=4, batch_size=2, lr=1.0))
    counts = update_label_counts(model, obs)  # the default still answers
    assert counts.shape == (10,) and int(counts.sum()) == 4
    with pytest.raises(AttackError, match="cannot be read"):
        update_label_counts(model, obs, strict=True)


@pytest.mark.parametrize(("local_steps", "batch_size", "lr"), [(1, 4, 0.1), (4, 2, 0.1), (3, 3, 0.1)])
def test_untrained_counts_stay_exact_and_strict_answers(
    untrained_digits_mlp, local_steps: int, batch_size: int, lr: float) -> None:
    model, x, y = untrained_digits_mlp
    for obs, want in _updates(model, x, y, local_steps=local_steps, batch_size=batch_size, lr=lr,
                              trials=3):
        assert torch.equal(update_label_counts(model, obs), want)
        assert torch.equal(update_label_counts(model, obs, strict=True), want)


def test_unequal_input_uses_skip_the_fit(trained, monkeypatch: pytest.MonkeyPatch) -> None:
    # 3 steps of 2 over 4 inputs use two inputs twice and two once: the averaged gradient weighs them
    # unequally, which the per-input fit does not model, so the probe estimate answers.
    model, x, y = trained
    obs, _ = next(_updates(model, x, y, local_steps=3, batch_size=2, lr=0.1))

    def fail(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the fit must not run")

    monkeypatch.setattr(fedavg_module, "_fit_instances", fail)
    assert int(update_label_counts(model, obs).sum()) == 4


def test_fit_false_reads_the_bias_alone(trained, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = trained
    obs, _ = next(_updates(model, x, y, local_steps=4, batch_size=2, lr=0.1))
    with_fit = update_label_counts(model, obs)

    def fail(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the fit must not run")

    monkeypatch.setattr(fedavg_module, "_fit_instances", fail)
    alone = update_label_counts(model, obs, fit=False)
    assert int(alone.sum()) == 4 and int(with_fit.sum()) == 4
