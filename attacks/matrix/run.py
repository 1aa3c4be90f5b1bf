"""``run_attack_matrix``: every attack against every server view, scored against chance, written to a directory.

Threat model: an honest-but-curious server holds one round's global model and whatever the protection lets
it see of a client's update (a :class:`~privfl.attacks.ServerView`: a plaintext gradient, a DP-SGD
gradient, the decrypted average of ``k`` clients, a CKKS ciphertext, or a FedAvg update). The victim inputs
are drawn from a dataset's test split; the client side is simulated by
:func:`privfl.attacks.evaluate.build_observation`, the one place that touches client data, and each attack
sees only the returned observation. A DP-SGD observation is one step of the training sites run,
:func:`privfl.training.train_dp_sgd`. Models are small and untrained (seeded initialisation, made DP-SGD
compatible as a site makes them), the setting in which gradient inversion is strongest.

Each row states the epsilon the privacy ledger would charge for the setting. For DP-SGD that is the
sample-level epsilon of the one released step, ``epsilon(noise_multiplier=sigma, sample_rate=q, steps=1,
delta)`` with ``q = batch_size / client_examples``: one Poisson-sampled DP-SGD step of a client holding
``client_examples`` examples. Plaintext, aggregate and FedAvg rows are not differentially private
(epsilon infinite); ciphertext rows are infinite too, but the server has no access to read.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from privfl.errors import ConfigError

from .cells import NO_ACCESS, NOT_ABOVE_CHANCE, PARTIAL, RECOVERED, AttackRow, GridCell, count_cells, run_cells
from .config import AttackMatrixConfig
from .render import grid_images, grid_rows, markdown_table

__all__ = ["AttackMatrixInterrupted", "AttackMatrixResult", "run_attack_matrix"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class AttackMatrixResult:
    """What :func:`run_attack_matrix` produced.

    Attributes:
        config: the config that ran.
        rows: one row per cell, in matrix order.
        out_dir: where the files were written.
        files: the files written (results.json, results.md, grid-<dataset>.png).
        seconds: wall-clock time of the whole matrix.
        overwrote: ``True`` when ``out_dir`` already held results, which were replaced.
        cells_planned: the cells the config asks for; ``len(rows)`` is smaller when interrupted.
    """

    config: AttackMatrixConfig
    rows: tuple[AttackRow, ...]
    out_dir: Path
    files: tuple[Path, ...]
    seconds: float
    overwrote: bool
    cells_planned: int = 0

    @property
    def complete(self) -> bool:
        """Whether every planned cell ran (False after an interrupt)."""
        return len(self.rows) >= self.cells_planned


class AttackMatrixInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_attack_matrix`, raised after the finished cells were written.

    A ``KeyboardInterrupt``, so code that stops on Ctrl-C still stops; it carries what was kept.

    Attributes:
        result: the finished cells and the files written, or ``None`` when no cell had finished
            (then nothing was written and earlier results in the directory are untouched).
        cells_planned: the cells the config asks for.
    """

    def __init__(self, result: AttackMatrixResult | None, cells_planned: int) -> None:
        self.result = result
        self.cells_planned = cells_planned
        done = 0 if result is None else len(result.rows)
        super().__init__(f"interrupted after {done} of {cells_planned} cells")


