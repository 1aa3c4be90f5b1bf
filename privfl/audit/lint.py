"""Static checks of a run config for settings that weaken or void its privacy claims, before anything runs.

Every rule reads only the config (and, when given, each client's number of examples); none trains.
A :class:`Finding` says what is wrong, why it matters and how to fix it. Severities:

* ``ERROR``: the privacy claim is void or the run cannot work (e.g. delta >= 1/n, a secure-aggregation
  modulus that can overflow, noise too small to be private);
* ``WARNING``: the claim holds but is weak or easy to misread (epsilon above 10, no budget cap,
  plaintext updates);
* ``INFO``: how privfl counts or protects something, stated so nobody has to guess.

The rule codes and titles are in :data:`RULES`; ``docs/audits.md`` tabulates them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from privfl import _validate
from privfl.accounting import Accountant, epsilon
from privfl.config import (
    ProtectionKind,
    RunConfig,
    load_config,
)
from privfl.errors import ConfigError
from privfl.protocols.ckks_params import HE_STANDARD_MAX_LOGQ_128

__all__ = ["RULES", "Finding", "Severity", "lint_config", "lint_file"]

HIGH_EPSILON = 10.0
"""Above this epsilon the e^epsilon factor (> 22,000) no longer bounds what an attacker learns in practice."""
NOMINAL_EPSILON = 100.0
"""At or above this epsilon a DP claim is nominal: it rules out nothing an attacker could do."""
LOW_NOISE = 0.5
"""Noise multipliers below this give large epsilons for any realistic number of steps."""
NEGLIGIBLE_NOISE = 0.1
"""Below this the noise is negligible next to the clipped gradient: private in name only."""
MIN_SECAGG_LEVELS = 256
"""Fewer quantization levels per sign than this (8 bits) leaves a coarse aggregate."""


class Severity(str, Enum):
    """How serious a finding is."""

    ERROR = "error"
    """The privacy claim is void, or the run cannot work as configured."""
    WARNING = "warning"
    """The claim holds but is weak, unenforced or easy to misread."""
    INFO = "info"
    """How privfl counts or protects something; nothing to fix unless it surprises you."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Finding:
    """One result of a check.

    Attributes:
        severity: ERROR, WARNING or INFO.
        code: the rule's stable code, e.g. ``"PFL002"`` (see :data:`RULES`).
        field: dotted path of the setting concerned, e.g. ``"training.dp.delta"``.
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


RULES: Mapping[str, tuple[Severity, str]] = {
    "PFL001": (Severity.WARNING, f"epsilon above {HIGH_EPSILON:g}"),
    "PFL002": (Severity.ERROR, "delta >= 1/n for a client"),
    "PFL003": (Severity.WARNING, "delta not much smaller than 1/n"),
    "PFL004": (Severity.WARNING, f"noise multiplier below {LOW_NOISE:g}"),
    "PFL005": (Severity.ERROR, "private in name only (negligible noise or nominal epsilon)"),
    "PFL006": (Severity.WARNING, "fixed noise multiplier with no epsilon cap"),
    "PFL007": (Severity.WARNING, "client too small for its batch size (q = 1, no amplification)"),
    "PFL008": (Severity.ERROR, "secure-aggregation sum can overflow its modulus"),
    "PFL009": (Severity.WARNING, "secure-aggregation quantization is coarse"),
    "PFL010": (Severity.INFO, "secure-aggregation clip range below the typical update magnitude"),
    "PFL011": (Severity.INFO, "the epsilon budget covers the whole run, not one round"),
    "PFL012": (Severity.INFO, "RDP accountant: PRV is tighter"),
    "PFL013": (Severity.INFO, "federation.seed fixes only partitioning and initialisation"),
    "PFL014": (Severity.WARNING, "fixed secure-aggregation graph seed"),
    "PFL015": (Severity.WARNING, "plaintext protection: the server sees every update"),
    "PFL016": (Severity.INFO, "CKKS security margin and precision"),
    "PFL017": (Severity.INFO, "no client-level DP: a site's participation is not protected"),
    "PFL018": (Severity.ERROR, "client-level delta >= 1/number of clients"),
    "PFL019": (Severity.INFO, "client sizes unknown: size-dependent rules skipped"),
    "PFL020": (Severity.ERROR, "secure-aggregation threshold not above half the share holders"),
    "PFL021": (Severity.ERROR, "rounds that cannot complete"),
    "PFL022": (Severity.WARNING, "noise_seed set: client sampling and DP noise predictable from the config"),
    "PFL023": (Severity.INFO, "client-level DP under secure aggregation: clip range derived from the noise (ERROR: cannot fit)"),
}


def _finding(code: str, field: str, message: str, fix: str) -> Finding:
    return Finding(severity=RULES[code][0], code=code, field=field, message=message, fix=fix)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Plan:
    """A client's planned DP-SGD run (as the federation would compute it)."""

    client: str
    num_examples: int
    sample_rate: float
    steps_per_round: int
    total_steps: int
    noise_multiplier: float | None = None


