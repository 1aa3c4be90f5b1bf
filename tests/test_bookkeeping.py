"""Book-keeping clipping: the clipped sum, the noise, and DP-SGD through it, against Opacus' per-sample path."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from privfl.bookkeeping import BookKeeping, bookkeeping_unsupported, check_gradient_coverage
from privfl.config import ClippingMode, DPConfig, TrainingConfig
from privfl.data import ArrayDataset, load_breast_cancer
from privfl.errors import ConfigError
from privfl.models import MLP, LogisticRegression, SmallCNN
from privfl.training import choose_clipping, train_dp_sgd

CPU = torch.device("cpu")
SUM = nn.CrossEntropyLoss(reduction="sum")


def opacus_clipped_sum(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, max_grad_norm: float):
    """Opacus' hooks: every per-example gradient materialised, flat-clipped as its DP optimizer does, summed."""
    from opacus import GradSampleModule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = GradSampleModule(model, loss_reduction="sum")
        SUM(wrapped(inputs), labels).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    samples = [p.grad_sample for p in params]
    norms = torch.stack([g.reshape(len(inputs), -1).norm(dim=1) for g in samples], dim=1).norm(dim=1)
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    sums = [torch.einsum("i,i...->...", factors, g) for g in samples]
    wrapped._close()
    for p in params:
        p.grad = None
        p.grad_sample = None
    return sums, norms


class Tokens(nn.Module):
    """Embedding, LayerNorm and a linear layer on (B, T, d) sequences (the Gram form), then a 2-D head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(self.norm(self.embed(x)))).mean(dim=1))


class Narrow(nn.Module):
    """A linear layer on long sequences of narrow vectors (2 T^2 > d p: per-example gradients instantiated)."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(2, 3)
        self.head = nn.Linear(3, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(x)).sum(dim=1))


