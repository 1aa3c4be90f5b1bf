"""Privacy audit of a finished run directory: epsilon recomputed from the ledger, budgets, warnings, and a plot.

:func:`audit_run` verifies ``ledger.jsonl`` (hash chain, MACs, agreement with ``history.json``), reads
``summary.json`` and ``history.json``, and re-derives every
client's sample-level epsilon from the ledger's DP-SGD events, round by round, with the ledger's
accountant; it recomputes the final figure with the other accountant (PRV against RDP) as a cross-check,
and states the run's client-level epsilon (infinite without client-level DP). The figures the run
wrote are compared with the recomputed ones. What the audit cannot check: that the training code
did what the ledger records (clipping, noise, sampling; see the empirical audits), a consistent
rollback of the whole directory, a ledger re-signed by whoever can read ``ledger.key``, and the
client sizes, which it takes from ``summary.json``.

Sample-level epsilon bounds what the released updates reveal about one record of a client's data;
client-level epsilon bounds what they reveal about whether a whole client took part.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import warnings as _warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from privfl.accounting import Accountant, DPEvent, LedgerKey, LedgerStatus, PrivacyLedger, epsilon_of_events
from privfl.audit.rules import (
    SEVERITY_ORDER,
    ClientFacts,
    Facts,
    Finding,
    Hit,
    Severity,
    Tool,
    apply_rules,
    audit_code,
    codes,
    register,
)
from privfl.errors import ConfigError, LedgerError
from privfl.results import RESUMED_ROUND, SHOWN_ONE_BY_ONE
from privfl.rundir import (
    HISTORY_FILE,
    LEDGER_FILE,
    LEDGER_KEY_FILE,
    LEGACY_LEDGER_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    check_ledger_against_history,
    directory_kind,
    durable_write_bytes,
    filesystem_error,
    load_history,
    load_run_identity,
)

__all__ = [
    "AUDIT_CODES", "AuditPaths", "AuditReport", "ClientAudit", "ClientLevelAudit", "LedgerIntegrity", "RunFacts",
    "audit_run",
]  # fmt: skip

_SHOWN_OF_MANY = 3  # findings of one code given in full past SHOWN_ONE_BY_ONE
_FIELDS_NAMED = 10  # fields named of the others

FORMAT_VERSION = 3
"""3: ``findings`` (was ``warnings``) with ``counts``; per-client ``rounds_interrupted``; ``interrupted``;
client-level ``epsilon_against_server``, ``sampling`` and ``description``; ``epsilon_enforced``."""
CROSS_CHECK_TOLERANCE = 0.01
"""PRV may exceed RDP by at most this fraction before the two are reported as disagreeing."""
RECORDED_TOLERANCE = 0.01
"""A recorded epsilon may differ from the recomputed one by at most this fraction."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientAudit:
    """One client's sample-level privacy, recomputed from the ledger.

    Attributes:
        client: the client's name.
        num_examples: its training-set size (None if the summary does not say).
        delta: the delta its guarantee is stated at.
        epsilon_budget: its cap (``math.inf`` when uncapped).
        epsilon: epsilon spent over the run, recomputed with the ledger's accountant.
        epsilon_cross_check: the same events composed with the other accountant.
        epsilon_enforced: the same events composed with the accountant the ledger enforced the
            budget with (equal to ``epsilon`` unless another accountant was requested); budgets and
            recorded figures are compared with this one, like with like.
        epsilon_by_round: epsilon spent after each round (one value per round of the run).
        noise_multipliers: the distinct noise multipliers it trained with.
        sample_rates: the distinct sampling rates it trained with.
        steps: DP-SGD steps taken in all.
        rounds_trained: trainings it was charged for, interrupted attempts included.
        rounds_interrupted: of those, trainings in an interrupted attempt at a round (the run was
            stopped after charging them; the resume ran that round again, with a new sample of sites
            unless ``noise_seed`` is set).
        rounds_skipped: rounds it was sampled in but skipped because of its budget.
        rounds_dropped: rounds its update was charged but not aggregated.
    """

    client: str
    num_examples: int | None
    delta: float
    epsilon_budget: float
    epsilon: float
    epsilon_cross_check: float
    epsilon_enforced: float
    epsilon_by_round: tuple[float, ...]
    noise_multipliers: tuple[float, ...]
    sample_rates: tuple[float, ...]
    steps: int
    rounds_trained: int
    rounds_interrupted: int
    rounds_skipped: int
    rounds_dropped: int

    @property
    def epsilon_remaining(self) -> float:
        """Budget left under the accountant that enforced it (``math.inf`` when uncapped, never negative)."""
        return max(self.epsilon_budget - self.epsilon_enforced, 0.0)


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientLevelAudit:
    """The federation's client-level privacy (a whole client's participation).

    Attributes:
        enabled: whether the run had client-level DP.
        epsilon: client-level epsilon (``math.inf`` without client-level DP).
        delta: client-level delta (None without client-level DP).
        noise_multiplier: z, the accounted noise multiplier of each round's release.
        sample_rate: the client sampling rate the accountant used.
        rounds: rounds composed.
        explanation: one paragraph saying what is and is not protected.
        sampling: ``"poisson"`` or ``"fixed"`` client sampling (None without client-level DP).
        description: the mechanism that ran, e.g. "z = 7.2 on the sum, 6 of 20 sites per round".
        epsilon_against_server: epsilon without amplification by client sampling (q = 1), the
            guarantee against anyone who sees who took part: the server, and readers of
            history.json (docs/client-dp.md, Limits). Equal to ``epsilon`` when q = 1.
    """

    enabled: bool
    epsilon: float
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    rounds: int
    explanation: str
    sampling: str | None = None
    description: str | None = None
    epsilon_against_server: float = math.inf


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditPaths:
    """The files :func:`audit_run` wrote."""

    markdown: Path
    json: Path
    plot: Path


