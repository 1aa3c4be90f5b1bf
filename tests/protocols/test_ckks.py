"""CKKS protection: correctness against plaintext FedAvg, the server's lack of a key, packing, bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from privfl.config import CkksConfig
from privfl.errors import ConfigError, DecryptionError, ProtocolAbort
from privfl.protocols.base import ClientUpdate, DirectTransport
from privfl.protocols.ckks import CkksClient, CkksKeyHolder, CkksProtection, CkksServer, SiteIdentity
from privfl.protocols.plaintext import PlaintextProtection
from privfl.protocols.wire import decode_frame, encode_frame


def _updates(num_clients: int, dim: int, seed: int = 0) -> dict[str, ClientUpdate]:
    rng = np.random.default_rng(seed)
    return {
        f"c{i}": ClientUpdate(delta=rng.normal(0, 0.05, dim).astype(np.float32), weight=float(rng.integers(10, 300)))
        for i in range(num_clients)
    }


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def protection() -> CkksProtection:
    # One per test: the key holder decrypts each round at most once.
    return CkksProtection()


@pytest.mark.parametrize(("num_clients", "dim"), [(2, 5), (5, 62), (7, 4096 * 3 + 17)])
def test_decrypted_average_matches_plaintext_average(protection, num_clients, dim):
    updates = _updates(num_clients, dim, seed=dim)
    encrypted = protection.run_round(3, updates, DirectTransport())
    plain = PlaintextProtection().run_round(3, updates, DirectTransport())
    expected = sum(u.weight * u.delta.astype(np.float64) for u in updates.values()) / sum(u.weight for u in updates.values())
    np.testing.assert_allclose(plain.average, expected, rtol=1e-12, atol=1e-15)
    assert _relative_error(encrypted.average, expected) <= 1e-6
    assert encrypted.total_weight == pytest.approx(sum(u.weight for u in updates.values()), rel=1e-6)
    assert set(encrypted.contributors) == set(updates)


def test_one_million_parameters_are_packed_across_ciphertexts(protection):
    dim = 1_000_003
    updates = _updates(3, dim, seed=1)
    result = protection.run_round(0, updates, DirectTransport())
    expected = sum(u.weight * u.delta.astype(np.float64) for u in updates.values()) / sum(u.weight for u in updates.values())
    assert _relative_error(result.average, expected) <= 1e-6
    assert protection.server.count == -(-(dim + 1) // 4096)
    expansion = result.upload_bytes["c0"] / (4 * dim)
    assert expansion <= 8.0  # one RNS limb per ciphertext; see CkksConfig


def _holds_secret_key(obj, seen=None) -> bool:
    """Walks an object graph looking for any TenSEAL context that has a secret key."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    has = getattr(obj, "has_secret_key", None)
    if callable(has) and has():
        return True
    children = []
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    return any(_holds_secret_key(child, seen) for child in children)


def test_server_object_holds_no_secret_key(protection):
    protection.run_round(0, _updates(3, 100), DirectTransport())
    server = protection.server
    assert isinstance(server, CkksServer)
    assert not server.can_decrypt()
    assert server.context.is_public()
    assert not _holds_secret_key(server)
    # the server cannot decrypt what it holds: a ciphertext it accepted, loaded under its own
    # context, reaches no secret key either
    import tenseal as ts

    first = decode_frame(server._accepted[0], kind=1, round_index=0).parts[1]
    held = ts.ckks_vector_from(server.context, first)
    assert not held.context().has_secret_key()
    with pytest.raises(ValueError, match="secret_key"):
        held.decrypt()
    # while the key holder's context, on the client side, does hold one
    assert _holds_secret_key(protection.key_holder)


def test_public_context_bytes_carry_no_secret_key():
    holder = CkksKeyHolder(CkksConfig())
    import tenseal as ts

    assert not ts.context_from(holder.public_context()).has_secret_key()
    with pytest.raises(ConfigError):
        CkksServer(holder._secret_context.serialize(save_secret_key=True), CkksConfig(), 10)
    assert "hidden" in repr(holder) and "secret_key=<hidden>" in repr(holder)
    with pytest.raises(TypeError):
        pickle.dumps(holder._secret_context)  # no accidental default serialization of the secret