def _plans(config: RunConfig, client_sizes: Mapping[str, int]) -> list[_Plan]:
    """Each client's plan from :func:`privfl.plan.plan_site`: the very computation the run makes."""
    from privfl.plan import plan_site

    plans = []
    for client, n in client_sizes.items():
        _validate.positive_int(f"client_sizes[{client}]", n)
        site = plan_site(n, config.training, config.federation, len(client_sizes))
        plans.append(
            _Plan(
                client=client, num_examples=n, sample_rate=site.sample_rate, steps_per_round=site.steps_per_round,
                total_steps=site.steps_per_round * site.planned_rounds, noise_multiplier=site.noise_multiplier,
            )
        )
    return plans


def lint_config(config: RunConfig, *, client_sizes: Mapping[str, int] | None = None) -> list[Finding]:
    """Checks a run config for settings that weaken or void its privacy claims.

    Args:
        config: the run description.
        client_sizes: client name -> number of training examples. Rules that depend on client
            sizes (delta against 1/n, sampling amplification, calibrated noise) are skipped without it.

    Returns:
        Findings, errors first, then warnings, then infos (each group in rule order).

    Raises:
        ConfigError: a client size that is not a positive integer.
    """
    findings: list[Finding] = []
    plans = _plans(config, client_sizes) if client_sizes else None
    findings += _epsilon_rules(config, plans)
    findings += _delta_rules(config, plans)
    findings += _sampling_rules(config, plans)
    findings += _protection_rules(config, plans)
    findings += _client_level_rules(config)
    findings += _round_completion_rules(config)
    findings += _noise_seed_rules(config)
    findings += _secagg_noise_range_rules(config)
    if plans is None:
        findings.append(
            _finding(
                "PFL019",
                "data",
                "no client sizes were given, so delta against 1/n (PFL002/003), sampling amplification "
                "(PFL007) and the calibrated noise multiplier (PFL004/005) were not checked.",
                "Lint the TOML file with lint_file (it partitions the bundled dataset), or pass client_sizes.",
            )
        )
    order = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}
    return sorted(findings, key=lambda f: (order[f.severity], f.code))


def lint_file(path: str | os.PathLike[str]) -> list[Finding]:
    """Loads a TOML run config, partitions its bundled dataset to learn the client sizes, and lints it.

    Raises:
        ConfigError: the file is missing, is not a valid config, or its partition cannot be made.
    """
    from privfl.runner import load_dataset, split_clients

    config = load_config(path)
    clients = split_clients(config, load_dataset(config))
    return lint_config(config, client_sizes={name: len(ds) for name, ds in clients.items()})


# -- rules ---------------------------------------------------------------------------------------
def _planned_epsilon(sigma: float, plan: _Plan, config: RunConfig) -> tuple[float, Accountant]:
    """Epsilon of a fixed sigma over the planned run.

    The PRV accountant becomes very slow and numerically fragile for tiny noise, so below
    ``LOW_NOISE`` the RDP upper bound is used (and named in the message).
    """
    dp = config.training.dp
    kind = dp.accountant if sigma >= LOW_NOISE else Accountant.RDP
    import warnings

    with warnings.catch_warnings():
        # Opacus warns that the optimal RDP order is at the edge of its grid when epsilon is huge.
        warnings.simplefilter("ignore")
        value = epsilon(noise_multiplier=sigma, sample_rate=plan.sample_rate, steps=plan.total_steps, delta=dp.delta, accountant=kind)
    return value, kind


