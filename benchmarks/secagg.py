"""Secure aggregation cost against a plaintext numpy sum: client and server time, upload, mask expansion rate.

Usage: python benchmarks/secagg.py [--clients 100] [--dim 1000000] [--dropouts 0,0.1] [--neighbours K]
                                  [--server-threads 1,all] [--repeats 3]

Each row is the fastest of ``--repeats`` protocol runs (the plaintext baseline is likewise the fastest of
3), so that other work on a shared machine inflates neither side. ``server threads`` is how many threads
the server may use to remove the masks; the plaintext baseline always uses one.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np

from privfl.protocols.base import DirectTransport
from privfl.protocols.secagg.graph import suggest_neighbours
from privfl.protocols.secagg.prg import WORD, apply_masks, mask_key
from privfl.protocols.secagg.quantize import Quantizer
from privfl.protocols.secagg.simulate import drive, new_round, rounding_key


def _best(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def plaintext_sum_seconds(vectors: list[np.ndarray], repeats: int = 3) -> float:
    """Time of the baseline: summing the float32 vectors with numpy, one in-place add each."""

    def run() -> None:
        acc = np.zeros_like(vectors[0])
        for v in vectors:
            np.add(acc, v, out=acc)

    return _best(run, repeats)


def expansion_rate(dim: int, streams: int, repeats: int = 3) -> float:
    """uint32 mask words expanded and added per second, single thread."""
    keys = [(mask_key(bytes([i]) * 32, b"bench"), 1) for i in range(streams)]
    acc = np.zeros(dim, dtype=WORD)
    return streams * dim / _best(lambda: apply_masks(acc, keys), repeats)


def run_case(
    vectors: dict[str, np.ndarray], *, dropout: float, threshold_fraction: float, neighbours: int | None, bits: int, server_threads: int
) -> dict[str, float]:
    """One protocol run; 'dropout' of the clients go silent after sharing keys (the costliest point)."""
    ids = sorted(vectors)
    n, dim = len(ids), next(iter(vectors.values())).shape[0]
    k = n - 1 if neighbours is None else neighbours
    threshold = max(2, math.ceil(threshold_fraction * (k + 1)))
    quantizer = Quantizer(clip_range=1.0, bits=bits, num_clients=n)
    start = time.perf_counter()
    # Building the round makes every client's two X25519 pairs (and the public graph).
    run = new_round(ids, round_index=0, threshold=threshold, neighbours=neighbours, dimension=dim, bits=bits, graph_seed=b"benchmark-graph-seed")
    keygen_s = time.perf_counter() - start
    run.server.threads = server_threads
    start = time.perf_counter()
    encoded = {u: quantizer.encode(vectors[u], rounding_key())[0] for u in ids}
    encode_s = time.perf_counter() - start
    dropping = ids[:: max(1, round(1 / dropout))][: round(dropout * n)] if dropout > 0 else []
    words, transcript = drive(run, encoded, DirectTransport(), stop_after={u: "share" for u in dropping})
    total = quantizer.decode_sum(words)
    survivors = run.server.survivors
    truth = sum(np.clip(vectors[u].astype(np.float64), -1, 1) for u in survivors)
    error = float(np.max(np.abs(total - truth)))
    assert error <= quantizer.max_error(len(survivors)), "decoded sum outside the error bound"
    seconds = transcript.seconds
    upload = np.mean([sum(transcript.bytes_up[u].values()) for u in survivors])
    return {
        "threshold": threshold,
        "survivors": len(survivors),
        "client_keys_s": (keygen_s + seconds.get("client_advertise", 0.0)) / n,
        "client_share_s": seconds.get("client_share", 0.0) / n,
        "client_encode_s": encode_s / n,
        "client_mask_s": seconds.get("client_masked_input", 0.0) / len(transcript.bytes_up),
        "client_unmask_s": seconds.get("client_unmask", 0.0) / max(1, len(survivors)),
        "server_s": seconds.get("server", 0.0),
        "upload_bytes": float(upload),
        "max_error": error,
        "error_bound": quantizer.max_error(len(survivors)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--dropouts", default="0,0.1", help="comma-separated dropout fractions")
    parser.add_argument("--neighbours", default="auto", help="SecAgg+ degree, 'auto' (2 ceil(log2 n)) or 'complete'")
    parser.add_argument("--threshold-fraction", type=float, default=2 / 3)
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--server-threads", default="1,all", help="comma-separated thread counts for the server ('all' = every CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="protocol runs per row; the fastest server time is reported")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    thread_counts = [cpus if x == "all" else int(x) for x in args.server_threads.split(",")]

    n, dim = args.clients, args.dim
    neighbours = {"auto": suggest_neighbours(n), "complete": None}.get(args.neighbours)
    if neighbours is None and args.neighbours not in ("complete",):
        neighbours = int(args.neighbours)
    rng = np.random.default_rng(0)  # benchmark data only
    vectors = {f"client-{i:04d}": rng.uniform(-1, 1, dim).astype(np.float32) for i in range(n)}
    plain = plaintext_sum_seconds(list(vectors.values()))
    rate1 = expansion_rate(min(dim, 1 << 20), 1)
    rate16 = expansion_rate(min(dim, 1 << 20), 16)
    degree = "complete" if neighbours is None else str(neighbours)
    print(f"secure aggregation: {n} clients x {dim} params, neighbours={degree}, bits={args.bits}, {cpus} CPUs, best of {args.repeats}")
    print(f"plaintext numpy sum of the float32 vectors: {plain * 1e3:.1f} ms")
    print(f"mask expansion (AES-256-CTR -> uint32, add in place): {rate1 / 1e9:.2f} G words/s (1 stream), {rate16 / 1e9:.2f} G words/s (16 streams fused)")
    header = (
        "| dropout | t | survivors | client keygen ms | client share ms | client encode ms | client mask ms | "
        "server threads | server ms | server / plaintext | upload / float32 | max error (bound) |"
    )
    print(header)
    print("|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|")
    for dropout in (float(x) for x in args.dropouts.split(",")):
        for threads in thread_counts:
            runs = [
                run_case(vectors, dropout=dropout, threshold_fraction=args.threshold_fraction, neighbours=neighbours, bits=args.bits, server_threads=threads)
                for _ in range(args.repeats)
            ]
            r = min(runs, key=lambda x: x["server_s"])
            print(
                f"| {dropout:.0%} | {r['threshold']} | {r['survivors']} | {r['client_keys_s'] * 1e3:.2f} | {r['client_share_s'] * 1e3:.2f} | "
                f"{r['client_encode_s'] * 1e3:.1f} | {r['client_mask_s'] * 1e3:.1f} | {threads} | {r['server_s'] * 1e3:.1f} | "
                f"{r['server_s'] / plain:.2f}x | {r['upload_bytes'] / (4 * dim):.4f}x | {r['max_error']:.2e} ({r['error_bound']:.2e}) |"
            )


if __name__ == "__main__":
    main()
