"""Tests of SecAggProtection, the federation-facing secure aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from privfl.errors import ConfigError, ProtocolAbort
from privfl.protocols.base import ClientUpdate, DirectTransport, Protection
from privfl.protocols.secagg import SecAggConfig, SecAggProtection
from privfl.protocols.secagg.quantize import Quantizer


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


def _arrays_in(root) -> list[np.ndarray]:
    """Every numpy array reachable from ``root`` through containers and object attributes."""
    found, seen, stack = [], set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, type(None))):
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            found.append(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        else:
            stack.extend(getattr(obj, "__dict__", {}).values())
            for cls in type(obj).__mro__:
                stack.extend(getattr(obj, name) for name in getattr(cls, "__slots__", ()) if hasattr(obj, name))
    return found


def _reveals(array: np.ndarray, target: np.ndarray, step: float) -> bool:
    """Whether ``array`` is ``target`` (floats), or its quantized words (centred lift x step), to 2 steps."""
    if array.ndim != 1 or array.shape[0] < target.shape[0]:
        return False
    head = array[: target.shape[0]]
    if np.issubdtype(head.dtype, np.floating):
        return bool(np.allclose(head, target, atol=2 * step))
    words = head.astype(np.int64) & 0xFFFFFFFF
    words[words >= 1 << 31] -= 1 << 32
    return bool(np.allclose(words * step, target, atol=2 * step))


def test_server_never_holds_an_individual_update_while_the_round_is_live():
    dim = 64
    updates = _updates(6, dim)
    config = SecAggConfig(threshold=4, bits=32)
    protection = SecAggProtection(config)
    bound = max(u.weight for u in updates.values())
    # What each client encodes: its clipped update scaled by n_k / W (see SecAggProtection).
    targets = {u: np.clip(up.delta, -1.0, 1.0) * (up.weight / bound) for u, up in updates.items()}
    step = Quantizer(clip_range=config.clip_range, bits=32, num_clients=len(updates)).step
    snapshots: list[tuple[str, list[np.ndarray]]] = []

    class Inspecting(DirectTransport):
        def deliver(self, sender, receiver, step_name, payload):
            # The server's state at every message of the round, before and after masked inputs arrive.
            snapshots.append((step_name, [a.copy() for a in _arrays_in(protection.server)]))
            return payload

    protection.run_round(0, updates, Inspecting())
    live = [arrays for name, arrays in snapshots if name in ("unmask_request", "unmask")]
    # The server did hold vectors of the update's length while unmasking: the inspection saw them.
    assert live and any(a.ndim == 1 and a.shape[0] >= dim for arrays in live for a in arrays)
    for name, arrays in snapshots:
        for u, target in targets.items():
            assert not any(_reveals(a, target, step) for a in arrays), f"server holds {u}'s update at step {name}"
    # The check can fail: a server that kept one client's encoded words would be caught.
    words, _ = Quantizer(clip_range=1.0, bits=32, num_clients=len(updates)).encode(np.append(targets["c00"], 0.0), bytes(16))
    assert _reveals(words, targets["c00"], step)


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


def test_secagg_declares_distributed_noise_and_refuses_release_noise():
    from privfl.protocols.base import DistributedNoiseProtection, NoisePlacement

    protection = SecAggProtection(SecAggConfig(threshold=2))
    assert isinstance(protection, DistributedNoiseProtection)
    assert protection.noise_placement is NoisePlacement.DISTRIBUTED
    assert protection.share_threshold(3) == 2 and protection.word_bits == 32
    with pytest.raises(ConfigError, match="release_noise"):
        protection.run_round(0, _updates(3, 5), DirectTransport(), release_noise=lambda total: total)
    protection.use_noise_range(0.25, 20)
    assert (protection.config.clip_range, protection.config.fraction_bits) == (0.25, 20)
    assert protection.config.fail_on_clip and protection.config.fail_on_dropout
    SecAggProtection(SecAggConfig(threshold=5, bits=8)).check_fits(6)
    with pytest.raises(ConfigError, match="threshold"):
        SecAggProtection(SecAggConfig(threshold=3)).check_fits(6)  # not above half of 6 share holders
    with pytest.raises(ConfigError, match="bits"):
        SecAggProtection(SecAggConfig(threshold=5, bits=2)).check_fits(6)  # a sum of 6 overflows 2 bits
