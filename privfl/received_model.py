"""Checks a site runs on a model received from the server before training on it (imprint attacks, Fowl et al. 2022).

Threat model: an *active* server that may change the model it distributes, e.g. prepend or overwrite a layer
so that single inputs can be read out of the gradient or the secure aggregate (``privfl.attacks.imprint``
builds such a model). A site checks the received model against the architecture it agreed to, built from
its own code, and for the imprint signature; verification raises :class:`~privfl.errors.ModelTamperError`.
This module needs torch but not the attack package.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from privfl.errors import ConfigError, ModelTamperError

__all__ = [
    "Finding",
    "FindingKind",
    "ImprintCheck",
    "check_model_for_imprint",
    "verify_model_architecture",
    "verify_received_model",
]


class FindingKind(Enum):
    """What kind of discrepancy a check found."""

    ARCHITECTURE = "architecture"  # module tree, module types or their settings differ from the agreed model
    PARAMETERS = "parameters"  # parameter or buffer names or shapes differ
    PARALLEL_ROWS = "parallel-rows"  # many rows of one linear layer share a direction: the imprint signature


@dataclass(frozen=True, kw_only=True, slots=True)
class Finding:
    """One thing the check found.

    Attributes:
        kind: The kind of discrepancy.
        location: Module or parameter name.
        detail: What differs, in words.
    """

    kind: FindingKind
    location: str
    detail: str


@dataclass(frozen=True, kw_only=True, slots=True)
class ImprintCheck:
    """Thresholds of the imprint-signature check.

    Attributes:
        min_parallel_rows: Flag a linear layer when at least this many of its rows share one direction.
        cosine_threshold: Two rows share a direction when ``|cos|`` of their angle is at least this.
    """

    min_parallel_rows: int = 4
    cosine_threshold: float = 0.99

    def __post_init__(self) -> None:
        rows = self.min_parallel_rows
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 2:
            raise ConfigError("min_parallel_rows", self.min_parallel_rows, "must be an int >= 2")
        if not (isinstance(self.cosine_threshold, (int, float)) and 0 < self.cosine_threshold <= 1):
            raise ConfigError("cosine_threshold", self.cosine_threshold, "must be in (0, 1]")


def _type_name(module: torch.nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _architecture_findings(received: torch.nn.Module, expected: torch.nn.Module) -> list[Finding]:
    findings: list[Finding] = []
    got = {name: m for name, m in received.named_modules()}
    want = {name: m for name, m in expected.named_modules()}
    for name in want.keys() - got.keys():
        findings.append(Finding(kind=FindingKind.ARCHITECTURE, location=name or "<root>", detail="module missing"))
    for name in got.keys() - want.keys():
        findings.append(
            Finding(
                kind=FindingKind.ARCHITECTURE, location=name or "<root>", detail=f"unexpected {_type_name(got[name])}"
            )
        )
    for name in want.keys() & got.keys():
        a, b = got[name], want[name]
        if _type_name(a) != _type_name(b) or a.extra_repr() != b.extra_repr():
            findings.append(
                Finding(
                    kind=FindingKind.ARCHITECTURE,
                    location=name or "<root>",
                    detail=f"{type(a).__name__}({a.extra_repr()}) where "
                    f"{type(b).__name__}({b.extra_repr()}) was agreed",
                )
            )
    if list(got) != list(want) and not findings:
        findings.append(
            Finding(kind=FindingKind.ARCHITECTURE, location="<root>", detail="modules are registered in another order")
        )

    for what, got_t, want_t in (
        ("parameter", dict(received.named_parameters()), dict(expected.named_parameters())),
        ("buffer", dict(received.named_buffers()), dict(expected.named_buffers())),
    ):
        for name in sorted(want_t.keys() - got_t.keys()):
            findings.append(Finding(kind=FindingKind.PARAMETERS, location=name, detail=f"{what} missing"))
        for name in sorted(got_t.keys() - want_t.keys()):
            findings.append(
                Finding(
                    kind=FindingKind.PARAMETERS, location=name, detail=f"unexpected {what} {tuple(got_t[name].shape)}"
                )
            )
        for name in sorted(want_t.keys() & got_t.keys()):
            if got_t[name].shape != want_t[name].shape or got_t[name].dtype != want_t[name].dtype:
                findings.append(
                    Finding(
                        kind=FindingKind.PARAMETERS,
                        location=name,
                        detail=f"{what} {tuple(got_t[name].shape)} {got_t[name].dtype} where "
                        f"{tuple(want_t[name].shape)} {want_t[name].dtype} was agreed",
                    )
                )
    return sorted(findings, key=lambda f: (f.kind.value, f.location))


def _parallel_rows(name: str, linear: torch.nn.Linear, check: ImprintCheck) -> Finding | None:
    weight = linear.weight.detach().double()
    norms = weight.norm(dim=1)
    live = (norms > 0).nonzero().flatten()
    if live.numel() < check.min_parallel_rows:
        return None
    unit = weight[live] / norms[live, None]
    parallel = (unit @ unit.T).abs() >= check.cosine_threshold
    sizes = parallel.sum(dim=1)
    anchor = int(torch.argmax(sizes))
    group = live[parallel[anchor]]
    if group.numel() < check.min_parallel_rows:
        return None
    detail = f"{group.numel()} of {weight.shape[0]} rows share one direction (|cos| >= {check.cosine_threshold})"
    if linear.bias is not None:
        # Along a shared direction a unit fires above threshold -b/|w|: distinct thresholds are bins.
        thresholds = (-linear.bias.detach().double()[group] / norms[group]).unique()
        detail += (
            f"; their thresholds take {thresholds.numel()} distinct values in "
            f"[{float(thresholds.min()):.4g}, {float(thresholds.max()):.4g}]"
        )
        if thresholds.numel() >= check.min_parallel_rows:
            detail += ": units along one direction with distinct thresholds bin one statistic (the imprint signature)"
    return Finding(kind=FindingKind.PARALLEL_ROWS, location=name, detail=detail)


def check_model_for_imprint(
    model: torch.nn.Module,
    reference_model: torch.nn.Module | None = None,
    *,
    check: ImprintCheck = ImprintCheck(),
) -> list[Finding]:
    """Lists what is suspicious about a model received from the server, before a client trains on it.

    Two checks: (a) with ``reference_model`` (the agreed architecture, built from the client's own code),
    module tree, module types and settings, parameter and buffer names, shapes and dtypes must match;
    (b) no ``nn.Linear`` may have ``check.min_parallel_rows`` or more rows along one direction, the
    signature of an imprint layer, which (b) finds even when the architecture matches (a server that
    overwrites an existing first layer). Honest layers, trained or freshly initialized, have no such rows.

    This is a heuristic against one known attack, not a guarantee; DP-SGD is the principled defence.

    Args:
        model: The model as received.
        reference_model: The agreed model, or ``None`` to run (b) only.
        check: Thresholds of (b).

    Returns:
        The findings, empty when nothing was found.
    """
    findings = [] if reference_model is None else _architecture_findings(model, reference_model)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            finding = _parallel_rows(name, module, check)
            if finding is not None:
                findings.append(finding)
    return findings


def verify_model_architecture(received: torch.nn.Module, expected: torch.nn.Module) -> None:
    """Checks that a received model has the agreed architecture.

    Args:
        received: The model from the server.
        expected: The agreed model, built from the client's own code.

    Raises:
        ModelTamperError: If module tree, module types or settings, or parameter/buffer names or shapes differ.
    """
    findings = _architecture_findings(received, expected)
    if findings:
        raise ModelTamperError(findings)


def verify_received_model(
    received: torch.nn.Module,
    expected: torch.nn.Module | None = None,
    *,
    check: ImprintCheck = ImprintCheck(),
) -> None:
    """Runs ``check_model_for_imprint`` and refuses the model on any finding.

    Args:
        received: The model from the server.
        expected: The agreed model, or ``None`` to check the parameters only.
        check: Thresholds of the imprint-signature check.

    Raises:
        ModelTamperError: With every finding, if there is any.
    """
    findings = check_model_for_imprint(received, expected, check=check)
    if findings:
        raise ModelTamperError(findings)