class Twice(nn.Module):
    """One linear layer called twice in a forward pass: its per-example gradient sums both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(torch.relu(self.shared(x))))


CASES = {
    "mlp with biases": (lambda: MLP(10, 3, hidden=32), lambda b: torch.randn(b, 10)),
    "layers without bias": (
        lambda: nn.Sequential(nn.Linear(10, 16, bias=False), nn.ReLU(), nn.Linear(16, 3, bias=False)),
        lambda b: torch.randn(b, 10),
    ),
    "cnn with groupnorm": (lambda: SmallCNN(3, channels=4), lambda b: torch.randn(b, 1, 8, 8)),
    "sequence, gram form": (Tokens, lambda b: torch.randint(0, 20, (b, 5))),
    "sequence, instantiated": (Narrow, lambda b: torch.randn(b, 9, 2)),
    "layer called twice": (Twice, lambda b: torch.randn(b, 6)),
}


@pytest.mark.parametrize("batch", [1, 2, 17])
@pytest.mark.parametrize("case", sorted(CASES))
def test_clipped_sum_equals_opacus_per_sample_clipping(case, batch):
    build, draw = CASES[case]
    torch.manual_seed(batch)
    model = build()
    inputs, labels = draw(batch), torch.randint(0, 3, (batch,))
    _, norms = opacus_clipped_sum(model, inputs, labels, 1.0)
    # C between the smallest and largest norms: with more than one example, some are clipped and some are not.
    max_grad_norm = float(norms.min() + norms.max()) / 2 if batch > 1 else float(norms[0]) / 2
    expected, expected_norms = opacus_clipped_sum(model, inputs, labels, max_grad_norm)
    if batch > 1:
        assert (expected_norms > max_grad_norm).any() and (expected_norms < max_grad_norm).any()

    got = BookKeeping(model, max_grad_norm=max_grad_norm).clipped_sum(inputs, labels, SUM)

    torch.testing.assert_close(got.norms, expected_norms, rtol=1e-5, atol=1e-6)
    assert len(got.grads) == len(expected)
    for mine, theirs in zip(got.grads, expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient was computed


def test_an_in_place_activation_after_a_layer_does_not_change_its_recorded_output():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    in_place = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    in_place.load_state_dict(plain.state_dict())
    inputs, labels = torch.randn(6, 5), torch.randint(0, 3, (6,))
    expected, _ = opacus_clipped_sum(plain, inputs, labels, 0.5)  # Opacus' hooks refuse in-place outputs
    got = BookKeeping(in_place, max_grad_norm=0.5).clipped_sum(inputs, labels, SUM)
    for mine, theirs in zip(got.grads, expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_frozen_parameters_are_left_out():
    torch.manual_seed(0)
    model = MLP(10, 3, hidden=16)
    model.net[1].requires_grad_(False)  # the first linear layer is frozen
    inputs, labels = torch.randn(9, 10), torch.randint(0, 3, (9,))
    expected, _ = opacus_clipped_sum(model, inputs, labels, 0.3)
    got = BookKeeping(model, max_grad_norm=0.3).clipped_sum(inputs, labels, SUM)
    assert len(got.grads) == 4
    for mine, theirs in zip(got.grads, expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_hooks_are_removed_and_an_empty_batch_clips_nothing():
    model = MLP(4, 2, hidden=8)
    keeper = BookKeeping(model, max_grad_norm=1.0)
    keeper.clipped_sum(torch.randn(3, 4), torch.tensor([0, 1, 0]), SUM)
    assert not any(m._forward_hooks for m in model.modules())
    empty = keeper.clipped_sum(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), SUM)
    assert empty.norms.shape == (0,) and all(float(g.abs().sum()) == 0 for g in empty.grads)


def test_noise_is_opacus_draws_with_std_sigma_c_over_expected_batch():
    # 40,200 noise values: their mean and standard deviation must sit within 5 standard errors (std: 1.8%).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 200))
    inputs, labels = torch.randn(5, 200), torch.randint(0, 3, (5,))
    sigma, max_grad_norm, expected_batch = 1.7, 0.4, 64
    keeper = BookKeeping(model, max_grad_norm=max_grad_norm)
    clipped = keeper.clipped_sum(inputs, labels, SUM).grads
    keeper.private_gradients(
        inputs, labels, SUM, noise_multiplier=sigma, expected_batch_size=expected_batch,
        generator=torch.Generator().manual_seed(11),
    )
    noise = [p.grad * expected_batch - c for p, c in zip(model.parameters(), clipped, strict=True)]
    flat = torch.cat([n.reshape(-1) for n in noise]).double()
    n = flat.numel()
    assert abs(float(flat.mean())) < 5 * sigma * max_grad_norm / math.sqrt(n)
    assert abs(float(flat.std()) / (sigma * max_grad_norm) - 1) < 5 / math.sqrt(2 * n)
    # The very draws Opacus' optimizer makes from the same generator, parameter by parameter.
    generator = torch.Generator().manual_seed(11)
    for p, drawn in zip(model.parameters(), noise, strict=True):
        opacus = torch.normal(mean=0, std=sigma * max_grad_norm, size=p.shape, generator=generator, dtype=p.dtype)
        torch.testing.assert_close(drawn, opacus, rtol=0, atol=1e-5)


def test_an_empty_batch_is_a_noise_only_step():
    model = MLP(4, 2, hidden=8)
    keeper = BookKeeping(model, max_grad_norm=2.0)
    loss = keeper.private_gradients(
        torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), SUM, noise_multiplier=3.0, expected_batch_size=4,
        generator=torch.Generator().manual_seed(5),
    )
    assert float(loss) == 0.0
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert float(flat.abs().min()) > 0  # every coordinate got noise
    generator = torch.Generator().manual_seed(5)
    drawn = torch.cat([torch.normal(0.0, 6.0, size=p.shape, generator=generator).reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(flat, drawn / 4)


@pytest.fixture(scope="module")
def data():
    return load_breast_cancer()


@pytest.mark.parametrize("sigma", [1e-9, 1.0])
def test_train_dp_sgd_gives_the_update_of_the_other_modes(data, sigma):
    # Same seed: same Poisson batches and the same noise draws, so every mode takes the same steps.
    deltas, results = {}, {}
    for mode in (ClippingMode.PER_SAMPLE, ClippingMode.GHOST, ClippingMode.BOOKKEEPING):
        torch.manual_seed(0)
        model = MLP(30, 2, hidden=32)
        dp = DPConfig(noise_multiplier=1.0, max_grad_norm=0.1, clipping=mode)
        cfg = TrainingConfig(batch_size=16, learning_rate=0.1, momentum=0.9, local_epochs=2, dp=dp)
        results[mode] = train_dp_sgd(model, data.train, config=cfg, noise_multiplier=sigma, device=CPU, seed=3)
        deltas[mode] = results[mode].delta
    for mode in (ClippingMode.PER_SAMPLE, ClippingMode.GHOST):
        np.testing.assert_allclose(deltas[ClippingMode.BOOKKEEPING], deltas[mode], rtol=0, atol=1e-5)
        assert results[ClippingMode.BOOKKEEPING].event == results[mode].event
        assert results[ClippingMode.BOOKKEEPING].mean_loss == pytest.approx(results[mode].mean_loss, rel=1e-5)
    assert results[ClippingMode.BOOKKEEPING].clipping is ClippingMode.BOOKKEEPING
    assert np.linalg.norm(deltas[ClippingMode.BOOKKEEPING]) > 0.01


def test_empty_poisson_batches_take_noise_only_steps_as_with_hooks():
    # batch_size 1 on 10 examples: about a third of the batches are empty.
    data = ArrayDataset(np.random.default_rng(0).normal(size=(10, 4)), np.arange(10) % 2)
    deltas = {}
    for mode in ("per_sample", "bookkeeping"):
        torch.manual_seed(0)
        cfg = TrainingConfig(batch_size=1, learning_rate=0.1, dp=DPConfig(noise_multiplier=1.0, clipping=mode))
        result = train_dp_sgd(MLP(4, 2, hidden=8), data, config=cfg, noise_multiplier=1.0, device=CPU, seed=0)
        assert result.event.steps == 10
        deltas[mode] = result.delta
    np.testing.assert_allclose(deltas["bookkeeping"], deltas["per_sample"], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("num_examples", "batch_size"), [(49, 1), (98, 2), (569, 16)])
def test_every_mode_divides_by_the_same_expected_batch_size(num_examples, batch_size):
    # int(49 * (1 / 49)) == 0 in floating point: the update was NaN with hooks before E[B] was computed exactly.
    data = ArrayDataset(np.random.default_rng(0).normal(size=(num_examples, 4)), np.arange(num_examples) % 2)
    deltas = {}
    for mode in ("per_sample", "bookkeeping"):
        torch.manual_seed(0)
        cfg = TrainingConfig(batch_size=batch_size, learning_rate=0.1, dp=DPConfig(noise_multiplier=1.0, clipping=mode))
        deltas[mode] = train_dp_sgd(MLP(4, 2, hidden=8), data, config=cfg, noise_multiplier=1e-9, device=CPU, seed=0).delta
    assert np.isfinite(deltas["per_sample"]).all()
    np.testing.assert_allclose(deltas["bookkeeping"], deltas["per_sample"], rtol=0, atol=1e-5)
    assert np.linalg.norm(deltas["bookkeeping"]) > 0


def test_seed_none_draws_fresh_noise(data):
    cfg = TrainingConfig(batch_size=16, dp=DPConfig(noise_multiplier=1.0, clipping="bookkeeping"))
    deltas = []
    for _ in range(2):
        torch.manual_seed(0)
        deltas.append(train_dp_sgd(MLP(30, 2, hidden=8), data.train, config=cfg, noise_multiplier=1.0, device=CPU).delta)
    assert np.abs(deltas[0] - deltas[1]).max() > 1e-3


class Scaled(nn.Module):
    """A layer with its own parameter that book-keeping does not know how to clip."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_an_unsupported_layer_is_a_config_error_naming_it(data):
    model = nn.Sequential(nn.Linear(30, 200), Scaled(200), nn.ReLU(), nn.Linear(200, 2))
    with pytest.raises(ConfigError, match=r"layer 1 \(Scaled\)"):
        BookKeeping(model, max_grad_norm=1.0)
    cfg = TrainingConfig(batch_size=16, dp=DPConfig(noise_multiplier=1.0, clipping="bookkeeping"))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match="Scaled"):
        train_dp_sgd(model, data.train, config=cfg, noise_multiplier=1.0, device=CPU, seed=0)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_a_tied_weight_is_refused():
    layer = nn.Linear(8, 8)
    assert bookkeeping_unsupported(nn.Sequential(layer, nn.ReLU(), layer)) is None  # one layer called twice
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    second.weight = first.weight
    assert "shared" in (bookkeeping_unsupported(nn.Sequential(first, nn.ReLU(), second)) or "")
    with pytest.raises(ConfigError, match="shared"):
        BookKeeping(nn.Sequential(first, nn.ReLU(), second), max_grad_norm=1.0)


