"""Checks of numeric and enumerated settings shared by the whole toolkit (internal).

Each check raises :class:`~privfl.errors.ConfigError` naming the field, the bad value and the rule, and
returns the value unchanged when it passes. Booleans are never numbers here (``True`` is not 1), nor are
strings, NaN or infinities. Only Python ``int`` and ``float`` pass unless ``allow_numpy=True``, which
also lets through NumPy scalars (and 0-d arrays) of an integer or floating dtype, for code that is
handed values computed with NumPy.

This module imports nothing heavy (``math`` and :mod:`privfl.errors` only): config loading uses it.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import TypeVar

from privfl.errors import ConfigError

E = TypeVar("E", bound=Enum)

__all__ = ["member", "open_unit_interval", "positive", "positive_int", "unit_interval"]


def _numpy_kind(value: object) -> str | None:
    """The dtype kind (``"i"``, ``"u"``, ``"f"``, ...) of a NumPy scalar or 0-d array, else None."""
    if type(value).__module__ != "numpy" or getattr(value, "ndim", None) != 0:
        return None
    return getattr(getattr(value, "dtype", None), "kind", None)


def _is_int(value: object, allow_numpy: bool) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (allow_numpy and _numpy_kind(value) in ("i", "u"))


def _is_finite_real(value: object, allow_numpy: bool) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True  # math.isfinite would overflow on huge ints; every int is finite
    if isinstance(value, float) or (allow_numpy and _numpy_kind(value) in ("i", "u", "f")):
        return math.isfinite(value)  # type: ignore[arg-type]
    return False


def _reason(rule: str, hint: str, value: object = None, allow_numpy: bool = True) -> str:
    if not allow_numpy and _numpy_kind(value) is not None:
        # The value may well satisfy the rule: what is wrong is its type, which the rule alone would hide.
        rule += f"; this is a NumPy {type(value).__name__}, and configs take Python numbers: pass int(x) or float(x)"
    return f"{rule} ({hint})" if hint else rule


def positive(name: str, value: object, *, allow_zero: bool = False, allow_numpy: bool = False, hint: str = "") -> object:
    """A finite real number ``> 0`` (``>= 0`` with ``allow_zero``).

    Args:
        name: The field named in the error.
        value: The value to check.
        allow_zero: Accept 0.
        allow_numpy: Also accept NumPy integer and floating scalars.
        hint: Why the rule holds, appended to the error's reason in parentheses.

    Returns:
        ``value``, unchanged.

    Raises:
        ConfigError: ``"must be a finite number > 0"`` (or ``>= 0``) otherwise.
    """
    ok = _is_finite_real(value, allow_numpy) and (value >= 0 if allow_zero else value > 0)  # type: ignore[operator]
    if not ok:
        raise ConfigError(name, value, _reason("must be a finite number " + (">= 0" if allow_zero else "> 0"), hint, value, allow_numpy))
    return value


def positive_int(name: str, value: object, minimum: int = 1, *, allow_numpy: bool = False, hint: str = "") -> object:
    """An integer (not a bool, not a float such as ``2.0``) ``>= minimum``.

    Raises:
        ConfigError: ``"must be an integer >= {minimum}"`` otherwise.
    """
    if not (_is_int(value, allow_numpy) and value >= minimum):  # type: ignore[operator]
        raise ConfigError(name, value, _reason(f"must be an integer >= {minimum}", hint, value, allow_numpy))
    return value


def unit_interval(name: str, value: object, *, closed_low: bool = False, allow_numpy: bool = False, hint: str = "") -> object:
    """A real number in ``(0, 1]`` (``[0, 1]`` with ``closed_low``), e.g. a sampling rate or a fraction.

    Raises:
        ConfigError: ``"must be in (0, 1]"`` (or ``[0, 1]``) otherwise.
    """
    ok = _is_finite_real(value, allow_numpy) and ((0 <= value <= 1) if closed_low else (0 < value <= 1))  # type: ignore[operator]
    if not ok:
        raise ConfigError(name, value, _reason("must be in " + ("[0, 1]" if closed_low else "(0, 1]"), hint, value, allow_numpy))
    return value


def open_unit_interval(name: str, value: object, *, allow_numpy: bool = False, hint: str = "") -> object:
    """A real number strictly between 0 and 1, e.g. a delta, an alpha or a relative tolerance.

    Raises:
        ConfigError: ``"must be in (0, 1)"`` otherwise.
    """
    if not (_is_finite_real(value, allow_numpy) and 0 < value < 1):  # type: ignore[operator]
        raise ConfigError(name, value, _reason("must be in (0, 1)", hint, value, allow_numpy))
    return value


def member(name: str, value: object, enum: type[E]) -> E:
    """``value`` as a member of ``enum`` (a member, or its value).

    Raises:
        ConfigError: naming the values; a string that is one of them in another case (``"CKKS"``) is
            refused too (a config's text is what resumes and sites compare), with the value meant.
    """
    try:
        return enum(value)
    except ValueError:
        values = [m.value for m in enum]
        near = next((v for v in values if isinstance(value, str) and isinstance(v, str) and v == value.strip().lower()), None)
        hint = f" (did you mean {near!r}? the values are lower-case)" if near is not None else ""
        raise ConfigError(name, value, f"must be one of {values}{hint}") from None
