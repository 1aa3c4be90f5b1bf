"""What the hardening costs (marked slow): before/after timings, bytes and release error, printed as a table.

    .venv/bin/python tests/protocols/test_ckks_cost.py --clients 10 --dim 100000

"Before" is the pre-hardening path, rebuilt here from TenSEAL directly: the server deserializes
every client's vectors with TenSEAL and adds them, and the key holder downloads and decrypts that one
sum. "After" is privfl's path: the server parses (ckks_wire) and checks signatures, and forwards the
signed contributions; the key holder re-checks them, sums them itself and floods the decryption.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import numpy as np
import pytest
import tenseal as ts

from privfl.config import CkksConfig
from privfl.protocols.base import ClientUpdate
from privfl.protocols.ckks import CkksClient, CkksKeyHolder, CkksServer, SiteIdentity
from privfl.protocols.ckks_wire import parse_vector
from privfl.protocols.oneshot import KIND_UPDATE
from privfl.protocols.wire import decode_frame


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _parse_in_worker(args):
    data, layout, size = args
    return parse_vector(data, layout, size)


def measure(num_clients: int, dim: int, seed: int = 0) -> dict[str, float]:
    config = CkksConfig()
    rng = np.random.default_rng(seed)
    updates = {
        f"c{i}": ClientUpdate(delta=rng.normal(0, 0.01, dim).astype(np.float32), weight=float(rng.integers(50, 500)))
        for i in range(num_clients)
    }
    holder = CkksKeyHolder(config)
    client = CkksClient(holder.public_context(), config, run_id=holder.run_id)
    identities = {c: SiteIdentity.generate(c) for c in updates}
    for c, identity in identities.items():
        holder.register_site(c, identity.public_bytes())
    messages = {c: client.encrypt(0, c, u, num_clients, identity=identities[c]) for c, u in updates.items()}
    parts = {c: decode_frame(m, kind=KIND_UPDATE, round_index=0).parts[1:] for c, m in messages.items()}
    out: dict[str, float] = {"upload bytes per client": float(len(messages["c0"]))}

    # Before: TenSEAL deserializes and adds on the server; the key holder decrypts one sum.
    public = ts.context_from(holder.public_context())

    def old_server():
        acc = None
        for c in updates:
            vectors = [ts.ckks_vector_from(public, p) for p in parts[c]]
            acc = vectors if acc is None else [a + v for a, v in zip(acc, vectors, strict=True)]
        return [a.serialize() for a in acc]

    old_sum, out["before: server s"] = _timed(old_server)
    out["before: key holder download bytes"] = float(sum(map(len, old_sum)))
    exact, out["before: key holder s"] = _timed(
        lambda: np.concatenate([np.asarray(ts.ckks_vector_from(holder._secret_context, p).decrypt()) for p in old_sum])
    )

    # After.
    server = CkksServer(holder.public_context(), config, dim, run_id=holder.run_id, sites=holder.sites())
    aggregate, out["after: server s"] = _timed(lambda: server.aggregate(0, messages))
    out["after: key holder download bytes"] = float(len(aggregate.payload))
    released, out["after: key holder s"] = _timed(lambda: holder.decrypt_sum(0, aggregate.payload, dim))

    # The release error, against the plaintext weighted sum.
    plain = sum(u.weight * u.delta.astype(np.float64) for u in updates.values())
    total = sum(u.weight for u in updates.values())
    out["exact decryption: weighted-sum error std"] = float(np.std(exact[:dim] - plain))
    out["released: weighted-sum error std"] = float(np.std(released.weighted_sum - plain))
    out["exact decryption: average rel. L2 error"] = float(np.linalg.norm(exact[:dim] / exact[dim] - plain / total) / np.linalg.norm(plain / total))
    out["released: average rel. L2 error"] = float(
        np.linalg.norm(released.weighted_sum / released.total_weight - plain / total) / np.linalg.norm(plain / total)
    )
    out["fresh error std (key holder's measurement)"] = holder.fresh_error

    # Sandbox question: parsing one client's message here vs in a worker process vs TenSEAL itself.
    layout, sizes = holder.layout, [min(config.slots, dim + 1 - i * config.slots) for i in range(len(parts["c0"]))]
    _, out["parse one message in process s"] = _timed(lambda: [parse_vector(p, layout, s) for p, s in zip(parts["c0"], sizes, strict=True)])
    _, out["TenSEAL deserialize one message s"] = _timed(lambda: [ts.ckks_vector_from(public, p) for p in parts["c0"]])
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pool.map(_parse_in_worker, [(parts["c0"][0], layout, sizes[0])])  # warm the worker
        _, out["parse one message in a worker process s"] = _timed(
            lambda: pool.map(_parse_in_worker, [(p, layout, s) for p, s in zip(parts["c0"], sizes, strict=True)])
        )
    return out


@pytest.mark.slow
def test_cost_figures_are_consistent():
    out = measure(3, 10_000)
    # the key holder downloads every accepted contribution: about k uploads
    assert out["after: key holder download bytes"] >= 3 * out["upload bytes per client"] - 100
    assert out["released: average rel. L2 error"] <= 1e-6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--dim", type=int, default=100_000)
    args = parser.parse_args()
    for name, value in measure(args.clients, args.dim).items():
        print(f"| {name:45s} | {value:14.6g} |")


if __name__ == "__main__":
    main()