def test_a_batchnorm_is_refused_even_without_parameters():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, affine=False), nn.Linear(8, 2))
    with pytest.raises(ConfigError, match=r"layer 1 \(BatchNorm1d\) mixes the examples"):
        BookKeeping(model, max_grad_norm=1.0)


def test_auto_picks_bookkeeping_for_linear_models_it_supports():
    assert choose_clipping(MLP(30, 2, hidden=1024), ClippingMode.AUTO) is ClippingMode.BOOKKEEPING
    assert choose_clipping(LogisticRegression(30, 2), ClippingMode.AUTO) is ClippingMode.BOOKKEEPING
    wide_with_custom_layer = nn.Sequential(nn.Linear(30, 1024), Scaled(1024), nn.Linear(1024, 2))
    assert choose_clipping(wide_with_custom_layer, ClippingMode.AUTO) is ClippingMode.GHOST
    narrow_with_custom_layer = nn.Sequential(nn.Linear(30, 8), Scaled(8), nn.Linear(8, 2))
    assert choose_clipping(narrow_with_custom_layer, ClippingMode.AUTO) is ClippingMode.PER_SAMPLE
    assert choose_clipping(SmallCNN(10), ClippingMode.AUTO) is ClippingMode.PER_SAMPLE
    assert choose_clipping(LogisticRegression(30, 2), ClippingMode.GHOST) is ClippingMode.GHOST
    assert DPConfig(noise_multiplier=1.0, clipping="bookkeeping").clipping is ClippingMode.BOOKKEEPING


