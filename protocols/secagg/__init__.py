"""Secure aggregation (Bonawitz et al. 2017) with the SecAgg+ neighbour graph (Bell et al. 2020)."""

from privfl.protocols.secagg.client import SecAggClient
from privfl.protocols.secagg.graph import build_graph, suggest_neighbours
from privfl.protocols.secagg.keys import IdentityKey
from privfl.protocols.secagg.params import (
    COMPLETE_GRAPH_MAX_CLIENTS,
    GraphChoice,
    RoundParams,
    choose_graph,
    min_threshold,
)
from privfl.protocols.secagg.protection import SecAggConfig, SecAggProtection
from privfl.protocols.secagg.quantize import Quantizer
from privfl.protocols.secagg.server import SecAggServer
from privfl.protocols.secagg.simulate import SecureSumResult, run_secure_sum

__all__ = [
    "COMPLETE_GRAPH_MAX_CLIENTS",
    "GraphChoice",
    "IdentityKey",
    "Quantizer",
    "RoundParams",
    "SecAggClient",
    "SecAggConfig",
    "SecAggProtection",
    "SecAggServer",
    "SecureSumResult",
    "build_graph",
    "choose_graph",
    "min_threshold",
    "run_secure_sum",
    "suggest_neighbours",
]
