"""Runs a federation described by a :class:`~privfl.config.RunConfig` on a bundled dataset."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from privfl.config import DatasetKind, PartitionKind, RunConfig, load_config
from privfl.errors import ConfigError
from privfl.rundir import CONFIG_FILE, check_run_directory

if TYPE_CHECKING:
    from privfl.data import DatasetSplit
    from privfl.federation import RunResult

# privfl.data, privfl.federation and privfl.models import torch (seconds of CPU): they are imported
# where used, so that a run refused for its directory does not pay for them.

__all__ = ["load_dataset", "run", "split_clients"]

log = logging.getLogger("privfl")


def load_dataset(config: RunConfig) -> DatasetSplit:
    """The bundled dataset a run config names."""
    from privfl.data import load_breast_cancer, load_digits, make_credit

    seed = config.federation.seed
    if config.data.dataset is DatasetKind.BREAST_CANCER:
        return load_breast_cancer(test_fraction=config.data.test_fraction, seed=seed)
    if config.data.dataset is DatasetKind.DIGITS:
        return load_digits(test_fraction=config.data.test_fraction, seed=seed)
    return make_credit(test_fraction=config.data.test_fraction, seed=seed)


def split_clients(config: RunConfig, split: DatasetSplit) -> dict:
    """Client name -> training subset, as the config's partition says."""
    from privfl.data import dirichlet_partition, group_partition, iid_partition, labels_of, subsets

    data = config.data
    seed = config.federation.seed
    if data.partition is PartitionKind.GROUP:
        if split.train.groups is None or data.group_column != split.train.group_name:
            available = split.train.group_name or "none"
            raise ConfigError("data.group_column", data.group_column, f"dataset {split.name} has group column: {available}")
        groups = group_partition(split.train.groups)
        if data.num_clients != len(groups):
            raise ConfigError("data.num_clients", data.num_clients, f"the group column has {len(groups)} groups")
        names = list(data.client_names or groups)
        return dict(zip(names, subsets(split.train, list(groups.values())), strict=True))
    if data.partition is PartitionKind.IID:
        parts = iid_partition(len(split.train), data.num_clients, seed=seed)
    else:
        parts = dirichlet_partition(
            labels_of(split.train), data.num_clients, alpha=data.alpha, seed=seed, min_size=data.min_client_size
        )
    names = list(data.client_names or [f"client-{i}" for i in range(data.num_clients)])
    return dict(zip(names, subsets(split.train, parts), strict=True))


def run(
    config: RunConfig,
    out_dir: str | os.PathLike[str] | None,
    *,
    resume: bool = False,
    progress: bool = True,
    record: bool = False,
    config_text: str | None = None,
) -> RunResult:
    """Builds the dataset, clients and model a config describes, and runs the federation.

    Args:
        config: the run description.
        out_dir: run directory (ledger, history, checkpoints, summary.json).
        resume: continue an interrupted run in ``out_dir``.
        progress: show a progress bar.
        record: record what the server observes into ``out_dir/observed`` (see :mod:`privfl.recording`).
        config_text: ``config`` as TOML, kept in ``out_dir`` as ``config.toml`` (what ``privfl run
            --resume`` without a config reads back).

    Returns:
        The federation's result.

    Raises:
        ConfigError, LedgerError, RunLockedError: ``out_dir`` cannot take this run (see
            :func:`privfl.rundir.check_run_directory`); raised before the dataset is loaded.
    """
    if out_dir is not None:
        # A refusal for the directory must not wait for data loading and noise calibration.
        check_run_directory(out_dir, resume=resume)
        saved = Path(out_dir) / CONFIG_FILE
        if resume and saved.is_file():
            started = load_config(saved).federation.rounds
            if started != config.federation.rounds:
                # The one setting a resume may change (the run's identity leaves it out); the noise of the
                # rounds left is recalibrated (Federation._replan_remaining). Said, so that it is never a surprise.
                log.warning(
                    "resuming with federation.rounds = %d; the run in %s was started with %d: each site's noise for "
                    "the rounds left is calibrated to what its budget has left",
                    config.federation.rounds, out_dir, started,
                )
    from privfl.federation import Federation
    from privfl.models import build_model

    split = load_dataset(config)
    clients = split_clients(config, split)
    input_shape = split.train.input_shape
    num_classes = split.train.num_classes

    def model_fn():
        return build_model(config.model, input_shape, num_classes)

    federation = Federation(
        model_fn=model_fn,
        clients=clients,
        test_set=split.test,
        training=config.training,
        federation=config.federation,
        progress=progress,
        record=record,
    )
    return federation.run(out_dir, resume=resume, config_text=config_text)