class SharedComponent(nn.Module):
    """Tokens with a large shared component and output gradients summing to zero over the tokens."""

    def __init__(self, d: int = 64, p: int = 64) -> None:
        super().__init__()
        self.fc = nn.Linear(d, p, bias=False)
        self.head = nn.Linear(p, 3, bias=False)
        self.head.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x)
        return self.head(torch.tanh(z - z.mean(dim=1, keepdim=True)).sum(dim=1))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("width", "steps"), [(64, 8), (2, 9)])  # 2 T^2 <= d p: the Gram form; else instantiated
def test_gram_form_norm_is_exact_when_tokens_share_a_large_component(seed, width, steps):
    # shared / variation = 1e4: in float32 the Gram form gave norms too small (released 1.97 C) or NaN.
    torch.manual_seed(seed)
    model = SharedComponent(width, width)
    inputs = torch.randn(1, 1, width) * 1e4 + torch.randn(1, steps, width)
    labels = torch.tensor([seed % 3])
    z = torch.autograd.grad(SUM(model(inputs), labels), model.fc.weight)[0]
    keeper = BookKeeping(model, max_grad_norm=1.0)
    got = keeper.clipped_sum(inputs, labels, SUM)
    assert torch.isfinite(got.norms).all()
    torch.testing.assert_close(got.norms.double(), z.double().norm().reshape(1), rtol=1e-3, atol=0)
    keeper.private_gradients(inputs, labels, SUM, noise_multiplier=0.0, expected_batch_size=1, generator=None)
    released = float(model.fc.weight.grad.double().norm())
    assert math.isfinite(released) and released <= 1.0 * (1 + 1e-5)


