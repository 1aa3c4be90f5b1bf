"""A stand-in Flower app for the deployment tests: the server sends bytes to every node, nodes echo a digest.

The ServerApp reads its run config (``out-file``, ``payload-hex``, ``expected-nodes``, ``wait-nodes-s``,
``rounds``, ``timeout-s``, ``fail-node-site``, ``pause-file``, optional ``poll-s``, ``payload-repeat``, ``server-fail``), waits until ``expected-nodes`` SuperNodes are
connected, then for each round sends one ``query`` message carrying the payload to every node and
writes what came back (or the error) as JSON to ``out-file``. A node answers with
``sha256(payload || site)``, its ``site`` from the node config, and a counter it keeps in
``context.state`` to show state surviving between messages. A node whose site equals
``fail-node-site`` raises instead, to show how a ClientApp error reaches the server. With a
``pause-file``, the server writes it after round 0 and waits for ``<pause-file>.resume`` (a test
kills a SuperNode in between).

This file is copied into the app directory next to the generated pyproject.toml, so Flower loads it
from the FAB as the top-level module ``privfl_echo_app``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client_app = ClientApp()
server_app = ServerApp()


def reply_digest(payload: bytes, site: str) -> bytes:
    """What a node with ``site`` answers to ``payload``."""
    return hashlib.sha256(payload + site.encode()).digest()


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Echo a digest of the payload and the node's site; count calls in ``context.state``."""
    cfg = msg.content.config_records["echo"]
    payload = bytes(cfg["payload"])
    # Simulation Engine nodes have no "site", only "partition-id".
    site = str(context.node_config.get("site", f"partition-{context.node_config.get('partition-id')}"))
    if site == str(cfg.get("fail-node-site", "")):
        raise RuntimeError(f"{site} was told to fail")
    counter = context.state.metric_records.get("echo-counter", MetricRecord({"calls": 0}))
    calls = int(counter["calls"]) + 1
    context.state.metric_records["echo-counter"] = MetricRecord({"calls": calls})
    reply = ConfigRecord(
        {"digest": reply_digest(payload, site), "site": site, "calls": calls, "node-id": str(context.node_id)}
    )
    return Message(RecordDict({"echo": reply}), reply_to=msg)


def _send_and_receive_fast(grid: Grid, messages: list[Message], timeout: float, poll_s: float) -> list[Message]:
    """``Grid.send_and_receive`` polls every 3 s; this polls every ``poll_s`` seconds instead."""
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if pending:
            time.sleep(poll_s)
    return replies


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Send the payload to every node for ``rounds`` rounds and write the replies to ``out-file``."""
    rc = context.run_config
    out_file = Path(str(rc["out-file"]))
    payload = bytes.fromhex(str(rc["payload-hex"])) * int(rc.get("payload-repeat", 1))
    if bool(rc.get("server-fail", False)):
        raise RuntimeError("the ServerApp was told to fail")
    expected = int(rc["expected-nodes"])
    deadline = time.monotonic() + float(rc["wait-nodes-s"])
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        node_ids = list(grid.get_node_ids())
    result: dict[str, object] = {"node_ids": sorted(node_ids), "rounds": []}
    for rnd in range(int(rc["rounds"])):
        started = time.monotonic()
        messages = [
            Message(
                RecordDict(
                    {
                        "echo": ConfigRecord(
                            {"payload": payload, "round": rnd, "fail-node-site": str(rc["fail-node-site"])}
                        )
                    }
                ),
                dst_node_id=node_id,
                message_type="query",
            )
            for node_id in node_ids
        ]
        poll_s = float(rc.get("poll-s", 0.0))
        if poll_s > 0:
            replies = _send_and_receive_fast(grid, messages, float(rc["timeout-s"]), poll_s)
        else:
            replies = list(grid.send_and_receive(messages, timeout=float(rc["timeout-s"])))
        entries = []
        for reply in replies:
            entry: dict[str, object] = {"src_node_id": reply.metadata.src_node_id}
            if reply.has_error():
                entry["error_code"] = reply.error.code
                entry["error_reason"] = reply.error.reason
            else:
                echo = reply.content.config_records["echo"]
                entry.update(
                    digest=bytes(echo["digest"]).hex(),
                    site=echo["site"],
                    calls=echo["calls"],
                    node_id=echo["node-id"],
                )
            entries.append(entry)
        result["rounds"].append({"seconds": time.monotonic() - started, "replies": entries})  # type: ignore[union-attr]
        # Between rounds, optionally hand control to the test (it kills a SuperNode here).
        pause_file = str(rc["pause-file"])
        if pause_file and rnd == 0:
            Path(pause_file).write_text("round 0 done")
            resume = Path(pause_file + ".resume")
            resume_deadline = time.monotonic() + float(rc["timeout-s"])
            while not resume.exists() and time.monotonic() < resume_deadline:
                time.sleep(0.1)
    tmp = out_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out_file)
