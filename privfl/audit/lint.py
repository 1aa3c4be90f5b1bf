"""Static checks of a run config for settings that weaken or void its privacy claims, before anything runs.

Every rule reads only the config (and, when given, each client's number of examples); none trains.
A :class:`Finding` says what is wrong, why it matters and how to fix it. Severities:

* ``ERROR``: the privacy claim is void or the run cannot work (e.g. delta >= 1/n, a secure-aggregation
  modulus that can overflow, noise too small to be private);
* ``WARNING``: the claim holds but is weak or easy to misread (epsilon above 10, no budget cap,
  plaintext updates);
* ``INFO``: how privfl counts or protects something, stated so nobody has to guess.

The rules live in one registry (:mod:`privfl.audit.rules`), shared with ``privfl audit``: a check
that applies to a config and to a run is written once and reported here under its PFL code.
:data:`RULES` maps every PFL code to its severity and title; ``docs/audits.md`` tabulates them.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from privfl import _validate
from privfl.accounting import Accountant, epsilon
from privfl.audit.rules import (
    HIGH_EPSILON,
    LOW_NOISE,
    ClientFacts,
    Facts,
    Finding,
    Hit,
    Severity,
    Tool,
    _nice_delta,
    apply_rules,
    codes,
    lint_code,
    register,
)
from privfl.config import DataConfig, FederationConfig, ProtectionKind, RunConfig, TrainingConfig, load_config
from privfl.errors import ConfigError
from privfl.plan import NOISE_DROWNS_FIX, NOISE_DROWNS_RATIO, noise_drowns_fix, noise_drowns_training
from privfl.protocols.ckks_params import HE_STANDARD_MAX_LOGQ_128

if TYPE_CHECKING:
    from privfl.protocols.secagg.quantize import Quantizer

__all__ = ["RULES", "ConfigFacts", "Finding", "Severity", "lint_config", "lint_file", "run_start_findings"]

NOMINAL_EPSILON = 100.0
"""At or above this epsilon a DP claim is nominal: it rules out nothing an attacker could do."""
NEGLIGIBLE_NOISE = 0.1
"""Below this the noise is negligible next to the clipped gradient: private in name only."""
MIN_SECAGG_LEVELS = 256
"""Fewer quantization levels per sign than this (8 bits) leaves a coarse aggregate."""
REFERENCE_DIM = 100_000
"""Model size the secure-aggregation range is illustrated for (the federation derives it for the real model)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class _Plan:
    """A client's planned DP-SGD run (as the federation would compute it)."""

    client: str
    num_examples: int
    sample_rate: float
    steps_per_round: int
    total_steps: int
    noise_multiplier: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ConfigFacts(Facts):
    """What the lint rules read: the config, and each client's plan when the client sizes are known.

    Attributes:
        config: the run description.
        plans: each client's plan (None when the client sizes are unknown).
    """

    config: RunConfig
    plans: tuple[_Plan, ...] | None

    def field(self, client: ClientFacts, attr: str) -> str:
        """The config setting behind ``attr`` (every client shares it)."""
        dp = self.config.training.dp
        fixed = dp.noise_multiplier is not None
        if attr == "epsilon" and client.client is None:
            return _budget_field(self.config)
        if attr in ("epsilon", "noise_multiplier"):
            return "training.dp.noise_multiplier" if fixed else "training.dp.target_epsilon"
        return {"delta": "training.dp.delta", "epsilon_budget": "training.dp.budget_epsilon"}[attr]


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


def _budget_field(config: RunConfig) -> str:
    return "training.dp.target_epsilon" if config.training.dp.target_epsilon is not None else "training.dp.budget_epsilon"