def test_gram_form_released_norm_is_bounded_through_train_dp_sgd():
    for seed in range(6):
        torch.manual_seed(seed)
        inputs = torch.randn(1, 1, 64) * 1e4 + torch.randn(1, 8, 64)
        data = torch.utils.data.TensorDataset(inputs, torch.tensor([seed % 3]))
        dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, clipping="bookkeeping")
        cfg = TrainingConfig(batch_size=1, learning_rate=1.0, dp=dp)
        result = train_dp_sgd(SharedComponent(), data, config=cfg, noise_multiplier=1e-9, device=CPU, seed=0)
        released = float(np.linalg.norm(result.delta.astype(np.float64)))
        assert math.isfinite(released) and released <= 1.0 * (1 + 1e-5), (seed, released)


class GainLinear(nn.Linear):
    """A Linear subclass with its own extra parameter and its own forward."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.full((self.out_features,), 3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias) * self.gain


class DoubledLinear(nn.Linear):
    """A Linear subclass with only weight and bias but another forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def _with_forward_pre_hook() -> nn.Module:
    layer = nn.Linear(6, 5)
    layer.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    return layer


def _parametrized() -> nn.Module:
    from torch.nn.utils import parametrizations

    return parametrizations.orthogonal(nn.Linear(5, 5))


@pytest.mark.parametrize(
    ("first", "message"),
    [
        (lambda: GainLinear(6, 5), r"layer 0 \(GainLinear\)"),
        (lambda: DoubledLinear(6, 5), r"layer 0 \(DoubledLinear\)"),
        (lambda: nn.utils.weight_norm(nn.Linear(6, 5)), r"layer 0 \(Linear\).*weight_g"),
        (lambda: nn.utils.spectral_norm(nn.Linear(6, 5)), r"layer 0 \(Linear\).*weight_orig"),
        (_with_forward_pre_hook, r"layer 0 \(Linear\) has forward pre-hooks"),
    ],
)
def test_linear_subclasses_and_reparametrised_layers_are_refused(first, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm's deprecation
        model = nn.Sequential(first(), nn.Tanh(), nn.Linear(5, 3))
    assert re.search(message, bookkeeping_unsupported(model) or "")
    with pytest.raises(ConfigError, match=message):
        BookKeeping(model, max_grad_norm=1.0)
    assert choose_clipping(model, ClippingMode.AUTO) is not ClippingMode.BOOKKEEPING


def test_a_parametrized_layer_is_refused():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), _parametrized(), nn.Linear(5, 3))
    with pytest.raises(ConfigError, match=r"layer 2 \(ParametrizedLinear\)"):
        BookKeeping(model, max_grad_norm=1.0)


def test_a_subclass_of_a_per_sample_layer_is_refused():
    class MyNorm(nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(6, 5), MyNorm(5), nn.Linear(5, 3))
    with pytest.raises(ConfigError, match=r"layer 1 \(MyNorm\)"):
        BookKeeping(model, max_grad_norm=1.0)


def test_multihead_attention_output_layer_is_a_linear_layer():
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    model = nn.Sequential(NonDynamicallyQuantizableLinear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    assert bookkeeping_unsupported(model) is None
    inputs, labels = torch.randn(5, 6), torch.randint(0, 3, (5,))
    expected, _ = opacus_clipped_sum(model, inputs, labels, 0.5)
    got = BookKeeping(model, max_grad_norm=0.5).clipped_sum(inputs, labels, SUM)
    for mine, theirs in zip(got.grads, expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (lambda: nn.Embedding(10, 6, max_norm=0.5), "max_norm"),
        (lambda: nn.Embedding(10, 6, sparse=True), "sparse"),
    ],
)
def test_embeddings_book_keeping_cannot_clip_are_refused(layer, message):
    model = nn.Sequential(layer(), nn.Flatten(), nn.Linear(30, 3))
    with pytest.raises(ConfigError, match=rf"layer 0 \(Embedding\).*{message}"):
        BookKeeping(model, max_grad_norm=1.0)


class Keyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(input=torch.tanh(self.norm(input=self.fc(input=x))))


