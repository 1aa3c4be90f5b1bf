"""A user's own Dataset: safe conversions happen, unsafe ones are a ConfigError naming site, example and fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from privfl.config import DPConfig, TrainingConfig
from privfl.errors import ConfigError
from privfl.models import LogisticRegression
from privfl.training import evaluate, prepare_dataset, train_dp_sgd

CPU = torch.device("cpu")
RNG = np.random.default_rng(0)
X64 = torch.as_tensor(RNG.normal(size=(40, 5)))  # float64, as torch.from_numpy gives for numpy data
Y = torch.as_tensor(np.arange(40) % 2)


class PairList(Dataset):
    """A hand-written Dataset yielding whatever pairs it is given."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]


def _train(dataset, site="site-a"):
    torch.manual_seed(0)
    model = LogisticRegression(5, 2)
    cfg = TrainingConfig(batch_size=8, learning_rate=0.5, dp=DPConfig(noise_multiplier=1.0))
    return train_dp_sgd(model, dataset, config=cfg, noise_multiplier=1.0, device=CPU, seed=0, site=site)


def test_float64_inputs_are_cast_to_the_model_dtype():
    result = _train(TensorDataset(X64, Y))
    reference = _train(TensorDataset(X64.float(), Y))
    np.testing.assert_allclose(result.delta, reference.delta, rtol=1e-5, atol=1e-6)


def test_integer_valued_float_labels_become_class_ids():
    result = _train(TensorDataset(X64.float(), Y.double()))
    reference = _train(TensorDataset(X64.float(), Y))
    np.testing.assert_array_equal(result.delta, reference.delta)


def test_labels_of_shape_one_become_class_ids():
    result = _train(TensorDataset(X64.float(), Y.reshape(-1, 1)))
    reference = _train(TensorDataset(X64.float(), Y))
    np.testing.assert_array_equal(result.delta, reference.delta)


def test_numpy_examples_work():
    pairs = [(X64[i].numpy(), np.int64(Y[i])) for i in range(40)]
    result = _train(PairList(pairs))
    reference = _train(TensorDataset(X64.float(), Y))
    np.testing.assert_allclose(result.delta, reference.delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("labels", "words"),
    [
        (torch.full((40,), 0.5), "whole number"),
        (torch.nn.functional.one_hot(Y, 2).float(), "one integer per example"),
        (torch.full((40,), -1.0), "whole number"),
    ],
)
def test_unusable_labels_name_the_site_example_and_fix(labels, words):
    dataset = TensorDataset(X64.float(), labels)
    with pytest.raises(ConfigError) as info:
        _train(dataset, site="hospital-b")
    message = str(info.value)
    assert "dataset[hospital-b]" in message and "example 0" in message and words in message


def test_a_bad_label_later_in_the_data_is_named():
    labels = Y.double().clone()
    labels[17] = 0.25
    with pytest.raises(ConfigError, match=r"example 17"):
        # Every example goes through the converting view once the first one needed it.
        _train(TensorDataset(X64.float(), labels))


def test_examples_that_are_not_pairs_are_refused():
    with pytest.raises(ConfigError, match=r"\(input, class label\) pair"):
        _train(PairList([X64[i].float() for i in range(40)]))


def test_clean_dataset_is_passed_through_unchanged():
    dataset = TensorDataset(X64.float(), Y)
    assert prepare_dataset(dataset, LogisticRegression(5, 2)) is dataset


def test_evaluate_takes_the_same_conversions():
    model = LogisticRegression(5, 2)
    assert evaluate(model, TensorDataset(X64, Y.double()), device=CPU) == evaluate(
        model, TensorDataset(X64.float(), Y), device=CPU
    )
