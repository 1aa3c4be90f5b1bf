"""Privacy audit of a finished run directory: epsilon recomputed from the ledger, budgets, warnings, and a plot.

:func:`audit_run` verifies ``ledger.jsonl`` (hash chain, MACs, agreement with ``history.json``), reads
``summary.json`` and ``history.json``, and re-derives every
client's sample-level epsilon from the ledger's DP-SGD events, round by round, with the ledger's
accountant; it recomputes the final figure with the other accountant (PRV against RDP) as a cross-check,
and states the run's client-level epsilon (infinite without client-level DP). Nothing is taken on
trust from the figures the run wrote: they are compared with the recomputed ones.

Sample-level epsilon bounds what the released updates reveal about one record of a client's data;
client-level epsilon bounds what they reveal about whether a whole client took part.
"""

from __future__ import annotations

import json
import math
import os
import warnings as _warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privfl.accounting import Accountant, DPEvent, LedgerKey, LedgerStatus, PrivacyLedger, epsilon_of_events
from privfl.audit.lint import HIGH_EPSILON, LOW_NOISE, Finding, Severity
from privfl.errors import ConfigError, LedgerError
from privfl.rundir import (
    HISTORY_FILE,
    LEDGER_FILE,
    LEDGER_KEY_FILE,
    LEGACY_LEDGER_FILE,
    SUMMARY_FILE,
    check_ledger_against_history,
    durable_write_bytes,
    load_history,
)

__all__ = ["AuditReport", "AuditPaths", "ClientAudit", "ClientLevelAudit", "LedgerIntegrity", "AUDIT_CODES", "audit_run"]

FORMAT_VERSION = 2
CROSS_CHECK_TOLERANCE = 0.01
"""PRV may exceed RDP by at most this fraction before the two are reported as disagreeing."""
RECORDED_TOLERANCE = 0.01
"""A recorded epsilon may differ from the recomputed one by at most this fraction."""

AUDIT_CODES: Mapping[str, tuple[Severity, str]] = {
    "PFA001": (Severity.WARNING, f"epsilon above {HIGH_EPSILON:g}"),
    "PFA002": (Severity.ERROR, "delta >= 1/n for a client"),
    "PFA003": (Severity.ERROR, "a client spent more than its budget"),
    "PFA004": (Severity.WARNING, "a client is at its budget (INFO when the run was calibrated to spend it)"),
    "PFA005": (Severity.WARNING, f"noise multiplier below {LOW_NOISE:g}"),
    "PFA006": (Severity.WARNING, "GDP accountant (an approximation, not an upper bound)"),
    "PFA007": (Severity.WARNING, "rounds skipped for budget"),
    "PFA008": (Severity.WARNING, "updates dropped or rounds aborted (epsilon spent, nothing aggregated)"),
    "PFA009": (Severity.WARNING, "uncapped budget"),
    "PFA010": (Severity.WARNING, "PRV above RDP by more than 1%"),
    "PFA011": (Severity.ERROR, "recorded epsilon differs from the recomputed one"),
    "PFA012": (Severity.WARNING, "no client-level DP"),
    "PFA013": (Severity.WARNING, "client sampling reproducible from the config (no amplification against its holders)"),
}


