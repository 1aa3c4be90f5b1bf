"""The attack matrix behind ``privfl attack``: files, verdicts, epsilons and the command line."""

from __future__ import annotations

import json
import math

import pytest

from privfl.accounting import epsilon
from privfl.attacks import ServerView
from privfl.attacks.matrix import (
    AttackKind,
    attack_config_from_dict,
    default_attack_config,
    run_attack_matrix,
)
from privfl.cli import main
from privfl.config import DatasetKind
from privfl.errors import ConfigError

# Small enough for two slow cores: the optimization attacks get a few dozen steps, which is plenty for
# the verdicts asserted below (exact analytic rows, no access, DP noise) and nothing else.
TINY = """
seed = 0
batch_size = 1
client_examples = 50
delta = 1e-5
trials = 2

[dp]
noise_multipliers = [1.0, 2.0]
max_grad_norm = 1.0

[aggregate]
num_clients = [2]

[inverting]
max_iterations = 40

[[datasets]]
name = "breast_cancer"
attacks = ["labels", "analytic", "inverting"]
protections = ["plaintext", "dp", "ciphertext"]

[[datasets]]
name = "digits"
attacks = ["labels", "analytic"]
protections = ["none", "aggregate"]   # "none": the name configs used for "plaintext" before
"""

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(text: str):
    import tomllib

    return attack_config_from_dict(tomllib.loads(text))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("attack")
    return run_attack_matrix(_config(TINY), out, progress=False)


def _row(result, dataset: str, attack: str, setting: str):
    (row,) = [r for r in result.rows if (r.dataset, r.attack, r.setting) == (dataset, attack, setting)]
    return row


