"""A user's own model and data that do not fit each other, or arguments of the wrong kind, are
typed ConfigErrors naming the site or argument, never an error from deep inside torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

from privfl.config import DPConfig, FederationConfig, ProtectionKind, TrainingConfig
from privfl.errors import ConfigError
from privfl.federation import Federation


def _data(n: int = 40, features: int = 30, labels: torch.Tensor | None = None) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=generator)
    y = labels if labels is not None else torch.randint(0, 2, (n,), generator=generator)
    return TensorDataset(x, y)


def _run(**overrides):
    arguments = {
        "model_fn": lambda: nn.Linear(30, 2),
        "clients": {"site-a": _data()},
        "training": TrainingConfig(batch_size=8, dp=DPConfig(noise_multiplier=1.0)),
        "federation": FederationConfig(rounds=1, protection=ProtectionKind.PLAINTEXT, device="cpu"),
        "progress": False,
        **overrides,
    }
    return Federation(**arguments).run()


@pytest.mark.parametrize("label", [2, 5])
def test_a_label_past_the_models_outputs_names_the_site(label):
    # The model has 2 outputs (classes 0 and 1). Every label is out of range: a round samples its batches at
    # random, and the check on a site's first examples runs once per kind of model and process.
    labels = torch.full((40,), label, dtype=torch.int64)
    with pytest.raises(ConfigError, match=r"a class label is outside the model's outputs") as info:
        _run(clients={"site-a": _data(labels=labels)})
    assert info.value.field == "dataset[site-a]"


def test_a_site_with_labels_past_the_models_outputs_is_refused_before_any_site_is_charged(tmp_path):
    # 30 sites, 3 sampled a round: the bad one (last) might be sampled only many rounds in, after the
    # others had spent budget on rounds that then never finish. Its labels are in memory: checked first.
    clients = {f"site-{k:02d}": _data() for k in range(29)}
    clients["site-29"] = _data(labels=torch.tensor([0, 1] * 19 + [0, 3]))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"label 3 for a model with 2 outputs.*outside the model's outputs") as info:
        Federation(
            model_fn=lambda: nn.Linear(30, 2), clients=clients, progress=False,
            training=TrainingConfig(batch_size=8, dp=DPConfig(noise_multiplier=1.0)),
            federation=FederationConfig(rounds=20, client_fraction=0.1, protection=ProtectionKind.PLAINTEXT, device="cpu"),
        ).run(out)  # fmt: skip
    assert info.value.field == "dataset[site-29]"
    assert not (out / "ledger.jsonl").exists()  # nothing was charged


def test_a_test_set_with_labels_past_the_models_outputs_is_named():
    with pytest.raises(ConfigError, match=r"label 9 for a model with 2 outputs") as info:
        _run(test_set=_data(labels=torch.full((40,), 9, dtype=torch.int64)))
    assert info.value.field == "dataset[test_set]"


class _Loaded(torch.utils.data.Dataset):
    """Labels only by loading examples (no .targets): checked when the site first trains."""

    def __init__(self, labels: torch.Tensor, features: int = 30) -> None:
        self.data = _data(labels=labels, features=features)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        return self.data[index]


class _NoSingles(nn.Module):
    """A model of its own kind: it refuses a batch of one (the label pre-check's probe), as some do."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(30, 2)

    def forward(self, x):
        if len(x) == 1:
            raise RuntimeError("this model needs batches of two or more")
        return self.linear(x)


def test_a_model_the_label_check_cannot_probe_trains_and_its_labels_are_checked_when_it_does():
    seeded = FederationConfig(rounds=1, protection=ProtectionKind.PLAINTEXT, device="cpu", noise_seed=0)  # no batch of one
    result = _run(model_fn=_NoSingles, federation=seeded)
    assert len(result.history) == 1
    with pytest.raises(ConfigError, match=r"a class label is outside the model's outputs"):
        _run(model_fn=_NoSingles, federation=seeded, clients={"site-a": _data(labels=torch.full((40,), 7, dtype=torch.int64))})


def test_labels_held_in_memory_are_read_without_loading_examples():
    from torch.utils.data import ConcatDataset, Subset

    from privfl.data import ArrayDataset, known_labels

    y = torch.arange(40) % 3
    assert known_labels(_data(labels=y)).tolist() == y.tolist()
    assert known_labels(Subset(_data(labels=y), [5, 1])).tolist() == [2, 1]
    assert known_labels(ConcatDataset([_data(labels=y), Subset(_data(labels=y), [2])])).tolist() == [*y.tolist(), 2]
    assert known_labels(ArrayDataset(torch.zeros(3, 2).numpy(), [0, 1, 1])).tolist() == [0, 1, 1]
    assert known_labels(_Loaded(y)) is None
    assert known_labels(ConcatDataset([_data(labels=y), _Loaded(y)])) is None
    assert known_labels(TensorDataset(torch.zeros(4, 2))) is None  # no label tensor


def test_labels_the_dataset_does_not_hold_in_memory_are_still_refused_when_the_site_trains():
    with pytest.raises(ConfigError, match=r"a class label is outside the model's outputs") as info:
        _run(clients={"site-a": _Loaded(torch.full((40,), 4, dtype=torch.int64))})
    assert info.value.field == "dataset[site-a]"


@pytest.mark.parametrize("name", ["clinic\nb", "clinic\tb", "a\x1b[31mred"])
def test_a_client_name_with_a_control_character_is_refused(name):
    with pytest.raises(ConfigError, match="printable characters") as info:
        _run(clients={name: _data()})
    assert info.value.field == "clients"


def test_a_pipe_in_a_client_name_does_not_open_a_column_of_the_audit(tmp_path):
    from privfl.audit.report import audit_run

    Federation(
        model_fn=lambda: nn.Linear(30, 2), clients={"clinic|b": _data(), "clinic-c": _data()}, progress=False,
        training=TrainingConfig(batch_size=8, dp=DPConfig(noise_multiplier=1.0)),
        federation=FederationConfig(rounds=1, protection=ProtectionKind.PLAINTEXT, device="cpu"),
    ).run(tmp_path / "run")  # fmt: skip
    markdown = audit_run(tmp_path / "run").markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| round"))
    assert header.count(" | ") == 2 and "clinic\\|b" in header  # round, clinic|b, clinic-c
    assert any(line.startswith("| clinic\\|b ") for line in markdown.splitlines())


def test_a_delta_that_voids_the_guarantee_is_warned_about_when_a_library_run_starts():
    # A library user who never runs privfl lint: delta 0.5 for a 5-record site runs, but says so.
    from privfl.errors import PrivacyWarning

    with pytest.warns(PrivacyWarning, match=r"PFL002 training.dp.delta: client 'small': delta 0.5 >= 1/n = 0.2 \(n=5\)"):
        _run(clients={"small": _data(n=5), "site-a": _data()}, training=TrainingConfig(batch_size=4, dp=DPConfig(target_epsilon=3.0, delta=0.5)))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", PrivacyWarning)  # a sound delta: nothing to say
        _run(clients={"small": _data(n=5), "site-a": _data()}, training=TrainingConfig(batch_size=4, dp=DPConfig(target_epsilon=3.0, delta=1e-3)))


def test_a_negative_integer_label_is_refused_like_a_negative_float_one():
    with pytest.raises(ConfigError, match=r"label -1 of example 0.*whole number >= 0"):
        _run(clients={"site-a": _data(labels=torch.full((40,), -1, dtype=torch.int64))})


def test_inputs_of_another_width_than_the_model_name_the_site_and_the_shape():
    with pytest.raises(ConfigError, match=r"does not take site site-a's inputs \(one example has shape \(31,\)\)") as info:
        _run(clients={"site-a": _data(features=31)})
    assert info.value.field == "model_fn"


class _Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(30), torch.tensor(0)


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"model_fn": nn.Linear(30, 2)}, "model_fn", "must build a model, not be one"),
        ({"clients": [_data()]}, "clients", "must map each client's name"),
        ({"clients": {"site-a": _Stream()}}, "clients[site-a]", "map-style Dataset"),
        ({"training": {"batch_size": 8}}, "training", "privfl.TrainingConfig"),
        ({"federation": {"rounds": 1}}, "federation", "privfl.FederationConfig"),
    ],
)
def test_arguments_of_the_wrong_kind_are_refused_when_the_federation_is_made(overrides, field, message):
    with pytest.raises(ConfigError, match=message) as info:
        _run(**overrides)
    assert info.value.field == field


