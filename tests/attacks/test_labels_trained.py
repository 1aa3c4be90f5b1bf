"""Label counts of a batch from the gradient of a trained model, where a zero-shot softmax estimate goes wrong."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

import privfl.attacks.labels as labels_module
from privfl.attacks import GradientObservation, recover_labels
from privfl.attacks.evaluate import client_gradient

TRAIN = 1200  # digits 0..1199 train the model; batches are drawn from the rest


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """An MLP after 150 plain SGD steps (batch 32, lr 0.1) on scikit-learn's digits: about 0.87 held-out accuracy."""
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(150):
        idx = torch.randint(0, TRAIN, (32,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = float((model(x[TRAIN:]).argmax(1) == y[TRAIN:]).float().mean())
    assert accuracy > 0.6, accuracy  # the premise: a model that has learned the task
    return model, x[TRAIN:], y[TRAIN:]


def _batches(x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module):
    for trial in range(8):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(trial))[:4]
        obs = GradientObservation(gradients=client_gradient(model, x[idx], y[idx]), input_shape=(1, 8, 8),
                                  num_samples=4)
        yield obs, y[idx].sort().values


def test_batch_labels_of_a_trained_model_are_recovered(trained, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = trained
    batches = list(_batches(x, y, model))
    recovered = [recover_labels(model, obs).tolist() for obs, _ in batches]
    assert recovered == [want.tolist() for _, want in batches]
    # The case is one the probe estimate alone gets wrong: its mean softmax on random inputs is not the
    # trained model's softmax on these digits.
    monkeypatch.setattr(labels_module, "FIT_TOLERANCE", -1.0)
    probe_only = [recover_labels(model, obs).tolist() for obs, _ in batches]
    assert probe_only != recovered
