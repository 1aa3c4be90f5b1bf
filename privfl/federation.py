"""The round driver: client sampling, DP-SGD local training, protected aggregation, ledger, checkpoints.

A client is a description (a name and a ``Dataset``), not a live model: the model is built from the
user's ``model_fn`` when a client trains, so thousands of clients fit in memory. Every update
crosses to the server as bytes through a :class:`~privfl.protocols.base.Transport`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from privfl.accounting import (
    ClientBudget,
    DPEvent,
    LedgerKey,
    LedgerStatus,
    PrivacyLedger,
    epsilon_of_events,
    noise_multiplier,
)
from privfl.client_dp import (
    ClientDPPlan,
    ClientLevelRun,
    SecAggRange,
    central_noise,
    clip_with_bit,
    distributed_noise,
    plan_client_dp,
    split_release,
)
from privfl.config import ClientDPConfig, ClientSampling, FederationConfig, ProtectionKind, TrainingConfig
from privfl.errors import ConfigError, LedgerError, PrivacyWarning, ProtocolAbort
from privfl.model_pool import ModelPool
from privfl.plan import (
    derive_seed,
    no_site_affords_a_round,
    noise_drowns_fix,
    noise_drowns_training,
    one_round_refusal,
    plan_site,
    planned_rounds,
    round_size,
    sample_sites,
)
from privfl.protocols.base import (
    ClientUpdate,
    DirectTransport,
    DistributedNoiseProtection,
    NoisePlacement,
    Protection,
    Transport,
)
from privfl.results import RoundRecord, RunSummary, SiteSummary, run_summary
from privfl.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    HISTORY_FILE,
    LEDGER_FILE,
    LEDGER_KEY_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    HistoryWriter,
    RunLock,
    check_ledger_against_history,
    check_ledger_presence,
    check_run_directory,
    durable_write_bytes,
    durable_write_json,
    filesystem_error,
    interrupted_run_hint,
    is_run_directory_error,
    load_checkpoint,
    load_history,
    load_run_identity,
    save_checkpoint,
)
from privfl.training import (
    check_labels,
    evaluate,
    flatten_parameters,
    load_flat_parameters,
    make_private_compatible,
    resolve_device,
    sampling_plan,
    seeded_initial_model,
    train_dp_sgd,
)

__all__ = [
    "Federation",
    "RunResult",
    "build_protection",
    "check_ledger_against_history",
    "interrupted_run_hint",
    "planned_rounds",
    "round_size",
]

log = logging.getLogger("privfl")

def build_protection(config: FederationConfig) -> Protection:
    """The protection protocol named by ``config.protection``."""
    if config.protection is ProtectionKind.PLAINTEXT:
        from privfl.protocols.plaintext import PlaintextProtection

        return PlaintextProtection()
    if config.protection is ProtectionKind.CKKS:
        from privfl.protocols.ckks import CkksProtection

        return CkksProtection(config.ckks)
    if config.protection is ProtectionKind.SHARED_KEY:
        from privfl.protocols.shared_key import SharedKeyProtection

        return SharedKeyProtection(config.shared_key)
    from privfl.protocols.secagg import SecAggProtection

    return SecAggProtection(config.secagg)


def _check_noise_placement(protection: Protection, federation: FederationConfig) -> None:
    """Refuses client-level DP with a protection that cannot place its noise (it would run without it)."""
    placement = protection.noise_placement
    if federation.client_dp is not None and (
        placement is NoisePlacement.NONE
        or (placement is NoisePlacement.DISTRIBUTED and not isinstance(protection, DistributedNoiseProtection))
    ):
        raise ConfigError(
            "federation.client_dp",
            "set",
            f"protection {protection.name!r} cannot place client-level DP noise (its noise_placement is "
            f"{placement.value!r}): declare CENTRAL and apply run_round's release_noise, subclass "
            "DistributedNoiseProtection, or run without client_dp",
        )


def public_config(config: Any) -> Any:
    """A JSON-ready copy of a config dataclass without its secrets.

    Fields declared ``repr=False`` (keys, identities) are left out; bytes become hex; enums their
    values. ``dataclasses.asdict`` would deep-copy key objects into the summary.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: public_config(getattr(config, f.name)) for f in dataclasses.fields(config) if f.repr}
    if isinstance(config, Enum):
        return config.value
    if isinstance(config, bytes):
        return config.hex()
    if isinstance(config, (list, tuple)):
        return [public_config(v) for v in config]
    if isinstance(config, dict):
        return {str(k): public_config(v) for k, v in config.items()}
    if config is None or isinstance(config, (bool, int, float, str)):
        return config
    return repr(config)


