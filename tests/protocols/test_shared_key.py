"""Shared-key RLWE aggregation: the ring arithmetic, exact decryption, and what each party refuses.

The contract suite (test_protection_contract.py) runs the protection through lost, garbage and
replayed messages; these tests cover the primitives and the active-party cases specific to it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from torch.utils.data import Subset

from privfl.config import ClientDPConfig, DPConfig, FederationConfig, ProtectionKind, TrainingConfig, config_from_dict
from privfl.errors import ConfigError, DecryptionError, MessageError, ProtocolAbort
from privfl.protocols import rlwe
from privfl.protocols.base import ClientUpdate, DirectTransport
from privfl.protocols.ckks_signing import SiteIdentity
from privfl.protocols.oneshot import KIND_AGGREGATE
from privfl.protocols.shared_key import (
    RoundEncoding,
    SharedKeyClient,
    SharedKeyConfig,
    SharedKeyDecryptor,
    SharedKeyProtection,
    SharedKeyServer,
)
from privfl.protocols.wire import decode_frame, encode_frame

N = 4096


def _negacyclic(a: list[int], b: list[int], q: int) -> list[int]:
    n = len(a)
    out = [0] * n
    for i in range(n):
        for j in range(n):
            if i + j < n:
                out[i + j] += a[i] * b[j]
            else:
                out[i + j - n] -= a[i] * b[j]
    return [v % q for v in out]


@pytest.mark.parametrize("q", rlwe.PRIMES)
def test_ntt_multiplies_in_the_negacyclic_ring(q):
    rng = np.random.default_rng(0)  # test data only
    a = rng.integers(0, q, (2, 32), dtype=np.uint64)
    b = rng.integers(0, q, (2, 32), dtype=np.uint64)
    product = rlwe.intt(rlwe.ntt(a, q) * rlwe.ntt(b, q) % np.uint64(q), q)
    for row in range(2):
        assert [int(v) for v in product[row]] == _negacyclic([int(v) for v in a[row]], [int(v) for v in b[row]], q)
    big = rng.integers(0, q, (3, N), dtype=np.uint64)
    assert np.array_equal(rlwe.intt(rlwe.ntt(big, q), q), big)


def test_primes_are_ntt_friendly_and_below_two_to_the_32():
    for q in rlwe.PRIMES:
        assert q < 2**32 and (q - 1) % 2**15 == 0 and rlwe._is_prime(q)
    assert not rlwe._is_prime(rlwe.PRIMES[0] * rlwe.PRIMES[1])


def test_error_is_centred_binomial_and_key_is_ternary():
    e = rlwe._error((50, N))
    assert e.min() >= -rlwe.ERROR_BOUND and e.max() <= rlwe.ERROR_BOUND
    assert abs(float(e.mean())) < 0.02 and 3.2 < float(e.std()) < 3.28  # sqrt(21 / 2) = 3.24
    key = rlwe.SecretKey.generate(N)
    counts = np.bincount(key._coefficients + 1, minlength=3)
    assert counts.sum() == N and set(np.unique(key._coefficients)) <= {-1, 0, 1}
    assert np.all(np.abs(counts / N - 1 / 3) < 0.05)
    assert not np.array_equal(key._coefficients, rlwe.SecretKey.generate(N)._coefficients)


@pytest.mark.parametrize("limbs", [1, 2])
def test_sums_decrypt_exactly_up_to_the_largest_values(limbs):
    key = rlwe.SecretKey.generate(N)
    count = 7
    encoding = RoundEncoding.for_round(SharedKeyConfig(limbs=limbs), dim=N - 1, participants=count)
    rng = np.random.default_rng(1)  # test data only
    extreme = np.full((1, N), encoding.levels, dtype=np.int64)
    plains = [extreme, -extreme, extreme] + [rng.integers(-encoding.levels, encoding.levels + 1, (1, N)) for _ in range(count - 3)]
    for chosen in (plains, [extreme] * count, [-extreme] * count):
        ciphertexts = [rlwe.encrypt(key, p, encoding.delta_bits, limbs) for p in chosen]
        c0 = rlwe.reduce_sum(sum(c.astype(np.uint64) for _, c in ciphertexts), count)
        a = rlwe.expand_a([(s, b"") for s, _ in ciphertexts], limbs, 1, N)
        assert np.array_equal(rlwe.decrypt_sum(key, c0, a, encoding.delta_bits, count), sum(chosen))


def test_encryption_is_randomised_and_looks_uniform():
    key = rlwe.SecretKey.generate(N)
    plain = np.zeros((2, N), dtype=np.int64)
    seed1, c1 = rlwe.encrypt(key, plain, 10, 2)
    seed2, c2 = rlwe.encrypt(key, plain, 10, 2)
    assert seed1 != seed2 and not np.array_equal(c1, c2)
    for limb, q in enumerate(rlwe.PRIMES):
        words = c1[limb].astype(np.float64) / q
        assert abs(words.mean() - 0.5) < 0.01 and abs(words.var() - 1 / 12) < 0.005


def test_tampered_or_incomplete_sums_are_refused():
    key = rlwe.SecretKey.generate(N)
    plains = [np.full((1, N), 5, dtype=np.int64) for _ in range(3)]
    cts = [rlwe.encrypt(key, p, 8, 1, context=bytes([i])) for i, p in enumerate(plains)]
    a = rlwe.expand_a([(s, bytes([i])) for i, (s, _) in enumerate(cts)], 1, 1, N)

    def total(parts):
        return rlwe.reduce_sum(sum(c.astype(np.uint64) for c in parts), 3)

    assert np.array_equal(rlwe.decrypt_sum(key, total([c for _, c in cts]), a, 8, 3), sum(plains))
    for bad in (
        total([cts[0][1], cts[1][1]]),  # a c0 left out, its seed kept
        total([cts[0][1], cts[0][1], cts[2][1]]),  # a c0 counted twice
    ):
        with pytest.raises(DecryptionError):
            rlwe.decrypt_sum(key, bad, a, 8, 3)
    with pytest.raises(DecryptionError):  # another key
        rlwe.decrypt_sum(rlwe.SecretKey.generate(N), total([c for _, c in cts]), a, 8, 3)
    # A seed expanded in another context (another round, another sender) gives another a.
    moved = rlwe.expand_a([(cts[0][0], b"\x09"), (cts[1][0], b"\x01"), (cts[2][0], b"\x02")], 1, 1, N)
    with pytest.raises(DecryptionError):
        rlwe.decrypt_sum(key, total([c for _, c in cts]), moved, 8, 3)


def test_secret_key_round_trips_and_never_shows():
    key = rlwe.SecretKey.generate(N)
    again = rlwe.SecretKey.from_bytes(key.to_bytes())
    assert again.key_id == key.key_id and np.array_equal(again._coefficients, key._coefficients)
    small = b"PFLRLWE1" + (1024).to_bytes(4, "big") + b"\x01" * 1024  # N=1024 cannot carry a 32-bit modulus
    for bad in (b"", b"PFLRLWE1" + (N).to_bytes(4, "big") + b"\x03" * N, key.to_bytes()[:-1], small):
        with pytest.raises(ConfigError):
            rlwe.SecretKey.from_bytes(bad)
    protection = SharedKeyProtection()
    texts = [repr(key), repr(protection), repr(protection._client), repr(protection.decryptor)]
    assert all("hidden" in t for t in texts)
    assert not any(key.to_bytes().hex()[24:64] in t for t in texts)


def _round(protection: SharedKeyProtection, n: int = 3, dim: int = 100) -> dict[str, ClientUpdate]:
    rng = np.random.default_rng(2)  # test data only
    return {f"s{i}": ClientUpdate(rng.normal(0, 0.1, dim), float(10 + i)) for i in range(n)}


def test_server_holds_no_key_and_checks_each_message():
    protection = SharedKeyProtection(SharedKeyConfig())
    updates = _round(protection)
    protection.run_round(0, updates, DirectTransport())
    server = protection.server
    assert server is not None
    assert not any(isinstance(v, rlwe.SecretKey) for v in vars(server).values())
    encoding = server.encoding
    identity = SiteIdentity.generate("s9")
    client = protection._client
    good, _ = client.encrypt(1, updates["s0"], encoding, weight_bound=20.0, identity=identity)
    fresh = SharedKeyServer(encoding, run_id=protection.run_id, sites={"s9": identity.public_bytes()})
    frame = decode_frame(good, kind=1, round_index=1)
    signature, seed, data = frame.parts

    def message(parts):
        return encode_frame(1, 1, "s9", parts)

    words = np.frombuffer(data, dtype="<u4").copy()
    words[5] = np.uint32(rlwe.PRIMES[0])  # not a residue
    cases = {
        "wrong length": message([signature, seed, data[:-4]]),
        "word outside": message([signature, seed, words.tobytes()]),
        "bad signature": message([bytes(64), seed, data]),
        "short seed": message([signature, seed[:-1], data]),
        "flipped c0": message([signature, seed, bytes([data[0] ^ 1]) + data[1:]]),
    }
    for why, payload in cases.items():
        with pytest.raises(MessageError):
            fresh._parse(1, "s9", payload)
        assert why
    assert fresh.aggregate(1, {"s9": good}).accepted == ("s9",)
    with pytest.raises(MessageError, match="seed"):  # the same seed twice in a round
        fresh._parse(1, "s9", good)


def _aggregate_for(protection: SharedKeyProtection, updates, round_index: int) -> tuple[bytes, RoundEncoding]:
    encoding = RoundEncoding.for_round(protection.config, len(next(iter(updates.values())).delta), len(updates))
    bound = max(u.weight for u in updates.values())
    messages = {
        s: protection._client.encrypt(round_index, u, encoding, weight_bound=bound, identity=protection._identity(s))[0]
        for s, u in updates.items()
    }
    server = SharedKeyServer(encoding, run_id=protection.run_id, sites=protection.decryptor.sites())
    return server.aggregate(round_index, messages).payload, encoding


def test_decrypting_site_refuses_what_an_active_server_could_send():
    protection = SharedKeyProtection(SharedKeyConfig(min_contributors=2))
    updates = _round(protection, n=3)
    aggregate, encoding = _aggregate_for(protection, updates, 4)
    frame = decode_frame(aggregate, kind=KIND_AGGREGATE, round_index=4)
    c0, *entries = frame.parts

    def rebuild(parts):
        return encode_frame(KIND_AGGREGATE, 4, "server", parts)

    c0_words = np.frombuffer(c0, dtype="<u4").reshape(encoding.limbs, -1).astype(np.uint64)
    shifted = c0_words.copy()
    shifted[:, 0] = (shifted[:, 0] + 12345) % np.array(rlwe.PRIMES[: encoding.limbs], dtype=np.uint64)
    other_entries = _aggregate_for(protection, updates, 5)[0]
    refused = {
        "one entry dropped, its c0 kept": rebuild([c0, *entries[:2]]),
        "an entry twice": rebuild([c0, entries[0], *entries]),
        "below min_contributors": rebuild([c0, entries[0]]),
        "c0 shifted off the grid": rebuild([shifted.astype("<u4").tobytes(), *entries]),
        "another round's entries": rebuild([c0, *decode_frame(other_entries, kind=KIND_AGGREGATE, round_index=5).parts[1:]]),
        "garbage": b"\x00" * 40,
    }
    for why, payload in refused.items():
        decryptor = SharedKeyDecryptor(protection._client._key, protection.config, run_id=protection.run_id)
        for site, key in protection.decryptor.sites().items():
            decryptor.register_site(site, key)
        with pytest.raises(DecryptionError):
            decryptor.decrypt(4, payload, encoding)
        assert why
    released = protection.decryptor.decrypt(4, aggregate, encoding)
    assert released.contributors == tuple(updates)
    with pytest.raises(DecryptionError):  # one decryption per round
        protection.decryptor.decrypt(4, aggregate, encoding)


def test_quantization_error_stays_within_its_bound_for_many_sites():
    for limbs in (1, 2):
        protection = SharedKeyProtection(SharedKeyConfig(limbs=limbs, clip_range=0.5))
        rng = np.random.default_rng(3)  # test data only
        updates = {f"s{i}": ClientUpdate(rng.normal(0, 0.05, 300), float(rng.integers(1, 200))) for i in range(40)}
        result = protection.run_round(0, updates, DirectTransport())
        weights = np.array([u.weight for u in updates.values()])
        expected = sum(u.weight * np.clip(u.delta, -0.5, 0.5) for u in updates.values()) / weights.sum()
        ratio_sum = weights.sum() / weights.max()
        assert protection.max_error > 0
        assert np.max(np.abs(result.average - expected)) <= 3 * protection.max_error / ratio_sum
        assert result.total_weight == pytest.approx(weights.sum(), rel=2 * protection.max_error / ratio_sum + 1e-12)


def test_settings_are_checked():
    for bad in ({"limbs": 3}, {"limbs": True}, {"poly_modulus_degree": 1024}, {"poly_modulus_degree": 2048, "limbs": 2},
                {"clip_range": 0}, {"weight_bound": -1.0}, {"min_contributors": 1}):
        with pytest.raises(ConfigError):
            SharedKeyConfig(**bad)
    SharedKeyConfig(poly_modulus_degree=2048, limbs=1)
    with pytest.raises(ConfigError, match="cannot hold"):
        SharedKeyProtection(SharedKeyConfig(limbs=1)).check_fits(100_000)
    SharedKeyProtection(SharedKeyConfig(limbs=2)).check_fits(100_000)
    with pytest.raises(ConfigError):
        SharedKeyClient(rlwe.SecretKey.generate(2048), SharedKeyConfig(), run_id=bytes(16))


def test_weight_above_the_bound_drops_that_site_only():
    protection = SharedKeyProtection(SharedKeyConfig(weight_bound=15.0))
    updates = _round(protection, n=4)  # weights 10..13: all fit
    updates["s9"] = ClientUpdate(np.zeros(100), 50.0)
    result = protection.run_round(0, updates, DirectTransport())
    assert "s9" in result.dropped and "weight" in result.dropped["s9"]
    assert sorted(result.contributors) == ["s0", "s1", "s2", "s3"]


def test_central_noise_is_refused():
    protection = SharedKeyProtection()
    with pytest.raises(ConfigError, match="central noise"):
        protection.run_round(0, _round(protection), DirectTransport(), release_noise=lambda s: s)


def test_run_config_selects_it_and_deployments_need_a_weight_bound():
    config = config_from_dict({"federation": {"protection": "shared_key", "shared_key": {"limbs": 1, "clip_range": 0.5}}})
    assert config.federation.protection is ProtectionKind.SHARED_KEY
    assert config.federation.shared_key == SharedKeyConfig(limbs=1, clip_range=0.5)
    with pytest.raises(ConfigError, match=r"federation\.shared_key\.limbs"):
        config_from_dict({"federation": {"shared_key": {"limbs": 5}}})
    assert dataclasses.replace(FederationConfig(), protection="shared_key").protection is ProtectionKind.SHARED_KEY
    from privfl.aggregator import Aggregator

    with pytest.raises(ConfigError, match="weight_bound"):
        Aggregator('[federation]\nprotection = "shared_key"\n', input_shape=(30,), num_classes=2, progress=False)
    Aggregator(
        '[federation]\nprotection = "shared_key"\n[federation.shared_key]\nweight_bound = 500\n',
        input_shape=(30,), num_classes=2, progress=False,
    )


def test_federation_trains_under_it():
    from privfl.data import load_breast_cancer
    from privfl.federation import Federation
    from privfl.models import LogisticRegression

    split = load_breast_cancer()
    half = len(split.train) // 3
    clients = {f"site-{i}": Subset(split.train, range(i * half, (i + 1) * half)) for i in range(3)}

    def federation(**kwargs):
        return Federation(
            model_fn=lambda: LogisticRegression(30, 2),
            clients=clients,
            test_set=split.test,
            training=TrainingConfig(batch_size=16, learning_rate=0.5, dp=DPConfig(noise_multiplier=1.0)),
            federation=FederationConfig(rounds=3, protection=ProtectionKind.SHARED_KEY, **kwargs),
            progress=False,
        )

    summary = federation().run().summary
    assert summary["protection"] == "shared_key" and summary["final_accuracy"] >= 0.85
    assert summary["upload_bytes_per_client_round"] < 2.1 * 4 * 4096 + 1024  # one polynomial, two primes
    with pytest.raises(ConfigError, match="client-level DP"):
        FederationConfig(protection=ProtectionKind.SHARED_KEY, client_dp=ClientDPConfig(noise_multiplier=1.0))
    protection = SharedKeyProtection()
    with pytest.raises(ConfigError, match="cannot place client-level DP"):
        Federation(
            model_fn=lambda: LogisticRegression(30, 2),
            clients=clients,
            training=TrainingConfig(dp=DPConfig(noise_multiplier=1.0)),
            federation=FederationConfig(client_dp=ClientDPConfig(noise_multiplier=1.0)),
            protection=protection,
            progress=False,
        )
    with pytest.raises(ProtocolAbort):
        protection.run_round(0, {"a": ClientUpdate(np.zeros(3), 1.0)}, DirectTransport())


def _decryptor(protection: SharedKeyProtection, site: str | None = None) -> SharedKeyDecryptor:
    decryptor = SharedKeyDecryptor(protection._client._key, protection.config, run_id=protection.run_id, site=site)
    for name, key in protection.decryptor.sites().items():
        decryptor.register_site(name, key)
    return decryptor


def test_a_seed_replayed_under_another_name_or_round_is_refused():
    # A server that registers an identity of its own re-signs a victim's (seed, c0) for it: the seed
    # expands to another a under the other name, so the sum does not decrypt.
    protection = SharedKeyProtection(SharedKeyConfig(min_contributors=2))
    updates = _round(protection, n=2)
    aggregate, encoding = _aggregate_for(protection, updates, 7)
    frame = decode_frame(aggregate, kind=KIND_AGGREGATE, round_index=7)
    c0, first, second = frame.parts
    entry = decode_frame(first, kind=40, round_index=0)
    seed, digest, _ = entry.parts
    sybil = SiteIdentity.generate("sybil")
    protection.decryptor.register_site("sybil", sybil.public_bytes())
    body = encode_frame(1, 7, "sybil", [seed, digest])
    forged = encode_frame(40, 0, "sybil", [seed, digest, sybil.sign(protection.run_id, 7, body)])
    decryptor = _decryptor(protection)
    with pytest.raises(DecryptionError):
        decryptor.decrypt(7, encode_frame(KIND_AGGREGATE, 7, "server", [c0, forged, second]), encoding)
    assert decryptor.halted  # fails closed: nothing more is decrypted in this run
    with pytest.raises(DecryptionError):
        decryptor.decrypt(8, aggregate, encoding)


def test_the_decrypting_site_counts_only_the_others():
    protection = SharedKeyProtection(SharedKeyConfig(min_contributors=2))
    updates = _round(protection, n=2)
    aggregate, encoding = _aggregate_for(protection, updates, 3)
    with pytest.raises(DecryptionError):  # s0 could subtract its own update from a sum with one other site
        _decryptor(protection, site="s0").decrypt(3, aggregate, encoding)
    assert _decryptor(protection, site="elsewhere").decrypt(3, aggregate, encoding).contributors == ("s0", "s1")
    updates = _round(protection, n=3)
    aggregate, encoding = _aggregate_for(protection, updates, 4)
    assert len(_decryptor(protection, site="s0").decrypt(4, aggregate, encoding).contributors) == 3


def test_ciphertext_words_are_little_endian_whatever_the_host():
    protection = SharedKeyProtection()
    updates = _round(protection, n=2)
    encoding = RoundEncoding.for_round(protection.config, 100, 2)
    message, _ = protection._client.encrypt(0, updates["s0"], encoding, weight_bound=20.0, identity=protection._identity("s0"))
    data = decode_frame(message, kind=1, round_index=0).parts[2]
    words = np.frombuffer(data, dtype="<u4")
    assert words.shape == (encoding.words,) and int(words[: encoding.n].max()) < rlwe.PRIMES[0]
