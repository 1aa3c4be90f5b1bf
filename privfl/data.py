"""Bundled datasets (real data shipped inside scikit-learn, or generated) and client partitioning."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from privfl import _validate
from privfl.errors import ConfigError

__all__ = [
    "ArrayDataset",
    "DatasetSplit",
    "dirichlet_partition",
    "group_partition",
    "iid_partition",
    "known_labels",
    "labels_of",
    "load_breast_cancer",
    "load_digits",
    "make_credit",
    "subsets",
]


class ArrayDataset(Dataset):
    """A map-style dataset over in-memory arrays.

    Args:
        features: float array (n, ...) - tabular rows or images.
        labels: integer class labels (n,).
        groups: optional group values (n,), e.g. a site or region column.
        group_name: the group column's name (e.g. ``"region"``).
        feature_names: optional column names for tabular data.
    """

    def __init__(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        *,
        groups: np.ndarray | None = None,
        group_name: str | None = None,
        feature_names: Sequence[str] | None = None,
    ) -> None:
        if len(features) != len(labels):
            raise ConfigError("labels", len(labels), f"length must match features ({len(features)})")
        if groups is not None and len(groups) != len(labels):
            raise ConfigError("groups", len(groups), f"length must match labels ({len(labels)})")
        self.features = torch.as_tensor(np.asarray(features, dtype=np.float32))
        self.targets = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.groups = None if groups is None else np.asarray(groups)
        self.group_name = group_name if groups is not None else None
        self.feature_names = tuple(feature_names) if feature_names is not None else None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.targets[index]

    @property
    def num_classes(self) -> int:
        return int(self.targets.max().item()) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])


@dataclass(frozen=True, slots=True)
class DatasetSplit:
    """A train/test split of one dataset.

    Attributes:
        preprocessing: how the raw inputs were turned into the ones the model sees (JSON-ready):
            ``{"standardize": {"features", "mean", "std"}}`` (the training part's statistics) or
            ``{"scale": {"divide_by"}}``; ``privfl export`` writes it into the exported file, so new
            inputs can be prepared the same way.
    """

    train: ArrayDataset
    test: ArrayDataset
    name: str
    description: str
    preprocessing: dict[str, Any] | None = None


def _split_indices(n: int, test_fraction: float, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # Stratified: every class keeps its share in the test set.
    test_idx = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        test_idx.append(idx[: max(1, int(round(test_fraction * len(idx))))])  # noqa: RUF046 (numpy<2 round() gives a float)
    test = np.sort(np.concatenate(test_idx))
    train = np.setdiff1d(np.arange(n), test)
    return train, test


def _standardize(train: np.ndarray, test: np.ndarray, names) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    # Statistics from the training part only, so nothing about the test rows leaks into training.
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std[std == 0] = 1.0
    recipe = {"standardize": {"features": [str(n) for n in names], "mean": mean.tolist(), "std": std.tolist()}}
    return (train - mean) / std, (test - mean) / std, recipe


def load_breast_cancer(*, test_fraction: float = 0.2, seed: int = 0) -> DatasetSplit:
    """The Wisconsin Diagnostic Breast Cancer data (569 patients, 30 features, malignant/benign).

    Ships with scikit-learn; features are standardized with training-set statistics.
    Label 1 is benign, 0 malignant (scikit-learn's coding).
    """
    from sklearn.datasets import load_breast_cancer as _load

    raw = _load()
    rng = np.random.default_rng(seed)
    train, test = _split_indices(len(raw.target), test_fraction, raw.target, rng)
    names = list(raw.feature_names)
    x_train, x_test, recipe = _standardize(raw.data[train], raw.data[test], names)
    return DatasetSplit(
        train=ArrayDataset(x_train, raw.target[train], feature_names=names),
        test=ArrayDataset(x_test, raw.target[test], feature_names=names),
        name="breast_cancer",
        description="Wisconsin Diagnostic Breast Cancer (scikit-learn), 30 standardized features, 2 classes",
        preprocessing=recipe,
    )


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> DatasetSplit:
    """Handwritten digits (1,797 images of 8x8 pixels, 10 classes), scaled to [0, 1], shape (1, 8, 8)."""
    from sklearn.datasets import load_digits as _load

    raw = _load()
    images = (raw.images / 16.0).astype(np.float32)[:, None, :, :]
    rng = np.random.default_rng(seed)
    train, test = _split_indices(len(raw.target), test_fraction, raw.target, rng)
    return DatasetSplit(
        train=ArrayDataset(images[train], raw.target[train]),
        test=ArrayDataset(images[test], raw.target[test]),
        name="digits",
        description="UCI handwritten digits (scikit-learn), 8x8 grey images in [0, 1], 10 classes",
        preprocessing={"scale": {"divide_by": 16.0}},
    )


CREDIT_FEATURES = (
    "income_k",
    "debt_to_income",
    "age",
    "late_payments_12m",
    "credit_utilization",
    "employment_years",
    "open_accounts",
    "loan_amount_k",
)
CREDIT_REGIONS = ("north", "south", "east", "west", "central")


def make_credit(*, num_rows: int = 6000, test_fraction: float = 0.2, seed: int = 0) -> DatasetSplit:
    """A generated credit-scoring dataset: 8 applicant features, a default label, and a region group.

    This is synthetic data, not real applicants: features are drawn from plausible marginal
    distributions (log-normal income, beta utilization, Poisson late payments, ...) that differ by
    region, and the default label follows a logistic model of them, so a linear model can learn it
    to about 88% accuracy (against a 75% majority class). Use it to exercise pipelines, not to draw conclusions about credit risk.
    ``groups`` holds the region (one bank branch network per region for ``partition = "group"``).
    """
    if num_rows < 100:
        raise ConfigError("num_rows", num_rows, "must be at least 100")
    rng = np.random.default_rng(seed)
    region = rng.integers(0, len(CREDIT_REGIONS), size=num_rows)
    region_shift = np.array([0.0, -0.15, 0.1, 0.05, -0.05])[region]
    income = np.exp(rng.normal(3.9 + region_shift, 0.45))
    debt_to_income = np.clip(rng.beta(2.0, 5.0, num_rows) + 0.1 * region_shift, 0, 1.5)
    age = np.clip(rng.normal(42, 12, num_rows), 18, 90)
    late = rng.poisson(0.4 + 0.6 * debt_to_income)
    utilization = rng.beta(2.0, 3.0, num_rows)
    employment = np.clip(rng.exponential(6.0, num_rows), 0, age - 16)
    accounts = rng.poisson(4, num_rows)
    loan = np.exp(rng.normal(2.8, 0.6, num_rows))
    logit = 2.5 * (
        -0.9
        + 3.0 * (debt_to_income - 0.3)
        + 0.9 * late
        + 2.2 * (utilization - 0.4)
        - 0.025 * (income - 50)
        - 0.06 * employment
        - 0.01 * (age - 42)
        + 0.008 * (loan - 18)
    )
    default = (rng.random(num_rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    features = np.column_stack([income, debt_to_income, age, late, utilization, employment, accounts, loan])
    train, test = _split_indices(num_rows, test_fraction, default, rng)
    x_train, x_test, recipe = _standardize(features[train], features[test], CREDIT_FEATURES)
    regions = np.array(CREDIT_REGIONS)[region]
    return DatasetSplit(
        train=ArrayDataset(x_train, default[train], groups=regions[train], group_name="region", feature_names=CREDIT_FEATURES),
        test=ArrayDataset(x_test, default[test], groups=regions[test], group_name="region", feature_names=CREDIT_FEATURES),
        name="credit",
        description="GENERATED credit-scoring data (synthetic applicants, 8 features, default label, region groups)",
        preprocessing=recipe,
    )


def labels_of(dataset: Dataset) -> np.ndarray:
    """Integer labels of a classification dataset (held in memory, see `known_labels`; else by iterating)."""
    known = known_labels(dataset)
    if known is not None:
        return known
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]  # torch's Dataset declares no __len__; map-style datasets have one


def known_labels(dataset: Dataset) -> np.ndarray | None:
    """A dataset's labels when it holds them in memory, without loading any example; else None.

    Read from ``.targets`` (`ArrayDataset`, torchvision's datasets), the second tensor of a
    ``TensorDataset``, through ``Subset`` and ``ConcatDataset``. None where a dataset has none of
    these, or where what it holds does not have one label per example.
    """
    from torch.utils.data import ConcatDataset, TensorDataset

    if isinstance(dataset, Subset):
        parent = known_labels(dataset.dataset)
        return None if parent is None else parent[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, ConcatDataset):
        parts = [known_labels(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else np.concatenate([p for p in parts if p is not None])
    if isinstance(dataset, TensorDataset):
        labels = dataset.tensors[1] if len(dataset.tensors) > 1 else None
    else:
        labels = getattr(dataset, "targets", None)
    if labels is None:
        return None
    try:
        array = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        size = len(dataset)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return array if array.ndim >= 1 and len(array) == size else None


def iid_partition(num_examples: int, num_clients: int, *, seed: int = 0) -> list[np.ndarray]:
    """Splits ``range(num_examples)`` uniformly at random into ``num_clients`` near-equal parts."""
    if not (isinstance(num_clients, int) and 1 <= num_clients <= num_examples):
        raise ConfigError("num_clients", num_clients, f"must be an integer in [1, {num_examples}]")
    perm = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, *, alpha: float, seed: int = 0, min_size: int = 1, max_tries: int = 1000
) -> list[np.ndarray]:
    """Label-skewed split: each class's examples are divided by proportions drawn from Dirichlet(alpha).

    Small ``alpha`` (e.g. 0.1) gives clients dominated by one class; large alpha approaches IID.
    The draw is repeated until every client has at least ``min_size`` examples.

    Raises:
        ConfigError: bad arguments, or no draw met ``min_size`` in ``max_tries`` tries.
    """
    labels = np.asarray(labels)
    _validate.positive("alpha", alpha, allow_numpy=True)
    if not (isinstance(num_clients, int) and num_clients >= 1):
        raise ConfigError("num_clients", num_clients, "must be an integer >= 1")
    if num_clients * min_size > len(labels):
        raise ConfigError(
            "data.min_client_size", min_size,
            f"{num_clients} clients x {min_size} examples each > the {len(labels)} training examples; "
            "use fewer clients (data.num_clients; --sites for privfl deploy local) or a smaller data.min_client_size",
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(labels == cls))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(r) for r in result) >= min_size:
            return result
    raise ConfigError(
        "data.min_client_size", min_size,
        f"no Dirichlet({alpha}) split gave every one of {num_clients} clients that many examples in {max_tries} tries; "
        "use fewer clients, a larger data.alpha or a smaller data.min_client_size",
    )


def group_partition(groups: np.ndarray) -> dict[str, np.ndarray]:
    """One client per distinct group value; returns group name -> example indices."""
    groups = np.asarray(groups)
    return {str(g): np.flatnonzero(groups == g) for g in np.unique(groups)}


def subsets(dataset: Dataset, parts: Sequence[np.ndarray]) -> list[Subset]:
    """Wraps index arrays as ``torch.utils.data.Subset`` views of ``dataset`` (no copy)."""
    return [Subset(dataset, [int(i) for i in part]) for part in parts]