@dataclass(frozen=True, kw_only=True, slots=True)
class LedgerIntegrity:
    """What the audit verified about the ledger file.

    Attributes:
        lines: lines in the journal, every one verified (hash chain; MAC when authenticated).
        head: SHA-256 of the last line. Keep a copy outside the run directory: a consistent
            rollback (the tail cut off, or an older copy restored) is detectable only against it.
        authenticated: whether every line carries a MAC under the run's ``ledger.key`` (it protects
            against edits by anyone who cannot read that file, not by anyone who can).
        interrupted_entries: entries of interrupted attempts at a round (charged, matched by no
            recorded round).
    """

    lines: int
    head: str
    authenticated: bool
    interrupted_entries: int


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditReport:
    """The result of :func:`audit_run`; it renders itself as Markdown (:meth:`to_markdown`) and JSON (:meth:`to_json`).

    Attributes:
        run_dir: the audited run directory.
        accountant: the accountant every figure is computed with (the ledger's, unless another was requested).
        cross_check_accountant: the other accountant.
        protection: how updates were protected (plaintext, ckks, secagg).
        rounds: rounds the run completed (of an unfinished run: also a round in progress that charged
            the ledger; :attr:`recorded_rounds` is what history.json holds).
        aborted_rounds: rounds whose aggregation aborted.
        clients: one entry per client, in ledger order.
        client_level: the client-level guarantee.
        findings: every finding, errors first (each says why and how to fix); :attr:`errors`,
            :attr:`warnings` and :attr:`notes` select one severity.
        paths: where audit.md, audit.json and audit.png were written.
        ledger: what was verified about the ledger file.
        interrupted: the run has no summary.json (stopped before finishing): the rounds recorded
            and the charges of the round in progress were audited, without resuming it.
        enforced_accountant: the accountant the ledger enforced budgets with (budgets and recorded
            figures are compared under it; default: ``accountant``).
        recorded_rounds: rounds recorded in history.json (None: as many as :attr:`rounds`).
    """

    run_dir: Path
    accountant: Accountant
    cross_check_accountant: Accountant
    protection: str
    rounds: int
    aborted_rounds: tuple[int, ...]
    clients: tuple[ClientAudit, ...]
    client_level: ClientLevelAudit
    findings: tuple[Finding, ...]
    paths: AuditPaths
    ledger: LedgerIntegrity
    interrupted: bool = False
    enforced_accountant: Accountant | None = None
    recorded_rounds: int | None = None

    @property
    def errors(self) -> tuple[Finding, ...]:
        """ERROR findings: the run must not be released under its stated guarantee (CLI exit 1)."""
        return tuple(f for f in self.findings if f.severity is Severity.ERROR)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        """WARNING findings only (not errors, not INFO notes)."""
        return tuple(f for f in self.findings if f.severity is Severity.WARNING)

    @property
    def notes(self) -> tuple[Finding, ...]:
        """INFO findings: facts worth knowing, nothing to fix."""
        return tuple(f for f in self.findings if f.severity is Severity.INFO)

    @property
    def markdown(self) -> str:
        """The report as Markdown: what ``audit.md`` holds (:meth:`to_markdown`)."""
        return self.to_markdown()

    def to_markdown(self) -> str:
        """The report as Markdown, also readable as plain text in a terminal: what ``audit.md`` holds."""
        accountant, cross, clients, client_level = self.accountant, self.cross_check_accountant, self.clients, self.client_level
        enforced = self.enforced_accountant or accountant
        findings, ledger, paths, aborted = self.findings, self.ledger, self.paths, self.aborted_rounds
        deltas = sorted({c.delta for c in clients})
        worst = max(clients, key=lambda c: c.epsilon) if clients else None
        requested = (
            f" (requested; the ledger enforced budgets with {enforced.value}, the cross-check)" if enforced is not accountant else ""
        )
        out = [
            f"# Privacy audit of {self.run_dir}",
            "",
            f"- protection: {self.protection}",
            f"- accountant: {accountant.value}" + (requested or f" (cross-check: {cross.value})"),
            f"- rounds: {self.rounds}" + (f" ({len(aborted)} aborted: {list(aborted)})" if aborted else "")
            + (
                f"; {self.recorded_rounds} recorded in history.json, the next one interrupted after its charges"
                if self.recorded_rounds is not None and self.recorded_rounds < self.rounds else ""
            ),
        ]
        if self.interrupted:
            out.append("- status: UNFINISHED (no summary.json): audited as it stands, without resuming")
        out += [
            f"- sample-level delta (one record of a client): {', '.join(f'{d:g}' for d in deltas) or '-'}",
            f"- ledger: {ledger.lines} lines verified ({'hash chain and MAC' if ledger.authenticated else 'hash chain only'}), "
            + ("consistent with history.json" if self.rounds else "no round recorded in history.json yet to compare it with")
            + f"; head {ledger.head}"
            + (f"; {ledger.interrupted_entries} entries of interrupted rounds (charged)" if ledger.interrupted_entries else ""),
        ]
        if worst is not None:
            out.append(f"- largest sample-level epsilon: {worst.epsilon:.3f} ({worst.client})")
        if client_level.enabled:
            against = (
                f"; against the server, which sees who took part: {_num(client_level.epsilon_against_server)}"
                if client_level.epsilon_against_server != client_level.epsilon
                else ""
            )
            out.append(
                f"- client-level epsilon (a whole client): {_num(client_level.epsilon)} at client-level delta {client_level.delta:g}{against}"
            )
            if client_level.description:
                out.append(f"- client-level mechanism: {client_level.description}")
        else:
            out.append(f"- client-level epsilon (a whole client): {_num(client_level.epsilon)}")
        counts = {s: sum(1 for f in findings if f.severity is s) for s in Severity}
        out.append(f"- findings: {counts[Severity.ERROR]} error(s), {counts[Severity.WARNING]} warning(s), {counts[Severity.INFO]} info")
        out += [
            "",
            "## Sample-level DP (each record in a client's data)",
            "",
            f"Epsilon is recomputed from the ledger's DP-SGD events with {accountant.value.upper()}; "
            f"`{cross.value}` is the same events composed with {cross.value.upper()}.",
            "",
        ]
        any_interrupted = any(c.rounds_interrupted for c in clients)
        header = ["client", "n", "sigma", "q", "steps", "epsilon", cross.value, "budget", "remaining", "sample delta", "trained"]
        header += ["interrupted"] * any_interrupted + ["skipped", "dropped"]
        rows = []
        for c in clients:
            rows.append(
                [
                    c.client,
                    "-" if c.num_examples is None else str(c.num_examples),
                    "/".join(f"{s:.3g}" for s in c.noise_multipliers) or "-",
                    "/".join(f"{q:.3g}" for q in c.sample_rates) or "-",
                    str(c.steps),
                    _num(c.epsilon),
                    _num(c.epsilon_cross_check),
                    "none" if math.isinf(c.epsilon_budget) else _num(c.epsilon_budget),
                    _num(c.epsilon_remaining),
                    f"{c.delta:g}",
                    str(c.rounds_trained),
                    *([str(c.rounds_interrupted)] if any_interrupted else []),
                    str(c.rounds_skipped),
                    str(c.rounds_dropped),
                ]
            )
        out.append(_table(header, rows, [False] + [True] * (len(header) - 1)))
        if any_interrupted:
            out += [
                "",
                "`trained` counts every charged training; `interrupted` of them were attempts at a round that was stopped "
                f"after the charge ({RESUMED_ROUND}: the same site need not have trained it again; the ledger's `resume` lines mark "
                "them). Their charges stay.",
            ]
        if enforced is not accountant:
            out += [
                "",
                f"`remaining` and every comparison with a budget or a recorded figure use {enforced.value.upper()}, the "
                "accountant the ledger enforced budgets with: like with like.",
            ]
        out += ["", "### Epsilon after each round", ""]
        out += epsilon_by_round_table(clients, self.rounds, who="client", where="`sample_level.<client>.epsilon_by_round` in audit.json")
        out += ["", "## Client-level DP (a whole client's participation)", "", client_level.explanation, ""]
        out += ["## What this audit checks, and what it cannot", "", *_SCOPE, ""]
        out += ["## Findings", ""]
        if not findings:
            out.append("No findings.")
        out += _findings_markdown(findings)
        out += ["", "## Files", "", f"- {paths.markdown.name}, {paths.json.name}, {paths.plot.name} in {paths.markdown.parent}", ""]
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        """The content of ``audit.json`` as a JSON-ready dict (JSON has no infinity: an infinite epsilon or budget is ``null``)."""

        def finite(value: float | None) -> float | None:
            return None if value is None or math.isinf(value) else value

        client_level, ledger, paths = self.client_level, self.ledger, self.paths
        return {
            "format_version": FORMAT_VERSION,
            "run_dir": str(self.run_dir),
            "protection": self.protection,
            "accountant": self.accountant.value,
            "cross_check_accountant": self.cross_check_accountant.value,
            "rounds": self.rounds,
            "recorded_rounds": self.rounds if self.recorded_rounds is None else self.recorded_rounds,
            "aborted_rounds": list(self.aborted_rounds),
            "interrupted": self.interrupted,
            "sample_level": {
                c.client: {
                    "num_examples": c.num_examples,
                    "delta": c.delta,
                    "epsilon": c.epsilon,
                    "epsilon_cross_check": c.epsilon_cross_check,
                    "epsilon_enforced": c.epsilon_enforced,
                    "epsilon_budget": finite(c.epsilon_budget),
                    "epsilon_remaining": finite(c.epsilon_remaining),
                    "epsilon_by_round": list(c.epsilon_by_round),
                    "noise_multipliers": list(c.noise_multipliers),
                    "sample_rates": list(c.sample_rates),
                    "steps": c.steps,
                    "rounds_trained": c.rounds_trained,
                    "rounds_interrupted": c.rounds_interrupted,
                    "rounds_skipped": c.rounds_skipped,
                    "rounds_dropped": c.rounds_dropped,
                }
                for c in self.clients
            },
            "client_level": {
                "enabled": client_level.enabled,
                "epsilon": finite(client_level.epsilon),
                "protected": math.isfinite(client_level.epsilon),
                "delta": client_level.delta,
                "noise_multiplier": client_level.noise_multiplier,
                "sample_rate": client_level.sample_rate,
                "rounds": client_level.rounds,
                "sampling": client_level.sampling,
                "description": client_level.description,
                "epsilon_against_server": finite(client_level.epsilon_against_server) if client_level.enabled else None,
                "explanation": client_level.explanation,
            },
            "findings": [f.to_json() for f in self.findings],
            "counts": {s.value: sum(1 for f in self.findings if f.severity is s) for s in Severity},
            "files": {"markdown": str(paths.markdown), "json": str(paths.json), "plot": str(paths.plot)},
            "ledger": {
                "lines": ledger.lines,
                "head": ledger.head,
                "authenticated": ledger.authenticated,
                "interrupted_entries": ledger.interrupted_entries,
            },
        }

    def to_json_text(self) -> str:
        """``audit.json`` as text: :meth:`to_json`, indented, with a final newline."""
        return json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"


