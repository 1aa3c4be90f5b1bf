"""The Flower ClientApp hosting a privfl Site and the ServerApp hosting the Aggregator.

Each privfl request travels as one Flower message of type ``query.privfl`` whose content holds the
request bytes (``RecordDict({"privfl": ConfigRecord({"payload": bytes})})``); the reply carries the
site's reply bytes the same way. Flower handles each message in a fresh ClientApp process, so the
Site is rebuilt from its node configuration for every message and keeps everything it must remember
in its state directory.

Node configuration of a SuperNode (``flower-supernode --node-config``):

* ``site``: the site's name; ``state-dir``: its state directory (ledger, keys, protocol state);
* ``data``: a CSV or Parquet file (with ``label-column``, default ``label``) or ``module:function``;
* ``budget`` (optional): the site's own epsilon budget; ``role`` (optional): ``key-holder`` for the
  CKKS key holder; ``device`` (optional): ``auto``, ``cpu`` or ``cuda``;
* ``key-holder-key``: the CKKS key holder's identity public key (64 hex digits, quoted: Flower reads
  node-config values as TOML), needed by every other site of a CKKS run;
* ``peers`` (optional): a JSON file of the other sites' identity keys (secure aggregation's
  authenticated mode; without it each key is pinned on first sight);
* ``allow-noise-seed`` (optional, ``true``): join runs whose config fixes ``noise_seed`` (simulations
  only: the server could then regenerate every noise draw);
* ``worker`` (optional): the Unix socket of the site's long-lived worker (``privfl.flower.worker``);
  the ClientApp then only forwards bytes to it, and the keys above are the worker's business.

Run configuration of the ServerApp (``flwr run --run-config``):

* ``config``: path of the run's TOML (the schema of ``privfl run``), read by the ServerApp and sent to
  every site; ``out``: directory for history.json, summary.json and checkpoints;
* ``input-shape`` (e.g. ``"30"`` or ``"1,8,8"``) and ``num-classes``: the model the bundled kinds build;
* ``test-data`` (optional): a CSV/Parquet test set the aggregator evaluates on (public data only);
* ``min-sites`` (default 1), ``wait-seconds`` (default 120): wait for this many connected nodes;
* ``step-timeout`` (default 600): seconds a site has for one protocol step before it counts as dropped;
* ``record`` (default false): write what the server observes to ``out/observed`` for ``privfl attack
  --run`` (:class:`privfl.aggregator.Aggregator`; under plaintext it holds every site's update);
* ``resume`` (default false): continue the unfinished run in ``out`` (same config, same sites) after
  a server crash, under its run id (:meth:`privfl.aggregator.Aggregator.run`);
* ``sim-state-root``: under Flower's Simulation Engine, where the virtual sites keep their state.

Under the Simulation Engine, virtual nodes carry only ``partition-id`` and ``num-partitions``: the
ClientApp then plays site k on partition k of the run config's bundled dataset (:func:`simulated_site`).
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path

try:
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("privfl.flower needs Flower: pip install 'privfl[flower]'") from exc

from privfl.errors import ConfigError

__all__ = ["MESSAGE_TYPE", "FlowerChannel", "client_app", "server_app"]

log = logging.getLogger("privfl")

MESSAGE_TYPE = "query.privfl"
_RECORD = "privfl"
_PAYLOAD = "payload"

client_app = ClientApp()
server_app = ServerApp()


def _node_value(config: Mapping, key: str, default=None):
    value = config.get(key, default)
    if value is None:
        raise ConfigError(f"node_config.{key}", None, "is required (flower-supernode --node-config)")
    return value


def site_from_node_config(config: Mapping):
    """The Site a SuperNode's node configuration describes."""
    from privfl.site import Site, load_peer_keys, load_site_dataset

    budget = config.get("budget")
    return Site(
        str(_node_value(config, "site")),
        load_site_dataset(str(_node_value(config, "data")), label_column=str(config.get("label-column", "label"))),
        str(_node_value(config, "state-dir")),
        budget=None if budget in (None, "") else float(budget),
        role=str(config.get("role", "site")),
        device=str(config.get("device", "auto")),
        key_holder_key=config.get("key-holder-key") or None,
        allow_noise_seed=config.get("allow-noise-seed") is True,
        peer_keys=load_peer_keys(str(config["peers"])) if config.get("peers") else None,
    )


