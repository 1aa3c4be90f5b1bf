"""Tests of the secure-aggregation building blocks: Shamir, mask PRG, quantizer, graph, randomness sources."""

from __future__ import annotations

import itertools
import pathlib
import re
import secrets

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from privfl.errors import ConfigError, ProtocolError
from privfl.protocols.secagg import graph as g
from privfl.protocols.secagg import shamir
from privfl.protocols.secagg.prg import WORD, apply_masks, expand, mask_key
from privfl.protocols.secagg.quantize import Quantizer

SECAGG_DIR = pathlib.Path(__file__).resolve().parents[2] / "protocols" / "secagg"


# -- Shamir ---------------------------------------------------------------------------------------
def _is_probable_prime(n: int) -> bool:
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41):
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def test_field_is_prime_and_holds_32_byte_secrets():
    assert _is_probable_prime(shamir.PRIME)
    assert shamir.PRIME > 1 << 256
    assert not _is_probable_prime(shamir.PRIME + 2)  # the check can say no


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 20), data=st.data())
def test_any_threshold_shares_rebuild_the_secret(n, data):
    t = data.draw(st.integers(1, n))
    secret = data.draw(st.integers(0, (1 << 256) - 1))
    xs = list(range(1, n + 1))
    shares = shamir.split(secret, t, xs)
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=t, max_size=n, unique=True))
    assert shamir.reconstruct({x: shares[x] for x in subset}, t) == secret
    if t > 1:
        fewer = {x: shares[x] for x in subset[: t - 1]}
        with pytest.raises(ProtocolError, match="shares < threshold"):
            shamir.reconstruct(fewer, t)
        # Interpolating t-1 shares plus a wrong point does not give the secret back.
        assert shamir.reconstruct({**fewer, **{x: shares[x] for x in subset[t - 1 : t]}}, t) == secret


def test_t_minus_1_shares_are_consistent_with_every_secret_small_field():
    # Over GF(17) with t = 3, enumerate every degree-2 polynomial: for two fixed shares, each candidate
    # secret is explained by exactly one polynomial, so the shares say nothing about the secret.
    p, t = 17, 3
    observed_x = (4, 9)
    observed = shamir.split(5, t, [1, 4, 9, 12], prime=p)
    counts = {s: 0 for s in range(p)}
    for coefficients in itertools.product(range(p), repeat=t):
        if all(sum(c * x**i for i, c in enumerate(coefficients)) % p == observed[x] for x in observed_x):
            counts[coefficients[0]] += 1
    assert set(counts.values()) == {1}
    # ...whereas with t shares only the true secret survives.
    three = (1, 4, 9)
    consistent = {
        coefficients[0]
        for coefficients in itertools.product(range(p), repeat=t)
        if all(sum(c * x**i for i, c in enumerate(coefficients)) % p == observed[x] for x in three)
    }
    assert consistent == {5}


def _solve_mod(matrix: list[list[int]], rhs: list[int], p: int) -> list[int]:
    """Gaussian elimination mod p (test helper)."""
    n = len(rhs)
    a = [[*row, r] for row, r in zip(matrix, rhs, strict=True)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if a[r][col] % p)
        a[col], a[pivot] = a[pivot], a[col]
        inv = pow(a[col][col], -1, p)
        a[col] = [v * inv % p for v in a[col]]
        for r in range(n):
            if r != col and a[r][col]:
                factor = a[r][col]
                a[r] = [(v - factor * w) % p for v, w in zip(a[r], a[col], strict=True)]
    return [a[r][n] for r in range(n)]


