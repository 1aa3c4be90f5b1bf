"""The one registry of privacy rules, checked by ``privfl lint`` (a config, PFL codes) and ``privfl audit`` (a run, PFA codes).

A rule is data: its code (one per tool it runs in, each with its severity and its line in
``docs/audits.md``), a title, the default fix, and a check function over a small typed facts
object. A check that applies both to a config and to a run is written once, over :class:`Facts`,
and carries both codes, so the linter and the audit cannot drift apart; a check that only makes
sense for one of them is registered with that tool's code only (its facts type is
:class:`privfl.audit.lint.ConfigFacts` or :class:`privfl.audit.report.RunFacts`).

Codes never change meaning: users' suppressions and the docs name them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar

__all__ = [
    "HIGH_EPSILON",
    "LOW_NOISE",
    "SEVERITY_ORDER",
    "ClientFacts",
    "Code",
    "Facts",
    "Finding",
    "Hit",
    "Rule",
    "Severity",
    "Tool",
    "apply_rules",
    "codes",
    "register",
    "registry",
    "rules_table",
]

HIGH_EPSILON = 10.0
"""Above this epsilon the e^epsilon factor (> 22,000) no longer bounds what an attacker learns in practice."""
LOW_NOISE = 0.5
"""Noise multipliers below this give large epsilons for any realistic number of steps."""


class Severity(str, Enum):
    """How serious a finding is."""

    ERROR = "error"
    """The privacy claim is void, or the run cannot work as configured."""
    WARNING = "warning"
    """The claim holds but is weak, unenforced or easy to misread."""
    INFO = "info"
    """How privfl counts or protects something; nothing to fix unless it surprises you."""


SEVERITY_ORDER: Mapping[Severity, int] = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}
"""Findings are listed errors first, then warnings, then infos."""


class Tool(str, Enum):
    """What a rule is checked on."""

    LINT = "lint"
    """A run config, before anything runs (``privfl lint``, PFL codes)."""
    AUDIT = "audit"
    """A run directory, after the run (``privfl audit``, PFA codes)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Finding:
    """One result of a check.

    Attributes:
        severity: ERROR, WARNING or INFO.
        code: the rule's stable code, e.g. ``"PFL002"`` or ``"PFA002"`` (see :func:`registry`).
        field: dotted path of the setting or record concerned, e.g. ``"training.dp.delta"``.
        message: what was found and why it matters.
        fix: how to fix it (or what to do if it is intended).
    """

    severity: Severity
    code: str
    field: str
    message: str
    fix: str

    def to_json(self) -> dict[str, str]:
        """A JSON-ready dict."""
        return {"severity": self.severity.value, "code": self.code, "field": self.field, "message": self.message, "fix": self.fix}


@dataclass(frozen=True, kw_only=True, slots=True)
class Code:
    """A rule's public code in one tool.

    Attributes:
        code: e.g. ``"PFL002"`` (lint) or ``"PFA002"`` (audit).
        tool: the tool that reports it.
        severity: the severity of its findings unless a check says otherwise.
        also: the other severities a check may give it (listed in the docs table).
        description: its line in the rules table of ``docs/audits.md``.
    """

    code: str
    tool: Tool
    severity: Severity
    description: str
    also: tuple[Severity, ...] = ()


def lint_code(code: str, severity: Severity, description: str, **kw: Any) -> Code:
    """A PFL code (``privfl lint``)."""
    return Code(code=code, tool=Tool.LINT, severity=severity, description=description, **kw)


def audit_code(code: str, severity: Severity, description: str, **kw: Any) -> Code:
    """A PFA code (``privfl audit``)."""
    return Code(code=code, tool=Tool.AUDIT, severity=severity, description=description, **kw)


