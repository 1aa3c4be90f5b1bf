"""A Site: one hospital or bank, holding its data, its model copy, its DP-SGD training, its own privacy
ledger and its protocol keys, answering the Aggregator's requests as bytes.

Threat model: the aggregator may be curious or actively malicious. A site therefore decides for
itself whether to train (its ledger, in its own state directory, is the budget that counts; a server
asking again does not change the answer), checks every request (run, round, step, addressee) before
acting on it, never trains twice in one round of a run, and answers anything malformed with a
refusal instead of an exception. Everything the site must remember between two requests (its
ledger, its identity key, the round's secure-aggregation secrets, the CKKS key holder's secret key)
lives in its state directory, so each request may be served by a fresh process (as Flower does) and
a restarted site keeps its spent epsilon.

State directory layout::

    site.json           the site's name (a state directory belongs to one site)
    ledger.jsonl/.key   the privacy ledger (privfl.accounting), authenticated and append-only
    identity.key        Ed25519 identity (signs CKKS contributions, and the key holder's public context;
                        SecAgg authenticated mode), 0600; `privfl identity` prints its public half
    run.json            the run being served: its id and config (what it trained is in the ledger)
    round.bin           secure aggregation: this round's private protocol state, 0600, deleted after
    ckks-public.bin     CKKS: the public context, the key holder's run id and the run it was signed for
    ckks-key-holder.bin CKKS key holder only: its secret context, 0600
    ckks-runs.json      CKKS key holder only: the runs it made keys for (once each)
    shared-key.bin      shared-key mode: the secret key every site holds, provisioned out of band, 0600
    shared-key-runs.json shared-key mode: per run, the rounds this site decrypted and the identity keys it pinned
    client-dp.json      CKKS key holder under client-level DP: per run, the site count and each release's clip norm
    secagg-peers.json   authenticated secure aggregation without ``peer_keys``: the other sites' identity keys, pinned on first sight for every later run
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any, overload

import numpy as np

from privfl.config import ProtectionKind, RunConfig, config_from_dict
from privfl.envelope import Reply, Request, Status, Step, decode_request, encode_reply
from privfl.errors import BudgetExceededError, ConfigError, LedgerError, MessageError, PrivflError, ProtocolAbort
from privfl.rundir import (
    LEDGER_FILE,
    LEDGER_KEY_FILE,
    SITE_FILE,
    RunLock,
    durable_write_bytes,
    durable_write_json,
    fsync_directory,
)

__all__ = [
    "Site",
    "SiteRole",
    "check_deployed_client_dp",
    "check_weight_bounds",
    "client_level_plan",
    "load_site_dataset",
    "provision_shared_key",
    "quantizer_for",
    "secagg_weight_bound",
    "site_identity",
]

log = logging.getLogger("privfl")

RUN_FILE = "run.json"
IDENTITY_FILE = "identity.key"
ROUND_FILE = "round.bin"
CKKS_PUBLIC_FILE = "ckks-public.bin"
CKKS_KEY_HOLDER_FILE = "ckks-key-holder.bin"
CKKS_RUNS_FILE = "ckks-runs.json"
SHARED_KEY_FILE = "shared-key.bin"
SHARED_KEY_RUNS_FILE = "shared-key-runs.json"
CLIENT_DP_FILE = "client-dp.json"
SECAGG_PEERS_FILE = "secagg-peers.json"
_ROUND_STATE = struct.Struct(">I")


class SiteRole(str, Enum):
    """What a site does besides training."""

    SITE = "site"
    KEY_HOLDER = "key-holder"
    """Holds the CKKS secret key and decrypts only the round's verified sum (it must not collude with the server)."""


def load_site_dataset(source: str, *, label_column: str = "label"):
    """A site's training data from its node configuration.

    Args:
        source: a CSV file (header row; numeric columns), a Parquet file (needs pandas and pyarrow),
            or ``module:function`` naming a function that returns a torch ``Dataset``.
        label_column: the column holding the class label (CSV and Parquet).

    Raises:
        ConfigError: the file or function is missing, the label column is absent, or a value is not numeric.
    """
    from privfl.data import ArrayDataset

    if ":" in source and not Path(source).exists() and not source.lower().endswith((".csv", ".parquet")):
        import importlib

        module_name, _, attr = source.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError("data", source, f"cannot import {source}: {exc}") from exc
        dataset = function()
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ConfigError("data", source, "must return a torch Dataset")
        return dataset
    path = Path(source)
    if not path.is_file():
        raise ConfigError("data", source, "no such file (a CSV or Parquet file, or module:function)")
    if path.suffix.lower() == ".parquet":
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("reading Parquet needs pandas and pyarrow: pip install pandas pyarrow") from exc
        frame = pd.read_parquet(path)
        columns = list(frame.columns)
        non_numeric = [str(c) for c in columns if not (pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c]))]
        if non_numeric:
            raise ConfigError("data", source, f"columns {non_numeric} hold values that are not numbers: encode them as numbers or drop them")
        table = frame.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        import csv

        with path.open(newline="") as handle:
            reader = csv.reader(handle)
            try:
                columns = next(reader)
            except StopIteration:
                raise ConfigError("data", source, "the CSV file is empty") from None
            rows = []
            for number, row in enumerate(reader, start=2):
                if len(row) != len(columns):
                    raise ConfigError("data", f"{source}:{number}", f"has {len(row)} fields, the header {len(columns)}")
                values = []
                for column, text in zip(columns, row, strict=True):
                    if not text.strip():
                        raise ConfigError("data", f"{source}:{number}", f"column {column!r} is empty (a missing value): fill or drop the row")
                    try:
                        values.append(float(text))
                    except ValueError:
                        # The value itself is not quoted: a text column is where names and record numbers
                        # live, and this message can travel (a SuperNode reports a ClientApp's error to the server).
                        raise ConfigError(
                            "data", f"{source}:{number}",
                            f"column {column!r} holds a value that is not a number: encode it as numbers (labels as 0, 1, ...) "
                            "or drop the column",
                        ) from None
                rows.append(values)
        table = np.asarray(rows, dtype=np.float64).reshape(-1, len(columns))
    # The setting is the worker's --label-column, the node config's label-column, or this function's label_column.
    if label_column not in columns:
        raise ConfigError("label_column", label_column, f"not a column of {source} (columns: {', '.join(map(str, columns))})")
    if not np.all(np.isfinite(table)):
        raise ConfigError("data", source, "holds missing or non-finite values")
    label_index = columns.index(label_column)
    labels = table[:, label_index]
    if np.any(labels != np.round(labels)) or np.any(labels < 0):
        raise ConfigError("label_column", label_column, f"labels in {source} must be non-negative integers (class ids 0, 1, ...)")
    features = np.delete(table, label_index, axis=1).astype(np.float32)
    return ArrayDataset(features, labels.astype(np.int64))


_NEEDS_WEIGHT_BOUND = "deployments need a public upper bound on any site's example count (a site's own count stays hidden)"


def check_weight_bounds(config: RunConfig) -> None:
    """Refuses, before a deployment starts anything, a config whose protection needs a public bound on
    a site's example count (secure aggregation without client-level DP, the shared-key mode) and has none.

    Raises:
        ConfigError: names the missing ``weight_bound``.
    """
    fed = config.federation
    if fed.protection is ProtectionKind.SECAGG:
        secagg_weight_bound(config)
    elif fed.protection is ProtectionKind.SHARED_KEY and fed.shared_key.weight_bound is None:
        raise ConfigError("federation.shared_key.weight_bound", None, _NEEDS_WEIGHT_BOUND)


def secagg_weight_bound(config: RunConfig) -> float | None:
    """W, the public bound on a site's example count that a deployment's secure aggregation scales by.

    None under client-level DP, where every site's update carries weight 1.

    Raises:
        ConfigError: no ``weight_bound`` is set (needed: a site's own count stays hidden).
    """
    bound = config.federation.secagg.weight_bound
    if config.federation.client_dp is not None:
        return None
    if bound is None:
        raise ConfigError("federation.secagg.weight_bound", None, _NEEDS_WEIGHT_BOUND)
    return bound


