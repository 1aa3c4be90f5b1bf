"""The public masking graph: complete (classic SecAgg) or a random k-regular Harary graph (SecAgg+).

SecAgg+ (Bell et al., CCS 2020) masks each client only with k = O(log n) neighbours: the clients are put
on a cycle in a pseudorandom order and each is joined to its k/2 nearest on either side (plus the
opposite node when k is odd and n even). The order is public: it is fixed by hashing each id with a
public graph seed, so any party can recompute the graph and check it.

With a graph the server learns the sum over each connected component of the surviving clients, so the
protocol aborts unless the survivors induce a connected subgraph (checked by the server and by each client).
Survivor sets travel as bitmaps over the cycle positions (:func:`ring_positions`), and on the cycle a
client checks connectivity with a few operations on n-bit integers (:func:`ring_connected`).

:func:`failure_bound` bounds the probability that a random Harary graph fails a round at stated dropout
and corruption rates; :func:`privfl.protocols.secagg.params.choose_graph` uses it to pick k and t.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass

from privfl.errors import ConfigError

__all__ = [
    "GraphFailureBound",
    "MaskingGraph",
    "build_graph",
    "check_neighbours",
    "components",
    "failure_bound",
    "masking_graph",
    "neighbours_of",
    "ring_connected",
    "ring_positions",
    "suggest_neighbours",
]


def suggest_neighbours(num_clients: int) -> int:
    """A SecAgg+ degree heuristic: the even number >= 2 ceil(log2 n), capped at n - 1 (then complete)."""
    if num_clients <= 2:
        return max(num_clients - 1, 1)
    k = 2 * math.ceil(math.log2(num_clients))
    return min(k, num_clients - 1)


def check_neighbours(neighbours: int | None, num_clients: int) -> int:
    """Validates the degree and resolves ``None`` to the complete graph.

    Returns:
        k, the number of neighbours of every client.

    Raises:
        ConfigError: k outside [1, n-1], or k odd while n is odd (no k-regular graph exists).
    """
    if neighbours is None:
        return num_clients - 1
    if not isinstance(neighbours, int) or isinstance(neighbours, bool) or not 1 <= neighbours <= num_clients - 1:
        raise ConfigError("neighbours", neighbours, f"must be an int in [1, {num_clients - 1}] for {num_clients} clients")
    if neighbours % 2 == 1 and num_clients % 2 == 1 and neighbours != num_clients - 1:
        raise ConfigError("neighbours", neighbours, f"must be even when the number of clients ({num_clients}) is odd")
    return neighbours


def build_graph(client_ids: Sequence[str], neighbours: int | None, seed: bytes) -> dict[str, frozenset[str]]:
    """Builds the public masking graph.

    Args:
        client_ids: every client of the round (distinct).
        neighbours: k, or None for the complete graph.
        seed: public graph seed (at least 16 bytes).

    Returns:
        id -> its neighbours (never itself); symmetric. A fresh dict (its frozensets may be shared
        with other calls on the same arguments: the result is cached, since every client of a round
        rebuilds the graph to check it).

    Raises:
        ConfigError: invalid degree (see :func:`check_neighbours`).
    """
    k = check_neighbours(neighbours, len(client_ids))
    return dict(_build_graph(tuple(client_ids), k, bytes(seed)))


def masking_graph(client_ids: Sequence[str], neighbours: int | None, seed: bytes) -> Mapping[str, frozenset[str]]:
    """The same graph as :func:`build_graph`, as a shared read-only mapping whose rows are built on first use.

    ``RoundParams.graph`` is this: a client reads its own row only (O(k)), so a client process that
    decodes the round's parameters at every step sorts the cycle once (O(n log n)) and does not build
    the n rows (O(n k): 0.1 s at n = 10^4, 2.5 s at n = 10^5). Cached on the arguments.

    Raises:
        ConfigError: invalid degree (see :func:`check_neighbours`).
    """
    k = check_neighbours(neighbours, len(client_ids))
    return _build_graph(tuple(client_ids), k, bytes(seed))


def neighbours_of(client_ids: Sequence[str], neighbours: int | None, seed: bytes, client: str) -> frozenset[str]:
    """One client's neighbours in :func:`build_graph`'s graph, without copying the whole graph.

    Raises:
        ConfigError: invalid degree (see :func:`check_neighbours`).
        KeyError: ``client`` is not in ``client_ids``.
    """
    k = check_neighbours(neighbours, len(client_ids))
    return _build_graph(tuple(client_ids), k, bytes(seed))[client]


def ring_positions(client_ids: Sequence[str], neighbours: int | None, seed: bytes) -> Mapping[str, int]:
    """Each client's position (0 to n - 1) on the cycle of the SecAgg+ graph; its place in ``client_ids`` on the complete graph.

    Survivor sets travel as bitmaps in this order (bit p: the client at position p), so that a client can
    check that a set is connected with :func:`ring_connected`. Cached, like the graph: the mapping is
    shared between calls (and by every ``RoundParams`` of the round), so it must not be modified.

    Raises:
        ConfigError: invalid degree (see :func:`check_neighbours`).
    """
    k = check_neighbours(neighbours, len(client_ids))
    return _ring_positions(tuple(client_ids), k, bytes(seed))


@functools.lru_cache(maxsize=8)
def _ring_order(client_ids: tuple[str, ...], k: int, seed: bytes) -> tuple[str, ...]:
    if k == len(client_ids) - 1:
        return client_ids
    return tuple(sorted(client_ids, key=lambda u: (hashlib.sha256(seed + b"|" + u.encode("utf-8")).digest(), u)))


@functools.lru_cache(maxsize=8)
def _ring_positions(client_ids: tuple[str, ...], k: int, seed: bytes) -> Mapping[str, int]:
    # A plain dict (typed read-only), not a MappingProxyType: RoundParams holding it stays picklable.
    return {u: p for p, u in enumerate(_ring_order(client_ids, k, seed))}


class MaskingGraph(Mapping[str, frozenset[str]]):
    """The masking graph as a read-only mapping id -> neighbours (never itself; symmetric), rows built on first use.

    Iterates in the order of the ``client_ids`` it was built from. Use :func:`masking_graph` to get one.
    """

    __slots__ = ("_ids", "_k", "_order", "_positions", "_rows")

    def __init__(self, client_ids: tuple[str, ...], k: int, seed: bytes) -> None:
        self._ids = client_ids
        self._k = k
        self._order = _ring_order(client_ids, k, seed)
        self._positions = _ring_positions(client_ids, k, seed)
        self._rows: dict[str, frozenset[str]] = {}

    def __getitem__(self, client: str) -> frozenset[str]:
        row = self._rows.get(client)
        if row is None:
            p, order, k = self._positions[client], self._order, self._k
            n = len(order)
            if k == n - 1:
                row = frozenset(order[:p] + order[p + 1 :])
            else:
                # The k/2 nearest on either side of the cycle (2 * (k/2) + 1 <= n: no repeats) and, for
                # odd k (n even), the opposite client, which is symmetric since n/2 + n/2 = n.
                half = k // 2
                near = [order[(p + d) % n] for d in range(-half, half + 1) if d]
                if k % 2 == 1:
                    near.append(order[(p + n // 2) % n])
                row = frozenset(near)
            self._rows[client] = row
        return row

    def __contains__(self, client: object) -> bool:
        return client in self._positions

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"MaskingGraph(clients={len(self._ids)}, neighbours={self._k})"


@functools.lru_cache(maxsize=8)
def _build_graph(client_ids: tuple[str, ...], k: int, seed: bytes) -> MaskingGraph:
    return MaskingGraph(client_ids, k, seed)


def ring_connected(members: int, size: int, neighbours: int, start: int) -> bool:
    """Whether a set of clients induces a connected subgraph of the graph on the cycle, from its bitmap.

    The graph is the complete one (``neighbours == size - 1``: always connected) or a Harary graph of
    even degree k, in which each client is joined to the k/2 nearest on either side of the cycle. Two
    members are then adjacent exactly when at most k/2 positions separate them, so walking round the
    cycle from member to member, the set falls apart exactly when two of the gaps between consecutive
    members hold k/2 or more non-members each: two such runs cut the cycle into two arcs with no edge
    across (any path round either side crosses a run), while with at most one such run the members form
    a path round the other side. This counts those runs with O(log k) operations on ``size``-bit
    integers (the bitmap is rotated so that ``start``, a member, is bit 0, and no run wraps round).

    Args:
        members: the set's bitmap: bit p set iff the client at cycle position p (see :func:`ring_positions`) is in it.
        size: n, the number of clients on the cycle.
        neighbours: k.
        start: the cycle position of one member (the checking client's own).

    Returns:
        True if the induced subgraph is connected.

    Raises:
        ValueError: ``start`` is not a member, bits are set at or beyond ``size``, or k is odd and below
            n - 1 (the opposite-client edges then join runs; use :func:`components`).
    """
    full = (1 << size) - 1
    if members < 0 or members > full or not 0 <= start < size or not members >> start & 1:
        raise ValueError("start must be a member of a set of positions in [0, size)")
    if neighbours == size - 1:
        return True
    if neighbours % 2 or not 2 <= neighbours < size - 1:
        raise ValueError(f"ring_connected needs the complete graph or an even degree, not {neighbours} on {size} clients")
    rotated = ((members >> start) | (members << (size - start))) & full
    gaps = ~rotated & full  # bit 0 is clear: the start is a member
    run = neighbours // 2
    # long: bit i set iff gaps has `run` set bits from bit i up (doubling the span each step).
    long, span = gaps, 1
    while span < run:
        step = min(span, run - span)
        long &= long >> step
        span += step
    # One bit per maximal run of >= k/2 non-members: where such a run starts (the bit below is a member).
    return (long & ~(gaps << 1)).bit_count() <= 1


def components(graph: Mapping[str, Collection[str]], nodes: Collection[str]) -> int:
    """Number of connected components of the subgraph induced by ``nodes``."""
    remaining = set(nodes)
    count = 0
    while remaining:
        count += 1
        stack = [remaining.pop()]
        while stack:
            u = stack.pop()
            for v in graph[u]:
                if v in remaining:
                    remaining.remove(v)
                    stack.append(v)
    return count


def _log_comb(a: int, b: int) -> float:
    if b < 0 or b > a:
        return -math.inf
    return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)


def _hypergeometric_tail(population: int, marked: int, draws: int, at_least: int) -> float:
    # P[X >= at_least] for X the marked items among `draws` taken without replacement.
    if at_least <= 0:
        return 1.0
    top = min(marked, draws)
    if at_least > top:
        return 0.0
    denominator = _log_comb(population, draws)
    total = math.fsum(
        math.exp(_log_comb(marked, j) + _log_comb(population - marked, draws - j) - denominator) for j in range(at_least, top + 1)
    )
    return min(1.0, total)


@dataclass(frozen=True, kw_only=True, slots=True)
class GraphFailureBound:
    """Union bounds on the ways a SecAgg+ round on a random Harary graph can fail (see :func:`failure_bound`).

    Attributes:
        recovery: P[some client's secret has fewer than t live share holders] (the round aborts).
        collusion: P[some honest client has h_c >= 2t - h corrupt share holders] (an active server
            colluding with them could unmask it: the split-view bound of :mod:`params`).
        disconnection: P[the honest surviving clients' subgraph is disconnected] (partial sums exposed,
            or the round aborts).
    """

    recovery: float
    collusion: float
    disconnection: float

    @property
    def total(self) -> float:
        """Upper bound on the probability that the round fails in any of the three ways (at most 1)."""
        return min(1.0, self.recovery + self.collusion + self.disconnection)

    @property
    def log2(self) -> float:
        """log2 of :attr:`total` (-inf when the failure is impossible under the stated rates)."""
        return math.log2(self.total) if self.total > 0 else -math.inf


def failure_bound(num_clients: int, neighbours: int, threshold: int, *, dropouts: int, corrupt: int = 0) -> GraphFailureBound:
    """Bounds the probability that the pseudorandom Harary graph fails a round (after Bell et al. 2020).

    Model: at most ``dropouts`` honest clients leave the round and at most ``corrupt`` clients collude
    with the server (and may stop answering too); which clients they are does not depend on the graph
    (the graph seed is fresh and the cycle order is SHA-256 of it, modelled as a uniform random
    permutation). With m = dropouts + corrupt clients that may be missing and h = k + 1 holders:

    - recovery: a client's neighbours are k of the other n - 1, so the missing ones among them X are
      hypergeometric (m marked); a secret fails if k - X < t (a dropped owner holds no share of its
      own; a surviving one does, which only helps). Bound: n * P[X >= k - t + 1].
    - collusion: the corrupt neighbours Y of an honest client are hypergeometric; it is exposed if
      2t <= h + Y. Bound: n * P[Y >= 2t - h].
    - disconnection: on the cycle each node is joined to the k/2 nearest on either side, so the
      remaining nodes stay connected unless k/2 consecutive positions are all removed (dropped or
      corrupt). Bound: n * C(n - k/2, m - k/2) / C(n, m).

    Args:
        num_clients: n.
        neighbours: k, even, at most n - 2 (the complete graph needs no bound: see ``choose_graph``).
        threshold: t.
        dropouts: the most honest clients that may drop.
        corrupt: the most clients that may collude with the server (counted as possible dropouts too).

    Returns:
        The three union bounds.

    Raises:
        ConfigError: k odd or outside [2, n - 2], or counts outside [0, n].
    """
    n, k, t = num_clients, neighbours, threshold
    if not isinstance(k, int) or k % 2 or not 2 <= k <= n - 2:
        raise ConfigError("neighbours", k, f"must be an even int in [2, {n - 2}] for a bound on {n} clients")
    for name, value in (("dropouts", dropouts), ("corrupt", corrupt)):
        if not isinstance(value, int) or not 0 <= value <= n:
            raise ConfigError(name, value, f"must be an int in [0, {n}]")
    h, removed, run = k + 1, min(n, dropouts + corrupt), k // 2
    # Among one client's n - 1 others at most n - 1 are marked.
    recovery = min(1.0, n * _hypergeometric_tail(n - 1, min(removed, n - 1), k, k - t + 1))
    collusion = min(1.0, n * _hypergeometric_tail(n - 1, min(corrupt, n - 1), k, 2 * t - h))
    disconnection = 0.0 if removed < run else min(1.0, n * math.exp(_log_comb(n - run, removed - run) - _log_comb(n, removed)))
    return GraphFailureBound(recovery=recovery, collusion=collusion, disconnection=disconnection)