def test_t_minus_1_shares_fit_a_sharing_of_any_secret_in_the_real_field():
    # In GF(PRIME): for every candidate s', the t-1 observed shares and f(0) = s' fix a unique polynomial
    # of degree t-1 (Vandermonde is invertible), i.e. a valid sharing of s' that produces exactly them.
    t, xs = 4, [1, 2, 3, 4, 5, 6]
    secret = secrets.randbelow(1 << 256)
    shares = shamir.split(secret, t, xs)
    known = xs[: t - 1]
    p = shamir.PRIME
    for candidate in (0, 1, secret, (1 << 256) - 1, secrets.randbelow(1 << 256)):
        points = [0, *known]
        values = [candidate, *(shares[x] for x in known)]
        coefficients = _solve_mod([[pow(x, i, p) for i in range(t)] for x in points], values, p)
        assert coefficients[0] == candidate
        for x in known:
            assert sum(c * pow(x, i, p) for i, c in enumerate(coefficients)) % p == shares[x]
        forged = {x: sum(c * pow(x, i, p) for i, c in enumerate(coefficients)) % p for x in xs}
        assert shamir.reconstruct({x: forged[x] for x in xs[-t:]}, t) == candidate


def test_split_rejects_bad_arguments():
    with pytest.raises(ProtocolError):
        shamir.split(1, 0, [1, 2])
    with pytest.raises(ProtocolError):
        shamir.split(1, 2, [1, 1])
    with pytest.raises(ProtocolError):
        shamir.split(shamir.PRIME, 2, [1, 2])


# -- PRG ------------------------------------------------------------------------------------------
def test_prg_is_deterministic_per_key_and_differs_across_keys():
    a, b = mask_key(b"\x01" * 32, b"label"), mask_key(b"\x02" * 32, b"label")
    assert a != mask_key(b"\x01" * 32, b"other")
    assert np.array_equal(expand(a, 1000), expand(a, 1000))
    assert not np.array_equal(expand(a, 1000), expand(b, 1000))
    assert np.array_equal(expand(a, 1000)[:10], expand(a, 10))


def test_chunked_application_matches_whole_expansion():
    keys = [mask_key(secrets.token_bytes(32), b"t") for _ in range(3)]
    addend = np.arange(1001, dtype=WORD)
    expected = (addend.astype(np.uint64) + expand(keys[0], 1001) - expand(keys[1], 1001) + expand(keys[2], 1001)) % (1 << 32)
    for chunk in (7, 64, 1000, 1 << 15):
        acc = np.zeros(1001, dtype=WORD)
        apply_masks(acc, [(keys[0], 1), (keys[1], -1), (keys[2], 1)], [addend], chunk_words=chunk)
        assert np.array_equal(acc, expected.astype(WORD))


@pytest.mark.parametrize("length", [1001, 4096, 70_003])
def test_threaded_application_matches_one_thread(length, monkeypatch):
    import privfl.protocols.secagg.prg as prg

    monkeypatch.setattr(prg, "PARALLEL_MIN_WORDS", 1)  # force the threaded path on small vectors
    keys = [(mask_key(secrets.token_bytes(32), b"t"), sign) for sign in (1, -1, 1, -1, 1)]
    addend = np.arange(length, dtype=WORD)
    expected = np.zeros(length, dtype=WORD)
    apply_masks(expected, keys, [addend], threads=1)
    assert np.array_equal(expected[:10], (addend[:10].astype(np.int64) + sum(s * expand(k, 10).astype(np.int64) for k, s in keys)) % (1 << 32))
    for threads, chunk in [(2, 64), (3, 7), (4, 1000), (8, 1 << 15)]:
        acc = np.zeros(length, dtype=WORD)
        apply_masks(acc, keys, [addend], chunk_words=chunk, threads=threads)
        assert np.array_equal(acc, expected), (threads, chunk)