def _epsilon_rules(config: RunConfig, plans: list[_Plan] | None) -> list[Finding]:
    dp = config.training.dp
    fed = config.federation
    out: list[Finding] = []
    budget_field = "training.dp.target_epsilon" if dp.target_epsilon is not None else "training.dp.budget_epsilon"
    budget = dp.target_epsilon if dp.target_epsilon is not None else dp.budget_epsilon
    if budget is not None and budget >= NOMINAL_EPSILON:
        out.append(
            _finding(
                "PFL005",
                budget_field,
                f"epsilon {budget:g} is nominal: e^{budget:g} bounds nothing an attacker could do, so the run is "
                "private in name only.",
                f"Set an epsilon of at most {HIGH_EPSILON:g} (1-8 is the usual range for sample-level DP-SGD).",
            )
        )
    elif budget is not None and budget > HIGH_EPSILON:
        out.append(
            _finding(
                "PFL001",
                budget_field,
                f"epsilon {budget:g} > {HIGH_EPSILON:g}: the guarantee allows a membership-inference attacker's odds "
                f"to grow by e^{budget:g}, which is not a meaningful bound on a single record.",
                f"Lower it to {HIGH_EPSILON:g} or less; if accuracy suffers, prefer more data per client, fewer "
                "rounds or larger batches over a larger epsilon.",
            )
        )

    if dp.noise_multiplier is not None:
        sigma = dp.noise_multiplier
        if sigma < NEGLIGIBLE_NOISE:
            out.append(
                _finding(
                    "PFL005",
                    "training.dp.noise_multiplier",
                    f"noise_multiplier {sigma:g} < {NEGLIGIBLE_NOISE:g}: the Gaussian noise is negligible next to the "
                    "clipped gradient, so DP-SGD is private in name only (the config model cannot turn DP off; a "
                    "tiny sigma is how it ends up off in effect).",
                    "Set target_epsilon instead and let privfl calibrate sigma, or use a noise_multiplier of at least 0.5.",
                )
            )
        elif sigma < LOW_NOISE:
            out.append(
                _finding(
                    "PFL004",
                    "training.dp.noise_multiplier",
                    f"noise_multiplier {sigma:g} < {LOW_NOISE:g}: epsilon grows very fast with the number of steps at "
                    "this noise level.",
                    "Raise it to 0.5 or more, or set target_epsilon and let privfl calibrate it.",
                )
            )
        if dp.budget_epsilon is None:
            out.append(
                _finding(
                    "PFL006",
                    "training.dp.budget_epsilon",
                    f"a fixed noise_multiplier ({sigma:g}) with no budget_epsilon: the ledger records epsilon but never "
                    "stops a client, so a longer or resumed run keeps spending without limit.",
                    "Set training.dp.budget_epsilon to the most epsilon a client may spend, or use target_epsilon.",
                )
            )
        if plans is not None and sigma >= NEGLIGIBLE_NOISE:
            worst_eps, worst, kind = -1.0, plans[0], dp.accountant
            for plan in plans:
                value, kind = _planned_epsilon(sigma, plan, config)
                if value > worst_eps:
                    worst_eps, worst = value, plan
            if worst_eps > HIGH_EPSILON and (dp.budget_epsilon is None or dp.budget_epsilon > HIGH_EPSILON):
                code = "PFL005" if worst_eps >= NOMINAL_EPSILON else "PFL001"
                out.append(
                    _finding(
                        code,
                        "training.dp.noise_multiplier",
                        f"noise_multiplier {sigma:g} over the planned {worst.total_steps} steps of client "
                        f"{worst.client!r} (n={worst.num_examples}, q={worst.sample_rate:.3g}) gives epsilon "
                        f"{worst_eps:.3g} ({kind.value.upper()}) at delta {dp.delta:g}.",
                        "Raise noise_multiplier, train fewer rounds or local epochs, or set target_epsilon.",
                    )
                )
    elif plans is not None:
        # The federation calibrates sigma per client for its planned run; sigma < 0.5 exactly when
        # epsilon(0.5) is already within the target (epsilon falls as sigma grows), which costs one
        # accountant call instead of a bisection.
        assert dp.target_epsilon is not None  # DPConfig sets exactly one of noise_multiplier and target_epsilon
        low = []
        for plan in {(p.sample_rate, p.total_steps): p for p in plans}.values():
            at_low = epsilon(
                noise_multiplier=LOW_NOISE, sample_rate=plan.sample_rate, steps=plan.total_steps, delta=dp.delta, accountant=dp.accountant
            )
            if at_low <= dp.target_epsilon:
                low.append(plan)
        if low:
            names = ", ".join(sorted(repr(p.client) for p in low))
            out.append(
                _finding(
                    "PFL004",
                    "training.dp.target_epsilon",
                    f"target_epsilon {dp.target_epsilon:g} calibrates to a noise multiplier below {LOW_NOISE:g} for "
                    f"{names}: the target is so loose that almost no noise is added.",
                    "Lower target_epsilon, or accept that this is a weak guarantee.",
                )
            )

    if fed.rounds > 1 or config.training.local_epochs > 1:
        what = f"target_epsilon {dp.target_epsilon:g}" if dp.target_epsilon is not None else (
            f"budget_epsilon {dp.budget_epsilon:g}" if dp.budget_epsilon is not None else "the reported epsilon"
        )
        out.append(
            _finding(
                "PFL011",
                budget_field if budget is not None else "training.dp.noise_multiplier",
                f"{what} is for the whole run: privfl composes every DP-SGD step of all {fed.rounds} rounds x "
                f"{config.training.local_epochs} local epoch(s) into one epsilon per client; it is not a per-round figure.",
                "If you meant epsilon per round, the whole-run epsilon is larger (it grows roughly with the square "
                "root of the number of rounds); set the whole-run figure you can defend.",
            )
        )
    if dp.accountant is Accountant.RDP:
        out.append(
            _finding(
                "PFL012",
                "training.dp.accountant",
                "the RDP accountant is a valid but looser upper bound; PRV gives a tighter epsilon for the same noise "
                "(so less noise for the same target).",
                'Set training.dp.accountant = "prv" unless you must match an RDP-based report.',
            )
        )
    return out