class _Bar:
    """A rich progress bar over the matrix cells (silent when disabled)."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self._progress: Any = None
        self._task: Any = None
        self.total = total
        self.enabled = enabled

    def __enter__(self) -> _Bar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]attacks"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[cell]}"), console=Console(stderr=True), transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("attacks", total=self.total, cell="loading data")
        return self

    def show(self, cell: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, cell=cell)

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def run_attack_matrix(
    config: AttackMatrixConfig, out_dir: str | os.PathLike[str], *, progress: bool = True
) -> AttackMatrixResult:
    """Runs every configured attack against every configured protection and writes the report.

    Writes ``results.json`` (config, rows, timings), ``results.md`` (the table) and one
    ``grid-<dataset>.png`` per dataset into ``out_dir``. Results already there are overwritten (nothing
    is spent by an attack run), and a warning says so. On Ctrl-C the cells that finished are
    written (``results.json`` says ``"complete": false`` and how many of the planned cells ran,
    ``results.md`` says so first) and :class:`AttackMatrixInterrupted` is raised.

    Args:
        config: the matrix.
        out_dir: output directory, created if missing.
        progress: show a progress bar over the cells on stderr.

    Returns:
        The rows and the files written.

    Raises:
        ConfigError: ``out_dir`` is a file, or an aggregate asks for more victims than a test split holds.
        AttackMatrixInterrupted: Ctrl-C; the finished cells were written first.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("out", str(out), "exists and is not a directory")
    overwrote = (out / "results.json").exists()
    if overwrote:
        logger.warning("%s already holds attack results; overwriting them", out)
    out.mkdir(parents=True, exist_ok=True)

    previous_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run_and_write(config, out, overwrote=overwrote, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run_and_write(config: AttackMatrixConfig, out: Path, *, overwrote: bool, progress: bool) -> AttackMatrixResult:
    started = time.perf_counter()
    rows: list[AttackRow] = []
    shown: dict[str, dict[tuple[str, str], GridCell]] = {}
    per_dataset: dict[str, float] = {}
    build: dict[str, float] = {}
    planned = count_cells(config)
    interrupted = False
    with _Bar(planned, enabled=progress) as bar:
        last = time.perf_counter()
        try:
            for dataset, row, cell, build_seconds in run_cells(config, bar):
                rows.append(row)
                if cell is not None:
                    shown.setdefault(dataset, {})[(row.setting, row.attack)] = cell
                now = time.perf_counter()
                per_dataset[dataset] = per_dataset.get(dataset, 0.0) + now - last
                build[dataset] = build.get(dataset, 0.0) + build_seconds
                last = now
        except KeyboardInterrupt:
            # A full matrix takes minutes to hours: the cells that finished are kept and written
            # below, marked incomplete; the interrupt is raised again once they are on disk.
            interrupted = True
    if interrupted and not rows:
        raise AttackMatrixInterrupted(None, planned)
    seconds = time.perf_counter() - started

    files = [out / "results.json", out / "results.md"]
    for dataset, cells in shown.items():
        settings = list(dict.fromkeys(r.setting for r in rows if r.dataset == dataset))
        attacks = list(dict.fromkeys(a for (_, a) in cells))
        path = out / f"grid-{dataset}.png"
        is_image = next(iter(cells.values())).originals.ndim == 4
        (grid_images if is_image else grid_rows)(path, cells, settings, attacks)
        files.append(path)

    result = AttackMatrixResult(config=config, rows=tuple(rows), out_dir=out, files=tuple(files), seconds=seconds,
                                overwrote=overwrote, cells_planned=planned)
    payload = {
        "config": config.to_json(),
        "complete": not interrupted,
        "cells": {"finished": len(rows), "planned": planned},
        "rows": [r.to_json() for r in rows],
        "timings": {
            "total_s": seconds,
            # The first dataset's time includes loading data and building models.
            "per_dataset_s": per_dataset,
            "observation_build_s": build,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "verdicts": {
            RECOVERED: f"PSNR > chance + {config.margin_db:g} dB, or every feature within {config.exact_tolerance:g}; "
            "labels: all recovered, above the majority-class guess",
            PARTIAL: "the mean is not above chance, but at least one input (in some trial) is: inputs_recovered > 0 "
            "(labels: above the majority-class guess, not all right)",
            NOT_ABOVE_CHANCE: "no better than guessing the dataset mean (labels: the majority class)",
            NO_ACCESS: "the server holds only ciphertext",
        },
        "epsilon": "null means not differentially private (infinite epsilon); see each row's privacy field",
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    status = (
        f"**Interrupted: {len(rows)} of {planned} cells finished; the others did not run.**\n\n" if interrupted else ""
    )
    (out / "results.md").write_text(
        f"{status}Attack matrix ({seconds:.0f} s). ε: sample-level epsilon of one DP-SGD step at q = "
        f"{config.batch_size}/{config.client_examples}, delta = {config.delta:g}; inf = not DP.\n\n"
        + markdown_table(result.rows)
    )
    if interrupted:
        raise AttackMatrixInterrupted(result, planned)
    return result
