"""Public parameters of one secure-aggregation round, shared by the server and every client.

Also the one place that states the threshold bound against a server that lies about dropouts.
Each client's two secrets (its pairwise-mask key s_sk and its self-mask seed b) are Shamir-shared with
threshold t among its h share holders (its neighbours and itself). An honest holder reveals at most
one of the two shares of a client: b's if told that client survived, s_sk's if told it dropped. A
server that tells one group "survived" and another "dropped" (the split view) needs t shares of each
kind. With h_c holders colluding with it (they give both kinds), the honest groups must cover
(t - h_c) + (t - h_c) <= h - h_c holders, so the attack works exactly when 2t <= h + h_c. Privacy
against an active server colluding with up to h_c holders therefore needs 2t > h + h_c; with none,
t > h/2, which every round here enforces (:func:`check_threshold`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from privfl.errors import ConfigError, ProtocolError
from privfl.protocols.secagg.graph import GraphFailureBound, failure_bound, masking_graph, ring_positions
from privfl.protocols.secagg.keys import KEY_BYTES

__all__ = ["COMPLETE_GRAPH_MAX_CLIENTS", "GraphChoice", "RoundParams", "check_threshold", "choose_graph", "min_threshold"]

MAX_ID_BYTES = 256

# Test-only: lets a test build a round below the bound to show that the split-view attack then works.
# A ContextVar (not a module flag) so it holds only inside the test's own `with` block and thread;
# no public config, function argument or environment variable reaches it.
_LOW_THRESHOLD_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("_LOW_THRESHOLD_ALLOWED", default=False)


@contextlib.contextmanager
def _unsafe_allow_low_threshold() -> Iterator[None]:
    """TEST ONLY: disables the t > h/2 check inside the ``with`` block (to demonstrate the attack it stops)."""
    token = _LOW_THRESHOLD_ALLOWED.set(True)
    try:
        yield
    finally:
        _LOW_THRESHOLD_ALLOWED.reset(token)


def min_threshold(holders: int, corrupt: int = 0) -> int:
    """The smallest safe threshold for ``holders`` share holders: the least t with 2t > holders + corrupt.

    Args:
        holders: h, the parties holding shares of one client's secrets (its neighbours and itself).
        corrupt: h_c, how many of those holders may collude with an active server (0: none).

    Returns:
        floor((h + h_c) / 2) + 1. With ``corrupt=0``, more than half of the holders.
    """
    return (holders + corrupt) // 2 + 1


def check_threshold(threshold: int, holders: int, *, field: str = "threshold") -> None:
    """Refuses a threshold at or below half the share holders (see the module docstring for why).

    Raises:
        ConfigError: ``2 * threshold <= holders``; names the field, the value and the bound.
    """
    if 2 * threshold <= holders and not _LOW_THRESHOLD_ALLOWED.get():
        raise ConfigError(
            field,
            threshold,
            f"with {holders} share holders it must be > {holders / 2:g} (more than half, so at least "
            f"{min_threshold(holders)}) so that a server that lies about who dropped cannot collect both "
            "shares of one client",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundParams:
    """Everything public about a round: who takes part, the graph, the threshold, the vector shape.

    Args:
        round_index: the federation round; bound into every key derivation and message.
        client_ids: the clients invited to the round (distinct, non-empty, at most 256 UTF-8 bytes).
        threshold: t, Shamir threshold inside each client's share holders (its neighbours and itself);
            more than half of them (:func:`check_threshold`), else a server that lies about dropouts
            can unmask a client.
        neighbours: k for SecAgg+, or None for the complete graph (classic SecAgg).
        graph_seed: public seed fixing the SecAgg+ graph.
        dimension: words per masked vector.
        bits: k of the modulus 2^k.
        server_public_key: the server's X25519 key for authenticating client/server messages.
        identities: authenticated mode: client id -> its registered Ed25519 public key (the public-key
            infrastructure, handed to every client out of band); None for the honest-but-curious mode.
        mask_context: public bytes every pairwise mask is derived under (at most 64), e.g. the clip
            norm each client clipped to: two clients that disagree on it get masks that do not cancel,
            so the unmasked sum reveals nothing (each client sets its own; see
            :func:`~privfl.protocols.secagg.client.pairwise_mask_key`).

    Raises:
        ConfigError: a value is out of range; the message names the field and the value.
    """

    round_index: int
    client_ids: tuple[str, ...]
    threshold: int
    neighbours: int | None = None
    graph_seed: bytes = field(repr=False)
    dimension: int
    bits: int = 32
    server_public_key: bytes
    identities: Mapping[str, bytes] | None = field(default=None, repr=False)
    mask_context: bytes = b""
    graph: Mapping[str, frozenset[str]] = field(init=False, repr=False, compare=False)
    index: dict[str, int] = field(init=False, repr=False, compare=False)
    ring: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.round_index, int) and 0 <= self.round_index < 1 << 32):
            raise ConfigError("round_index", self.round_index, "must be an int in [0, 2^32)")
        ids = tuple(self.client_ids)
        if len(ids) < 2:
            raise ConfigError("num_clients", len(ids), "secure aggregation needs at least 2 clients")
        if len(set(ids)) != len(ids):
            raise ConfigError("client_ids", "duplicates", "client ids must be distinct")
        for u in ids:
            if not isinstance(u, str) or not u or len(u.encode("utf-8")) > MAX_ID_BYTES or u == "server":
                raise ConfigError("client_ids", u, f"must be a non-empty str of at most {MAX_ID_BYTES} bytes, not 'server'")
        ids = tuple(sorted(ids))
        object.__setattr__(self, "client_ids", ids)
        if not isinstance(self.graph_seed, bytes) or len(self.graph_seed) < 16:
            raise ConfigError("graph_seed", type(self.graph_seed).__name__, "must be bytes, at least 16 of them")
        graph = masking_graph(ids, self.neighbours, self.graph_seed)  # rows built on first use
        holders = len(graph[ids[0]]) + 1
        t = self.threshold
        if not isinstance(t, int) or isinstance(t, bool) or not 2 <= t <= holders:
            raise ConfigError(
                "threshold", t, f"must be an int in [2, {holders}] (each client's shares go to {holders - 1} neighbours and itself)"
            )
        check_threshold(t, holders)
        if not (isinstance(self.dimension, int) and self.dimension >= 1):
            raise ConfigError("dimension", self.dimension, "must be an int >= 1")
        if not (isinstance(self.bits, int) and 2 <= self.bits <= 32):
            raise ConfigError("bits", self.bits, "must be an int in [2, 32]")
        if not isinstance(self.server_public_key, bytes) or len(self.server_public_key) != KEY_BYTES:
            raise ConfigError("server_public_key", "bad length", f"must be {KEY_BYTES} bytes")
        if self.identities is not None:
            if not isinstance(self.identities, Mapping):
                raise ConfigError("identities", type(self.identities).__name__, "must map client ids to Ed25519 public keys")
            missing = [u for u in ids if u not in self.identities]
            if missing:
                raise ConfigError("identities", missing[0], "client has no registered identity key")
            registry = {u: self.identities[u] for u in ids}
            for u, public in registry.items():
                if not isinstance(public, bytes) or len(public) != KEY_BYTES:
                    raise ConfigError("identities", u, f"identity key must be {KEY_BYTES} raw Ed25519 bytes")
            if len(set(registry.values())) != len(registry):
                raise ConfigError("identities", "duplicates", "two clients registered the same identity key")
            object.__setattr__(self, "identities", registry)
        if not isinstance(self.mask_context, bytes) or len(self.mask_context) > 64:
            raise ConfigError("mask_context", type(self.mask_context).__name__, "must be at most 64 bytes")
        object.__setattr__(self, "graph", graph)
        # Positions on the graph's cycle: the order of the survivor bitmaps (cached with the graph).
        object.__setattr__(self, "ring", ring_positions(ids, self.neighbours, self.graph_seed))
        # Shamir evaluation points: 1-based positions in the sorted roster, public and never zero.
        object.__setattr__(self, "index", {u: i + 1 for i, u in enumerate(ids)})

    @property
    def holders(self) -> int:
        """How many parties hold shares of one client's secrets (its neighbours and itself)."""
        return len(self.graph[self.client_ids[0]]) + 1

    @property
    def authenticated(self) -> bool:
        """Whether the round runs the signed (active-server) variant."""
        return self.identities is not None

    def identity_key(self, client: str) -> bytes:
        """The Ed25519 public key registered for ``client`` (authenticated rounds only).

        Raises:
            ProtocolError: the round is not authenticated, so no identity keys are registered.
        """
        if self.identities is None:
            raise ProtocolError("the round is not authenticated: no identity keys are registered")
        return self.identities[client]

    @property
    def modulus_mask(self) -> int:
        """2^k - 1."""
        return (1 << self.bits) - 1

    def sign(self, owner: str, peer: str) -> int:
        """+1 if ``owner`` adds PRG(s_owner,peer) to its vector, -1 if it subtracts it (so the pair cancels)."""
        return 1 if self.index[owner] < self.index[peer] else -1


