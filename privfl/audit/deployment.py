"""The privacy audit of a deployed run as a whole (``privfl audit DIR`` on a deployment).

A deployment keeps no ledger at the server: every site keeps its own in its state directory
(:mod:`privfl.site`), and the server's run directory holds only what each site reported. Where the
sites' state directories are at hand (``privfl deploy local`` writes them to ``DIR/sites/NAME/state``;
an operator may also gather copies), this audit checks the run from both sides:

* each site's own ledger, as ``privfl audit --site`` does (:func:`privfl.audit.site.audit_site`:
  hash chain and MACs, epsilon recomputed with two accountants, the budget);
* that ledger against the server's record of the run: a round the server's history shows a site
  trained in must be charged in that site's ledger under the run's id (otherwise the ledger lost a
  charge: rolled back or replaced), and the epsilon the site reported must be what its ledger says
  after the run's last charge. Charges the server has no record of (an update lost on the way, a
  round interrupted by a crash) are listed: they count against the site's budget.

It writes ``deployment-audit.md`` and ``deployment-audit.json``, and each site's ``site-audit.md`` /
``site-audit.json`` under ``sites/NAME/`` next to them (never into a site's state directory).
Without the sites' state directories it refuses and says where the ledgers are.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from privfl.accounting import Accountant
from privfl.aggregator import AGGREGATOR_FILE
from privfl.audit.report import epsilon_by_round_table, plot_epsilon
from privfl.audit.rules import NO_CLIENT_DP, NO_CLIENT_DP_FIX, SEVERITY_ORDER, Severity
from privfl.audit.site import TOLERANCE, SiteAudit, SiteFinding, SiteRunAudit, audit_site, write_report
from privfl.errors import ConfigError, LedgerError
from privfl.results import SHOWN_ONE_BY_ONE
from privfl.site import SITE_FILE, _plain_name

__all__ = ["DeploymentAudit", "DeploymentSiteAudit", "audit_deployment", "find_deployment", "server_run_dir"]

DEPLOYMENT_AUDIT_FORMAT = 1
_SHOWN_OF_MANY = 3  # findings of one kind given in full past SHOWN_ONE_BY_ONE sites


@dataclass(frozen=True, kw_only=True, slots=True)
class DeploymentSiteAudit:
    """One site of the run: its own ledger's account against the server's record.

    Attributes:
        site: the site's name.
        state_dir: the state directory audited.
        audit: the site's own audit (every run its ledger holds).
        epsilon_after_run: the site's total epsilon once this run's last charge was made (its ledger;
            None when its ledger holds nothing for this run).
        epsilon_run: epsilon of this run's trainings alone.
        rounds_charged: trainings the site's ledger charged for this run.
        rounds_recorded: rounds the server's history lists the site as trained in.
        reported_epsilon: the epsilon the server recorded as the site's last report (None if none).
        epsilon_by_round: the site's total epsilon (its ledger) after each round the server recorded,
            carried over the rounds it was not charged in (before its first charge of the run: its
            total from earlier runs).
    """

    site: str
    state_dir: Path
    audit: SiteAudit
    epsilon_after_run: float | None
    epsilon_run: float
    rounds_charged: int
    rounds_recorded: int
    reported_epsilon: float | None
    epsilon_by_round: tuple[float, ...] = ()

    @property
    def client(self) -> str:
        """The site's name (what the per-round table and plot of :mod:`privfl.audit.report` read)."""
        return self.site

    @property
    def epsilon(self) -> float:
        return self.audit.epsilon

    @property
    def epsilon_budget(self) -> float:
        return self.audit.epsilon_budget


