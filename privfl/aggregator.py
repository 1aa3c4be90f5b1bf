"""The Aggregator: client sampling, the protection protocol's server half, the global model and the run
history, talking to Sites only through request/reply bytes over a :class:`SiteChannel`.

The same Aggregator runs in one process over :class:`LocalSites` (every Site an object in memory) and
across machines over Flower (``privfl.flower``), where each Site is a separate process at its own
site. It never holds a site's data, ledger, identity key or (under CKKS or secure aggregation) any
single site's update: under CKKS it holds ciphertexts it cannot decrypt and forwards the checked ones
to the key-holder site; under secure aggregation it holds masked vectors and unmasks only their sum.
What each site spent is what the site reported from its own ledger.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from privfl.client_dp import ClientLevelRun, central_noise, plan_client_dp, secagg_mask_context, split_release
from privfl.client_dp import SecAggRound as NoiseRound
from privfl.config import ProtectionKind, RunConfig
from privfl.envelope import Request, Status, Step, decode_reply, encode_request
from privfl.errors import ConfigError, MessageError, ProtocolAbort
from privfl.plan import sample_sites
from privfl.results import RoundRecord, RunSummary, SiteSummary
from privfl.rundir import AGGREGATOR_FILE
from privfl.site import (
    SiteRole,
    _plain_name,
    check_deployed_client_dp,
    check_weight_bounds,
    quantizer_for,
    secagg_weight_bound,
)

if TYPE_CHECKING:
    from privfl.protocols.base import Transport

__all__ = ["AGGREGATOR_FILE", "Aggregator", "DeploymentResult", "LocalSites", "SiteChannel"]


log = logging.getLogger("privfl")


class SiteChannel(Protocol):
    """Carries the aggregator's requests to sites and their replies back.

    ``nodes`` lists opaque node addresses; ``exchange`` sends each addressed node its request and
    returns the replies that arrived within ``timeout`` seconds (a node missing from the result has
    dropped out at that step).
    """

    def nodes(self) -> list[str]: ...

    def exchange(self, requests: Mapping[str, bytes], *, timeout: float) -> dict[str, bytes]: ...


class LocalSites:
    """The in-memory channel: every Site is an object in this process (node address = site name).

    Args:
        sites: the sites.
        alter: optional ``f(node, step_bytes_in, reply) -> reply | None`` to lose or corrupt replies
            (tests, fault injection).
        transport: optional :class:`~privfl.protocols.base.Transport` that carries every message, as the
            in-process ``Federation`` takes one: each request as ``deliver("server", site, step, bytes)`` and
            each reply as ``deliver(site, "server", step, bytes)``, where ``step`` is the request's
            :class:`~privfl.envelope.Step` value (``"train"``, ``"secagg-relay"``, ...). ``None`` from
            ``deliver`` loses the message: a lost request or reply drops that site at that step; altered
            bytes reach the other side as they are (a site refuses a malformed request, the aggregator
            drops a site whose reply is malformed). Applied before ``alter``.
    """

    def __init__(
        self,
        sites,
        *,
        alter: Callable[[str, bytes, bytes], bytes | None] | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.sites = {site.name: site for site in sites}
        self.alter = alter
        self.transport = transport

    def nodes(self) -> list[str]:
        return list(self.sites)

    def exchange(self, requests: Mapping[str, bytes], *, timeout: float) -> dict[str, bytes]:
        replies = {}
        for node, payload in requests.items():
            reply = self._carry(node, payload)
            if reply is not None and self.alter is not None:
                reply = self.alter(node, payload, reply)
            if reply is not None:
                replies[node] = reply
        return replies

    def _carry(self, node: str, payload: bytes) -> bytes | None:
        """One request to ``node`` and its reply, each through the transport when there is one."""
        if self.transport is None:
            return self.sites[node].handle(payload)
        from privfl.protocols.base import SERVER

        step = _step_name(payload)
        delivered = self.transport.deliver(SERVER, node, step, payload)
        if delivered is None:
            return None
        reply = self.sites[node].handle(delivered)
        return self.transport.deliver(node, SERVER, step, reply)


def _step_name(payload: bytes) -> str:
    """The step a request names, for a transport's bookkeeping (``"unknown"`` for bytes that do not parse)."""
    from privfl.envelope import decode_request

    try:
        return decode_request(payload).step.value
    except MessageError:
        return "unknown"


@dataclass(slots=True)
class DeploymentResult:
    """What :meth:`Aggregator.run` returns.

    Attributes:
        parameters: the final global model, flattened (float32).
        history: one record per round (who was sampled, trained, skipped, dropped; accuracy; epsilons reported).
        summary: the run summary (also written to ``summary.json``).
        out_dir: where files were written (None if nowhere).
    """

    parameters: np.ndarray
    history: list[RoundRecord]
    summary: RunSummary
    out_dir: Path | None = None


@dataclass(slots=True)
class _SiteInfo:
    node: str
    name: str
    role: str
    identity: str
    epsilon: float | None
    budget: float | None
    exhausted: bool = False
    rounds_trained: int = 0
    rounds_skipped: int = 0
    rounds_dropped: int = 0
    uploads: list[int] = field(default_factory=list)


