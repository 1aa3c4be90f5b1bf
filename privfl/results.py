"""The shapes of a run's results: one round's record, one site's summary, the run summary.

They are what ``history.json`` and ``summary.json`` hold, and what `privfl.Federation.run` and
`privfl.aggregator.Aggregator.run` return, as plain JSON-ready dicts typed with ``TypedDict``: a
reader (the CLI, the audit, a user's pipeline) gets its keys and value types checked by mypy, and
the files stay exactly as they were. Keys only one producer writes are optional
(``total=False`` parts): the in-process run writes ``client_level`` and ``ledger``, a deployment
writes ``step_seconds`` and each site's ``epsilon_source``.
"""

from __future__ import annotations

from typing import Any, TypedDict

__all__ = ["RESUMED_ROUND", "SHOWN_ONE_BY_ONE", "LedgerPosition", "RoundRecord", "RunSummary", "SiteSummary", "run_summary"]

RESUMED_ROUND = "the resume ran that round again, with a new sample of sites unless noise_seed is set"
"""What became of a round interrupted after its charges (the reports' wording: who trained the rerun is drawn again)."""

SHOWN_ONE_BY_ONE = 12
"""Up to this many sites, a report for people (the end-of-run table, audit.md, audit.png) gives each
site its own row, column or line and lists every finding; past it (a federation of many sites) it
shows the sites that spent most and the spread over all of them. The files (summary.json,
audit.json) always hold every site."""


class LedgerPosition(TypedDict):
    """Where the privacy ledger stood: its line count and head hash (resume and the audit check them)."""

    lines: int
    head: str


class _RoundRecordRequired(TypedDict):
    round: int
    sampled: list[str]
    trained: list[str]
    contributors: list[str]
    skipped: dict[str, str]
    dropped: dict[str, str]
    aborted: str | None
    train_loss: float | None
    test_loss: float | None
    test_accuracy: float | None
    epsilon: dict[str, float | None]
    max_epsilon: float | None
    upload_bytes: dict[str, int]
    seconds: float


class RoundRecord(_RoundRecordRequired, total=False):
    """One round, as ``history.json`` holds it.

    Keys: ``round``; ``sampled`` / ``trained`` / ``contributors`` (site names); ``skipped`` and
    ``dropped`` (site -> reason); ``aborted`` (the reason, or None); losses and accuracy (None when
    not finite or not measured); ``epsilon`` (each site's spent epsilon) and ``max_epsilon``;
    ``upload_bytes`` per site; ``seconds``. In-process runs add ``client_level`` (client-level DP
    of the round, or None) and ``ledger`` (a `LedgerPosition`, or None without a run directory);
    deployments add ``step_seconds`` (wall seconds of each exchange with the sites) and, under
    client-level DP, ``client_level``.
    """

    client_level: dict[str, Any] | None
    ledger: LedgerPosition | None
    step_seconds: dict[str, float]


class _SiteSummaryRequired(TypedDict):
    epsilon: float | None
    epsilon_budget: float | None
    rounds_trained: int
    rounds_skipped: int
    rounds_dropped: int


class SiteSummary(_SiteSummaryRequired, total=False):
    """One site in ``summary.json``'s ``clients``.

    Both producers write epsilon (spent), its budget and the round counts. The in-process run adds
    its plan and ledger view (``delta``, ``rounds_interrupted``, ``num_examples``, the noise
    multipliers, ``sample_rate``, ``steps_per_round``); a deployment adds ``epsilon_source`` (the
    site reported it from its own ledger) and ``role``.
    """

    delta: float
    rounds_interrupted: int
    num_examples: int
    noise_multiplier: float | None
    noise_multipliers_used: list[float]
    planned_noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    epsilon_source: str
    role: str


class _RunSummaryRequired(TypedDict):
    final_accuracy: float | None
    final_loss: float | None
    rounds: int
    protection: str
    accountant: str
    clients: dict[str, SiteSummary]
    dropped_clients: dict[str, dict[str, str]]
    aborted_rounds: list[int]
    num_parameters: int
    upload_bytes_per_client_round: float | None
    plaintext_bytes_per_client_round: int
    upload_expansion_over_float32: float | None
    device: str
    seconds: float
    client_sampling_secret: bool
    training: dict[str, Any]
    federation: dict[str, Any]


class RunSummary(_RunSummaryRequired, total=False):
    """``summary.json``: the run's outcome, per-site spending and settings.

    Both write ``client_level`` (None without client-level DP). The in-process run adds ``noise``,
    ``client_sampling`` and ``ledger`` (file, lines, head, authenticated); a deployment adds
    ``deployment`` (run id, sites, where the ledgers are, and for ``privfl deploy local`` the mode,
    TLS, Flower's log and the wall time).
    """

    client_level: dict[str, Any] | None
    noise: str
    client_sampling: str
    ledger: dict[str, Any] | None
    deployment: dict[str, Any]


def run_summary(
    history: list[RoundRecord],
    *,
    protection: str,
    accountant: str,
    clients: dict[str, SiteSummary],
    client_level: dict[str, Any] | None,
    num_parameters: int,
    uploads: list[int],
    device: str,
    seconds: float,
    client_sampling_secret: bool,
    training: dict[str, Any],
    federation: dict[str, Any],
) -> RunSummary:
    """The fields of ``summary.json`` that the in-process run and a deployment both write, computed
    one way from the history and the run's facts (each producer then adds its own keys).

    ``uploads``: every upload's size in bytes (a site's protocol messages in one round).
    """
    final = history[-1] if history else None
    upload_mean = sum(uploads) / len(uploads) if uploads else None
    plaintext_bytes = 4 * num_parameters
    return {
        "final_accuracy": None if final is None else final.get("test_accuracy"),
        "final_loss": None if final is None else final.get("test_loss"),
        "client_level": client_level,
        "rounds": len(history),
        "protection": protection,
        "accountant": accountant,
        "clients": clients,
        "dropped_clients": {str(h["round"]): h["dropped"] for h in history if h["dropped"]},
        "aborted_rounds": [h["round"] for h in history if h["aborted"]],
        "num_parameters": num_parameters,
        "upload_bytes_per_client_round": upload_mean,
        "plaintext_bytes_per_client_round": plaintext_bytes,
        "upload_expansion_over_float32": None if upload_mean is None else upload_mean / plaintext_bytes,
        "device": device,
        "seconds": seconds,
        "client_sampling_secret": client_sampling_secret,
        "training": training,
        "federation": federation,
    }