def _facts(config: RunConfig, plans: list[_Plan] | None) -> ConfigFacts:
    """The config's own settings (every client), then each planned client."""
    dp = config.training.dp
    budget = dp.target_epsilon if dp.target_epsilon is not None else dp.budget_epsilon
    cap = math.inf if budget is None else budget
    settings = ClientFacts(
        client=None, num_examples=None, delta=dp.delta, noise_multiplier=dp.noise_multiplier, epsilon=budget,
        epsilon_basis=_budget_field(config).rsplit(".", 1)[1], epsilon_budget=cap,
    )
    clients = [settings]
    for plan in plans or ():
        sigma = dp.noise_multiplier
        if sigma is None:
            planned, basis = budget, "target_epsilon"
        elif sigma < NEGLIGIBLE_NOISE:
            planned, basis = None, ""  # PFL005 says so; the accountants are fragile this close to no noise
        else:
            value, kind = _planned_epsilon(sigma, plan, config)
            # The ledger stops a client at its cap: it never spends more.
            planned = min(value, cap)
            basis = (
                f"noise_multiplier {sigma:g} over the planned {plan.total_steps} steps, n={plan.num_examples}, "
                f"q={plan.sample_rate:.3g}, {kind.value.upper()} at delta {dp.delta:g}"
            )
        clients.append(
            ClientFacts(
                client=plan.client, num_examples=plan.num_examples, delta=dp.delta,
                noise_multiplier=plan.noise_multiplier if plan.noise_multiplier is not None else sigma,
                epsilon=planned, epsilon_basis=basis, epsilon_budget=cap,
            )
        )
    return ConfigFacts(
        clients=tuple(clients), client_dp=config.federation.client_dp is not None, config=config,
        plans=None if plans is None else tuple(plans),
    )


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
    plans = _plans(config, client_sizes) if client_sizes else None
    return apply_rules(Tool.LINT, _facts(config, plans))


# The lint ERRORs a run start checks (cheap: settings and client sizes, no accountant).
_AT_RUN_START = ("PFL002",)


def run_start_findings(training: TrainingConfig, federation: FederationConfig, client_sizes: Mapping[str, int]) -> list[Finding]:
    """The lint errors a library run's own settings and client sizes raise, checked as the run starts.

    A library user who never runs ``privfl lint`` still hears of a setting that voids the claim
    (`privfl.Federation` warns with :class:`privfl.errors.PrivacyWarning`): delta >= 1/n for a
    client (PFL002). Only rules that need no accountant run here, so the check costs nothing
    next to a round even for thousands of sites.
    """
    from privfl.audit.rules import _REGISTRY

    config = RunConfig(data=DataConfig(num_clients=max(2, len(client_sizes))), training=training, federation=federation)
    dp = training.dp
    cap = math.inf if dp.epsilon_budget is None else dp.epsilon_budget
    clients = [
        ClientFacts(
            client=name, num_examples=n, delta=dp.delta, noise_multiplier=dp.noise_multiplier, epsilon=None, epsilon_basis="", epsilon_budget=cap
        )
        for name, n in client_sizes.items()
    ]
    facts = ConfigFacts(clients=tuple(clients), client_dp=federation.client_dp is not None, config=config, plans=None)
    findings = []
    for code in _AT_RUN_START:
        rule = _REGISTRY[code]
        hits = rule.check(facts)
        if hits:
            h = max(hits, key=lambda h: h.rank)  # one setting for every client: the client that binds it
            findings.append(Finding(severity=h.severity or Severity.ERROR, code=code, field=h.field, message=h.message, fix=h.fix or rule.fix))
    return findings


def lint_file(path: str | os.PathLike[str]) -> list[Finding]:
    """Loads a TOML run config, partitions its bundled dataset to learn the client sizes, and lints it.

    Raises:
        ConfigError: the file is missing, is not a valid config, or its partition cannot be made.
    """
    from privfl.runner import load_dataset, split_clients

    config = load_config(path)
    clients = split_clients(config, load_dataset(config))
    return lint_config(config, client_sizes={name: len(ds) for name, ds in clients.items()})


# -- helpers -------------------------------------------------------------------------------------
def _planned_epsilon(sigma: float, plan: _Plan, config: RunConfig) -> tuple[float, Accountant]:
    """Epsilon of a fixed sigma over the planned run.

    The PRV accountant becomes very slow and numerically fragile for tiny noise, so below
    ``LOW_NOISE`` the RDP upper bound is used (and named in the message).
    """
    dp = config.training.dp
    kind = dp.accountant if sigma >= LOW_NOISE else Accountant.RDP
    with warnings.catch_warnings():
        # Opacus warns that the optimal RDP order is at the edge of its grid when epsilon is huge.
        warnings.simplefilter("ignore")
        value = epsilon(noise_multiplier=sigma, sample_rate=plan.sample_rate, steps=plan.total_steps, delta=dp.delta, accountant=kind)
    return value, kind


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


def _secagg_per_round(config: RunConfig) -> int:
    return max(1, round(config.federation.client_fraction * config.data.num_clients))


