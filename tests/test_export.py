"""A model to take home: privfl.load_model, privfl.export_model and `privfl export`."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import privfl
from privfl.cli import main
from privfl.config import DPConfig, FederationConfig, ProtectionKind, TrainingConfig
from privfl.data import iid_partition, subsets
from privfl.errors import ConfigError
from privfl.export import EXPORT_FORMAT, MODEL_FILE, export_model, load_model
from privfl.federation import Federation
from privfl.rundir import load_checkpoint
from privfl.training import convert_for_dp


class BatchNormNet(nn.Module):
    """BatchNorm (converted to GroupNorm for DP-SGD) and a frozen random projection no checkpoint holds."""

    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Linear(30, 30)
        self.project.requires_grad_(False)
        self.layers = nn.Sequential(nn.Linear(30, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x):
        return self.layers(self.project(x))


def group_norm_net() -> nn.Module:
    return nn.Sequential(nn.Linear(30, 16), nn.GroupNorm(4, 16), nn.ReLU(), nn.Linear(16, 2))


def batch_norm_net() -> nn.Module:
    # Same parameter count as group_norm_net; converted, its BatchNorm1d becomes GroupNorm(1, 16), not (4, 16).
    return nn.Sequential(nn.Linear(30, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))


def _run(split, model_fn, out, *, seed=3):
    parts = iid_partition(len(split.train), 3, seed=0)
    clients = {f"site-{i}": s for i, s in enumerate(subsets(split.train, parts))}
    federation = Federation(
        model_fn=model_fn,
        clients=clients,
        test_set=split.test,
        training=TrainingConfig(batch_size=32, learning_rate=0.3, dp=DPConfig(noise_multiplier=1.0)),
        federation=FederationConfig(rounds=2, protection=ProtectionKind.PLAINTEXT, seed=seed, noise_seed=1),
        progress=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return federation.run(out)


@pytest.fixture(scope="module")
def bn_run(split, tmp_path_factory):
    out = tmp_path_factory.mktemp("bn") / "run"
    return _run(split, BatchNormNet, out), out


@pytest.fixture(scope="module")
def gn_run(split, tmp_path_factory):
    out = tmp_path_factory.mktemp("gn") / "run"
    return _run(split, group_norm_net, out), out


def _inputs(split):
    return torch.stack([split.test[i][0] for i in range(len(split.test))]).float()


def test_load_model_gives_the_runs_final_predictions(bn_run, split):
    result, out = bn_run
    with pytest.warns(UserWarning, match=r"model BatchNormNet changed for DP-SGD: layers\.1 BatchNorm1d\(16\) -> GroupNorm\(1, 16\)"):
        model = privfl.load_model(out, BatchNormNet)
    x = _inputs(split)
    result.model.eval()
    with torch.no_grad():
        expected = result.model(x)
        got = model(x)
    # Bit for bit: same parameters, and the frozen projection rebuilt from federation.seed.
    assert torch.equal(got, expected)
    assert not model.training
    assert isinstance(model.layers[1], nn.GroupNorm)


def test_load_model_leaves_the_callers_random_state_alone(bn_run):
    _, out = bn_run
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        load_model(out, BatchNormNet)
    assert torch.equal(torch.rand(3), expected)


def test_load_model_chooses_a_round(bn_run):
    _, out = bn_run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        first = load_model(out, BatchNormNet, round=0)
        final = load_model(out, BatchNormNet)
    trainable = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters() if p.requires_grad]).numpy()
    np.testing.assert_array_equal(trainable(first), load_checkpoint(out, 0, trainable(first).size))
    assert not np.array_equal(trainable(first), trainable(final))
    with pytest.raises(ConfigError, match=r"round=7: no checkpoint for it .* rounds 0\.\.1 have one"):
        load_model(out, BatchNormNet, round=7)


def test_export_then_load_into_a_fresh_converted_model_gives_the_same_predictions(bn_run, split, tmp_path):
    result, out = bn_run
    path = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        written = export_model(out, path, BatchNormNet)
    assert written.round == 1 and written.checked_architecture
    assert written.dp_changes == ("layers.1 BatchNorm1d(16) -> GroupNorm(1, 16)",)
    payload = torch.load(path, weights_only=True)  # tensors, strings and numbers only
    assert payload["format"] == EXPORT_FORMAT and payload["round"] == 1 and payload["rounds_finished"] == 2
    assert payload["dp_changes"] == ["layers.1 BatchNorm1d(16) -> GroupNorm(1, 16)"]
    assert payload["model"].endswith("BatchNormNet")
    assert json.loads(payload["run_identity"]) == json.loads((out / "run.json").read_text())
    assert payload["ledger_head"] == result.summary["ledger"]["head"]
    assert payload["test_accuracy"] == result.history[-1]["test_accuracy"]

    torch.manual_seed(99)  # another initialisation: everything must come from the file
    fresh = convert_for_dp(BatchNormNet()).model
    fresh.load_state_dict(payload["state_dict"])  # strict
    x = _inputs(split)
    fresh.eval()
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), result.model(x))
    # Why the changes are in the file: the unconverted model does not take the state_dict.
    with pytest.raises(RuntimeError, match="running_mean"):
        BatchNormNet().load_state_dict(payload["state_dict"])


def test_export_refuses_an_existing_file(bn_run, tmp_path):
    _, out = bn_run
    path = tmp_path / "model.pt"
    path.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="already exists"):
        export_model(out, path, BatchNormNet)
    assert path.read_bytes() == b"keep me"


def test_unconverted_batchnorm_model_on_a_group_norm_run_is_refused(gn_run):
    _, out = gn_run
    # Same parameter count, so the checkpoint would load: only the recorded architecture tells.
    assert sum(p.numel() for p in batch_norm_net().parameters()) == sum(p.numel() for p in group_norm_net().parameters())
    with pytest.raises(ConfigError, match=r"model_fn=.*layer 1 is 1: GroupNorm\(1, 16.*the run trained 1: GroupNorm\(4, 16"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            load_model(out, batch_norm_net)
    assert json.loads((out / MODEL_FILE).read_text())["layers"][1]["layer"].startswith("GroupNorm(4, 16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to convert, nothing to warn about
        assert isinstance(load_model(out, group_norm_net), nn.Sequential)


def test_other_parameter_count_is_refused_even_without_model_json(gn_run, tmp_path):
    import shutil

    _, out = gn_run
    legacy = tmp_path / "legacy"
    shutil.copytree(out, legacy, ignore=shutil.ignore_patterns("run.lock"))
    (legacy / MODEL_FILE).unlink()  # a run made before the architecture was recorded
    with pytest.raises(ConfigError, match=r"model_fn='Sequential': has 62 trainable parameters; the run .* trained another model"):
        load_model(legacy, lambda: nn.Sequential(nn.Linear(30, 2)))
    assert isinstance(load_model(legacy, group_norm_net), nn.Sequential)


def test_bad_run_directories_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        load_model(tmp_path / "missing", group_norm_net)
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        load_model(tmp_path, group_norm_net)


_CLI_CONFIG = """
[data]
dataset = "breast_cancer"
num_clients = 3
partition = "iid"
[training]
batch_size = 64
learning_rate = 0.5
[training.dp]
noise_multiplier = 1.0
[federation]
rounds = 2
protection = "plaintext"
noise_seed = 5
"""


def test_cli_export_of_a_privfl_run(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(_CLI_CONFIG)
    run = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()

    out = tmp_path / "model.pt"
    assert main(["export", str(run), "--out", str(out), "--config", str(config)]) == 0
    assert f"wrote {out}: round 1, 62 parameters" in capsys.readouterr().out
    payload = torch.load(out, weights_only=True)
    flat = torch.cat([payload["state_dict"]["linear.weight"].reshape(-1), payload["state_dict"]["linear.bias"]]).numpy()
    np.testing.assert_array_equal(flat, load_checkpoint(run, 1, 62))
    assert payload["dp_changes"] == []
    # How raw inputs become the model's: the bundled data's standardisation. A raw test row prepared with it
    # is exactly what the model was evaluated on.
    from sklearn.datasets import load_breast_cancer as raw_breast_cancer

    from privfl.config import load_config
    from privfl.runner import load_dataset

    recipe = json.loads(payload["input_preprocessing"])["standardize"]
    assert len(recipe["mean"]) == len(recipe["std"]) == len(recipe["features"]) == 30
    prepared = (raw_breast_cancer().data - np.array(recipe["mean"])) / np.array(recipe["std"])
    first_test_row = load_dataset(load_config(config)).test.features[0].numpy()
    assert np.abs(prepared - first_test_row).max(axis=1).min() < 1e-5

    # exit 2, one line naming what is wrong: the file exists, no such round, another config, no run
    assert main(["export", str(run), "--out", str(out), "--config", str(config)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "r.pt"), "--config", str(config), "--round", "5"]) == 2
    assert "round=5" in capsys.readouterr().err
    other = tmp_path / "other.toml"
    other.write_text(_CLI_CONFIG.replace("learning_rate = 0.5", "learning_rate = 0.1"))
    assert main(["export", str(run), "--out", str(tmp_path / "o.pt"), "--config", str(other)]) == 2
    assert "is not the config the run" in capsys.readouterr().err and not (tmp_path / "o.pt").exists()
    assert main(["export", str(run), "--out", str(tmp_path / "k.pt")]) == 0  # no --config: the run's config.toml
    (run / "config.toml").unlink()
    assert main(["export", str(run), "--out", str(tmp_path / "d.pt")]) == 2  # then the embedded demo, not this run
    assert "training, federation" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "n.pt")]) == 2
    assert "is not a directory" in capsys.readouterr().err

    # A setting added to privfl after the run (so missing from its run.json) does not block the export.
    identity = json.loads((run / "run.json").read_text())
    del identity["federation"]["server_learning_rate"]
    (run / "run.json").write_text(json.dumps(identity))
    assert main(["export", str(run), "--out", str(tmp_path / "new.pt"), "--config", str(config)]) == 0


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"privfl {version('privfl')}" == f"privfl {privfl.__version__}"


def test_batchnorm_warning_is_one_line_naming_the_model_and_pointing_at_the_callers_code(bn_run):
    from privfl.training import make_private_compatible

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_private_compatible(BatchNormNet())
        load_model(bn_run[1], BatchNormNet)  # several privfl frames deep
    assert len(caught) == 2
    for warning in caught:
        assert str(warning.message) == "model BatchNormNet changed for DP-SGD: layers.1 BatchNorm1d(16) -> GroupNorm(1, 16)"
        assert warning.filename == __file__  # not a line of privfl


def test_cli_export_of_a_run_on_other_data_points_to_export_model(tmp_path, capsys, monkeypatch):
    # A run on a user's own data or model (a Federation script; a deployment whose sites serve their own
    # files) does not fit the config's bundled model: the refusal says how such a run is exported.
    import privfl.export

    config = tmp_path / "run.toml"
    config.write_text(_CLI_CONFIG)
    run = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()

    def trained_another(*args, **kwargs):
        raise ConfigError("model_fn", "LogisticRegression", "has 62 trainable parameters; the run in x trained another model")

    monkeypatch.setattr(privfl.export, "export_model", trained_another)
    assert main(["export", str(run), "--out", str(tmp_path / "m.pt"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "trained another model" in err and "privfl.export_model(RUN_DIR, OUT, model_fn)" in err
