"""Human-readable reports of a finished run."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from privfl.federation import RunResult

__all__ = ["print_run_report"]


def print_run_report(result: RunResult, *, console: Console) -> None:
    """Prints accuracy, each client's privacy spending, and the upload cost."""
    s = result.summary
    acc = s["final_accuracy"]
    console.print(
        f"\n[bold]final test accuracy[/bold] {acc:.4f}" if acc is not None else "\n[bold]final test accuracy[/bold] -",
        f" after {s['rounds']} rounds, protection [bold]{s['protection']}[/bold], accountant {s['accountant']}",
    )
    # No vertical rules, so the table fits an 80-column terminal or log without truncation.
    table = Table(
        title="privacy ledger (sample-level DP per client)", padding=(0, 1), pad_edge=False, collapse_padding=True, box=box.SIMPLE_HEAD
    )
    names = list(s["clients"])
    table.add_column("client", no_wrap=True, min_width=max([6, *map(len, names)]))
    for col in ("n", "sigma", "epsilon", "budget", "delta", "trained", "skipped", "dropped"):
        table.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    for name, c in s["clients"].items():
        budget = "-" if c["epsilon_budget"] is None else f"{c['epsilon_budget']:.2f}"
        table.add_row(
            name,
            str(c["num_examples"]),
            f"{c['noise_multiplier']:.3f}",
            f"{c['epsilon']:.3f}",
            budget,
            f"{c['delta']:.0e}",
            str(c["rounds_trained"]),
            str(c["rounds_skipped"]),
            str(c["rounds_dropped"]),
        )
    console.print(table)
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
        if s["protection"] == "ckks" and s["upload_expansion_over_float32"] > 8:
            console.print(
                "  (a CKKS ciphertext packs N/2 values, so a model this small still pays for a whole "
                "ciphertext; the expansion falls to about 7.5x for models of 100k+ parameters)"
            )
    if s["dropped_clients"]:
        console.print(f"[yellow]dropped updates[/yellow]: {s['dropped_clients']}")
    if result.out_dir is not None:
        console.print(f"wrote {result.out_dir}/summary.json, ledger.jsonl (key: ledger.key), history.json, checkpoints/")
