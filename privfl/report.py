"""Human-readable reports of a finished run."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from privfl.federation import RunResult
from privfl.results import RESUMED_ROUND, SHOWN_ONE_BY_ONE, SiteSummary

__all__ = ["interrupted_trainings", "print_run_report"]


def interrupted_trainings(result: RunResult) -> dict[str, int]:
    """Client -> trainings charged in interrupted attempts at a round (redone after a resume)."""
    return result.ledger.interrupted_trainings()


def print_run_report(result: RunResult, *, console: Console) -> None:
    """Prints accuracy, each client's privacy spending, and the upload cost."""
    s = result.summary
    acc = s["final_accuracy"]
    console.print(
        f"\n[bold]final test accuracy[/bold] {acc:.4f}" if acc is not None else "\n[bold]final test accuracy[/bold] -",
        f"after {s['rounds']} rounds, protection [bold]{s['protection']}[/bold], accountant {s['accountant']}",
    )
    # No vertical rules, so the table fits an 80-column terminal or log without truncation.
    table = Table(
        title="privacy ledger (sample-level DP per client)", padding=(0, 1), pad_edge=False, collapse_padding=True, box=box.SIMPLE_HEAD
    )
    names = list(s["clients"])
    interrupted = interrupted_trainings(result)
    columns = ["n", "sigma", "epsilon", "budget", "delta", "trained", "skipped", "dropped"]
    if any(interrupted.values()):
        # A round killed after charging and run again on resume: its first charges stay in "trained".
        columns.insert(6, "of which interrupted")
    table.add_column("client", no_wrap=True, min_width=max([6, *map(len, names)]))
    for col in columns:
        table.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    shown = list(s["clients"].items())
    if len(shown) > SHOWN_ONE_BY_ONE:  # a federation of many sites: those that spent most, then the spread
        shown = sorted(shown, key=lambda item: -_spent(item[1]))[:SHOWN_ONE_BY_ONE]
        table.title = f"privacy ledger (sample-level DP): the {SHOWN_ONE_BY_ONE} of {len(names)} clients that spent most"
    for name, c in shown:
        budget = "-" if c["epsilon_budget"] is None else f"{c['epsilon_budget']:.2f}"
        cells = [
            str(c["num_examples"]),
            f"{c['noise_multiplier']:.3f}" if c["noise_multiplier"] is not None else "-",
            f"{_spent(c):.3f}",
            budget,
            f"{c['delta']:.0e}",
            str(c["rounds_trained"]),
            str(c["rounds_skipped"]),
            str(c["rounds_dropped"]),
        ]
        if any(interrupted.values()):
            cells.insert(6, str(interrupted.get(name, 0)))
        table.add_row(name, *cells)
    console.print(table)
    if len(names) > SHOWN_ONE_BY_ONE:
        spent = sorted(_spent(c) for c in s["clients"].values())
        trained = sum(c["rounds_trained"] for c in s["clients"].values())
        console.print(
            f"all {len(names)} clients: epsilon min {spent[0]:.3f}, median {statistics.median(spent):.3f}, max {spent[-1]:.3f}; "
            f"{trained} trainings, {sum(1 for c in s['clients'].values() if c['rounds_trained'] == 0)} clients never trained "
            "(every client: summary.json, or privfl audit)"
        )
    if any(interrupted.values()):
        console.print(
            "trained counts every charged training, including interrupted attempts at a round (the run was stopped "
            f"after charging them; {RESUMED_ROUND}): their charges stay in the ledger."
        )
    level = s.get("client_level")
    if level:
        eps = "inf" if level["epsilon"] is None else f"{level['epsilon']:.3f}"
        console.print(
            f"client-level DP (a whole site's participation): epsilon {eps} at delta {level['delta']:g}, "
            f"noise {level['noise']}"
        )
    else:
        console.print("client-level DP: none (a whole site's participation is not protected; see docs/client-dp.md)")
    if "noise" in s:
        console.print(f"DP noise: {s['noise']}")
    up = s["upload_bytes_per_client_round"]
    if up is not None:
        console.print(
            f"upload per client per round: {up:,.0f} bytes "
            f"({s['upload_expansion_over_float32']:.2f}x the {s['plaintext_bytes_per_client_round']:,} bytes "
            f"of a float32 update of {s['num_parameters']:,} parameters)"
        )
        expansion = s["upload_expansion_over_float32"]
        if s["protection"] == "ckks" and expansion is not None and expansion > 8:
            console.print(
                "  (a CKKS ciphertext packs N/2 values, so a model this small still pays for a whole "
                "ciphertext; the expansion falls to about 7.5x for models of 100k+ parameters)"
            )
        if s["protection"] == "shared_key" and expansion is not None and expansion > 2.1:
            console.print(
                "  (a shared-key ciphertext carries N values per polynomial, so a model this small still pays for a "
                "whole polynomial; the expansion falls to about 2x (two primes) or 1x (one) for models of 100k+ parameters)"
            )
    if s["dropped_clients"]:
        dropped = s["dropped_clients"]
        count = sum(len(sites) for sites in dropped.values())
        if count <= SHOWN_ONE_BY_ONE:
            console.print(f"[yellow]dropped updates[/yellow]: {dropped}")
        else:
            console.print(f"[yellow]dropped updates[/yellow]: {count} in {len(dropped)} rounds (each with its reason: summary.json, dropped_clients)")
    if result.out_dir is not None:
        console.print(f"wrote {result.out_dir}/: {', '.join(_run_files(result.out_dir))}")


def _spent(site: SiteSummary) -> float:
    """A site's epsilon (summary.json writes an infinite one as null)."""
    return math.inf if site["epsilon"] is None else site["epsilon"]


def _run_files(out: Path) -> list[str]:
    """What the run directory holds (docs/getting-started.md), so the user knows what to keep.

    Listed as found: config.toml and observed/ are there only for some runs.
    """
    from privfl.recording import OBSERVED_DIR

    files = ["summary.json", "ledger.jsonl", "history.json", "run.json", "config.toml", "model.json"]
    found = [name for name in files if (out / name).is_file()]
    found += [f"{name}/" for name in ("checkpoints", OBSERVED_DIR) if (out / name).is_dir()]
    return [f"{name} (key: ledger.key, keep it private)" if name == "ledger.jsonl" else name for name in found]