@dataclass(frozen=True, kw_only=True, slots=True)
class Hit:
    """What a check found; the rule adds the code and, unless given here, the severity and the fix.

    Attributes:
        field: dotted path of the setting or record concerned.
        message: what was found and why it matters.
        fix: a fix worded for this hit (default: the rule's).
        severity: a severity other than the code's default (one of its ``also``).
        rank: for a per-client rule checked on a config, the hit with the highest rank is reported;
            checked on a run, its hits are listed highest rank first.
        supersedes: codes whose finding on the same field this hit makes redundant (it states the same
            fact more strongly, e.g. "private in name only" over "noise multiplier below 0.5").
    """

    field: str
    message: str
    fix: str | None = None
    severity: Severity | None = None
    rank: float = 0.0
    supersedes: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientFacts:
    """What one client's sample-level guarantee rests on: as planned (a config) or as recorded (a run).

    Attributes:
        client: the client's name; None for a config's own settings, which hold for every client.
        num_examples: its number of training examples (None if unknown).
        delta: its sample-level delta.
        noise_multiplier: the smallest noise multiplier it trains with (None if not known yet:
            calibrated from client sizes that were not given).
        epsilon: its epsilon over the run (planned or spent; None if unknown).
        epsilon_basis: where ``epsilon`` comes from, e.g. ``"target_epsilon"`` or ``"spent, PRV"``.
        epsilon_budget: its cap (``math.inf`` when uncapped).
    """

    client: str | None
    num_examples: int | None
    delta: float
    noise_multiplier: float | None
    epsilon: float | None
    epsilon_basis: str
    epsilon_budget: float

    @property
    def who(self) -> str:
        """How a message names the subject."""
        return "every client" if self.client is None else f"client {self.client!r}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Facts:
    """What the rules shared by lint and audit read; each tool's facts add what its own rules need.

    Attributes:
        clients: per-client facts (a config's own settings first, as ``client=None``).
        client_dp: whether client-level DP is configured (lint) or ran (audit).
    """

    clients: tuple[ClientFacts, ...]
    client_dp: bool

    def field(self, client: ClientFacts, attr: str) -> str:
        """The dotted field a finding about ``attr`` of ``client`` names (a config setting, or a client's record)."""
        raise NotImplementedError


F = TypeVar("F", bound=Facts)


@dataclass(frozen=True, kw_only=True, slots=True)
class Rule(Generic[F]):
    """One rule: its codes, title, default fix and check.

    Attributes:
        codes: its public code in each tool that checks it (one or two).
        title: one line saying what it flags.
        fix: how to fix what it flags, unless a hit words its own.
        check: the check, over the facts of the tools it runs in.
        per_client: the check reports each client of a run; on a config, whose settings every
            client shares, it reports the client that binds them (the hit of highest rank).
    """

    codes: tuple[Code, ...]
    title: str
    fix: str
    check: Callable[[F], list[Hit]]
    per_client: bool = False

    def code(self, tool: Tool | str) -> Code | None:
        """Its code in ``tool``, or None if that tool does not check it."""
        return next((c for c in self.codes if c.tool is Tool(tool)), None)

    @property
    def shared(self) -> bool:
        """Whether both lint and audit check it."""
        return len({c.tool for c in self.codes}) > 1


_REGISTRY: dict[str, Rule[Any]] = {}


def register(*codes: Code, title: str, fix: str, per_client: bool = False) -> Callable[[Callable[[F], list[Hit]]], Callable[[F], list[Hit]]]:
    """Registers the decorated check as a rule under ``codes`` (one per tool).

    Raises:
        ValueError: a code already registered, two codes for one tool, or no fix text.
    """

    def decorate(check: Callable[[F], list[Hit]]) -> Callable[[F], list[Hit]]:
        tools = [c.tool for c in codes]
        if not codes or len(set(tools)) != len(tools):
            raise ValueError(f"a rule has one code per tool, got {[c.code for c in codes]}")
        if not fix.strip():
            raise ValueError(f"rule {codes[0].code} has no fix text")
        rule: Rule[Any] = Rule(codes=tuple(codes), title=title, fix=fix, check=check, per_client=per_client)
        taken = [c.code for c in codes if c.code in _REGISTRY and _REGISTRY[c.code].check is not check]
        if taken:
            raise ValueError(f"rule code {taken[0]} is registered twice")
        for c in codes:
            _REGISTRY[c.code] = rule
        return check

    return decorate


def registry() -> tuple[Rule[Any], ...]:
    """Every rule, once, in code order (a shared rule under its lint code)."""
    # The tools' own rules register when their modules load.
    import privfl.audit.lint
    import privfl.audit.report

    seen: dict[int, Rule[Any]] = {}
    for code in sorted(_REGISTRY):
        seen.setdefault(id(_REGISTRY[code]), _REGISTRY[code])
    return tuple(seen.values())