def _quantizer(config: RunConfig) -> Quantizer:
    """The secure-aggregation quantizer of a full round (raises ConfigError when the sum can overflow)."""
    from privfl.protocols.secagg.quantize import Quantizer

    sec = config.federation.secagg
    return Quantizer(clip_range=sec.clip_range, bits=sec.bits, num_clients=_secagg_per_round(config), fraction_bits=sec.fraction_bits)


# -- rules that only a config has -----------------------------------------------------------------------
@register(
    lint_code("PFL003", Severity.WARNING, "delta within a factor 10 of 1/n (use delta << 1/n)"),
    title="delta not much smaller than 1/n",
    fix="Use delta << 1/n for the smallest client (below 1/(10 n)).",
)
def _delta_close_to_one_over_n(facts: ConfigFacts) -> list[Hit]:
    if not facts.plans:
        return []
    delta = facts.config.training.dp.delta
    smallest = min(facts.plans, key=lambda p: p.num_examples)
    n = smallest.num_examples
    if delta >= 1.0 / n or delta < 0.1 / n:
        return []  # PFL002 covers delta >= 1/n
    return [
        Hit(
            field="training.dp.delta",
            message=f"delta {delta:g} is within a factor 10 of 1/n = {1 / n:.3g} for client {smallest.client!r} (n={n}).",
            fix=f"Use delta << 1/n, e.g. {_nice_delta(n):g}.",
        )
    ]


@register(
    lint_code("PFL005", Severity.ERROR, "private in name only: sigma below 0.1, or an epsilon of 100 or more"),
    title="private in name only (negligible noise or nominal epsilon)",
    fix=f"Set an epsilon of at most {HIGH_EPSILON:g}, or a noise_multiplier of at least 0.5.",
)
def _private_in_name_only(facts: ConfigFacts) -> list[Hit]:
    dp = facts.config.training.dp
    out = []
    budget = dp.target_epsilon if dp.target_epsilon is not None else dp.budget_epsilon
    if budget is not None and budget >= NOMINAL_EPSILON:
        out.append(
            Hit(
                field=_budget_field(facts.config),
                message=f"epsilon {budget:g} is nominal: e^{budget:g} bounds nothing an attacker could do, so the run is "
                "private in name only.",
                fix=f"Set an epsilon of at most {HIGH_EPSILON:g} (1-8 is the usual range for sample-level DP-SGD).",
                supersedes=("PFL001",),
            )
        )
    sigma = dp.noise_multiplier
    if sigma is not None and sigma < NEGLIGIBLE_NOISE:
        out.append(
            Hit(
                field="training.dp.noise_multiplier",
                message=f"noise_multiplier {sigma:g} < {NEGLIGIBLE_NOISE:g}: the Gaussian noise is negligible next to the "
                "clipped gradient, so DP-SGD is private in name only (the config model cannot turn DP off; a "
                "tiny sigma is how it ends up off in effect).",
                fix="Set target_epsilon instead and let privfl calibrate sigma, or use a noise_multiplier of at least 0.5.",
                supersedes=("PFL004",),
            )
        )
    if sigma is not None:
        planned = [c for c in facts.clients if c.client is not None and c.epsilon is not None]
        worst = max(planned, key=lambda c: c.epsilon or 0.0, default=None)
        if worst is not None and worst.epsilon is not None and worst.epsilon >= NOMINAL_EPSILON:
            out.append(
                Hit(
                    field="training.dp.noise_multiplier",
                    message=f"{worst.who}: epsilon {worst.epsilon:.3g} ({worst.epsilon_basis}) is nominal: it bounds "
                    "nothing an attacker could do, so the run is private in name only.",
                    fix="Raise noise_multiplier, train fewer rounds or local epochs, or set target_epsilon.",
                    supersedes=("PFL001",),
                )
            )
    return out


@register(
    lint_code("PFL007", Severity.WARNING, "a client with n_k <= `batch_size`: q = 1, every step uses all its data, no amplification by subsampling"),
    title="client too small for its batch size (q = 1, no amplification)",
    fix="Lower training.batch_size below the smallest client's size (q = batch_size / n), or merge very small sites.",
)
def _no_amplification(facts: ConfigFacts) -> list[Hit]:
    small = [p for p in facts.plans or () if p.sample_rate >= 1.0]
    if not small:
        return []
    names = ", ".join(f"{p.client!r} (n={p.num_examples})" for p in small)
    return [
        Hit(
            field="training.batch_size",
            message=f"{names} hold at most batch_size={facts.config.training.batch_size} examples, so the sampling rate "
            "is q = 1: every step uses all of the client's data and DP-SGD gets no amplification by subsampling "
            "(epsilon per step is that of the plain Gaussian mechanism).",
        )
    ]