def client_level_plan(config: RunConfig, num_sites: int):
    """The run's client-level DP plan for ``num_sites`` sites (every party derives the same one)."""
    from privfl.client_dp import plan_client_dp

    fed = config.federation
    assert fed.client_dp is not None  # asked for only under client-level DP
    return plan_client_dp(fed.client_dp, num_clients=num_sites, client_fraction=fed.client_fraction, rounds=fed.rounds)


def quantizer_for(config: RunConfig, num_clients: int):
    """The secure-aggregation quantizer of a round of ``num_clients`` (both sides build the same one)."""
    return config.federation.secagg.quantizer(num_clients)


# What a first train request imports (see Site.warm_up).
TRAIN_MODULES = (
    "opacus",
    "opacus.accountants.analysis.prv",
    "opacus.data_loader",
    "opacus.utils.uniform_sampler",
    "opacus.validators",
    "privfl.accounting",
    "privfl.models",
    "privfl.plan",
    "privfl.protocols.ckks",
    "privfl.protocols.secagg.client",
    "privfl.training",
    # torch.func's grad (the gradient-coverage check before the first DP-SGD step) imports it lazily:
    # about 1.2 s of CPU, in the first round otherwise.
    "torch._dynamo",
)


class Site:
    """One site of a federation.

    Args:
        name: the site's id (unique in the federation).
        dataset: its training ``Dataset`` (yielding (input, label)); it never leaves the site.
        state_dir: where the site keeps its ledger, keys and protocol state (created if missing).
        budget: the site's own epsilon budget; None takes the run config's. The site refuses to
            train past it, whatever the server asks.
        role: ``SiteRole.KEY_HOLDER`` for the one site that holds the CKKS secret key.
        model_fn: builds the model; None builds the run config's bundled model for the input shape
            and class count the aggregator announces.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda[:N]"``.
        key_holder_key: the CKKS key holder's identity public key (32 bytes, or 64 hex digits), got
            out of band (``privfl identity KEY_HOLDER_STATE_DIR`` prints it): the public context comes
            through the server, and a site encrypts only under one the key holder signed for the run.
            Needed by every other site of a CKKS run (they refuse to join one without it).
        peer_keys: secure aggregation's authenticated mode: the other sites' identity public keys
            (name -> 32 bytes or 64 hex digits), given out of band (``privfl identity`` prints each).
            A round's registry must then hold exactly these keys for the sites it names. Without
            them each key is pinned on first sight, for every later run.
        allow_noise_seed: join runs whose config fixes ``federation.noise_seed``. Off by default: the
            config comes from the server, and a fixed seed lets whoever knows it regenerate, and
            subtract, every DP noise draw of the site (DP-SGD, its secure-aggregation share, the key
            holder's release noise) and its batch sampling. Only for simulations that must reproduce
            ``privfl run`` (one operator plays every party).

    Raises:
        ConfigError: the state directory belongs to another site, or a setting is invalid.
    """

    def __init__(
        self,
        name: str,
        dataset,
        state_dir: str | os.PathLike[str],
        *,
        budget: float | None = None,
        role: SiteRole | str = SiteRole.SITE,
        model_fn: Callable[[], Any] | None = None,
        device: str = "auto",
        key_holder_key: bytes | str | None = None,
        allow_noise_seed: bool = False,
        peer_keys: Mapping[str, bytes | str] | None = None,
    ) -> None:
        if not _plain_name(name):
            raise ConfigError(
                "site", name,
                "must be a non-empty name of printable characters, at most 256 bytes, without / or \\, not . .., 'server' or 'aggregator'",
            )
        if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
            raise ConfigError("budget", budget, "must be a number > 0")
        try:
            self.role = SiteRole(role)
        except ValueError:
            raise ConfigError("role", role, "must be 'site' or 'key-holder'") from None
        self.name = name
        self.dataset = dataset
        self.state_dir = Path(state_dir)
        self.key_holder_key = _public_key_bytes(key_holder_key)
        self.allow_noise_seed = bool(allow_noise_seed)
        self.peer_keys = None if peer_keys is None else {str(site): _public_key_bytes(key, field="peer_keys") for site, key in peer_keys.items()}
        self.budget = None if budget is None else float(budget)
        self.model_fn = model_fn
        self.device = device
        self._template: tuple[tuple, Any] | None = None  # (run's model key, ModelPool of its initial model)
        self._ledger_cache: tuple[tuple[int, int, int] | None, Any] | None = None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        marker = self.state_dir / SITE_FILE
        if marker.exists():
            owner = json.loads(marker.read_text()).get("site")
            if owner != name:
                raise ConfigError("state_dir", str(self.state_dir), f"belongs to site {owner!r}, not {name!r}")
        else:
            durable_write_json(marker, {"site": name})

    def __repr__(self) -> str:
        return f"Site(name={self.name!r}, role={self.role.value}, state_dir={str(self.state_dir)!r})"

    def warm_up(self) -> None:
        """Imports what a first train request needs (Opacus, the accountant, the protocols).

        A long-lived site process calls this before it serves, so the first round is not slower
        than the rest by a few seconds of imports. Touches no data, keys or ledger.
        """
        import importlib

        for module in TRAIN_MODULES:
            importlib.import_module(module)

    # -- entry point -------------------------------------------------------------------------------
    def handle(self, message: bytes) -> bytes:
        """Answers one request from the aggregator; never raises for anything the peer sent.

        Returns:
            The reply bytes (a refusal with its reason when the request is malformed, stale, out of
            order or unsafe).
        """
        try:
            request = decode_request(message)
        except MessageError as exc:
            return encode_reply(Reply("unknown", Step.HELLO, 0, self.name, Status.REFUSED, {"reason": exc.reason}))
        try:
            if request.step is not Step.HELLO and request.site != self.name:
                raise MessageError(f"request is addressed to site {request.site!r}")
            with RunLock(self.state_dir):
                started = time.perf_counter()
                reply = self._dispatch(request)
                # The site's own time on the request: the rest of an exchange is the transport's.
                reply.fields.setdefault("site_seconds", round(time.perf_counter() - started, 4))
                return encode_reply(reply)
        except (PrivflError, ValueError, KeyError, TypeError, OSError, ArithmeticError) as exc:
            # ArithmeticError: a peer's number can overflow or underflow what a float holds.
            reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
            log.warning("site %s refused %s of round %d: %s", self.name, request.step.value, request.round_index, reason)
            if isinstance(exc, ProtocolAbort | MessageError) and request.step in _SECAGG_STEPS:
                # The round is over for this site: its secrets are not kept.
                (self.state_dir / ROUND_FILE).unlink(missing_ok=True)
            return encode_reply(Reply(request.run, request.step, request.round_index, self.name, Status.REFUSED, {"reason": reason}))

    def _dispatch(self, request: Request) -> Reply:
        if request.step is Step.HELLO:
            return self._hello(request)
        run = self._run_state()
        if run is None or run["run"] != request.run:
            raise MessageError("request for a run this site has not joined (no hello for it)")
        config = _parse_config(run["config"])
        # Checked at hello, and again for a run joined before the check existed (or with other settings).
        self._check_run_config(config)
        if request.step is Step.TRAIN:
            return self._train(request, config)
        if request.step in _SECAGG_STEPS:
            return self._secagg_step(request, config)
        if request.step is Step.CKKS_DECRYPT:
            return self._ckks_decrypt(request, config)
        if request.step is Step.SHARED_KEY_DECRYPT:
            return self._shared_key_decrypt(request, config)
        raise MessageError(f"step {request.step.value!r} is not served by a site")

    def _reply(self, request: Request, status: Status = Status.OK, parts: tuple[bytes, ...] = (), **fields: Any) -> Reply:
        return Reply(request.run, request.step, request.round_index, self.name, status, fields, parts)

    # -- state ---------------------------------------------------------------------------------------
    def _run_state(self) -> dict[str, Any] | None:
        path = self.state_dir / RUN_FILE
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def _identity_raw(self) -> bytes:
        """The site's long-term Ed25519 private key (made on first use, from the OS CSPRNG)."""
        return _identity_raw(self.state_dir)

    def identity_public(self) -> bytes:
        """The site's identity public key (to register with the CKKS key holder or the SecAgg registry)."""
        return site_identity(self.state_dir)

    def _ledger(self, config: RunConfig):
        from privfl.accounting import ClientBudget, LedgerKey, PrivacyLedger

        path = self.state_dir / LEDGER_FILE
        key_path = self.state_dir / LEDGER_KEY_FILE
        accountant = config.training.dp.accountant
        key_seen = _signature(key_path)
        cached = self._ledger_cache
        if cached is not None and cached[0] == key_seen and key_seen is not None and cached[1].reopen():
            # The file is exactly as this site left it after its last request: its lines were
            # verified then (a ledger reopened from scratch costs one verification per line).
            ledger = cached[1]
        elif path.exists():
            ledger = PrivacyLedger.open(path, key=LedgerKey.read(key_path))
        elif key_path.exists():
            raise LedgerError(str(path), "the ledger key exists but the ledger is gone; refusing to start from zero")
        else:
            key = LedgerKey.generate()
            key.write(key_path)
            ledger = PrivacyLedger.create(path, accountant=accountant, key=key, run_identity={"site": self.name})
        self._ledger_cache = (_signature(key_path), ledger)
        budget = self.budget if self.budget is not None else config.training.dp.epsilon_budget
        try:
            ledger.register(self.name, ClientBudget(epsilon=budget, delta=config.training.dp.delta))
        except BaseException:
            ledger.close()
            raise
        return ledger

    def spent(self, config: RunConfig) -> tuple[float, float]:
        """(epsilon spent so far, budget), from this site's own ledger."""
        ledger = self._ledger(config)
        try:
            return ledger.epsilon(self.name), ledger.budget(self.name).epsilon
        finally:
            ledger.close()

    # -- steps ---------------------------------------------------------------------------------------
    def _hello(self, request: Request) -> Reply:
        text = request.fields.get("config")
        if not isinstance(text, str):
            raise MessageError("hello carries no run config")
        config = _parse_config(text)
        if len(request.run) != 32 or any(c not in "0123456789abcdef" for c in request.run):
            raise MessageError("run id must be 32 hex digits")
        # A site does not join a run whose client-level DP it could not hold to its guarantee.
        check_deployed_client_dp(config)
        self._check_run_config(config)
        if config.federation.protection is ProtectionKind.CKKS and self.role is SiteRole.SITE and self.key_holder_key is None:
            raise ConfigError(
                "key_holder_key", None,
                "a CKKS run needs the key holder's identity key at every other site (Site(key_holder_key=...), node config "
                "key-holder-key, worker --key-holder-key; `privfl identity KEY_HOLDER_STATE_DIR` prints it): the public "
                "context comes through the server, which could otherwise hand out one it holds the secret key of",
            )
        previous = self._run_state()
        if previous is not None and previous["run"] == request.run and previous["config"] != text:
            # Every later step of the run (and the key holder's signed context) rests on the config it joined with.
            raise MessageError("this site joined the run with another run config; a run's config does not change")
        if previous is not None and previous["run"] != request.run:
            # A new run: any secure-aggregation secrets of the old one are dropped.
            (self.state_dir / ROUND_FILE).unlink(missing_ok=True)
        if previous is None or previous["run"] != request.run:
            durable_write_json(self.state_dir / RUN_FILE, {"run": request.run, "config": text})
        spent, budget = self.spent(config)
        parts: tuple[bytes, ...] = ()
        if self.role is SiteRole.KEY_HOLDER and config.federation.protection is ProtectionKind.CKKS:
            # The key holder makes this run's CKKS keys now (or reloads them, if it was restarted) and
            # hands out only the public context.
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            from privfl.protocols.ckks_signing import vouch_context

            holder = self._key_holder(config, request.run, create=True)
            public = holder.public_context()
            # Signed for this run: the sites check it before they encrypt under it.
            signature = vouch_context(Ed25519PrivateKey.from_private_bytes(self._identity_raw()), request.run, text, holder.run_id, public)
            parts = (public, holder.run_id, signature)
        extra: dict[str, Any] = {}
        if self.role is SiteRole.KEY_HOLDER and config.federation.protection is ProtectionKind.CKKS and config.federation.client_dp:
            # A resumed aggregator learns the S the key holder noises for (it may have released a round whose
            # reply never arrived).
            held = self._held_clip_norm(config, request.run)
            if held is not None:
                extra["clip_norm"] = held
        if config.federation.protection is ProtectionKind.SHARED_KEY:
            # A public fingerprint: the aggregator checks that every site holds the same key.
            extra["key_id"] = self._shared_key(config).key_id.hex()
        return self._reply(
            request,
            parts=parts,
            role=self.role.value,
            identity=self.identity_public().hex(),
            epsilon=spent,
            budget=budget,
            **extra,
        )

    def _check_run_config(self, config: RunConfig) -> None:
        """What a site refuses in a run config, which comes from the server (at hello and at every step).

        Raises:
            ConfigError: a fixed ``noise_seed`` (unless ``allow_noise_seed``), a sample-level delta
                of at least 1 / n for this site's n examples, or no finite epsilon budget (the site has
                none of its own and the config sets none).
        """
        if config.federation.noise_seed is not None and not self.allow_noise_seed:
            raise ConfigError(
                "federation.noise_seed", config.federation.noise_seed,
                "a deployed site draws its DP noise and batches from the OS CSPRNG: a run config (sent by the server) that "
                "fixes noise_seed would let the server regenerate and subtract every noise draw; drop noise_seed, or "
                "start the site with allow_noise_seed (worker --allow-noise-seed) for a simulation that must reproduce privfl run",
            )
        if self.budget is None and not math.isfinite(config.training.dp.epsilon_budget):
            # The first registration fixes the ledger's cap for good: a server must not make it infinite.
            raise ConfigError(
                "budget", None,
                "this site has no epsilon budget of its own and the run config sets none: start it with --budget "
                "(Site(budget=...); an explicit inf keeps it uncapped)",
            )
        n = len(self.dataset)
        if config.training.dp.delta * n >= 1:
            # The first run a site joins fixes its ledger's delta for good: a server must not pick a useless one.
            raise ConfigError(
                "training.dp.delta", config.training.dp.delta,
                f"must be below 1 / n = {1 / n:.3g} for this site's {n} examples (at delta >= 1/n a mechanism may publish an example outright)",
            )

    def _model(self, config: RunConfig, fields: dict[str, Any]):
        shape = fields.get("input_shape")
        classes = fields.get("num_classes")
        if self.model_fn is None and not (
            isinstance(shape, list) and all(isinstance(d, int) and d > 0 for d in shape) and isinstance(classes, int) and classes > 1
        ):
            raise MessageError("train request lacks a valid input_shape / num_classes")
        from privfl.model_pool import ModelPool

        # The seeded initial model is the same for every round of a run: built once, then a fresh copy
        # per request (a long-lived site, in process or as a worker, skips the seeding and the
        # construction), reset in place when the last training changed only tensor values.
        key = (repr(config.model), config.federation.seed, None if shape is None else tuple(shape), classes)
        if self._template is None or self._template[0] != key:
            self._template = (key, ModelPool(seeded_model(config, self.model_fn, None if shape is None else tuple(shape), classes)))
        return self._template[1].take()

    def _train(self, request: Request, config: RunConfig) -> Reply:
        from privfl.accounting import DPEvent
        from privfl.plan import derive_seed, plan_site
        from privfl.protocols.base import ClientUpdate

        fields = request.fields
        index, num_sites = fields.get("index"), fields.get("num_sites")
        if not (isinstance(index, int) and isinstance(num_sites, int) and 0 <= index < num_sites):
            raise MessageError("train request lacks a valid site index / num_sites")
        r = request.round_index
        if r >= config.federation.rounds:
            raise MessageError(f"round {r} is beyond the run's {config.federation.rounds} rounds")
        ledger = self._ledger(config)
        try:
            # The ledger is the one record of what this site trained: a round charged for this run
            # (or a later one) is never trained again, whatever the server asks.
            trained = _trained_rounds(ledger, self.name, request.run)
            if r in trained or (trained and r < max(trained)):
                raise MessageError(f"this site already trained in round {r} of this run (or a later one)")
            if len(request.parts) == 5 and config.federation.protection is ProtectionKind.CKKS:
                self._store_ckks_context(request.run, *request.parts[2:])
            elif len(request.parts) != 2:
                raise MessageError("train request must carry the global model and the protocol part")
            # Everything the protocol needs is checked before the data is touched: a request refused
            # after training would have spent budget for nothing.
            self._check_protocol_inputs(request, config)
            clip_norm = _client_clip_norm(request, config)
            plan = plan_site(len(self.dataset), config.training, config.federation, num_sites)
            event = DPEvent(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps_per_round)
            budget = ledger.budget(self.name).epsilon
            reason = ledger.refusal(self.name, event)
            if reason is not None:
                # Decided here, by the site's own ledger: the server cannot talk it into training.
                ledger.record_skip(r, self.name, reason=f"run {request.run}: {reason}")
                return self._reply(request, Status.SKIPPED, reason=reason, epsilon=ledger.epsilon(self.name), budget=budget, exhausted=True)
            model = self._model(config, fields)
            dataset = _shaped(self.dataset, fields.get("input_shape"))
            from privfl.training import flatten_parameters, load_flat_parameters, resolve_device, train_dp_sgd

            size = flatten_parameters(model).size
            if len(request.parts[0]) != 4 * size:
                raise MessageError(f"global model has {len(request.parts[0]) // 4} parameters, the site's model {size}")
            global_params = np.frombuffer(request.parts[0], dtype="<f4").copy()
            if not np.all(np.isfinite(global_params)):
                raise MessageError("global model holds non-finite values")
            load_flat_parameters(model, global_params)
            seed = derive_seed(config.federation.noise_seed, r, index, 0)
            result = train_dp_sgd(
                model, dataset, config=config.training, noise_multiplier=plan.noise_multiplier,
                device=resolve_device(self.device if self.device != "auto" else config.federation.device), seed=seed, site=self.name,
            )
            assert self._template is not None  # set by self._model
            self._template[1].give_back(model)  # the update is a copy; the model may serve the next request
            # Charged (one fsynced journal line) before anything derived from the data leaves the site.
            ledger.charge(r, self.name, result.event, note=_run_note(request.run))
            spent = ledger.epsilon(self.name)
            exhausted = ledger.refusal(self.name, event) is not None
        except BudgetExceededError as exc:
            return self._reply(request, Status.SKIPPED, reason=str(exc), epsilon=ledger.epsilon(self.name), budget=ledger.budget(self.name).epsilon, exhausted=True)
        finally:
            ledger.close()
        update = ClientUpdate(delta=result.delta, weight=float(result.num_examples))
        if clip_norm is not None:
            from privfl.client_dp import clip_with_bit

            assert config.federation.client_dp is not None  # clip_norm is set only then
            # DP-FedAvg: clipped to S (and, adaptive, the centred bit); every site counts once.
            vector, _ = clip_with_bit(result.delta, clip_norm, adaptive=config.federation.client_dp.adaptive)
            update = ClientUpdate(delta=vector, weight=1.0)
        message = self._protect(request, config, update, num_sites, request.parts[1])
        # No training loss in the reply: it is an un-noised statistic of the site's data, outside the
        # mechanism the ledger accounts for, and the protection would not cover it.
        return self._reply(request, parts=(message,), epsilon=spent, budget=budget, exhausted=exhausted)

    def _check_protocol_inputs(self, request: Request, config: RunConfig) -> None:
        kind = config.federation.protection
        if kind is ProtectionKind.CKKS:
            self._ckks_public(request.run)
            participants = request.fields.get("participants")
            if not isinstance(participants, int) or isinstance(participants, bool) or participants < 1:
                raise MessageError("train request lacks the participant count")
        elif kind is ProtectionKind.SHARED_KEY:
            self._shared_key(config)
            participants = request.fields.get("participants")
            if not isinstance(participants, int) or isinstance(participants, bool) or participants < 1:
                raise MessageError("train request lacks the participant count")
            bound = config.federation.shared_key.weight_bound
            if bound is None:
                raise ConfigError("federation.shared_key.weight_bound", None, _NEEDS_WEIGHT_BOUND)
            if len(self.dataset) > bound:
                raise ConfigError("federation.shared_key.weight_bound", bound, f"this site has {len(self.dataset)} examples, above it")
        elif kind is ProtectionKind.SECAGG:
            from privfl.protocols.secagg.state import decode_params

            bound = secagg_weight_bound(config)
            if bound is not None and len(self.dataset) > bound:
                raise ConfigError("federation.secagg.weight_bound", bound, f"this site has {len(self.dataset)} examples, above it")
            params = decode_params(request.parts[1], round_index=request.round_index)
            if self.name not in params.index:
                raise MessageError("this site is not among the round's secure-aggregation clients")
            self._pin_secagg_peers(request, config, params)
            if len(params.client_ids) > request.fields["num_sites"]:
                # Client-level DP plans rho and the encoding's modulus for num_sites: a larger round could wrap the sum.
                raise MessageError(f"the round has {len(params.client_ids)} secure-aggregation clients, the run {request.fields['num_sites']} sites")
            if config.federation.client_dp is not None:
                from privfl.client_dp import count_free_shares, deployed_secagg_noise_ratio

                # The round's encoding must exist before the data is touched (no budget spent on a refusal).
                _secagg_noise_round(request, config, len(params.client_ids), len(request.parts[0]) // 4)
                # Each share carries rho (z S)^2 / c; any unmasked sum holds at least t of this site's share
                # holders' shares, so t >= c / rho keeps every sum at the charged noise. The server picks t:
                # a smaller one (say pairs of sites) would release sums with a fraction of it.
                needed = count_free_shares(len(params.client_ids), deployed_secagg_noise_ratio(config.federation.secagg, request.fields["num_sites"]))
                if params.threshold < needed - 1e-9:
                    raise MessageError(
                        f"the round's threshold {params.threshold} is below {needed:.3f}: a sum of that many noise shares "
                        "would carry less noise than charged"
                    )

    def _protect(self, request: Request, config: RunConfig, update, num_sites: int, protocol_part: bytes) -> bytes:
        kind = config.federation.protection
        r = request.round_index
        if kind is ProtectionKind.PLAINTEXT:
            from privfl.protocols.plaintext import encode_update

            return encode_update(r, self.name, update)
        if kind is ProtectionKind.CKKS:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            from privfl.protocols.ckks import CkksClient
            from privfl.protocols.ckks_signing import SiteIdentity

            public, run_id = self._ckks_public(request.run)
            identity = SiteIdentity(site=self.name, private_key=Ed25519PrivateKey.from_private_bytes(self._identity_raw()))
            participants = request.fields.get("participants")
            if not isinstance(participants, int) or participants < 1:
                raise MessageError("train request lacks the participant count")
            # Under client-level DP the signature names the S the update was clipped to: the key holder
            # releases no sum of updates clipped to another S than its noise is planned for.
            return CkksClient(public, config.federation.ckks, run_id=run_id).encrypt(
                r, self.name, update, participants, identity=identity, clip_norm=_client_clip_norm(request, config)
            )
        if kind is ProtectionKind.SHARED_KEY:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            from privfl.protocols.ckks_signing import SiteIdentity
            from privfl.protocols.shared_key import RoundEncoding, SharedKeyClient

            cfg = config.federation.shared_key
            encoding = RoundEncoding.for_round(cfg, update.delta.shape[0], request.fields["participants"])
            identity = SiteIdentity(site=self.name, private_key=Ed25519PrivateKey.from_private_bytes(self._identity_raw()))
            client = SharedKeyClient(self._shared_key(config), cfg, run_id=bytes.fromhex(request.run))
            assert cfg.weight_bound is not None  # checked before training
            message, _ = client.encrypt(r, update, encoding, weight_bound=cfg.weight_bound, identity=identity)
            return message
        return self._secagg_start(request, config, update, protocol_part)

    # -- secure aggregation ----------------------------------------------------------------------------
    def _secagg_identity(self, config: RunConfig):
        if not config.federation.secagg.authenticated:
            return None
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from privfl.protocols.secagg.keys import IdentityKey

        private = Ed25519PrivateKey.from_private_bytes(self._identity_raw())
        return IdentityKey(private=private, public=private.public_key().public_bytes_raw())

    def _secagg_start(self, request: Request, config: RunConfig, update, params_part: bytes) -> bytes:
        from privfl.protocols.secagg.client import SecAggClient
        from privfl.protocols.secagg.simulate import rounding_key
        from privfl.protocols.secagg.state import decode_params, export_client

        cfg = config.federation.secagg
        bound = secagg_weight_bound(config)
        params = decode_params(params_part, round_index=request.round_index)
        dim = update.delta.shape[0]
        if params.dimension != dim + 1:
            raise MessageError(f"round parameters are for {params.dimension - 1} values, the update has {dim}")
        vector = np.empty(dim + 1)
        if bound is None:
            # Client-level DP: the clipped update plus this site's noise share, on the quantizer's grid.
            vector[:dim], quantizer = self._secagg_noise_share(request, config, update.delta, len(params.client_ids))
            c, ratio = quantizer.clip_range, 1.0
        else:
            if update.weight > bound:
                raise ConfigError("federation.secagg.weight_bound", bound, f"this site has {update.weight:g} examples, above it")
            quantizer = quantizer_for(config, len(params.client_ids))
            c = float(cfg.clip_range)
            ratio = update.weight / bound
            np.multiply(np.clip(update.delta.astype(np.float64), -c, c), ratio, out=vector[:dim])
        vector[dim] = ratio * c
        encoded, _ = quantizer.encode(vector, rounding_key())
        if bound is None:
            import dataclasses

            from privfl.client_dp import secagg_mask_context

            # The masks are bound to the S and site count this site planned its noise share for (its own
            # values, not the server's copy): a server telling sites different ones gets no usable sum.
            clip_norm = _client_clip_norm(request, config)
            assert clip_norm is not None  # set under client-level DP
            params = dataclasses.replace(params, mask_context=secagg_mask_context(clip_norm, request.fields["num_sites"]))
        client = SecAggClient(self.name, params, self._secagg_identity(config))
        message = client.advertise()
        self._save_round(request.round_index, export_client(client), encoded)
        return message

    def _pin_secagg_peers(self, request: Request, config: RunConfig, params) -> None:
        """Authenticated mode: checks this site's own identity key in the round's registry and the
        others' against the keys it was given out of band (``peer_keys``), or else pins them on
        first sight for every later run (trust on first use).

        The registry reaches the site through the server; a server that swapped a site's key (to
        play that site itself) is caught by every site that was given or saw the real key before.

        Raises:
            MessageError: the registry is missing or unexpected, holds another key for this site, or
                another key for a site than the one given or pinned (with ``peer_keys``: a site
                not among them).
        """
        authenticated = config.federation.secagg.authenticated
        if params.identities is None:
            if authenticated:
                raise MessageError("the authenticated mode's round carries no identity registry")
            return
        if not authenticated:
            raise MessageError("the round carries an identity registry, but the run is not in the authenticated mode")
        if params.identities[self.name] != self.identity_public():
            raise MessageError("the round's identity registry holds another key for this site")
        if self.peer_keys is not None:
            for site, key in params.identities.items():
                given = self.peer_keys.get(site, self.identity_public() if site == self.name else None)
                if given is None:
                    raise MessageError(f"the round's registry names {site!r}, which is not among this site's given peers")
                if given != key:
                    raise MessageError(f"identity key of {site!r} is not the one this site was given out of band")
            return
        path = self.state_dir / SECAGG_PEERS_FILE
        stored = json.loads(path.read_text()) if path.exists() else {}
        # Pinned across runs (a server swapping keys at the start of a new run is caught as well); a file of
        # an earlier version pinned per run id: its pins are merged.
        pinned = stored["sites"] if "sites" in stored else {site: key for run in stored.values() for site, key in run.items()}
        for site, key in params.identities.items():
            known = pinned.setdefault(site, key.hex())
            if known != key.hex():
                raise MessageError(f"identity key of {site!r} differs from the one pinned when this site first saw it")
        durable_write_json(path, {"sites": pinned})

    def _secagg_noise_share(self, request: Request, config: RunConfig, vector: np.ndarray, participants: int):
        """This site's DP-FedAvg vector noised with its share, and the round's derived quantizer.

        Both come from public values (the site count, the round's participants, S), so the server
        derives the same quantizer (privfl.client_dp.secagg_round). A coordinate beyond the derived
        clip range aborts the round before anything is masked (fail closed: a clipped share is not
        the accounted noise).

        Raises:
            ProtocolAbort: a coordinate would be clipped.
        """
        from privfl.client_dp import distributed_noise
        from privfl.noise import random_source
        from privfl.plan import derive_seed
        from privfl.protocols.secagg import Quantizer

        fed = config.federation
        client_dp, cfg = fed.client_dp, fed.secagg
        assert client_dp is not None  # called only under client-level DP
        adaptive = client_dp.adaptive
        clip_norm, plan, noise_round = _secagg_noise_round(request, config, participants, vector.shape[0] - int(adaptive))
        index = request.fields["index"]  # checked before training
        noised = distributed_noise(
            vector, plan=plan, clip_norm=clip_norm, adaptive=adaptive, threshold=noise_round.shares,
            source=random_source(derive_seed(fed.noise_seed, request.round_index, index, 1)), min_grid=noise_round.min_grid,
        )
        c = noise_round.range.clip_range
        clipped = int(np.count_nonzero(np.abs(noised) > c))
        if clipped:
            raise ProtocolAbort(
                f"round {request.round_index}: {clipped} coordinate(s) beyond the derived clip range {c:.6g}; "
                "nothing is masked (a clipped noise share is not the accounted noise)"
            )
        quantizer = Quantizer(clip_range=c, bits=cfg.bits, num_clients=participants, fraction_bits=noise_round.range.fraction_bits)
        return noised, quantizer

    def _save_round(self, round_index: int, state: bytes, encoded: np.ndarray) -> None:
        from privfl.protocols.wire import encode_frame

        _write_secret(self.state_dir / ROUND_FILE, encode_frame(22, round_index, self.name, [state, encoded.astype("<u4").tobytes()]))

    def _load_round(self, round_index: int) -> tuple[bytes, np.ndarray]:
        from privfl.protocols.wire import decode_frame

        path = self.state_dir / ROUND_FILE
        if not path.exists():
            raise MessageError(f"no secure-aggregation round {round_index} in progress at this site")
        frame = decode_frame(path.read_bytes(), kind=22, round_index=round_index, sender=self.name, max_parts=2)
        return frame.parts[0], np.frombuffer(frame.parts[1], dtype="<u4").copy()

    def _secagg_step(self, request: Request, config: RunConfig) -> Reply:
        from privfl.protocols.secagg.state import export_client, restore_client

        if len(request.parts) != 1:
            raise MessageError("a secure-aggregation step carries one server message")
        state, encoded = self._load_round(request.round_index)
        client = restore_client(state, round_index=request.round_index, client_id=self.name, identity=self._secagg_identity(config))
        # Under client-level DP the site itself, not only the server, refuses to unmask a round with a dropout.
        client.require_every_client = config.federation.client_dp is not None
        incoming = request.parts[0]
        if request.step is Step.SECAGG_KEYS:
            message = client.share_keys(incoming)
        elif request.step is Step.SECAGG_RELAY:
            message = client.masked_input(incoming, encoded)
        elif request.step is Step.SECAGG_CHECK:
            message = client.sign_survivors(incoming)
        else:
            message = client.unmask(incoming)
        if request.step is Step.SECAGG_UNMASK:
            (self.state_dir / ROUND_FILE).unlink(missing_ok=True)
        else:
            self._save_round(request.round_index, export_client(client), encoded)
        return self._reply(request, parts=(message,))

    # -- CKKS ----------------------------------------------------------------------------------------
    def _ckks_public(self, run: str) -> tuple[bytes, bytes]:
        """The public context and CKKS run id this site accepted for ``run`` (signed by its key holder)."""
        from privfl.protocols.wire import decode_frame

        path = self.state_dir / CKKS_PUBLIC_FILE
        frame = decode_frame(path.read_bytes(), kind=23, round_index=0, sender="key-holder", max_parts=3) if path.exists() else None
        if frame is None or len(frame.parts) != 3 or frame.parts[2] != run.encode("ascii"):
            raise MessageError("no CKKS public context received for this run")
        return frame.parts[0], frame.parts[1]

    def _store_ckks_context(self, run: str, context_bytes: bytes, run_id: bytes, signature: bytes) -> None:
        from privfl.protocols.ckks import _load_context
        from privfl.protocols.ckks_signing import check_context
        from privfl.protocols.wire import encode_frame

        # The key holder's own key for itself; every other site has its key holder's from out of band.
        key = self.identity_public() if self.role is SiteRole.KEY_HOLDER else self.key_holder_key
        if key is None:
            raise ConfigError("key_holder_key", None, "this site cannot check the CKKS public context without the key holder's identity key")
        # Before TenSEAL parses a byte of it: a context the key holder did not sign for this run, and for the
        # run config this site joined with, is refused.
        state = self._run_state()
        if state is None or state["run"] != run:
            raise MessageError("request for a run this site has not joined (no hello for it)")
        check_context(key, run, state["config"], run_id, context_bytes, signature=signature)
        if _load_context(context_bytes).has_secret_key():
            raise MessageError("the CKKS context sent to a site holds a secret key")
        durable_write_bytes(self.state_dir / CKKS_PUBLIC_FILE, encode_frame(23, 0, "key-holder", [context_bytes, run_id, run.encode("ascii")]))

    def _key_holder(self, config: RunConfig, run: str, *, create: bool = False):
        from privfl.protocols.ckks import CkksKeyHolder

        if self.role is not SiteRole.KEY_HOLDER:
            raise MessageError("this site is not the CKKS key holder")
        path = self.state_dir / CKKS_KEY_HOLDER_FILE
        if path.exists():
            data = path.read_bytes()
            if data[:32].decode("ascii", errors="replace") == run:
                return CkksKeyHolder.from_bytes(data[32:], config.federation.ckks)
        if not create:
            return None
        made_path = self.state_dir / CKKS_RUNS_FILE
        made = json.loads(made_path.read_text()) if made_path.exists() else []
        if run in made:
            # Its keys were made once and replaced by another run's since: two signed contexts for one run
            # would let a server give different sites different keys.
            raise MessageError("this key holder already made (and has since dropped) the CKKS keys of this run")
        holder = CkksKeyHolder(config.federation.ckks)
        durable_write_json(made_path, [*made, run])
        self._save_key_holder(holder, run)
        return holder

    def _save_key_holder(self, holder, run: str) -> None:
        _write_secret(self.state_dir / CKKS_KEY_HOLDER_FILE, run.encode("ascii") + holder.to_bytes())

    def _ckks_decrypt(self, request: Request, config: RunConfig) -> Reply:
        from privfl.errors import DecryptionError
        from privfl.protocols.oneshot import encode_average

        holder = self._key_holder(config, request.run)
        if holder is None:
            raise MessageError("no CKKS key for this run at this site")
        dim = request.fields.get("dim")
        registry = request.fields.get("sites")
        if not isinstance(dim, int) or dim < 1 or len(request.parts) != 1 or not isinstance(registry, dict):
            raise MessageError("decryption request must carry the dimension, the contributors' keys and the aggregate")
        for site, key in sorted(registry.items()):
            if not isinstance(key, str) or len(key) != 64:
                raise MessageError(f"identity key of {site!r} is not 32 bytes of hex")
            # Registration through the aggregator, pinned for the run on first sight: trust on first
            # use (docs/deployment.md). A site presenting another key later is refused.
            holder.register_site(site, bytes.fromhex(key))
        # Checked before decrypting: a refused release must not use up the round's one decryption.
        release, clip_norm = None, None
        if config.federation.client_dp is not None:
            try:
                release, clip_norm = self._client_level_release(request, config, dim)
            except _ClipNormMismatch as exc:
                # The aggregator's S is stale (a lost release reply): it learns the key holder's (public) S.
                return self._reply(request, Status.REFUSED, reason=str(exc), clip_norm=exc.clip_norm)
        try:
            # Every contribution must be signed for the S the noise is planned for.
            released = holder.decrypt_sum(request.round_index, request.parts[0], dim, clip_norm=clip_norm)
        except DecryptionError as exc:
            raise ProtocolAbort("the key holder refused to decrypt the aggregate") from exc
        finally:
            # The decrypted round is remembered even if the release fails afterwards.
            self._save_key_holder(holder, request.run)
        if not released.total_weight > 0:
            raise ProtocolAbort(f"decrypted total weight {released.total_weight} is not positive")
        weighted_sum = released.weighted_sum
        extra: dict[str, Any] = {}
        if release is not None:
            weighted_sum, extra["clip_norm"], extra["next_clip_norm"] = release(weighted_sum)
        average = encode_average(request.round_index, weighted_sum / released.total_weight, released.total_weight)
        return self._reply(request, parts=(average,), contributors=list(released.contributors), **extra)

    def _held_clip_norm(self, config: RunConfig, run: str) -> float | None:
        """The clip norm the key holder noises the next release of ``run`` for (None before its first)."""
        from privfl.client_dp import ClientLevelRun

        path = self.state_dir / CLIENT_DP_FILE
        state = json.loads(path.read_text()).get(run) if path.exists() else None
        if not state or config.federation.client_dp is None:
            return None
        tracked = ClientLevelRun(config.federation.client_dp, client_level_plan(config, state["num_sites"]))
        tracked.resume(state["levels"])
        return tracked.clip_norm

    def _client_level_release(
        self, request: Request, config: RunConfig, dim: int
    ) -> tuple[Callable[[np.ndarray], tuple[np.ndarray, float, float]], float]:
        """The key holder's central client-level DP noise for a decrypted sum, for the clip norm S it tracks itself.

        The key holder is the first party to see the sum: it noises it before anything leaves, and
        moves S (adaptive clipping) from the noised sum it released, as the aggregator does. A
        request naming another S or another site count than this run's is refused: the noise would
        not match the sites' clipping (and the sites signed the S they clipped to: the decryption
        checks it).

        Returns:
            (``f(sum) -> (noised sum, the S it was noised for, the next round's S)``, which also
            records the release; the S every contribution must be signed for).

        Raises:
            ProtocolAbort: the request's site count disagrees with the key holder's record.
            _ClipNormMismatch: the request's clip norm is not the key holder's.
        """
        from privfl.client_dp import ClientLevelRun, central_noise, split_release

        client_dp = config.federation.client_dp
        assert client_dp is not None  # called only under client-level DP
        num_sites, announced = request.fields.get("num_sites"), request.fields.get("clip_norm")
        if not (isinstance(num_sites, int) and not isinstance(num_sites, bool) and num_sites >= 1):
            raise MessageError("decryption request lacks the site count")
        path = self.state_dir / CLIENT_DP_FILE
        runs = json.loads(path.read_text()) if path.exists() else {}
        state = runs.setdefault(request.run, {"num_sites": num_sites, "levels": []})
        if state["num_sites"] != num_sites:
            raise ProtocolAbort(f"the aggregator now counts {num_sites} sites; this run started with {state['num_sites']}")
        fed = config.federation
        plan = client_level_plan(config, num_sites)
        run = ClientLevelRun(client_dp, plan)
        run.resume(state["levels"])
        if not (isinstance(announced, (int, float)) and announced == run.clip_norm):
            raise _ClipNormMismatch(f"the aggregator's clip norm {announced!r} is not the key holder's {run.clip_norm!r}", run.clip_norm)
        adaptive = client_dp.adaptive
        size = dim - int(adaptive)
        noise = central_noise(plan, clip_norm=run.clip_norm, dim=size, adaptive=adaptive, noise_seed=fed.noise_seed, round_index=request.round_index)

        def release(weighted_sum: np.ndarray) -> tuple[np.ndarray, float, float]:
            noised = noise(weighted_sum)
            _, unclipped = split_release(noised, dim=size, plan=plan, adaptive=adaptive)
            used = run.clip_norm
            state["levels"].append(run.close_round(unclipped, delta=client_dp.delta))
            durable_write_json(path, runs)
            return noised, used, run.clip_norm

        return release, run.clip_norm

    # -- shared-key mode ---------------------------------------------------------------------------------
    def _shared_key(self, config: RunConfig):
        """The sites' shared secret key, provisioned into this site's state directory out of band."""
        from privfl.protocols.rlwe import SecretKey

        path = self.state_dir / SHARED_KEY_FILE
        if not path.exists():
            raise ConfigError(
                "shared key", str(path),
                "is missing: in the shared-key mode every site holds the same secret key, provisioned out of band "
                "(privfl.site.provision_shared_key; `privfl deploy local` does it)",
            )
        key = SecretKey.from_bytes(path.read_bytes())
        if key.n != config.federation.shared_key.poly_modulus_degree:
            raise ConfigError("shared key", str(path), f"is for N={key.n}, the run asks for {config.federation.shared_key.poly_modulus_degree}")
        return key

    def _shared_key_decrypt(self, request: Request, config: RunConfig) -> Reply:
        from privfl.errors import DecryptionError
        from privfl.protocols.oneshot import encode_average
        from privfl.protocols.shared_key import RoundEncoding, SharedKeyDecryptor

        if self.role is not SiteRole.KEY_HOLDER:
            # One decrypting site per federation: two could each be handed another subset of a round's
            # ciphertexts, and the difference of their sums is one site's update.
            raise MessageError("this site does not decrypt (only the site with role = \"key-holder\" does)")
        cfg = config.federation.shared_key
        dim, participants, registry = request.fields.get("dim"), request.fields.get("participants"), request.fields.get("sites")
        if not (isinstance(dim, int) and dim >= 1 and isinstance(participants, int) and participants >= 1
                and isinstance(registry, dict) and len(request.parts) == 1):
            raise MessageError("decryption request must carry the dimension, the participant count, the contributors' keys and the sum")
        path = self.state_dir / SHARED_KEY_RUNS_FILE
        runs = json.loads(path.read_text()) if path.exists() else {}
        state = runs.setdefault(request.run, {"rounds": [], "sites": {}, "halted": False})
        decryptor = SharedKeyDecryptor(
            self._shared_key(config), cfg, run_id=bytes.fromhex(request.run), site=self.name, halted=bool(state.get("halted"))
        )
        for site, key in sorted({**registry, **state["sites"]}.items()):
            # Pinned for the run on first sight (trust on first use, as for the CKKS key holder): a site
            # presenting another key later is refused.
            pinned = state["sites"].get(site)
            if not isinstance(key, str) or len(key) != 64 or (pinned is not None and registry.get(site, pinned) != pinned):
                raise MessageError(f"identity key of {site!r} is malformed or differs from the one pinned for this run")
            decryptor.register_site(site, bytes.fromhex(key))
            state["sites"][site] = key
        if request.round_index in state["rounds"]:
            raise ProtocolAbort(f"round {request.round_index} was already decrypted by this site")
        state["rounds"].append(request.round_index)
        # Remembered before decrypting: a crash after the release must not allow a second one.
        durable_write_json(path, runs)
        try:
            released = decryptor.decrypt(request.round_index, request.parts[0], RoundEncoding.for_round(cfg, dim, participants))
        except DecryptionError as exc:
            if decryptor.halted and not state.get("halted"):
                # Fail closed for the rest of the run, across restarts: the server gets one refusal, one bit.
                state["halted"] = True
                durable_write_json(path, runs)
            raise ProtocolAbort("this site refused to decrypt the sum") from exc
        ratio_sum = float(released.values[dim]) / float(cfg.clip_range)
        if not ratio_sum > 0 or cfg.weight_bound is None:
            raise ProtocolAbort(f"decrypted total weight {ratio_sum} is not positive")
        average = encode_average(request.round_index, released.values[:dim] / ratio_sum, ratio_sum * cfg.weight_bound)
        return self._reply(request, parts=(average,), contributors=list(released.contributors))


def provision_shared_key(state_dirs, *, poly_modulus_degree: int = 4096) -> str:
    """Writes one fresh shared-key-mode secret key into each site's state directory (0600).

    What a consortium's provisioning does once, out of band: every site gets the same key, the server
    none. Refuses to overwrite a key already there.

    Returns:
        The key's public fingerprint (hex), which every site reports at hello.
    """
    from privfl.protocols.rlwe import SecretKey

    key = SecretKey.generate(poly_modulus_degree)
    paths = [Path(d) / SHARED_KEY_FILE for d in state_dirs]
    for path in paths:
        if path.exists():
            raise ConfigError("shared key", str(path), "already exists; remove it to provision a new key")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_secret(path, key.to_bytes())
    return key.key_id.hex()


_SECAGG_STEPS = frozenset({Step.SECAGG_KEYS, Step.SECAGG_RELAY, Step.SECAGG_CHECK, Step.SECAGG_UNMASK})


def seeded_model(config: RunConfig, model_fn, input_shape: tuple[int, ...] | None, num_classes: int | None):
    """The run's initial model, as every party builds it: seeded by ``federation.seed``, made DP-compatible.

    The Aggregator and every Site call this, so all start from bit-identical parameters and buffers.
    """
    from privfl.models import build_model
    from privfl.training import seeded_initial_model

    if model_fn is None:
        assert input_shape is not None and num_classes is not None  # callers without model_fn pass both
        model_fn = lambda: build_model(config.model, input_shape, num_classes)
    # The model's owner is told about DP conversions once, where the run starts: not here.
    return seeded_initial_model(config.federation.seed, model_fn, warn=False)


def check_deployed_client_dp(config: RunConfig) -> None:
    """Refuses client-level DP settings a deployment cannot run safely (the Aggregator and every Site check them).

    Raises:
        ConfigError: the shared-key mode (no single party can add central noise), or secure
            aggregation without its authenticated mode (the server could swap keys and read one
            site's update with only that site's noise share).

    Adaptive clipping, where the server announces S each round, runs with every protection that
    allows client-level DP: under CKKS each site signs the S it clipped to and the key holder checks
    it against its own; under secure aggregation each site binds its pairwise masks to the S and site
    count it planned its noise share for, so sites told different values produce no usable sum.
    """
    fed = config.federation
    if fed.client_dp is None:
        return
    if fed.protection is ProtectionKind.SHARED_KEY:
        raise ConfigError(
            "federation.client_dp", "set",
            "client-level DP needs protection = \"plaintext\", \"ckks\" or \"secagg\"; in the shared-key mode every "
            "site can decrypt the sum, so no single party can add central noise before anyone sees it",
        )
    if fed.protection is ProtectionKind.SECAGG and not fed.secagg.authenticated:
        raise ConfigError(
            "federation.secagg.authenticated", False,
            "deployed secure aggregation with client-level DP needs authenticated = true: without signed keys the server "
            "can swap a site's peers' keys and read its update with only that site's own noise share",
        )


def _secagg_noise_round(request: Request, config: RunConfig, participants: int, dim: int):
    """(S, the client-level plan, the round's shares and encoding) of a secure-aggregation train request.

    Raises:
        ConfigError: no encoding fits the configured bits for this many sites.
        MessageError: the request's clip norm is not the run's.
    """
    from privfl.client_dp import deployed_secagg_noise_ratio, secagg_round

    fed = config.federation
    assert fed.client_dp is not None  # asked for only under client-level DP
    clip_norm = _client_clip_norm(request, config)
    assert clip_norm is not None  # set under client-level DP
    num_sites = request.fields["num_sites"]  # checked before
    plan = client_level_plan(config, num_sites)
    noise_round = secagg_round(
        plan, noise_ratio=deployed_secagg_noise_ratio(fed.secagg, num_sites), participants=participants,
        clip_norm=clip_norm, dim=dim, adaptive=fed.client_dp.adaptive, num_sites=num_sites,
        rounds=fed.rounds, delta=fed.client_dp.delta, bits=fed.secagg.bits,
    )
    return clip_norm, plan, noise_round


def _client_clip_norm(request: Request, config: RunConfig) -> float | None:
    """The clip norm S a train request asks for under client-level DP (None without it).

    With fixed clipping S is the run config's and a request naming another is refused. Under
    adaptive clipping the aggregator announces S each round; what keeps a malicious server from
    announcing a larger S than the noise is planned for is the protocol's binding: under CKKS the
    site signs the S it clipped to into its contribution, and the key holder decrypts no sum signed
    for another S than it noises for; under secure aggregation the site's noise share is planned for
    the S it was told and its pairwise masks are bound to it, so sites told different S produce no
    usable sum (docs/deployment.md).

    Raises:
        ConfigError: client-level DP under a protection deployments do not support it with.
        MessageError: the request's clip norm is missing, not a finite number > 0, or not the config's.
    """
    import math

    client_dp = config.federation.client_dp
    if client_dp is None:
        return None
    check_deployed_client_dp(config)
    clip_norm = request.fields.get("clip_norm")
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) or not (math.isfinite(clip_norm) and clip_norm > 0):
        raise MessageError("train request lacks a valid client-level clip norm")
    if not client_dp.adaptive and clip_norm != client_dp.clip_norm:
        raise MessageError(f"train request asks for clip norm {clip_norm}; the run's fixed clip norm is {client_dp.clip_norm}")
    return float(clip_norm)


