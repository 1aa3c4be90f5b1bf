"""Runs the real secure-aggregation protocol in one process, every message as bytes through a transport."""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from privfl.errors import ConfigError, MessageError, ProtocolError
from privfl.protocols.base import SERVER, DirectTransport, Transport
from privfl.protocols.secagg import messages as m
from privfl.protocols.secagg.client import SecAggClient
from privfl.protocols.secagg.keys import IdentityKey, KeyPair, info
from privfl.protocols.secagg.params import RoundParams
from privfl.protocols.secagg.prg import mask_key
from privfl.protocols.secagg.quantize import Quantizer
from privfl.protocols.secagg.server import SecAggServer

__all__ = ["CONSISTENCY", "ROUNDS", "RoundRun", "SecureSumResult", "Transcript", "drive", "new_round", "rounding_key", "run_secure_sum"]

ROUNDS = ("advertise", "share", "masked_input", "unmask")
"""The four client rounds, as named in ``drop_after`` and in ``bytes_up``."""

CONSISTENCY = "consistency"
"""The extra client round of authenticated mode (between masked input and unmask); also a ``drop_after``
and ``bytes_up`` key (always 0 bytes in the plain mode)."""

_ALL_ROUNDS = ("advertise", "share", "masked_input", CONSISTENCY, "unmask")
_CLIENT_STEP = {
    m.ADVERTISE: "advertise",
    m.SHARES: "share",
    m.MASKED_INPUT: "masked_input",
    m.CHECK: CONSISTENCY,
    m.UNMASK: "unmask",
}


def rounding_key() -> bytes:
    """A fresh key for one client's stochastic-rounding uniforms (from the OS CSPRNG)."""
    return mask_key(secrets.token_bytes(32), info(b"stochastic-rounding"))


