"""Label counts of a batch from the gradient of a trained model, where a zero-shot softmax estimate goes wrong."""

from __future__ import annotations

import pytest
import torch

import privfl.attacks.labels as labels_module
from privfl.attacks import GradientObservation, recover_labels
from privfl.attacks.evaluate import client_gradient


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
