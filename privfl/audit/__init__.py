"""Privacy audits: budget reports, config linting, empirical epsilon lower bounds and membership-inference scores.

Config linting (``lint``, PFL codes) and run audits (``report``, PFA codes) check one rule registry,
:mod:`privfl.audit.rules`.
"""

from privfl.audit.empirical import (
    AuditFailure,
    AuditOutcome,
    AuditStatus,
    EpsilonLowerBound,
    ThresholdSelection,
    compare_to_claim,
    epsilon_lower_bound,
    gaussian_mechanism_epsilon,
)
from privfl.audit.lint import Finding, Severity, lint_config, lint_file
from privfl.audit.mia import lira_scores, logit_scaled_confidence, loss_scores
from privfl.audit.one_run import (
    CanaryTrial,
    InputSpaceAuditConfig,
    OneRunAnalysis,
    OneRunLowerBound,
    one_run_epsilon_lower_bound,
    one_run_gdp_lower_bound,
    run_input_space_canary_audit,
    simulate_dirac_canaries,
)
from privfl.audit.report import AuditReport, audit_run

__all__ = [
    "AuditFailure",
    "AuditOutcome",
    "AuditReport",
    "AuditStatus",
    "CanaryTrial",
    "EpsilonLowerBound",
    "Finding",
    "InputSpaceAuditConfig",
    "OneRunAnalysis",
    "OneRunLowerBound",
    "Severity",
    "ThresholdSelection",
    "audit_run",
    "compare_to_claim",
    "epsilon_lower_bound",
    "gaussian_mechanism_epsilon",
    "lint_config",
    "lint_file",
    "lira_scores",
    "logit_scaled_confidence",
    "loss_scores",
    "one_run_epsilon_lower_bound",
    "one_run_gdp_lower_bound",
    "run_input_space_canary_audit",
    "simulate_dirac_canaries",
]
