"""Shared fixtures of the attack tests: scikit-learn's digits and a small MLP trained on them."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

TRAIN = 1200  # digits 0..1199 train the model; the attacked inputs are drawn from the rest


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    return torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1), torch.tensor(data.target)


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


@pytest.fixture
def untrained_digits_mlp() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The MLP at its seed-0 initialization, with the held-out digits (inputs, labels)."""
    x, y = _digits()
    return _mlp(), x[TRAIN:], y[TRAIN:]


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The MLP after 150 plain SGD steps (batch 32, lr 0.1) on digits 0..1199 (about 0.87 held-out accuracy),
    with the held-out digits (inputs, labels)."""
    x, y = _digits()
    model = _mlp()
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