class _Corrupting:
    """Delivers every message, except that it applies ``mutate`` to the chosen client's upload."""

    def __init__(self, victim: str, mutate):
        self.victim, self.mutate = victim, mutate

    def deliver(self, sender, receiver, step, payload):
        if sender == self.victim and step == "update":
            return self.mutate(payload)
        return payload


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b + b"\x00" * 16, "trailing"),
        (lambda b: b[:300] + bytes(len(b) - 300), "deserialize"),
        (lambda b: encode_frame(1, 9, "c1", [b"x"]), "round 9"),
        (lambda b: encode_frame(1, 0, "c0", [b"x"]), "claims sender"),
        (lambda b: b"garbage", "truncated"),
        (lambda b: None, "lost"),
    ],
)
def test_malformed_message_drops_only_that_client(protection, mutate, reason):
    updates = _updates(4, 300, seed=5)
    result = protection.run_round(0, updates, _Corrupting("c1", mutate))
    assert "c1" in result.dropped and reason in result.dropped["c1"]
    assert set(result.contributors) == {"c0", "c2", "c3"}
    kept = {c: u for c, u in updates.items() if c != "c1"}
    expected = sum(u.weight * u.delta.astype(np.float64) for u in kept.values()) / sum(u.weight for u in kept.values())
    assert _relative_error(result.average, expected) <= 1e-6  # nothing already aggregated is lost


def test_wrong_ciphertext_count_is_rejected(protection):
    holder = protection.key_holder
    client = CkksClient(holder.public_context(), protection.config, run_id=holder.run_id)
    small = client.encrypt(0, "c0", ClientUpdate(delta=np.zeros(10, np.float32), weight=1.0), 1, identity=SiteIdentity.generate("c0"))
    big = client.encrypt(0, "c1", ClientUpdate(delta=np.zeros(5000, np.float32), weight=1.0), 1, identity=SiteIdentity.generate("c1"))
    out = CkksServer(holder.public_context(), protection.config, 5000).aggregate(0, {"c0": small})
    assert out.accepted == () and "1 ciphertexts, expected 2" in out.rejected["c0"]
    out = CkksServer(holder.public_context(), protection.config, 10).aggregate(0, {"c1": big})
    assert out.accepted == () and "oversized" in out.rejected["c1"]


def test_all_clients_dropped_aborts(protection):
    with pytest.raises(ProtocolAbort):
        protection.run_round(0, _updates(2, 10), _DropAll())


class _DropAll:
    def deliver(self, sender, receiver, step, payload):
        return None if step == "update" else payload


def test_values_too_large_for_the_parameters_are_refused():
    # A value that would wrap modulo q0 is refused on its client: that client is dropped with the
    # reason, the others are averaged; if nobody is left the round aborts.
    protection = CkksProtection(CkksConfig(poly_modulus_degree=4096, data_bits=40, special_bits=40, scale_bits=30))
    # (Two "ok" sites: the key holder decrypts no sum of fewer than min_contributors = 2 sites.)
    updates = {
        "big": ClientUpdate(delta=np.full(4, 10.0, np.float32), weight=100.0),
        "ok": ClientUpdate(delta=np.full(4, 0.5, np.float32), weight=2.0),
        "ok2": ClientUpdate(delta=np.full(4, 0.5, np.float32), weight=3.0),
    }
    result = protection.run_round(0, updates, DirectTransport())
    assert "data_bits" in result.dropped["big"] and result.contributors == ("ok", "ok2")
    np.testing.assert_allclose(result.average, 0.5, atol=1e-5)  # 30-bit scale: about 1e-6 precision
    with pytest.raises(ProtocolAbort):
        protection.run_round(1, {"big": updates["big"]}, DirectTransport())


def test_tampered_aggregate_gives_opaque_decryption_error(protection):
    with pytest.raises(DecryptionError) as info:
        protection.key_holder.decrypt_sum(0, b"\x00" * 100, 10)
    assert str(info.value) == "decryption failed"


def test_a_single_site_is_never_decrypted(protection):
    # Formerly a one-client round was decrypted: that is exactly the decryption oracle.
    with pytest.raises(ProtocolAbort, match="min_contributors"):
        protection.run_round(0, _updates(1, 5), DirectTransport())