def simulated_site(node_config: Mapping, run_config: Mapping):
    """The Site a virtual node of Flower's Simulation Engine plays.

    Virtual nodes carry only ``partition-id`` and ``num-partitions``: partition k of the run config's
    bundled dataset (split as its ``[data]`` section says, over ``num-partitions`` sites named
    ``site-0000``, ...) is site k's data, and its state directory is ``sim-state-root``/its name.
    The first site holds the CKKS key; the others read its identity key from its state directory
    (one machine: that is the out-of-band channel).
    """
    from privfl.site import Site, _parse_config, site_identity

    k, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    root = run_config.get("sim-state-root")
    if not root:
        raise ConfigError("sim-state-root", root, "a simulation needs a directory for the virtual sites' state")
    name, dataset, key_holder = _simulated_partition(str(_node_value(run_config, "config")), n, k)
    holder_name, _, _ = _simulated_partition(str(_node_value(run_config, "config")), n, 0)
    config = _parse_config(Path(str(_node_value(run_config, "config"))).read_text())
    return Site(
        name, dataset, Path(str(root)) / name, role="key-holder" if key_holder else "site",
        budget=config.training.dp.epsilon_budget,  # the operator's own config (a simulation)
        key_holder_key=site_identity(Path(str(root)) / holder_name),
        allow_noise_seed=True,  # a simulation: one operator plays every party
    )


@functools.lru_cache(maxsize=4)
def _simulated_partitions(config_path: str, num_sites: int):
    from dataclasses import replace

    from privfl.config import ProtectionKind
    from privfl.runner import load_dataset, split_clients
    from privfl.site import _parse_config

    config = _parse_config(Path(config_path).read_text())
    names = tuple(f"site-{i:04d}" for i in range(num_sites))
    config = replace(config, data=replace(config.data, num_clients=num_sites, client_names=names))
    return list(split_clients(config, load_dataset(config)).items()), config.federation.protection is ProtectionKind.CKKS


def _simulated_partition(config_path: str, num_sites: int, index: int):
    partitions, ckks = _simulated_partitions(config_path, num_sites)
    name, dataset = partitions[index]
    return name, dataset, ckks and index == 0


def _payload(message: Message) -> bytes:
    record = message.content[_RECORD]
    value = record[_PAYLOAD]
    if not isinstance(value, bytes):
        raise TypeError("privfl payload is not bytes")
    return value


def _wrap(payload: bytes) -> RecordDict:
    return RecordDict({_RECORD: ConfigRecord({_PAYLOAD: payload})})


@client_app.query("privfl")
def _site_handle(message: Message, context: Context) -> Message:
    try:
        request = _payload(message)
    except (KeyError, TypeError):
        request = b""  # the site answers garbage with a refusal, like any malformed request
    worker = context.node_config.get("worker")
    if worker:
        # The site's long-lived worker (privfl.flower.worker) holds the Site: no torch import here.
        from privfl.flower.worker import call

        reply = call(str(worker), request, timeout=float(context.node_config.get("worker-timeout", 3600)))
    elif "site" not in context.node_config and "partition-id" in context.node_config:
        # A virtual node of Flower's Simulation Engine.
        reply = simulated_site(context.node_config, context.run_config).handle(request)
    else:
        reply = site_from_node_config(context.node_config).handle(request)
    return Message(_wrap(reply), reply_to=message)


class FlowerChannel:
    """A :class:`privfl.aggregator.SiteChannel` over Flower's Grid (node address = Flower node id).

    Args:
        grid: the ServerApp's grid.
        min_sites: wait for at least this many connected nodes before the run starts.
        wait_seconds: how long to wait for them.
    """

    def __init__(self, grid: Grid, *, min_sites: int = 1, wait_seconds: float = 120.0) -> None:
        self.grid = grid
        self.min_sites = min_sites
        self.wait_seconds = wait_seconds

    def nodes(self) -> list[str]:
        deadline = time.monotonic() + self.wait_seconds
        while True:
            ids = sorted(self.grid.get_node_ids())
            if len(ids) >= self.min_sites or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if len(ids) < self.min_sites:
            raise ConfigError("min-sites", self.min_sites, f"only {len(ids)} nodes connected within {self.wait_seconds:g} s")
        return [str(i) for i in ids]

    def exchange(self, requests: Mapping[str, bytes], *, timeout: float) -> dict[str, bytes]:
        messages = [
            Message(_wrap(payload), dst_node_id=int(node), message_type=MESSAGE_TYPE) for node, payload in requests.items()
        ]
        # Grid.send_and_receive polls every 3 s; a protocol round is several exchanges, so poll faster:
        # every 50 ms for the first 2 s (most steps answer within that), then backing off to 0.5 s.
        pending = set(self.grid.push_messages(messages))
        started = time.monotonic()
        deadline = started + timeout
        replies: dict[str, bytes] = {}
        pause = 0.05
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                node = str(reply.metadata.src_node_id)
                if reply.has_error():
                    log.warning("node %s answered with an error: %s", node, reply.error.reason)
                    continue
                try:
                    replies[node] = _payload(reply)
                except (KeyError, TypeError):
                    log.warning("node %s answered without a privfl payload", node)
            if pending:
                time.sleep(pause)
                if time.monotonic() - started > 2.0:
                    pause = min(0.5, pause * 1.5)
        return replies