def _delta_rules(config: RunConfig, plans: list[_Plan] | None) -> list[Finding]:
    if plans is None:
        return []
    delta = config.training.dp.delta
    smallest = min(plans, key=lambda p: p.num_examples)
    n = smallest.num_examples
    if delta >= 1.0 / n:
        return [
            _finding(
                "PFL002",
                "training.dp.delta",
                f"delta {delta:g} >= 1/n = {1 / n:.3g} for client {smallest.client!r} (n={n}): an (epsilon, delta) "
                "guarantee this loose is met by a mechanism that publishes a whole record at random.",
                f"Use delta << 1/n, e.g. at most {_nice_delta(n):g} (below 1/(10 n) for the smallest client).",
            )
        ]
    if delta >= 0.1 / n:
        return [
            _finding(
                "PFL003",
                "training.dp.delta",
                f"delta {delta:g} is within a factor 10 of 1/n = {1 / n:.3g} for client {smallest.client!r} (n={n}).",
                f"Use delta << 1/n, e.g. {_nice_delta(n):g}.",
            )
        ]
    return []


def _nice_delta(n: int) -> float:
    """The largest power of ten at most 1/(10 n)."""
    return 10.0 ** math.floor(math.log10(0.1 / n))


def _sampling_rules(config: RunConfig, plans: list[_Plan] | None) -> list[Finding]:
    if plans is None:
        return []
    batch = config.training.batch_size
    small = [p for p in plans if p.sample_rate >= 1.0]
    if not small:
        return []
    names = ", ".join(f"{p.client!r} (n={p.num_examples})" for p in small)
    return [
        _finding(
            "PFL007",
            "training.batch_size",
            f"{names} hold at most batch_size={batch} examples, so the sampling rate is q = 1: every step uses all "
            "of the client's data and DP-SGD gets no amplification by subsampling (epsilon per step is that of the "
            "plain Gaussian mechanism).",
            "Lower training.batch_size below the smallest client's size (q = batch_size / n), or merge very small sites.",
        )
    ]


