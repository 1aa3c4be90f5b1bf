"""The privacy audit a site runs on its own ledger (``privfl audit --site STATE_DIR``).

In a deployment every site keeps its own ledger in its state directory (:mod:`privfl.site`): the
budget that counts is enforced there, and the server holds only what sites reported. This audit is
the site's own check of that ledger, over every run the site served:

* the hash chain and every line's MAC are verified under the site's ``ledger.key``;
* the epsilon spent is recomputed from the recorded DP-SGD events, with the ledger's accountant and
  the other one as a cross-check, and compared with the budget;
* every recorded epsilon (the running total the site wrote when it charged a training) is compared
  with the recomputed running total;
* the spending is broken down per run (the run id each charge names) and per round.

It writes ``site-audit.md`` and ``site-audit.json``. A run directory of ``privfl run`` (one ledger
for every site of an in-process federation) is audited with ``privfl audit RUN_DIR`` instead.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privfl.accounting import Accountant, DPEvent, LedgerKey, LedgerStatus, PrivacyLedger, epsilon_of_events
from privfl.audit.rules import HIGH_EPSILON, SEVERITY_ORDER, Severity
from privfl.errors import ConfigError

__all__ = ["SiteAudit", "SiteFinding", "SiteRunAudit", "audit_site"]

SITE_AUDIT_FORMAT = 1
TOLERANCE = 0.01
"""Recomputed and recorded figures (and PRV against RDP) may differ by this fraction before it is reported."""
_RUN_NOTE = re.compile(r"^run ([0-9a-f]{32})")


@dataclass(frozen=True, kw_only=True, slots=True)
class SiteRunAudit:
    """What one run spent at the site.

    Attributes:
        run: the run id its charges name ("-" for charges that name none).
        rounds_trained: trainings charged.
        rounds_skipped: rounds the site refused for its budget.
        steps: DP-SGD steps taken.
        noise_multipliers: the distinct noise multipliers it trained with.
        epsilon_run: epsilon of this run's trainings alone.
        epsilon_after: the site's total epsilon once this run's last charge was made.
        epsilon_before: the site's total epsilon when this run's first entry was written.
        epsilon_by_round: (round, the site's total epsilon after its entry for that round), for
            each round of the run the ledger has an entry for, in ledger order.
    """

    run: str
    rounds_trained: int
    rounds_skipped: int
    steps: int
    noise_multipliers: tuple[float, ...]
    epsilon_run: float
    epsilon_after: float
    epsilon_before: float = 0.0
    epsilon_by_round: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class SiteFinding:
    """One thing the audit found, with its severity and what to do.

    Attributes:
        severity: how much it matters.
        message: what was found and what to do.
        kind: a short name of what was found (the same for every site it is found at, e.g.
            ``"uncapped"``): a deployment's audit groups the findings of many sites by it.
        site: the site it is about, in a deployment's audit ("" for the run as a whole, and in a
            site's own audit).
    """

    severity: Severity
    message: str
    kind: str = ""
    site: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class SiteAudit:
    """The result of :func:`audit_site`.

    Attributes:
        site: the site's name (its state directory's ``site.json``).
        state_dir: the audited state directory.
        accountant: the ledger's accountant (every figure but the cross-check uses it).
        cross_check_accountant: the other accountant.
        delta: the site's delta.
        epsilon_budget: its budget (``math.inf`` when uncapped).
        epsilon: spent, recomputed.
        epsilon_cross_check: the same events under the cross-check accountant.
        runs: per run, in the order the ledger first names it.
        lines, head, authenticated: what was verified about the ledger file (keep ``head`` off-site:
            a rollback of the whole file is detectable only against it).
        findings: errors first.
        paths: the files written (``site-audit.md``, ``site-audit.json``).
    """

    site: str
    state_dir: Path
    accountant: Accountant
    cross_check_accountant: Accountant
    delta: float
    epsilon_budget: float
    epsilon: float
    epsilon_cross_check: float
    runs: tuple[SiteRunAudit, ...]
    lines: int
    head: str | None
    authenticated: bool
    findings: tuple[SiteFinding, ...]
    paths: tuple[Path, ...] = ()

    @property
    def epsilon_remaining(self) -> float:
        """Budget left (``math.inf`` when uncapped, never negative)."""
        return max(self.epsilon_budget - self.epsilon, 0.0)

    @property
    def errors(self) -> tuple[SiteFinding, ...]:
        return tuple(f for f in self.findings if f.severity is Severity.ERROR)

    def to_json(self) -> dict[str, Any]:
        def finite(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return {
            "format": SITE_AUDIT_FORMAT,
            "site": self.site,
            "state_dir": str(self.state_dir),
            "accountant": self.accountant.value,
            "cross_check_accountant": self.cross_check_accountant.value,
            "delta": self.delta,
            "epsilon_budget": finite(self.epsilon_budget),
            "epsilon": finite(self.epsilon),
            "epsilon_cross_check": finite(self.epsilon_cross_check),
            "epsilon_remaining": finite(self.epsilon_remaining),
            "runs": [
                {
                    "run": r.run, "rounds_trained": r.rounds_trained, "rounds_skipped": r.rounds_skipped, "steps": r.steps,
                    "noise_multipliers": list(r.noise_multipliers), "epsilon_run": finite(r.epsilon_run),
                    "epsilon_after": finite(r.epsilon_after),
                }
                for r in self.runs
            ],
            "ledger": {"lines": self.lines, "head": self.head, "authenticated": self.authenticated},
            "findings": [{"severity": f.severity.value, "kind": f.kind, "message": f.message} for f in self.findings],
        }

    def to_markdown(self) -> str:
        budget = "uncapped" if math.isinf(self.epsilon_budget) else f"{self.epsilon_budget:.3f}"
        out = [
            f"# Privacy audit of site {self.site}",
            "",
            f"- state directory: `{self.state_dir}`",
            f"- epsilon spent: **{_num(self.epsilon)}** of {budget} at delta {self.delta:g} "
            f"({self.accountant.value.upper()}; {self.cross_check_accountant.value.upper()} cross-check {_num(self.epsilon_cross_check)})",
            f"- remaining: {_num(self.epsilon_remaining)}",
            f"- ledger: {self.lines} lines verified (hash chain{'; every line MAC-checked under ledger.key' if self.authenticated else ''}); "
            f"head `{self.head}` (keep a copy off-site: a rollback of the whole file shows only against it)",
            "",
            "## Runs",
            "",
            "| run | trained | skipped | steps | noise multipliers | epsilon of the run | epsilon after it |",
            "|---|---:|---:|---:|---|---:|---:|",
        ]
        for r in self.runs:
            sigmas = ", ".join(f"{s:.4g}" for s in r.noise_multipliers) or "-"
            out.append(
                f"| {r.run} | {r.rounds_trained} | {r.rounds_skipped} | {r.steps} | {sigmas} | {_num(r.epsilon_run)} | {_num(r.epsilon_after)} |"
            )
        out += ["", "## Findings", ""]
        out += [f"- **{f.severity.value}**: {f.message}" for f in self.findings] or ["- none"]
        return "\n".join(out) + "\n"


def _num(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.3f}"


def _epsilon(events: Sequence[DPEvent], delta: float, accountant: Accountant) -> float:
    if not events:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns when the best RDP order is at its grid's edge
        return epsilon_of_events(events, delta=delta, accountant=accountant)


def _close(a: float, b: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= TOLERANCE * max(abs(a), abs(b), 1e-12)


def audit_site(state_dir: str | os.PathLike[str], *, out_dir: str | os.PathLike[str] | None = None) -> SiteAudit:
    """Audits a site's own ledger and writes ``site-audit.md`` and ``site-audit.json``.

    Args:
        state_dir: the site's state directory (``site.json``, ``ledger.jsonl``, ``ledger.key``).
        out_dir: where to write the two files (default: ``state_dir``).

    Raises:
        ConfigError: ``state_dir`` is not a site's state directory, or the report cannot be written.
        LedgerError: the ledger is corrupt or edited (a line breaks the hash chain or its MAC), or its key is missing.
    """
    from privfl.rundir import LEDGER_FILE, LEDGER_KEY_FILE
    from privfl.site import SITE_FILE

    state = Path(state_dir)
    marker = state / SITE_FILE
    if not marker.is_file():
        raise ConfigError("state_dir", str(state), f"is not a site's state directory ({SITE_FILE} is missing)")
    try:
        site = str(json.loads(marker.read_text())["site"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(SITE_FILE, str(marker), f"cannot be read ({type(exc).__name__})") from None
    if not (state / LEDGER_FILE).is_file():
        raise ConfigError("state_dir", str(state), f"holds no ledger ({LEDGER_FILE}): this site has not joined a run yet")
    ledger = PrivacyLedger.load(state / LEDGER_FILE, key=LedgerKey.read(state / LEDGER_KEY_FILE), accountant=Accountant.PRV)
    accountant = Accountant(ledger.recorded_accountant) if ledger.recorded_accountant in ("prv", "rdp", "pld") else Accountant.PRV
    cross = Accountant.RDP if accountant is not Accountant.RDP else Accountant.PRV
    if site not in ledger.clients:
        raise ConfigError("state_dir", str(state), f"its ledger has no account for site {site!r}")
    budget = ledger.budget(site)
    findings: list[SiteFinding] = []
    events: list[DPEvent] = []
    total = 0.0
    runs: dict[str, dict[str, Any]] = {}
    for line, entry in enumerate(ledger.entries, start=1):
        if entry.client != site:
            continue
        match = _RUN_NOTE.match(entry.note)
        run = runs.setdefault(
            match.group(1) if match else "-", {"trained": 0, "skipped": 0, "events": [], "after": 0.0, "before": total, "by_round": []}
        )
        if entry.status is LedgerStatus.TRAINED:
            event = DPEvent(noise_multiplier=entry.noise_multiplier, sample_rate=entry.sample_rate, steps=entry.steps)
            events.append(event)
            run["events"].append(event)
            run["trained"] += 1
            total = _epsilon(events, budget.delta, accountant)  # only a training moves it
        elif entry.status is LedgerStatus.SKIPPED_BUDGET:
            run["skipped"] += 1
        run["after"] = total
        run["by_round"].append((entry.round, total))
        if not _close(entry.epsilon, total):
            findings.append(SiteFinding(
                severity=Severity.WARNING, kind="recorded-epsilon",
                message=f"entry {line} (round {entry.round}) records epsilon {_num(entry.epsilon)}, the events up to it give "
                f"{_num(total)}: the ledger was written by another accountant or edited by someone holding its key",
            ))
    epsilon = total
    cross_value = _epsilon(events, budget.delta, cross)
    audits = tuple(
        SiteRunAudit(
            run=run_id, rounds_trained=run["trained"], rounds_skipped=run["skipped"],
            steps=sum(e.steps for e in run["events"]),
            noise_multipliers=tuple(sorted({e.noise_multiplier for e in run["events"]})),
            epsilon_run=_epsilon(run["events"], budget.delta, accountant), epsilon_after=run["after"],
            epsilon_before=run["before"], epsilon_by_round=tuple(run["by_round"]),
        )
        for run_id, run in runs.items()
    )
    if epsilon > budget.epsilon * (1 + 1e-9):
        findings.append(SiteFinding(
            severity=Severity.ERROR, kind="over-budget",
            message=f"epsilon spent {_num(epsilon)} is above the budget {budget.epsilon:g}: the site's guarantee is void; "
            "stop training here and find out which run charged past the budget",
        ))
    if epsilon > HIGH_EPSILON:
        findings.append(SiteFinding(
            severity=Severity.WARNING, kind="high-epsilon",
            message=f"epsilon spent {_num(epsilon)} is above {HIGH_EPSILON:g}: the e^epsilon factor no longer bounds what an attacker learns",
        ))
    if accountant is Accountant.PRV and cross_value < epsilon * (1 - TOLERANCE):
        findings.append(SiteFinding(
            severity=Severity.WARNING, kind="prv-above-rdp",
            message=f"PRV gives {_num(epsilon)}, above RDP's {_num(cross_value)} by more than {TOLERANCE:.0%}: PRV's "
            "numerical error; RDP is a valid upper bound to quote instead",
        ))
    if math.isinf(budget.epsilon):
        findings.append(SiteFinding(severity=Severity.WARNING, kind="uncapped", message="the site's budget is uncapped: nothing stops it from spending more"))
    if not ledger.authenticated:
        findings.append(SiteFinding(severity=Severity.WARNING, kind="no-mac", message="the ledger's lines carry no MAC: anyone who can write the file can rewrite it consistently"))
    findings.sort(key=lambda f: SEVERITY_ORDER[f.severity])
    report = SiteAudit(
        site=site, state_dir=state, accountant=accountant, cross_check_accountant=cross, delta=budget.delta,
        epsilon_budget=budget.epsilon, epsilon=epsilon, epsilon_cross_check=cross_value, runs=audits,
        lines=ledger.lines, head=ledger.head, authenticated=ledger.authenticated, findings=tuple(findings),
    )
    from dataclasses import replace

    return replace(report, paths=write_report(Path(out_dir) if out_dir is not None else state, "site-audit", report))


def write_report(out: Path, stem: str, report: Any) -> tuple[Path, Path]:
    """Writes ``STEM.md`` and ``STEM.json`` (``report.to_markdown()``, ``report.to_json()``) into ``out``.

    Raises:
        ConfigError: ``out`` cannot be created or written.
    """
    paths = (out / f"{stem}.md", out / f"{stem}.json")
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths[0].write_text(report.to_markdown())
        paths[1].write_text(json.dumps(report.to_json(), indent=2) + "\n")
    except OSError as exc:
        raise ConfigError("out", str(out), f"cannot be written: {exc.strerror or exc}") from None
    return paths