class _ClipNormMismatch(ProtocolAbort):
    """A decryption request names another clip norm than the key holder's (which it carries)."""

    def __init__(self, reason: str, clip_norm: float) -> None:
        super().__init__(reason)
        self.clip_norm = clip_norm


def _run_note(run: str) -> str:
    """The note a site's ledger charge carries: the run it trained for."""
    return f"run {run}"


def _trained_rounds(ledger, name: str, run: str) -> list[int]:
    """The rounds of ``run`` this site's ledger charged it for (later notes are appended after "; ")."""
    from privfl.accounting import LedgerStatus

    note = _run_note(run)
    return [
        entry.round
        for entry in ledger.entries
        if entry.client == name and entry.status is LedgerStatus.TRAINED and (entry.note == note or entry.note.startswith(note + ";"))
    ]


def _shaped(dataset, input_shape):
    """A CSV-loaded (flat) dataset reshaped to the model's input shape (e.g. images), when it differs."""
    from privfl.data import ArrayDataset

    if not isinstance(dataset, ArrayDataset) or not isinstance(input_shape, list):
        return dataset
    shape = tuple(input_shape)
    if tuple(dataset.features.shape[1:]) == shape or int(np.prod(shape)) != int(np.prod(dataset.features.shape[1:])):
        return dataset
    return ArrayDataset(dataset.features.numpy().reshape((len(dataset), *shape)), dataset.targets.numpy())


