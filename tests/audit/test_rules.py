"""The rule registry shared by `privfl lint` and `privfl audit`: codes, texts, docs, and shared checks that agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from privfl.audit import rules
from privfl.audit.lint import RULES, lint_config
from privfl.audit.report import AUDIT_CODES, audit_run
from privfl.audit.rules import Code, Finding, Hit, Severity, Tool, lint_code
from privfl.config import RunConfig, config_from_dict
from privfl.runner import run

DOCS = Path(__file__).resolve().parents[2] / "docs" / "audits.md"

# Every code users may have suppressed or docs may name, with its default severity: never renumbered.
PUBLISHED = {
    **dict.fromkeys(["PFL002", "PFL005", "PFL008", "PFL018", "PFL020", "PFL021", "PFL025"], Severity.ERROR),
    **dict.fromkeys(["PFL001", "PFL003", "PFL004", "PFL006", "PFL007", "PFL009", "PFL014", "PFL015", "PFL022", "PFL024", "PFL026"], Severity.WARNING),
    **dict.fromkeys(["PFL010", "PFL011", "PFL012", "PFL013", "PFL016", "PFL017", "PFL019", "PFL023"], Severity.INFO),
    **dict.fromkeys(["PFA002", "PFA003", "PFA011"], Severity.ERROR),
    **dict.fromkeys(
        ["PFA001", "PFA004", "PFA005", "PFA006", "PFA007", "PFA008", "PFA009", "PFA010", "PFA012", "PFA013", "PFA015"], Severity.WARNING
    ),
    **dict.fromkeys(["PFA014", "PFA016"], Severity.INFO),
}
SHARED = {"PFL001": "PFA001", "PFL002": "PFA002", "PFL004": "PFA005", "PFL006": "PFA009", "PFL017": "PFA012"}


def _all_codes() -> list[Code]:
    return [code for rule in rules.registry() for code in rule.codes]


def test_no_code_is_registered_twice() -> None:
    names = [c.code for c in _all_codes()]
    assert len(names) == len(set(names))
    for c in _all_codes():
        assert re.fullmatch(r"PF[LA]\d{3}", c.code)
        assert c.tool is (Tool.LINT if c.code.startswith("PFL") else Tool.AUDIT)
    with pytest.raises(ValueError, match="PFL002 is registered twice"):
        rules.register(lint_code("PFL002", Severity.ERROR, "again"), title="again", fix="again")(lambda facts: [])
    with pytest.raises(ValueError, match="no fix"):
        rules.register(lint_code("PFL999", Severity.INFO, "x"), title="x", fix=" ")(lambda facts: [])
    assert "PFL999" not in {c.code for c in _all_codes()}


def test_a_check_cannot_give_a_severity_its_code_does_not_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules, "_REGISTRY", {})  # this rule alone, and the real registry back afterwards
    rules.register(lint_code("PFL998", Severity.INFO, "x", also=(Severity.WARNING,)), title="x", fix="x")(
        lambda facts: [Hit(field="f", message="m", severity=severity) for severity in (Severity.WARNING, Severity.ERROR)]
    )
    with pytest.raises(ValueError, match="PFL998 found with severity error"):
        rules.apply_rules(Tool.LINT, rules.Facts(clients=(), client_dp=True))


def test_every_published_code_keeps_its_severity() -> None:
    registered = {c.code: c.severity for c in _all_codes()}
    assert registered == PUBLISHED
    assert {**RULES, **AUDIT_CODES} == {code: (severity, _title(code)) for code, severity in PUBLISHED.items()}


def _title(code: str) -> str:
    return next(r.title for r in rules.registry() if code in {c.code for c in r.codes})


def test_every_rule_has_a_title_a_fix_and_a_docs_line() -> None:
    for rule in rules.registry():
        assert rule.title.strip() and rule.fix.strip(), rule.codes
        for code in rule.codes:
            assert code.description.strip() and code.severity not in code.also


def test_shared_rules_are_one_check_under_two_codes() -> None:
    pairs = [(r.code(Tool.LINT), r.code(Tool.AUDIT)) for r in rules.registry() if r.shared]
    assert {lint.code: audit.code for lint, audit in pairs if lint and audit} == SHARED
    for lint, audit in SHARED.items():
        (rule,) = [r for r in rules.registry() if lint in {c.code for c in r.codes}]
        assert audit in {c.code for c in rule.codes}  # one rule, one check function, both codes


def test_docs_name_exactly_the_registered_codes() -> None:
    text = DOCS.read_text()
    assert set(re.findall(r"\bPF[LA]\d{3}\b", text)) == {c.code for c in _all_codes()}


def test_docs_tables_are_the_registry() -> None:
    text = DOCS.read_text()
    for tool in Tool:
        table = rules.rules_table(tool)
        assert table in text, f"regenerate the {tool.value} table of docs/audits.md with privfl.audit.rules.rules_table"


def test_a_finding_that_supersedes_another_on_its_field_replaces_it() -> None:
    negligible = _config(noise_multiplier=0.05, delta=1e-5, local_epochs=1)
    codes = [f.code for f in lint_config(negligible)]
    assert "PFL005" in codes and "PFL004" not in codes  # "private in name only" says more than "below 0.5"
    low = [f.code for f in lint_config(_config(noise_multiplier=0.3, delta=1e-5, local_epochs=1))]
    assert "PFL004" in low and "PFL005" not in low


# -- the same finding from lint (a config) and from audit (a run made from it) -------------------------
def _config(*, noise_multiplier: float, delta: float, local_epochs: int) -> RunConfig:
    return config_from_dict(
        {
            "data": {"num_clients": 3},
            "training": {"local_epochs": local_epochs, "dp": {"noise_multiplier": noise_multiplier, "delta": delta}},
            "federation": {"rounds": 2, "protection": "plaintext"},
        }
    )


def _lint_and_audit(config: RunConfig, out: Path) -> tuple[list[Finding], list[Finding]]:
    run(config, out, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    sizes = {name: entry["num_examples"] for name, entry in summary["clients"].items()}
    return lint_config(config, client_sizes=sizes), list(audit_run(out).findings)


@pytest.fixture(scope="module")
def weak(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Finding], list[Finding]]:
    """A fixed sigma of 0.45 with no cap and delta 0.1 over 3 sites: delta, low noise, uncapped, no client DP."""
    return _lint_and_audit(_config(noise_multiplier=0.45, delta=0.1, local_epochs=1), tmp_path_factory.mktemp("weak") / "run")


@pytest.fixture(scope="module")
def loose(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Finding], list[Finding]]:
    """Sigma 0.6 (PRV in both tools) spending epsilon 15-20 per site."""
    return _lint_and_audit(_config(noise_multiplier=0.6, delta=1e-5, local_epochs=2), tmp_path_factory.mktemp("loose") / "run")


def _by_code(findings: list[Finding], code: str) -> list[Finding]:
    return [f for f in findings if f.code == code]


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, (pattern, text)
    return float(match.group(1))


def _client(message: str) -> str:
    match = re.match(r"client '([^']+)'", message)
    assert match, message
    return match.group(1)


def test_delta_is_the_same_finding(weak: tuple[list[Finding], list[Finding]]) -> None:
    lint, audit = weak
    (config_finding,) = _by_code(lint, "PFL002")
    run_findings = {_client(f.message): f for f in _by_code(audit, "PFA002")}
    assert len(run_findings) == 3  # delta 0.1 >= 1/n for every site (each holds more than 10 examples)
    # The config names the client that binds its one setting: the smallest; the run reports it identically.
    smallest = _client(config_finding.message)
    twin = run_findings[smallest]
    assert (twin.severity, twin.message, twin.fix) == (config_finding.severity, config_finding.message, config_finding.fix)
    assert config_finding.field == "training.dp.delta" and twin.field == f"clients.{smallest}.delta"
    assert _number(r"n=(\d+)", twin.message) == min(_number(r"n=(\d+)", f.message) for f in run_findings.values())


@pytest.mark.parametrize("lint_code_, audit_code_", [("PFL004", "PFA005"), ("PFL006", "PFA009")])
def test_settings_every_client_shares_are_the_same_finding_for_each_client(
    weak: tuple[list[Finding], list[Finding]], lint_code_: str, audit_code_: str
) -> None:
    lint, audit = weak
    (config_finding,) = _by_code(lint, lint_code_)
    run_findings = _by_code(audit, audit_code_)
    assert config_finding.message.startswith("every client")  # a fixed sigma, no cap: the setting itself
    assert len(run_findings) == 3
    for f in run_findings:
        name = _client(f.message)
        assert f.message == config_finding.message.replace("every client", f"client {name!r}", 1)
        assert (f.severity, f.fix) == (config_finding.severity, config_finding.fix)


def test_no_client_level_dp_is_the_same_finding(weak: tuple[list[Finding], list[Finding]]) -> None:
    lint, audit = weak
    (config_finding,) = _by_code(lint, "PFL017")
    (run_finding,) = _by_code(audit, "PFA012")
    assert (run_finding.field, run_finding.message, run_finding.fix) == (config_finding.field, config_finding.message, config_finding.fix)
    # A design choice when linting, a warning about a run to be released (each code keeps its severity).
    assert (config_finding.severity, run_finding.severity) == (Severity.INFO, Severity.WARNING)


def test_high_epsilon_is_the_same_finding_with_the_same_figure(loose: tuple[list[Finding], list[Finding]]) -> None:
    lint, audit = loose
    (config_finding,) = _by_code(lint, "PFL001")
    run_findings = {_client(f.message): f for f in _by_code(audit, "PFA001")}
    assert len(run_findings) == 3
    worst = _client(config_finding.message)
    twin = run_findings[worst]
    # The planned epsilon of every round is what the run spent (every site trains in every round).
    figure = r"^client '[^']+': epsilon ([\d.]+) \("
    assert _number(figure, config_finding.message) == _number(figure, twin.message)
    assert max(run_findings, key=lambda name: _number(figure, run_findings[name].message)) == worst
    assert (twin.severity, twin.fix) == (config_finding.severity, config_finding.fix)
    assert config_finding.message.split(") > ")[1] == twin.message.split(") > ")[1]