@register(
    lint_code("PFL008", Severity.ERROR, "secure aggregation: `bits` / `fraction_bits` / `clip_range` let a sum of the round's clients overflow 2^bits"),
    title="secure-aggregation sum can overflow its modulus",
    fix="Leave fraction_bits unset (privfl then picks the finest step that cannot overflow), or raise bits "
    "(at most 32), lower fraction_bits, or lower clip_range.",
)
def _secagg_overflow(facts: ConfigFacts) -> list[Hit]:
    config = facts.config
    if config.federation.protection is not ProtectionKind.SECAGG:
        return []
    sec = config.federation.secagg
    try:
        _quantizer(config)
    except ConfigError as exc:
        field = "federation.secagg.fraction_bits" if sec.fraction_bits is not None else "federation.secagg.bits"
        return [
            Hit(
                field=field,
                message=f"with {_secagg_per_round(config)} clients per round, clip_range={sec.clip_range:g}, bits={sec.bits} "
                f"and fraction_bits={sec.fraction_bits}, the masked sum can wrap around 2^{sec.bits} ({exc.reason}); "
                "every round would fail.",
            )
        ]
    return []


@register(
    lint_code("PFL009", Severity.WARNING, "secure aggregation: fewer than 256 quantization levels per sign (coarse aggregate)"),
    title="secure-aggregation quantization is coarse",
    fix="Raise federation.secagg.bits (32 costs no more upload than float32).",
)
def _secagg_coarse(facts: ConfigFacts) -> list[Hit]:
    config = facts.config
    if config.federation.protection is not ProtectionKind.SECAGG:
        return []
    try:
        quantizer = _quantizer(config)
    except ConfigError:
        return []  # PFL008
    if quantizer.levels >= MIN_SECAGG_LEVELS:
        return []
    per_round = _secagg_per_round(config)
    return [
        Hit(
            field="federation.secagg.bits",
            message=f"each value is quantized to {quantizer.levels} levels per sign (step {quantizer.step:.3g}) so that "
            f"{per_round} clients fit in 2^{config.federation.secagg.bits}; the decoded sum can be off by up to "
            f"{quantizer.max_error(per_round):.3g} per coordinate.",
        )
    ]


@register(
    lint_code("PFL010", Severity.INFO, "secure aggregation: `clip_range` below the per-coordinate spread of the DP noise in one round's update"),
    title="secure-aggregation clip range below the typical update magnitude",
    fix="Raise federation.secagg.clip_range to a few times the noise spread.",
)
def _secagg_clip_below_noise(facts: ConfigFacts) -> list[Hit]:
    config = facts.config
    if config.federation.protection is not ProtectionKind.SECAGG or facts.plans is None:
        return []
    # Per-coordinate std of the DP noise alone in one round's update: the step adds
    # N(0, (sigma C / B)^2) per coordinate, times the learning rate, over `steps` steps.
    training = config.training
    worst_std, worst = 0.0, None
    for plan in facts.plans:
        sigma = _calibrated_sigma(config, plan)
        std = training.learning_rate * sigma * training.dp.max_grad_norm / training.batch_size
        # Momentum m accumulates the noise by up to 1 / (1 - m).
        std *= math.sqrt(plan.steps_per_round) / max(1.0 - training.momentum, 0.01)
        if std > worst_std:
            worst_std, worst = std, plan
    clip_range = config.federation.secagg.clip_range
    if worst is None or clip_range >= worst_std:
        return []
    return [
        Hit(
            field="federation.secagg.clip_range",
            message=f"clip_range {clip_range:g} is below the per-coordinate spread of the DP noise alone in a round's "
            f"update (about {worst_std:.3g} for client {worst.client!r}), so many coordinates are clipped "
            "before masking and the average is biased.",
            fix=f"Raise federation.secagg.clip_range to a few times {worst_std:.2g}.",
        )
    ]