@dataclass(frozen=True, kw_only=True, slots=True)
class DeploymentAudit:
    """The result of :func:`audit_deployment`.

    Attributes:
        run_dir: the server's run directory.
        run: the run's id.
        rounds: rounds the server recorded.
        sites: the audited sites, in the order the run names them.
        missing: sites the run names whose state directory was not found (not audited).
        findings: errors first.
        paths: the files written.
    """

    run_dir: Path
    run: str
    rounds: int
    sites: tuple[DeploymentSiteAudit, ...]
    missing: tuple[str, ...]
    findings: tuple[SiteFinding, ...]
    paths: tuple[Path, ...] = ()

    @property
    def errors(self) -> tuple[SiteFinding, ...]:
        return tuple(f for f in self.findings if f.severity is Severity.ERROR)

    def to_json(self) -> dict[str, Any]:
        def finite(value: float | None) -> float | None:
            return value if value is not None and math.isfinite(value) else None

        return {
            "format": DEPLOYMENT_AUDIT_FORMAT,
            "run_dir": str(self.run_dir),
            "run": self.run,
            "rounds": self.rounds,
            "sites": [
                {
                    "site": s.site, "state_dir": str(s.state_dir), "epsilon": finite(s.audit.epsilon),
                    "epsilon_budget": finite(s.audit.epsilon_budget), "epsilon_after_run": finite(s.epsilon_after_run),
                    "epsilon_run": finite(s.epsilon_run), "reported_epsilon": finite(s.reported_epsilon),
                    "rounds_charged": s.rounds_charged, "rounds_recorded": s.rounds_recorded,
                    "epsilon_by_round": [finite(e) for e in s.epsilon_by_round],
                    "ledger": {"lines": s.audit.lines, "head": s.audit.head, "authenticated": s.audit.authenticated},
                }
                for s in self.sites
            ],
            "missing": list(self.missing),
            "findings": [
                {"severity": f.severity.value, "kind": f.kind, "site": f.site or None, "message": f.message} for f in self.findings
            ],
        }

    def to_markdown(self) -> str:
        out = [
            f"# Privacy audit of deployed run {self.run}",
            "",
            f"- server's run directory: `{self.run_dir}` ({self.rounds} rounds recorded)",
            f"- sites audited from their own ledgers: {len(self.sites)}"
            + (f"; not found here: {', '.join(self.missing)}" if self.missing else ""),
            "",
            "| site | epsilon after the run (its ledger) | reported to the server | budget | charged in the run | recorded by the server | epsilon now |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for s in self.sites:
            budget = "uncapped" if math.isinf(s.audit.epsilon_budget) else f"{s.audit.epsilon_budget:.3f}"
            reported = "-" if s.reported_epsilon is None else _num(s.reported_epsilon)
            after = "-" if s.epsilon_after_run is None else _num(s.epsilon_after_run)
            out.append(
                f"| {s.site} | {after} | {reported} | {budget} | {s.rounds_charged} | {s.rounds_recorded} "
                f"| {_num(s.audit.epsilon)} |"
            )
        charted = _charted(self.sites)
        if charted and self.rounds:
            out += ["", "## Epsilon after each round (each site's ledger)", ""]
            left_out = len(self.sites) - len(charted)
            if left_out:
                out += [f"{left_out} site(s) whose ledger holds no entry of this run are left out.", ""]
            out += epsilon_by_round_table(charted, self.rounds, who="site", where="`sites[].epsilon_by_round` in deployment-audit.json")
        out += ["", "## Findings", ""]
        out += _findings_markdown(self.findings) or ["- none"]
        out += ["", "Each site's own report: `sites/NAME/site-audit.md` next to this file; the plot: `deployment-audit.png`."]
        return "\n".join(out) + "\n"


def _findings_markdown(findings: tuple[SiteFinding, ...]) -> list[str]:
    """The findings as Markdown items. When more than ``SHOWN_ONE_BY_ONE`` sites share a kind of
    finding, the findings of the first few of those sites are given in full and the other sites are
    named (every finding stays in deployment-audit.json). Findings about no one site (the run's) are
    always given in full."""
    groups: dict[tuple[Severity, str], list[SiteFinding]] = {}
    for f in findings:
        groups.setdefault((f.severity, f.kind if f.kind and f.site else f.message), []).append(f)
    out = []
    for (severity, _), group in groups.items():
        sites = list(dict.fromkeys(f.site for f in group))
        if len(sites) <= SHOWN_ONE_BY_ONE:
            out += [f"- **{f.severity.value}**: {f.message}" for f in group]
            continue
        first = set(sites[:_SHOWN_OF_MANY])
        out += [f"- **{f.severity.value}**: {f.message}" for f in group if f.site in first]
        rest = sites[_SHOWN_OF_MANY:]
        names = ", ".join(rest[:SHOWN_ONE_BY_ONE])
        more = f", and {len(rest) - SHOWN_ONE_BY_ONE} more" if len(rest) > SHOWN_ONE_BY_ONE else ""
        out.append(f"- **{severity.value}**: the same at {len(rest)} more sites (deployment-audit.json has each): {names}{more}")
    return out


def _num(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.3f}"


def find_deployment(path: str | os.PathLike[str]) -> tuple[Path, Path] | None:
    """(the server's run directory, the folder of the sites' folders) of a deployment, or None.

    ``path`` is a ``privfl deploy local`` directory (``run/`` and ``sites/`` in it) or the server's
    run directory of a deployment (``aggregator.json`` in it; its sites are looked for next to it).
    """
    root = Path(path)
    if (root / "run" / AGGREGATOR_FILE).is_file():
        return root / "run", root / "sites"
    if (root / AGGREGATOR_FILE).is_file():
        return root, root.parent / "sites"
    return None


def server_run_dir(path: str | os.PathLike[str]) -> Path:
    """The server's run directory: ``path/run`` for a ``privfl deploy local`` directory, else ``path``.

    So that ``privfl export``, ``privfl attack --run`` and :func:`privfl.load_model` take the same
    directory ``privfl audit`` does: the one ``privfl deploy local --out`` made.
    """
    found = find_deployment(path)
    return found[0] if found is not None else Path(path)


def _state_dir(sites_root: Path, name: str) -> Path | None:
    for candidate in (sites_root / name / "state", sites_root / name):
        if (candidate / SITE_FILE).is_file():
            return candidate
    return None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(what, str(path), f"cannot be read ({type(exc).__name__})") from None


def audit_deployment(path: str | os.PathLike[str], *, out_dir: str | os.PathLike[str] | None = None) -> DeploymentAudit:
    """Audits a deployed run from its sites' own ledgers and the server's record of it.

    Args:
        path: a ``privfl deploy local`` directory, or a deployment's server run directory with the
            sites' state directories in ``../sites/NAME/state`` (or ``../sites/NAME``).
        out_dir: where to write the reports (default: the server's run directory).

    Raises:
        ConfigError: ``path`` is not a deployment, none of its sites' state directories is here,
            its record is unreadable, or the reports cannot be written.
        LedgerError: a site's ledger is corrupt or edited (see :func:`privfl.audit.site.audit_site`).
    """
    found = find_deployment(path)
    if found is None:
        raise ConfigError("run_dir", str(path), f"is not a deployment ({AGGREGATOR_FILE} is missing)")
    run_dir, sites_root = found
    record = _read_json(run_dir / AGGREGATOR_FILE, AGGREGATOR_FILE)
    if not isinstance(record, dict) or not isinstance(record.get("run"), str) or not isinstance(record.get("sites"), list):
        raise ConfigError(AGGREGATOR_FILE, str(run_dir / AGGREGATOR_FILE), "does not name the run and its sites")
    run_id = record["run"]
    findings: list[SiteFinding] = []
    names: list[str] = []
    for name in record["sites"]:
        # Names become paths below: only plain names (no separators, not . or ..) are looked up or written.
        if _plain_name(name):
            names.append(name)
        else:
            findings.append(SiteFinding(
                severity=Severity.ERROR, kind="bad-name", message=f"the run names a site {name!r} that is not a plain name; not audited",
            ))
    states = {name: _state_dir(sites_root, name) for name in names}
    if not any(states.values()):
        raise ConfigError(
            "run_dir", str(path),
            "is a deployment's server directory: the server keeps no ledger, each site keeps its own. Audit each site "
            "where it runs (`privfl audit --site STATE_DIR`), or gather copies of the sites' state directories into "
            f"{sites_root.resolve()}/NAME/state (a sites/ folder next to the server's run directory, not inside it) and "
            "run this audit again",
        )
    history = _read_json(run_dir / "history.json", "history.json") or []
    if not (isinstance(history, list) and all(
        isinstance(h, dict) and isinstance(h.get("trained", []), list) and all(isinstance(n, str) for n in h.get("trained", []))
        for h in history
    )):
        raise ConfigError("history.json", str(run_dir / "history.json"), "is not a list of round records with their trained sites")
    summary = _read_json(run_dir / "summary.json", "summary.json") or {}
    identity = _read_json(run_dir / "run.json", "run.json") or {}
    federation = identity.get("federation") if isinstance(identity, dict) else None
    if isinstance(federation, dict) and "client_dp" in federation and not federation["client_dp"]:
        findings.append(SiteFinding(severity=Severity.WARNING, kind="no-client-dp", message=f"{NO_CLIENT_DP} {NO_CLIENT_DP_FIX}"))
    reported_by_summary = summary.get("clients", {}) if isinstance(summary, dict) else {}
    out = Path(out_dir) if out_dir is not None else run_dir
    sites: list[DeploymentSiteAudit] = []
    for name in names:
        state = states[name]
        if state is None:
            findings.append(SiteFinding(
                severity=Severity.WARNING, kind="not-found", site=name,
                message=f"site {name}: its state directory is not under {sites_root}; not audited (run `privfl audit --site` there)",
            ))
            continue
        owner = _read_json(state / SITE_FILE, SITE_FILE)
        if not isinstance(owner, dict) or owner.get("site") != name:
            findings.append(SiteFinding(severity=Severity.ERROR, kind="other-owner", site=name, message=f"site {name}: its state directory belongs to another site"))
            continue
        try:
            own = audit_site(state, out_dir=out / "sites" / name)
        except (LedgerError, ConfigError) as exc:
            # One site's broken ledger is that site's finding, not the end of everyone's audit.
            findings.append(SiteFinding(severity=Severity.ERROR, kind="unreadable-ledger", site=name, message=f"site {name}: its ledger cannot be audited: {exc}"))
            continue
        this_run = next((r for r in own.runs if r.run == run_id), None)
        recorded = sum(1 for h in history if name in h.get("trained", []))
        reported = _reported(name, history, reported_by_summary)
        site = DeploymentSiteAudit(
            site=name, state_dir=state, audit=own,
            epsilon_after_run=this_run.epsilon_after if this_run else None,
            epsilon_run=this_run.epsilon_run if this_run else 0.0,
            rounds_charged=this_run.rounds_trained if this_run else 0,
            rounds_recorded=recorded, reported_epsilon=reported,
            epsilon_by_round=_by_round(this_run, len(history)),
        )
        sites.append(site)
        findings += [SiteFinding(severity=f.severity, kind=f.kind, site=name, message=f"site {name}: {f.message}") for f in own.findings]
        findings += _compare(site)
    findings.sort(key=lambda f: SEVERITY_ORDER[f.severity])
    report = DeploymentAudit(
        run_dir=run_dir, run=run_id, rounds=len(history), sites=tuple(sites),
        missing=tuple(n for n in names if states[n] is None), findings=tuple(findings),
    )
    paths = write_report(out, "deployment-audit", report)
    plot = out / "deployment-audit.png"
    accountants = {s.audit.accountant for s in sites}
    try:
        plot_epsilon(plot, _charted(sites), history, accountants.pop() if len(accountants) == 1 else Accountant.PRV, who="site")
    except OSError as exc:
        raise ConfigError("out", str(out), f"cannot be written: {exc.strerror or exc}") from None
    return replace(report, paths=(*paths, plot))


def _charted(sites: Sequence[DeploymentSiteAudit]) -> list[DeploymentSiteAudit]:
    """The sites with an epsilon series for the run (a site whose ledger has no entry of it has none)."""
    return [s for s in sites if s.epsilon_by_round]


def _by_round(run: SiteRunAudit | None, rounds: int) -> tuple[float, ...]:
    """The site's total after each of the run's ``rounds`` (see ``DeploymentSiteAudit.epsilon_by_round``)."""
    if run is None:
        return ()
    charged = dict(run.epsilon_by_round)  # a round charged twice (an interrupted attempt): its last entry
    value, series = run.epsilon_before, []
    for r in range(rounds):
        value = charged.get(r, value)
        series.append(value)
    return tuple(series)


def _reported(name: str, history: list, summary_clients: dict) -> float | None:
    """The epsilon the server recorded as the site's last report (the summary, or the last round that has one)."""
    entry = summary_clients.get(name) if isinstance(summary_clients, dict) else None
    value = entry.get("epsilon") if isinstance(entry, dict) else None
    if value is None:
        for h in reversed(history):
            epsilons = h.get("epsilon") if isinstance(h, dict) else None
            if isinstance(epsilons, dict) and isinstance(epsilons.get(name), (int, float)):
                value = epsilons[name]
                break
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _compare(site: DeploymentSiteAudit) -> list[SiteFinding]:
    """The site's ledger against the server's record of the run."""
    findings = []
    name = site.site
    if site.rounds_recorded > site.rounds_charged:
        findings.append(SiteFinding(
            severity=Severity.ERROR, kind="charges-missing", site=name,
            message=f"site {name}: the server recorded it as trained in {site.rounds_recorded} rounds of the run, its ledger "
            f"charges {site.rounds_charged}: charges are missing (the ledger was rolled back or replaced), so its epsilon "
            "is understated; compare its head with the copy kept off-site",
        ))
    elif site.rounds_charged > site.rounds_recorded:
        findings.append(SiteFinding(
            severity=Severity.INFO, kind="charges-unrecorded", site=name,
            message=f"site {name}: its ledger charges {site.rounds_charged} trainings for the run, the server recorded "
            f"{site.rounds_recorded}: the other {site.rounds_charged - site.rounds_recorded} trained and were charged, but "
            "their update did not count (a lost reply, a refused or interrupted round); they count against its budget",
        ))
    reported = site.reported_epsilon
    if reported is not None and site.epsilon_after_run is not None and not (
        math.isclose(reported, site.epsilon_after_run, rel_tol=TOLERANCE, abs_tol=1e-9)
        or (math.isinf(reported) and math.isinf(site.epsilon_after_run))
    ):
        findings.append(SiteFinding(
            severity=Severity.WARNING, kind="report-differs", site=name,
            message=f"site {name}: the server recorded epsilon {_num(reported)} as its report, its ledger gives "
            f"{_num(site.epsilon_after_run)} after the run's last charge: the record of the run does not describe the "
            "site's spending (a report from another point of the run, or an edited record); the site's ledger is the one that counts",
        ))
    return findings