# -- reading the run directory ----------------------------------------------------------------------
def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ConfigError("run_dir", str(path.parent), f"is not a complete privfl run directory: {path.name} is missing ({what})")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        # RecursionError: deeply nested brackets, which the json module does not bound.
        raise ConfigError(path.name, str(path), f"cannot be read as JSON ({type(exc).__name__})") from None


def _load_ledger(run_dir: Path) -> tuple[PrivacyLedger, str]:
    """The verified ledger, and the accountant name the file records.

    The hash chain and every line's MAC are checked under the run's ``ledger.key``. A ledger
    recorded with an accountant privfl does not compose with (e.g. ``"gdp"``) is composed with PRV
    so its events can still be recomputed; the caller warns about it.
    """
    path = run_dir / LEDGER_FILE
    if not path.is_file():
        if (run_dir / LEGACY_LEDGER_FILE).exists():
            raise LedgerError(
                str(run_dir / LEGACY_LEDGER_FILE),
                "is a format-1 ledger (not hash-chained); audit it with the privfl version that wrote it",
            )
        raise ConfigError("run_dir", str(run_dir), f"is not a complete privfl run directory: {LEDGER_FILE} is missing (the privacy ledger)")
    ledger = PrivacyLedger.load(path, key=LedgerKey.read(run_dir / LEDGER_KEY_FILE), accountant=Accountant.PRV)
    return ledger, ledger.recorded_accountant


def _check_summary_anchor(ledger: PrivacyLedger, summary: Mapping[str, Any], path: Path) -> None:
    """The summary records the ledger's last line when the run finished; the ledger must still have it."""
    anchor = summary.get("ledger")
    if not isinstance(anchor, Mapping):
        return
    lines, head = anchor.get("lines"), anchor.get("head")
    if isinstance(lines, int) and not isinstance(lines, bool) and lines >= 1 and isinstance(head, str):
        if ledger.line_hash(lines) != head:
            raise LedgerError(str(path), f"line {lines} is not the line summary.json recorded: the ledger was replaced or rewritten")