class Aggregator:
    """Runs a federation's server side against sites reached through a :class:`SiteChannel`.

    Args:
        config_text: the run config as TOML (the schema of ``privfl run``); it is sent to every site.
        model_fn: builds the model (seeded by ``federation.seed``); None builds the config's bundled
            model for ``input_shape`` and ``num_classes``.
        input_shape, num_classes: the model's input shape and class count (announced to the sites).
        test_set: public held-out data the global model is evaluated on after every round (optional).
        step_timeout: seconds a site has to answer one protocol step before it counts as dropped.
        progress: show a progress bar.
        record: write what the server observes (each site's protocol messages as they arrived, what
            it sends in the protocol steps, the key holder's release) to ``out_dir/observed`` in the
            format of ``privfl run --record``, for ``privfl attack --run`` (:mod:`privfl.recording`).
            Under plaintext that stores every site's update; it is off by default.

    Raises:
        ConfigError: the config is invalid or asks for something deployments do not support yet.
    """

    def __init__(
        self,
        config_text: str,
        *,
        model_fn: Callable[[], Any] | None = None,
        input_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
        test_set=None,
        step_timeout: float = 600.0,
        progress: bool = True,
        record: bool = False,
    ) -> None:
        from privfl.site import _parse_config

        try:
            self.config: RunConfig = _parse_config(config_text)
        except MessageError as exc:
            raise ConfigError("config", "<toml>", exc.reason) from exc
        check_deployed_client_dp(self.config)
        check_weight_bounds(self.config)
        if model_fn is None and (input_shape is None or num_classes is None):
            raise ConfigError("input_shape", input_shape, "give model_fn, or input_shape and num_classes for the bundled model")
        if not (isinstance(step_timeout, (int, float)) and step_timeout > 0):
            raise ConfigError("step_timeout", step_timeout, "must be a number of seconds > 0")
        self.config_text = config_text
        self.model_fn = model_fn
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)
        self.num_classes = num_classes
        self.test_set = test_set
        self.step_timeout = float(step_timeout)
        self.progress = progress
        self.record = bool(record)
        self._recorder: Any = None
        self.run_id = secrets.token_hex(16)
        self._recorded_sites: list[str] | None = None
        self._pending: int | None = None
        # The CKKS key holder's S for the next round, as it reported it (adaptive client-level DP).
        self._holder_clip_norm: float | None = None
        self._refusals: dict[str, dict[str, Any]] = {}  # the last exchange's refusals, by site

    # -- model ---------------------------------------------------------------------------------------
    def _initial_model(self):
        from privfl.site import seeded_model

        return seeded_model(self.config, self.model_fn, self.input_shape, self.num_classes)

    def _model_fields(self) -> dict[str, Any]:
        if self.input_shape is None:
            return {}
        assert self.num_classes is not None  # set together with input_shape
        return {"input_shape": list(self.input_shape), "num_classes": int(self.num_classes)}

    # -- messaging -----------------------------------------------------------------------------------
    def _exchange(
        self, channel: SiteChannel, step: Step, round_index: int, requests: Mapping[str, tuple[dict[str, Any], tuple[bytes, ...]]]
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Sends each site (by name) its request; returns (name -> Reply, name -> reason it dropped)."""
        by_name = {info.name: info for info in self._sites.values()}
        payloads = {
            by_name[name].node: encode_request(Request(self.run_id, step, round_index, name, fields, parts))
            for name, (fields, parts) in requests.items()
        }
        if self._recorder is not None:
            self._record_requests(step, round_index, requests)
        t0 = time.perf_counter()
        raw = channel.exchange(payloads, timeout=self.step_timeout)
        self._step_seconds[step.value] = self._step_seconds.get(step.value, 0.0) + time.perf_counter() - t0
        replies, dropped = {}, {}
        self._refusals = {}
        for name in requests:
            node = by_name[name].node
            if node not in raw:
                dropped[name] = f"{step.value}: no reply within {self.step_timeout:g} s"
                continue
            try:
                reply = decode_reply(raw[node], run=self.run_id, step=step, round_index=round_index, site=name)
            except MessageError as exc:
                dropped[name] = f"{step.value}: malformed reply ({exc.reason})"
                continue
            if reply.status is Status.REFUSED:
                dropped[name] = f"{step.value}: refused ({reply.reason})"
                self._refusals[name] = reply.fields
                continue
            replies[name] = reply
            if self._recorder is not None and reply.parts:
                self._record_reply(step, name, reply.parts[0])
            self._upload[name] = self._upload.get(name, 0) + len(raw[node])
            seconds = _number(reply.fields.get("site_seconds"))
            if seconds is not None:
                key = f"{step.value}@sites(max)"
                self._step_seconds[key] = max(self._step_seconds.get(key, 0.0), seconds)
        return replies, dropped

    # -- the recorded server view --------------------------------------------------------------------
    def _record_requests(self, step: Step, round_index: int, requests: Mapping[str, tuple[dict[str, Any], tuple[bytes, ...]]]) -> None:
        """Records the protocol messages the server sends at ``step`` (secure-aggregation steps, the aggregate to decrypt)."""
        from privfl.protocols.base import KEY_HOLDER, SERVER

        sent = _RECORDED_REQUESTS.get(step)
        if sent is None:
            return
        for name, (_, parts) in requests.items():
            receiver = KEY_HOLDER if step in _DECRYPT_STEPS else name
            if parts:
                self._recorder.deliver(SERVER, receiver, sent, parts[0])

    def _record_reply(self, step: Step, name: str, message: bytes) -> None:
        """Records a site's protocol message as the server received it, named as in an in-process recording."""
        from privfl.protocols.base import KEY_HOLDER, SERVER

        if step is Step.TRAIN:
            kind = "advertise" if self.config.federation.protection is ProtectionKind.SECAGG else "update"
        else:
            kind = _RECORDED_REPLIES.get(step, step.value)
        # The key holder's release reaches the sites through the server (recorded as sent by the key holder).
        sender = KEY_HOLDER if step in _DECRYPT_STEPS else name
        self._recorder.deliver(sender, SERVER, kind, message)

    def _hello(self, channel: SiteChannel) -> None:
        nodes = channel.nodes()
        if not nodes:
            raise ConfigError("sites", 0, "no site is connected")
        payloads = {
            node: encode_request(Request(self.run_id, Step.HELLO, 0, f"node:{node}", {"config": self.config_text}, ()))
            for node in nodes
        }
        # The site's name is not known before it answers: hello is addressed to any name, and the
        # site answers with its own; the aggregator then addresses it by that name.
        raw = channel.exchange(payloads, timeout=self.step_timeout)
        self._sites: dict[str, _SiteInfo] = {}
        self._hello_parts: dict[str, tuple[bytes, ...]] = {}
        self._hello_fields: dict[str, dict[str, Any]] = {}
        for node, reply in raw.items():
            try:
                name = _reply_name(reply)
                parsed = decode_reply(reply, run=self.run_id, step=Step.HELLO, round_index=0, site=name)
            except MessageError as exc:
                log.warning("node %s: malformed hello reply (%s); left out of the run", node, exc.reason)
                continue
            if parsed.status is not Status.OK:
                log.warning("node %s (%s) refused the run: %s", node, name, parsed.reason)
                continue
            if not _plain_name(name):
                # A name is a path at the server (the recorded view) and in audits: only plain names join.
                log.warning("node %s answered with the name %r, which is not a plain site name; left out of the run", node, name)
                continue
            if any(info.name == name for info in self._sites.values()):
                raise ConfigError("sites", name, "two nodes claim the same site name")
            identity = parsed.fields.get("identity")
            if not (isinstance(identity, str) and len(identity) == 64 and all(c in "0123456789abcdef" for c in identity)):
                log.warning("node %s (%s) sent no valid identity key; left out of the run", node, name)
                continue
            f = parsed.fields
            self._hello_parts[name] = parsed.parts
            self._hello_fields[name] = dict(parsed.fields)
            self._sites[node] = _SiteInfo(
                node=node, name=name, role=str(f.get("role", "site")), identity=str(f.get("identity", "")),
                epsilon=_number(f.get("epsilon")), budget=_number(f.get("budget")),
            )
        if not self._sites:
            raise ConfigError("sites", len(nodes), "no site accepted the run")

    def _ckks_setup(self) -> None:
        holders = [info for info in self._sites.values() if info.role == SiteRole.KEY_HOLDER.value]
        if len(holders) != 1:
            raise ConfigError("role", len(holders), "CKKS needs exactly one site with role = \"key-holder\"")
        self._key_holder = holders[0].name
        if self._key_holder not in self._hello_parts or len(self._hello_parts[self._key_holder]) != 3:
            raise ProtocolAbort("the CKKS key holder sent no signed public context")
        # The signature is the sites' to check (against the key holder's key they hold): the server
        # only forwards it.
        self._ckks_public, self._ckks_run_id, self._ckks_signature = self._hello_parts[self._key_holder]
        from privfl.protocols.ckks import _load_context

        if len(self._ckks_run_id) != 16 or _load_context(self._ckks_public).has_secret_key():
            raise ProtocolAbort("the key holder's context holds its secret key or its run id is malformed; refusing it")
        # Sites get the public context with their first train request (self._has_context).
        self._has_context: set[str] = set()

    # -- the run -------------------------------------------------------------------------------------
    def run(self, channel: SiteChannel, out_dir: str | Path | None = None, *, resume: bool = False) -> DeploymentResult:
        """Runs every round of the config against the sites on ``channel`` (or the remaining ones, with ``resume``).

        Args:
            channel: how the sites are reached.
            out_dir: where history.json, the checkpoints and summary.json go (None: nowhere).
            resume: continue the unfinished run in ``out_dir`` after its last recorded round, under
                its run id, with the same config and the same sites. A round the interrupted server
                had started but not recorded is not asked again (it could be released twice, with
                other sites): it is recorded as interrupted and, under client-level DP, charged.

        Raises:
            ConfigError: no site joined, two claim one name, CKKS without exactly one key holder,
                ``out_dir`` already holds a run (without ``resume``), or there is no unfinished run
                there to resume, it was made with another config, or other sites answered.
            RunLockedError: another process runs in ``out_dir`` now.
        """
        from privfl.rundir import RunLock

        out = Path(out_dir) if out_dir is not None else None
        if out is None:
            if resume:
                raise ConfigError("resume", True, "needs the out_dir of the run to resume")
            return self._run(channel, None, resume=False)
        out.mkdir(parents=True, exist_ok=True)
        with RunLock(out):
            return self._run(channel, out, resume=resume)

    def _start(self, out: Path | None, resume: bool) -> list[RoundRecord]:
        """Checks ``out`` and records the run there (fresh), or loads the history to continue (resume)."""
        import hashlib

        from privfl.rundir import (
            CONFIG_FILE,
            HISTORY_FILE,
            RUN_FILE,
            SUMMARY_FILE,
            durable_write_bytes,
            durable_write_json,
            load_history,
        )

        if out is None:
            return []
        marker = out / AGGREGATOR_FILE
        digest = hashlib.sha256(self.config_text.encode()).hexdigest()
        if not resume:
            if marker.exists() or (out / SUMMARY_FILE).exists() or (out / HISTORY_FILE).exists():
                raise ConfigError("out_dir", str(out), "already holds a run; choose a new directory, or resume it")
            durable_write_json(marker, {"run": self.run_id, "config_sha256": digest, "sites": None})
            # The run's public identity, in the layout of privfl run's run.json: privfl.load_model and
            # privfl attack --run read the learning rates and the seed from it. The sites' data stays
            # with them: "clients" only names them.
            durable_write_json(out / RUN_FILE, self._identity())
            if not (out / CONFIG_FILE).exists():
                # As privfl run keeps it: `privfl export` and `privfl attack --run` rebuild the model from it.
                durable_write_bytes(out / CONFIG_FILE, self.config_text.encode())
            return []
        if (out / SUMMARY_FILE).exists():
            raise ConfigError("resume", str(out), "the run there has finished (summary.json exists); nothing to resume")
        if not marker.exists():
            raise ConfigError("resume", str(out), f"holds no deployed run to resume ({AGGREGATOR_FILE} is missing)")
        try:
            recorded = json.loads(marker.read_text())
            run_id, config_digest = recorded["run"], recorded["config_sha256"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(AGGREGATOR_FILE, str(marker), f"is corrupt ({exc})") from None
        if config_digest != digest:
            raise ConfigError("resume", str(out), "the run there was made with another config; resume it with the same one")
        if not (isinstance(run_id, str) and len(run_id) == 32):
            raise ConfigError(AGGREGATOR_FILE, str(marker), "holds no valid run id")
        self.run_id = run_id
        self._recorded_sites = recorded.get("sites")
        pending = recorded.get("pending")
        self._pending = pending if isinstance(pending, int) and not isinstance(pending, bool) else None
        return load_history(out / HISTORY_FILE)

    def _run(self, channel: SiteChannel, out: Path | None, *, resume: bool) -> DeploymentResult:
        from privfl.federation import _Progress, _round_log_line
        from privfl.rundir import (
            HISTORY_FILE,
            SUMMARY_FILE,
            HistoryWriter,
            durable_write_json,
            load_checkpoint,
            save_checkpoint,
        )
        from privfl.training import evaluate, flatten_parameters, load_flat_parameters, resolve_device

        self._recorded_sites = None
        self._pending = None
        if self.record and out is None:
            raise ConfigError("record", True, "a recording of the server's view needs an out_dir")
        history = self._start(out, resume)
        history_file = None if out is None else HistoryWriter(out / HISTORY_FILE)
        if self.record:
            from privfl.recording import OBSERVED_DIR, ServerViewRecorder

            assert out is not None  # checked above
            self._recorder = ServerViewRecorder(out / OBSERVED_DIR)
        started = time.perf_counter()
        fed = self.config.federation
        self._upload: dict[str, int] = {}
        self._step_seconds: dict[str, float] = {}
        self._hello(channel)
        if fed.protection is ProtectionKind.CKKS:
            self._ckks_setup()
        if fed.protection is ProtectionKind.SHARED_KEY:
            decryptors = [info.name for info in self._sites.values() if info.role == SiteRole.KEY_HOLDER.value]
            if len(decryptors) != 1:
                raise ConfigError("role", len(decryptors), "the shared-key mode needs exactly one site with role = \"key-holder\" to decrypt")
            self._key_holder = decryptors[0]
            reported = [self._hello_fields[info.name].get("key_id") for info in self._sites.values()]
            key_ids = {k for k in reported if isinstance(k, str)}
            if len(key_ids) != 1 or len(reported) != sum(isinstance(k, str) for k in reported):
                raise ConfigError("shared key", len(key_ids), "the sites do not all hold the same shared key (their fingerprints differ)")
        names = sorted(info.name for info in self._sites.values())
        if out is not None:
            self._record_sites(out, names)
        self._setup_client_dp(len(names), history)
        model = self._initial_model()
        params = flatten_parameters(model)
        start = len(history)
        if start:
            assert out is not None  # a history is loaded only from out_dir
            params = load_checkpoint(out, start - 1, params.size)
            self._restore_counts(history)
        if out is not None and self._pending == start and start < fed.rounds:
            # The crashed server had started this round: sites may have trained (and been charged)
            # and, under secure aggregation, the server may have unmasked a sum. Asking again could
            # make a second release of the round, with other sites (the sample is secret): the round
            # is recorded as interrupted, charged, and not retried.
            record = self._round_record(start, [])
            record["aborted"] = (
                "interrupted: the server stopped during this round; not retried (a site that trained in it was "
                "charged by its own ledger; under client-level DP the round counts as a release)"
            )
            history.append(self._close(record, time.perf_counter()))
            save_checkpoint(out, start, params)
            assert history_file is not None  # made with out
            history_file.write(history)
            start += 1
        if history:
            log.info("resuming run %s at round %d of %d", self.run_id, start, fed.rounds)
        device = resolve_device(fed.device)
        progress = _Progress(fed.rounds, enabled=self.progress, start=start)
        with progress:
            for r in range(start, fed.rounds):
                if self._recorder is not None:
                    self._recorder.begin_round(r, params)
                if out is not None:
                    self._mark_pending(out, r)  # before any site is asked: a resume must not run this round again
                record, params = self._round(channel, r, names, params)
                if self.test_set is not None:
                    load_flat_parameters(model, params)
                    loss, accuracy = evaluate(model, self.test_set, device=device)
                    record["test_loss"], record["test_accuracy"] = _finite(loss), _finite(accuracy)
                history.append(record)
                if out is not None:
                    # The checkpoint first: a recorded round always has its model (resume loads it).
                    save_checkpoint(out, r, params)
                    assert history_file is not None  # made with out
                    history_file.write(history)
                progress.advance(record)
                log.info("%s", _round_log_line(record))
        summary = self._summary(history, len(params), time.perf_counter() - started, device)
        if out is not None:
            durable_write_json(out / SUMMARY_FILE, summary)
        return DeploymentResult(parameters=params, history=history, summary=summary, out_dir=out)

    def _identity(self) -> dict[str, Any]:
        from privfl.federation import public_config

        federation = public_config(self.config.federation)
        federation.pop("rounds", None)
        return {"training": public_config(self.config.training), "federation": federation, "clients": {}}

    @staticmethod
    def _round_record(r: int, sampled: list[str]) -> RoundRecord:
        return {
            "round": r, "sampled": sampled, "trained": [], "contributors": [], "skipped": {}, "dropped": {},
            "aborted": None, "train_loss": None, "test_loss": None, "test_accuracy": None, "upload_bytes": {},
            "epsilon": {}, "max_epsilon": None, "seconds": 0.0,  # set by _close
        }

    def _mark_pending(self, out: Path, r: int) -> None:
        """Records durably that round ``r`` is starting (aggregator.json ``pending``)."""
        from privfl.rundir import durable_write_json

        marker = out / AGGREGATOR_FILE
        recorded = json.loads(marker.read_text())
        recorded["pending"] = r
        durable_write_json(marker, recorded)

    def _record_sites(self, out: Path, names: list[str]) -> None:
        """Pins the run's sites in ``out`` (fresh run); a resumed run must reach the same ones."""
        from privfl.rundir import RUN_FILE, durable_write_json

        marker = out / AGGREGATOR_FILE
        if self._recorded_sites is None:
            recorded = json.loads(marker.read_text())
            recorded["sites"] = names
            durable_write_json(marker, recorded)
            identity = self._identity()
            identity["clients"] = {name: "held by the site" for name in names}
            durable_write_json(out / RUN_FILE, identity)
        elif sorted(self._recorded_sites) != names:
            missing = sorted(set(self._recorded_sites) - set(names))
            extra = sorted(set(names) - set(self._recorded_sites))
            raise ConfigError(
                "resume", str(out),
                f"the run's sites must answer again (missing: {', '.join(missing) or 'none'}; new: {', '.join(extra) or 'none'}): "
                "sampling, seeds and client-level DP were planned for them",
            )

    def _restore_counts(self, history: list[RoundRecord]) -> None:
        """Each site's round counts and uploads, from the recorded rounds of a resumed run."""
        by_name = {info.name: info for info in self._sites.values()}
        for record in history:
            for name in record["trained"]:
                by_name[name].rounds_trained += 1
            for name in record["skipped"]:
                by_name[name].rounds_skipped += 1
            for name in record["dropped"]:
                by_name[name].rounds_dropped += 1
            for name, count in record["upload_bytes"].items():
                by_name[name].uploads.append(count)

    def _round(self, channel: SiteChannel, r: int, names: list[str], params: np.ndarray) -> tuple[RoundRecord, np.ndarray]:
        t0 = time.perf_counter()
        fed = self.config.federation
        by_name = {info.name: info for info in self._sites.values()}
        sampled = sample_sites(fed, r, names)
        record = self._round_record(r, sampled)
        self._upload = {}
        self._step_seconds = {}
        self._unclipped: float | None = None
        self._holder_clip_norm = None
        needed = _min_participants(self.config)
        hopeful = [n for n in sampled if not by_name[n].exhausted]
        for name in sampled:
            if by_name[name].exhausted:
                # Its own ledger said so last time it answered; asking again would change nothing.
                record["skipped"][name] = "budget exhausted (the site's last answer); not asked"
                by_name[name].rounds_skipped += 1
        if len(hopeful) < needed:
            record["aborted"] = (
                f"round skipped before training: {len(hopeful)} of {len(sampled)} sampled sites can train, "
                f"{fed.protection.value} needs at least {needed}; nobody was asked to train"
            )
            return self._close(record, t0), params
        sampled = hopeful
        base: dict[str, Any] = {"index": None, "num_sites": len(names), "participants": len(sampled), **self._model_fields()}
        dim = len(params)
        if self._client_run is not None:
            # Sites clip to S; under adaptive clipping each appends its centred bit (one more value).
            base["clip_norm"] = self._client_run.clip_norm
            dim += int(self._client_run.config.adaptive)
        secagg = None
        protocol_part = b""
        if fed.protection is ProtectionKind.SECAGG:
            identities = {info.name: bytes.fromhex(info.identity) for info in self._sites.values()}
            secagg = _SecAggRound(
                self.config, r, sampled, dim, noise=self._secagg_noise(len(sampled), len(names), len(params)), identities=identities,
                mask_context=b"" if self._client_run is None else secagg_mask_context(self._client_run.clip_norm, len(names)),
            )
            protocol_part = secagg.params_bytes
        model_bytes = params.astype("<f4").tobytes()
        index = {name: i for i, name in enumerate(names)}  # a site's index is its position in names
        requests = {}
        for n in sampled:
            parts: tuple[bytes, ...] = (model_bytes, protocol_part)
            if fed.protection is ProtectionKind.CKKS and n not in self._has_context:
                parts += (self._ckks_public, self._ckks_run_id, self._ckks_signature)
            requests[n] = ({**base, "index": index[n]}, parts)
        replies, dropped = self._exchange(channel, Step.TRAIN, r, requests)
        if fed.protection is ProtectionKind.CKKS:
            self._has_context.update(name for name, reply in replies.items() if reply.status is Status.OK)
        record["dropped"].update(dropped)
        messages: dict[str, bytes] = {}
        for name, reply in replies.items():
            info = by_name[name]
            info.epsilon = _number(reply.fields.get("epsilon"))
            info.budget = _number(reply.fields.get("budget"))
            info.exhausted = bool(reply.fields.get("exhausted"))
            if reply.status is Status.SKIPPED:
                record["skipped"][name] = reply.reason
                info.rounds_skipped += 1
                continue
            if len(reply.parts) != 1:
                record["dropped"][name] = "train: reply carries no protocol message"
                continue
            info.rounds_trained += 1
            record["trained"].append(name)
            messages[name] = reply.parts[0]
        # Sites report no training loss (an un-noised statistic of their data): train_loss stays None.
        try:
            average, contributors, rejected = self._aggregate(
                channel, r, messages, dim=dim, num_sites=len(names), participants=len(sampled), secagg=secagg, size=len(params)
            )
            record["dropped"].update(rejected)
            record["contributors"] = list(contributors)
            params = (params + fed.server_learning_rate * average).astype(np.float32)
        except ProtocolAbort as exc:
            record["aborted"] = str(exc)
            for name in record["trained"]:
                record["dropped"].setdefault(name, "round aborted")
            log.warning("round %d aborted: %s", r, exc)
        for name in record["dropped"]:
            if name in by_name:
                by_name[name].rounds_dropped += 1
        record["upload_bytes"] = dict(self._upload)
        for name, count in self._upload.items():
            by_name[name].uploads.append(count)
        return self._close(record, t0), params

    def _aggregate(
        self, channel: SiteChannel, r: int, messages: dict[str, bytes], *, dim: int, num_sites: int, participants: int, secagg, size: int
    ):
        """The protocol's server half for the round: (average update, contributors, site -> why rejected).

        Raises:
            ProtocolAbort: the round cannot be released.
        """
        fed = self.config.federation
        if fed.protection is ProtectionKind.SHARED_KEY:
            return self._shared_key(channel, r, messages, size, participants)
        if fed.protection is ProtectionKind.SECAGG:
            assert secagg is not None  # set for secure-aggregation rounds
            average, weight, contributors, rejected = secagg.finish(self, channel, messages)
        elif fed.protection is ProtectionKind.PLAINTEXT:
            average, weight, contributors, rejected = self._plaintext(r, messages, dim)
        else:
            average, weight, contributors, rejected = self._ckks(channel, r, messages, dim, num_sites)
        if self._client_run is not None:
            # DP-FedAvg: the sum arrived noised; averaged over the fixed denominator.
            average, self._unclipped = split_release(
                average * weight, dim=size, plan=self._client_run.plan, adaptive=self._client_run.config.adaptive
            )
        return average, contributors, rejected

    def _setup_client_dp(self, num_sites: int, history: list[RoundRecord]) -> None:
        """The run's client-level DP state: its plan, and (resumed) the releases already charged and S."""
        fed = self.config.federation
        self._client_run: ClientLevelRun | None = None
        self._tail_delta = 0.0
        if fed.client_dp is None:
            return
        plan = plan_client_dp(fed.client_dp, num_clients=num_sites, client_fraction=fed.client_fraction, rounds=fed.rounds)
        self._client_run = ClientLevelRun(fed.client_dp, plan)
        # Resumed: every recorded round was one charged release.
        self._client_run.resume([record.get("client_level") for record in history])
        if fed.protection is ProtectionKind.CKKS:
            # The key holder's S counts (it may have released the interrupted round): announced from the start.
            self._holder_clip_norm = _number(self._hello_fields.get(self._key_holder, {}).get("clip_norm"))
            self._adopt_holder_clip_norm(None)

    def _adopt_holder_clip_norm(self, record: RoundRecord | None) -> None:
        """Under CKKS with adaptive clipping the key holder's S is the one that counts (it noises for it and
        checks that every contribution was signed for it): the next round announces it."""
        holder = self._holder_clip_norm
        run = self._client_run
        if run is None or not run.config.adaptive or self.config.federation.protection is not ProtectionKind.CKKS:
            return
        if holder is None or not (math.isfinite(holder) and holder > 0):
            return
        if holder != run.clip_norm:
            if not math.isclose(holder, run.clip_norm, rel_tol=1e-6):
                when = "at the start" if record is None else f"after round {record['round']}"
                log.warning("%s: the key holder's clip norm %r replaces the aggregator's %r", when, holder, run.clip_norm)
            run.clip_norm = holder
            level = None if record is None else record["client_level"]
            if level is not None:
                level["next_clip_norm"] = holder

    def _client_level_delta(self) -> float:
        """The configured client-level delta, plus (secure aggregation) the tail in which a share could clip."""
        assert self._client_run is not None  # asked for only under client-level DP
        return self._client_run.config.delta + self._tail_delta

    def _close(self, record: RoundRecord, t0: float) -> RoundRecord:
        epsilons = {info.name: info.epsilon for info in self._sites.values()}
        record["epsilon"] = epsilons
        known = [e for e in epsilons.values() if e is not None]
        record["max_epsilon"] = max(known) if known else None
        # Wall seconds of each exchange with the sites (a site's work plus the transport's latency).
        record["step_seconds"] = {step: round(value, 3) for step, value in self._step_seconds.items()}
        if self._client_run is not None:
            # Charged every round, released or not (conservative, as in-process).
            unclipped = self._unclipped if record["contributors"] else None
            record["client_level"] = self._client_run.close_round(unclipped, delta=self._client_level_delta())
            self._adopt_holder_clip_norm(record)
        record["seconds"] = time.perf_counter() - t0
        return record

    # -- protocol server halves ------------------------------------------------------------------------
    def _plaintext(self, r: int, messages: dict[str, bytes], dim: int):
        from privfl.protocols.plaintext import PlaintextServer, decode_aggregate

        # Under client-level DP the plaintext server is the party that first sees the sum: it noises it.
        server = PlaintextServer(dim, self._central_noise(r, dim))
        result = server.aggregate(r, messages)
        rejected = {c: f"update rejected by the server: {why}" for c, why in result.rejected.items()}
        if not result.accepted:
            raise ProtocolAbort(f"round {r}: no valid update among {len(messages)} sites", survivors=0, threshold=1)
        # The released aggregate: noised under client-level DP (server.weighted_sum is the bare sum).
        total, weight = decode_aggregate(r, result.payload, dim)
        return total / weight, weight, result.accepted, rejected

    def _secagg_noise(self, participants: int, num_sites: int, size: int) -> NoiseRound | None:
        """The round's client-level noise shares and derived encoding, as each site derives them."""
        if self._client_run is None:
            return None
        from privfl.client_dp import deployed_secagg_noise_ratio, secagg_round

        fed = self.config.federation
        client_dp = self._client_run.config
        noise = secagg_round(
            self._client_run.plan, noise_ratio=deployed_secagg_noise_ratio(fed.secagg, num_sites),
            participants=participants, clip_norm=self._client_run.clip_norm, dim=size, adaptive=client_dp.adaptive,
            num_sites=num_sites, rounds=fed.rounds, delta=client_dp.delta, bits=fed.secagg.bits,
        )
        # The client-level delta then also covers the tail in which a share could have been clipped.
        self._tail_delta = noise.range.tail_delta
        return noise

    def _central_noise(self, r: int, dim: int):
        if self._client_run is None:
            return None
        return central_noise(
            self._client_run.plan, clip_norm=self._client_run.clip_norm, dim=dim - int(self._client_run.config.adaptive),
            adaptive=self._client_run.config.adaptive, noise_seed=self.config.federation.noise_seed, round_index=r,
        )

    def _ckks(self, channel: SiteChannel, r: int, messages: dict[str, bytes], dim: int, num_sites: int):
        from privfl.protocols.ckks import CkksServer

        cfg = self.config.federation.ckks
        registry = {info.name: bytes.fromhex(info.identity) for info in self._sites.values()}
        # Under client-level DP each site signed the S it clipped to: one signed for another S is rejected here.
        clip_norm = None if self._client_run is None else self._client_run.clip_norm
        server = CkksServer(self._ckks_public, cfg, dim, run_id=self._ckks_run_id, sites=registry, clip_norm=clip_norm)
        result = server.aggregate(r, messages)
        rejected = {c: f"update rejected by the server: {why}" for c, why in result.rejected.items()}
        if len(result.accepted) < cfg.min_contributors:
            raise ProtocolAbort(
                f"round {r}: {len(result.accepted)} valid updates < min_contributors {cfg.min_contributors}; "
                "the key holder decrypts no smaller sum",
                survivors=len(result.accepted), threshold=cfg.min_contributors,
            )
        keys = {name: registry[name] for name in result.accepted}
        fields: dict[str, Any] = {"dim": dim, "sites": {name: key.hex() for name, key in keys.items()}}
        if self._client_run is not None:
            # The key holder noises the sum for the S it tracked itself; it refuses another S.
            fields.update(clip_norm=self._client_run.clip_norm, num_sites=num_sites)
        average, weight = self._released_average(channel, Step.CKKS_DECRYPT, r, fields=fields, result=result, dim=dim)
        return average, weight, result.accepted, rejected

    def _shared_key(self, channel: SiteChannel, r: int, messages: dict[str, bytes], dim: int, participants: int):
        from privfl.protocols.shared_key import RoundEncoding, SharedKeyServer

        cfg = self.config.federation.shared_key
        registry = {info.name: bytes.fromhex(info.identity) for info in self._sites.values()}
        encoding = RoundEncoding.for_round(cfg, dim, participants)
        server = SharedKeyServer(encoding, run_id=bytes.fromhex(self.run_id), sites=registry)
        result = server.aggregate(r, messages)
        rejected = {c: f"update rejected by the server: {why}" for c, why in result.rejected.items()}
        others = len(result.accepted) - (self._key_holder in result.accepted)
        if others < cfg.min_contributors:
            raise ProtocolAbort(
                f"round {r}: {others} valid updates besides the decrypting site's < min_contributors {cfg.min_contributors}; "
                "it decrypts no smaller sum",
                survivors=len(result.accepted), threshold=cfg.min_contributors,
            )
        fields = {"dim": dim, "participants": participants, "sites": {name: registry[name].hex() for name in result.accepted}}
        # The one decrypting site (role key-holder) decrypts the sum for everyone.
        average, _ = self._released_average(channel, Step.SHARED_KEY_DECRYPT, r, fields=fields, result=result, dim=dim)
        return average, result.accepted, rejected

    def _released_average(
        self, channel: SiteChannel, step: Step, r: int, *, fields: dict[str, Any], result, dim: int
    ) -> tuple[np.ndarray, float]:
        """Asks the decrypting site (the key holder) to decrypt the round's aggregate; its checked average and total weight.

        Raises:
            ProtocolAbort: no reply, a sum of other sites than the server accepted, or a malformed release.
        """
        from privfl.protocols.oneshot import decode_average

        name = self._key_holder
        replies, dropped = self._exchange(channel, step, r, {name: (fields, (result.payload,))})
        reply = replies.get(name)
        # The key holder's own S after this round (it moved S if it released; a refusal for another S names
        # its S): adopted for the next round, so a lost reply or a float difference does not stop the run.
        answered = reply.fields.get("next_clip_norm") if reply is not None else self._refusals.get(name, {}).get("clip_norm")
        self._holder_clip_norm = _number(answered)
        if reply is None or len(reply.parts) != 1:
            raise ProtocolAbort(f"round {r}: the key holder {name} did not decrypt: {dropped.get(name, 'malformed reply')}")
        contributors = reply.fields.get("contributors")
        if not isinstance(contributors, list) or tuple(contributors) != tuple(result.accepted):
            raise ProtocolAbort(f"round {r}: the key holder {name} decrypted a sum of other sites than the server accepted")
        try:
            return decode_average(r, reply.parts[0], dim)
        except MessageError as exc:
            raise ProtocolAbort(f"round {r}: the key holder {name}'s release is malformed ({exc.reason})") from exc

    # -- summary -------------------------------------------------------------------------------------
    def _summary(self, history: list[RoundRecord], num_parameters: int, seconds: float, device) -> RunSummary:
        from privfl.federation import public_config
        from privfl.results import run_summary

        clients: dict[str, SiteSummary] = {
            info.name: {
                "epsilon": info.epsilon,
                "epsilon_budget": info.budget,
                "epsilon_source": "reported by the site from its own ledger",
                "role": info.role,
                "rounds_trained": info.rounds_trained,
                "rounds_skipped": info.rounds_skipped,
                "rounds_dropped": info.rounds_dropped,
            }
            for info in sorted(self._sites.values(), key=lambda i: i.name)
        }
        client_level = None
        if self._client_run is not None:
            client_level = self._client_run.summary(
                delta=self._client_level_delta(),
                noise="distributed (each site adds its share before masking)"
                if self.config.federation.protection is ProtectionKind.SECAGG
                else "central (added once to the aggregate before release: by the aggregator under plaintext, "
                "by the key-holder site under CKKS)",
                clip_norms=[level["clip_norm"] for h in history if (level := h.get("client_level"))],
            )
        summary = run_summary(
            history, protection=self.config.federation.protection.value, accountant=self.config.training.dp.accountant.value,
            clients=clients, client_level=client_level, num_parameters=num_parameters,
            uploads=[u for info in self._sites.values() for u in info.uploads], device=str(device), seconds=seconds,
            client_sampling_secret=self.config.federation.noise_seed is None,
            training=public_config(self.config.training), federation=public_config(self.config.federation),
        )
        summary["deployment"] = {"run_id": self.run_id, "sites": len(self._sites), "ledgers": "kept by each site in its own state directory"}
        return summary


class _SecAggRound:
    """The aggregator's half of one secure-aggregation round, step by step."""

    def __init__(
        self, config: RunConfig, round_index: int, sampled: list[str], dim: int, *, noise: NoiseRound | None = None,
        identities: Mapping[str, bytes] | None = None, mask_context: bytes = b"",
    ) -> None:
        """``dim``: the values each site sends (its weight comes after them); ``noise``: the round's
        client-level noise and derived encoding (None without client-level DP); ``identities``: the
        sites' Ed25519 identity keys (from hello), registered in the round under ``authenticated``;
        ``mask_context``: what the pairwise masks are bound to (:func:`privfl.client_dp.secagg_mask_context`)."""
        from privfl.protocols.secagg import Quantizer
        from privfl.protocols.secagg.keys import KeyPair
        from privfl.protocols.secagg.params import RoundParams
        from privfl.protocols.secagg.server import SecAggServer
        from privfl.protocols.secagg.state import encode_params

        cfg = config.federation.secagg
        self.bound = secagg_weight_bound(config)
        if noise is None:
            self.quantizer = quantizer_for(config, len(sampled))
        else:
            self.quantizer = Quantizer(
                clip_range=noise.range.clip_range, bits=cfg.bits, num_clients=len(sampled), fraction_bits=noise.range.fraction_bits
            )
        self.noised = noise is not None
        registry = None
        if cfg.authenticated:
            # Each site checks its own key in this registry and pins the others' for the run (Site).
            assert identities is not None  # the aggregator passes every site's key under authenticated
            registry = {name: identities[name] for name in sampled}
        self.config = config
        self.round_index = round_index
        self.dim = dim
        self.sampled = sampled
        key = KeyPair.generate()
        self.params = RoundParams(
            round_index=round_index,
            client_ids=tuple(sampled),
            threshold=cfg.resolve_threshold(len(sampled)),
            neighbours=cfg.round_neighbours(len(sampled)),
            graph_seed=cfg.graph_seed if cfg.graph_seed is not None else secrets.token_bytes(32),
            dimension=dim + 1,
            bits=cfg.bits,
            server_public_key=key.public,
            identities=registry,
            mask_context=mask_context,
        )
        self.server = SecAggServer(self.params, key)
        self.params_bytes = encode_params(self.params)

    def _withhold(self, survivors: int) -> None:
        """Under client-level DP a round with a dropout releases nothing: a subset's sum carries less noise
        than charged, and its variance would reveal how many sites survived (as in-process, fail_on_dropout);
        each site also refuses to unmask it (``SecAggClient.require_every_client``)."""
        raise ProtocolAbort(
            f"round {self.round_index}: {len(self.sampled) - survivors} of {len(self.sampled)} sites dropped out; "
            "under client-level DP the average is withheld",
            survivors=survivors, threshold=len(self.sampled),
        )

    def _step(self, aggregator: Aggregator, channel: SiteChannel, step: Step, outgoing: dict[str, bytes], receive) -> dict[str, str]:
        replies, dropped = aggregator._exchange(channel, step, self.round_index, {n: ({}, (m,)) for n, m in outgoing.items()})
        for name, reason in dropped.items():
            self.server.drop(name, reason)
        for name, reply in replies.items():
            if len(reply.parts) != 1:
                self.server.drop(name, f"{step.value}: reply carries no protocol message")
                continue
            try:
                receive(name, reply.parts[0])
            except MessageError:
                pass  # the server recorded why
        return dropped

    def finish(self, aggregator: Aggregator, channel: SiteChannel, advertised: dict[str, bytes]):
        server = self.server
        for name in self.sampled:
            if name not in advertised:
                server.drop(name, "did not train or advertise keys")
                continue
            try:
                server.receive_advertise(name, advertised[name])
            except MessageError:
                pass
        self._step(aggregator, channel, Step.SECAGG_KEYS, server.keys_messages(), server.receive_shares)
        self._step(aggregator, channel, Step.SECAGG_RELAY, server.relay_messages(), server.receive_masked_input)
        if self.noised and len(server.masked_inputs) < len(self.sampled):
            # Withheld before anything is unmasked (the sites would refuse to unmask it anyway).
            self._withhold(len(server.masked_inputs))
        if self.params.authenticated:
            # Every survivor signs the list of who sent a masked input: no two honest sites unmask for different sets.
            self._step(aggregator, channel, Step.SECAGG_CHECK, server.consistency_requests(), server.receive_consistency)
        self._step(aggregator, channel, Step.SECAGG_UNMASK, server.unmask_requests(), server.receive_unmask)
        words = server.finish()
        survivors = server.survivors
        if self.noised and len(survivors) < len(self.sampled):
            self._withhold(len(survivors))
        decoded = self.quantizer.decode_sum(words)
        ratio_sum = decoded[self.dim] / self.quantizer.clip_range
        weight = ratio_sum * (self.bound if self.bound is not None else 1.0)
        if self.noised and abs(ratio_sum - len(survivors)) > 1e-6:
            # Every site's weight word is exactly the clip range: any other total means the masks did not
            # cancel (sites told different values) or a word was corrupted, and the sum is garbage.
            raise ProtocolAbort(
                f"round {self.round_index}: the sum's weight is {ratio_sum:.6g}, not the {len(survivors)} sites that sent "
                "inputs: the masks did not cancel (the sites disagree on the round's values); nothing is released"
            )
        if not ratio_sum > 0:
            raise ProtocolAbort(f"round {self.round_index}: decoded total weight {weight} is not positive")
        rejected = {u: reason for u, reason in server.dropped.items() if u not in survivors and u in advertised}
        return decoded[: self.dim] / ratio_sum, float(weight), tuple(sorted(survivors)), rejected


_DECRYPT_STEPS = frozenset({Step.CKKS_DECRYPT, Step.SHARED_KEY_DECRYPT})
# What the server's recorded view calls each message (the names of an in-process recording).
_RECORDED_REQUESTS = {
    Step.SECAGG_KEYS: "advertise_keys", Step.SECAGG_RELAY: "share_relay", Step.SECAGG_UNMASK: "unmask_request",
    Step.SECAGG_CHECK: "consistency_request",
    Step.CKKS_DECRYPT: "aggregate", Step.SHARED_KEY_DECRYPT: "aggregate",
}
_RECORDED_REPLIES = {
    Step.SECAGG_KEYS: "share", Step.SECAGG_RELAY: "masked_input", Step.SECAGG_UNMASK: "unmask", Step.SECAGG_CHECK: "consistency",
    Step.CKKS_DECRYPT: "average", Step.SHARED_KEY_DECRYPT: "average",
}


def _min_participants(config: RunConfig) -> int:
    kind = config.federation.protection
    if kind is ProtectionKind.PLAINTEXT:
        return 1
    if kind is ProtectionKind.CKKS:
        return config.federation.ckks.min_contributors
    if kind is ProtectionKind.SHARED_KEY:
        # The decrypting site counts only the others: with it, a round needs one more.
        return config.federation.shared_key.min_contributors + 1
    return 2


def _reply_name(reply: bytes) -> str:
    from privfl.protocols.wire import decode_frame

    frame = decode_frame(reply, kind=61, round_index=0, max_bytes=1 << 22, max_parts=4)
    return frame.sender


def _number(value: Any) -> float | None:
    """A peer's finite number, or None (also for an int too large for a float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