def _calibrated_sigma(config: RunConfig, plan: _Plan) -> float:
    if plan.noise_multiplier is not None:
        return plan.noise_multiplier
    dp = config.training.dp
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    from privfl.accounting import noise_multiplier

    assert dp.target_epsilon is not None  # DPConfig sets exactly one of noise_multiplier and target_epsilon
    return noise_multiplier(
        target_epsilon=dp.target_epsilon, sample_rate=plan.sample_rate, steps=plan.total_steps, delta=dp.delta, accountant=dp.accountant
    )


def _protection_rules(config: RunConfig, plans: list[_Plan] | None) -> list[Finding]:
    fed = config.federation
    out: list[Finding] = []
    if fed.protection is ProtectionKind.PLAINTEXT:
        out.append(
            _finding(
                "PFL015",
                "federation.protection",
                "plaintext protection: the server receives every client's update in the clear. DP-SGD still bounds "
                "what an update reveals about a record, but the server can run reconstruction and membership attacks "
                "on each site's update individually.",
                'Use protection = "ckks" or "secagg" so the server sees only the aggregate.',
            )
        )
        return out
    out.append(
        _finding(
            "PFL013",
            "federation.seed",
            f"federation.seed = {fed.seed} fixes only the data partitioning and the model initialisation. Client "
            "sampling and DP noise come from fresh OS entropy every run (federation.noise_seed, for simulations, "
            f"makes both reproducible), and the seed never reaches the {fed.protection.value} cryptography, whose "
            "keys, masks and encryption randomness come from cryptographic generators (SEAL's for CKKS; secrets, "
            "os.urandom and AES-CTR for secure aggregation).",
            "Nothing to fix. Do not reuse the seed as a key.",
        )
    )
    if fed.protection is ProtectionKind.CKKS:
        ckks = fed.ckks
        limit = HE_STANDARD_MAX_LOGQ_128[ckks.poly_modulus_degree]
        total = ckks.data_bits + ckks.special_bits
        out.append(
            _finding(
                "PFL016",
                "federation.ckks",
                f"CKKS N={ckks.poly_modulus_degree}: {total} of the {limit} modulus bits the HE standard allows for "
                f"128-bit security ({limit - total} bits of margin); about {max(ckks.scale_bits - 22, 0)} bits of "
                f"absolute precision per released value (the key holder's release noise costs about two bits), and summed values must stay below 2^{ckks.data_bits - ckks.scale_bits - 1}.",
                "Nothing to fix; a larger margin costs nothing in security, a smaller one is refused by the config.",
            )
        )
        return out

    # Secure aggregation.
    from privfl.protocols.secagg.quantize import Quantizer

    sec = fed.secagg
    per_round = max(1, round(fed.client_fraction * config.data.num_clients))
    try:
        quantizer = Quantizer(clip_range=sec.clip_range, bits=sec.bits, num_clients=per_round, fraction_bits=sec.fraction_bits)
    except ConfigError as exc:
        field = "federation.secagg.fraction_bits" if sec.fraction_bits is not None else "federation.secagg.bits"
        out.append(
            _finding(
                "PFL008",
                field,
                f"with {per_round} clients per round, clip_range={sec.clip_range:g}, bits={sec.bits} and "
                f"fraction_bits={sec.fraction_bits}, the masked sum can wrap around 2^{sec.bits} ({exc.reason}); "
                "every round would fail.",
                "Leave fraction_bits unset (privfl then picks the finest step that cannot overflow), or raise bits "
                "(at most 32), lower fraction_bits, or lower clip_range.",
            )
        )
        quantizer = None
    if quantizer is not None and quantizer.levels < MIN_SECAGG_LEVELS:
        out.append(
            _finding(
                "PFL009",
                "federation.secagg.bits",
                f"each value is quantized to {quantizer.levels} levels per sign (step {quantizer.step:.3g}) so that "
                f"{per_round} clients fit in 2^{sec.bits}; the decoded sum can be off by up to "
                f"{quantizer.max_error(per_round):.3g} per coordinate.",
                "Raise federation.secagg.bits (32 costs no more upload than float32).",
            )
        )
    if sec.graph_seed is not None:
        out.append(
            _finding(
                "PFL014",
                "federation.secagg.graph_seed",
                "a fixed graph_seed makes the SecAgg+ neighbour graph the same, and predictable, in every round: "
                "colluding clients can place themselves around a target once and for all.",
                "Leave graph_seed unset so a fresh graph is drawn from a CSPRNG every round.",
            )
        )
    try:
        # The same check the federation runs before training, over every round size it may sample.
        sec.check_threshold_bound(config.data.num_clients)
    except ConfigError as exc:
        out.append(
            _finding(
                "PFL020",
                "federation.secagg.threshold",
                f"{exc} (its self-mask seed from one group of holders, its mask key from another) and unmask "
                "that client's update. The federation refuses this config before training.",
                "Use a fractional threshold above 1/2 (the default 2/3 always resolves above half), or an int "
                "threshold above half of the largest neighbourhood (neighbours + 1, or the round's client count "
                "for the complete graph).",
            )
        )
    if plans is not None:
        # Per-coordinate std of the DP noise alone in one round's update: the step adds
        # N(0, (sigma C / B)^2) per coordinate, times the learning rate, over `steps` steps.
        training = config.training
        worst_std, worst = 0.0, None
        for plan in plans:
            sigma = _calibrated_sigma(config, plan)
            std = training.learning_rate * sigma * training.dp.max_grad_norm / training.batch_size
            # Momentum m accumulates the noise by up to 1 / (1 - m).
            std *= math.sqrt(plan.steps_per_round) / max(1.0 - training.momentum, 0.01)
            if std > worst_std:
                worst_std, worst = std, plan
        if worst is not None and sec.clip_range < worst_std:
            out.append(
                _finding(
                    "PFL010",
                    "federation.secagg.clip_range",
                    f"clip_range {sec.clip_range:g} is below the per-coordinate spread of the DP noise alone in a round's "
                    f"update (about {worst_std:.3g} for client {worst.client!r}), so many coordinates are clipped "
                    "before masking and the average is biased.",
                    f"Raise federation.secagg.clip_range to a few times {worst_std:.2g}.",
                )
            )
    return out