def codes(tool: Tool | str) -> dict[str, tuple[Severity, str]]:
    """``code -> (default severity, title)`` of every rule ``tool`` checks, in code order."""
    tool = Tool(tool)
    out = {}
    for rule in registry():
        code = rule.code(tool)
        if code is not None:
            out[code.code] = (code.severity, rule.title)
    return dict(sorted(out.items()))


def apply_rules(tool: Tool, facts: Facts) -> list[Finding]:
    """Runs every rule ``tool`` checks on ``facts``.

    Returns:
        The findings, errors first, then warnings, then infos (in code order within each, and in
        the order each check found them within a code, a per-client rule's by rank), less those
        another finding on the same field supersedes.

    Raises:
        ValueError: a check gave a severity its code does not list (a bug in the rule, not in the input).
    """
    findings: list[Finding] = []
    superseded: set[tuple[str, str]] = set()
    for rule in registry():
        code = rule.code(tool)
        if code is None:
            continue
        hits = rule.check(facts)
        if rule.per_client and tool is Tool.LINT and hits:
            # One setting for every client: the finding names the client that binds it.
            hits = [max(hits, key=lambda h: h.rank)]
        elif rule.per_client:
            # One finding per client of a run: the worst first (a report of many sites shows the first few).
            hits = sorted(hits, key=lambda h: -h.rank)
        for h in hits:
            if h.severity is not None and h.severity not in (code.severity, *code.also):
                # The docs table lists every severity a code can take; a check may not add one silently.
                raise ValueError(f"{code.code} found with severity {h.severity.value}, not one its registry entry lists")
            superseded |= {(other, h.field) for other in h.supersedes}
            findings.append(
                Finding(severity=h.severity or code.severity, code=code.code, field=h.field, message=h.message, fix=h.fix or rule.fix)
            )
    kept = [f for f in findings if (f.code, f.field) not in superseded]
    return sorted(kept, key=lambda f: (SEVERITY_ORDER[f.severity], f.code))


def rules_table(tool: Tool | str) -> str:
    """The Markdown rules table of ``tool`` (``"lint"`` or ``"audit"``) in ``docs/audits.md`` (a test holds the docs to it)."""
    tool = Tool(tool)
    other = Tool.AUDIT if tool is Tool.LINT else Tool.LINT
    lines = ["| code | severity | finding | same check as |", "|---|---|---|---|"]
    rows: list[tuple[str, str]] = []
    for rule in registry():
        code = rule.code(tool)
        if code is None:
            continue
        twin = rule.code(other)
        severity = " / ".join(s.value for s in (code.severity, *code.also))
        rows.append((code.code, f"| {code.code} | {severity} | {code.description} | {twin.code if twin else ''} |"))
    return "\n".join(lines + [row for _, row in sorted(rows)])


# -- the rules both tools check ------------------------------------------------------------------------
def _nice_delta(n: int) -> float:
    """The largest power of ten at most 1/(10 n)."""
    return 10.0 ** math.floor(math.log10(0.1 / n))


@register(
    lint_code("PFL002", Severity.ERROR, "`training.dp.delta` >= 1/n for a client (the smallest one: every client shares the setting)"),
    audit_code("PFA002", Severity.ERROR, "delta >= 1/n_k for a client (n_k from `summary.json`)"),
    title="delta >= 1/n for a client",
    fix="Use delta << 1/n for the smallest client (below 1/(10 n)).",
    per_client=True,
)
def _delta_above_one_over_n(facts: Facts) -> list[Hit]:
    hits = []
    for c in facts.clients:
        n = c.num_examples
        if n is not None and c.delta >= 1.0 / n:
            hits.append(
                Hit(
                    field=facts.field(c, "delta"),
                    message=f"{c.who}: delta {c.delta:g} >= 1/n = {1 / n:.3g} (n={n}); an (epsilon, delta) guarantee this "
                    "loose is met by a mechanism that publishes a whole record at random.",
                    fix=f"Use delta << 1/n, e.g. at most {_nice_delta(n):g} (below 1/(10 n) for the smallest client).",
                    rank=1.0 / n,
                )
            )
    return hits