def test_a_layer_called_with_a_keyword_input_is_clipped_as_a_positional_call():
    torch.manual_seed(0)
    model = Keyword()
    positional = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))
    for mine, theirs in zip(positional.parameters(), model.parameters(), strict=True):
        mine.data.copy_(theirs.data)
    inputs, labels = torch.randn(7, 6), torch.randint(0, 3, (7,))
    expected, expected_norms = opacus_clipped_sum(positional, inputs, labels, 0.5)
    got = BookKeeping(model, max_grad_norm=0.5).clipped_sum(inputs, labels, SUM)
    torch.testing.assert_close(got.norms, expected_norms, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(got.grads, expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


class SequenceFirst(nn.Module):
    """Runs its layer on (T, B, d): row t of the layer's input is time step t, not example t."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(x.transpose(0, 1))).sum(dim=0))


class Flattened(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(x.reshape(-1, 6))).reshape(x.shape[0], -1, 6).sum(dim=1))


@pytest.mark.parametrize("model", [SequenceFirst, Flattened])
def test_a_layer_not_batch_first_is_refused(model):
    inputs, labels = torch.randn(4, 3, 6), torch.randint(0, 3, (4,))  # T = 3 != B = 4
    with pytest.raises(ConfigError, match=r"layer fc \(Linear\).*first dimension"):
        BookKeeping(model(), max_grad_norm=1.0).clipped_sum(inputs, labels, SUM)


def test_a_sequence_first_layer_with_as_many_steps_as_examples_fails_the_coverage_check():
    # T == B: every shape looks batch-first, but the norms would be per time step.
    inputs, labels = torch.randn(4, 4, 6), torch.randint(0, 3, (4,))
    with pytest.raises(ConfigError, match=r"layer fc \(Linear\) mixes the examples"):
        check_gradient_coverage(SequenceFirst(), inputs, labels, SUM)


class TiedHead(nn.Module):
    """An embedding whose weight is also the output layer (weight tying, in forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.fc = nn.Linear(6, 6)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(self.embed(tokens).mean(dim=1))) @ self.embed.weight[:3].T


class DirectUse(nn.Module):
    """A skip path using a linear layer's weight directly, outside the layer."""

    def __init__(self, act: nn.Module | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = act if act is not None else nn.Tanh()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc(x))) + 50 * (x @ self.fc.weight.T)[:, :3]


@pytest.mark.parametrize(
    ("build", "draw", "parameter"),
    [
        (TiedHead, lambda: torch.randint(0, 10, (5, 4)), "embed.weight"),
        (DirectUse, lambda: torch.randn(5, 8), "fc.weight"),
        (lambda: DirectUse(nn.PReLU()), lambda: torch.randn(5, 8), "fc.weight"),  # ghost clipping's case
    ],
)
def test_a_parameter_used_outside_its_layer_is_refused(build, draw, parameter):
    torch.manual_seed(0)
    model = build()
    with pytest.raises(ConfigError, match=rf"{re.escape(parameter)}.*used outside its module"):
        check_gradient_coverage(model, draw(), torch.randint(0, 3, (5,)), SUM)
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("build", "draw"),
    [
        (lambda: MLP(10, 3, hidden=16), lambda b: torch.randn(b, 10)),
        (Twice, lambda b: torch.randn(b, 6)),
        (Tokens, lambda b: torch.randint(0, 20, (b, 5))),
        (lambda: SmallCNN(3, channels=4), lambda b: torch.randn(b, 1, 8, 8)),
        (lambda: nn.Sequential(nn.Linear(30, 8), Scaled(8), nn.Linear(8, 3)), lambda b: torch.randn(b, 30)),
        (lambda: nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.ReLU(inplace=True), nn.Linear(8, 3)),
         lambda b: torch.randn(b, 6)),
        (Keyword, lambda b: torch.randn(b, 6)),
    ],
)
@pytest.mark.parametrize("batch", [1, 5])
def test_models_whose_parameters_stay_in_their_layers_pass_the_coverage_check(build, draw, batch):
    torch.manual_seed(batch)
    model = build()
    model.train()
    check_gradient_coverage(model, draw(batch), torch.randint(0, 3, (batch,)), SUM)
    check_gradient_coverage(model, draw(batch), torch.randint(0, 3, (batch,)))  # CrossEntropy(sum) by default
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
