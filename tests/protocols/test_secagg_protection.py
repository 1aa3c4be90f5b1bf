"""Tests of SecAggProtection, the federation-facing secure aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from privfl.errors import ConfigError, ProtocolAbort
from privfl.protocols.base import ClientUpdate, DirectTransport, Protection
from privfl.protocols.secagg import SecAggConfig, SecAggProtection


def _updates(n: int, dim: int, seed: int = 0) -> dict[str, ClientUpdate]:
    rng = np.random.default_rng(seed)  # test data only
    return {f"c{i:02d}": ClientUpdate(rng.normal(0, 0.2, dim), float(rng.integers(1, 500))) for i in range(n)}


def _weighted(updates, ids):
    return sum(updates[u].weight * updates[u].delta for u in ids) / sum(updates[u].weight for u in ids)


class Recording(DirectTransport):
    def __init__(self, lose=(), alter=()):
        self.calls = []
        self.lose, self.alter = set(lose), set(alter)

    def deliver(self, sender, receiver, step, payload):
        self.calls.append((sender, receiver, step, len(payload)))
        if (sender, step) in self.lose or (receiver, step) in self.lose:
            return None
        if (sender, step) in self.alter:
            return payload[:-3] + bytes([payload[-3] ^ 0x80]) + payload[-2:]
        return payload


def test_is_a_protection_named_secagg():
    assert issubclass(SecAggProtection, Protection)
    assert SecAggProtection.name == "secagg"


@pytest.mark.parametrize("neighbours", [None, 4])
def test_weighted_average_over_all_clients(neighbours):
    updates = _updates(9, 40)
    protection = SecAggProtection(SecAggConfig(threshold=0.6, neighbours=neighbours, clip_range=1.0))
    transport = Recording()
    result = protection.run_round(1, updates, transport)
    assert result.contributors == tuple(sorted(updates))
    assert result.dropped == {}
    assert np.allclose(result.average, _weighted(updates, updates), atol=1e-6)
    assert result.total_weight == pytest.approx(sum(u.weight for u in updates.values()), rel=1e-6)
    # Every message went through the transport, and the byte counts add up to what it carried.
    steps = {step for (_, _, step, _) in transport.calls}
    assert {"advertise", "advertise_keys", "share", "share_relay", "masked_input", "unmask_request", "unmask"} <= steps
    for u in updates:
        sent = sum(size for (s, _, _, size) in transport.calls if s == u)
        assert result.upload_bytes[u] == sent
        assert result.download_bytes[u] > 0
    # Upload of the vector is 4 bytes a coordinate (float32-sized) plus a small fixed overhead.
    masked = [size for (s, _, step, size) in transport.calls if step == "masked_input"]
    assert max(masked) <= 4 * 41 + 200


def test_lost_and_altered_messages_drop_clients_with_reasons():
    # 9 clients, t = 5 (more than half of 9): four dropouts, the most the bound leaves room for.
    updates = _updates(9, 30, seed=1)
    transport = Recording(lose={("c01", "share"), ("c02", "masked_input"), ("c03", "share_relay")}, alter={("c04", "masked_input")})
    protection = SecAggProtection(SecAggConfig(threshold=5))
    result = protection.run_round(7, updates, transport)
    assert set(result.dropped) == {"c01", "c02", "c03", "c04"}
    assert "lost" in result.dropped["c01"] and "lost" in result.dropped["c03"]
    assert "authentication" in result.dropped["c04"]
    survivors = sorted(set(updates) - set(result.dropped))
    assert result.contributors == tuple(survivors)
    assert np.allclose(result.average, _weighted(updates, survivors), atol=1e-6)


def test_abort_below_threshold():
    updates = _updates(5, 10)
    lose = {(u, "masked_input") for u in ("c00", "c01", "c02")}
    with pytest.raises(ProtocolAbort, match=r"2 survivors < threshold 3"):
        SecAggProtection(SecAggConfig(threshold=3)).run_round(0, updates, Recording(lose=lose))


def test_server_never_holds_an_individual_update():
    updates = _updates(6, 64)
    protection = SecAggProtection(SecAggConfig(threshold=4))
    protection.run_round(0, updates, DirectTransport())
    server = protection.server
    assert server is not None
    held = []
    stack = [vars(server)]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, np.ndarray):
            held.append(obj.astype(np.float64))
    for update in updates.values():
        for array in held:
            if array.shape[0] >= 64:
                assert not np.allclose(array[:64], update.delta, atol=1e-3)
                assert not np.allclose(array[:64] * 1e-9, update.delta, atol=1e-3)


def test_clipping_is_counted_and_bounded():
    updates = {"a": ClientUpdate(np.array([5.0, -5.0, 0.5]), 1.0), "b": ClientUpdate(np.array([0.1, 0.2, 0.3]), 1.0), "c": ClientUpdate(np.zeros(3), 2.0)}
    protection = SecAggProtection(SecAggConfig(threshold=2, clip_range=1.0))
    result = protection.run_round(0, updates, DirectTransport())
    assert protection.clipped == {"a": 2, "b": 0, "c": 0}
    assert np.allclose(result.average, np.array([1.1, -0.8, 0.8]) / 4, atol=1e-6)


def test_config_is_validated():
    for kwargs, name in [
        (dict(threshold=1), "threshold"),
        (dict(threshold=1.5), "threshold"),
        (dict(threshold=0.0), "threshold"),
        (dict(clip_range=-1.0), "clip_range"),
        (dict(bits=40), "bits"),
        (dict(weight_bound=0.0), "weight_bound"),
        (dict(neighbours=0), "neighbours"),
    ]:
        with pytest.raises(ConfigError) as info:
            SecAggConfig(**kwargs)
        assert info.value.field == name
    config = SecAggConfig(threshold=0.6, neighbours=4)
    assert config.resolve_threshold(20) == 3
    with pytest.raises(AttributeError):
        config.threshold = 3  # frozen
    with pytest.raises(ConfigError, match="weight_bound"):
        SecAggProtection(SecAggConfig(threshold=2, weight_bound=10.0)).run_round(0, _updates(3, 4), DirectTransport())
    with pytest.raises(ConfigError, match="bits"):
        SecAggProtection(SecAggConfig(threshold=2, bits=16, fraction_bits=16)).run_round(0, _updates(3, 4), DirectTransport())
