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
    assert (out / "ledger.jsonl").exists() and (out / "ledger.key").stat().st_mode & 0o777 == 0o600
    assert (out / "history.json").exists()
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


def test_audit_and_lint_commands(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(
        '[data]\nnum_clients = 3\n[training.dp]\nnoise_multiplier = 0.3\ndelta = 0.1\n'
        '[federation]\nrounds = 2\nprotection = "plaintext"\n'
    )
    # the linter flags the weak settings and fails with exit 1 on the delta error
    assert main(["lint", str(config)]) == 1
    out = capsys.readouterr().out
    assert "PFL002" in out and "training.dp.delta" in out and "PFL004" in out
    assert "[federation.client_dp]" in " ".join(out.split())  # config syntax is printed, not swallowed as markup
    # Piped, every message and fix is one line (for grep), none cut at 80 columns or padded with spaces.
    from privfl.audit.lint import lint_file

    lines = out.splitlines()
    for finding in lint_file(config):
        assert f"  {finding.message}" in lines and f"  fix: {finding.fix}" in lines
    assert not [line for line in lines if line != line.rstrip()]
    assert "  client sizes: the bundled breast_cancer dataset split into 3 clients as [data] says" in out

    run_dir = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run_dir), "--quiet"]) == 0
    # The run's own warning (delta >= 1/n) is one privfl line, like its errors, not Python's path and source line.
    err = capsys.readouterr().err
    assert "privfl: warning: PFL002 training.dp.delta" in err and "PrivacyWarning" not in err and "runner.py" not in err
    # delta 0.1 >= 1/n is an ERROR finding (PFA002): like lint, the audit fails with exit 1
    assert main(["audit", str(run_dir), "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["error"] >= 1 and "PFA002" in {f["code"] for f in report["findings"]}
    summary = json.loads((run_dir / "summary.json").read_text())
    for name, info in summary["clients"].items():
        assert report["sample_level"][name]["epsilon"] == pytest.approx(info["epsilon"], rel=1e-6)
    for name in ("audit.md", "audit.json", "audit.png"):
        assert (run_dir / name).stat().st_size > 0
    assert main(["audit", str(tmp_path / "nowhere")]) == 2
    # an edited ledger is refused with exit 2, naming the file and the line
    ledger = run_dir / "ledger.jsonl"
    lines = ledger.read_text().splitlines(keepends=True)
    edited = lines[4].replace('"noise_multiplier":0.3', '"noise_multiplier":0.9')  # line 5: the first charge
    assert edited != lines[4]
    ledger.write_text("".join([*lines[:4], edited, *lines[5:]]))
    capsys.readouterr()
    assert main(["audit", str(run_dir)]) == 2
    assert f"{ledger}: line 5" in capsys.readouterr().err


def test_deploy_without_flower_names_the_install_command(tmp_path, monkeypatch, capsys):
    import sys

    from privfl.cli import main

    # An interpreter whose directory holds no Flower executables (as when privfl[flower] is not installed).
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    code = main(["deploy", "local", "--sites", "3", "--out", str(tmp_path / "dep"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'privfl[flower]'" in err and "Traceback" not in err
    assert not (tmp_path / "dep").exists()


def test_deploy_refusals_print_one_line_and_start_nothing(tmp_path, capsys):
    from privfl.cli import main

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    for args, reason in (
        (["--sites", "0", "--out", str(tmp_path / "new")], "sites=0"),
        (["--sites", "3", "--out", str(taken)], "new or empty"),
        (["--resume"], "--resume needs --out"),
        (["--resume", "--out", str(taken)], "no deployed run to resume"),
    ):
        code = main(["deploy", "local", *args, "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and reason in err, err
        assert "privfl deploy local:" not in err  # nothing announced for a run that never starts
    assert not (tmp_path / "new").exists()


def test_identity_prints_a_sites_public_key_and_keeps_it(tmp_path, capsys):
    from privfl.site import Site, site_identity

    state = tmp_path / "hospital-a"
    assert main(["identity", str(state)]) == 2  # a mistyped path gets no fresh key
    assert "not a directory" in capsys.readouterr().err and not state.exists()
    state.mkdir()
    assert main(["identity", str(state)]) == 0
    out, err = capsys.readouterr()
    assert "made a new identity key" in err and (state / "identity.key").stat().st_mode & 0o077 == 0
    key = out.strip()
    assert len(bytes.fromhex(key)) == 32 and key == site_identity(state).hex()
    # The same key on every later call, and the one the site signs with once it runs there.
    assert main(["identity", str(state)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == key and err == ""
    assert Site("hospital-a", [(0, 0)], state).identity_public().hex() == key


def test_verbose_is_privfl_progress_not_every_library_request(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "tiny.toml"
    config.write_text('[data]\nnum_clients = 3\n[federation]\nrounds = 1\nprotection = "plaintext"\n')
    # A fresh interpreter: the logging set-up of the command, not pytest's, is what is checked.
    probe = (
        "import logging, sys\n"
        "from privfl.cli import main\n"
        "main([*sys.argv[1:]])\n"
        "print(logging.getLogger('privfl.aggregator').isEnabledFor(logging.INFO),"
        " logging.getLogger('httpx').isEnabledFor(logging.INFO))\n"
    )

    def levels(*flags: str) -> str:
        done = subprocess.run([sys.executable, "-c", probe, *flags, "lint", str(config)], capture_output=True, text=True, timeout=120)
        return done.stdout.strip().splitlines()[-1]

    # httpx logs each HTTP request of a deployment at INFO: not what "log every round" asks for.
    assert levels("-v") == "True False"
    assert levels() == "False False"


@pytest.mark.parametrize("started", [True, False])
def test_deploy_local_interrupted_says_how_to_resume_or_that_nothing_started(tmp_path, monkeypatch, capsys, started):
    pytest.importorskip("flwr")
    import privfl.flower.local as local

    out = tmp_path / "deploy"

    def interrupted(text, *, out, **kwargs):
        if started:  # the sites' ledgers and the server's run directory are there
            (out / "run").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(local, "deploy_local", interrupted)
    assert main(["deploy", "local", "--sites", "3", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    if started:
        assert f"privfl: interrupted; resume with: privfl deploy local --resume --out {out}" in err
    else:
        assert f"privfl: interrupted; nothing was started; run again with --out {out}" in err


@pytest.mark.parametrize(("sites", "shown", "note"), [
    (3, "(client-0, client-1, client-2)", "the config's 5 client_names name sites only with --sites 5"),
    (5, "(hospital-a, hospital-b, hospital-c, hospital-d, hospital-e)", None),
])
def test_deploy_local_names_its_sites_and_says_when_the_configs_names_are_not_used(tmp_path, monkeypatch, capsys, sites, shown, note):
    pytest.importorskip("flwr")
    import privfl.flower.local as local
    from privfl.config import default_config

    assert default_config().data.client_names == ("hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e")

    def started(text, *, on_start, **kwargs):
        on_start()
        raise KeyboardInterrupt

    monkeypatch.setattr(local, "deploy_local", started)
    assert main(["deploy", "local", "--sites", str(sites), "--out", str(tmp_path / "d")]) == 130
    err = " ".join(capsys.readouterr().err.split())
    assert f"{sites} sites {shown}" in err
    assert (note in err) if note else "client_names" not in err
    assert local.site_names(default_config(), sites)[0] == tuple(shown.strip("()").split(", "))


def test_deploy_local_names_group_partitioned_sites_after_their_groups_as_privfl_run_does(tmp_path):
    pytest.importorskip("flwr")
    from privfl.config import config_from_dict
    from privfl.flower.local import site_names, write_site_data
    from privfl.runner import load_dataset, split_clients

    config = config_from_dict({
        "data": {"dataset": "credit", "partition": "group", "group_column": "region", "num_clients": 5},
        "training": {"dp": {"target_epsilon": 3.0}},
    })
    assert site_names(config, 5) == (None, None)
    folders, *_ = write_site_data(config, 5, tmp_path)
    assert sorted(folders) == sorted(split_clients(config, load_dataset(config))) == ["central", "east", "north", "south", "west"]