@register(
    lint_code("PFL011", Severity.INFO, "the epsilon budget covers all rounds (privfl composes over the whole run), not one round"),
    title="the epsilon budget covers the whole run, not one round",
    fix="If you meant epsilon per round, the whole-run epsilon is larger (it grows roughly with the square "
    "root of the number of rounds); set the whole-run figure you can defend.",
)
def _whole_run_budget(facts: ConfigFacts) -> list[Hit]:
    config = facts.config
    dp, fed = config.training.dp, config.federation
    if fed.rounds <= 1 and config.training.local_epochs <= 1:
        return []
    budget = dp.target_epsilon if dp.target_epsilon is not None else dp.budget_epsilon
    what = f"target_epsilon {dp.target_epsilon:g}" if dp.target_epsilon is not None else (
        f"budget_epsilon {dp.budget_epsilon:g}" if dp.budget_epsilon is not None else "the reported epsilon"
    )
    return [
        Hit(
            field=_budget_field(config) if budget is not None else "training.dp.noise_multiplier",
            message=f"{what} is for the whole run: privfl composes every DP-SGD step of all {fed.rounds} rounds x "
            f"{config.training.local_epochs} local epoch(s) into one epsilon per client; it is not a per-round figure.",
        )
    ]


@register(
    lint_code("PFL012", Severity.INFO, "RDP accountant: PRV is tighter"),
    title="RDP accountant: PRV is tighter",
    fix='Set training.dp.accountant = "prv" unless you must match an RDP-based report.',
)
def _rdp_accountant(facts: ConfigFacts) -> list[Hit]:
    if facts.config.training.dp.accountant is not Accountant.RDP:
        return []
    return [
        Hit(
            field="training.dp.accountant",
            message="the RDP accountant is a valid but looser upper bound; PRV gives a tighter epsilon for the same noise "
            "(so less noise for the same target).",
        )
    ]


@register(
    lint_code(
        "PFL013",
        Severity.INFO,
        "`federation.seed` fixes only data partitioning and model initialisation; client sampling and DP noise are secret "
        "by default, and the seed never reaches the CKKS / secure-aggregation cryptography",
    ),
    title="federation.seed fixes only partitioning and initialisation",
    fix="Nothing to fix. Do not reuse the seed as a key.",
)
def _seed_scope(facts: ConfigFacts) -> list[Hit]:
    fed = facts.config.federation
    if fed.protection is ProtectionKind.PLAINTEXT:
        return []
    return [
        Hit(
            field="federation.seed",
            message=f"federation.seed = {fed.seed} fixes only the data partitioning and the model initialisation. Client "
            "sampling and DP noise come from fresh OS entropy every run (federation.noise_seed, for simulations, "
            f"makes both reproducible), and the seed never reaches the {fed.protection.value} cryptography, whose "
            "keys, masks and encryption randomness come from cryptographic generators (SEAL's for CKKS; secrets, "
            "os.urandom and AES-CTR for secure aggregation and the shared-key mode).",
        )
    ]


@register(
    lint_code("PFL014", Severity.WARNING, "a fixed `secagg.graph_seed`: the SecAgg+ neighbour graph is predictable"),
    title="fixed secure-aggregation graph seed",
    fix="Leave graph_seed unset so a fresh graph is drawn from a CSPRNG every round.",
)
def _fixed_graph_seed(facts: ConfigFacts) -> list[Hit]:
    fed = facts.config.federation
    if fed.protection is not ProtectionKind.SECAGG or fed.secagg.graph_seed is None:
        return []
    return [
        Hit(
            field="federation.secagg.graph_seed",
            message="a fixed graph_seed makes the SecAgg+ neighbour graph the same, and predictable, in every round: "
            "colluding clients can place themselves around a target once and for all.",
        )
    ]


@register(
    lint_code("PFL015", Severity.WARNING, "plaintext protection: the server sees every client's update"),
    title="plaintext protection: the server sees every update",
    fix='Use protection = "ckks" or "secagg" so the server sees only the aggregate.',
)
def _plaintext(facts: ConfigFacts) -> list[Hit]:
    if facts.config.federation.protection is not ProtectionKind.PLAINTEXT:
        return []
    return [
        Hit(
            field="federation.protection",
            message="plaintext protection: the server receives every client's update in the clear. DP-SGD still bounds "
            "what an update reveals about a record, but the server can run reconstruction and membership attacks "
            "on each site's update individually.",
        )
    ]


