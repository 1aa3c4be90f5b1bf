"""Command-line arguments that are refused up front, and what the commands print and document."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from privfl.cli import build_parser, main
from privfl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _refuse(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("the command went on after a bad argument")


def test_attack_rounds_must_be_round_numbers(tmp_path, monkeypatch, capsys):
    import privfl.export

    # Checked before the run's data is loaded.
    monkeypatch.setattr(privfl.export, "run_setup", _refuse)
    for bad in ("x", "-1", "0,,2", "1.5", ""):
        code = main(["attack", "--run", str(tmp_path), "--out", str(tmp_path / "out"), f"--rounds={bad}"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "--rounds" in err and "comma-separated round numbers (0-based), e.g. 0,2" in err, err
        assert "Traceback" not in err
    assert main(["attack", "--run", str(tmp_path), "--out", str(tmp_path / "out"), "--iterations", "0"]) == 2
    assert "--iterations=0" in capsys.readouterr().err


def test_attack_rounds_and_default_iterations_reach_the_attack(tmp_path, monkeypatch, capsys):
    import privfl.attacks.recorded
    import privfl.export

    seen: dict[str, object] = {}

    def attack(run, **kwargs):
        seen.update(kwargs)
        raise ConfigError("run", str(run), "stopped by the test")

    monkeypatch.setattr(privfl.export, "run_setup", lambda *a, **k: (None, {}))
    monkeypatch.setattr(privfl.attacks.recorded, "attack_recording", attack)
    assert main(["attack", "--run", str(tmp_path), "--out", str(tmp_path / "out"), "--rounds", "0, 2", "--quiet"]) == 2
    assert seen["rounds"] == [0, 2] and seen["iterations"] == 300
    assert main(["attack", "--run", str(tmp_path), "--out", str(tmp_path / "out"), "--iterations", "7", "--quiet"]) == 2
    assert seen["rounds"] is None and seen["iterations"] == 7


@pytest.mark.parametrize(
    ("option", "value"), [("--rounds", "1"), ("--run-config", "plain.toml"), ("--iterations", "300")]
)
def test_attack_run_only_options_need_run(tmp_path, monkeypatch, capsys, option, value):
    import privfl.attacks.matrix

    monkeypatch.setattr(privfl.attacks.matrix, "run_attack_matrix", _refuse)
    out = tmp_path / "out"
    assert main(["attack", "--out", str(out), option, value]) == 2
    assert f"privfl: error: {option} needs --run RUN_DIR" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "inf"])
def test_deploy_timeout_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys, timeout):
    import privfl.flower.local

    monkeypatch.setattr(privfl.flower.local, "deploy_local", _refuse)
    monkeypatch.setattr(subprocess, "Popen", _refuse)
    out = tmp_path / "dep"
    assert main(["deploy", "local", "--out", str(out), f"--timeout={timeout}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "privfl: error: --timeout must be a number of seconds > 0" in err
    assert "privfl deploy local:" not in err and not out.exists()


def test_closed_stdout_ends_quietly(tmp_path):
    # `privfl audit DIR | head`: the reader goes away while privfl is still writing.
    probe = (
        "import sys\n"
        "import privfl.cli as cli\n"
        "def flood(args):\n"
        "    for _ in range(20000):\n"
        "        print('x' * 99)\n"
        "    return 0\n"
        "cli._cmd_lint = flood\n"
        "sys.exit(cli.main(['lint', 'any.toml']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", probe], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 1
    assert err == "", err


def test_export_help_names_deploy_directories(capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", "--help"])
    assert info.value.code == 0
    assert "privfl deploy local" in " ".join(capsys.readouterr().out.split())


def test_default_config_comments_list_every_accepted_value():
    from privfl.accounting import Accountant
    from privfl.config import ClippingMode, load_config

    path = ROOT / "privfl" / "defaults" / "healthcare.toml"
    load_config(path)  # still a valid config
    text = path.read_text()
    for key, enum in (("accountant", Accountant), ("clipping", ClippingMode)):
        line = re.search(rf"^{key} = .*#(.*)$", text, re.MULTILINE)
        assert line is not None, key
        assert [v.strip() for v in line.group(1).split("|")] == [m.value for m in enum]


def test_readme_error_example_is_the_real_output(tmp_path, capsys):
    example = re.search(r"`(privfl: error: training\.dp\.target_epsilon=[^`]*)`", (ROOT / "README.md").read_text())
    assert example is not None
    config = tmp_path / "bad.toml"
    config.write_text("[training.dp]\ntarget_epsilon = -1\n")
    assert main(["run", str(config), "--out", str(tmp_path / "o")]) == 2
    assert example.group(1) in capsys.readouterr().err.splitlines()


def _subcommand(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


@pytest.mark.parametrize("path", [("run",), ("deploy", "local"), ("attack",), ("export",)])
def test_reference_table_lists_every_option(path):
    table = (ROOT / "docs" / "reference.md").read_text()
    command = "privfl " + " ".join(path)
    rows = [line for line in table.splitlines() if line.startswith(f"| `{command} ")]
    assert rows, command
    documented = " ".join(rows)
    for action in _subcommand(build_parser(), *path)._actions:
        for option in action.option_strings:
            if option not in ("-h", "--help"):
                assert re.search(rf"\[?{re.escape(option)}\b", documented), f"{command} {option}"


def test_run_report_lists_what_the_run_directory_holds(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text('[data]\nnum_clients = 3\n[federation]\nrounds = 1\nprotection = "plaintext"\n')
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet", "--record"]) == 0
    report = " ".join(capsys.readouterr().out.split())
    listed = report[report.index(f"wrote {out}/:"):]
    # run.lock is the lock a running `privfl run` holds, not a result.
    for name in sorted({p.name for p in out.iterdir()} - {"run.lock"}):
        assert name in listed, name


def test_too_many_clients_names_the_config_key(tmp_path, capsys):
    config = tmp_path / "many.toml"
    config.write_text("[data]\nnum_clients = 500\nmin_client_size = 20\n")
    assert main(["run", str(config), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "privfl: error: data.min_client_size=20: 500 clients x 20 examples each" in err
    assert "data.num_clients" in err and "smaller data.min_client_size" in err and "min_size" not in err
