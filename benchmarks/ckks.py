"""CKKS aggregation cost against plaintext FedAvg and against raw TenSEAL with common defaults.

Prints one table of times, bytes and ratios, all measured in this run:

    python benchmarks/ckks.py                 # 100k and 1M parameters, 10 clients, 3 repeats
    python benchmarks/ckks.py --dims 100000 --clients 5 --repeats 5

Each repeat measures the three variants (plaintext, privfl CKKS, raw TenSEAL) in a rotating order, so
load on a shared machine falls on all of them; CPU time (``time.process_time``, every thread of the
process) and wall time are both recorded, and the table gives the median and min over repeats of
the per-repeat ratios. numpy runs on one thread (OMP_NUM_THREADS=1, set before it loads); TenSEAL
uses its default thread pool (one thread per core), for privfl and raw TenSEAL alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy loads

import numpy as np

from privfl.config import CkksConfig
from privfl.protocols.base import ClientUpdate
from privfl.protocols.ckks import CkksClient, CkksKeyHolder, CkksServer, SiteIdentity
from privfl.protocols.plaintext import PlaintextProtection, PlaintextServer

# The measure -> (wall s, CPU s) of one variant in one repeat.
Times = dict[str, tuple[float, float]]


class _Clock:
    """Accumulates wall and CPU seconds of the calls it times."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def __call__(self, fn):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        return out

    @property
    def pair(self) -> tuple[float, float]:
        return self.wall, self.cpu

    def per(self, n: int) -> tuple[float, float]:
        """(wall, CPU) seconds per one of ``n`` calls."""
        return self.wall / n, self.cpu / n


def raw_tenseal(updates: list[np.ndarray]) -> tuple[Times, int]:
    """What a user gets from TenSEAL's commonly shown CKKS defaults (N=8192, [60,40,40,60], scale 2^40)."""
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2**40
    slots = 4096
    blobs = []
    encrypt = _Clock()
    for u in updates:
        blobs.append(encrypt(lambda u=u: [ts.ckks_vector(ctx, u[i : i + slots]).serialize() for i in range(0, len(u), slots)]))

    def aggregate():
        acc = [ts.ckks_vector_from(ctx, p) for p in blobs[0]]
        for parts in blobs[1:]:
            acc = [a + ts.ckks_vector_from(ctx, p) for a, p in zip(acc, parts, strict=True)]
        return [a.serialize() for a in acc]

    server = _Clock()
    server(aggregate)
    n = len(updates)
    return {"client": (encrypt.wall / n, encrypt.cpu / n), "server": server.pair}, sum(map(len, blobs[0]))


def plaintext(updates: dict[str, ClientUpdate]) -> tuple[Times, int]:
    """Plaintext FedAvg through the same byte-level protocol."""
    plain, dim, n = PlaintextProtection(), len(next(iter(updates.values())).delta), len(updates)
    client = _Clock()
    messages = {c: client(lambda c=c, u=u: plain._protect(0, c, u, n)) for c, u in updates.items()}
    server = _Clock()
    server(lambda: PlaintextServer(dim).aggregate(0, messages))
    return {"client": (client.wall / n, client.cpu / n), "server": server.pair}, len(messages["c0"])


def privfl_ckks(updates: dict[str, ClientUpdate]) -> tuple[Times, int]:
    """privfl's hardened path: sign and encrypt, check and forward, verify, sum and decrypt."""
    dim, n = len(next(iter(updates.values())).delta), len(updates)
    config = CkksConfig()
    keygen = _Clock()
    holder = keygen(lambda: CkksKeyHolder(config))
    client = CkksClient(holder.public_context(), config, run_id=holder.run_id)
    identities = {c: SiteIdentity.generate(c) for c in updates}
    for c, identity in identities.items():
        holder.register_site(c, identity.public_bytes())
    encrypt = _Clock()
    # Encryption and the Ed25519 signature over the ciphertexts: what a site really does.
    enc = {c: encrypt(lambda c=c, u=u: client.encrypt(0, c, u, n, identity=identities[c])) for c, u in updates.items()}
    server = CkksServer(holder.public_context(), config, dim, run_id=holder.run_id, sites=holder.sites())
    serve = _Clock()
    agg = serve(lambda: server.aggregate(0, enc))
    # The key holder verifies every signed contribution, sums the ciphertexts itself and decrypts.
    decrypt = _Clock()
    decrypt(lambda: holder.decrypt_sum(0, agg.payload, dim))
    times = {"client": (encrypt.wall / n, encrypt.cpu / n), "server": serve.pair, "key holder": decrypt.pair,
             "key generation": keygen.pair}
    return times, len(enc["c0"])