@dataclass(slots=True)
class Transcript:
    """Byte counts and (optionally) every payload that crossed the client/server boundary."""

    bytes_up: dict[str, dict[str, int]] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)
    messages: list[tuple[str, str, str, bytes]] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def _time(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds


@dataclass(slots=True)
class RoundRun:
    """A round set up and ready to drive: public parameters, the server, and one client object each."""

    params: RoundParams
    server: SecAggServer
    clients: dict[str, SecAggClient]


def new_round(
    client_ids: Collection[str],
    *,
    round_index: int,
    threshold: int,
    neighbours: int | None,
    dimension: int,
    bits: int,
    graph_seed: bytes | None,
    identities: Mapping[str, IdentityKey] | None = None,
) -> RoundRun:
    """Creates the server's key, the public parameters, the server and the clients for one round.

    Args:
        graph_seed: public seed of the SecAgg+ graph; None draws a fresh one from the OS CSPRNG.
        identities: authenticated mode: each client's long-term Ed25519 identity (the client keeps the
            private half; the public halves form the registry every client is given); None for the plain mode.
    """
    if identities is not None:
        missing = [u for u in client_ids if u not in identities]
        if missing:
            raise ConfigError("identities", missing[0], "client has no identity key")
    server_key = KeyPair.generate()
    params = RoundParams(
        round_index=round_index,
        client_ids=tuple(client_ids),
        threshold=threshold,
        neighbours=neighbours,
        graph_seed=graph_seed if graph_seed is not None else secrets.token_bytes(32),
        dimension=dimension,
        bits=bits,
        server_public_key=server_key.public,
        identities=None if identities is None else {u: identities[u].public for u in client_ids},
    )
    server = SecAggServer(params, server_key)
    clients = {u: SecAggClient(u, params, None if identities is None else identities[u]) for u in params.client_ids}
    return RoundRun(params=params, server=server, clients=clients)


def drive(  # noqa: PLR0915  the protocol's steps in order; the helpers are closures over the round's state
    run: RoundRun,
    encoded: Mapping[str, np.ndarray],
    transport: Transport,
    *,
    stop_after: Mapping[str, str] | None = None,
    record: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[np.ndarray, Transcript]:
    """Plays the four rounds (five when authenticated), every message through ``transport``.

    A lost message (``deliver`` returns None) drops its client at that step; a message either side
    rejects (:class:`MessageError`, or a client's :class:`ProtocolError` such as a refusal) drops the
    client concerned. The server's ``dropped`` holds the reasons.

    Args:
        run: from :func:`new_round`.
        encoded: client id -> its quantized input words.
        transport: carries every message.
        stop_after: client id -> round name after which that client goes silent (simulated dropout);
            ``"consistency"`` is a round in authenticated mode.
        record: keep every delivered payload in the transcript.
        clock: timer for the per-phase seconds in the transcript.

    Returns:
        (sum of the survivors' encoded inputs mod 2^k, transcript).

    Raises:
        ProtocolAbort: too few clients remain at some step.
    """
    server, clients = run.server, run.clients
    stop_after = dict(stop_after or {})
    transcript = Transcript(messages=[] if record else None)
    transcript.bytes_up = {u: {r: 0 for r in _ALL_ROUNDS} for u in clients}
    transcript.bytes_down = {u: 0 for u in clients}
    alive = set(clients)

    def deliver(sender: str, receiver: str, kind: int, payload: bytes) -> bytes | None:
        step = m.STEP_NAMES[kind]
        if sender != SERVER:
            transcript.bytes_up[sender][_CLIENT_STEP[kind]] += len(payload)
        arrived = transport.deliver(sender, receiver, step, payload)
        client = receiver if sender == SERVER else sender
        if arrived is None:
            server.drop(client, f"{step}: message lost")
            alive.discard(client)
            return None
        if sender == SERVER:
            transcript.bytes_down[receiver] += len(arrived)
        if transcript.messages is not None:
            transcript.messages.append((sender, receiver, step, bytes(arrived)))
        return arrived

    def upload(u: str, kind: int, payload: bytes, receive: Callable[[str, bytes], None]) -> None:
        arrived = deliver(u, SERVER, kind, payload)
        if arrived is None:
            return
        start = clock()
        try:
            receive(u, arrived)
        except MessageError:
            alive.discard(u)  # the server has recorded why
        finally:
            transcript._time("server", clock() - start)

    def client_step(u: str, kind: int, call: Callable[[], bytes]) -> bytes | None:
        start = clock()
        try:
            return call()
        except ProtocolError as exc:
            server.drop(u, f"{m.STEP_NAMES[kind]}: client stopped: {exc}")
            alive.discard(u)
            return None
        finally:
            transcript._time(f"client_{_CLIENT_STEP[kind]}", clock() - start)

    def silent(u: str, previous_round: str) -> bool:
        if stop_after.get(u) == previous_round:
            # Silence, not an announcement: the server notices the missing message when it closes the step.
            alive.discard(u)
            return True
        return u not in alive

    def closing(close: Callable[[], dict[str, bytes]]) -> dict[str, bytes]:
        start = clock()
        try:
            return close()
        finally:
            transcript._time("server", clock() - start)

    def exchange(
        messages: dict[str, bytes],
        request_kind: int,
        reply_kind: int,
        answer: Callable[[str, bytes], bytes],
        receive: Callable[[str, bytes], None],
    ) -> None:
        # One server-to-clients step and the clients' replies; a client with no message from
        # the server this step is out of the round.
        alive.intersection_update(messages)
        for u in sorted(alive):
            arrived = deliver(SERVER, u, request_kind, messages[u])
            if arrived is None:
                continue
            payload = client_step(u, reply_kind, functools.partial(answer, u, arrived))
            if payload is not None:
                upload(u, reply_kind, payload, receive)

    for u in sorted(clients):
        payload = client_step(u, m.ADVERTISE, clients[u].advertise)
        if payload is not None:
            upload(u, m.ADVERTISE, payload, server.receive_advertise)
    for u in sorted(alive):
        silent(u, "advertise")
    keys = closing(server.keys_messages)

    exchange(keys, m.KEYS, m.SHARES, lambda u, a: clients[u].share_keys(a), server.receive_shares)
    for u in sorted(alive):
        silent(u, "share")
    relays = closing(server.relay_messages)

    exchange(relays, m.RELAY, m.MASKED_INPUT, lambda u, a: clients[u].masked_input(a, encoded[u]), server.receive_masked_input)
    for u in sorted(alive):
        silent(u, "masked_input")
    if run.params.authenticated:
        checks = closing(server.consistency_requests)
        exchange(checks, m.CHECK_REQUEST, m.CHECK, lambda u, a: clients[u].sign_survivors(a), server.receive_consistency)
        for u in sorted(alive):
            silent(u, CONSISTENCY)
    requests = closing(server.unmask_requests)

    exchange(requests, m.UNMASK_REQUEST, m.UNMASK, lambda u, a: clients[u].unmask(a), server.receive_unmask)
    start = clock()
    try:
        total = server.finish()
    finally:
        transcript._time("server", clock() - start)
    return total, transcript


@dataclass(frozen=True, kw_only=True, slots=True)
class SecureSumResult:
    """Outcome of :func:`run_secure_sum`.

    Attributes:
        total: decoded sum of the survivors' (clipped) inputs, float64.
        survivors: ids whose input is in ``total`` (they sent a masked input).
        dropped: id -> reason, for clients whose input is not in ``total``.
        bytes_up: id -> round name -> bytes that client sent.
        bytes_down: id -> bytes that client received.
        clipped: id -> number of that client's coordinates clipped to [-clip, clip].
        max_error: bound on |total - sum of clipped survivor inputs| per coordinate.
        quantizer: the encoding used.
        seconds: wall time per phase (client rounds, server), summed over clients.
        transcript: (sender, receiver, step, payload) of every delivered message, when recorded.
        server: the round's server object (public data and masked vectors only), for inspection.
    """

    total: np.ndarray
    survivors: tuple[str, ...]
    dropped: Mapping[str, str]
    bytes_up: Mapping[str, Mapping[str, int]]
    bytes_down: Mapping[str, int]
    clipped: Mapping[str, int]
    max_error: float
    quantizer: Quantizer
    seconds: Mapping[str, float]
    transcript: tuple[tuple[str, str, str, bytes], ...] = ()
    server: SecAggServer | None = field(default=None, repr=False)


def _stop_after(drop_after: Mapping[str, Collection[str]] | None, ids: Collection[str], authenticated: bool) -> dict[str, str]:
    rounds = _ALL_ROUNDS if authenticated else ROUNDS
    stop: dict[str, str] = {}
    for round_name, dropping in (drop_after or {}).items():
        if round_name not in rounds:
            raise ConfigError("drop_after", round_name, f"round must be one of {rounds}")
        for u in dropping:
            if u not in ids:
                raise ConfigError("drop_after", u, "unknown client id")
            if u in stop:
                raise ConfigError("drop_after", u, "client listed under two rounds")
            stop[u] = round_name
    return stop


def run_secure_sum(
    inputs: Mapping[str, np.ndarray],
    *,
    threshold: int,
    neighbours: int | None = None,
    drop_after: Mapping[str, Collection[str]] | None = None,
    seed: bytes | int | None = None,
    clip: float = 1.0,
    bits: int = 32,
    fraction_bits: int | None = None,
    round_index: int = 0,
    transport: Transport | None = None,
    record: bool = False,
    authenticated: bool = False,
) -> SecureSumResult:
    """Securely sums float vectors with the full protocol, in process, every message as bytes.

    Args:
        inputs: client id -> 1-D float array (all the same length).
        threshold: Shamir threshold t inside each client's neighbourhood (its neighbours and itself);
            more than half of those k + 1 holders (n on the complete graph), else a server that lies
            about who dropped can unmask a client (docs/secagg.md).
        neighbours: SecAgg+ degree k, or None for the complete graph.
        drop_after: round name ("advertise", "share", "masked_input", "unmask", and "consistency" when
            authenticated) -> ids that go silent after that round.
        seed: public seed of the graph only (bytes, or an int for convenience); every key, mask seed and
            rounding uniform is always fresh from the OS CSPRNG.
        clip: inputs are clipped to [-clip, clip].
        bits: modulus 2^bits.
        fraction_bits: fixed-point step 2^-fraction_bits (checked against overflow); None picks the finest.
        round_index: bound into every key and message.
        transport: carries each message (default: delivers everything unchanged).
        record: keep the transcript (for tests); adds the payloads to memory.
        authenticated: run the variant that stands up to an active server (signed keys and the
            consistency check); a fresh Ed25519 identity is generated for each client.

    Returns:
        The decoded total over the survivors and the round's bookkeeping.

    Raises:
        ConfigError: bad parameters (names the field and value), including a threshold at or below half
            of the share holders.
        ProtocolAbort: fewer than ``threshold`` clients left at some step.
    """
    if not inputs:
        raise ConfigError("inputs", 0, "need at least 2 clients")
    arrays = {u: np.asarray(x, dtype=np.float64) for u, x in inputs.items()}
    dims = {x.shape for x in arrays.values()}
    if len(dims) != 1 or len(next(iter(dims))) != 1:
        raise ConfigError("inputs", sorted(dims), "every input must be a 1-D array of the same length")
    if any(not np.all(np.isfinite(x)) for x in arrays.values()):
        raise ConfigError("inputs", "non-finite values", "inputs must be finite")
    stop = _stop_after(drop_after, arrays, authenticated)
    if isinstance(seed, int):
        seed = seed.to_bytes(32, "big", signed=True)
    quantizer = Quantizer(clip_range=clip, bits=bits, num_clients=len(arrays), fraction_bits=fraction_bits)
    run = new_round(
        arrays,
        round_index=round_index,
        threshold=threshold,
        neighbours=neighbours,
        dimension=next(iter(dims))[0],
        bits=bits,
        graph_seed=seed,
        identities={u: IdentityKey.generate() for u in arrays} if authenticated else None,
    )
    encoded, clipped = {}, {}
    for u, x in arrays.items():
        encoded[u], clipped[u] = quantizer.encode(x, rounding_key())
    words, transcript = drive(run, encoded, transport or DirectTransport(), stop_after=stop, record=record)
    survivors = run.server.survivors
    result = SecureSumResult(
        total=quantizer.decode_sum(words),
        survivors=survivors,
        dropped={u: r for u, r in run.server.dropped.items() if u not in survivors},
        bytes_up=transcript.bytes_up,
        bytes_down=transcript.bytes_down,
        clipped=clipped,
        max_error=quantizer.max_error(len(survivors)),
        quantizer=quantizer,
        seconds=transcript.seconds,
        transcript=tuple(transcript.messages or ()),
        server=run.server,
    )
    return result
