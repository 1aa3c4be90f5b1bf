"""The imprint attack recovers inputs through secure aggregation; the client check flags it; DP-SGD stops it.

The check is client-side code (``privfl.received_model``); it is tested here against the attack's models.
"""

from __future__ import annotations

import pytest
import torch

from privfl.attacks import (
    AnalyticLinear,
    ImprintAttack,
    ModelTamperError,
    Placement,
    ServerView,
    Statistic,
    UpdateObservation,
    imprint_model,
)
from privfl.attacks.base import AggregateObservation
from privfl.attacks.evaluate import ObservationSpec, build_observation, dp_sgd_gradient
from privfl.attacks.imprint import ImprintConfig
from privfl.attacks.metrics import best_match, chance_baseline, chance_psnr, pairwise_psnr
from privfl.data import load_digits
from privfl.errors import AttackError, ConfigError
from privfl.received_model import (
    FindingKind,
    ImprintCheck,
    check_model_for_imprint,
    verify_model_architecture,
    verify_received_model,
)

SHAPE = (1, 8, 8)
NUM_CLIENTS = 4
PER_CLIENT = 4
EXACT_DB = 40.0


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    split = load_digits()
    # The server's auxiliary data is the training split; the victims come from the test split.
    idx = torch.randperm(len(split.test), generator=torch.Generator().manual_seed(0))[: NUM_CLIENTS * PER_CLIENT]
    return {
        "aux": split.train.features,
        "aux_labels": split.train.targets,
        "x": split.test.features[idx],
        "y": split.test.targets[idx],
    }


def agreed_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )


def aggregate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> AggregateObservation:
    spec = ObservationSpec(view=ServerView.AGGREGATE, num_clients=NUM_CLIENTS)
    obs = build_observation(model, x, y, spec)
    assert isinstance(obs, AggregateObservation)
    return obs


def exact_count(reconstructed: torch.Tensor, x: torch.Tensor) -> int:
    if reconstructed.shape[0] == 0:
        return 0
    return int((best_match(reconstructed, x).psnr > EXACT_DB).sum())


# --- the attack ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", list(Placement))
def test_imprint_recovers_inputs_from_secure_aggregate(digits, placement: Placement) -> None:
    model = imprint_model(agreed_mlp(), input_shape=SHAPE, auxiliary_inputs=digits["aux"], num_bins=64,
                          placement=placement)
    obs = aggregate(model, digits["x"], digits["y"])
    layer = None if placement is Placement.PREPEND else "1"
    rec = ImprintAttack(layer=layer).reconstruct(model, obs)

    match = best_match(rec.inputs, digits["x"])
    exact = match.psnr > EXACT_DB
    assert int(exact.sum()) >= 8, f"only {int(exact.sum())} of 16 inputs recovered"
    # Every bin flagged as holding one input is an exact copy of a client input, with its label.
    single = rec.single[match.reconstruction_index]
    assert int(rec.single.sum()) >= 8
    assert bool(exact[single].all())
    got = rec.labels[match.reconstruction_index][single]
    assert torch.equal(got, digits["y"][match.target_index][single])
    # Rows not flagged are mixtures: none of them is a client input.
    assert int(rec.single.sum()) == int(exact.sum())
    assert rec.num_samples <= 64 and rec.bins.shape == (rec.num_samples,)


def test_honest_model_aggregate_does_not_give_this(digits) -> None:
    honest = agreed_mlp()
    obs = aggregate(honest, digits["x"], digits["y"])
    # The same reading of the honest first layer, and the analytic attack, on the honest aggregate.
    imprint_reading = ImprintAttack(layer="1").reconstruct(honest, obs)
    analytic = AnalyticLinear().reconstruct(honest, obs)
    assert exact_count(imprint_reading.inputs, digits["x"]) <= 4
    assert exact_count(analytic.inputs, digits["x"]) <= 4