@register(
    lint_code("PFL016", Severity.INFO, "CKKS: modulus bits used against the HE standard's 128-bit limit, and the precision"),
    title="CKKS security margin and precision",
    fix="Nothing to fix; a larger margin costs nothing in security, a smaller one is refused by the config.",
)
def _ckks_margin(facts: ConfigFacts) -> list[Hit]:
    fed = facts.config.federation
    if fed.protection is not ProtectionKind.CKKS:
        return []
    ckks = fed.ckks
    limit = HE_STANDARD_MAX_LOGQ_128[ckks.poly_modulus_degree]
    total = ckks.data_bits + ckks.special_bits
    return [
        Hit(
            field="federation.ckks",
            message=f"CKKS N={ckks.poly_modulus_degree}: {total} of the {limit} modulus bits the HE standard allows for "
            f"128-bit security ({limit - total} bits of margin); about {max(ckks.scale_bits - 22, 0)} bits of "
            "absolute precision per released value (the key holder's release noise costs about two bits), and summed "
            f"values must stay below 2^{ckks.data_bits - ckks.scale_bits - 1}.",
        )
    ]


@register(
    lint_code(
        "PFL024",
        Severity.WARNING,
        "shared-key encryption: every site holds the decryption key (a server colluding with any one site reads every "
        "update), and the quantization step at the federation's size",
    ),
    title="shared-key encryption: every site can decrypt",
    fix='Use protection = "ckks" (one key holder) or "secagg" unless every site is trusted not to collude with the server.',
)
def _shared_key_trust(facts: ConfigFacts) -> list[Hit]:
    from privfl.plan import round_size
    from privfl.protocols.shared_key import RoundEncoding

    fed = facts.config.federation
    if fed.protection is not ProtectionKind.SHARED_KEY:
        return []
    # The step depends on how many sites a round holds (at most every site, under Poisson sampling).
    sites = round_size(fed, facts.config.data.num_clients) or facts.config.data.num_clients
    cfg = fed.shared_key
    try:
        encoding = RoundEncoding.for_round(cfg, 1, sites)
        precision = (
            f"with {sites} sites per round each value is quantized to a step of {encoding.step:.3g} "
            f"(clip_range {cfg.clip_range:g} / {encoding.levels} levels, {cfg.limbs} prime(s))"
        )
    except ConfigError as exc:
        precision = f"the modulus cannot serve {sites} sites ({exc.reason})"
    return [
        Hit(
            field="federation.protection",
            message="shared_key: every site holds the secret key, so the server learns every site's update if it "
            f"colludes with any single site (the key-holder CKKS mode trusts one key holder instead); {precision}.",
        )
    ]


@register(
    lint_code("PFL018", Severity.ERROR, "client-level delta >= 1/number of clients"),
    title="client-level delta >= 1/number of clients",
    fix="Use a client-level delta well below 1/(number of clients).",
)
def _client_level_delta(facts: ConfigFacts) -> list[Hit]:
    client_dp = facts.config.federation.client_dp
    k = facts.config.data.num_clients
    if client_dp is None or client_dp.delta < 1.0 / k:
        return []
    return [
        Hit(
            field="federation.client_dp.delta",
            message=f"client-level delta {client_dp.delta:g} >= 1/{k} clients: one whole site's participation could be "
            "revealed outright.",
            fix=f"Use a client-level delta well below 1/{k}, e.g. {_nice_delta(k):g}.",
        )
    ]


@register(
    lint_code("PFL019", Severity.INFO, "no client sizes given: size-dependent rules skipped"),
    title="client sizes unknown: size-dependent rules skipped",
    fix="Lint the TOML file with lint_file (it partitions the bundled dataset), or pass client_sizes.",
)
def _sizes_unknown(facts: ConfigFacts) -> list[Hit]:
    if facts.plans is not None:
        return []
    return [
        Hit(
            field="data",
            message="no client sizes were given, so delta against 1/n (PFL002/003), sampling amplification "
            "(PFL007) and the calibrated noise multiplier (PFL004/005) were not checked.",
        )
    ]


