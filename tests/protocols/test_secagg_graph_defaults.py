"""The default SecAgg+ graph: k = O(log n), t > h/2, and a failure bound that holds and meets its target."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from privfl.errors import ConfigError
from privfl.protocols.secagg.graph import build_graph, components, failure_bound
from privfl.protocols.secagg.params import (
    COMPLETE_GRAPH_MAX_CLIENTS,
    RoundParams,
    check_threshold,
    choose_graph,
    min_threshold,
)

RATES = [(0.1, 0.0), (0.05, 0.05), (0.2, 0.1)]


@pytest.mark.parametrize(("dropout_rate", "corruption_rate"), RATES)
@pytest.mark.parametrize("target", [-20.0, -40.0])
def test_choice_meets_its_target_and_the_threshold_rule(dropout_rate, corruption_rate, target):
    for n in (33, 100, 300, 1000, 10_000):
        choice = choose_graph(n, dropout_rate=dropout_rate, corruption_rate=corruption_rate, target_failure_log2=target)
        check_threshold(choice.threshold, choice.holders)  # t > h/2 always
        assert 2 * choice.threshold > choice.holders
        assert choice.threshold <= choice.holders
        assert choice.dropouts == math.ceil(dropout_rate * n - 1e-9)
        assert choice.corrupt == math.floor(corruption_rate * n + 1e-9)
        if choice.neighbours is None:
            assert choice.holders == n
            # Certain on the complete graph: recovery with every stated dropout, and the split-view bound.
            assert choice.threshold <= n - choice.dropouts - choice.corrupt
            assert choice.threshold >= min_threshold(n, choice.corrupt)
            continue
        k, t = choice.neighbours, choice.threshold
        assert k % 2 == 0 and 2 <= k <= n - 2 and choice.holders == k + 1
        bound = failure_bound(n, k, t, dropouts=choice.dropouts, corrupt=choice.corrupt)
        assert bound == choice.bound
        assert bound.total <= 2.0**target
        # The smallest degree that meets the target, for any threshold above half the holders.
        if k > 2:
            smaller = [
                failure_bound(n, k - 2, s, dropouts=choice.dropouts, corrupt=choice.corrupt).total
                for s in range(min_threshold(k - 1), k)
            ]
            assert min(smaller) > 2.0**target


def test_degree_grows_logarithmically():
    sizes = [1000, 10_000, 100_000]
    degrees = [choose_graph(n, dropout_rate=0.1, target_failure_log2=-40.0).neighbours for n in sizes]
    assert all(k is not None for k in degrees)
    assert degrees == sorted(degrees)
    # Each tenfold increase in n adds a bounded number of neighbours (about log2(10) per bit of n's
    # share of the union bound), never a multiple: k / log2(n) does not grow.
    for k_small, k_large in itertools.pairwise(degrees):
        assert k_large - k_small <= 16
    ratios = [k / math.log2(n) for k, n in zip(degrees, sizes, strict=True)]
    assert ratios == sorted(ratios, reverse=True)
    assert degrees[-1] <= 8 * math.log2(sizes[-1])


def test_small_federations_keep_the_complete_graph():
    for n in (2, 3, 5, 10, COMPLETE_GRAPH_MAX_CLIENTS):
        choice = choose_graph(n, dropout_rate=0.0)
        assert choice.neighbours is None and choice.holders == n
        assert choice.bound.total == 0.0
    assert choose_graph(COMPLETE_GRAPH_MAX_CLIENTS + 8, dropout_rate=0.1).neighbours is not None


def test_choice_drives_round_params():
    n = 300
    choice = choose_graph(n, dropout_rate=0.1, corruption_rate=0.02)
    params = RoundParams(
        round_index=0,
        client_ids=tuple(f"c{i:03d}" for i in range(n)),
        threshold=choice.threshold,
        neighbours=choice.neighbours,
        graph_seed=bytes(16),
        dimension=4,
        server_public_key=bytes(32),
    )
    assert params.holders == choice.holders


@pytest.mark.parametrize(("n", "k", "t", "dropouts"), [(100, 8, 5, 10), (60, 6, 4, 6)])
def test_bound_holds_against_sampled_dropouts(n, k, t, dropouts):
    """Monte Carlo on the real graph builder: the observed failure rates stay below the bound."""
    rng = np.random.default_rng(1)  # simulation of who drops, not a cryptographic path
    ids = [f"c{i:03d}" for i in range(n)]
    trials, recovery_failures, disconnected = 300, 0, 0
    for trial in range(trials):
        graph = build_graph(ids, k, seed=trial.to_bytes(16, "big"))
        dropped = set(rng.choice(n, size=dropouts, replace=False).tolist())
        alive = {u for i, u in enumerate(ids) if i not in dropped}
        holders = [len(graph[u] & alive) + (u in alive) for u in ids]
        recovery_failures += any(h < t for h in holders)
        disconnected += components(graph, alive) != 1
    bound = failure_bound(n, k, t, dropouts=dropouts)
    assert 0 < bound.recovery < 1 and 0 < bound.disconnection < 1
    # Observed rate, plus four standard errors of slack for the sampling.
    slack = lambda p: 4 * math.sqrt(max(p, 1 / trials) / trials)
    assert recovery_failures / trials <= bound.recovery + slack(bound.recovery)
    assert disconnected / trials <= bound.disconnection + slack(bound.disconnection)
    assert recovery_failures > 0  # the case is not vacuous (the bound is loose, about 10x, but not empty)


def test_collusion_bound_is_the_split_view_rule():
    # No corrupt clients: zero, since t > h/2 already holds. All corrupt: certain.
    assert failure_bound(1000, 20, 11, dropouts=0, corrupt=0).collusion == 0.0
    assert failure_bound(1000, 20, 11, dropouts=0, corrupt=1000).collusion == 1.0
    # More corrupt clients, higher bound; higher threshold, lower bound.
    assert failure_bound(1000, 20, 16, dropouts=0, corrupt=50).collusion < failure_bound(1000, 20, 16, dropouts=0, corrupt=100).collusion
    assert failure_bound(1000, 20, 18, dropouts=0, corrupt=100).collusion < failure_bound(1000, 20, 16, dropouts=0, corrupt=100).collusion
    # At t = 11 of h = 21 a single corrupt holder suffices (2t - h = 1): with 5% corrupt, near certain.
    assert failure_bound(1000, 20, 11, dropouts=0, corrupt=50).collusion == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_clients": 1, "dropout_rate": 0.1},
        {"num_clients": 100, "dropout_rate": 1.0},
        {"num_clients": 100, "dropout_rate": -0.1},
        {"num_clients": 100, "dropout_rate": 0.1, "corruption_rate": 0.5},
        {"num_clients": 100, "dropout_rate": 0.1, "target_failure_log2": 0.0},
        {"num_clients": 10, "dropout_rate": 0.6, "corruption_rate": 0.3},
    ],
)
def test_bad_inputs_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        choose_graph(**kwargs)


def test_failure_bound_rejects_odd_or_complete_degrees():
    with pytest.raises(ConfigError):
        failure_bound(100, 7, 5, dropouts=0)
    with pytest.raises(ConfigError):
        failure_bound(100, 99, 60, dropouts=0)


def test_build_graph_is_cached_but_hands_out_fresh_dicts():
    ids = [f"c{i:03d}" for i in range(200)]
    first = build_graph(ids, 20, b"s" * 16)
    first.pop(ids[0])
    second = build_graph(ids, 20, b"s" * 16)
    assert len(second) == 200 and all(len(vs) == 20 and u not in vs for u, vs in second.items())
    assert all(u in second[v] for u, vs in second.items() for v in vs)  # symmetric
    assert components(second, ids) == 1
    assert build_graph(ids, 20, b"t" * 16) != second


def test_secagg_config_defaults_to_the_chosen_graph_above_the_complete_graph_size():
    from privfl.protocols.secagg import SecAggConfig
    from privfl.protocols.secagg.params import COMPLETE_GRAPH_MAX_CLIENTS, choose_graph

    config = SecAggConfig()
    assert config.neighbours == "auto"
    # Small rounds: the complete graph with the 2/3 threshold, as before.
    assert config.round_neighbours(10) is None and config.resolve_threshold(10) == 7
    assert config.round_neighbours(COMPLETE_GRAPH_MAX_CLIENTS) is None
    # Large rounds: k = O(log n) and the threshold chosen with it for the stated rates.
    for n in (100, 1000):
        chosen = choose_graph(n, dropout_rate=0.1)
        assert config.round_neighbours(n) == chosen.neighbours < n - 1
        assert config.resolve_threshold(n) == chosen.threshold
    assert config.round_neighbours(1000) < 3 * config.round_neighbours(100)
    # The complete graph on request, in Python or TOML.
    assert SecAggConfig(neighbours="complete").round_neighbours(1000) is None
    assert SecAggConfig(neighbours=None).round_neighbours(1000) is None
    config.check_threshold_bound(1000)  # fast: only complete-graph sizes need checking


def test_secagg_config_rejects_bad_graph_settings():
    from privfl.errors import ConfigError
    from privfl.protocols.secagg import SecAggConfig

    for bad in ({"neighbours": "sparse"}, {"neighbours": 0}, {"neighbours": True}, {"dropout_rate": 1.0}, {"corruption_rate": 0.5}):
        with pytest.raises(ConfigError):
            SecAggConfig(**bad)


def test_the_run_config_takes_the_graph_settings_from_toml():
    from privfl.config import config_from_dict

    for value, expected in (("auto", "auto"), ("complete", "complete"), (14, 14)):
        config = config_from_dict({"federation": {"protection": "secagg", "secagg": {"neighbours": value, "dropout_rate": 0.2}}})
        assert config.federation.secagg.neighbours == expected and config.federation.secagg.dropout_rate == 0.2