def test_brightness_statistic_also_works(digits) -> None:
    model = imprint_model(agreed_mlp(), input_shape=SHAPE, auxiliary_inputs=digits["aux"],
                          statistic=Statistic.BRIGHTNESS)
    rec = ImprintAttack().reconstruct(model, aggregate(model, digits["x"], digits["y"]))
    assert exact_count(rec.inputs, digits["x"]) >= 8


def test_imprinted_model_trains_in_a_client_loop(digits) -> None:
    honest = agreed_mlp()
    before = [p.detach().clone() for p in honest.parameters()]
    model = imprint_model(honest, input_shape=SHAPE, auxiliary_inputs=digits["aux"])
    assert all(torch.equal(a, b) for a, b in zip(before, honest.parameters(), strict=True))  # the agreed model is copied
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logits = model(digits["x"])
    assert logits.shape == (16, 10)
    loss = torch.nn.functional.cross_entropy(logits, digits["y"])
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)


def test_dp_sgd_brings_imprint_recovery_to_chance(digits) -> None:
    model = imprint_model(agreed_mlp(), input_shape=SHAPE, auxiliary_inputs=digits["aux"])
    x, y = digits["x"], digits["y"]
    baseline = chance_baseline(digits["aux"])

    def dp_aggregate(noise_multiplier: float) -> AggregateObservation:
        # Each client's released gradient is one step of the DP-SGD training sites run.
        clients = [
            dp_sgd_gradient(model, x[c * PER_CLIENT : (c + 1) * PER_CLIENT], y[c * PER_CLIENT : (c + 1) * PER_CLIENT],
                            noise_multiplier=noise_multiplier, max_grad_norm=1.0, seed=1 + c)
            for c in range(NUM_CLIENTS)
        ]
        mean = [torch.stack(g).mean(dim=0) for g in zip(*clients, strict=True)]
        return AggregateObservation(gradients=mean, input_shape=SHAPE, num_clients=NUM_CLIENTS,
                                    samples_per_client=PER_CLIENT)

    attack = ImprintAttack(bounds=(0.0, 1.0))
    # Clipping alone does not stop it: a lone input's scale cancels in the ratio. (A DP-SGD step needs
    # sigma > 0 to be charged; 1e-9 adds noise far below the gradients' scale.)
    assert exact_count(attack.reconstruct(model, dp_aggregate(1e-9)).inputs, x) >= 8

    rec = attack.reconstruct(model, dp_aggregate(1.0))
    match = best_match(rec.inputs, x)
    assert int((match.psnr > EXACT_DB).sum()) == 0
    assert int(rec.single.sum()) == 0
    chance = chance_psnr(x[match.target_index], baseline)
    best_chance = float(pairwise_psnr(baseline.unsqueeze(0), x).max())
    assert float(match.psnr.mean()) <= chance + 3.0
    assert float(match.psnr.max()) <= best_chance + 3.0


def test_attack_refuses_what_it_cannot_read(digits) -> None:
    honest = agreed_mlp()
    obs = aggregate(honest, digits["x"], digits["y"])
    with pytest.raises(AttackError, match="ImprintBlock"):
        ImprintAttack().reconstruct(honest, obs)
    with pytest.raises(AttackError):
        ImprintAttack(layer="3").reconstruct(honest, obs)  # sees hidden units, not the raw input
    update = UpdateObservation(delta=[torch.zeros_like(p) for p in honest.parameters()], input_shape=SHAPE,
                               num_samples=2, local_steps=1, lr=0.1, batch_size=2)
    with pytest.raises(AttackError, match="one-step gradients"):
        ImprintAttack(layer="1").reconstruct(honest, update)


def test_ciphertext_gives_no_access(digits) -> None:
    model = imprint_model(agreed_mlp(), input_shape=SHAPE, auxiliary_inputs=digits["aux"])
    obs = build_observation(model, digits["x"], digits["y"], ObservationSpec(view=ServerView.CIPHERTEXT))
    assert not ImprintAttack().reconstruct(model, obs).accessible


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_bins": 1}, "num_bins"),
        ({"statistic": "brightness"}, "statistic"),
        ({"placement": "prepend"}, "placement"),
    ],
)
def test_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        ImprintConfig(**kwargs)
    assert info.value.field == field


