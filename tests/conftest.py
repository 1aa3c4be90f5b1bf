"""Shared pytest configuration: GPU tests skip without CUDA; the breast-cancer split over three sites."""

from __future__ import annotations

import pytest
import torch

# The tests train tiny models, where intra-op threads cost more than they give, and share two
# cores with each other's processes: one thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def split():
    """The bundled breast-cancer data, split into train and test."""
    from privfl.data import load_breast_cancer

    return load_breast_cancer()


@pytest.fixture(scope="module")
def clients(split):
    """Three sites with IID shares of the training split."""
    from privfl.data import iid_partition, subsets

    parts = iid_partition(len(split.train), 3, seed=0)
    return {f"site-{i}": s for i, s in enumerate(subsets(split.train, parts))}


_RUN_TOML = """
[data]
dataset = "breast_cancer"
num_clients = 3
partition = "iid"
[model]
kind = "logistic"
[training]
local_epochs = 1
batch_size = 16
learning_rate = 0.5
[training.dp]
target_epsilon = 3.0
delta = 1e-5
[federation]
rounds = {rounds}
protection = "{protection}"
noise_seed = 11
[federation.shared_key]
weight_bound = 1000
[federation.secagg]
weight_bound = 1000
{extra}
"""


@pytest.fixture(scope="session")
def run_toml():
    """A small run config as TOML text (breast cancer, 3 IID sites, logistic model, epsilon 3):
    ``run_toml(protection, rounds=2, extra="")``, ``extra`` appended as further TOML."""

    def make(protection: str, rounds: int = 2, extra: str = "") -> str:
        return _RUN_TOML.format(protection=protection, rounds=rounds, extra=extra)

    return make