def _finding(code: str, field: str, message: str, fix: str, *, severity: Severity | None = None) -> Finding:
    return Finding(severity=severity or AUDIT_CODES[code][0], code=code, field=field, message=message, fix=fix)


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
        epsilon_by_round: epsilon spent after each round (one value per round of the run).
        noise_multipliers: the distinct noise multipliers it trained with.
        sample_rates: the distinct sampling rates it trained with.
        steps: DP-SGD steps taken in all.
        rounds_trained: rounds it trained (and was charged).
        rounds_skipped: rounds it was sampled in but skipped because of its budget.
        rounds_dropped: rounds its update was charged but not aggregated.
    """

    client: str
    num_examples: int | None
    delta: float
    epsilon_budget: float
    epsilon: float
    epsilon_cross_check: float
    epsilon_by_round: tuple[float, ...]
    noise_multipliers: tuple[float, ...]
    sample_rates: tuple[float, ...]
    steps: int
    rounds_trained: int
    rounds_skipped: int
    rounds_dropped: int

    @property
    def epsilon_remaining(self) -> float:
        """Budget left (``math.inf`` when uncapped, never negative)."""
        return max(self.epsilon_budget - self.epsilon, 0.0)


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
    """

    enabled: bool
    epsilon: float
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    rounds: int
    explanation: str


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
    """The result of :func:`audit_run`.

    Attributes:
        run_dir: the audited run directory.
        accountant: the ledger's accountant (the one every figure is computed with).
        cross_check_accountant: the other accountant.
        protection: how updates were protected (plaintext, ckks, secagg).
        rounds: rounds the run completed.
        aborted_rounds: rounds whose aggregation aborted.
        clients: one entry per client, in ledger order.
        client_level: the client-level guarantee.
        warnings: findings, errors first (each says why and how to fix).
        markdown: the report as Markdown (also readable as plain text in a terminal).
        paths: where audit.md, audit.json and audit.png were written.
        ledger: what was verified about the ledger file.
    """

    run_dir: Path
    accountant: Accountant
    cross_check_accountant: Accountant
    protection: str
    rounds: int
    aborted_rounds: tuple[int, ...]
    clients: tuple[ClientAudit, ...]
    client_level: ClientLevelAudit
    warnings: tuple[Finding, ...]
    markdown: str
    paths: AuditPaths
    ledger: LedgerIntegrity

    def to_json(self) -> dict[str, Any]:
        """The content of ``audit.json`` (JSON has no infinity: an infinite epsilon or budget is ``null``)."""
        return _report_json(
            run_dir=self.run_dir,
            accountant=self.accountant,
            cross=self.cross_check_accountant,
            protection=self.protection,
            rounds=self.rounds,
            aborted=self.aborted_rounds,
            clients=self.clients,
            client_level=self.client_level,
            findings=self.warnings,
            paths=self.paths,
            ledger=self.ledger,
        )


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
    ledger: PrivacyLedger, summary: Mapping[str, Any], history: Sequence[Mapping[str, Any]], accountant: Accountant, cross: Accountant
) -> tuple[tuple[ClientAudit, ...], int, dict[tuple[str, int], tuple[float, float]]]:
    """Per-client audits, the number of rounds, and (client, round) -> (recorded, recomputed) epsilons."""
    entries = ledger.entries
    round_ids = {int(h["round"]) for h in history if "round" in h} | {e.round for e in entries}
    rounds = max(round_ids) + 1 if round_ids else 0
    summary_clients = _config_section(summary, "clients")
    recorded: dict[tuple[str, int], tuple[float, float]] = {}
    audits = []
    for client in ledger.clients:
        budget = ledger.budget(client)
        mine = [e for e in entries if e.client == client]
        by_round: list[float] = []
        events: list[DPEvent] = []
        for r in range(rounds):
            for entry in (e for e in mine if e.round == r):
                if entry.status is LedgerStatus.TRAINED:
                    events.append(DPEvent(noise_multiplier=entry.noise_multiplier, sample_rate=entry.sample_rate, steps=entry.steps))
            value = _epsilon(events, budget.delta, accountant)
            by_round.append(value)
            for entry in (e for e in mine if e.round == r):
                recorded[(client, r)] = (entry.epsilon, value)
        final = by_round[-1] if by_round else 0.0
        info = summary_clients.get(client, {}) if isinstance(summary_clients.get(client), Mapping) else {}
        dropped = info.get("rounds_dropped")
        if dropped is None:
            dropped = sum(1 for h in history if client in (h.get("dropped") or {}))
        n = info.get("num_examples")
        audits.append(
            ClientAudit(
                client=client,
                num_examples=int(n) if isinstance(n, int) else None,
                delta=budget.delta,
                epsilon_budget=budget.epsilon,
                epsilon=final,
                epsilon_cross_check=_epsilon(events, budget.delta, cross),
                epsilon_by_round=tuple(by_round),
                noise_multipliers=tuple(sorted({e.noise_multiplier for e in events})),
                sample_rates=tuple(sorted({e.sample_rate for e in events})),
                steps=sum(e.steps for e in events),
                rounds_trained=ledger.rounds(client, LedgerStatus.TRAINED),
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


def _client_level(summary: Mapping[str, Any], rounds: int, history: Sequence[Mapping[str, Any]] = ()) -> ClientLevelAudit:
    settings = _client_dp_settings(summary)
    if settings is None:
        return ClientLevelAudit(
            enabled=False, epsilon=math.inf, delta=None, noise_multiplier=None, sample_rate=None, rounds=rounds, explanation=_NO_CLIENT_DP
        )
    from privfl.accounting import noise_multiplier as calibrate

    federation = _config_section(summary, "federation")
    try:
        delta = float(settings["delta"])
        kind = Accountant(settings.get("accountant") or Accountant.PRV.value)
        fraction = float(federation.get("client_fraction", 1.0))
        # Fixed-size sampling is accounted without amplification (q = 1), as the federation does.
        q = fraction if (settings.get("sampling") or "poisson") == "poisson" else 1.0
        recorded_level = summary.get("client_level")
        fixed = (settings.get("sampling") or "poisson") != "poisson"
        if isinstance(recorded_level, Mapping) and recorded_level.get("accounted_noise_multiplier"):
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
        per_round = [h.get("client_level") for h in history]
        if per_round and all(isinstance(level, Mapping) and "accounted_noise_multiplier" in level for level in per_round):
            # Each round as it was charged (a resumed, extended run changes z between rounds).
            events = [
                DPEvent(noise_multiplier=float(level["accounted_noise_multiplier"]), sample_rate=float(level["sample_rate"]), steps=1)
                for level in per_round
            ]
        else:
            events = [DPEvent(noise_multiplier=z, sample_rate=q, steps=rounds)]
        eps = _epsilon(events, delta, kind)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError("summary.client_dp", dict(settings), f"cannot be accounted: {exc}") from None
    explanation = (
        f"Client-level DP (DP-FedAvg): each round's aggregate is a Gaussian mechanism with noise multiplier "
        f"z = {z:.4g} on clipped client updates, clients sampled at rate q = {q:.3g}; composed over {rounds} "
        f"rounds with {kind.value.upper()}, whether any one client took part is protected at "
        f"epsilon {eps:.3f}, delta {delta:g}."
    )
    return ClientLevelAudit(enabled=True, epsilon=eps, delta=delta, noise_multiplier=z, sample_rate=q, rounds=rounds, explanation=explanation)


def _relative_gap(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _findings(
    *,
    clients: Sequence[ClientAudit],
    recorded_accountant: str,
    accountant: Accountant,
    cross: Accountant,
    summary: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    recorded: Mapping[tuple[str, int], tuple[float, float]],
    client_level: ClientLevelAudit,
) -> list[Finding]:
    out: list[Finding] = []
    dp = _config_section(_config_section(summary, "training"), "dp")
    calibrated = dp.get("target_epsilon") is not None
    summary_clients = _config_section(summary, "clients")

    if recorded_accountant not in {a.value for a in Accountant}:
        out.append(
            _finding(
                "PFA006",
                "accountant",
                f"the ledger was accounted with {recorded_accountant!r}. A GDP (central-limit) accountant approximates "
                "the privacy curve and can under-report epsilon for few steps or large sampling rates; its figures are "
                "not an upper bound. This audit recomputed every figure with PRV.",
                'Re-run with training.dp.accountant = "prv" (the default) or "rdp" and quote those figures.',
            )
        )

    exhausted: list[ClientAudit] = []
    for c in clients:
        f = f"clients.{c.client}"
        if c.epsilon > HIGH_EPSILON:
            out.append(
                _finding(
                    "PFA001",
                    f"{f}.epsilon",
                    f"client {c.client!r} spent epsilon {c.epsilon:.3g} > {HIGH_EPSILON:g}: a membership-inference "
                    f"attacker's odds may grow by e^{c.epsilon:.3g}, which does not meaningfully protect a record.",
                    "Lower target_epsilon (or raise noise_multiplier), train fewer rounds, or use larger batches.",
                )
            )
        if c.num_examples is not None and c.delta >= 1.0 / c.num_examples:
            out.append(
                _finding(
                    "PFA002",
                    f"{f}.delta",
                    f"client {c.client!r}: delta {c.delta:g} >= 1/n = {1 / c.num_examples:.3g} (n={c.num_examples}); a "
                    "guarantee this loose is met by a mechanism that publishes one record outright.",
                    "Re-run with training.dp.delta << 1/n for the smallest client (e.g. below 1/(10 n)).",
                )
            )
        if c.epsilon > c.epsilon_budget * (1 + 1e-9):
            out.append(
                _finding(
                    "PFA003",
                    f"{f}.epsilon",
                    f"client {c.client!r} spent epsilon {c.epsilon:.4g} > its budget {c.epsilon_budget:.4g}. The ledger "
                    "refuses such training, so the ledger was edited or a different accountant is being compared.",
                    "Do not release this model under the stated budget; investigate how the ledger was produced.",
                )
            )
        elif math.isfinite(c.epsilon_budget) and (c.rounds_skipped or c.epsilon_remaining <= 0.01 * c.epsilon_budget):
            # At budget: within 1% of it, or already unable to afford a round.
            exhausted.append(c)
        low = [s for s in c.noise_multipliers if s < LOW_NOISE]
        if low:
            out.append(
                _finding(
                    "PFA005",
                    f"{f}.noise_multiplier",
                    f"client {c.client!r} trained with noise multiplier {min(low):.3g} < {LOW_NOISE:g}: little noise per "
                    "step, so epsilon grows quickly and the guarantee is weak.",
                    "Raise training.dp.noise_multiplier to 0.5 or more, or lower target_epsilon.",
                )
            )
        if c.rounds_skipped:
            out.append(
                _finding(
                    "PFA007",
                    f"{f}.rounds_skipped",
                    f"client {c.client!r} was sampled but skipped in {c.rounds_skipped} round(s) because another round "
                    "would have exceeded its budget: its data stopped contributing, which can bias the model.",
                    "Give it a budget that covers every round it may be sampled in (target_epsilon calibrates for that), "
                    "or raise planned_participation_quantile when client_fraction < 1.",
                )
            )
        if c.rounds_dropped:
            out.append(
                _finding(
                    "PFA008",
                    f"{f}.rounds_dropped",
                    f"client {c.client!r} trained and was charged epsilon in {c.rounds_dropped} round(s) whose update "
                    "was not aggregated (dropout or abort): privacy was spent for nothing.",
                    "Check the transport and the secure-aggregation threshold; the ledger keeps the charge either way.",
                )
            )
        if math.isinf(c.epsilon_budget):
            out.append(
                _finding(
                    "PFA009",
                    f"{f}.epsilon_budget",
                    f"client {c.client!r} has no epsilon cap: the ledger records spending but would never stop it, so "
                    "resuming or extending the run keeps spending.",
                    "Set training.dp.budget_epsilon (with a fixed noise_multiplier) or use target_epsilon.",
                )
            )
        if c.steps and accountant is not cross:
            prv, rdp = (c.epsilon, c.epsilon_cross_check) if accountant is Accountant.PRV else (c.epsilon_cross_check, c.epsilon)
            if prv > rdp * (1 + CROSS_CHECK_TOLERANCE):
                out.append(
                    _finding(
                        "PFA010",
                        f"{f}.epsilon",
                        f"client {c.client!r}: PRV gives epsilon {prv:.4g} but RDP, a looser upper bound, gives {rdp:.4g}; "
                        "PRV should be the tighter figure, so its discretisation error is larger than assumed.",
                        "Quote the larger (RDP) figure for this run, and report the disagreement with the event list.",
                    )
                )
        bad = [
            (r, rec, new)
            for (name, r), (rec, new) in sorted(recorded.items())
            if name == c.client and _relative_gap(rec, new) > RECORDED_TOLERANCE and not (rec == 0 and new == 0)
        ]
        summary_eps = (summary_clients.get(c.client) or {}).get("epsilon") if isinstance(summary_clients.get(c.client), Mapping) else None
        if summary_eps is not None and _relative_gap(float(summary_eps), c.epsilon) > RECORDED_TOLERANCE:
            bad.append((None, float(summary_eps), c.epsilon))
        if bad:
            r, rec, new = bad[0]
            where = f"round {r} of {LEDGER_FILE}" if r is not None else "summary.json"
            out.append(
                _finding(
                    "PFA011",
                    f"{f}.epsilon",
                    f"client {c.client!r}: {where} records epsilon {rec:.4g} but its events give {new:.4g} "
                    f"({len(bad)} mismatch(es)); the recorded figures cannot be trusted.",
                    "Check that the files come from one run and were not edited; quote the recomputed figures.",
                )
            )

    if exhausted:
        spent = ", ".join(f"{c.client!r} {c.epsilon:.3f}/{c.epsilon_budget:g}" for c in exhausted)
        out.append(
            _finding(
                "PFA004",
                "clients.epsilon_budget",
                f"at budget (spent/budget): {spent}. Any further round for these clients (a resumed or "
                "extended run, fine-tuning on their data) will skip them."
                + (" The run was calibrated to spend exactly this budget, so this is expected." if calibrated else ""),
                "Nothing to fix if the run is final; to train more, plan the extra rounds into a new run's budget.",
                severity=Severity.INFO if calibrated else Severity.WARNING,
            )
        )
    aborted = [h.get("round") for h in history if h.get("aborted")]
    if aborted:
        out.append(
            _finding(
                "PFA008",
                "rounds.aborted",
                f"round(s) {aborted} aborted: their clients were charged epsilon but nothing was aggregated.",
                "Lower the secure-aggregation threshold or fix the dropouts that took the round below it.",
            )
        )
    if client_level.enabled and (client_level.sample_rate or 1.0) < 1.0 and summary.get("client_sampling_secret") is not True:
        # The amplification by sampling assumes nobody knows who took part. A seeded sample (or a
        # run from before samples were secret, which drew them from the public seed) is known to
        # anyone holding the config: against them each round is the Gaussian mechanism at q = 1.
        try:
            unamplified = _epsilon(
                [DPEvent(noise_multiplier=client_level.noise_multiplier, sample_rate=1.0, steps=client_level.rounds)],
                client_level.delta,
                Accountant.PRV,
            )
        except (ConfigError, TypeError):
            unamplified = math.inf
        why = "was drawn from federation.noise_seed" if "client_sampling_secret" in summary else "is not recorded as secret"
        out.append(
            _finding(
                "PFA013",
                "federation.client_sampling",
                f"client sampling {why}: anyone holding the config can recompute which clients took part in each "
                f"round, so the client-level epsilon {client_level.epsilon:.3g} (amplified by sampling at "
                f"q = {client_level.sample_rate:.3g}) does not hold against them; against them it is "
                f"{unamplified:.3g} (q = 1).",
                "Leave federation.noise_seed unset outside simulations: privfl then samples clients from OS entropy.",
            )
        )
    if not client_level.enabled:
        out.append(
            _finding(
                "PFA012",
                "federation.client_dp",
                "no client-level DP: a whole site's participation and data distribution are not protected "
                "(client-level epsilon = infinity); only each record inside a site is.",
                "Add a [federation.client_dp] section (DP-FedAvg) if a site's participation itself is sensitive.",
            )
        )
    order = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}
    return sorted(out, key=lambda f: (order[f.severity], f.code, f.field))


# -- rendering ---------------------------------------------------------------------------------------
def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """A pipe table padded so it reads as aligned columns in a terminal too."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _markdown(
    *,
    run_dir: Path,
    accountant: Accountant,
    cross: Accountant,
    protection: str,
    rounds: int,
    aborted: Sequence[int],
    clients: Sequence[ClientAudit],
    client_level: ClientLevelAudit,
    findings: Sequence[Finding],
    paths: AuditPaths,
    ledger: LedgerIntegrity,
) -> str:
    deltas = sorted({c.delta for c in clients})
    worst = max(clients, key=lambda c: c.epsilon) if clients else None
    out = [
        f"# Privacy audit of {run_dir}",
        "",
        f"- protection: {protection}",
        f"- accountant: {accountant.value} (cross-check: {cross.value})",
        f"- rounds: {rounds}" + (f" ({len(aborted)} aborted: {list(aborted)})" if aborted else ""),
        f"- delta: {', '.join(f'{d:g}' for d in deltas) or '-'}",
        f"- ledger: {ledger.lines} lines verified ({'hash chain and MAC' if ledger.authenticated else 'hash chain only'}), "
        f"consistent with history.json; head {ledger.head}"
        + (f"; {ledger.interrupted_entries} entries of interrupted rounds (charged)" if ledger.interrupted_entries else ""),
    ]
    if worst is not None:
        out.append(f"- largest sample-level epsilon: {worst.epsilon:.3f} ({worst.client})")
    out.append(f"- client-level epsilon: {_num(client_level.epsilon)}")
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
    header = ["client", "n", "sigma", "q", "steps", "epsilon", cross.value, "budget", "remaining", "delta", "trained", "skipped", "dropped"]
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
                str(c.rounds_skipped),
                str(c.rounds_dropped),
            ]
        )
    out.append(_table(header, rows, [False] + [True] * (len(header) - 1)))
    out += ["", "### Epsilon after each round", ""]
    header = ["round", *(c.client for c in clients)]
    rows = [[str(r), *(_num(c.epsilon_by_round[r]) for c in clients)] for r in range(rounds)]
    out.append(_table(header, rows, [True] * len(header)))
    out += ["", "## Client-level DP (a whole client's participation)", "", client_level.explanation, ""]
    out += ["## Findings", ""]
    if not findings:
        out.append("No findings.")
    for f in findings:
        out.append(f"- **{f.severity.value.upper()} {f.code}** `{f.field}`: {f.message}")
        out.append(f"  - fix: {f.fix}")
    out += ["", "## Files", "", f"- {paths.markdown.name}, {paths.json.name}, {paths.plot.name} in {paths.markdown.parent}", ""]
    return "\n".join(out)


def _report_json(
    *,
    run_dir: Path,
    accountant: Accountant,
    cross: Accountant,
    protection: str,
    rounds: int,
    aborted: Sequence[int],
    clients: Sequence[ClientAudit],
    client_level: ClientLevelAudit,
    findings: Sequence[Finding],
    paths: AuditPaths,
    ledger: LedgerIntegrity,
) -> dict[str, Any]:
    def finite(value: float | None) -> float | None:
        return None if value is None or math.isinf(value) else value

    return {
        "format_version": FORMAT_VERSION,
        "run_dir": str(run_dir),
        "protection": protection,
        "accountant": accountant.value,
        "cross_check_accountant": cross.value,
        "rounds": rounds,
        "aborted_rounds": list(aborted),
        "sample_level": {
            c.client: {
                "num_examples": c.num_examples,
                "delta": c.delta,
                "epsilon": c.epsilon,
                "epsilon_cross_check": c.epsilon_cross_check,
                "epsilon_budget": finite(c.epsilon_budget),
                "epsilon_remaining": finite(c.epsilon_remaining),
                "epsilon_by_round": list(c.epsilon_by_round),
                "noise_multipliers": list(c.noise_multipliers),
                "sample_rates": list(c.sample_rates),
                "steps": c.steps,
                "rounds_trained": c.rounds_trained,
                "rounds_skipped": c.rounds_skipped,
                "rounds_dropped": c.rounds_dropped,
            }
            for c in clients
        },
        "client_level": {
            "enabled": client_level.enabled,
            "epsilon": finite(client_level.epsilon),
            "protected": math.isfinite(client_level.epsilon),
            "delta": client_level.delta,
            "noise_multiplier": client_level.noise_multiplier,
            "sample_rate": client_level.sample_rate,
            "rounds": client_level.rounds,
            "explanation": client_level.explanation,
        },
        "warnings": [f.to_json() for f in findings],
        "files": {"markdown": str(paths.markdown), "json": str(paths.json), "plot": str(paths.plot)},
        "ledger": {
            "lines": ledger.lines,
            "head": ledger.head,
            "authenticated": ledger.authenticated,
            "interrupted_entries": ledger.interrupted_entries,
        },
    }


def _plot(path: Path, clients: Sequence[ClientAudit], history: Sequence[Mapping[str, Any]], accountant: Accountant) -> None:
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    for c in clients:
        rounds = list(range(len(c.epsilon_by_round)))
        (line,) = left.plot(rounds, c.epsilon_by_round, marker="o", markersize=3, label=c.client)
        if math.isfinite(c.epsilon_budget):
            left.axhline(c.epsilon_budget, color=line.get_color(), linestyle=":", linewidth=1)
    left.set_xlabel("round (as numbered in the ledger)")
    left.set_ylabel(f"epsilon ({accountant.value.upper()})")
    left.set_title("sample-level epsilon per client (dotted: budget)")
    left.set_ylim(bottom=0)
    if clients:
        left.legend(fontsize="small")
    accuracy = [(int(h["round"]), h.get("test_accuracy")) for h in history if h.get("test_accuracy") is not None]
    if accuracy:
        right.plot([r for r, _ in accuracy], [a for _, a in accuracy], marker="o", markersize=3, color="black")
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
    """Audits a finished run directory and writes ``audit.md``, ``audit.json`` and ``audit.png``.

    Args:
        run_dir: a directory written by ``privfl run`` (ledger.jsonl and ledger.key, summary.json,
            history.json).
        out_dir: where to write the three files (default: ``run_dir``).
        accountant: compose with this accountant instead of the ledger's (the other one is the
            cross-check). Default: the ledger's.

    Returns:
        The audit; ``report.markdown`` is what ``audit.md`` holds, ``report.to_json()`` what
        ``audit.json`` holds.

    Raises:
        LedgerError: the ledger is corrupt or edited (a line breaks the hash chain or its MAC), its
            key is missing, or it disagrees with history.json (a training the history records has
            no ledger entry, or the other way round) or with the lines history and summary recorded.
        ConfigError: ``run_dir`` is missing or lacks one of the files, a file is not valid,
            or ``accountant`` is not ``"prv"`` or ``"rdp"``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError("run_dir", str(run_dir), "does not exist or is not a directory")
    ledger, recorded_accountant = _load_ledger(run_dir)
    summary = _read_json(run_dir / SUMMARY_FILE, "written when a run finishes; resume an interrupted run first")
    _read_json(run_dir / HISTORY_FILE, "the per-round history")  # missing: the same message as the others
    history = load_history(run_dir / HISTORY_FILE)
    if not isinstance(summary, dict):
        raise ConfigError("run_dir", str(run_dir), "summary.json must hold an object")
    # Every training the history records is charged in the ledger and vice versa, and the ledger
    # still holds the lines the history and summary saw: a removed or edited entry is an error.
    check_ledger_against_history(ledger, history, run_dir / LEDGER_FILE)
    _check_summary_anchor(ledger, summary, run_dir / LEDGER_FILE)
    if accountant is None:
        primary = Accountant(recorded_accountant) if recorded_accountant in {a.value for a in Accountant} else Accountant.PRV
    else:
        try:
            primary = Accountant(accountant)
        except ValueError:
            raise ConfigError("accountant", accountant, f"must be one of {[a.value for a in Accountant]}") from None
    cross = Accountant.RDP if primary is Accountant.PRV else Accountant.PRV

    clients, rounds, recorded = _client_audits(ledger, summary, history, primary, cross)
    if primary.value != recorded_accountant:
        recorded = {}  # the recorded figures used another accountant; comparing them would be meaningless
    client_level = _client_level(summary, rounds, history)
    findings = tuple(
        _findings(
            clients=clients,
            recorded_accountant=recorded_accountant,
            accountant=primary,
            cross=cross,
            summary=summary,
            history=history,
            recorded=recorded,
            client_level=client_level,
        )
    )
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    paths = AuditPaths(markdown=out / "audit.md", json=out / "audit.json", plot=out / "audit.png")
    protection = str(summary.get("protection", "unknown"))
    aborted = tuple(int(h["round"]) for h in history if h.get("aborted"))
    integrity = LedgerIntegrity(
        lines=ledger.lines, head=ledger.head or "", authenticated=ledger.authenticated, interrupted_entries=len(ledger.superseded())
    )
    common = dict(
        run_dir=run_dir,
        accountant=primary,
        cross=cross,
        protection=protection,
        rounds=rounds,
        aborted=aborted,
        clients=clients,
        client_level=client_level,
        findings=findings,
        paths=paths,
        ledger=integrity,
    )
    markdown = _markdown(**common)
    report = AuditReport(
        run_dir=run_dir,
        accountant=primary,
        cross_check_accountant=cross,
        protection=protection,
        rounds=rounds,
        aborted_rounds=aborted,
        clients=clients,
        client_level=client_level,
        warnings=findings,
        markdown=markdown,
        paths=paths,
        ledger=integrity,
    )
    _write(paths.markdown, markdown)
    _write(paths.json, json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n")
    _plot(paths.plot, clients, history, primary)
    return report
