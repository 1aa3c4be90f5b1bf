"""The shared numeric checks (privfl._validate), the errors moved into privfl.errors, and compare_to_claim's default."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from privfl import _validate
from privfl.errors import AuditFailure, ConfigError, ModelTamperError, PrivflError

NOT_NUMBERS = [True, False, "1", None, [1], complex(1, 0), math.nan, math.inf, -math.inf]


def _rejects(check, value, **kwargs) -> ConfigError:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        check("some.field", value, **kwargs)
    assert info.value.field == "some.field"
    assert info.value.value is value
    assert "some.field" in str(info.value)
    return info.value


# --- positive ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 1e-300, 0.5, 3, 10**400, sys.float_info.max])
def test_positive_accepts_finite_positive_numbers(value) -> None:  # type: ignore[no-untyped-def]
    assert _validate.positive("x", value) is value


@pytest.mark.parametrize("value", [0, 0.0, -1, -1e-9, *NOT_NUMBERS])
def test_positive_rejects(value) -> None:  # type: ignore[no-untyped-def]
    error = _rejects(_validate.positive, value)
    assert error.reason == "must be a finite number > 0"


def test_positive_allow_zero() -> None:
    assert _validate.positive("x", 0, allow_zero=True) == 0
    assert _validate.positive("x", 0.0, allow_zero=True) == 0.0
    for value in (-1e-12, True, False, math.nan, math.inf):
        error = _rejects(_validate.positive, value, allow_zero=True)
        assert error.reason == "must be a finite number >= 0"


def test_positive_hint_is_appended() -> None:
    error = _rejects(_validate.positive, 0, hint="the accountant needs noise")
    assert error.reason == "must be a finite number > 0 (the accountant needs noise)"


# --- positive_int --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "minimum"), [(1, 1), (7, 1), (0, 0), (10**30, 1), (5, 5)])
def test_positive_int_accepts(value, minimum) -> None:  # type: ignore[no-untyped-def]
    assert _validate.positive_int("x", value, minimum) is value


@pytest.mark.parametrize("value", [0, -3, 1.0, 2.5, *NOT_NUMBERS])
def test_positive_int_rejects(value) -> None:  # type: ignore[no-untyped-def]
    error = _rejects(_validate.positive_int, value)
    assert error.reason == "must be an integer >= 1"


def test_positive_int_minimum() -> None:
    assert _rejects(_validate.positive_int, -1, minimum=0).reason == "must be an integer >= 0"
    assert _rejects(_validate.positive_int, 4, minimum=5).reason == "must be an integer >= 5"
    _rejects(_validate.positive_int, False, minimum=0)


# --- unit intervals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 1.0, 0.5, 1e-300])
def test_unit_interval_accepts(value) -> None:  # type: ignore[no-untyped-def]
    assert _validate.unit_interval("x", value) is value


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.0000001, 2, *NOT_NUMBERS])
def test_unit_interval_rejects(value) -> None:  # type: ignore[no-untyped-def]
    assert _rejects(_validate.unit_interval, value).reason == "must be in (0, 1]"


def test_unit_interval_closed_low() -> None:
    assert _validate.unit_interval("x", 0, closed_low=True) == 0
    assert _validate.unit_interval("x", 1.0, closed_low=True) == 1.0
    for value in (-1e-9, 1.5, True, False, math.nan):
        assert _rejects(_validate.unit_interval, value, closed_low=True).reason == "must be in [0, 1]"


@pytest.mark.parametrize("value", [1e-12, 0.5, 1 - 1e-12])
def test_open_unit_interval_accepts(value) -> None:  # type: ignore[no-untyped-def]
    assert _validate.open_unit_interval("x", value) is value


@pytest.mark.parametrize("value", [0, 0.0, 1, 1.0, -0.5, 1.5, *NOT_NUMBERS])
def test_open_unit_interval_rejects(value) -> None:  # type: ignore[no-untyped-def]
    assert _rejects(_validate.open_unit_interval, value).reason == "must be in (0, 1)"


# --- NumPy scalars: only with allow_numpy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "value", "kwargs"),
    [
        (_validate.positive, np.float32(2.0), {}),
        (_validate.positive, np.int64(3), {}),
        (_validate.positive_int, np.int64(3), {}),
        (_validate.positive_int, np.uint8(0), {"minimum": 0}),
        (_validate.unit_interval, np.float32(0.25), {}),
        (_validate.open_unit_interval, np.float64(1e-5), {}),
        (_validate.open_unit_interval, np.array(0.5), {}),
    ],
)
def test_numpy_scalars_need_allow_numpy(check, value, kwargs) -> None:  # type: ignore[no-untyped-def]
    assert check("x", value, allow_numpy=True, **kwargs) is value
    if not isinstance(value, (int, float)):  # np.float64 is a float and always passes
        # the reason says what is wrong: the type, not the value (which may satisfy the rule)
        assert "configs take Python numbers: pass int(x) or float(x)" in _rejects(check, value, **kwargs).reason


@pytest.mark.parametrize(
    ("check", "value"),
    [
        (_validate.positive, np.bool_(True)),
        (_validate.positive, np.float32("nan")),
        (_validate.positive, np.float64("inf")),
        (_validate.positive_int, np.float64(2.0)),
        (_validate.positive_int, np.bool_(True)),
        (_validate.unit_interval, np.array([0.5])),
        (_validate.open_unit_interval, np.float32(1.0)),
    ],
)
def test_numpy_non_numbers_and_non_finite_are_rejected(check, value) -> None:  # type: ignore[no-untyped-def]
    _rejects(check, value, allow_numpy=True)


def test_validate_module_stays_light() -> None:
    code = "import sys, privfl._validate; print(sorted(m for m in ('numpy', 'torch', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- the moved errors -------------------------------------------------------------------------------------------


def test_moved_errors_live_in_the_hierarchy_and_keep_their_old_import_paths() -> None:
    import privfl.attacks
    import privfl.attacks.imprint
    import privfl.audit
    import privfl.audit.empirical
    import privfl.errors

    assert issubclass(AuditFailure, PrivflError) and issubclass(ModelTamperError, PrivflError)
    assert {"AuditFailure", "ModelTamperError"} <= set(privfl.errors.__all__)
    assert privfl.audit.empirical.AuditFailure is AuditFailure
    assert privfl.audit.AuditFailure is AuditFailure
    assert privfl.attacks.imprint.ModelTamperError is ModelTamperError
    assert privfl.attacks.ModelTamperError is ModelTamperError
    assert "AuditFailure" in privfl.audit.empirical.__all__ and "ModelTamperError" in privfl.attacks.imprint.__all__


def test_model_tamper_error_message_lists_findings() -> None:
    from privfl.received_model import Finding, FindingKind

    findings = [Finding(kind=FindingKind.ARCHITECTURE, location=f"layer{i}", detail="differs") for i in range(7)]
    error = ModelTamperError(findings)
    assert error.findings == findings
    assert str(error).startswith("received model rejected: [architecture] layer0: differs; ")
    assert str(error).endswith("(+2 more)")


# --- compare_to_claim raises by default --------------------------------------------------------------------------


def test_compare_to_claim_raises_by_default_and_returns_when_told_not_to() -> None:
    from privfl.audit.empirical import AuditStatus, compare_to_claim, epsilon_lower_bound

    bound = epsilon_lower_bound(np.full(1000, 5.0), np.zeros(1000), delta=1e-5)
    with pytest.raises(AuditFailure) as info:
        compare_to_claim(bound, 1.0)
    assert info.value.outcome.status is AuditStatus.FAILED
    assert "PRIVACY AUDIT FAILED" in str(info.value)
    outcome = compare_to_claim(bound, 1.0, raise_on_failure=False)
    assert outcome.status is AuditStatus.FAILED and not outcome.passed
    assert outcome == info.value.outcome
    # A claim the bound does not exceed passes either way.
    assert compare_to_claim(bound, bound.epsilon + 1.0).passed


@pytest.mark.parametrize("claim", [math.nan, math.inf, -0.5, True, "1.0"])
def test_compare_to_claim_rejects_bad_claims(claim) -> None:  # type: ignore[no-untyped-def]
    from privfl.audit.empirical import compare_to_claim, epsilon_lower_bound

    bound = epsilon_lower_bound([1.0, 2.0], [0.0, 0.5], delta=1e-5)
    with pytest.raises(ConfigError) as info:
        compare_to_claim(bound, claim)
    assert info.value.field == "claimed_epsilon"