def test_a_site_whose_inputs_the_model_does_not_take_is_refused_before_any_site_is_charged(tmp_path):
    # The last of 30 sites holds one feature too many. Found only when that site was first sampled, the
    # others would already have spent budget on rounds that never finish; and the run directory could not
    # be reused for the corrected data. Every distinct input shape is run through the model first.
    clients = {f"site-{k:02d}": _data() for k in range(29)}
    clients["site-29"] = _Loaded(torch.zeros(40, dtype=torch.int64), features=31)  # labels only from __getitem__
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"does not take site site-29's inputs \(one example has shape \(31,\)\)"):
        Federation(
            model_fn=lambda: nn.Linear(30, 2), clients=clients, progress=False,
            training=TrainingConfig(batch_size=8, dp=DPConfig(noise_multiplier=1.0)),
            federation=FederationConfig(rounds=20, client_fraction=0.1, protection=ProtectionKind.PLAINTEXT, device="cpu"),
        ).run(out)  # fmt: skip
    assert not (out / "ledger.jsonl").exists()  # nothing was charged


def test_a_sites_csv_file_that_cannot_be_used_names_the_row_the_column_and_the_setting(tmp_path):
    from privfl.site import load_site_dataset

    good = tmp_path / "good.csv"
    good.write_text("age,bmi,label\n50,22.5,1\n61,30.1,0\n")
    data = load_site_dataset(str(good))
    assert len(data) == 2 and data[0][0].tolist() == [50.0, 22.5] and int(data[1][1]) == 0

    cases = {
        "age,site_name,label\n50,north,1\n": ("data", "column 'site_name' holds a value that is not a number"),
        "age,bmi,label\n50,,1\n": ("data", r"column 'bmi' is empty \(a missing value\)"),
        "age,bmi,outcome\n50,22.5,1\n": ("label_column", "not a column of"),
        "age,bmi,label\n50,22.5,yes\n": ("data", "column 'label' holds a value that is not a number"),
        "age,bmi,label\n50,22.5,0.5\n": ("label_column", "must be non-negative integers"),
    }
    for number, (text, (field, message)) in enumerate(cases.items()):
        bad = tmp_path / f"bad{number}.csv"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message) as info:
            load_site_dataset(str(bad))
        assert info.value.field == field
        assert "north" not in str(info.value) and "yes" not in str(info.value)  # a cell's value is never quoted
    with pytest.raises(ConfigError, match="no such file") as info:
        load_site_dataset(str(tmp_path / "missing.csv"))
    assert info.value.field == "data"


def test_the_site_worker_reports_bad_input_in_one_line_not_a_traceback(tmp_path, capsys):
    from privfl.flower.worker import main

    assert main(["--site", "a", "--data", str(tmp_path / "missing.csv"), "--state-dir", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m privfl.flower.worker: error: data=") and "no such file" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_parquet_file_with_a_text_column_names_the_column(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    from privfl.site import load_site_dataset

    path = tmp_path / "site.parquet"
    pd.DataFrame({"age": [50, 61], "name": ["a", "b"], "label": [1, 0]}).to_parquet(path)
    with pytest.raises(ConfigError, match=r"columns \['name'\] hold values that are not numbers"):
        load_site_dataset(str(path))
