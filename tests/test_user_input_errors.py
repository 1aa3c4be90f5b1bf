"""A user's own model and data that do not fit each other, or arguments of the wrong kind, are
typed ConfigErrors naming the site or argument, never an error from deep inside torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

from privfl.config import DPConfig, FederationConfig, ProtectionKind, TrainingConfig
from privfl.errors import ConfigError
from privfl.federation import Federation


def _data(n: int = 40, features: int = 30, labels: torch.Tensor | None = None) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=generator)
    y = labels if labels is not None else torch.randint(0, 2, (n,), generator=generator)
    return TensorDataset(x, y)


def _run(**overrides):
    arguments = {
        "model_fn": lambda: nn.Linear(30, 2),
        "clients": {"site-a": _data()},
        "training": TrainingConfig(batch_size=8, dp=DPConfig(noise_multiplier=1.0)),
        "federation": FederationConfig(rounds=1, protection=ProtectionKind.PLAINTEXT, device="cpu"),
        "progress": False,
        **overrides,
    }
    return Federation(**arguments).run()


@pytest.mark.parametrize("label", [2, 5])
def test_a_label_past_the_models_outputs_names_the_site(label):
    # The model has 2 outputs (classes 0 and 1). Every label is out of range: a round samples its batches at
    # random, and the check on a site's first examples runs once per kind of model and process.
    labels = torch.full((40,), label, dtype=torch.int64)
    with pytest.raises(ConfigError, match=r"a class label is outside the model's outputs") as info:
        _run(clients={"site-a": _data(labels=labels)})
    assert info.value.field == "dataset[site-a]"


def test_a_negative_integer_label_is_refused_like_a_negative_float_one():
    with pytest.raises(ConfigError, match=r"label -1 of example 0.*whole number >= 0"):
        _run(clients={"site-a": _data(labels=torch.full((40,), -1, dtype=torch.int64))})


def test_inputs_of_another_width_than_the_model_name_the_site_and_the_shape():
    with pytest.raises(ConfigError, match=r"does not take site site-a's inputs \(one example has shape \(31,\)\)") as info:
        _run(clients={"site-a": _data(features=31)})
    assert info.value.field == "model_fn"


class _Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(30), torch.tensor(0)


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"model_fn": nn.Linear(30, 2)}, "model_fn", "must build a model, not be one"),
        ({"clients": [_data()]}, "clients", "must map each client's name"),
        ({"clients": {"site-a": _Stream()}}, "clients[site-a]", "map-style Dataset"),
        ({"training": {"batch_size": 8}}, "training", "privfl.TrainingConfig"),
        ({"federation": {"rounds": 1}}, "federation", "privfl.FederationConfig"),
    ],
)
def test_arguments_of_the_wrong_kind_are_refused_when_the_federation_is_made(overrides, field, message):
    with pytest.raises(ConfigError, match=message) as info:
        _run(**overrides)
    assert info.value.field == field
