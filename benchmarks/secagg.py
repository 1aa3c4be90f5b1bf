"""Secure aggregation cost against a plaintext numpy sum: client and server time, upload, mask expansion rate.

Usage: python benchmarks/secagg.py [--clients 100] [--dim 1000000] [--dropouts 0,0.1]
                                  [--neighbours auto|heuristic|complete|K] [--corruption-rate 0]
                                  [--server-threads 1,all] [--authenticate-vectors on,off] [--repeats 3]
                                  [--authenticated]

Every variant (dropout x server threads x vector authentication) runs once per repeat, the variants
taking turns, and the plaintext baseline (numpy summing the same float32 vectors, one in-place add
each; one thread) is timed right before each protocol run, so that other work on a shared machine
weighs on both sides alike. Each row gives the median and the min over the repeats of the ratio
server / plaintext, in CPU time (``time.process_time``, the process's CPU; with one server thread,
the server's own) and in wall time. BLAS/OpenMP pools are pinned to one thread; ``server threads`` is
how many threads the server may use to remove the masks.

``--neighbours auto`` takes the degree and threshold from :func:`choose_graph` for the largest
``--dropouts`` rate, ``--corruption-rate`` and ``--target-log2``; ``heuristic`` is 2 ceil(log2 n)
with ``--threshold-fraction``; ``complete`` is classic SecAgg.

``--authenticated`` runs the authenticated mode (Ed25519 identities, the consistency check between
masked input and unmask) and adds the clients' CPU in the consistency step as its own column.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import math
import statistics
import time

import numpy as np

from privfl.protocols.base import DirectTransport
from privfl.protocols.secagg.graph import suggest_neighbours
from privfl.protocols.secagg.keys import IdentityKey
from privfl.protocols.secagg.params import choose_graph
from privfl.protocols.secagg.prg import WORD, apply_masks, mask_key
from privfl.protocols.secagg.quantize import Quantizer
from privfl.protocols.secagg.simulate import drive, new_round, rounding_key


def _clock() -> complex:
    # Wall time in the real part, process CPU time in the imaginary part: one clock for drive()'s
    # per-phase sums that keeps both.
    return complex(time.perf_counter(), time.process_time())


def _best(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def plaintext_sum_seconds(vectors: list[np.ndarray], repeats: int = 3) -> complex:
    """The baseline: summing the float32 vectors with numpy, one in-place add each (fastest of ``repeats``, wall + 1j * CPU)."""
    best = complex(math.inf, math.inf)
    for _ in range(repeats):
        start = _clock()
        acc = np.zeros_like(vectors[0])
        for v in vectors:
            np.add(acc, v, out=acc)
        took = _clock() - start
        best = complex(min(best.real, took.real), min(best.imag, took.imag))
    return best


def expansion_rate(dim: int, streams: int, repeats: int = 3) -> float:
    """uint32 mask words expanded and added per second, single thread."""
    keys = [(mask_key(bytes([i]) * 32, b"bench"), 1) for i in range(streams)]
    acc = np.zeros(dim, dtype=WORD)
    return streams * dim / _best(lambda: apply_masks(acc, keys), repeats)


def run_case(
    vectors: dict[str, np.ndarray],
    *,
    dropout: float,
    threshold: int,
    neighbours: int | None,
    bits: int,
    server_threads: int,
    authenticate_vectors: bool = True,
    identities: dict[str, IdentityKey] | None = None,
) -> dict[str, float]:
    """One protocol run; 'dropout' of the clients go silent after sharing keys (the costliest point)."""
    ids = sorted(vectors)
    n, dim = len(ids), next(iter(vectors.values())).shape[0]
    quantizer = Quantizer(clip_range=1.0, bits=bits, num_clients=n)
    start = time.process_time()
    # Building the round makes every client's two X25519 pairs (and the public graph).
    run = new_round(
        ids, round_index=0, threshold=threshold, neighbours=neighbours, dimension=dim, bits=bits, graph_seed=b"benchmark-graph-seed", identities=identities
    )
    keygen_s = time.process_time() - start
    run.server.threads = server_threads
    run.server.authenticate_vectors = authenticate_vectors
    start = time.process_time()
    encoded = {u: quantizer.encode(vectors[u], rounding_key())[0] for u in ids}
    encode_s = time.process_time() - start
    dropping = ids[:: max(1, round(1 / dropout))][: round(dropout * n)] if dropout > 0 else []
    words, transcript = drive(run, encoded, DirectTransport(), stop_after={u: "share" for u in dropping}, clock=_clock)
    total = quantizer.decode_sum(words)
    survivors = run.server.survivors
    truth = sum(np.clip(vectors[u].astype(np.float64), -1, 1) for u in survivors)
    error = float(np.max(np.abs(total - truth)))
    assert error <= quantizer.max_error(len(survivors)), "decoded sum outside the error bound"
    seconds = transcript.seconds
    upload = np.mean([sum(transcript.bytes_up[u].values()) for u in survivors])
    small_upload = np.mean([sum(b for step, b in transcript.bytes_up[u].items() if step != "masked_input") for u in survivors])
    server = seconds.get("server", 0j)
    return {
        "survivors": len(survivors),
        # Client columns: CPU time per client (the clients run one after another in this process).
        "client_keys_s": (keygen_s + seconds.get("client_advertise", 0j).imag) / n,
        "client_share_s": seconds.get("client_share", 0j).imag / n,
        "client_encode_s": encode_s / n,
        "client_mask_s": seconds.get("client_masked_input", 0j).imag / len(transcript.bytes_up),
        "client_unmask_s": seconds.get("client_unmask", 0j).imag / max(1, len(survivors)),
        "client_check_s": seconds.get("client_consistency", 0j).imag / max(1, len(survivors)),
        "server_s": server.real,
        "server_cpu_s": server.imag,
        "upload_bytes": float(upload),
        "small_upload_bytes": float(small_upload),
        "max_error": error,
        "error_bound": quantizer.max_error(len(survivors)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--dropouts", default="0,0.1", help="comma-separated dropout fractions")
    parser.add_argument("--neighbours", default="auto", help="'auto' (choose_graph), 'heuristic' (2 ceil(log2 n)), 'complete' or an int")
    parser.add_argument("--threshold-fraction", type=float, default=2 / 3, help="t / (k + 1) unless --neighbours auto")
    parser.add_argument("--corruption-rate", type=float, default=0.0, help="for --neighbours auto")
    parser.add_argument("--target-log2", type=float, default=-40.0, help="failure probability target for --neighbours auto")
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--server-threads", default="1,all", help="comma-separated thread counts for the server ('all' = every CPU)")
    parser.add_argument("--authenticate-vectors", default="on", help="comma-separated 'on'/'off': the server verifies each masked vector's GMAC")
    parser.add_argument("--repeats", type=int, default=3, help="protocol runs per variant, variants taking turns")
    parser.add_argument("--authenticated", action="store_true", help="authenticated mode (identities and the consistency check)")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    thread_counts = sorted({cpus if x == "all" else int(x) for x in args.server_threads.split(",")})
    auth_modes = [{"on": True, "off": False}[x.strip()] for x in args.authenticate_vectors.split(",")]
    dropouts = [float(x) for x in args.dropouts.split(",")]

    n, dim = args.clients, args.dim
    if args.neighbours == "auto":
        choice = choose_graph(n, dropout_rate=max(dropouts), corruption_rate=args.corruption_rate, target_failure_log2=args.target_log2)
        neighbours, threshold = choice.neighbours, choice.threshold
        how = f"choose_graph(dropout_rate={max(dropouts):g}, corruption_rate={args.corruption_rate:g}): bound 2^{choice.bound.log2:.1f}"
    else:
        neighbours = {"heuristic": suggest_neighbours(n), "complete": None}.get(args.neighbours, None)
        if args.neighbours not in ("heuristic", "complete"):
            neighbours = int(args.neighbours)
        k = n - 1 if neighbours is None else neighbours
        threshold = max(2, math.ceil(args.threshold_fraction * (k + 1)), (k + 1) // 2 + 1)
        how = f"threshold fraction {args.threshold_fraction:.3g}"
    rng = np.random.default_rng(0)  # benchmark data only
    vectors = {f"client-{i:04d}": rng.uniform(-1, 1, dim).astype(np.float32) for i in range(n)}
    plain_list = list(vectors.values())
    rate1 = expansion_rate(min(dim, 1 << 20), 1)
    rate16 = expansion_rate(min(dim, 1 << 20), 16)
    degree = "complete" if neighbours is None else str(neighbours)
    print(
        f"secure aggregation: {n} clients x {dim} params, neighbours={degree}, t={threshold} ({how}), bits={args.bits}, "
        f"{cpus} CPUs, {args.repeats} repeats, variants interleaved"
    )
    print(f"mask expansion (AES-256 keystream -> uint32, add in place): {rate1 / 1e9:.2f} G words/s (1 stream), {rate16 / 1e9:.2f} G words/s (16 streams fused)")
    identities = {u: IdentityKey.generate() for u in vectors} if args.authenticated else None
    variants = [(d, th, auth) for d in dropouts for th in thread_counts for auth in auth_modes]
    results: dict[tuple[float, int, bool], list[tuple[dict[str, float], complex]]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            dropout, threads, auth = variant
            plain = plaintext_sum_seconds(plain_list)
            r = run_case(
                vectors, dropout=dropout, threshold=threshold, neighbours=neighbours, bits=args.bits, server_threads=threads, authenticate_vectors=auth,
                identities=identities,
            )
            results[variant].append((r, plain))
    check_column = "client consistency CPU ms | " if args.authenticated else ""
    header = (
        "| dropout | t | survivors | client keygen CPU ms | client share CPU ms | client encode CPU ms | client mask CPU ms | "
        f"{check_column}client unmask CPU ms | "
        "server threads | vector GMAC | plaintext CPU ms | server CPU ms | server / plaintext CPU (median, min) | "
        "server / plaintext wall (median, min) | upload / float32 | other upload kB | max error (bound) |"
    )
    print(header)
    print("|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|")
    for variant in variants:
        dropout, threads, auth = variant
        runs = results[variant]
        cpu_ratios = [r["server_cpu_s"] / p.imag for r, p in runs]
        wall_ratios = [r["server_s"] / p.real for r, p in runs]
        med = lambda key, runs=runs: statistics.median(r[key] for r, _ in runs)
        r0 = runs[0][0]
        print(
            f"| {dropout:.0%} | {threshold} | {r0['survivors']} | {med('client_keys_s') * 1e3:.2f} | {med('client_share_s') * 1e3:.2f} | "
            f"{med('client_encode_s') * 1e3:.1f} | {med('client_mask_s') * 1e3:.1f} | "
            + (f"{med('client_check_s') * 1e3:.2f} | " if args.authenticated else "")
            + f"{med('client_unmask_s') * 1e3:.2f} | {threads} | "
            f"{'on' if auth else 'off'} | {statistics.median(p.imag for _, p in runs) * 1e3:.1f} | {med('server_cpu_s') * 1e3:.1f} | "
            f"{statistics.median(cpu_ratios):.2f}x, {min(cpu_ratios):.2f}x | {statistics.median(wall_ratios):.2f}x, {min(wall_ratios):.2f}x | "
            f"{r0['upload_bytes'] / (4 * dim):.4f}x | {r0['small_upload_bytes'] / 1e3:.1f} | {max(r['max_error'] for r, _ in runs):.2e} ({r0['error_bound']:.2e}) |"
        )


if __name__ == "__main__":
    main()
