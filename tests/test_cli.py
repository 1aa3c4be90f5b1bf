"""The privfl command line."""

from __future__ import annotations

import json

import pytest

from privfl.cli import main


def test_run_with_config_writes_summary(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(
        """
[data]
dataset = "credit"
num_clients = 5
partition = "group"
group_column = "region"
[training]
batch_size = 64
learning_rate = 0.5
[training.dp]
target_epsilon = 4.0
[federation]
rounds = 2
protection = "plaintext"
"""
    )
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["clients"]) == {"north", "south", "east", "west", "central"}
    assert summary["rounds"] == 2 and summary["protection"] == "plaintext"
    assert all(c["epsilon"] <= 4.0 for c in summary["clients"].values())
    assert (out / "ledger.json").exists() and (out / "history.json").exists()
    assert "final test accuracy" in capsys.readouterr().out


def test_bad_config_exits_2_naming_the_field(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("[training.dp]\ntarget_epsilon = -1\n")
    assert main(["run", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "training.dp.target_epsilon" in err and "-1" in err


def test_default_demo_meets_its_targets(tmp_path):
    # The README's first command: breast cancer over 5 hospitals, DP-SGD epsilon 3, CKKS.
    out = tmp_path / "demo"
    assert main(["run", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_accuracy"] >= 0.90
    assert summary["protection"] == "ckks"
    assert len(summary["clients"]) == 5
    assert all(c["epsilon"] <= 3.0 and c["delta"] == 1e-5 for c in summary["clients"].values())


def test_missing_subcommand_is_a_usage_error():
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