@register(
    lint_code(
        "PFL026",
        Severity.WARNING,
        f"the DP noise drowns every site's training: sigma / (expected batch x sqrt(planned steps x sites)) >= "
        f"{NOISE_DROWNS_RATIO:g} for every site, so the data moves the model by at most a third of the noise's standard "
        "deviation on any coordinate (utility, not privacy; `privfl run` warns too)",
    ),
    title="the DP noise drowns every site's training",
    fix=NOISE_DROWNS_FIX,
)
def _noise_drowns_training(facts: ConfigFacts) -> list[Hit]:
    if not facts.plans or any(p.noise_multiplier is None for p in facts.plans):
        return []
    message = noise_drowns_training(
        ((p.client, p.num_examples, p.sample_rate, p.total_steps, p.noise_multiplier or 0.0) for p in facts.plans), len(facts.plans)
    )
    field = "training.dp.noise_multiplier" if facts.config.training.dp.noise_multiplier is not None else "training.dp.target_epsilon"
    return [] if message is None else [Hit(field=field, message=message, fix=noise_drowns_fix(facts.config.training))]


@register(
    lint_code(
        "PFL025",
        Severity.ERROR,
        "no site can train a single round within `budget_epsilon` at the fixed `noise_multiplier`: the run would train "
        "nothing, and `privfl run` refuses it before its ledger is created",
    ),
    title="no site can afford one round",
    fix="Raise training.dp.budget_epsilon or training.dp.noise_multiplier, or set target_epsilon to calibrate the noise to the budget.",
)
def _no_round_affordable(facts: ConfigFacts) -> list[Hit]:
    if not facts.plans:
        return []
    from privfl.plan import no_site_affords_a_round, one_round_refusal

    training = facts.config.training
    cheapest = no_site_affords_a_round(training, ((p.client, p.sample_rate, p.steps_per_round) for p in facts.plans))
    if cheapest is None:
        return []
    return [Hit(field="training.dp.budget_epsilon", message=f"budget_epsilon {training.dp.epsilon_budget:g}: {one_round_refusal(*cheapest, training, advice=False)}.")]


@register(
    lint_code(
        "PFL020",
        Severity.ERROR,
        "secure aggregation: `threshold` not above half the share holders (neighbours + 1, or the round's clients for the "
        "complete graph) for some round size: two disjoint groups of holders could then rebuild one client's self-mask "
        "seed and its mask key and unmask its update; the federation refuses such a config before training. Use a "
        "fractional threshold above 1/2 (the default 2/3)",
    ),
    title="secure-aggregation threshold not above half the share holders",
    fix="Use a fractional threshold above 1/2 (the default 2/3 always resolves above half), or an int "
    "threshold above half of the largest neighbourhood (neighbours + 1, or the round's client count "
    "for the complete graph).",
)
def _secagg_threshold(facts: ConfigFacts) -> list[Hit]:
    config = facts.config
    if config.federation.protection is not ProtectionKind.SECAGG:
        return []
    try:
        # The same check the federation runs before training, over every round size it may sample.
        config.federation.secagg.check_threshold_bound(config.data.num_clients)
    except ConfigError as exc:
        return [
            Hit(
                field="federation.secagg.threshold",
                message=f"{exc} (its self-mask seed from one group of holders, its mask key from another) and unmask "
                "that client's update. The federation refuses this config before training.",
            )
        ]
    return []


