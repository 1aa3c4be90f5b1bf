"""The attack matrix's outputs: the markdown table, the reconstruction grids (PNG) and the terminal summary.

Plots use matplotlib's object API (a ``Figure`` on its own Agg canvas), never pyplot's global state or
``matplotlib.use``: rendering the matrix changes nothing for a caller that plots too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .cells import NO_ACCESS, NOT_ABOVE_CHANCE, PARTIAL, RECOVERED, AttackRow, GridCell
from .config import AttackKind

if TYPE_CHECKING:
    from rich.console import Console

    from .run import AttackMatrixResult

__all__ = ["grid_images", "grid_rows", "markdown_table", "print_attack_summary"]




def _num(value: float, digits: int = 2) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _sci(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.1e}"


def _eps(row: AttackRow) -> str:
    return "inf" if math.isinf(row.epsilon) else f"{row.epsilon:.3g}"


def markdown_table(rows: tuple[AttackRow, ...]) -> str:
    header = (
        "| dataset | attack | server sees | ε | recovered / inputs | PSNR dB | chance dB | best-match dB "
        "| best chance dB | SSIM | MSE | max abs err | label acc | chance label acc | verdict | s |"
    )
    lines = [header, "|" + "---|" * 16]
    for r in rows:
        batch = r.num_inputs > 1
        psnr = "no access" if r.verdict == NO_ACCESS else _num(r.psnr)
        got = "—" if math.isnan(r.inputs_recovered) else f"{round(r.inputs_recovered, 1):g}"
        lines.append(
            f"| {r.dataset} | {r.attack} | {r.setting} | {_eps(r)} | {got} / {r.num_inputs} | {psnr} "
            f"| {_num(r.chance_psnr)} "
            f"| {_num(r.best_psnr) if batch else '—'} | {_num(r.best_chance_psnr) if batch else '—'} "
            f"| {_num(r.ssim, 3)} | {_sci(r.mse)} | {_sci(r.max_abs_error)} | {_num(r.label_accuracy)} "
            f"| {_num(r.chance_label_accuracy)} | {r.verdict} | {r.seconds:.1f} |"
        )
    return "\n".join(lines) + "\n"


def grid_images(
    path: Path, shown: dict[tuple[str, str], GridCell], settings: list[str], attacks: list[str]
) -> None:
    """For each setting a row: the original inputs, then each attack's matched reconstructions."""
    per = max(min(4, s.originals.shape[0]) for s in shown.values())  # inputs shown per group
    groups = ["original", *attacks]
    cols = len(groups) * per + (len(groups) - 1)  # one blank column between groups
    fig = Figure(figsize=(0.62 * cols + 1.6, 0.7 * len(settings) + 0.6))
    axes = fig.subplots(len(settings), cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for r, setting in enumerate(settings):
        originals = next(s.originals for (st, _), s in shown.items() if st == setting)
        axes[r][0].text(-0.15, 0.5, setting, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8)
        for g, group in enumerate(groups):
            if group == "original":
                images: torch.Tensor | None = originals
            else:
                cell = shown.get((setting, group))
                if cell is None:
                    continue
                images = cell.reconstructions
            for i in range(min(per, originals.shape[0])):
                ax = axes[r][g * (per + 1) + i]
                if r == 0 and i == 0:
                    ax.set_title(group, fontsize=8, loc="left")
                if images is None:
                    ax.text(0.5, 0.5, "no\naccess", ha="center", va="center", fontsize=6, color="0.4")
                    continue
                # nearest: an 8x8 image blown up by interpolation would show detail that is not there.
                ax.imshow(images[i, 0].clamp(0, 1).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    fig.suptitle("originals (first inputs) and matched reconstructions; dark = ink", fontsize=9)
    _save(fig, path)


def grid_rows(
    path: Path, shown: dict[tuple[str, str], GridCell], settings: list[str], attacks: list[str]
) -> None:
    """A heatmap of the first victim row: original and each attack's reconstruction, per setting."""
    labels: list[str] = []
    values: list[np.ndarray] = []
    for setting in settings:
        originals = next(s.originals for (st, _), s in shown.items() if st == setting)
        labels.append(f"{setting} · original")
        values.append(originals[0].numpy())
        for attack in attacks:
            cell = shown.get((setting, attack))
            if cell is None:
                continue
            labels.append(f"{setting} · {attack}")
            rec = cell.reconstructions
            values.append(np.full(originals.shape[1:], np.nan) if rec is None else rec[0].numpy())
    table = np.stack(values)
    fig = Figure(figsize=(9, 0.22 * len(labels) + 1.4))
    ax = fig.subplots()
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.85")  # grey: no access
    # Standardized features: +-3 covers nearly all rows; larger errors saturate instead of hiding the rest.
    image = ax.imshow(np.ma.masked_invalid(table), aspect="auto", cmap=cmap, vmin=-3, vmax=3, interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("feature (standardized)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    for y, label in enumerate(labels):
        if label.endswith("original") and y:
            ax.axhline(y - 0.5, color="black", linewidth=0.8)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    ax.set_title("first victim row: original vs reconstructions (grey = no access)", fontsize=9)
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    # An Agg canvas of this figure only: no pyplot, no global backend, nothing left open in the process.
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def print_attack_summary(result: AttackMatrixResult, *, console: Console) -> None:
    """Prints a compact table of the matrix (fits 80 columns) and where the files went.

    Args:
        result: what :func:`run_attack_matrix` returned.
        console: a ``rich.console.Console``.
    """
    from rich import box
    from rich.console import JustifyMethod
    from rich.table import Table

    colours = {RECOVERED: "red", PARTIAL: "yellow", NOT_ABOVE_CHANCE: "green", NO_ACCESS: "cyan"}
    # One table per dataset, no vertical rules: the summary fits an 80-column terminal or log.
    for dataset in dict.fromkeys(r.dataset for r in result.rows):
        table = Table(title=dataset, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, collapse_padding=True)
        columns: tuple[tuple[str, JustifyMethod], ...] = (
            ("attack", "left"), ("server sees", "left"), ("ε", "right"), ("PSNR dB", "right"),
            ("chance", "right"), ("labels", "right"), ("verdict", "left"),
        )
        for name, justify in columns:
            table.add_column(name, justify=justify, no_wrap=True, min_width=len(name))
        for r in (r for r in result.rows if r.dataset == dataset):
            quality = r.attack != AttackKind.LABELS.value and r.verdict != NO_ACCESS
            colour = colours.get(r.verdict, "white")
            table.add_row(r.attack, r.setting, _eps(r), _num(r.psnr, 1) if quality else "—",
                          _num(r.chance_psnr, 1) if quality else "—", _num(r.label_accuracy),
                          f"[{colour}]{r.verdict}[/]")
        console.print(table)
    console.print(f"{len(result.rows)} cells in {result.seconds:.0f} s; wrote "
                  + ", ".join(str(p) for p in result.files))
    if result.overwrote:
        console.print(f"[yellow]replaced earlier results in {result.out_dir}[/]")