@register(
    lint_code(
        "PFL001",
        Severity.WARNING,
        "epsilon above 10: `target_epsilon`, `budget_epsilon`, or a fixed sigma's epsilon over the planned run",
    ),
    audit_code("PFA001", Severity.WARNING, "a client's epsilon is above 10"),
    title=f"epsilon above {HIGH_EPSILON:g}",
    fix=f"Lower the epsilon to {HIGH_EPSILON:g} or less (target_epsilon, or a larger noise_multiplier); if accuracy suffers, "
    "prefer more data per client, fewer rounds or larger batches over a larger epsilon.",
    per_client=True,
)
def _high_epsilon(facts: Facts) -> list[Hit]:
    return [
        Hit(
            field=facts.field(c, "epsilon"),
            message=f"{c.who}: epsilon {c.epsilon:.3g} ({c.epsilon_basis}) > {HIGH_EPSILON:g}: a membership-inference "
            f"attacker's odds may grow by e^{c.epsilon:.3g}, which is not a meaningful bound on a single record.",
            rank=c.epsilon,
        )
        for c in facts.clients
        if c.epsilon is not None and c.epsilon > HIGH_EPSILON
    ]


@register(
    lint_code(
        "PFL004",
        Severity.WARNING,
        "noise multiplier below 0.5: a fixed sigma, or the sigma a `target_epsilon` calibrates to for the planned run",
    ),
    audit_code("PFA005", Severity.WARNING, "a client trained with a noise multiplier below 0.5"),
    title=f"noise multiplier below {LOW_NOISE:g}",
    fix="Raise training.dp.noise_multiplier to 0.5 or more, or lower target_epsilon.",
    per_client=True,
)
def _low_noise(facts: Facts) -> list[Hit]:
    return [
        Hit(
            field=facts.field(c, "noise_multiplier"),
            message=f"{c.who}: noise multiplier {c.noise_multiplier:.3g}, below {LOW_NOISE:g}: little noise per step, so "
            "epsilon grows very fast with the number of steps and the guarantee is weak.",
            rank=-c.noise_multiplier,
        )
        for c in facts.clients
        if c.noise_multiplier is not None and c.noise_multiplier < LOW_NOISE
    ]


@register(
    lint_code("PFL006", Severity.WARNING, "fixed `noise_multiplier` with no `budget_epsilon`: spending is recorded but never capped"),
    audit_code("PFA009", Severity.WARNING, "a client's budget is uncapped"),
    title="no epsilon cap",
    fix="Set training.dp.budget_epsilon to the most epsilon a client may spend (with a fixed noise_multiplier), or use target_epsilon.",
    per_client=True,
)
def _uncapped(facts: Facts) -> list[Hit]:
    return [
        Hit(
            field=facts.field(c, "epsilon_budget"),
            message=f"{c.who} has no epsilon cap: the ledger records its spending but never stops it, so a longer, "
            "resumed or extended run keeps spending without limit.",
        )
        for c in facts.clients
        if math.isinf(c.epsilon_budget)
    ]


NO_CLIENT_DP = (
    "no client-level DP: DP-SGD protects each record inside a site, but whether a whole site took part "
    "(and its data distribution) is not protected: client-level epsilon is infinite."
)
"""What lint (PFL017), the audit of a run (PFA012) and the audit of a deployment say of a run without client-level DP."""
NO_CLIENT_DP_FIX = "Add a [federation.client_dp] section (DP-FedAvg) if a site's participation itself is sensitive."


@register(
    lint_code("PFL017", Severity.INFO, "no client-level DP: a site's participation is not protected"),
    audit_code("PFA012", Severity.WARNING, "no client-level DP"),
    title="no client-level DP: a site's participation is not protected",
    fix=NO_CLIENT_DP_FIX,
)
def _no_client_dp(facts: Facts) -> list[Hit]:
    # A design choice when linting (INFO); in the audit of a run to be released, a WARNING.
    if facts.client_dp:
        return []
    return [Hit(field="federation.client_dp", message=NO_CLIENT_DP)]

