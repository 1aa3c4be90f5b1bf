"""A site's model between requests: reset in place only when its training changed nothing but tensor values."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from privfl.config import ClippingMode, DPConfig, TrainingConfig
from privfl.data import ArrayDataset
from privfl.model_pool import ModelPool, differs_beyond_values
from privfl.training import flatten_parameters, load_flat_parameters, make_private_compatible, train_dp_sgd


class _Net(nn.Module):
    """A frozen embedding-like layer, a buffer the forward pass moves, and a trained head."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(6, 2)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen += 1  # buffer state a training changes; a reset must restore it
        return self.head(torch.relu(self.frozen(x)))


def _data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return ArrayDataset(rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 2, n))


def _train(model, global_params, mode, seed):
    load_flat_parameters(model, global_params)
    training = TrainingConfig(batch_size=8, dp=DPConfig(noise_multiplier=1.0, clipping=ClippingMode(mode)))
    return train_dp_sgd(model, _data(), config=training, noise_multiplier=1.0, device=torch.device("cpu"), seed=seed).delta


@pytest.mark.parametrize("mode", ["bookkeeping", "per_sample", "ghost"])
def test_every_take_trains_as_a_deep_copy_of_the_template_would(mode):
    torch.manual_seed(0)
    template = make_private_compatible(_Net())
    state = {k: v.clone() for k, v in template.state_dict().items()}
    pool = ModelPool(template)
    start = flatten_parameters(template)
    for r in range(3):
        params = start + np.float32(0.01 * r)
        model = pool.take()
        assert float(model.seen) == 0 and all(p.grad is None for p in model.parameters())
        delta = _train(model, params, mode, seed=r)
        pool.give_back(model)
        np.testing.assert_array_equal(delta, _train(copy.deepcopy(template), params, mode, seed=r))
    # The template is never trained, and never handed out.
    assert all(torch.equal(v, state[k]) for k, v in template.state_dict().items())
    assert pool.take() is not template
    # Every mode leaves the model as it found it (train_dp_sgd removes what Opacus' hooks leave), so
    # every take after the first is a reset.
    assert pool.reused == 3


@pytest.mark.parametrize("mode", ["per_sample", "ghost"])
def test_opacus_leaves_nothing_on_the_trained_model_but_a_users_own_attributes_stay(mode):
    torch.manual_seed(0)
    template = make_private_compatible(_Net())
    model = copy.deepcopy(template)
    _train(model, flatten_parameters(template), mode, seed=0)
    # Before the clean-up: the last batch's per-example gradients on every trained parameter, an
    # activation list on each hooked layer, and torch's mark of a full backward hook.
    assert differs_beyond_values(model, template) is None
    assert all(not p.__dict__ for p in model.parameters())

    # A user's own layer attribute of an Opacus name (on a layer Opacus does not hook, and on a container
    # whose forward sets it during training), and a full backward hook the user registered, stay.
    mine = copy.deepcopy(template)
    mine.frozen.activations = ["kept"]
    seen = []
    mine.head.register_full_backward_hook(lambda *a: seen.append(1))
    _train(mine, flatten_parameters(template), mode, seed=0)
    assert mine.frozen.activations == ["kept"]
    assert mine.head._is_full_backward_hook is True and len(mine.head._backward_hooks) == 1 and seen
    assert not mine.head.weight.__dict__ and "activations" not in mine.head.__dict__


class _Recording(nn.Module):
    """A container whose forward keeps its own `activations` (not an Opacus leftover)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        self.activations = [x.shape[0]]
        return self.head(x)


@pytest.mark.parametrize("mode", ["per_sample", "ghost"])
def test_a_containers_own_activations_stay_and_a_failed_training_leaves_no_per_example_gradients(mode):
    model = _Recording()
    _train(model, flatten_parameters(model), mode, seed=0)
    assert model.activations and not model.head.weight.__dict__ and "activations" not in model.head.__dict__

    # A training that fails after its steps still removes the hooks and the per-example gradients: a
    # wrong step plan makes the step-count check raise once every step has run.
    import privfl.training as training
    from privfl.errors import ProtocolError

    model = make_private_compatible(_Net())
    with pytest.raises(ProtocolError, match="planned -1"):
        training._train_opacus(
            model, torch.utils.data.DataLoader(_data(), batch_size=8), torch.optim.SGD(model.parameters(), lr=0.1),
            mode="hooks" if mode == "per_sample" else "ghost", epochs=1, steps=-1, sample_rate=8 / 24, noise_multiplier=1.0,
            max_grad_norm=1.0, expected_batch_size=8, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
        )
    assert all(not p.__dict__ for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_anything_beyond_tensor_values_keeps_a_model_from_reuse():
    template = _Net()
    assert differs_beyond_values(copy.deepcopy(template), template) is None

    hooked = copy.deepcopy(template)
    hooked.head.register_forward_hook(lambda *a: None)
    assert "_forward_hooks" in differs_beyond_values(hooked, template)

    tagged = copy.deepcopy(template)
    tagged.head.weight.grad_sample = torch.zeros(1)
    assert "grad_sample" in differs_beyond_values(tagged, template)

    stateful = copy.deepcopy(template)
    stateful.cache = [torch.zeros(1)]  # Python state a reset would not restore
    assert "cache" in differs_beyond_values(stateful, template)

    counted = copy.deepcopy(template)
    template.calls, counted.calls = 0, 3  # a plain attribute a training changed
    assert "calls" in differs_beyond_values(counted, template)

    unfrozen = copy.deepcopy(template)
    unfrozen.frozen.weight.requires_grad_(True)
    assert "trained on one model only" in differs_beyond_values(unfrozen, template)

    pool = ModelPool(template)
    for model in (hooked, tagged, stateful, counted, unfrozen):
        pool.give_back(model)
        taken = pool.take()
        assert taken is not model and pool.reused == 0


@pytest.mark.parametrize("clipping", ["bookkeeping", "per_sample"])
def test_federation_gives_the_same_run_as_with_model_fn_for_every_training(clipping, monkeypatch):
    from privfl.config import FederationConfig, ProtectionKind
    from privfl.data import iid_partition, load_breast_cancer, subsets
    from privfl.federation import Federation

    split = load_breast_cancer()
    clients = {f"s{i}": d for i, d in enumerate(subsets(split.train, iid_partition(len(split.train), 3, seed=0)))}
    calls = []

    def model_fn():
        calls.append(1)
        frozen = nn.Linear(30, 30)
        frozen.requires_grad_(False)
        return nn.Sequential(frozen, nn.Tanh(), nn.Linear(30, 2))

    def run():
        calls.clear()
        return Federation(
            model_fn=model_fn, clients=clients, test_set=split.test,
            training=TrainingConfig(batch_size=32, learning_rate=0.5, dp=DPConfig(noise_multiplier=0.5, clipping=ClippingMode(clipping))),
            federation=FederationConfig(rounds=3, protection=ProtectionKind.PLAINTEXT, seed=1, noise_seed=0),
            progress=False,
        ).run()

    reused = run()
    reused_calls = len(calls)
    monkeypatch.setattr(ModelPool, "give_back", lambda self, model: None)  # every training on a model_fn build
    built = run()
    # The initial model, the template of the copies, then 3 rounds x (3 trainings + 1 evaluation) = 12 copies.
    # In every clipping mode only the first copy is built; the others are resets.
    assert len(calls) == 2 + 12
    assert reused_calls == 2 + 1
    np.testing.assert_array_equal(flatten_parameters(reused.model), flatten_parameters(built.model))
    assert [h["test_loss"] for h in reused.history] == [h["test_loss"] for h in built.history]