def _config_section(summary: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = summary.get(name)
    return value if isinstance(value, Mapping) else {}


def _client_dp_settings(summary: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The run's client-level DP settings, wherever the summary keeps them (None if it had none)."""
    for section in (_config_section(summary, "federation"), _config_section(summary, "training"), summary):
        value = section.get("client_dp")
        if isinstance(value, Mapping):
            return value
    return None


# -- computing ------------------------------------------------------------------------------------
def _epsilon(events: Sequence[DPEvent], delta: float, accountant: Accountant) -> float:
    with _warnings.catch_warnings():
        # Opacus warns when the best RDP order sits at the edge of its grid (huge epsilons).
        _warnings.simplefilter("ignore")
        return epsilon_of_events(events, delta=delta, accountant=accountant)


def _client_audits(
    ledger: PrivacyLedger,
    summary: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    *,
    accountant: Accountant,
    cross: Accountant,
    enforced: Accountant,
) -> tuple[tuple[ClientAudit, ...], int, dict[tuple[str, int], tuple[float, float]]]:
    """Per-client audits, the number of rounds, and (client, round) -> (recorded, recomputed) epsilons.

    The recomputed epsilon paired with each recorded one is composed with ``enforced`` (the
    ledger's accountant), so the comparison is like with like whatever ``accountant`` was asked for.
    """
    entries = ledger.entries
    interrupted = ledger.interrupted_trainings()
    round_ids = {int(h["round"]) for h in history if "round" in h} | {e.round for e in entries}
    rounds = max(round_ids) + 1 if round_ids else 0
    summary_clients = _config_section(summary, "clients")
    recorded: dict[tuple[str, int], tuple[float, float]] = {}
    audits = []
    # Each client's entries by round, in one pass over the ledger (not one pass per client: a
    # federation of many sites has as many clients as a round has entries, or more).
    dropped_in: dict[str, int] = {}  # rounds each client was dropped from, for a summary that does not say
    for h in history:
        for name in h.get("dropped") or {}:
            dropped_in[name] = dropped_in.get(name, 0) + 1
    by_client: dict[str, dict[int, list[Any]]] = {}
    for e in entries:
        by_client.setdefault(e.client, {}).setdefault(e.round, []).append(e)
    for client in ledger.clients:
        budget = ledger.budget(client)
        mine = by_client.get(client, {})
        by_round: list[float] = []
        events: list[DPEvent] = []
        value = _epsilon(events, budget.delta, accountant)
        for r in range(rounds):
            at_r = mine.get(r, ())
            trained = [e for e in at_r if e.status is LedgerStatus.TRAINED]
            events += [DPEvent(noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate, steps=e.steps) for e in trained]
            if trained:  # epsilon moves only when the client trained (most rounds of a sampled federation it did not)
                value = _epsilon(events, budget.delta, accountant)
            by_round.append(value)
            if at_r:
                same = value if enforced is accountant else _epsilon(events, budget.delta, enforced)
                for entry in at_r:
                    recorded[(client, r)] = (entry.epsilon, same)
        final = by_round[-1] if by_round else 0.0
        cross_value = _epsilon(events, budget.delta, cross)
        info = summary_clients.get(client, {}) if isinstance(summary_clients.get(client), Mapping) else {}
        dropped = info.get("rounds_dropped")
        if dropped is None:
            dropped = dropped_in.get(client, 0)
        n = info.get("num_examples")
        audits.append(
            ClientAudit(
                client=client,
                num_examples=int(n) if isinstance(n, int) else None,
                delta=budget.delta,
                epsilon_budget=budget.epsilon,
                epsilon=final,
                epsilon_cross_check=cross_value,
                epsilon_enforced=final if enforced is accountant else cross_value if enforced is cross else _epsilon(events, budget.delta, enforced),
                epsilon_by_round=tuple(by_round),
                noise_multipliers=tuple(sorted({e.noise_multiplier for e in events})),
                sample_rates=tuple(sorted({e.sample_rate for e in events})),
                steps=sum(e.steps for e in events),
                rounds_trained=ledger.rounds(client, LedgerStatus.TRAINED),
                rounds_interrupted=interrupted.get(client, 0),
                rounds_skipped=ledger.rounds(client, LedgerStatus.SKIPPED_BUDGET),
                rounds_dropped=int(dropped),
            )
        )
    return tuple(audits), rounds, recorded


_NO_CLIENT_DP = (
    "This run has no client-level DP. DP-SGD protects each record inside a client's data "
    "(sample-level DP), but nothing bounds what the model and its updates reveal about a whole "
    "client: whether a site took part, and its data distribution, are NOT protected. "
    "Client-level epsilon = infinity."
)


def _client_level(
    summary: Mapping[str, Any], rounds: int, history: Sequence[Mapping[str, Any]] = (), *, num_clients: int | None = None
) -> ClientLevelAudit:
    settings = _client_dp_settings(summary)
    if settings is None:
        return ClientLevelAudit(
            enabled=False, epsilon=math.inf, delta=None, noise_multiplier=None, sample_rate=None, rounds=rounds, explanation=_NO_CLIENT_DP
        )
    from privfl.accounting import noise_multiplier as calibrate

    federation = _config_section(summary, "federation")
    raw_level = summary.get("client_level")
    recorded_level: Mapping[str, Any] = raw_level if isinstance(raw_level, Mapping) else {}
    try:
        delta = float(settings["delta"])
        kind = Accountant(settings.get("accountant") or Accountant.PRV.value)
        fraction = float(federation.get("client_fraction", 1.0))
        sampling = "poisson" if (settings.get("sampling") or "poisson") == "poisson" else "fixed"
        fixed = sampling == "fixed"
        # Fixed-size sampling is accounted without amplification (q = 1), as the federation does.
        q = 1.0 if fixed else fraction
        z: Any
        if recorded_level.get("accounted_noise_multiplier"):
            # The federation records what it charged per round; accounting it again checks the epsilon.
            z = float(recorded_level["accounted_noise_multiplier"])
        else:
            z = settings.get("noise_multiplier")
            if z is None:
                planned = int(federation.get("rounds", rounds) or rounds)
                z = calibrate(target_epsilon=float(settings["target_epsilon"]), sample_rate=q, steps=max(planned, 1), delta=delta, accountant=kind)
            elif fixed:
                # Fixed-size sampling: one client can move the sum by 2S (it may displace another).
                z = float(z) / 2
        z = float(z)
        per_round = [level for h in history if isinstance(level := h.get("client_level"), Mapping)]
        if per_round and len(per_round) == len(history) and all("accounted_noise_multiplier" in level for level in per_round):
            # Each round as it was charged (a resumed, extended run changes z between rounds).
            charged = [float(level["accounted_noise_multiplier"]) for level in per_round]
            events = [
                DPEvent(noise_multiplier=z_r, sample_rate=float(level["sample_rate"]), steps=1) for z_r, level in zip(charged, per_round, strict=True)
            ]
        else:
            charged = [z] * rounds
            events = [DPEvent(noise_multiplier=z, sample_rate=q, steps=rounds)]
        eps = _epsilon(events, delta, kind)
        # Against anyone who sees who took part (the server; history.json lists participants) the
        # sampling does not amplify: the same releases at q = 1.
        if q >= 1.0 or not charged:
            against_server = eps
        else:
            against_server = _epsilon([DPEvent(noise_multiplier=z_r, sample_rate=1.0, steps=1) for z_r in charged], delta, kind)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError("summary.client_dp", dict(settings), f"cannot be accounted: {exc}") from None
    # The mechanism that ran: the noise on the sum is z S (z the configured, not the accounted, multiplier).
    z_run = float(recorded_level.get("noise_multiplier") or (2 * z if fixed else z))
    sites = f" of {num_clients}" if num_clients else ""
    if fixed:
        m = recorded_level.get("expected_clients") or (max(1, round(fraction * num_clients)) if num_clients else None)
        per_round_sites = f"{int(m)}{sites} sites per round (fixed-size sampling)" if m else "a fixed number of sites per round"
        description = f"z = {z_run:.4g} on the sum of clipped updates, {per_round_sites}"
        accounting = (
            f"Accounted as a Gaussian mechanism with noise multiplier z/2 = {z:.4g} at q = 1: with a fixed number of "
            "sites, adding one may displace another, moving the sum by 2S, and there is no amplification by sampling."
        )
    else:
        expected = f"{fraction * num_clients:.3g}{sites} sites expected per round" if num_clients else "sites"
        description = f"z = {z_run:.4g} on the sum of clipped updates, {expected} (Poisson sampling at q = {q:.3g})"
        accounting = f"Accounted as a Gaussian mechanism with noise multiplier z = {z:.4g}, subsampled at q = {q:.3g}."
    explanation = (
        f"Client-level DP (DP-FedAvg): {description}. {accounting} Composed over {rounds} rounds with "
        f"{kind.value.upper()}, whether any one client took part is protected at epsilon {eps:.3f}, "
        f"client-level delta {delta:g}"
    )
    if q < 1.0:
        explanation += (
            ", against anyone who does not see who took part. The server sees which sites take part (and "
            f"history.json lists them): against it the guarantee is the one without amplification, epsilon "
            f"{against_server:.3f} (q = 1)."
        )
    else:
        explanation += ", against anyone, the server included: it sees who took part, but at q = 1 there is no amplification to lose."
    return ClientLevelAudit(
        enabled=True,
        epsilon=eps,
        delta=delta,
        noise_multiplier=z,
        sample_rate=q,
        rounds=rounds,
        explanation=explanation,
        sampling=sampling,
        description=description,
        epsilon_against_server=against_server,
    )


def _relative_gap(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)



# -- the audit's rules ------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, slots=True)
class RunFacts(Facts):
    """What the audit rules read: the recomputed figures and the run's own records.

    Attributes:
        audits: each client's recomputed sample-level privacy.
        client_level: the client-level guarantee.
        recorded_accountant: the accountant name the ledger records.
        accountant: the accountant the figures are computed with.
        cross: the cross-check accountant.
        enforced: the accountant the ledger enforced budgets with.
        summary: summary.json (or what an unfinished run recorded, in its shape).
        history: history.json.
        recorded: (client, round) -> (recorded, recomputed) epsilons.
        interrupted: the run is unfinished.
    """

    audits: tuple[ClientAudit, ...]
    client_level: ClientLevelAudit
    recorded_accountant: str
    accountant: Accountant
    cross: Accountant
    enforced: Accountant
    summary: Mapping[str, Any]
    history: Sequence[Mapping[str, Any]]
    recorded: Mapping[tuple[str, int], tuple[float, float]]
    interrupted: bool = False

    def field(self, client: ClientFacts, attr: str) -> str:
        """A client's record: ``clients.<name>.<attr>``."""
        return f"clients.{client.client}.{attr}"


def _run_facts(
    *,
    clients: tuple[ClientAudit, ...],
    client_level: ClientLevelAudit,
    recorded_accountant: str,
    accountant: Accountant,
    cross: Accountant,
    enforced: Accountant,
    summary: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    recorded: Mapping[tuple[str, int], tuple[float, float]],
    interrupted: bool,
) -> RunFacts:
    shared = tuple(
        ClientFacts(
            client=c.client, num_examples=c.num_examples, delta=c.delta,
            noise_multiplier=min(c.noise_multipliers) if c.noise_multipliers else None,
            epsilon=c.epsilon, epsilon_basis=f"spent, {accountant.value.upper()}", epsilon_budget=c.epsilon_budget,
        )
        for c in clients
    )
    return RunFacts(
        clients=shared, client_dp=client_level.enabled, audits=clients, client_level=client_level,
        recorded_accountant=recorded_accountant, accountant=accountant, cross=cross, enforced=enforced,
        summary=summary, history=history, recorded=recorded, interrupted=interrupted,
    )


def _over_budget(c: ClientAudit) -> bool:
    """Spent more than the budget under the accountant that enforced it."""
    return c.epsilon_enforced > c.epsilon_budget * (1 + 1e-9)


@register(
    audit_code(
        "PFA003",
        Severity.ERROR,
        "a client spent more than its budget under the accountant the ledger enforced it with (the ledger refuses this: "
        "the files were edited)",
    ),
    title="a client spent more than its budget",
    fix="Do not release this model under the stated budget; investigate how the ledger was produced.",
)
def _overspent(facts: RunFacts) -> list[Hit]:
    return [
        Hit(
            field=f"clients.{c.client}.epsilon",
            message=f"client {c.client!r} spent epsilon {c.epsilon_enforced:.4g} ({facts.enforced.value.upper()}, the accountant "
            f"the ledger enforces budgets with) > its budget {c.epsilon_budget:.4g}. The ledger refuses such "
            "training, so the ledger was edited or its events do not match its budgets.",
        )
        for c in facts.audits
        if _over_budget(c)
    ]


@register(
    audit_code("PFA004", Severity.WARNING, "a client is at its budget (info when the run was calibrated to spend it)", also=(Severity.INFO,)),
    title="a client is at its budget (INFO when the run was calibrated to spend it)",
    fix="Nothing to fix if the run is final. Training on the same records again, in this run or a new one, spends more "
    "(a new run directory's ledger starts from zero, but what was spent here still counts): plan the rounds you need "
    "into one run's budget.",
)
def _at_budget(facts: RunFacts) -> list[Hit]:
    # At budget: within 1% of it, or already unable to afford a round.
    exhausted = [
        c for c in facts.audits
        if not _over_budget(c) and math.isfinite(c.epsilon_budget) and (c.rounds_skipped or c.epsilon_remaining <= 0.01 * c.epsilon_budget)
    ]
    if not exhausted:
        return []
    calibrated = _config_section(_config_section(facts.summary, "training"), "dp").get("target_epsilon") is not None
    spent = ", ".join(f"{c.client!r} {c.epsilon_enforced:.3f}/{c.epsilon_budget:g}" for c in exhausted[:SHOWN_ONE_BY_ONE])
    if len(exhausted) > SHOWN_ONE_BY_ONE:
        spent += f", and {len(exhausted) - SHOWN_ONE_BY_ONE} more (audit.json's sample_level has each)"
    return [
        Hit(
            field="clients.epsilon_budget",
            message=f"at budget, or too near it to afford another round (spent/budget): {spent}. Any further round for "
            "these clients (a resumed or extended run, fine-tuning on their data) will skip them."
            + (" The run was calibrated to spend exactly this budget, so this is expected." if calibrated else ""),
            severity=Severity.INFO if calibrated else Severity.WARNING,
        )
    ]


@register(
    audit_code(
        "PFA006",
        Severity.WARNING,
        "the ledger names a GDP accountant: an approximation, not an upper bound (the audit recomputes with PRV)",
    ),
    title="GDP accountant (an approximation, not an upper bound)",
    fix='Re-run with training.dp.accountant = "prv" (the default) or "rdp" and quote those figures.',
)
def _gdp_accountant(facts: RunFacts) -> list[Hit]:
    if facts.recorded_accountant in {a.value for a in Accountant}:
        return []
    return [
        Hit(
            field="accountant",
            message=f"the ledger was accounted with {facts.recorded_accountant!r}. A GDP (central-limit) accountant "
            "approximates the privacy curve and can under-report epsilon for few steps or large sampling rates; its "
            "figures are not an upper bound. This audit recomputed every figure with PRV.",
        )
    ]


@register(
    audit_code(
        "PFA007",
        Severity.WARNING,
        "rounds skipped because a client's budget could not afford them; when some of its charges were interrupted "
        "attempts at a round (redone on resume), it says so: those charges, not the calibration, used the budget",
    ),
    title="rounds skipped for budget",
    fix="Give it a budget that covers every round it may be sampled in (target_epsilon calibrates for that), "
    "or raise planned_participation_quantile when client_fraction < 1.",
)
def _skipped_for_budget(facts: RunFacts) -> list[Hit]:
    out = []
    for c in facts.audits:
        if c.rounds_skipped and c.rounds_interrupted:
            out.append(
                Hit(
                    field=f"clients.{c.client}.rounds_skipped",
                    message=f"client {c.client!r} was sampled but skipped in {c.rounds_skipped} round(s) because another "
                    f"round would have exceeded its budget. {c.rounds_interrupted} of its {c.rounds_trained} charged "
                    "trainings were interrupted attempts at a round: the run was stopped after charging them, and "
                    f"{RESUMED_ROUND}. Those charges are real (the update may have left the site) and used "
                    "budget the calibration had planned for later rounds; its data stopped contributing after that.",
                    fix="Nothing to change in the calibration. To finish every round after an interruption, plan headroom "
                    "(a fixed noise_multiplier with a budget_epsilon above its planned epsilon), or accept the skipped rounds.",
                )
            )
        elif c.rounds_skipped:
            out.append(
                Hit(
                    field=f"clients.{c.client}.rounds_skipped",
                    message=f"client {c.client!r} was sampled but skipped in {c.rounds_skipped} round(s) because another "
                    "round would have exceeded its budget: its data stopped contributing, which can bias the model.",
                )
            )
    return out


@register(
    audit_code("PFA008", Severity.WARNING, "updates charged but not aggregated (dropouts, aborted rounds)"),
    title="updates dropped or rounds aborted (epsilon spent, nothing aggregated)",
    fix="Check the transport and the secure-aggregation threshold; the ledger keeps the charge either way.",
)
def _charged_not_aggregated(facts: RunFacts) -> list[Hit]:
    out = [
        Hit(
            field=f"clients.{c.client}.rounds_dropped",
            message=f"client {c.client!r} trained and was charged epsilon in {c.rounds_dropped} round(s) whose update "
            "was not aggregated (dropout or abort): privacy was spent for nothing.",
        )
        for c in facts.audits
        if c.rounds_dropped
    ]
    aborted = [h.get("round") for h in facts.history if h.get("aborted")]
    if aborted:
        out.append(
            Hit(
                field="rounds.aborted",
                message=f"round(s) {aborted} aborted: their clients were charged epsilon but nothing was aggregated.",
                fix="Lower the secure-aggregation threshold (it must stay above half the share holders, which privfl "
                "enforces: see lint rule PFL020) or fix the dropouts that took the round below it.",
            )
        )
    return out


@register(
    audit_code("PFA010", Severity.WARNING, "PRV above RDP by more than 1%"),
    title="PRV above RDP by more than 1%",
    fix="Quote the larger (RDP) figure for this run, and report the disagreement with the event list.",
)
def _prv_above_rdp(facts: RunFacts) -> list[Hit]:
    out = []
    for c in facts.audits:
        if not c.steps or facts.accountant is facts.cross:
            continue
        prv, rdp = (c.epsilon, c.epsilon_cross_check) if facts.accountant is Accountant.PRV else (c.epsilon_cross_check, c.epsilon)
        if prv > rdp * (1 + CROSS_CHECK_TOLERANCE):
            out.append(
                Hit(
                    field=f"clients.{c.client}.epsilon",
                    message=f"client {c.client!r}: PRV gives epsilon {prv:.4g} but RDP, a looser upper bound, gives {rdp:.4g}; "
                    "PRV should be the tighter figure, so its discretisation error is larger than assumed.",
                )
            )
    return out


@register(
    audit_code("PFA011", Severity.ERROR, "a recorded epsilon differs from the recomputed one by more than 1%"),
    title="recorded epsilon differs from the recomputed one",
    fix="Check that the files come from one run and were not edited; quote the recomputed figures.",
)
def _recorded_mismatch(facts: RunFacts) -> list[Hit]:
    summary_clients = _config_section(facts.summary, "clients")
    mismatched: dict[str, list[tuple[int | None, float, float]]] = {}  # one pass over the records, not one per client
    for (name, round_index), (rec, new) in sorted(facts.recorded.items()):
        if _relative_gap(rec, new) > RECORDED_TOLERANCE and not (rec == 0 and new == 0):
            mismatched.setdefault(name, []).append((round_index, rec, new))
    out = []
    for c in facts.audits:
        bad = mismatched.get(c.client, [])
        entry = summary_clients.get(c.client)
        summary_eps = entry.get("epsilon") if isinstance(entry, Mapping) else None
        if summary_eps is not None and _relative_gap(float(summary_eps), c.epsilon_enforced) > RECORDED_TOLERANCE:
            bad.append((None, float(summary_eps), c.epsilon_enforced))
        if bad:
            r, rec, new = bad[0]
            where = f"round {r} of {LEDGER_FILE}" if r is not None else "summary.json"
            out.append(
                Hit(
                    field=f"clients.{c.client}.epsilon",
                    message=f"client {c.client!r}: {where} records epsilon {rec:.4g} but its events give {new:.4g} "
                    f"({len(bad)} mismatch(es)); the recorded figures cannot be trusted.",
                )
            )
    return out


@register(
    audit_code(
        "PFA013",
        Severity.WARNING,
        "client-level DP with client sampling reproducible from the config (`noise_seed`, or a run that did not record "
        "its sampling as secret): its amplification by sampling does not hold against anyone holding the config; the "
        "message gives epsilon at q = 1",
    ),
    title="client sampling reproducible from the config (no amplification against its holders)",
    fix="Leave federation.noise_seed unset outside simulations: privfl then samples clients from OS entropy.",
)
def _reproducible_sampling(facts: RunFacts) -> list[Hit]:
    client_level, summary = facts.client_level, facts.summary
    if not client_level.enabled or (client_level.sample_rate or 1.0) >= 1.0 or summary.get("client_sampling_secret") is True:
        return []
    # The amplification by sampling assumes nobody knows who took part. A seeded sample (or a
    # run from before samples were secret, which drew them from the public seed) is known to
    # anyone holding the config: against them each round is the Gaussian mechanism at q = 1.
    try:
        if client_level.noise_multiplier is None or client_level.delta is None:
            raise TypeError("no client-level noise multiplier or delta recorded")
        unamplified = _epsilon(
            [DPEvent(noise_multiplier=client_level.noise_multiplier, sample_rate=1.0, steps=client_level.rounds)],
            client_level.delta,
            Accountant.PRV,
        )
    except (ConfigError, TypeError):
        unamplified = math.inf
    why = "was drawn from federation.noise_seed" if "client_sampling_secret" in summary else "is not recorded as secret"
    return [
        Hit(
            field="federation.client_sampling",
            message=f"client sampling {why}: anyone holding the config can recompute which clients took part in each "
            f"round, so the client-level epsilon {client_level.epsilon:.3g} (amplified by sampling at "
            f"q = {client_level.sample_rate:.3g}) does not hold against them; against them it is "
            f"{unamplified:.3g} (q = 1).",
        )
    ]


@register(
    audit_code(
        "PFA014",
        Severity.INFO,
        "with `accountant=` another than the ledger's: that accountant's epsilon is above a budget the ledger enforced "
        "(and kept) with its own",
    ),
    title="the requested accountant's epsilon is above a budget the ledger enforced with another",
    fix="Quote the budget with the accountant that enforced it, or the larger figure if a reader requires this accountant.",
)
def _requested_accountant_above_budget(facts: RunFacts) -> list[Hit]:
    out = []
    for c in facts.audits:
        if c.epsilon > c.epsilon_budget * (1 + 1e-9) and not _over_budget(c):
            # Another accountant was asked for: the budget was enforced with the ledger's, and holds there.
            out.append(
                Hit(
                    field=f"clients.{c.client}.epsilon",
                    message=f"client {c.client!r}: {facts.accountant.value.upper()} gives epsilon {c.epsilon:.4g} on the "
                    f"ledger's events, above its budget {c.epsilon_budget:.4g}; the ledger enforced that budget with "
                    f"{facts.enforced.value.upper()}, under which it spent {c.epsilon_enforced:.4g}. Both are upper bounds "
                    "on the same mechanism; they differ in how tightly they compose.",
                    fix=f"Quote the budget with the accountant that enforced it ({facts.enforced.value}), or the larger "
                    "figure if a reader requires this accountant.",
                )
            )
    return out


@register(
    audit_code("PFA015", Severity.WARNING, "the run is unfinished (no `summary.json`): what is there was audited, without resuming"),
    title="the run is unfinished (no summary.json): what is there was audited",
    fix="Resume the run to finish it (it will spend more), or treat this audit as the run's final account.",
)
def _unfinished(facts: RunFacts) -> list[Hit]:
    if not facts.interrupted:
        return []
    return [
        Hit(
            field="summary.json",
            message=f"the run is unfinished: it has no summary.json. The {len(facts.history)} recorded round(s) and every "
            "charge in the ledger (including those of a round in progress) were audited as they stand, without "
            "resuming; client sizes are not recorded outside summary.json, so the delta >= 1/n check (PFA002) was skipped.",
        )
    ]


@register(
    audit_code(
        "PFA016",
        Severity.INFO,
        "client-level DP: the adjacency the epsilon is stated for (zero-out with the sites public, or add/remove), that "
        "it holds against readers of the released models, and that against the server (which samples and sees who "
        "takes part) no participation guarantee holds; under secure aggregation, the rounds aborted because a noise "
        "share would have been clipped or a site dropped, and the tail delta. ERROR for a secure-aggregation run "
        "written before the clip range was derived from the noise (no adjacency recorded): a fixed `clip_range` could "
        "clip the noise shares, so the recorded client-level epsilon is not supported",
        also=(Severity.ERROR,),
    ),
    title="client-level adjacency and against whom it holds (ERROR: secagg noise could be clipped)",
    fix="Nothing to fix; docs/client-dp.md, Adjacency.",
)
def _adjacency(facts: RunFacts) -> list[Hit]:
    """Which adjacency the client-level epsilon is stated for, against whom it holds, and (secagg) whether noise could be clipped."""
    client_level, summary, history = facts.client_level, facts.summary, facts.history
    if not client_level.enabled:
        return []
    settings = _client_dp_settings(summary) or {}
    secagg = str(_config_section(summary, "federation").get("protection", "")) == "secagg"
    adjacency = settings.get("adjacency")
    if secagg and adjacency is None:
        # Written before the range was derived from the noise (issue 13): a fixed clip_range clipped the
        # noise shares (bounded noise: epsilon is infinite under add/remove), and the shares' variance
        # varied with the number of sites that took part.
        return [
            Hit(
                field="federation.secagg.clip_range",
                message=f"this secure-aggregation run predates the noise-derived clip range: a fixed clip_range could clip "
                f"the client-level noise shares, and their variance varied with how many sites took part, so the "
                f"recorded client-level epsilon {client_level.epsilon:.3g} is not supported by the mechanism that ran.",
                fix="Rerun with this privfl version: it derives the range from the noise, aborts a round that would clip "
                "and states the adjacency (docs/client-dp.md).",
                severity=Severity.ERROR,
            )
        ]
    aborted = [
        h.get("round") for h in history if "fail_on_clip" in str(h.get("aborted") or "") or "fail_on_dropout" in str(h.get("aborted") or "")
    ]
    against_server = (
        f"against the server, which samples the sites and sees who takes part, no participation guarantee holds "
        f"(epsilon {client_level.epsilon_against_server:.3g}, q = 1, protects a participating site's update)"
    )
    message = (
        f"client-level epsilon {client_level.epsilon:.3g} is stated for {adjacency or 'zero-out'} adjacency "
        f"({'the sites are public; a site contributes or is replaced by none' if (adjacency or 'zero-out') == 'zero-out' else 'a site is added or removed'}); "
        f"it holds against anyone who sees only the released models; {against_server}."
    )
    if secagg:
        from privfl.client_dp import CLIP_TAIL_FRACTION

        tail = float(settings.get("delta", 0.0)) * CLIP_TAIL_FRACTION
        message += (
            f" Secure aggregation's clip range was derived from the noise each round: a round that would clip "
            f"a noise share, or that lost a site, was aborted ({len(aborted)} round(s): {aborted[:10]}); the chance "
            f"of clipping adds at most {tail:.2g} to the client-level delta."
        )
    return [Hit(field="federation.client_dp.adjacency", message=message)]


# -- rendering ---------------------------------------------------------------------------------------
def _findings_markdown(findings: Sequence[Finding]) -> list[str]:
    """The findings as Markdown items; past `SHOWN_ONE_BY_ONE` findings of one code (one per client of a
    large federation), the first few in full and the others by field (every one stays in audit.json)."""
    out: list[str] = []
    for code, group in itertools.groupby(findings, key=lambda f: (f.severity, f.code)):
        group_list = list(group)
        shown = group_list if len(group_list) <= SHOWN_ONE_BY_ONE else group_list[:_SHOWN_OF_MANY]
        for f in shown:
            out.append(f"- **{f.severity.value.upper()} {f.code}** `{f.field}`: {f.message}")
            out.append(f"  - fix: {f.fix}")
        rest = group_list[len(shown):]
        if rest:
            fields = ", ".join(f"`{f.field}`" for f in rest[:_FIELDS_NAMED])
            more = f", and {len(rest) - _FIELDS_NAMED} more" if len(rest) > _FIELDS_NAMED else ""
            out.append(f"- **{code[0].value.upper()} {code[1]}**, {len(rest)} more of this code (every one is in audit.json): {fields}{more}")
    return out


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """A pipe table padded so it reads as aligned columns in a terminal too (a ``|`` in a cell, as a
    site's name may hold, is escaped so it does not open a column)."""
    header = [h.replace("|", "\\|") for h in header]
    rows = [[c.replace("|", "\\|") for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right, strict=True)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


_SCOPE = (
    "- checked: every ledger line (hash chain; MAC under ledger.key when authenticated); that the ledger and "
    "history.json record the same trainings and skips, and that the ledger still holds the lines history.json "
    "and summary.json recorded; every epsilon, recomputed from the ledger's events and compared with the recorded "
    "ones; budgets, deltas, noise levels and the client-level settings against known pitfalls.",
    "- not checked: that the training code did what the ledger records (clipping, noise, Poisson sampling: see the "
    "empirical audits); a consistent rollback (compare the ledger head with a copy kept elsewhere); a ledger "
    "re-signed by someone who can read ledger.key; client sizes, taken from summary.json; who took part in a "
    "round, taken from history.json.",
)


class EpsilonSeries(Protocol):
    """One client's (or site's) epsilon over a run, as the per-round table and the plot read it."""

    @property
    def client(self) -> str: ...
    @property
    def epsilon(self) -> float: ...
    @property
    def epsilon_budget(self) -> float: ...
    @property
    def epsilon_by_round(self) -> Sequence[float]: ...


def epsilon_by_round_table(clients: Sequence[EpsilonSeries], rounds: int, *, who: str, where: str) -> list[str]:
    """The Markdown lines of the "epsilon after each round" table: a column per client up to
    ``SHOWN_ONE_BY_ONE`` clients, past that the spread over them and who is ahead (``where`` says
    where each one's own figures are)."""
    out = []
    if len(clients) <= SHOWN_ONE_BY_ONE:
        header = ["round", *(c.client for c in clients)]
        rows = [[str(r), *(_num(c.epsilon_by_round[r]) for c in clients)] for r in range(rounds)]
    else:  # a column per client stops being readable: the spread over clients, and who is ahead
        out += [f"The spread over the {len(clients)} {who}s (each {who}'s own figures: {where}).", ""]
        header = ["round", "min", "median", "max", f"{who} at max"]
        rows = []
        for r in range(rounds):
            values = sorted(c.epsilon_by_round[r] for c in clients)
            top = max(clients, key=lambda c: c.epsilon_by_round[r])
            rows.append([str(r), _num(values[0]), _num(statistics.median(values)), _num(values[-1]), top.client])
    out.append(_table(header, rows, [True] * len(header) if len(clients) <= SHOWN_ONE_BY_ONE else [True] * 4 + [False]))
    return out


def plot_epsilon(
    path: Path, clients: Sequence[EpsilonSeries], history: Sequence[Mapping[str, Any]], accountant: Accountant, *, who: str = "client"
) -> None:
    """Draws each client's epsilon by round (past ``SHOWN_ONE_BY_ONE``: bands, the median and the
    top three) and the global model's test accuracy, into ``path`` (PNG)."""
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    rounds = max((len(c.epsilon_by_round) for c in clients), default=0)
    marker = {"marker": "o", "markersize": 3} if rounds <= 60 else {}
    # Epsilon moves only in the rounds a client trains in: steps, not slopes between rounds.
    if len(clients) <= SHOWN_ONE_BY_ONE:
        for c in clients:
            (line,) = left.plot(range(len(c.epsilon_by_round)), c.epsilon_by_round, label=c.client, drawstyle="steps-post", **marker)
            if math.isfinite(c.epsilon_budget):
                left.axhline(c.epsilon_budget, color=line.get_color(), linestyle=":", linewidth=1)
        left.set_title(f"sample-level epsilon per {who} (dotted: budget)")
    else:  # a line per client is unreadable: the spread over clients, and the clients that spent most
        import numpy as np

        values = np.array([c.epsilon_by_round for c in clients], dtype=float)
        x = np.arange(values.shape[1])
        low, median, high = np.quantile(values, [0.1, 0.5, 0.9], axis=0)
        band = {"step": "post", "linewidth": 0, "color": "tab:blue"}
        left.fill_between(x, values.min(axis=0), values.max(axis=0), alpha=0.15, label="min to max", **band)
        left.fill_between(x, low, high, alpha=0.3, label="10th to 90th percentile", **band)
        left.plot(x, median, color="tab:blue", drawstyle="steps-post", label="median")
        for c, color in zip(sorted(clients, key=lambda c: -c.epsilon)[:3], ("tab:red", "tab:orange", "tab:purple"), strict=False):
            left.plot(x, c.epsilon_by_round, linewidth=1, color=color, drawstyle="steps-post", label=f"{c.client} (epsilon {c.epsilon:.3g})")
        for budget in sorted({c.epsilon_budget for c in clients if math.isfinite(c.epsilon_budget)})[:5]:
            left.axhline(budget, color="gray", linestyle=":", linewidth=1)
        left.set_title(f"sample-level epsilon over {len(clients)} {who}s (dotted: budgets)")
    from matplotlib.ticker import MaxNLocator

    for axes in (left, right):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    left.set_xlabel("round (as numbered in the ledger)")
    left.set_ylabel(f"epsilon ({accountant.value.upper()})")
    left.set_ylim(bottom=0)
    if clients:
        left.legend(fontsize="small", loc="upper left")  # epsilon starts low at the left and grows to the right
    accuracy = [(int(h["round"]), h.get("test_accuracy")) for h in history if h.get("test_accuracy") is not None]
    if accuracy:
        right.plot([r for r, _ in accuracy], [a for _, a in accuracy], color="black", **marker)
    else:
        right.text(0.5, 0.5, "no test set was evaluated", ha="center", va="center", transform=right.transAxes, color="gray")
    right.set_xlabel("round")
    right.set_ylabel("test accuracy")
    right.set_title("global model")
    figure.savefig(path, dpi=110)


def _write(path: Path, text: str) -> None:
    durable_write_bytes(path, text.encode())
    os.chmod(path, 0o644)  # a report is for reading (mkstemp creates 0600)


# -- the public entry point ---------------------------------------------------------------------------
def audit_run(
    run_dir: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    accountant: Accountant | str | None = None,
) -> AuditReport:
    """Audits a run directory and writes ``audit.md``, ``audit.json`` and ``audit.png``.

    An unfinished run (no summary.json: interrupted, or still running) is audited as it stands,
    from its ledger, history and recorded settings, without resuming it; the report says so (PFA015).

    Args:
        run_dir: a directory written by ``privfl run`` (ledger.jsonl and ledger.key, history.json,
            and summary.json once finished).
        out_dir: where to write the three files (default: ``run_dir``).
        accountant: compose with this accountant instead of the ledger's (the other one is the
            cross-check). Default: the ledger's.

    Returns:
        The audit; ``report.to_markdown()`` is what ``audit.md`` holds, ``report.to_json()`` what
        ``audit.json`` holds.

    Raises:
        LedgerError: the ledger is corrupt or edited (a line breaks the hash chain or its MAC), its
            key is missing, or it disagrees with history.json (a training the history records has
            no ledger entry, or the other way round) or with the lines history and summary recorded.
        ConfigError: ``run_dir`` is missing or lacks one of the files, a file is not valid,
            ``accountant`` is not ``"prv"`` or ``"rdp"``, or the report cannot be written to ``out_dir``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError("run_dir", str(run_dir), "does not exist or is not a directory")
    other = directory_kind(run_dir)
    if other is not None:
        raise ConfigError("run_dir", str(run_dir), f"is {other}, not a privfl run directory")
    ledger, recorded_accountant = _load_ledger(run_dir)
    interrupted = not (run_dir / SUMMARY_FILE).exists()
    if interrupted:
        # An unfinished run is audited as it stands: resuming it to get a summary would spend more.
        summary = _unfinished_summary(ledger, run_dir)
        history = load_history(run_dir / HISTORY_FILE)
    else:
        summary = _read_json(run_dir / SUMMARY_FILE, "written when a run finishes")
        _read_json(run_dir / HISTORY_FILE, "the per-round history")  # missing: the same message as the others
        history = load_history(run_dir / HISTORY_FILE)
    if not isinstance(summary, dict):
        raise ConfigError("run_dir", str(run_dir), "summary.json must hold an object")
    # Every training the history records is charged in the ledger and vice versa, and the ledger
    # still holds the lines the history and summary saw: a removed or edited entry is an error.
    check_ledger_against_history(ledger, history, run_dir / LEDGER_FILE)
    _check_summary_anchor(ledger, summary, run_dir / LEDGER_FILE)
    known = {a.value for a in Accountant}
    # The accountant the ledger enforced budgets with (PRV stands in for one privfl cannot compose).
    enforced = Accountant(recorded_accountant) if recorded_accountant in known else Accountant.PRV
    if accountant is None:
        primary = enforced
    else:
        try:
            primary = Accountant(accountant)
        except ValueError:
            raise ConfigError("accountant", accountant, f"must be one of {[a.value for a in Accountant]}") from None
    # Another accountant than the ledger's is cross-checked against the ledger's own: like with like.
    cross = enforced if primary is not enforced else Accountant.RDP if primary is Accountant.PRV else Accountant.PRV

    clients, rounds, recorded = _client_audits(ledger, summary, history, accountant=primary, cross=cross, enforced=enforced)
    if recorded_accountant not in known:
        recorded = {}  # the recorded figures used an accountant privfl does not compose; comparing would be meaningless
    client_level = _client_level(summary, rounds, history, num_clients=len(ledger.clients) or None)
    facts = _run_facts(
        clients=clients,
        client_level=client_level,
        recorded_accountant=recorded_accountant,
        accountant=primary,
        cross=cross,
        enforced=enforced,
        summary=summary,
        history=history,
        recorded=recorded,
        interrupted=interrupted,
    )
    # In apply_rules' order: by severity and code, a per-client rule's findings worst first.
    findings = tuple(apply_rules(Tool.AUDIT, facts))
    out = Path(out_dir) if out_dir is not None else run_dir
    paths = AuditPaths(markdown=out / "audit.md", json=out / "audit.json", plot=out / "audit.png")
    integrity = LedgerIntegrity(
        lines=ledger.lines, head=ledger.head or "", authenticated=ledger.authenticated, interrupted_entries=len(ledger.superseded())
    )
    report = AuditReport(
        run_dir=run_dir,
        accountant=primary,
        cross_check_accountant=cross,
        protection=str(summary.get("protection", "unknown")),
        rounds=rounds,
        aborted_rounds=tuple(int(h["round"]) for h in history if h.get("aborted")),
        clients=clients,
        client_level=client_level,
        findings=findings,
        paths=paths,
        ledger=integrity,
        interrupted=interrupted,
        enforced_accountant=enforced,
        recorded_rounds=len(history),
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write(paths.markdown, report.to_markdown())
        _write(paths.json, report.to_json_text())
        plot_epsilon(paths.plot, clients, history, primary)
    except OSError as exc:
        raise filesystem_error(exc, "out_dir", out, "write the audit report") from None
    return report


def _unfinished_summary(ledger: PrivacyLedger, run_dir: Path) -> dict[str, Any]:
    """What an unfinished run recorded of its settings, in the shape of summary.json.

    The ledger's header holds the run's settings (authenticated with the ledger); run.json is
    the fallback for ledgers written without them. The number of rounds is not part of a run's
    identity, and client sizes are only in summary.json: both are left out.
    """
    identity = ledger.run_identity
    if identity is None:
        identity = load_run_identity(run_dir / RUN_FILE)
    federation = _config_section(identity, "federation")
    return {
        "training": dict(_config_section(identity, "training")),
        "federation": dict(federation),
        "protection": str(federation.get("protection", "unknown")),
        # Secret sampling is recorded by the summary; an unfinished run's follows from noise_seed.
        "client_sampling_secret": federation.get("noise_seed") is None,
    }


AUDIT_CODES: Mapping[str, tuple[Severity, str]] = codes(Tool.AUDIT)
"""``code -> (severity, title)`` of every audit rule, from the registry (:mod:`privfl.audit.rules`)."""
