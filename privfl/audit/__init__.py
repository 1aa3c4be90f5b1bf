"""Privacy audits: empirical epsilon lower bounds, one-run audits and membership-inference scores."""

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

__all__ = [
    "AuditFailure",
    "AuditOutcome",
    "AuditStatus",
    "CanaryTrial",
    "EpsilonLowerBound",
    "InputSpaceAuditConfig",
    "OneRunAnalysis",
    "OneRunLowerBound",
    "ThresholdSelection",
    "compare_to_claim",
    "epsilon_lower_bound",
    "gaussian_mechanism_epsilon",
    "lira_scores",
    "logit_scaled_confidence",
    "loss_scores",
    "one_run_epsilon_lower_bound",
    "one_run_gdp_lower_bound",
    "run_input_space_canary_audit",
    "simulate_dirac_canaries",
]