MEASURES = {
    "client": "client: protect (s/client)",
    "server": "server: check + forward / sum (s)",
    "key holder": "key holder: verify, sum, decrypt (s)",
    "key generation": "key generation (s, once)",
}


def bench(dim: int, num_clients: int, seed: int, repeats: int) -> None:
    rng = np.random.default_rng(seed)
    updates = {f"c{i}": ClientUpdate(delta=rng.normal(0, 0.01, dim).astype(np.float32), weight=float(rng.integers(50, 500)))
               for i in range(num_clients)}
    raw_updates = [u.delta.astype(np.float64) for u in updates.values()]
    variants = {
        "plaintext": lambda: plaintext(updates),
        "privfl": lambda: privfl_ckks(updates),
        "raw": lambda: raw_tenseal(raw_updates),
    }
    runs: dict[str, list[Times]] = {name: [] for name in variants}
    sizes: dict[str, int] = {}
    order = list(variants)
    for r in range(repeats):
        for name in order[r % 3 :] + order[: r % 3]:  # rotate who goes first
            times, size = variants[name]()
            runs[name].append(times)
            sizes[name] = size

    def median(name: str, measure: str, which: int) -> float:
        values = [t[measure][which] for t in runs[name] if measure in t]
        return statistics.median(values) if values else float("nan")

    def ratios(num: str, den: str, measure: str, which: int) -> str:
        pairs = [(a[measure][which], b[measure][which]) for a, b in zip(runs[num], runs[den], strict=True)
                 if measure in a and measure in b and b[measure][which] > 0]
        if not pairs:
            return "-"
        values = [x / y for x, y in pairs]
        return f"{statistics.median(values):.2f} ({min(values):.2f})"

    for measure, label in MEASURES.items():
        print(f"| {dim:>9,} | {label:<36} | {median('plaintext', measure, 1):9.4f} | {median('privfl', measure, 1):9.4f} "
              f"| {median('raw', measure, 1):9.4f} | {ratios('privfl', 'plaintext', measure, 1):>14} "
              f"| {ratios('privfl', 'plaintext', measure, 0):>14} | {ratios('privfl', 'raw', measure, 1):>12} "
              f"| {ratios('privfl', 'raw', measure, 0):>12} |")
    float32 = 4 * dim
    print(f"| {dim:>9,} | {'upload bytes per client':<36} | {sizes['plaintext']:9,} | {sizes['privfl']:9,} | {sizes['raw']:9,} "
          f"| {sizes['privfl'] / sizes['plaintext']:>14.2f} | {'':>14} | {sizes['privfl'] / sizes['raw']:>12.2f} | {'':>12} |")
    print(f"| {dim:>9,} | {'upload / float32 bytes':<36} | {sizes['plaintext'] / float32:9.4f} | "
          f"{sizes['privfl'] / float32:9.2f} | {sizes['raw'] / float32:9.2f} | {'':>14} | {'':>14} | {'':>12} | {'':>12} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median and min of the ratios)")
    args = parser.parse_args()
    print(f"CKKS (privfl defaults: N=8192, one 52-bit data prime, scale 2^32) vs plaintext FedAvg vs raw TenSEAL "
          f"(N=8192, [60,40,40,60], scale 2^40); {args.clients} clients")
    print(f"{args.repeats} repeats, variants interleaved; CPU = process_time over all threads, numpy 1 thread, "
          f"TenSEAL default pool ({os.cpu_count()} cores); times are medians of CPU seconds; ratios: median (min)")
    print("|    params | measure                              | plain CPU | CKKS CPU  | raw CPU   | CKKS/plain CPU "
          "| CKKS/plain wall | CKKS/raw CPU | CKKS/raw wall |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for dim in args.dims:
        bench(dim, args.clients, args.seed, args.repeats)


if __name__ == "__main__":
    main()
