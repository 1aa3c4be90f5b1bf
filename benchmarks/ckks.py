"""CKKS aggregation cost against plaintext FedAvg and against raw TenSEAL with common defaults.

Prints one table of times, bytes and ratios, all measured in this run:

    python benchmarks/ckks.py                 # 100k and 1M parameters, 10 clients
    python benchmarks/ckks.py --dims 100000 --clients 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from privfl.config import CkksConfig
from privfl.protocols.base import ClientUpdate
from privfl.protocols.ckks import CkksClient, CkksKeyHolder, CkksServer, SiteIdentity
from privfl.protocols.plaintext import PlaintextProtection, PlaintextServer


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def raw_tenseal(updates: list[np.ndarray]) -> dict[str, float]:
    """What a user gets from TenSEAL's commonly shown CKKS defaults (N=8192, [60,40,40,60], scale 2^40)."""
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2**40
    slots = 4096
    blobs, enc = [], 0.0
    for u in updates:
        parts, t = _timed(lambda u=u: [ts.ckks_vector(ctx, u[i : i + slots]).serialize() for i in range(0, len(u), slots)])
        enc += t
        blobs.append(parts)

    def aggregate():
        acc = [ts.ckks_vector_from(ctx, p) for p in blobs[0]]
        for parts in blobs[1:]:
            acc = [a + ts.ckks_vector_from(ctx, p) for a, p in zip(acc, parts, strict=True)]
        return [a.serialize() for a in acc]

    _, agg = _timed(aggregate)
    return {"encrypt": enc / len(updates), "aggregate": agg, "bytes": float(sum(map(len, blobs[0])))}


def bench(dim: int, num_clients: int, seed: int) -> list[tuple[str, float, float, float]]:
    rng = np.random.default_rng(seed)
    updates = {f"c{i}": ClientUpdate(delta=rng.normal(0, 0.01, dim).astype(np.float32), weight=float(rng.integers(50, 500))) for i in range(num_clients)}

    # Plaintext FedAvg through the same byte-level protocol.
    plain = PlaintextProtection()
    messages, t_plain_client = {}, 0.0
    for c, u in updates.items():
        msg, t = _timed(lambda c=c, u=u: plain._protect(0, c, u, num_clients))
        messages[c] = msg
        t_plain_client += t
    _, t_plain_server = _timed(lambda: PlaintextServer(dim).aggregate(0, messages))
    plain_bytes = len(messages["c0"])

    config = CkksConfig()
    holder, t_keygen = _timed(lambda: CkksKeyHolder(config))
    client = CkksClient(holder.public_context(), config, run_id=holder.run_id)
    identities = {c: SiteIdentity.generate(c) for c in updates}
    for c, identity in identities.items():
        holder.register_site(c, identity.public_bytes())
    enc, t_enc = {}, 0.0
    for c, u in updates.items():
        # Encryption and the Ed25519 signature over the ciphertexts: what a site really does.
        msg, t = _timed(lambda c=c, u=u: client.encrypt(0, c, u, num_clients, identity=identities[c]))
        enc[c] = msg
        t_enc += t
    server = CkksServer(holder.public_context(), config, dim, run_id=holder.run_id, sites=holder.sites())
    agg, t_server = _timed(lambda: server.aggregate(0, enc))
    # The key holder verifies every signed contribution, sums the ciphertexts itself and decrypts.
    _, t_dec = _timed(lambda: holder.decrypt_sum(0, agg.payload, dim))
    ckks_bytes = len(enc["c0"])

    raw = raw_tenseal([u.delta.astype(np.float64) for u in updates.values()])
    float32 = 4 * dim
    return [
        ("client: protect (s/client)", t_plain_client / num_clients, t_enc / num_clients, raw["encrypt"]),
        ("server: check + forward / sum (s)", t_plain_server, t_server, raw["aggregate"]),
        ("key holder: verify, sum, decrypt (s)", 0.0, t_dec, float("nan")),
        ("key generation (s, once)", 0.0, t_keygen, float("nan")),
        ("upload bytes per client", plain_bytes, ckks_bytes, raw["bytes"]),
        ("upload / float32 bytes", plain_bytes / float32, ckks_bytes / float32, raw["bytes"] / float32),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"CKKS (privfl defaults: N=8192, one 52-bit data prime, scale 2^32) vs plaintext FedAvg vs raw TenSEAL "
          f"(N=8192, [60,40,40,60], scale 2^40); {args.clients} clients")
    header = f"| {'params':>9} | {'measure':<36} | {'plaintext':>11} | {'privfl CKKS':>11} | {'raw TenSEAL':>11} | {'CKKS/plain':>10} | {'CKKS/raw':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for dim in args.dims:
        for name, p, c, r in bench(dim, args.clients, args.seed):
            ratio_p = c / p if p else float("nan")
            ratio_r = c / r if r == r and r else float("nan")
            fmt = (lambda v: f"{v:11,.0f}") if "bytes per" in name else (lambda v: f"{v:11.4f}")
            print(f"| {dim:>9,} | {name:<36} | {fmt(p)} | {fmt(c)} | {fmt(r)} | {ratio_p:10.2f} | {ratio_r:8.2f} |")


if __name__ == "__main__":
    main()