def _json_default(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def _atomic_write_json(path: Path, data: Any) -> None:
    durable_write_json(path, data, default=_json_default)


def _finite_or_none(value: float) -> float | None:
    return None if (value is None or not math.isfinite(value)) else float(value)


@dataclass(slots=True)
class RunResult:
    """What :meth:`Federation.run` returns.

    Attributes:
        model: a model holding the final global parameters.
        history: one dict per round (accuracy, loss, epsilon, participants, drops).
        summary: the run summary also written to ``summary.json``.
        ledger: the privacy ledger.
        out_dir: where files were written (None if nowhere).
    """

    model: nn.Module
    history: list[RoundRecord]
    summary: RunSummary
    ledger: PrivacyLedger
    out_dir: Path | None = None


@dataclass(slots=True)
class _ClientPlan:
    name: str
    dataset: Dataset
    num_examples: int
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    index: int = 0
    uploads: list[int] = field(default_factory=list)
    planned_rounds: int = 1


class Federation:
    """Federated training of a user's model with DP-SGD clients and protected aggregation.

    Args:
        model_fn: builds a fresh, untrained model: the initial global model, and a copy for the
            clients' trainings and the evaluation (called again only when a training left more
            than new tensor values on the last copy: Opacus' hooks do). Must return the same
            architecture every time.
        clients: client name -> that client's training ``Dataset`` (yielding (input, label)).
        test_set: held-out data the global model is evaluated on after every round (optional).
        training: local DP-SGD settings, shared by all clients.
        federation: rounds, sampling, protection, seed, device.
        transport: carries messages between clients and server (default: in-process, lossless).
        protection: your own :class:`~privfl.protocols.base.Protection` (default: the one
            ``federation.protection`` names). Client-level DP needs one of privfl's, whose noise
            placement the driver knows.
        progress: show a progress bar.
        record: write what the server observes (every message it receives, sends or relays) to the
            run directory's ``observed/`` folder, so that ``privfl attack --run`` can attack those
            bytes (:mod:`privfl.recording`). Needs ``out_dir``. Under plaintext this stores every
            site's update in the clear, as the server held it.

    Example:
        >>> fed = Federation(model_fn=lambda: MyNet(), clients={"site-a": ds_a, "site-b": ds_b},
        ...                  test_set=ds_test, training=TrainingConfig(), federation=FederationConfig())
        >>> result = fed.run("runs/demo")
    """

    def __init__(
        self,
        *,
        model_fn: Callable[[], nn.Module],
        clients: Mapping[str, Dataset],
        test_set: Dataset | None = None,
        training: TrainingConfig,
        federation: FederationConfig,
        transport: Transport | None = None,
        protection: Protection | None = None,
        progress: bool = True,
        record: bool = False,
    ) -> None:
        if isinstance(model_fn, nn.Module):
            # A model is callable too (its forward): calling it without inputs would fail deep in torch.
            raise ConfigError(
                "model_fn", type(model_fn).__name__, "must build a model, not be one: pass e.g. lambda: MyNet()"
            )
        if not callable(model_fn):
            raise ConfigError("model_fn", model_fn, "must be a callable returning a torch.nn.Module")
        if not isinstance(training, TrainingConfig):
            raise ConfigError("training", type(training).__name__, "must be a privfl.TrainingConfig")
        if not isinstance(federation, FederationConfig):
            raise ConfigError("federation", type(federation).__name__, "must be a privfl.FederationConfig")
        if not isinstance(clients, Mapping):
            raise ConfigError("clients", type(clients).__name__, "must map each client's name to its Dataset, e.g. {'site-a': ds_a}")
        if not clients:
            raise ConfigError("clients", clients, "at least one client is needed")
        for name, dataset in clients.items():
            if not isinstance(name, str) or not name or not name.isprintable():
                # (A newline or other control character would also split a line of the ledger's reports and logs.)
                raise ConfigError("clients", name, "client names must be non-empty strings of printable characters")
            if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
                raise ConfigError(
                    f"clients[{name}]", type(dataset).__name__,
                    "must be a map-style Dataset (with __len__ and __getitem__): DP-SGD samples each example "
                    "with a known probability, which a stream (IterableDataset) cannot give",
                )
            if len(dataset) == 0:
                raise ConfigError(f"clients[{name}]", 0, "a client needs at least one training example")
        self.model_fn = model_fn
        self.clients = dict(clients)
        self.test_set = test_set
        self.training = training
        self.config = federation
        self.transport = transport or DirectTransport()
        if protection is not None:
            if not isinstance(protection, Protection):
                raise ConfigError("protection", type(protection).__name__, "must be a privfl.protocols.base.Protection")
            _check_noise_placement(protection, federation)
        self._protection = protection
        self._config_text: str | None = None  # set by run()
        self.progress = progress
        self.record = bool(record)
        self.device = resolve_device(federation.device)

    # -- set-up -----------------------------------------------------------------------------------
    def _client_level_delta(self) -> float:
        """The client-level delta the recorded epsilon holds at: the configured delta, plus, under
        secure aggregation, the tail in which a noise share could have been clipped (the derived
        range's ``tail_delta``; epsilon itself is computed at the configured delta)."""
        delta = self._client_dp.delta
        if self._secagg_range is not None:
            delta += self._secagg_range.tail_delta
        return delta

    @property
    def _client_dp(self) -> ClientDPConfig:
        """The client-level DP settings (only asked for when they are set)."""
        client_dp = self.config.client_dp
        if client_dp is None:
            raise ConfigError("federation.client_dp", None, "client-level DP is not configured")
        return client_dp

    def _setup_client_dp(self, num_clients: int, history: list[RoundRecord]) -> None:
        client_dp = self.config.client_dp
        # The secure-aggregation range derived for the last round (privfl.client_dp.secagg_range).
        self._secagg_range: SecAggRange | None = None
        # rho of privfl.client_dp.secagg_noise_ratio, computed once per run (secagg only).
        self._noise_ratio: float | None = None
        if client_dp is None:
            return
        self._client_plan: ClientDPPlan = plan_client_dp(
            client_dp, num_clients=num_clients, client_fraction=self.config.client_fraction, rounds=self.config.rounds
        )
        self._client_run = ClientLevelRun(client_dp, self._client_plan)
        # Resumed: every finished round was one release, charged at the noise it really used.
        self._client_run.resume([record.get("client_level") for record in history])

    def _noise_seed(self, round_index: int, client_index: int, purpose: int) -> int | None:
        """Seed of a DP noise stream (:func:`privfl.plan.derive_seed`)."""
        return derive_seed(self.config.noise_seed, round_index, client_index, purpose)

    def _sample(self, round_index: int, plans: list[_ClientPlan]) -> list[_ClientPlan]:
        """The clients taking part in a round (:func:`privfl.plan.sample_sites`).

        The sample is recorded in history.json, so a resumed run never recomputes it.
        """
        by_name = {plan.name: plan for plan in plans}
        return [by_name[name] for name in sample_sites(self.config, round_index, [plan.name for plan in plans])]

    def _initial_model(self) -> nn.Module:
        built: list[nn.Module] = []  # the model as model_fn returned it, to tell whether it was converted

        def first() -> nn.Module:
            built.append(self.model_fn())
            return built[0]

        fixed = seeded_initial_model(self.config.seed, first, warn=True)
        # Every client and evaluation model starts from this model's full state: parameters that are
        # not trained (frozen layers) and buffers are not in the flat vector the rounds exchange.
        initial_state = {name: value.detach().clone() for name, value in fixed.state_dict().items()}
        needs_fix = fixed is not built[0]

        def build() -> nn.Module:
            fresh = self.model_fn()
            if needs_fix:
                with warnings.catch_warnings():
                    # The user was warned once, when the initial model was fixed.
                    warnings.simplefilter("ignore", UserWarning)
                    fresh = make_private_compatible(fresh)
            fresh.load_state_dict(initial_state)
            return fresh

        # As a Site does (privfl.model_pool): a model whose training changed only its tensors' values
        # is reset in place for the next one; otherwise model_fn builds another.
        self._models = ModelPool(build(), build=build)
        return fixed

    def _plans(self) -> list[_ClientPlan]:
        plans = []
        for index, (name, dataset) in enumerate(self.clients.items()):
            n = len(dataset)  # type: ignore[arg-type]  # map-style Datasets have __len__
            plan = plan_site(n, self.training, self.config, len(self.clients))
            plans.append(_ClientPlan(
                name, dataset, n, plan.sample_rate, plan.steps_per_round, plan.noise_multiplier, index, planned_rounds=plan.planned_rounds,
            ))
        return plans

    # -- the run -----------------------------------------------------------------------------------
    def run(
        self, out_dir: str | os.PathLike[str] | None = None, *, resume: bool = False, config_text: str | None = None
    ) -> RunResult:
        """Runs every round (or the remaining ones, with ``resume``).

        Args:
            out_dir: run directory for the ledger, history, checkpoints and summary (None: keep in memory).
            resume: continue the run in ``out_dir`` from its last checkpoint, with its ledger.
            config_text: the run config as TOML, if the run has one (``privfl run``): kept in the run
                directory as ``config.toml``, which ``privfl run --resume`` without a config reads back.

        Returns:
            The final model, history, summary and ledger.

        Raises:
            ConfigError: ``out_dir`` already holds a run and ``resume`` is False (a fresh start there
                would reset spent budgets), ``resume`` without a run to resume or with other
                settings, or a corrupt history.json, run.json or checkpoint.
            LedgerError: ``out_dir`` holds traces of a run but no ledger, or a ledger that is
                corrupt, edited, or disagrees with history.json (the run refuses to resume).
            RunLockedError: another run holds ``out_dir`` (the lock is held until this run returns).

        The checks that need only the directory (a ledger where a fresh run starts, nothing to
        resume, traces without a ledger, the lock) come before noise calibration; those that compare
        it with this run's settings, history and checkpoint come after; a refusal of either kind adds
        nothing to the ledger, the history or the checkpoints. An ``OSError`` writing the run directory (disk full,
        read-only file system) is a ConfigError naming it.
        """
        out = Path(out_dir) if out_dir is not None else None
        self._config_text = config_text
        if out is None:
            if self.record:
                raise ConfigError("record", True, "a recording of the server's view needs a run directory (out_dir)")
            return self._run(None, resume)
        # Refuse for the directory before calibrating noise or building models (seconds to minutes
        # of work); under the lock, _restore repeats these checks as it opens the ledger.
        check_run_directory(out, resume=resume)
        # One run per directory: two would charge budgets from the same starting point.
        with RunLock(out):
            try:
                return self._run(out, resume)
            except OSError as exc:
                if not is_run_directory_error(exc, out):
                    raise  # e.g. the user's Dataset failing to read its own files
                raise filesystem_error(exc, "out_dir", out, "write to the run directory", then=interrupted_run_hint(out)) from exc

    def _run(self, out: Path | None, resume: bool) -> RunResult:
        started = time.perf_counter()
        model = self._initial_model()
        global_params = flatten_parameters(model)
        plans = self._plans()
        protection = self._protection if self._protection is not None else build_protection(self.config)
        dp = self.training.dp

        self._check_protection(protection, len(plans))
        # Before anything is charged: a site whose labels the model has no output for would fail only
        # when first sampled, possibly many rounds (and other sites' charges) in.
        check_labels(model, {plan.name: plan.dataset for plan in plans})
        self._warn_void_settings(plans)
        if self.test_set is not None and len(self.test_set):  # type: ignore[arg-type]  # map-style Datasets have __len__
            check_labels(model, {"test_set": self.test_set})
        if not resume:
            self._check_one_round_fits(plans)
        if out is not None and resume:
            from privfl.export import check_recorded_architecture

            # Before the ledger is marked as resumed: rounds of another architecture would leave a final
            # model that loads with neither model_fn.
            check_recorded_architecture(out, model)
        ledger, history, start_round, global_params = self._restore(out, resume, global_params, self._fingerprint(plans))
        try:
            if resume:
                self._replan_remaining(plans, ledger, start_round)
            if out is not None:
                from privfl.export import record_architecture

                # A checkpoint is a flat vector that loads into any model of its size; export and
                # load_model check the architecture against this record (model.json).
                record_architecture(out, model)
            return self._run_rounds(
                out, ledger=ledger, history=history, start_round=start_round, plans=plans, protection=protection,
                model=model, global_params=global_params, started=started,
            )
        finally:
            ledger.close()

    def _run_rounds(
        self,
        out: Path | None,
        *,
        ledger: PrivacyLedger,
        history: list[RoundRecord],
        start_round: int,
        plans: list[_ClientPlan],
        protection: Protection,
        model: nn.Module,
        global_params: np.ndarray,
        started: float,
    ) -> RunResult:
        dp = self.training.dp
        self._plans_by_name = {plan.name: plan for plan in plans}
        recorder = None
        if self.record and out is not None:
            from privfl.recording import OBSERVED_DIR, ServerViewRecorder

            recorder = ServerViewRecorder(out / OBSERVED_DIR, inner=self.transport)
        self._setup_client_dp(len(plans), history)
        history_file = None if out is None else HistoryWriter(out / HISTORY_FILE, default=_json_default)
        for plan in plans:
            ledger.register(plan.name, ClientBudget(epsilon=dp.epsilon_budget, delta=dp.delta))

        log.info(
            "federation: %d clients, %d rounds, protection=%s, device=%s",
            len(plans), self.config.rounds, protection.name, self.device,
        )
        progress = _Progress(self.config.rounds, enabled=self.progress, start=start_round)
        with progress:
            for round_index in range(start_round, self.config.rounds):
                if recorder is not None:
                    recorder.begin_round(round_index, global_params)
                record, global_params = self._round(
                    round_index, plans, protection=protection, ledger=ledger, global_params=global_params,
                    transport=recorder or self.transport,
                )
                history.append(record)
                if out is not None:
                    assert history_file is not None  # made with out
                    # History first: a checkpoint never exists for a round whose record is missing.
                    history_file.write(history)
                    save_checkpoint(out, round_index, global_params)
                progress.advance(record)
                log.info("%s", _round_log_line(record))

        load_flat_parameters(model, global_params)
        summary = self._summary(
            plans, ledger, history, protection=protection, num_parameters=len(global_params),
            seconds=time.perf_counter() - started,
        )
        if out is not None:
            _atomic_write_json(out / SUMMARY_FILE, summary)
        return RunResult(model=model, history=history, summary=summary, ledger=ledger, out_dir=out)

    def _round(
        self,
        round_index: int,
        plans: list[_ClientPlan],
        *,
        protection: Protection,
        ledger: PrivacyLedger,
        global_params: np.ndarray,
        transport: Transport,
    ) -> tuple[RoundRecord, np.ndarray]:
        t0 = time.perf_counter()
        client_dp = self.config.client_dp
        sampled = self._sample(round_index, plans)
        updates: dict[str, ClientUpdate] = {}
        skipped: dict[str, str] = {}
        losses = []
        trainable: list[_ClientPlan] = []
        for plan in sampled:
            event = DPEvent(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps_per_round)
            reason = ledger.refusal(plan.name, event)
            if reason is not None:
                # The client never touches its data this round; the round goes on without it.
                ledger.record_skip(round_index, plan.name, reason=reason)
                skipped[plan.name] = reason
                continue
            trainable.append(plan)
        needed = protection.min_participants
        doomed = None
        if len(trainable) < needed:
            # Decided before anyone trains: a round certain to abort must not spend anyone's budget.
            doomed = (
                f"round skipped before training: {len(trainable)} of {len(sampled)} sampled sites can train, "
                f"{protection.name} needs at least {needed}; nobody was charged"
            )
            log.warning("round %d: %s", round_index, doomed)
            trainable = []
        for plan in trainable:
            local_model = self._models.take()
            load_flat_parameters(local_model, global_params)
            seed = self._noise_seed(round_index, plan.index, 0)
            result = train_dp_sgd(
                local_model,
                plan.dataset,
                config=self.training,
                noise_multiplier=plan.noise_multiplier,
                device=self.device,
                seed=seed,
                site=plan.name,
            )
            self._models.give_back(local_model)  # the update is a copy
            # Charged before the update leaves the client; with a run directory the charge is one
            # fsynced journal line by the time charge() returns, so a crash can never un-spend it.
            ledger.charge(round_index, plan.name, result.event)
            updates[plan.name] = ClientUpdate(delta=result.delta, weight=float(result.num_examples))
            losses.append(result.mean_loss)
        if client_dp is not None:
            updates, _ = self._clip_and_noise(round_index, updates, protection)

        dropped: dict[str, str] = {}
        contributors: tuple[str, ...] = ()
        aborted = doomed
        upload: dict[str, int] = {}
        unclipped: float | None = None
        if updates:
            extra = {}
            if client_dp is not None and protection.noise_placement is NoisePlacement.CENTRAL:
                extra["release_noise"] = central_noise(
                    self._client_plan, clip_norm=self._client_run.clip_norm, dim=len(global_params),
                    adaptive=client_dp.adaptive, noise_seed=self.config.noise_seed, round_index=round_index,
                )
            try:
                outcome = protection.run_round(round_index, updates, transport, **extra)
            except ProtocolAbort as exc:
                aborted = str(exc)
                dropped = {c: "round aborted" for c in updates}
                log.warning("round %d aborted: %s", round_index, exc)
            else:
                dropped = dict(outcome.dropped)
                contributors = outcome.contributors
                upload = dict(outcome.upload_bytes)
                average = outcome.average
                if client_dp is not None:
                    # DP-FedAvg: over the fixed denominator; the sum arrives already noised.
                    total = outcome.average * outcome.total_weight
                    average, unclipped = split_release(total, dim=len(global_params), plan=self._client_plan, adaptive=client_dp.adaptive)
                global_params = (global_params + self.config.server_learning_rate * average).astype(np.float32)
        client_level = None
        if client_dp is not None:
            # Charged every round, released or not (conservative: a round with no participant
            # or an aborted protocol still counts).
            client_level = self._client_run.close_round(unclipped if contributors else None, delta=self._client_level_delta())
        for client, reason in dropped.items():
            ledger.annotate_last(client, f"update not aggregated in round {round_index}: {reason}")
            log.warning("round %d: client %s dropped: %s", round_index, client, reason)
        for plan in sampled:
            if plan.name in upload:
                plan.uploads.append(upload[plan.name])

        test_loss, test_accuracy = (math.nan, math.nan)
        if self.test_set is not None:
            eval_model = self._models.take()
            load_flat_parameters(eval_model, global_params)
            test_loss, test_accuracy = evaluate(eval_model, self.test_set, device=self.device)
            self._models.give_back(eval_model)
        epsilons = {plan.name: ledger.epsilon(plan.name) for plan in plans}
        return {
            "round": round_index,
            "sampled": [p.name for p in sampled],
            "trained": list(updates),
            "contributors": list(contributors),
            "skipped": skipped,
            "dropped": dropped,
            "aborted": aborted,
            "train_loss": _finite_or_none(float(np.mean(losses)) if losses else math.nan),
            "test_loss": _finite_or_none(test_loss),
            "test_accuracy": _finite_or_none(test_accuracy),
            "epsilon": {name: _finite_or_none(value) for name, value in epsilons.items()},
            "max_epsilon": _finite_or_none(max(epsilons.values())),
            "client_level": client_level,
            "upload_bytes": upload,
            "seconds": time.perf_counter() - t0,
            # Where the ledger stood when the round was recorded (resume and the audit check it).
            "ledger": {"lines": ledger.lines, "head": ledger.head} if ledger.head is not None else None,
        }, global_params

    # -- client-level DP (DP-FedAvg) ------------------------------------------------------------------
    def _clip_and_noise(
        self, round_index: int, updates: dict[str, ClientUpdate], protection: Protection
    ) -> tuple[dict[str, ClientUpdate], int]:
        """Client side of DP-FedAvg: clip each update to S, append the unclipped bit, add noise shares for secagg."""
        from privfl.noise import random_source

        plan = self._client_plan
        clip_norm = self._client_run.clip_norm
        adaptive = self._client_dp.adaptive
        distributed = protection if isinstance(protection, DistributedNoiseProtection) else None
        shares = 1.0  # how many noise shares make the charged noise (c / rho under secagg)
        min_grid = None
        if distributed is not None:
            # Secure aggregation clips each coordinate to clip_range, which would cut the noise shares:
            # the range and step are derived from the noise, S (re-derived every round, since adaptive
            # clipping moves it) and the client count, and a round that would clip anyway is aborted
            # before anything is sent (fail closed; privfl.client_dp.secagg_range states the tail bound).
            from privfl.client_dp import secagg_noise_ratio, secagg_round

            if self._noise_ratio is None:
                # rho, fixed for the run: the released noise rho (z_delta S)^2 then does not depend on
                # how many sites took part (privfl.client_dp, "Adjacency").
                self._noise_ratio = secagg_noise_ratio(distributed.share_threshold, len(self.clients))
            dim = next(iter(updates.values())).delta.shape[0] if updates else 1
            noise_round = secagg_round(
                plan, noise_ratio=self._noise_ratio, participants=len(updates), clip_norm=clip_norm, dim=dim,
                adaptive=adaptive, num_sites=len(self.clients), rounds=self.config.rounds, delta=self._client_dp.delta,
                bits=distributed.word_bits,
            )
            shares = noise_round.shares
            distributed.use_noise_range(noise_round.range.clip_range, noise_round.range.fraction_bits)
            self._secagg_range = noise_round.range
            # Every noise grid is a multiple of the quantizer's power-of-two step: it maps each share
            # to its integer exactly (docs/client-dp.md).
            min_grid = noise_round.min_grid
        out: dict[str, ClientUpdate] = {}
        unclipped = 0
        for name, update in updates.items():
            vector, within = clip_with_bit(update.delta, clip_norm, adaptive=adaptive)
            unclipped += int(within)
            if distributed is not None:
                # Discrete Gaussian share on a grid the quantizer's step divides (privfl.noise): no
                # float bit of what is summed depends on the update (Mironov 2012).
                seed = None if self.config.noise_seed is None else self._noise_seed(round_index, self._plans_by_name[name].index, 1)
                vector = distributed_noise(
                    vector, plan=plan, clip_norm=clip_norm, adaptive=adaptive, threshold=shares,
                    source=random_source(seed), min_grid=min_grid,
                )
            # Uniform weights: with client-level DP every site counts once, whatever its size.
            out[name] = ClientUpdate(delta=vector, weight=1.0)
        return out, unclipped

    # -- persistence -------------------------------------------------------------------------------
    def _check_protection(self, protection: Protection, num_clients: int) -> None:
        """Surfaces protocol settings that cannot fit this federation before anyone trains."""
        needed = protection.min_participants
        size = round_size(self.config, num_clients)
        largest = num_clients if size is None else size
        if largest < needed:
            raise ConfigError(
                "federation.client_fraction",
                self.config.client_fraction,
                f"rounds sample at most {largest} of {num_clients} sites but {protection.name} needs at least {needed} "
                "per round: every round would abort; sample more sites (or use more sites)",
            )
        _check_noise_placement(protection, self.config)
        protection.check_fits(num_clients)

    _REPLAN_MAX_NOISE_RATIO = 2.0
    """A resume recalibrates a site's noise only up to this multiple of its plan from zero (see below)."""

    def _replan_remaining(self, plans: list[_ClientPlan], ledger: PrivacyLedger, start_round: int) -> None:
        """On a resume with another ``federation.rounds``, spends what each site has left over the rounds left.

        A site's plan calibrates sigma for the whole run from zero. A resume with the rounds of the
        start plans exactly that sigma again (the resumed run matches an uninterrupted one). A resume
        with other rounds would plan the new count from zero while the first rounds were charged at
        the old plan: the budget would run out before the last round (more rounds) or be left unspent
        (fewer). So where the ledger shows trainings at another sigma than the plan's, the sigma is
        calibrated for the site's remaining planned rounds composed with what it already spent. A site
        whose budget left would need more than ``_REPLAN_MAX_NOISE_RATIO`` times the plan's noise (a
        finished run extended: almost nothing left) keeps its plan and trains only while its ledger
        allows: rounds of almost pure noise would spoil the model, not improve it.
        """
        dp = self.training.dp
        if dp.target_epsilon is None or start_round >= self.config.rounds:
            return
        fixed_size = self.config.client_dp is None or self.config.client_dp.sampling is ClientSampling.FIXED
        remaining = planned_rounds(
            self.config.rounds - start_round, self.config.client_fraction, dp.planned_participation_quantile,
            num_clients=len(plans) if fixed_size else None,
        )
        solved: dict[tuple[float, int, tuple[DPEvent, ...]], float] = {}  # sites of one size spent alike: one search
        for plan in plans:
            spent = tuple(ledger.events(plan.name))
            if not spent or all(e.noise_multiplier == plan.noise_multiplier for e in spent):
                continue
            key = (plan.sample_rate, plan.steps_per_round, spent)
            if key not in solved:
                try:
                    solved[key] = noise_multiplier(
                        target_epsilon=dp.target_epsilon, sample_rate=plan.sample_rate, steps=plan.steps_per_round * remaining,
                        delta=dp.delta, accountant=dp.accountant, spent=spent,
                    )
                except ConfigError:
                    solved[key] = math.inf  # no budget left for another step
            sigma = solved[key]
            if sigma > self._REPLAN_MAX_NOISE_RATIO * plan.noise_multiplier:
                # So little budget left that the rounds would mostly add noise to the model: the site
                # keeps the plan and trains only while its ledger allows (a finished run trains no more).
                log.info("resume: %s has too little budget left to recalibrate; it keeps its plan", plan.name)
                continue
            log.info(
                "resume: %s's sigma for the %d rounds left, with what it spent: %.4f (the plan from zero: %.4f)",
                plan.name, remaining, sigma, plan.noise_multiplier,
            )
            plan.noise_multiplier = sigma

    def _warn_void_settings(self, plans: list[_ClientPlan]) -> None:
        """A PrivacyWarning for each lint error the settings and client sizes raise (`run_start_findings`)."""
        from privfl.audit.lint import run_start_findings

        for f in run_start_findings(self.training, self.config, {plan.name: plan.num_examples for plan in plans}):
            warnings.warn(f"{f.code} {f.field}: {f.message} Fix: {f.fix} (privfl lint lists every check)", PrivacyWarning, stacklevel=4)
        drowned = noise_drowns_training(
            ((p.name, p.num_examples, p.sample_rate, p.steps_per_round * p.planned_rounds, p.noise_multiplier) for p in plans), len(plans)
        )
        if drowned is not None:
            # Not a privacy matter (the claim holds), so a plain UserWarning: the run would spend its budget for nothing.
            warnings.warn(f"PFL026: {drowned} Fix: {noise_drowns_fix(self.training)}", UserWarning, stacklevel=4)

    def _check_one_round_fits(self, plans: list[_ClientPlan]) -> None:
        """Refuses a fresh run in which no site can afford a single round (it would train nothing).

        Only a fixed ``noise_multiplier`` with a ``budget_epsilon`` can do that: a calibrated sigma
        fits the whole run. Checked before the ledger is created (only the lock file is written).
        """
        cheapest = no_site_affords_a_round(self.training, ((p.name, p.sample_rate, p.steps_per_round) for p in plans))
        if cheapest is not None:
            raise ConfigError("training.dp.budget_epsilon", self.training.dp.epsilon_budget, one_round_refusal(*cheapest, self.training))

    def _fingerprint(self, plans: list[_ClientPlan]) -> dict[str, Any]:
        """What identifies a run: its settings (but the number of rounds) and each client's data.

        A resumed run must be the same run: with other settings, a different seed or other data
        behind the same client names, the ledger's per-record epsilon would no longer describe
        the records actually used. A client's data is identified by its number of examples and,
        for a ``Subset``, the indices it takes; the examples themselves are not read, so records
        replaced by as many others go unnoticed (docs/getting-started.md says so).
        """
        federation = public_config(self.config)
        federation.pop("rounds", None)
        clients = {}
        for plan in plans:
            digest = hashlib.sha256(str(len(plan.dataset)).encode())  # type: ignore[arg-type]
            indices = getattr(plan.dataset, "indices", None)
            if indices is not None:
                digest.update(np.asarray(indices, dtype=np.int64).tobytes())
            clients[plan.name] = digest.hexdigest()
        return {"training": public_config(self.training), "federation": federation, "clients": clients}

    def _restore(
        self, out: Path | None, resume: bool, params: np.ndarray, fingerprint: dict[str, Any]
    ) -> tuple[PrivacyLedger, list[RoundRecord], int, np.ndarray]:
        """The ledger, the history, the first round to run and the parameters it starts from.

        The caller holds the run lock. Everything a resume needs (the checkpoint included) is checked
        before the ledger is marked as resumed: a refused resume leaves the directory as it was.

        Raises:
            LedgerError: the directory holds traces of a run but no ledger (a fresh start would
                forget what was spent), or its ledger is corrupt, edited, or disagrees with history.
            ConfigError: a fresh run where a ledger exists, a resume with nothing to resume or
                with other settings, or a corrupt history, run.json or checkpoint.
        """
        accountant = self.training.dp.accountant
        if out is None:
            if resume:
                raise ConfigError("resume", True, "needs a run directory")
            return PrivacyLedger(accountant=accountant), [], 0, params
        ledger_path = out / LEDGER_FILE
        identity = json.loads(json.dumps(fingerprint, default=_json_default))
        # Checked again here, under the run lock: another process may have changed the directory.
        if not check_ledger_presence(out, resume):
            out.mkdir(parents=True, exist_ok=True)
            key = LedgerKey.generate()
            key.write(out / LEDGER_KEY_FILE)
            # The ledger is created before anything else that marks the directory as a run, so an
            # interrupted start leaves either nothing to protect or a ledger to resume from.
            ledger = PrivacyLedger.create(ledger_path, accountant=accountant, key=key, run_identity=identity)
            _atomic_write_json(out / RUN_FILE, fingerprint)
            self._keep_config(out)
            return ledger, [], 0, params
        ledger = PrivacyLedger.open(ledger_path, key=LedgerKey.read(out / LEDGER_KEY_FILE))
        try:
            # The header's copy of the run identity is authenticated; run.json is for people.
            recorded = ledger.run_identity if ledger.run_identity is not None else load_run_identity(out / RUN_FILE)
            if recorded != identity:
                changed = sorted(k for k in identity if recorded.get(k) != identity[k])
                raise ConfigError(
                    "resume", str(out), f"the run there was made with other settings or data ({', '.join(changed)} differ); "
                    "resume it with the same config, or start a new run directory"
                )
            if ledger.accountant is not accountant:
                raise ConfigError("dp.accountant", accountant.value, f"the run used {ledger.accountant.value}")
            if not (out / RUN_FILE).exists():
                # Interrupted between the ledger and run.json: the ledger's header has the identity.
                _atomic_write_json(out / RUN_FILE, fingerprint)
            history = load_history(out / HISTORY_FILE)
            pattern = re.compile(r"round-(\d{4,})\.pt")
            found = [pattern.fullmatch(p.name) for p in (out / CHECKPOINT_DIR).glob("round-*.pt")] if (out / CHECKPOINT_DIR).exists() else []
            done = max((int(m.group(1)) for m in found if m), default=-1) + 1
            # A record without its checkpoint is a round interrupted between the two writes: redone.
            recorded_rounds = len(history)
            history = history[:done]
            if len(history) != done:
                raise ConfigError("out_dir", str(out), f"history.json holds {len(history)} of the {done} checkpointed rounds")
            check_ledger_against_history(ledger, history, ledger_path)
            if done >= self.config.rounds and (out / SUMMARY_FILE).exists():
                # Nothing to run: a resume would only mark the ledger (moving its head, which an exported
                # model records) and rewrite the summary. (Without a summary, the run stopped after its
                # last round and before writing it: the resume writes it.)
                raise ConfigError(
                    "resume", str(out), f"the run there has finished: {done} rounds recorded, and federation.rounds is "
                    f"{self.config.rounds}; a config of more rounds resumes it, but its sites train only while their "
                    "budgets last (privfl audit shows what is left)"
                )
            if done > 0:
                params = load_checkpoint(out, done - 1, len(params))
            # Entries already written for round `done` or later belong to an interrupted attempt:
            # they stay charged, and the marker keeps them apart from the rerun's entries.
            interrupted = {e.client: e for e in ledger.entries if e.round >= done}
            if recorded_rounds > done:
                # The interrupted round's record goes before the marker that sets its entries apart: the
                # directory's history and ledger then agree wherever a kill lands (audit, a later resume).
                HistoryWriter(out / HISTORY_FILE, default=_json_default).write(history)
            self._keep_config(out)  # a resume may change federation.rounds (the one setting it may change)
            ledger.mark_resume(done)
            for client, entry in interrupted.items():
                if entry.status is LedgerStatus.TRAINED:
                    # Whoever reads the ledger sees why this client is charged twice for a round.
                    ledger.annotate_last(
                        client, f"interrupted attempt at round {entry.round}: charged (its update may have left "
                        f"the site) and not recorded; the run resumed at round {done}"
                    )
        except BaseException:
            ledger.close()
            raise
        log.info("resuming %s after round %d", out, done - 1)
        return ledger, history, done, params

    def _keep_config(self, out: Path) -> None:
        if self._config_text is not None:
            durable_write_bytes(out / CONFIG_FILE, self._config_text.encode())

    def _summary(
        self,
        plans: list[_ClientPlan],
        ledger: PrivacyLedger,
        history: list[RoundRecord],
        *,
        protection: Protection,
        num_parameters: int,
        seconds: float,
    ) -> RunSummary:
        uploads = [u for plan in plans for u in plan.uploads]
        interrupted = ledger.interrupted_trainings()
        clients: dict[str, SiteSummary] = {}
        for plan in plans:
            clients[plan.name] = {
                "epsilon": _finite_or_none(ledger.epsilon(plan.name)),
                "delta": ledger.budget(plan.name).delta,
                "epsilon_budget": _finite_or_none(ledger.budget(plan.name).epsilon),
                "rounds_trained": ledger.rounds(plan.name, LedgerStatus.TRAINED),
                "rounds_skipped": ledger.rounds(plan.name, LedgerStatus.SKIPPED_BUDGET),
                # charged trainings of interrupted attempts at a round, counted in rounds_trained too
                "rounds_interrupted": interrupted.get(plan.name, 0),
                "rounds_dropped": sum(1 for h in history if plan.name in h["dropped"]),
                "num_examples": plan.num_examples,
                # What the site's trainings really used (the ledger), not a plan recalibrated on
                # resume for rounds it may never train in.
                "noise_multiplier": used[-1] if (used := [e.noise_multiplier for e in ledger.events(plan.name)]) else None,
                "noise_multipliers_used": sorted(set(used)),
                "planned_noise_multiplier": plan.noise_multiplier,
                "sample_rate": plan.sample_rate,
                "steps_per_round": plan.steps_per_round,
            }
        client_level: dict[str, Any] | None = None
        if self.config.client_dp is not None:
            client_level = self._client_run.summary(
                delta=self._client_level_delta(),
                noise="distributed (each client adds its share before masking)"
                if protection.noise_placement is NoisePlacement.DISTRIBUTED
                else "central (added once to the aggregate before release)",
                clip_norms=[level["clip_norm"] for h in history if (level := h.get("client_level"))],
            )
        summary = run_summary(
            history, protection=protection.name, accountant=ledger.accountant.value, clients=clients,
            client_level=client_level, num_parameters=num_parameters, uploads=uploads, device=str(self.device),
            seconds=seconds, client_sampling_secret=self.config.noise_seed is None,
            training=public_config(self.training), federation=public_config(self.config),
        )
        summary["noise"] = (
            "reproducible from federation.noise_seed (simulation only)"
            if self.config.noise_seed is not None
            else "fresh OS entropy (not reproducible, not predictable from the config)"
        )
        summary["client_sampling"] = (
            "reproducible from federation.noise_seed (simulation only): anyone holding the config "
            "can recompute who took part, so amplification by client sampling does not hold against them"
            if self.config.noise_seed is not None
            else "secret (OS entropy; who takes part cannot be recomputed from the config)"
        )
        summary["ledger"] = (
            None
            if ledger.head is None
            else {"file": LEDGER_FILE, "lines": ledger.lines, "head": ledger.head, "authenticated": ledger.authenticated}
        )
        return summary


def _round_log_line(record: RoundRecord) -> str:
    """One line per round for ``privfl -v``: what happened, who trained, who was skipped or dropped."""
    accuracy = record.get("test_accuracy")
    parts = [
        f"round {record['round']}:",
        f"{len(record['trained'])} of {len(record['sampled'])} sampled sites trained,",
        f"{len(record['contributors'])} aggregated,",
        f"test accuracy {accuracy:.4f}," if accuracy is not None else "no test set,",
        f"max epsilon {record['max_epsilon']:.3f}" if record.get("max_epsilon") is not None else "max epsilon inf",
    ]
    if record.get("aborted"):
        parts.append(f"; aborted: {record['aborted']}")
    if record.get("skipped"):
        parts.append(f"; skipped (budget): {', '.join(record['skipped'])}")
    if record.get("dropped") and not record.get("aborted"):
        parts.append(f"; dropped: {', '.join(f'{c} ({why})' for c, why in record['dropped'].items())}")
    return " ".join(parts)


class _Progress:
    """A rich progress bar over rounds (silent when disabled)."""

    def __init__(self, total: int, *, enabled: bool, start: int) -> None:
        self.enabled = enabled
        self.total = total
        self.start = start
        self._progress: Any = None  # a rich Progress while shown
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]rounds"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("rounds", total=self.total, completed=self.start, status="training...")
        return self

    def advance(self, record: Mapping[str, Any]) -> None:
        if self._progress is None:
            return
        acc = record["test_accuracy"]
        status = f"acc {acc:.3f}" if acc is not None else "acc -"
        status += f"  max eps {record['max_epsilon']:.2f}"
        if record["dropped"]:
            status += f"  dropped {len(record['dropped'])}"
        if record["skipped"]:
            status += f"  skipped {len(record['skipped'])}"
        self._progress.update(self._task, advance=1, status=status)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