def test_files_are_written_with_every_cell(tiny):
    out = tiny.out_dir
    # 3 attacks x (none, dp x2, ciphertext) on breast cancer + 2 attacks x (none, aggregate) on digits
    assert len(tiny.rows) == 3 * 4 + 2 * 2
    payload = json.loads((out / "results.json").read_text())
    assert len(payload["rows"]) == len(tiny.rows)
    assert payload["config"]["client_examples"] == 50
    assert payload["config"]["datasets"][0]["attacks"] == ["labels", "analytic", "inverting"]
    assert payload["timings"]["total_s"] > 0
    table = (out / "results.md").read_text()
    assert table.count("\n| breast_cancer |") == 12 and table.count("\n| digits |") == 4
    for name in ("grid-digits.png", "grid-breast_cancer.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000
    names = ("results.json", "results.md", "grid-digits.png", "grid-breast_cancer.png")
    assert set(tiny.files) == {out / n for n in names}


def test_plaintext_analytic_on_tabular_is_exact(tiny):
    row = _row(tiny, "breast_cancer", "analytic", "plaintext")
    assert row.max_abs_error <= 1e-4
    assert row.verdict == "recovered"
    assert row.label_accuracy == 1.0
    # the same attack on the image MLP is exact too, so the verdict is not a tabular special case
    image = _row(tiny, "digits", "analytic", "plaintext")
    assert image.max_abs_error <= 1e-4 and image.psnr > image.chance_psnr + 40 and image.verdict == "recovered"


def test_ciphertext_rows_say_no_access(tiny):
    rows = [r for r in tiny.rows if r.view == "ciphertext"]
    assert {r.attack for r in rows} == {"labels", "analytic", "inverting"}
    for row in rows:
        assert row.verdict == "no access"
        assert math.isnan(row.psnr) and math.isnan(row.label_accuracy)
        assert math.isinf(row.epsilon) and row.privacy == "no access"


def test_dp_with_sigma_at_least_one_is_not_above_chance(tiny):
    for setting in ("dp sigma=1", "dp sigma=2"):
        for attack in ("analytic", "inverting"):
            row = _row(tiny, "breast_cancer", attack, setting)
            assert row.psnr <= row.chance_psnr + 3.0, (attack, setting, row.psnr, row.chance_psnr)
            assert row.max_abs_error > 0.1  # nowhere near the plaintext row's exactness
            assert row.verdict == "not above chance"


def test_dp_epsilon_is_the_ledgers_one_step_epsilon(tiny):
    payload = json.loads((tiny.out_dir / "results.json").read_text())
    dp_rows = [r for r in payload["rows"] if r["view"] == "dp"]
    assert len(dp_rows) == 2 * 3
    for row in dp_rows:
        expected = epsilon(noise_multiplier=row["noise_multiplier"], sample_rate=1 / 50, steps=1, delta=1e-5)
        assert row["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert dp_rows[0]["epsilon"] > _row(tiny, "breast_cancer", "analytic", "dp sigma=2").epsilon  # more noise, less eps
    for row in payload["rows"]:
        if row["view"] in ("plaintext", "aggregate"):
            assert row["epsilon"] is None and row["privacy"] == "not private"


def test_aggregate_rows_score_every_client_input(tiny):
    row = _row(tiny, "digits", "analytic", "aggregate k=2")
    assert row.num_inputs == 2 and row.num_clients == 2
    assert row.best_psnr >= row.psnr and not math.isnan(row.best_chance_psnr)


def test_rerun_overwrites_and_says_so(tmp_path):
    config = _config(TINY.split("[[datasets]]")[0] + '[[datasets]]\nname = "breast_cancer"\nattacks = ["labels"]\n'
                     'protections = ["none"]\n')
    first = run_attack_matrix(config, tmp_path, progress=False)
    second = run_attack_matrix(config, tmp_path, progress=False)
    assert not first.overwrote and second.overwrote
    assert len(json.loads((tmp_path / "results.json").read_text())["rows"]) == 1


def test_default_config_is_the_documented_matrix():
    config = default_attack_config()
    assert [d.name for d in config.datasets] == [DatasetKind.DIGITS, DatasetKind.BREAST_CANCER]
    views = (ServerView.PLAINTEXT, ServerView.DP_SGD, ServerView.AGGREGATE, ServerView.CIPHERTEXT)
    digits, cancer = config.datasets
    assert set(digits.attacks) == set(cancer.attacks) == set(AttackKind)
    # What sites send (FedAvg updates of mini-batches) is attacked by default on the image data.
    assert digits.protections == (*views, ServerView.FEDAVG)
    assert cancer.protections == views
    assert (config.fedavg.inputs, config.fedavg.local_steps, config.fedavg.batch_size) == (4, 4, 2)
    assert config.dp.noise_multipliers == (0.5, 1.0, 2.0)
    assert config.aggregate.num_clients == (1, 4, 16)


def test_none_is_read_as_plaintext():
    old = _config('[[datasets]]\nname = "digits"\nprotections = ["none", "dp"]\n')
    new = _config('[[datasets]]\nname = "digits"\nprotections = ["plaintext", "dp"]\n')
    assert old == new and old.datasets[0].protections == (ServerView.PLAINTEXT, ServerView.DP_SGD)
    with pytest.raises(ConfigError) as info:
        _config('[[datasets]]\nname = "digits"\nprotections = ["none", "plaintext"]\n')
    assert info.value.field == "datasets[0].protections"  # the same view twice, under either name


def test_label_recovery_runs_as_an_attack_and_fedavg_rows_use_update_counts(tmp_path):
    config = _config(TINY.split("[[datasets]]")[0] + "[fedavg]\ninputs = 1\nbatch_size = 1\nlocal_steps = 5\n"
                     '[[datasets]]\nname = "digits"\nattacks = ["labels"]\n'
                     'protections = ["plaintext", "fedavg", "ciphertext"]\n')
    result = run_attack_matrix(config, tmp_path, progress=False)
    rows = {r.setting: r for r in result.rows}
    assert rows["plaintext"].label_accuracy == 1.0 and rows["plaintext"].verdict == "recovered"
    assert rows["fedavg 5x batch 1"].label_accuracy == 1.0  # one input: its label comes back from the update
    assert rows["ciphertext"].verdict == "no access" and "ciphertext" in rows["ciphertext"].note


def test_fedavg_rows_are_updates_of_mini_batches(tmp_path):
    # What a site sends: 4 inputs, 4 local steps of 2 (the default), labels unknown to the attack.
    config = _config(TINY.split("[[datasets]]")[0] + '[[datasets]]\nname = "digits"\nattacks = ["labels", "analytic"]\n'
                     'protections = ["fedavg"]\n')
    assert (config.fedavg.inputs, config.fedavg.local_steps, config.fedavg.batch_size) == (4, 4, 2)
    result = run_attack_matrix(config, tmp_path, progress=False)
    rows = {(r.attack, r.setting): r for r in result.rows}
    assert set(rows) == {("labels", "fedavg 4x batch 2"), ("analytic", "fedavg 4x batch 2")}
    assert all(r.num_inputs == 4 for r in rows.values())
    with pytest.raises(ConfigError) as info:
        _config(TINY.split("[[datasets]]")[0] + "[fedavg]\ninputs = 2\nbatch_size = 3\n" + '[[datasets]]\nname = "digits"\n')
    assert "batch_size" in info.value.field


def test_grids_leave_pyplot_and_the_backend_alone(tmp_path):
    import subprocess
    import sys

    code = f"""
import sys, matplotlib, torch
backend = dict.__getitem__(matplotlib.rcParams, "backend")  # get_backend() would itself import pyplot
from privfl.attacks.matrix.cells import GridCell
from privfl.attacks.matrix.render import grid_images, grid_rows
images = {{("plaintext", "dlg"): GridCell(originals=torch.rand(2, 1, 8, 8).double(),
                                     reconstructions=torch.rand(2, 1, 8, 8).double()),
          ("ciphertext", "dlg"): GridCell(originals=torch.rand(2, 1, 8, 8).double(), reconstructions=None)}}
grid_images({str(tmp_path / "a.png")!r}, images, ["plaintext", "ciphertext"], ["dlg"])
rows = {{("plaintext", "dlg"): GridCell(originals=torch.randn(1, 30).double(), reconstructions=None)}}
grid_rows({str(tmp_path / "b.png")!r}, rows, ["plaintext"], ["dlg"])
print("matplotlib.pyplot" in sys.modules, dict.__getitem__(matplotlib.rcParams, "backend") is backend)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["False", "True"]
    for name in ("a.png", "b.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2_000


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('[[datasets]]\nname = "mnist"\n', "datasets[0].name"),
        ('[[datasets]]\nname = "digits"\nattacks = ["labels", "imprint"]\n', "datasets[0].attacks[1]"),
        ('[[datasets]]\nname = "digits"\nprotections = ["none", "homomorphic"]\n', "datasets[0].protections[1]"),
        ("[dp]\nnoise_multipliers = [0.0]\n", "dp.noise_multipliers[0]"),
        ("batch_size = 4\nclient_examples = 2\n", "client_examples"),
        ("trails = 2\n", "trails"),
    ],
)
def test_bad_config_names_the_field(text, field):
    with pytest.raises(ConfigError) as info:
        _config(text)
    assert info.value.field == field


def test_too_many_aggregate_victims_is_a_config_error(tmp_path):
    config = _config('[aggregate]\nnum_clients = [1000]\n[[datasets]]\nname = "breast_cancer"\n'
                     'attacks = ["labels"]\nprotections = ["aggregate"]\n')
    with pytest.raises(ConfigError) as info:
        run_attack_matrix(config, tmp_path, progress=False)
    assert info.value.field == "aggregate.num_clients"


def test_cli_attack(tmp_path, capsys):
    config = tmp_path / "attack.toml"
    config.write_text('[[datasets]]\nname = "breast_cancer"\nattacks = ["labels", "analytic"]\n'
                      'protections = ["none", "ciphertext"]\n')
    out = tmp_path / "out"
    assert main(["attack", str(config), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "breast_cancer" in printed and "recovered" in printed and "no access" in printed
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["attack"], r["view"], r["verdict"]) for r in rows] == [
        ("labels", "plaintext", "recovered"),
        ("analytic", "plaintext", "recovered"),
        ("labels", "ciphertext", "no access"),
        ("analytic", "ciphertext", "no access"),
    ]


def test_cli_bad_config_exits_2_naming_the_field(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('[[datasets]]\nname = "digits"\nattacks = ["dlg", "gan"]\n')
    assert main(["attack", str(config), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "datasets[0].attacks[1]" in err and "gan" in err
    assert not (tmp_path / "o").exists()


def _interrupt_at_cell(monkeypatch, stop_at: int) -> None:
    import privfl.attacks.matrix.cells as cells

    real = cells._run_cell
    calls = {"n": 0}

    def run_cell(**kwargs):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        return real(**kwargs)

    monkeypatch.setattr(cells, "_run_cell", run_cell)


_FOUR_CELLS = '[[datasets]]\nname = "breast_cancer"\nattacks = ["labels", "analytic"]\nprotections = ["none", "ciphertext"]\n'


def test_ctrl_c_writes_the_finished_cells_and_says_so(tmp_path, monkeypatch, capsys):
    from privfl.attacks.matrix import AttackMatrixInterrupted

    config = tmp_path / "attack.toml"
    config.write_text('[[datasets]]\nname = "breast_cancer"\nattacks = ["labels", "analytic"]\n'
                      'protections = ["none", "ciphertext"]\n')
    out = tmp_path / "out"
    _interrupt_at_cell(monkeypatch, 3)  # two of the four cells finish
    assert main(["attack", str(config), "--out", str(out), "--quiet"]) == 130
    captured = capsys.readouterr()
    assert f"wrote the 2 of 4 cells that finished to {out / 'results.json'}" in captured.err
    assert "analytic" in captured.out  # the summary of what finished
    payload = json.loads((out / "results.json").read_text())
    assert payload["complete"] is False and payload["cells"] == {"finished": 2, "planned": 4}
    assert [(r["attack"], r["view"]) for r in payload["rows"]] == [("labels", "plaintext"), ("analytic", "plaintext")]
    assert (out / "results.md").read_text().startswith("**Interrupted: 2 of 4 cells finished")

    # the library raises a KeyboardInterrupt that carries the partial result
    _interrupt_at_cell(monkeypatch, 2)
    with pytest.raises(AttackMatrixInterrupted) as stop:
        run_attack_matrix(_config(TINY.split("[[datasets]]")[0] + _FOUR_CELLS), tmp_path / "lib", progress=False)
    assert isinstance(stop.value, KeyboardInterrupt)
    assert len(stop.value.result.rows) == 1 and stop.value.cells_planned == 4 and not stop.value.result.complete


def test_ctrl_c_before_any_cell_writes_nothing_and_keeps_earlier_results(tmp_path, monkeypatch, capsys):
    config = tmp_path / "attack.toml"
    config.write_text('[[datasets]]\nname = "breast_cancer"\nattacks = ["labels"]\nprotections = ["none"]\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}')
    _interrupt_at_cell(monkeypatch, 1)
    assert main(["attack", str(config), "--out", str(out), "--quiet"]) == 130
    assert "before any of 1 cells finished; nothing written" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text()) == {"earlier": True}


def test_a_complete_matrix_says_it_is_complete(tiny):
    payload = json.loads((tiny.out_dir / "results.json").read_text())
    assert payload["complete"] is True and payload["cells"] == {"finished": 16, "planned": 16}
    assert tiny.complete and not (tiny.out_dir / "results.md").read_text().startswith("**Interrupted")
