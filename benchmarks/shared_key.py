"""Shared-key aggregation cost against plaintext FedAvg and against TenSEAL run as NVIDIA FLARE runs it.

Prints one table of CPU times, bytes and ratios, all measured in this run:

    python benchmarks/shared_key.py                  # 100k and 1M parameters, 10 clients, 3 repeats
    python benchmarks/shared_key.py --dims 1000000 --clients 10 --repeats 5

Variants, each through its real code path:

* ``plain``: privfl's plaintext protocol (float32 on the wire, summed in float64);
* ``sk-1`` / ``sk-2``: privfl's shared-key mode (:mod:`privfl.protocols.shared_key`) with one or two
  32-bit primes: a site clips, weights, quantizes, encrypts and signs; the server checks and adds;
  one site verifies the signed seeds, expands them, decrypts and decodes;
* ``tenseal``: TenSEAL with NVIDIA FLARE's provisioning defaults (``HEBuilder``: CKKS, N = 8192,
  coefficient moduli [60, 40, 40], scale 2^40, symmetric encryption, every site holding the secret
  key): encrypt and serialize, server deserializes and adds, one site decrypts. No signatures.

Each repeat runs the variants in a rotating order, so load on a shared machine falls on all of them;
CPU time (``time.process_time``) and wall time are recorded, and the table gives the median of the
CPU seconds and the median and min of the per-repeat ratios. One thread everywhere: numpy through
OMP_NUM_THREADS=1 (set before it loads) and TenSEAL through ``n_threads=1``.
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy loads

import numpy as np

# The clock and the plaintext baseline are benchmarks/ckks.py's (this script's folder is on sys.path).
from ckks import Times, _Clock, plaintext

from privfl.protocols.base import ClientUpdate
from privfl.protocols.shared_key import RoundEncoding, SharedKeyConfig, SharedKeyProtection, SharedKeyServer


def shared_key(updates: dict[str, ClientUpdate], limbs: int, round_index: int) -> tuple[Times, int]:
    dim, n = len(next(iter(updates.values())).delta), len(updates)
    protection = SharedKeyProtection(SharedKeyConfig(limbs=limbs, clip_range=1.0))
    encoding = RoundEncoding.for_round(protection.config, dim, n)
    bound = max(u.weight for u in updates.values())
    identities = {c: protection._identity(c) for c in updates}  # set-up: registration, not timed
    client = _Clock()
    messages = {
        c: client(lambda c=c, u=u: protection._client.encrypt(round_index, u, encoding, weight_bound=bound, identity=identities[c])[0])
        for c, u in updates.items()
    }
    server = SharedKeyServer(encoding, run_id=protection.run_id, sites=protection.decryptor.sites())
    serve = _Clock()
    aggregate = serve(lambda: server.aggregate(round_index, messages))
    decrypt = _Clock()
    released = decrypt(lambda: protection.decryptor.decrypt(round_index, aggregate.payload, encoding))
    assert len(released.contributors) == n
    return {"client": client.per(n), "server": serve.per(1), "decrypt": decrypt.per(1)}, len(messages["c0"])


def tenseal_flare(updates: dict[str, ClientUpdate]) -> tuple[Times, int]:
    import tenseal as ts

    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=[60, 40, 40],
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        n_threads=1,
    )
    ctx.global_scale = 2**40
    slots = 4096
    n = len(updates)
    client = _Clock()
    blobs = []
    for u in updates.values():
        # FedAvg weighting as the sites do it: the weighted update, then sum on the server.
        values = (u.weight * u.delta.astype(np.float64)).tolist()
        blobs.append(client(lambda v=values: [ts.ckks_vector(ctx, v[i : i + slots]).serialize() for i in range(0, len(v), slots)]))

    def aggregate():
        acc = [ts.ckks_vector_from(ctx, p) for p in blobs[0]]
        for parts in blobs[1:]:
            for a, p in zip(acc, parts, strict=True):
                a += ts.ckks_vector_from(ctx, p)
        return [a.serialize() for a in acc]

    serve = _Clock()
    summed = serve(aggregate)
    decrypt = _Clock()
    decrypt(lambda: np.concatenate([ts.ckks_vector_from(ctx, p).decrypt() for p in summed]))
    return {"client": client.per(n), "server": serve.per(1), "decrypt": decrypt.per(1)}, sum(map(len, blobs[0]))


MEASURES = {
    "client": "site: protect one update (s)",
    "server": "server: check + sum all (s)",
    "decrypt": "one site: verify + decrypt (s)",
}
VARIANTS = ("plain", "sk-1", "sk-2", "tenseal")


def bench(dim: int, num_clients: int, seed: int, repeats: int) -> None:
    rng = np.random.default_rng(seed)  # benchmark data only
    updates = {
        f"c{i}": ClientUpdate(delta=rng.normal(0, 0.01, dim).astype(np.float32), weight=float(rng.integers(50, 500)))
        for i in range(num_clients)
    }
    runs: dict[str, list[Times]] = {name: [] for name in VARIANTS}
    sizes: dict[str, int] = {}
    for r in range(repeats):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for name in order:
            if name == "plain":
                times, size = plaintext(updates)
            elif name == "tenseal":
                times, size = tenseal_flare(updates)
            else:
                times, size = shared_key(updates, int(name[-1]), r)
            runs[name].append(times)
            sizes[name] = size

    def median(name: str, measure: str) -> str:
        values = [t[measure][1] for t in runs[name] if measure in t]
        return f"{statistics.median(values):.4f}" if values else "-"

    def ratio(num: str, den: str, measure: str, which: int = 1) -> str:
        values = [a[measure][which] / b[measure][which] for a, b in zip(runs[num], runs[den], strict=True)
                  if measure in a and measure in b and b[measure][which] > 0]
        return f"{statistics.median(values):.2f} ({min(values):.2f})" if values else "-"

    for measure, label in MEASURES.items():
        cells = " | ".join(median(v, measure) for v in VARIANTS)
        print(f"| {dim:>9,} | {label:<31} | {cells} | {ratio('sk-1', 'plain', measure)} | {ratio('sk-2', 'plain', measure)} "
              f"| {ratio('sk-1', 'tenseal', measure)} | {ratio('sk-2', 'tenseal', measure)} |")
    float32 = 4 * dim
    cells = " | ".join(f"{sizes[v] / float32:.3f}" for v in VARIANTS)
    print(f"| {dim:>9,} | {'upload / float32 bytes':<31} | {cells} | | | "
          f"{sizes['sk-1'] / sizes['tenseal']:.3f} | {sizes['sk-2'] / sizes['tenseal']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median and min of the ratios)")
    args = parser.parse_args()
    print(f"{args.clients} clients; {args.repeats} repeats, variants rotating; one thread (numpy and TenSEAL); "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print("CPU seconds are medians; ratios: median (min) of the per-repeat CPU ratios")
    print("|    params | measure                         | plain | sk-1 | sk-2 | tenseal (FLARE) | sk-1/plain | sk-2/plain "
          "| sk-1/tenseal | sk-2/tenseal |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dim in args.dims:
        bench(dim, args.clients, args.seed, args.repeats)
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