COMPLETE_GRAPH_MAX_CLIENTS = 32
"""Up to this many clients :func:`choose_graph` keeps the complete graph (classic SecAgg): its
guarantees are deterministic, and its extra cost there is small (see docs/performance.md)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class GraphChoice:
    """The masking graph and threshold :func:`choose_graph` picked, and why they are safe.

    Attributes:
        neighbours: k for :class:`RoundParams` (None: the complete graph).
        threshold: t for :class:`RoundParams`.
        holders: h = k + 1 share holders per client (n on the complete graph).
        dropouts: the honest dropouts the bound allows for (ceil(dropout_rate * n)).
        corrupt: the colluding clients it allows for (floor(corruption_rate * n)).
        bound: the failure bounds (all zero on the complete graph, where every condition is certain).
    """

    neighbours: int | None
    threshold: int
    holders: int
    dropouts: int
    corrupt: int
    bound: GraphFailureBound


def _complete_choice(n: int, dropouts: int, corrupt: int) -> GraphChoice | None:
    # Complete graph: recovery needs t <= n - dropouts - corrupt, privacy 2t > n + corrupt; both
    # certain. The middle of that range keeps a margin on both sides.
    low, high = min_threshold(n, corrupt), n - dropouts - corrupt
    if low > high or high < 2:
        return None
    zero = GraphFailureBound(recovery=0.0, collusion=0.0, disconnection=0.0)
    return GraphChoice(neighbours=None, threshold=max(2, (low + high + 1) // 2), holders=n, dropouts=dropouts, corrupt=corrupt, bound=zero)


def _best_threshold(n: int, k: int, dropouts: int, corrupt: int, target: float) -> tuple[int, GraphFailureBound]:
    # The collusion bound falls as t grows and the recovery bound rises: take the least t > h/2 whose
    # collusion bound is at most half the target (the collusion bound is monotone, so bisect).
    h = k + 1
    low, high = min_threshold(h), h
    while low < high:
        mid = (low + high) // 2
        if failure_bound(n, k, mid, dropouts=dropouts, corrupt=corrupt).collusion <= target / 2:
            high = mid
        else:
            low = mid + 1
    return low, failure_bound(n, k, low, dropouts=dropouts, corrupt=corrupt)


@functools.lru_cache(maxsize=256)
def choose_graph(
    num_clients: int, *, dropout_rate: float, corruption_rate: float = 0.0, target_failure_log2: float = -40.0
) -> GraphChoice:
    """Picks the SecAgg+ degree k = O(log n) and threshold t for stated dropout and corruption rates.

    Follows Bell et al. (CCS 2020): a random k-regular Harary graph, with k and t such that, except with
    probability at most 2^target_failure_log2, every secret keeps t live holders, no honest client has
    enough corrupt holders for the split-view attack (2t > h + h_c), and the honest survivors stay
    connected. The bound is :func:`graph.failure_bound` (hypergeometric tails and a union bound over
    clients). The smallest even k that meets the target is returned; up to
    :data:`COMPLETE_GRAPH_MAX_CLIENTS` clients, or when k would reach n - 1, the complete graph.
    Results are cached (a pure function of its arguments; 0.01 s at n = 1,000, up to a few seconds
    at n = 100,000 with high rates).

    Args:
        num_clients: n.
        dropout_rate: the fraction of honest clients that may drop during the round, in [0, 1).
        corruption_rate: the fraction that may collude with the server (and drop), in [0, 1/2).
        target_failure_log2: log2 of the failure probability allowed (e.g. -20 or -40).

    Returns:
        The choice; ``neighbours`` and ``threshold`` go to :class:`RoundParams` as they are.

    Raises:
        ConfigError: a rate or the target is out of range, or no graph meets it (too many dropouts
            and corrupt clients for this n).
    """
    n = num_clients
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ConfigError("num_clients", n, "must be an int >= 2")
    if not (isinstance(dropout_rate, (int, float)) and 0 <= dropout_rate < 1):
        raise ConfigError("dropout_rate", dropout_rate, "must be in [0, 1)")
    if not (isinstance(corruption_rate, (int, float)) and 0 <= corruption_rate < 0.5):
        raise ConfigError("corruption_rate", corruption_rate, "must be in [0, 0.5)")
    if not (isinstance(target_failure_log2, (int, float)) and -256 <= target_failure_log2 < 0):
        raise ConfigError("target_failure_log2", target_failure_log2, "must be in [-256, 0)")
    dropouts, corrupt = math.ceil(dropout_rate * n - 1e-9), math.floor(corruption_rate * n + 1e-9)
    complete = _complete_choice(n, dropouts, corrupt)
    if n <= COMPLETE_GRAPH_MAX_CLIENTS or n <= 4:
        if complete is None:
            raise ConfigError("dropout_rate", dropout_rate, f"with {corrupt} corrupt of {n} clients no threshold tolerates {dropouts} dropouts")
        return complete
    target = 2.0**target_failure_log2

    def meets(k: int) -> tuple[int, GraphFailureBound] | None:
        t, bound = _best_threshold(n, k, dropouts, corrupt, target)
        return (t, bound) if bound.total <= target else None

    # The bound falls as k grows (more holders, longer runs needed to disconnect); bisect on even k,
    # then step down while smaller ones still pass in case it is not monotone.
    largest = n - 2 if n % 2 == 0 else n - 3
    if meets(largest) is None:
        if complete is None:
            raise ConfigError("dropout_rate", dropout_rate, f"no graph on {n} clients meets 2^{target_failure_log2:g} with {dropouts} dropouts and {corrupt} corrupt")
        return complete
    low, high = 1, largest // 2  # in units of 2
    while low < high:
        mid = (low + high) // 2
        if meets(2 * mid) is not None:
            high = mid
        else:
            low = mid + 1
    k = 2 * low
    while k > 2 and meets(k - 2) is not None:
        k -= 2
    t, bound = meets(k)  # type: ignore[misc]
    if k >= n - 2 and complete is not None:
        return complete
    return GraphChoice(neighbours=k, threshold=t, holders=k + 1, dropouts=dropouts, corrupt=corrupt, bound=bound)