@register(
    lint_code(
        "PFL021",
        Severity.ERROR,
        "rounds that cannot complete: a round samples fewer sites than the protection needs (`secagg`: 2; `ckks`: "
        "`ckks.min_contributors`). ERROR when every round would (the federation refuses the config before training); "
        "WARNING under Poisson client sampling, with the probability and the expected number of skipped rounds (nobody "
        "trains or is charged in a skipped round)",
        also=(Severity.WARNING,),
    ),
    title="rounds that cannot complete",
    fix="Raise federation.client_fraction or use more sites.",
)
def _rounds_cannot_complete(facts: ConfigFacts) -> list[Hit]:
    # The protection's own minimum and the federation's own round size: the run skips (or refuses)
    # exactly the rounds this rule counts, before anyone trains.
    from privfl.federation import build_protection, round_size

    config = facts.config
    fed = config.federation
    num_clients = config.data.num_clients
    needed = build_protection(fed).min_participants
    size = round_size(fed, num_clients)
    if size is not None:
        if size >= needed:
            return []
        return [
            Hit(
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
        Hit(
            field="federation.client_fraction",
            message=f"with Poisson client sampling at q = {q:g} over {num_clients} sites, a round samples fewer than the "
            f"{needed} sites {fed.protection.value} needs with probability {p_short:.3g}: about {expected:.1f} of "
            f"{fed.rounds} rounds are skipped (nobody trains or is charged in them, but they make no progress).",
            fix="Raise federation.client_fraction or use more sites; the client-level accountant already counts "
            "every round, skipped or not.",
            severity=Severity.ERROR if p_short >= 1.0 else Severity.WARNING,
        )
    ]


@register(
    lint_code(
        "PFL022",
        Severity.WARNING,
        "`federation.noise_seed` is set: client sampling and DP noise are predictable from the config, so the DP "
        "guarantees and client-level amplification by sampling do not hold against whoever has it (simulations and tests only)",
    ),
    title="noise_seed set: client sampling and DP noise predictable from the config",
    fix="Use noise_seed for simulations and tests only: remove it, and every run draws client sampling and "
    "noise from fresh OS entropy.",
)
def _noise_seed(facts: ConfigFacts) -> list[Hit]:
    fed = facts.config.federation
    if fed.noise_seed is None:
        return []
    # The same seed drives the federation's client sampling and every DP noise stream
    # (Federation._sample and _noise_seed): whoever has it can recompute both.
    client_level = " and the client-level noise" if fed.client_dp is not None else ""
    return [
        Hit(
            field="federation.noise_seed",
            message=f"federation.noise_seed = {fed.noise_seed} makes client sampling, batch sampling, the DP-SGD noise"
            f"{client_level} reproducible: anyone holding the config can recompute who took part in each round "
            "and regenerate the noise to subtract it. The DP guarantees, and amplification by client sampling, "
            "do not hold against whoever has the config (summary.json and the audit say so too).",
        )
    ]


@register(
    lint_code(
        "PFL023",
        Severity.INFO,
        "client-level DP under secure aggregation: the clip range and step are derived from the noise shares every round "
        "(shown for a 100,000-parameter model), the configured `clip_range`/`fraction_bits` are replaced, a round that "
        "would clip a share or that loses a site is aborted, the tail delta and the adjacency. ERROR where the modulus "
        "`bits` cannot hold the sites' noised shares at any step (clipping would cut the noise; every round would abort)",
        also=(Severity.ERROR,),
    ),
    title="client-level DP under secure aggregation: clip range derived from the noise (ERROR: cannot fit)",
    fix="Nothing to fix; `privfl audit` counts the rounds aborted this way.",
)
def _secagg_noise_range(facts: ConfigFacts) -> list[Hit]:
    # Secure aggregation clips every coordinate to clip_range; a clipped noise share is not the
    # charged noise (issue 13). The federation derives the range from the noise every round and aborts
    # a round that would clip: this rule shows the range, and is an ERROR where no range can fit.
    from privfl.client_dp import count_free_shares, plan_client_dp, secagg_noise_ratio, secagg_range

    fed = facts.config.federation
    client_dp = fed.client_dp
    if client_dp is None or fed.protection is not ProtectionKind.SECAGG:
        return []
    num_clients = facts.config.data.num_clients
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
            Hit(
                field="federation.secagg.bits",
                message=f"the client-level noise shares of {num_clients} sites cannot be held by secure aggregation without "
                f"clipping them ({exc.reason}): clipping would cut the charged noise, so every round would abort.",
                fix="Raise federation.secagg.bits (at most 32), or use fewer sites per secure-aggregation round.",
                severity=Severity.ERROR,
            )
        ]
    derived = ranges[1]
    return [
        Hit(
            field="federation.secagg.clip_range",
            message=f"secure aggregation clips every coordinate to clip_range, which would cut the noise shares: under "
            f"client-level DP privfl derives the range from the noise each round (S = {client_dp.clip_norm:g}: "
            f"clip_range {derived.clip_range:.4g} and step 2^-{derived.fraction_bits} for a {REFERENCE_DIM}-parameter model, "
            f"{derived.tail_sigmas:.1f} share standard deviations), replacing federation.secagg.clip_range/fraction_bits. "
            f"A round that would clip anyway is aborted, as is one with a dropout; the tail adds "
            f"{derived.tail_delta:.2g} to the client-level delta. Adjacency: {client_dp.adjacency.value} "
            f"(the {num_clients} sites are public); against the server, which sees who takes part, no participation "
            "guarantee holds.",
        )
    ]


RULES: Mapping[str, tuple[Severity, str]] = codes(Tool.LINT)
"""``code -> (severity, title)`` of every lint rule, from the registry (:mod:`privfl.audit.rules`)."""
