"""What a site's participation looks like, computed once: round size, client sampling, each site's
DP-SGD plan (sample rate, steps, noise multiplier) and the seeds of simulation noise streams.

The in-process federation, the networked Aggregator and every Site read these facts from here, so
a site calibrates its own noise exactly as the simulation of the same run would.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from privfl.config import ClientSampling, FederationConfig, TrainingConfig

__all__ = [
    "SAMPLING_PURPOSE", "SitePlan", "derive_seed", "no_site_affords_a_round", "one_round_refusal", "plan_site", "planned_rounds", "round_size",
    "sample_sites",
]  # fmt: skip

SAMPLING_PURPOSE = 3
"""Stream index of client sampling under ``noise_seed`` (0: DP-SGD, 1: noise shares, 2: central noise)."""


def round_size(config: FederationConfig, num_clients: int) -> int | None:
    """Sites sampled per round: a fixed count, or None under Poisson client sampling (the count varies).

    The run, ``privfl lint`` and the audit all read the round size from here.
    """
    client_dp = config.client_dp
    if client_dp is not None and client_dp.sampling is ClientSampling.POISSON:
        return None
    return max(1, round(config.client_fraction * num_clients))


def planned_rounds(rounds: int, client_fraction: float, quantile: float, num_clients: int | None = None) -> int:
    """Rounds a client is planned to train in: a quantile of Binomial(rounds, p).

    p is the chance a client is sampled in a round: ``client_fraction``, or, for fixed-size
    sampling of ``num_clients``, max(1, round(client_fraction * num_clients)) / num_clients.
    """
    from scipy import stats

    p = client_fraction
    if num_clients is not None:
        p = max(1, round(client_fraction * num_clients)) / num_clients
    if p >= 1.0:
        return rounds
    return max(1, int(stats.binom.ppf(quantile, rounds, p)))


@dataclass(frozen=True, slots=True)
class SitePlan:
    """One site's DP-SGD plan for a run.

    Attributes:
        sample_rate: Poisson sampling rate q of its local batches.
        steps_per_round: local DP-SGD steps per round it trains in.
        noise_multiplier: sigma, set or calibrated to the target epsilon over ``planned_rounds``.
        planned_rounds: rounds the calibration plans for.
    """

    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    planned_rounds: int


@functools.lru_cache(maxsize=1024)
def _calibrated(target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    from privfl.accounting import noise_multiplier

    return noise_multiplier(target_epsilon=target_epsilon, sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant)


def plan_site(num_examples: int, training: TrainingConfig, federation: FederationConfig, num_sites: int) -> SitePlan:
    """The plan of a site holding ``num_examples`` in a federation of ``num_sites``.

    Sites of the same size share one calibration (memoized), so the cost does not grow with the
    number of sites.
    """
    from privfl.training import sampling_plan

    dp = training.dp
    fixed_size = federation.client_dp is None or federation.client_dp.sampling is ClientSampling.FIXED
    rounds = planned_rounds(
        federation.rounds,
        federation.client_fraction,
        dp.planned_participation_quantile,
        num_clients=num_sites if fixed_size else None,
    )
    q, steps = sampling_plan(num_examples, training)
    if dp.noise_multiplier is not None:
        sigma = dp.noise_multiplier
    else:
        # Calibrated once for every step the site may take over the whole run.
        sigma = _calibrated(dp.target_epsilon, q, steps * rounds, dp.delta, getattr(dp.accountant, "value", dp.accountant))
    return SitePlan(sample_rate=q, steps_per_round=steps, noise_multiplier=sigma, planned_rounds=rounds)


def derive_seed(noise_seed: int | None, round_index: int, site_index: int, purpose: int) -> int | None:
    """Seed of a DP noise stream: from ``noise_seed`` in simulations, else None.

    None tells the consumer to draw its whole generator state from the OS's cryptographic source
    (:func:`privfl.training.secret_generator`, :func:`privfl.noise.random_source`): a seed handed
    to torch's CPU generator would keep only 32 bits of it.
    """
    if noise_seed is None:
        return None
    state = np.random.SeedSequence([noise_seed, round_index, site_index, purpose]).generate_state(2)
    return int(state[0]) << 31 ^ int(state[1])


def sample_sites(config: FederationConfig, round_index: int, names: Sequence[str]) -> list[str]:
    """The sites taking part in a round: secret by default, reproducible only under ``noise_seed``.

    Who takes part must be unpredictable: the amplification by client sampling that the
    client-level accountant counts on, and the hiding of a site's participation, hold only
    against someone who cannot recompute the sample. Anyone holding the config could from the
    public ``seed``; so the sample comes from OS entropy (``secrets``), or from ``noise_seed``
    in simulations, and summary.json and the audit then say the guarantee does not hold.
    ``names`` keeps its order (the site index is the position in it).
    """
    fraction = config.client_fraction
    count = round_size(config, len(names))
    poisson = count is None
    if config.noise_seed is None:
        secret = secrets.SystemRandom()
        if count is None:  # poisson
            return [name for name in names if secret.random() < fraction]
        return [names[i] for i in sorted(secret.sample(range(len(names)), count))]
    rng = np.random.default_rng([config.noise_seed, round_index, SAMPLING_PURPOSE])
    if poisson:
        # Poisson client sampling: the amplification the client-level accountant relies on.
        return [name for name, keep in zip(names, rng.random(len(names)) < fraction, strict=True) if keep]
    return [names[i] for i in sorted(rng.choice(len(names), size=count, replace=False))]


def no_site_affords_a_round(training: TrainingConfig, sites: Iterable[tuple[str, float, int]]) -> tuple[float, str] | None:
    """(epsilon, site) of the cheapest first round when no site can train one round within its budget, else None.

    ``sites``: each site's (name, sample rate, steps per round). Only a fixed ``noise_multiplier``
    with a finite ``budget_epsilon`` can be refused so: a calibrated sigma fits the whole run, and
    without a cap nothing is. ``privfl run`` refuses such a run before its ledger is created, and
    ``privfl lint`` reports it (PFL025). Returns at the first site that fits.
    """
    from privfl.accounting import DPEvent, epsilon_of_events

    dp = training.dp
    budget = dp.epsilon_budget
    if not np.isfinite(budget) or dp.noise_multiplier is None:
        return None
    cheapest: tuple[float, str] | None = None
    seen: dict[tuple[float, int], float] = {}
    for name, sample_rate, steps in sites:
        key = (sample_rate, steps)
        if key not in seen:
            event = DPEvent(noise_multiplier=dp.noise_multiplier, sample_rate=sample_rate, steps=steps)
            seen[key] = epsilon_of_events([event], delta=dp.delta, accountant=dp.accountant)
        if seen[key] <= budget:
            return None
        cheapest = min(cheapest or (seen[key], name), (seen[key], name))
    return cheapest


NOISE_DROWNS_RATIO = 3.0
"""PFL026 fires when every site's sigma / (B sqrt(T K)) is at least this (see `noise_drowns_training`)."""

