"""Public parameters of one secure-aggregation round, shared by the server and every client."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from privfl.errors import ConfigError
from privfl.protocols.secagg.graph import build_graph
from privfl.protocols.secagg.keys import KEY_BYTES

__all__ = ["RoundParams"]

MAX_ID_BYTES = 256


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundParams:
    """Everything public about a round: who takes part, the graph, the threshold, the vector shape.

    Args:
        round_index: the federation round; bound into every key derivation and message.
        client_ids: the clients invited to the round (distinct, non-empty, at most 256 UTF-8 bytes).
        threshold: t, Shamir threshold inside each client's share holders (its neighbours and itself).
        neighbours: k for SecAgg+, or None for the complete graph (classic SecAgg).
        graph_seed: public seed fixing the SecAgg+ graph.
        dimension: words per masked vector.
        bits: k of the modulus 2^k.
        server_public_key: the server's X25519 key for authenticating client/server messages.
        identities: authenticated mode: client id -> its registered Ed25519 public key (the public-key
            infrastructure, handed to every client out of band); None for the honest-but-curious mode.

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
    graph: dict[str, frozenset[str]] = field(init=False, repr=False, compare=False)
    index: dict[str, int] = field(init=False, repr=False, compare=False)

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
        graph = build_graph(ids, self.neighbours, self.graph_seed)
        holders = len(graph[ids[0]]) + 1
        t = self.threshold
        if not isinstance(t, int) or isinstance(t, bool) or not 2 <= t <= holders:
            raise ConfigError(
                "threshold", t, f"must be an int in [2, {holders}] (each client's shares go to {holders - 1} neighbours and itself)"
            )
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
        object.__setattr__(self, "graph", graph)
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

    @property
    def modulus_mask(self) -> int:
        """2^k - 1."""
        return (1 << self.bits) - 1

    def sign(self, owner: str, peer: str) -> int:
        """+1 if ``owner`` adds PRG(s_owner,peer) to its vector, -1 if it subtracts it (so the pair cancels)."""
        return 1 if self.index[owner] < self.index[peer] else -1