def _round_completion_rules(config: RunConfig) -> list[Finding]:
    # The protection's own minimum and the federation's own round size: the run skips (or refuses)
    # exactly the rounds this rule counts, before anyone trains.
    from privfl.federation import build_protection, round_size

    fed = config.federation
    num_clients = config.data.num_clients
    needed = build_protection(fed).min_participants
    size = round_size(fed, num_clients)
    if size is not None:
        if size >= needed:
            return []
        return [
            Finding(
                severity=Severity.ERROR,
                code="PFL021",
                field="federation.client_fraction",
                message=f"each round samples {size} of {num_clients} sites but {fed.protection.value} needs at least "
                f"{needed}: every round would abort. The federation refuses this config before training.",
                fix=f"Raise federation.client_fraction to at least {needed / num_clients:.2g}, or use more sites.",
            )
        ]
    # Poisson client sampling: a round has Binomial(N, q) sites; those with fewer than `needed` are skipped.
    q = fed.client_fraction
    p_short = sum(math.comb(num_clients, k) * q**k * (1 - q) ** (num_clients - k) for k in range(min(needed, num_clients + 1)))
    if p_short <= 0.0:
        return []
    expected = p_short * fed.rounds
    return [
        Finding(
            severity=Severity.ERROR if p_short >= 1.0 else Severity.WARNING,
            code="PFL021",
            field="federation.client_fraction",
            message=f"with Poisson client sampling at q = {q:g} over {num_clients} sites, a round samples fewer than the "
            f"{needed} sites {fed.protection.value} needs with probability {p_short:.3g}: about {expected:.1f} of "
            f"{fed.rounds} rounds are skipped (nobody trains or is charged in them, but they make no progress).",
            fix="Raise federation.client_fraction or use more sites; the client-level accountant already counts "
            "every round, skipped or not.",
        )
    ]


def _noise_seed_rules(config: RunConfig) -> list[Finding]:
    fed = config.federation
    if fed.noise_seed is None:
        return []
    # The same seed drives the federation's client sampling and every DP noise stream
    # (Federation._sample and _noise_seed): whoever has it can recompute both.
    client_level = " and the client-level noise" if fed.client_dp is not None else ""
    return [
        _finding(
            "PFL022",
            "federation.noise_seed",
            f"federation.noise_seed = {fed.noise_seed} makes client sampling, batch sampling, the DP-SGD noise"
            f"{client_level} reproducible: anyone holding the config can recompute who took part in each round "
            "and regenerate the noise to subtract it. The DP guarantees, and amplification by client sampling, "
            "do not hold against whoever has the config (summary.json and the audit say so too).",
            "Use noise_seed for simulations and tests only: remove it, and every run draws client sampling and "
            "noise from fresh OS entropy.",
        )
    ]


