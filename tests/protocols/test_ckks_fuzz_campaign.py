"""The long CKKS fuzz campaign (marked slow): 20,000 inputs per decoder, outcomes counted.

Run once and report::

    .venv/bin/python tests/protocols/test_ckks_fuzz_campaign.py --inputs 20000
    .venv/bin/python -m pytest tests/protocols/test_ckks_fuzz_campaign.py -m slow -q -p no:cacheprovider

Each input is a valid message with random byte flips, a truncation, a splice, random bytes, or a
structured mutation of the proto / SEAL fields. Accepted inputs must be genuinely valid; rejected
ones must raise the decoder's typed error; any other exception fails the campaign, and a crash would
end the process (no crasher is known to reach TenSEAL through these decoders).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_ckks_fuzz import DIM, SITES, _raw_is_valid, as_zlib, flip, splice, truncate, world

from privfl.errors import DecryptionError, MessageError, PrivflError
from privfl.protocols.base import SERVER
from privfl.protocols.ckks_wire import encode_ciphertext, encode_proto, parse_vector
from privfl.protocols.oneshot import KIND_AGGREGATE, KIND_AVERAGE, decode_average
from privfl.protocols.wire import encode_frame

_U64_EDGES = [0, 1, 2, 3, 4095, 4096, 4097, 8192, 16384, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1]
_FLOAT_EDGES = [0.0, 1.0, 2.0**31, 2.0**32, 2.0**33, float("nan"), float("inf"), 5e-324]
_SIZES = [0, 1, DIM, DIM + 1, DIM + 2, 4096, 4097, 4396, 2**32 - 1]


def _mutate(valid: bytes, rng: np.random.Generator) -> bytes:
    kind = rng.integers(5)
    if kind == 0:
        return flip(valid, [(int(rng.integers(2**31)), int(rng.integers(256))) for _ in range(rng.integers(1, 9))])
    if kind == 1:
        return truncate(valid, int(rng.integers(2**31)))
    if kind == 2:
        return splice(valid, int(rng.integers(2**31)), int(rng.integers(4096)), rng.bytes(int(rng.integers(65))))
    if kind == 3:
        return rng.bytes(int(rng.integers(513)))
    # a few flips in the first 200 bytes, where the frame, proto and SEAL headers live
    return flip(valid, [(int(rng.integers(200)), int(rng.integers(256))) for _ in range(rng.integers(1, 4))])


def _pick(seq, rng: np.random.Generator):
    # Python-level choice: numpy would turn 2^64 - 1 into a float.
    return seq[int(rng.integers(len(seq)))]


def _structured(rng: np.random.Generator) -> bytes:
    w = world()
    raw = w.raw
    fields = {
        "parms_id": lambda: tuple(_pick(_U64_EDGES, rng) for _ in range(4)),
        "is_ntt_form": lambda: int(rng.integers(256)),
        "size": lambda: _pick(_U64_EDGES, rng),
        "poly_modulus_degree": lambda: _pick(_U64_EDGES, rng),
        "coeff_modulus_size": lambda: _pick(_U64_EDGES, rng),
        "scale": lambda: _pick(_FLOAT_EDGES, rng),
        "correction_factor": lambda: _pick(_U64_EDGES, rng),
        "seal_version": lambda: (int(rng.integers(256)), int(rng.integers(256))),
        "array_count": lambda: _pick(_U64_EDGES, rng),
    }
    for name in rng.choice(sorted(fields), size=int(rng.choice([0, 0, 1, 2, 3])), replace=False):
        raw = replace(raw, **{name: fields[name]()})
    if rng.random() < 0.5:
        words = raw.coefficients.copy()
        if rng.random() < 0.5:
            words = words[: int(rng.integers(words.size))]
        if words.size and rng.random() < 0.7:
            words[int(rng.integers(words.size))] = _pick([*_U64_EDGES, w.layout.modulus - 1, w.layout.modulus], rng)
        raw = replace(raw, coefficients=words)
    crafted, crafted_ok = encode_ciphertext(raw), _raw_is_valid(raw)
    if rng.random() < 0.3:
        crafted = as_zlib(crafted)
    if rng.random() < 0.4:
        # the canonical proto around a (possibly mutated) ciphertext: exercises every SEAL field check
        size = DIM + 1 if rng.random() < 0.7 else _pick(_SIZES, rng)
        scale = 2.0**32 if rng.random() < 0.7 else _pick(_FLOAT_EDGES, rng)
        return encode_proto([size], [crafted], scale), crafted_ok and size == DIM + 1 and scale == 2.0**32
    choices = [(crafted, crafted_ok), (w.vector[7:-9], True), (b"", False), (rng.bytes(int(rng.integers(65))), False)]
    picked = [choices[int(rng.integers(len(choices)))] for _ in range(rng.integers(0, 4))]
    sizes = [_pick(_SIZES, rng) for _ in range(rng.integers(0, 4))]
    scale = None if rng.random() < 0.1 else _pick(_FLOAT_EDGES, rng)
    valid = sizes == [DIM + 1] and len(picked) == 1 and picked[0][1] and scale == 2.0**32
    return encode_proto(sizes, [blob for blob, _ in picked], scale), valid


def _expect_valid(item) -> None:
    """Decodes a structured vector; its acceptance must match the independent validity oracle."""
    data, valid = item
    try:
        parse_vector(data, world().layout, DIM + 1)
    except MessageError:
        if valid:
            raise AssertionError("a valid vector was refused") from None
        raise
    if not valid:
        raise AssertionError("an invalid vector was accepted")


def campaign(inputs: int, seed: int = 2026) -> dict[str, dict[str, float]]:
    """Runs every decoder on ``inputs`` inputs; returns counts and timing per decoder."""
    rng = np.random.default_rng(seed)
    w = world()
    results: dict[str, dict[str, float]] = {}
    reasons: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def run(name, make, decode, typed):
        counts: collections.Counter = collections.Counter()
        started = time.perf_counter()
        for _ in range(inputs):
            data = make()
            try:
                decode(data)
            except typed as exc:
                counts["rejected"] += 1
                cause = exc.__cause__ if isinstance(exc, DecryptionError) and exc.__cause__ else exc
                reasons[name][_reason(cause)] += 1
            else:
                counts["accepted"] += 1
        results[name] = {**counts, "inputs": inputs, "seconds": round(time.perf_counter() - started, 1)}

    def server_input():
        if rng.random() < 0.02:
            return w.messages[(0, "alice")]
        if rng.random() < 0.3:
            return w.signed(0, "alice", [_structured(rng)[0]])
        return _mutate(w.messages[(0, "alice")], rng)

    run("server update parser", server_input, lambda d: w.server._parse(0, "alice", d), MessageError)
    run("ciphertext parser (structured)", lambda: _structured(rng), _expect_valid, MessageError)

    def holder_input():
        r = int(rng.integers(4))
        if rng.random() < 0.02:
            return r, w.aggregates[r]
        if rng.random() < 0.5:
            return r, _mutate(w.aggregates[r], rng)
        pool = [*w.messages.values(), w.signed(r, "bob", [_structured(rng)[0]])]
        parts = [pool[int(rng.integers(len(pool)))] for _ in range(rng.integers(0, 5))]
        parts = [_mutate(p, rng) if rng.random() < 0.3 else p for p in parts]
        return r, encode_frame(KIND_AGGREGATE, r, SERVER, parts)

    def holder_decode(item):
        r, data = item
        released = w.holder.decrypt_sum(r, data, DIM)
        assert set(released.contributors) == set(SITES)
        w.holder._decrypted_rounds.clear()

    import tenseal as ts

    real = ts.ckks_vector_from
    loaded = collections.Counter()

    def guard(context, data):
        # privfl may only hand TenSEAL canonical, uncompressed vectors that pass every check.
        data = bytes(data)
        parse_vector(data, w.layout, data[2])
        assert data[12] == 0
        loaded["vectors"] += 1
        return real(context, data)

    ts.ckks_vector_from = guard
    try:
        run("key holder aggregate", holder_input, holder_decode, DecryptionError)
    finally:
        ts.ckks_vector_from = real
    results["key holder aggregate"]["tenseal loads"] = loaded["vectors"]

    def average_input():
        if rng.random() < 0.5:
            return _mutate(w.average, rng)
        values = rng.choice([0.0, 1.0, -1.0, np.nan, np.inf, 1e308], size=DIM)
        weight = float(rng.choice([0.0, -1.0, 10.0, np.nan, np.inf, 5e-324]))
        return encode_frame(KIND_AVERAGE, 0, SERVER, [np.float64(weight).byteswap().tobytes(), values.astype("<f8").tobytes()])

    run("average message", average_input, lambda d: decode_average(0, d, DIM), PrivflError)
    campaign.reasons = reasons  # type: ignore[attr-defined]
    return results


def _reason(exc: BaseException) -> str:
    """The stage that refused an input: the error's reason without its numbers."""
    text = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    return "".join("#" if ch.isdigit() else ch for ch in text)[:90]


@pytest.mark.slow
def test_campaign_20000_inputs_per_decoder():
    results = campaign(20_000)
    for name, row in results.items():
        assert row["accepted"] + row["rejected"] == row["inputs"], (name, row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--top", type=int, default=8, help="rejection reasons to list per decoder")
    args = parser.parse_args()
    results = campaign(args.inputs, args.seed)
    for name, row in results.items():
        extra = f" tenseal_loads={row['tenseal loads']}" if "tenseal loads" in row else ""
        print(
            f"{name:32s} inputs={row['inputs']} accepted={row.get('accepted', 0)} "
            f"rejected={row.get('rejected', 0)} seconds={row['seconds']}{extra}"
        )
        for reason, count in campaign.reasons[name].most_common(args.top):  # type: ignore[attr-defined]
            print(f"    {count:6d}  {reason}")


if __name__ == "__main__":
    main()