NOISE_DROWNS_FIX = "Raise the epsilon (or lower a fixed noise_multiplier), or give each site more examples."


def noise_drowns_fix(training: TrainingConfig) -> str:
    """What to change when `noise_drowns_training` fires, for the way the config sets the noise."""
    if training.dp.target_epsilon is not None:
        # sigma calibrated to epsilon grows like q sqrt(T): the ratio is about sqrt(2 ln(1/delta)) / (epsilon n sqrt(K)).
        return (
            "Raise target_epsilon, or give each site more examples, or add sites: with the noise calibrated to "
            "an epsilon, the batch size and the number of rounds cancel out of this ratio."
        )
    return "Lower noise_multiplier, or use larger batches, more examples per site or more rounds."


def noise_drowns_training(sites: Iterable[tuple[str, int, float, int, float]], num_sites: int) -> str | None:
    """Why the DP noise drowns every site's training, or None when it does not for some site.

    ``sites``: each site's (name, examples, sample rate, planned DP-SGD steps over the run, noise
    multiplier). Over a site's T planned steps, DP-SGD adds noise of standard deviation
    ``sigma C sqrt(T) / B`` to each coordinate of the sum of its noised mean gradients (B = q n, its
    expected batch; C the clipping norm), while the sum of the clipped mean gradients has a norm of at
    most ``T C``. FedAvg over K sites divides the noise by at most sqrt(K). The ratio
    ``sigma / (B sqrt(T K))`` is therefore at least the noise's standard deviation on each
    coordinate over the most the data can move the model, in the best case (every step's clipped
    gradient at full norm in one direction, every site agreeing). At ``NOISE_DROWNS_RATIO`` or more
    for every site, the data moves the model by at most a third of one noise standard deviation on
    any coordinate: what the model shows is mostly the noise (a utility matter; the privacy claim
    holds). A loose bound: a run it does not flag can still learn poorly.
    """
    best: tuple[float, str, float, float, int] | None = None
    for name, examples, sample_rate, steps, sigma in sites:
        batch = sample_rate * examples
        ratio = sigma / (batch * np.sqrt(max(steps, 1) * max(num_sites, 1)))
        if ratio < NOISE_DROWNS_RATIO:
            return None
        best = min(best or (ratio, name, sigma, batch, steps), (ratio, name, sigma, batch, steps))
    if best is None:
        return None
    ratio, name, sigma, batch, steps = best
    return (
        f"the DP noise drowns every site's training: even for {name}, the least noisy (noise multiplier {sigma:.4g}, "
        f"expected batch {batch:.3g}, {steps} planned steps), the data can move the model averaged over {num_sites} sites "
        f"by at most 1/{ratio:.3g} of one standard deviation of the noise on each coordinate, had every step's clipped "
        f"gradient pointed the same way at full norm (sigma / (batch x sqrt(steps x sites)) = {ratio:.3g} >= "
        f"{NOISE_DROWNS_RATIO:g}): what the model shows is mostly the noise, whatever its accuracy. A matter of utility, "
        "not privacy."
    )


def one_round_refusal(epsilon: float, site: str, training: TrainingConfig, *, advice: bool = True) -> str:
    """Why a run where no site affords a round is refused (`no_site_affords_a_round`), and (``advice``) what to change."""
    text = (
        f"no site can train a single round within it: the cheapest, {site}, would spend epsilon {epsilon:.3f} in one "
        f"round (noise_multiplier {training.dp.noise_multiplier})"
    )
    return text + "; raise the budget or the noise multiplier, or set target_epsilon to calibrate the noise to the budget" if advice else text