def test_imprint_model_validation(digits) -> None:
    with pytest.raises(ConfigError, match="auxiliary_inputs"):
        imprint_model(agreed_mlp(), input_shape=SHAPE, auxiliary_inputs=digits["aux"].flatten(1))
    with pytest.raises(ConfigError, match="num_bins"):
        imprint_model(agreed_mlp(), input_shape=SHAPE, auxiliary_inputs=digits["aux"], num_bins=32,
                      placement=Placement.REUSE_FIRST_LINEAR)
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(72, 10))
    with pytest.raises(ConfigError, match="placement"):
        imprint_model(conv, input_shape=SHAPE, auxiliary_inputs=digits["aux"], placement=Placement.REUSE_FIRST_LINEAR)
    with pytest.raises(ConfigError):
        ImprintAttack(bounds=(1.0, 0.0))
    with pytest.raises(ConfigError):
        ImprintCheck(min_parallel_rows=1)


# --- the client-side check --------------------------------------------------------------------------------------


def trained_mlp(digits) -> torch.nn.Module:
    """The agreed MLP after 10 epochs on the training split (about 94% test accuracy)."""
    model = agreed_mlp(seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = digits["aux"], digits["aux_labels"]
    for _ in range(10):
        for i in range(0, len(x), 64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
            optimizer.step()
    return model


def test_the_check_loads_without_the_attack_package() -> None:
    import subprocess
    import sys

    code = "import sys, privfl, privfl.received_model; print(any(m.startswith('privfl.attacks') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False"]
    import privfl
    import privfl.received_model

    assert privfl.verify_received_model is privfl.received_model.verify_received_model
    assert privfl.check_model_for_imprint is privfl.received_model.check_model_for_imprint


def test_check_passes_honest_models(digits) -> None:
    reference = agreed_mlp(seed=1)  # the client's own build of the agreed architecture
    for honest in (agreed_mlp(), trained_mlp(digits)):
        assert check_model_for_imprint(honest, reference) == []
        verify_model_architecture(honest, reference)
        verify_received_model(honest, reference)


def test_check_flags_a_prepended_imprint_block(digits) -> None:
    model = imprint_model(agreed_mlp(), input_shape=SHAPE, auxiliary_inputs=digits["aux"])
    kinds = {f.kind for f in check_model_for_imprint(model, agreed_mlp(seed=1))}
    assert kinds == {FindingKind.ARCHITECTURE, FindingKind.PARAMETERS, FindingKind.PARALLEL_ROWS}
    with pytest.raises(ModelTamperError) as info:
        verify_model_architecture(model, agreed_mlp(seed=1))
    assert any(f.location == "imprint" for f in info.value.findings)
    # Without a reference the parameters alone give it away.
    assert any(f.location == "imprint.linear" for f in check_model_for_imprint(model))


def test_check_flags_a_reused_first_layer_with_the_agreed_architecture(digits) -> None:
    model = imprint_model(agreed_mlp(), input_shape=SHAPE, auxiliary_inputs=digits["aux"],
                          placement=Placement.REUSE_FIRST_LINEAR)
    reference = agreed_mlp(seed=1)
    verify_model_architecture(model, reference)  # the architecture check alone is fooled
    findings = check_model_for_imprint(model, reference)
    assert {f.kind for f in findings} == {FindingKind.PARALLEL_ROWS}
    first = next(f for f in findings if f.location == "1")
    assert "64 of 64 rows" in first.detail and "imprint signature" in first.detail
    with pytest.raises(ModelTamperError, match="parallel-rows"):
        verify_received_model(model, reference)


def test_check_flags_changed_layer_settings() -> None:
    reference = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=1), torch.nn.Flatten(), torch.nn.Linear(144, 10))
    received = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2), torch.nn.Flatten(), torch.nn.Linear(144, 10))
    with pytest.raises(ModelTamperError, match="stride"):
        verify_model_architecture(received, reference)