@functools.lru_cache(maxsize=8)
def _parse_config(text: str) -> RunConfig:
    """The run config a TOML text describes (cached: a site parses its run's config on every request;
    the config is a frozen dataclass, shared safely).

    Raises:
        MessageError: not TOML (ConfigError: not a valid run config).
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        import tomli as tomllib
    try:
        return config_from_dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise MessageError(f"run config is not TOML: {exc}") from None


def _signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, modification time) of a file, or None if it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _identity_raw(state_dir: Path) -> bytes:
    """A state directory's long-term Ed25519 private key (made on first use, from the OS CSPRNG)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    path = state_dir / IDENTITY_FILE
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        raw = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=f".{IDENTITY_FILE}-")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(raw)
                handle.flush()
                os.fsync(handle.fileno())
            # link, not replace: of two processes making the key at once (the other sites of a
            # simulation read the key holder's), the first one wins and the other reads its key.
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            except OSError:
                # A file system without hard links: an exclusive create (the first process wins here too).
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    pass
                else:
                    with os.fdopen(fd, "wb") as handle:
                        handle.write(raw)
                        handle.flush()
                        os.fsync(handle.fileno())
            fsync_directory(state_dir)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raw = path.read_bytes()
    if len(raw) != 32:
        raise ConfigError("identity.key", str(path), "is not a 32-byte Ed25519 key")
    return raw


