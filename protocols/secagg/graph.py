"""The public masking graph: complete (classic SecAgg) or a random k-regular Harary graph (SecAgg+).

SecAgg+ (Bell et al., CCS 2020) masks each client only with k = O(log n) neighbours: the clients are put
on a cycle in a pseudorandom order and each is joined to its k/2 nearest on either side (plus the
opposite node when k is odd and n even). The order is public: it is fixed by hashing each id with a
public graph seed, so any party can recompute the graph and check it.

With a graph the server learns the sum over each connected component of the surviving clients, so the
protocol aborts unless the survivors induce a connected subgraph (checked by the server and by each client).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Mapping, Sequence

from privfl.errors import ConfigError

__all__ = ["build_graph", "check_neighbours", "suggest_neighbours", "components"]


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
        id -> its neighbours (never itself); symmetric.

    Raises:
        ConfigError: invalid degree (see :func:`check_neighbours`).
    """
    n = len(client_ids)
    k = check_neighbours(neighbours, n)
    if k == n - 1:
        everyone = frozenset(client_ids)
        return {u: everyone - {u} for u in client_ids}
    order = sorted(client_ids, key=lambda u: (hashlib.sha256(seed + b"|" + u.encode("utf-8")).digest(), u))
    graph: dict[str, set[str]] = {u: set() for u in client_ids}
    for position, u in enumerate(order):
        for offset in range(1, k // 2 + 1):
            v = order[(position + offset) % n]
            graph[u].add(v)
            graph[v].add(u)
        if k % 2 == 1:
            v = order[(position + n // 2) % n]
            graph[u].add(v)
            graph[v].add(u)
    return {u: frozenset(vs) for u, vs in graph.items()}


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
