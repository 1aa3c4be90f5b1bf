"""Bundled datasets and partition helpers."""

from __future__ import annotations

import numpy as np
import pytest

from privfl.data import (
    dirichlet_partition,
    group_partition,
    iid_partition,
    labels_of,
    load_breast_cancer,
    load_digits,
    make_credit,
    subsets,
)
from privfl.errors import ConfigError


def test_bundled_datasets_shapes():
    bc = load_breast_cancer()
    assert len(bc.train) + len(bc.test) == 569 and bc.train.input_shape == (30,)
    assert abs(float(bc.train.features.mean())) < 1e-5  # standardized on the training part
    digits = load_digits()
    assert digits.train.input_shape == (1, 8, 8) and digits.train.num_classes == 10
    assert 0.0 <= float(digits.train.features.min()) and float(digits.train.features.max()) <= 1.0
    credit = make_credit(num_rows=1000)
    assert credit.train.input_shape == (8,) and credit.train.groups is not None
    assert 0.1 < float(credit.train.targets.float().mean()) < 0.6


def _assert_partition(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n  # disjoint and complete


def test_iid_partition_is_disjoint_and_balanced():
    parts = iid_partition(103, 5, seed=1)
    _assert_partition(parts, 103)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("alpha", [0.1, 0.5, 100.0])
def test_dirichlet_partition_skew_depends_on_alpha(alpha):
    labels = np.repeat(np.arange(4), 250)
    parts = dirichlet_partition(labels, 5, alpha=alpha, seed=0, min_size=10)
    _assert_partition(parts, 1000)
    assert min(map(len, parts)) >= 10
    # Average share of each client's most common label: near 1/4 when IID, near 1 when skewed.
    dominant = np.mean([np.bincount(labels[p], minlength=4).max() / len(p) for p in parts])
    if alpha >= 100:
        assert dominant < 0.35
    if alpha <= 0.1:
        assert dominant > 0.6


def test_dirichlet_partition_rejects_impossible_min_size():
    with pytest.raises(ConfigError) as info:
        dirichlet_partition(np.zeros(20), 5, alpha=0.5, min_size=10)
    assert info.value.field == "data.min_client_size"  # the config key a user sets


def test_group_partition_and_subsets():
    credit = make_credit(num_rows=500)
    groups = group_partition(credit.train.groups)
    assert set(groups) == {"north", "south", "east", "west", "central"}
    _assert_partition(list(groups.values()), len(credit.train))
    subs = subsets(credit.train, list(groups.values()))
    assert sum(len(s) for s in subs) == len(credit.train)
    assert (labels_of(subs[0]) == credit.train.targets.numpy()[groups[next(iter(groups))]]).all()