def _plain_name(name: object) -> bool:
    """Whether ``name`` can name a site: a non-empty string of printable characters, at most 256 bytes, that is
    no path but itself."""
    return (
        isinstance(name, str) and bool(name) and name.isprintable() and len(name.encode("utf-8", errors="replace")) <= 256
        and name not in (".", "..", "server", "aggregator") and not any(c in name for c in "/\\\0")
    )


def load_peer_keys(path: str | os.PathLike[str]) -> dict[str, str]:
    """A peers file: a JSON object of site name -> identity public key (64 hex digits), given out of band.

    Raises:
        ConfigError: the file cannot be read or is not such an object.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError("peers", str(path), f"cannot be read as JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ConfigError("peers", str(path), "must be a JSON object of site name -> 64 hex digits")
    return data


def site_identity(state_dir: str | os.PathLike[str]) -> bytes:
    """The identity public key (32 bytes) of the site whose state directory this is; made if missing.

    Public: hand the key holder's to the other sites out of band (``key_holder_key``), or compare a
    site's with what the server presents for it.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(_identity_raw(Path(state_dir))).public_key().public_bytes_raw()


@overload
def _public_key_bytes(value: None, *, field: str = ...) -> None: ...
@overload
def _public_key_bytes(value: bytes | str, *, field: str = ...) -> bytes: ...
def _public_key_bytes(value: bytes | str | None, *, field: str = "key_holder_key") -> bytes | None:
    """An Ed25519 public key given as 32 bytes or 64 hex digits (ConfigError naming ``field`` otherwise)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
            raise ConfigError(field, value, "must be 64 hex digits (an Ed25519 public key)")
        value = bytes.fromhex(text)
    if not isinstance(value, (bytes, bytearray)) or len(value) != 32:
        raise ConfigError(field, f"<{type(value).__name__}>", "must be 32 bytes (an Ed25519 public key)")
    from privfl.protocols.ckks_signing import load_public_key

    load_public_key("key-holder", bytes(value))
    return bytes(value)


def _write_secret(path: Path, data: bytes) -> None:
    """Writes a secret file readable by its owner only (0600), durably."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