def _client_level_rules(config: RunConfig) -> list[Finding]:
    fed = config.federation
    client_dp = getattr(fed, "client_dp", None)
    if client_dp is None:
        return [
            _finding(
                "PFL017",
                "federation.client_dp",
                "no client-level DP: DP-SGD protects each record inside a site, but whether a whole site took part "
                "(and its data distribution) is not protected: client-level epsilon is infinite.",
                "Add a [federation.client_dp] section (DP-FedAvg) if a site's participation itself is sensitive.",
            )
        ]
    k = config.data.num_clients
    if client_dp.delta >= 1.0 / k:
        return [
            _finding(
                "PFL018",
                "federation.client_dp.delta",
                f"client-level delta {client_dp.delta:g} >= 1/{k} clients: one whole site's participation could be "
                "revealed outright.",
                f"Use a client-level delta well below 1/{k}, e.g. {_nice_delta(k):g}.",
            )
        ]
    return []


REFERENCE_DIM = 100_000
"""Model size the secure-aggregation range is illustrated for (the federation derives it for the real model)."""


def _secagg_noise_range_rules(config: RunConfig) -> list[Finding]:
    # Secure aggregation clips every coordinate to clip_range; a clipped noise share is not the
    # charged noise (issue 13). The federation derives the range from the noise every round and aborts
    # a round that would clip: this rule shows the range, and is an ERROR where no range can fit.
    from privfl.client_dp import count_free_shares, plan_client_dp, secagg_noise_ratio, secagg_range

    fed = config.federation
    client_dp = fed.client_dp
    if client_dp is None or fed.protection is not ProtectionKind.SECAGG:
        return []
    num_clients = config.data.num_clients
    try:
        plan = plan_client_dp(client_dp, num_clients=num_clients, client_fraction=fed.client_fraction, rounds=fed.rounds)
        rho = secagg_noise_ratio(fed.secagg.resolve_threshold, num_clients)
        shares = count_free_shares(max(2, num_clients), rho)
        ranges = [
            secagg_range(
                plan, clip_norm=client_dp.clip_norm, dim=dim, adaptive=client_dp.adaptive, shares=shares,
                max_clients=max(2, num_clients), rounds=fed.rounds, delta=client_dp.delta, bits=fed.secagg.bits,
            )
            for dim in (1, REFERENCE_DIM)
        ]
    except ConfigError as exc:
        return [
            Finding(
                severity=Severity.ERROR,
                code="PFL023",
                field="federation.secagg.bits",
                message=f"the client-level noise shares of {num_clients} sites cannot be held by secure aggregation without "
                f"clipping them ({exc.reason}): clipping would cut the charged noise, so every round would abort.",
                fix="Raise federation.secagg.bits (at most 32), or use fewer sites per secure-aggregation round.",
            )
        ]
    derived = ranges[1]
    return [
        _finding(
            "PFL023",
            "federation.secagg.clip_range",
            f"secure aggregation clips every coordinate to clip_range, which would cut the noise shares: under client-level "
            f"DP privfl derives the range from the noise each round (S = {client_dp.clip_norm:g}: "
            f"clip_range {derived.clip_range:.4g} and step 2^-{derived.fraction_bits} for a {REFERENCE_DIM}-parameter model, "
            f"{derived.tail_sigmas:.1f} share standard deviations), replacing federation.secagg.clip_range/fraction_bits. "
            f"A round that would clip anyway is aborted, as is one with a dropout; the tail adds "
            f"{derived.tail_delta:.2g} to the client-level delta. Adjacency: {client_dp.adjacency.value} "
            f"(the {num_clients} sites are public); against the server, which sees who takes part, no participation "
            "guarantee holds.",
            "Nothing to fix; `privfl audit` counts the rounds aborted this way.",
        )
    ]