def _shape(value) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in str(value).replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise ConfigError("input-shape", value, "must be comma-separated positive ints, e.g. '30' or '1,8,8'") from None
    if not shape or any(d <= 0 for d in shape):
        raise ConfigError("input-shape", value, "must be comma-separated positive ints, e.g. '30' or '1,8,8'")
    return shape


def _shorten_reply_pulls(grid: Grid) -> None:
    """A reply is announced before its payload arrives; retry its pull after 50 ms, not 1 s."""
    module = sys.modules.get(type(grid).__module__)
    if module is not None:
        from privfl.flower.node import shorten_object_pulls

        shorten_object_pulls(module, "pull_objects", 0.05)


def _shorten_final_log_flush() -> bool:
    """Flower 1.42's ServerApp process, once the app has returned, waits for its log queue to empty
    (looking every 0.2 s) and then 1 s more before it reports the run finished: every run ends about
    1.2 s after its last round. This process hosts the ServerApp, so the wait is shortened here: the
    queue is looked at every 20 ms, then 0.1 s is left for the uploader's last request (a loopback
    call). Returns False (and changes nothing) outside that process or with another Flower version.
    """
    from privfl.flower.node import flower_version_supported

    module = sys.modules.get("flwr.superlink.runtime.run_serverapp")
    original = getattr(module, "flush_logs", None)
    if module is None or original is None or getattr(original, "_privfl_wrapped", False) or not flower_version_supported():
        return False

    def flush_logs(log_queue, timeout: float = 3.0) -> bool:
        deadline = time.monotonic() + timeout
        while not log_queue.empty():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return True

    flush_logs._privfl_wrapped = True  # type: ignore[attr-defined]
    vars(module)["flush_logs"] = flush_logs
    return True


def _log_rounds_to_the_stream() -> None:
    """privfl's INFO lines (one per round: accuracy, epsilon, who dropped) on this process's stderr,
    which Flower mirrors into the run's log: ``flwr run --stream`` (and ``privfl deploy local``'s
    ``run-N.log``) then shows the run's progress, not only that it started and ended."""
    privfl_log = logging.getLogger("privfl")
    if any(getattr(h, "_privfl_stream", False) for h in privfl_log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("privfl: %(message)s"))
    handler._privfl_stream = True  # type: ignore[attr-defined]
    privfl_log.addHandler(handler)
    privfl_log.setLevel(logging.INFO)
    privfl_log.propagate = False


def _flag(value, key: str) -> bool:
    """A boolean run-config value (Flower passes true / false, or a string from the command line)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise ConfigError(key, value, "must be true or false")


@server_app.main()
def _aggregator_main(grid: Grid, context: Context) -> None:
    import torch

    from privfl.aggregator import Aggregator
    from privfl.site import load_site_dataset

    torch.set_num_threads(1)
    _shorten_reply_pulls(grid)
    _shorten_final_log_flush()
    _log_rounds_to_the_stream()
    rc = context.run_config
    config_path = Path(str(_node_value(rc, "config")))
    if not config_path.is_file():
        raise ConfigError("config", str(config_path), "no such run config file")
    test_data = rc.get("test-data")
    aggregator = Aggregator(
        config_path.read_text(),
        input_shape=_shape(_node_value(rc, "input-shape")),
        num_classes=int(_node_value(rc, "num-classes")),
        test_set=None if not test_data else load_site_dataset(str(test_data)),
        step_timeout=float(rc.get("step-timeout", 600)),
        progress=False,
        record=_flag(rc.get("record", False), "record"),
    )
    channel = FlowerChannel(grid, min_sites=int(rc.get("min-sites", 1)), wait_seconds=float(rc.get("wait-seconds", 120)))
    out = rc.get("out")
    aggregator.run(channel, None if not out else str(out), resume=_flag(rc.get("resume", False), "resume"))