def _reference_stream(key: bytes, length: int, segment_words: int) -> np.ndarray:
    # The documented definition, block by block with AES-ECB: block i of segment j is
    # AES(key, j as 96 bits || i + 2 as 32 bits).
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    blocks = []
    for b in range(-(-length // 4)):
        segment, block = divmod(4 * b, segment_words)
        blocks.append(segment.to_bytes(12, "big") + (block // 4 + 2).to_bytes(4, "big"))
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return np.frombuffer(ecb.update(b"".join(blocks)), dtype=WORD)[:length]


def test_prg_matches_its_documented_counter_blocks(monkeypatch):
    import privfl.protocols.secagg.prg as prg

    key = mask_key(secrets.token_bytes(32), b"kat")
    length = 2 * prg.SEGMENT_WORDS + 1003
    assert np.array_equal(expand(key, length), _reference_stream(key, length, prg.SEGMENT_WORDS))
    # Small segments: every slice start (GCM at a segment boundary, CTR inside one) gives the same words.
    monkeypatch.setattr(prg, "SEGMENT_WORDS", 256)
    monkeypatch.setattr(prg, "PARALLEL_MIN_WORDS", 1)
    reference = _reference_stream(key, 5000, 256)
    for threads, chunk in [(1, 7), (1, 256), (2, 100), (3, 64), (5, 1000)]:
        acc = np.zeros(5000, dtype=WORD)
        apply_masks(acc, [(key, 1)], chunk_words=chunk, threads=threads)
        assert np.array_equal(acc, reference), (threads, chunk)


def test_prg_bytes_look_uniform():
    words = expand(mask_key(secrets.token_bytes(32), b"u"), 1 << 14)
    counts = np.bincount(words.view(np.uint8), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4
    assert stats.chisquare(np.bincount(np.arange(1 << 16, dtype=np.uint32).view(np.uint8), minlength=256)).pvalue < 1e-4


# -- Quantizer ------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    bits=st.integers(8, 32),
    clip=st.floats(0.01, 100.0),
    dim=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_decoded_sum_is_within_the_documented_bound(n, bits, clip, dim, seed):
    if (1 << bits) - 1 < 2 * n:
        with pytest.raises(ConfigError, match="bits"):
            Quantizer(clip_range=clip, bits=bits, num_clients=n)
        return
    q = Quantizer(clip_range=clip, bits=bits, num_clients=n)
    rng = np.random.default_rng(seed)  # test data only
    xs = [rng.uniform(-2 * clip, 2 * clip, dim) for _ in range(n)]
    acc = np.zeros(dim, dtype=np.uint64)
    clipped = 0
    for x in xs:
        words, c = q.encode(x, mask_key(secrets.token_bytes(32), b"r"))
        assert words.dtype == WORD and int(words.max()) <= q.modulus_mask
        acc += words
        clipped += c
    assert clipped == sum(int(np.count_nonzero(np.abs(x) > clip)) for x in xs)
    decoded = q.decode_sum((acc % (1 << bits)).astype(WORD))
    truth = sum(np.clip(x, -clip, clip) for x in xs)
    assert np.all(np.abs(decoded - truth) <= q.max_error(n) * (1 + 1e-9))


def test_extremes_never_wrap():
    n = 5
    q = Quantizer(clip_range=1.0, bits=8, num_clients=n)
    for value in (1.0, -1.0, 1e9, -1e9):
        acc = np.zeros(3, dtype=np.uint64)
        for _ in range(n):
            acc += q.encode(np.full(3, value), mask_key(secrets.token_bytes(32), b"r"))[0]
        decoded = q.decode_sum((acc % 256).astype(WORD))
        assert np.allclose(decoded, n * np.sign(value), atol=q.max_error(n))


def test_stochastic_rounding_is_unbiased():
    q = Quantizer(clip_range=1.0, bits=8, num_clients=10)  # coarse step: bias would show
    x = np.full(20000, 0.3 * q.step + 0.1)
    words, _ = q.encode(x, mask_key(secrets.token_bytes(32), b"r"))
    decoded = q.decode_sum(words)
    assert abs(decoded.mean() - x[0]) < 5 * q.step / np.sqrt(x.size)


def test_user_chosen_bits_that_could_overflow_are_rejected():
    with pytest.raises(ConfigError, match=r"bits=16.*overflow"):
        Quantizer(clip_range=1.0, bits=16, num_clients=100, fraction_bits=10)
    q = Quantizer(clip_range=1.0, bits=20, num_clients=100, fraction_bits=10)
    assert 2 * 100 * q.levels + 1 <= 1 << 20


def test_quantizer_config_errors_name_the_field():
    for kwargs, name in [
        (dict(clip_range=0.0, num_clients=3), "clip_range"),
        (dict(clip_range=1.0, bits=33, num_clients=3), "bits"),
        (dict(clip_range=1.0, num_clients=0), "num_clients"),
    ]:
        with pytest.raises(ConfigError) as info:
            Quantizer(**kwargs)
        assert info.value.field == name


# -- graph ----------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 60), data=st.data())
def test_graph_is_symmetric_regular_and_public(n, data):
    k = data.draw(st.integers(1, n - 1))
    ids = [f"client-{i}" for i in range(n)]
    seed = b"public-seed-0123456789"
    if k % 2 and n % 2 and k != n - 1:
        with pytest.raises(ConfigError, match="neighbours"):
            g.build_graph(ids, k, seed)
        return
    graph = g.build_graph(ids, k, seed)
    assert all(len(vs) == k and u not in vs for u, vs in graph.items())
    assert all(u in graph[v] for u, vs in graph.items() for v in vs)
    assert graph == g.build_graph(list(reversed(ids)), k, seed)  # anyone can recompute it
    if k >= 2:
        assert g.components(graph, ids) == 1


def test_complete_graph_and_bad_degrees():
    ids = [str(i) for i in range(6)]
    graph = g.build_graph(ids, None, b"s" * 16)
    assert all(len(vs) == 5 for vs in graph.values())
    for bad in (0, 6, -1):
        with pytest.raises(ConfigError) as info:
            g.check_neighbours(bad, 6)
        assert info.value.field == "neighbours" and info.value.value == bad
    assert g.suggest_neighbours(100) == 14
    assert g.suggest_neighbours(5) == 4


def test_different_seeds_give_different_graphs():
    ids = [str(i) for i in range(40)]
    assert g.build_graph(ids, 4, b"a" * 16) != g.build_graph(ids, 4, b"b" * 16)


# -- randomness sources ---------------------------------------------------------------------------
def test_no_simulation_randomness_in_the_crypto_path():
    pattern = re.compile(r"numpy\.random|np\.random|^\s*import random\b|^\s*from random\b|default_rng", re.M)
    sources = sorted(SECAGG_DIR.glob("*.py"))
    assert len(sources) >= 8
    offenders = [p.name for p in sources if pattern.search(p.read_text())]
    assert offenders == []
    assert pattern.search("rng = np.random.default_rng(0)")  # the pattern does catch it


def test_protocol_runs_with_simulation_randomness_disabled(monkeypatch):
    import random

    from privfl.protocols.secagg import run_secure_sum

    inputs = {f"c{i}": np.linspace(-0.2, 0.2, 9) * i for i in range(5)}

    def forbidden(*args, **kwargs):
        raise AssertionError("simulation randomness used in a cryptographic path")

    for name in ("default_rng", "random", "rand", "randint", "bytes", "seed", "RandomState", "Generator"):
        monkeypatch.setattr(np.random, name, forbidden)
    for name in ("random", "randint", "getrandbits", "randbytes", "choice", "shuffle", "Random"):
        monkeypatch.setattr(random, name, forbidden)
    result = run_secure_sum(inputs, threshold=2, neighbours=2, drop_after={"share": {"c1"}})
    assert np.allclose(result.total, sum(inputs[u] for u in result.survivors), atol=result.max_error)


# -- masked-vector messages -----------------------------------------------------------------------
def _sealed_vector(key: bytes, words: np.ndarray) -> bytes:
    from privfl.protocols.secagg import messages as m

    def fill(out: np.ndarray) -> None:
        out[:] = words

    return m.seal_vector(key, m.MASKED_INPUT, 3, "alice", length=words.shape[0], fill=fill)


def test_add_vector_authenticates_before_adding():
    from privfl.errors import MessageError
    from privfl.protocols.secagg import messages as m

    key = secrets.token_bytes(32)
    words = np.arange(1000, dtype=WORD) * np.uint32(2654435761)
    payload = _sealed_vector(key, words)
    acc = np.full(1000, 7, dtype=WORD)
    layout = dict(kind=m.MASKED_INPUT, round_index=3, sender="alice", length=1000)
    assert m.add_vector(acc, payload, key=key, **layout) == payload[-16:]
    assert np.array_equal(acc, words + np.uint32(7))
    tampered = bytearray(payload)
    tampered[-100] ^= 1
    before = acc.copy()
    with pytest.raises(MessageError, match="authentication"):
        m.add_vector(acc, bytes(tampered), key=key, **layout)
    with pytest.raises(MessageError, match="authentication"):
        m.add_vector(acc, payload, key=secrets.token_bytes(32), **layout)
    assert np.array_equal(acc, before)  # a rejected vector is never added
    # Without a key (the transport authenticates the sender) the words are added as they are,
    # but the frame is still checked.
    m.add_vector(acc, bytes(tampered), key=None, **layout)
    assert not np.array_equal(acc, before)
    with pytest.raises(MessageError):
        m.add_vector(acc, payload, key=None, **{**layout, "sender": "bob"})
    with pytest.raises(MessageError):
        m.add_vector(acc, payload[:-1], key=None, **layout)


@pytest.mark.parametrize("authenticate_vectors", [True, False])
def test_round_sums_with_and_without_vector_authentication(authenticate_vectors):
    from privfl.protocols.base import DirectTransport
    from privfl.protocols.secagg.simulate import drive, new_round

    ids = [f"c{i}" for i in range(8)]
    run = new_round(ids, round_index=1, threshold=4, neighbours=4, dimension=300, bits=32, graph_seed=bytes(16))
    run.server.authenticate_vectors = authenticate_vectors
    rng = np.random.default_rng(0)  # test inputs only
    encoded = {u: rng.integers(0, 1 << 32, 300, dtype=np.uint64).astype(WORD) for u in ids}
    total, _ = drive(run, encoded, DirectTransport(), stop_after={"c3": "share"})
    expected = sum(encoded[u].astype(np.uint64) for u in ids if u != "c3") % (1 << 32)
    assert np.array_equal(total, expected.astype(WORD))


def test_server_refuses_a_non_bool_authenticate_flag():
    from privfl.protocols.secagg.server import SecAggServer
    from privfl.protocols.secagg.simulate import new_round

    run = new_round(["a", "b", "c"], round_index=0, threshold=2, neighbours=None, dimension=4, bits=32, graph_seed=bytes(16))
    with pytest.raises(ProtocolError):
        SecAggServer(run.params, run.server._key, authenticate_vectors=1)


def test_lagrange_weights_equal_the_textbook_formula():
    """The batched-inverse weights are the textbook ones (each denominator inverted on its own)."""
    import random

    from privfl.protocols.secagg.shamir import PRIME, lagrange_at_zero

    rng = random.Random(3)
    for size in (1, 2, 3, 7, 30):
        xs = tuple(sorted(rng.sample(range(1, 2000), size)))
        expected = []
        for i, xi in enumerate(xs):
            numerator, denominator = 1, 1
            for j, xj in enumerate(xs):
                if j != i:
                    numerator = numerator * xj % PRIME
                    denominator = denominator * (xj - xi) % PRIME
            expected.append(numerator * pow(denominator, -1, PRIME) % PRIME)
        assert lagrange_at_zero.__wrapped__(xs) == tuple(expected)


def test_shares_consistency_catches_any_single_altered_share():
    import secrets as _secrets

    from privfl.protocols.secagg import shamir

    secret = _secrets.randbelow(1 << 256)
    shares = shamir.split(secret, 4, range(1, 8))
    assert shamir.consistent(shares, 4)
    assert shamir.consistent({x: shares[x] for x in (2, 5, 7)}, 4)  # too few to check: nothing to contradict
    for x in shares:
        altered = dict(shares)
        altered[x] = (altered[x] + 1) % shamir.PRIME
        assert not shamir.consistent(altered, 4), f"altered share {x} not caught"
