"""`privfl run --resume` resumes a run with the config it started with, and a run directory of
another kind (a deployment, a site's state) is refused by `privfl run`.
"""

from __future__ import annotations

import json
import logging

import pytest

from privfl.cli import main
from privfl.config import default_config_text
from privfl.rundir import CONFIG_FILE, LEDGER_FILE, SITE_FILE


def _default_with_rounds(tmp_path, rounds: int):
    """The embedded default but for its rounds: a run the default's settings would pass as the same run."""
    text = default_config_text()
    assert "\nrounds = 10\n" in text
    path = tmp_path / f"rounds-{rounds}.toml"
    path.write_text(text.replace("\nrounds = 10\n", f"\nrounds = {rounds}\n"))
    return path


def test_resume_without_a_config_uses_the_runs_own_not_the_embedded_default(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    one = _default_with_rounds(tmp_path, 1)
    assert main(["run", str(one), "--out", str(out), "--quiet"]) == 0
    assert (out / CONFIG_FILE).read_text() == one.read_text()
    ledger = (out / LEDGER_FILE).read_bytes()
    capsys.readouterr()
    # With the embedded default (10 rounds) this resume would train 9 more rounds of another plan.
    assert main(["run", "--resume", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the config this run started with" in err and "has finished: 1 rounds recorded" in err
    assert (out / LEDGER_FILE).read_bytes() == ledger
    # A config of more rounds extends the run, says so, and becomes the run's config.
    two = _default_with_rounds(tmp_path, 2)
    with caplog.at_level(logging.WARNING, logger="privfl"):
        assert main(["run", str(two), "--resume", "--out", str(out), "--quiet"]) == 0
    assert any("resuming with federation.rounds = 2" in r.getMessage() and "started with 1" in r.getMessage() for r in caplog.records)
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2
    assert (out / CONFIG_FILE).read_text() == two.read_text()


@pytest.mark.parametrize("kind", ["deploy", "server", "site"])
def test_privfl_run_refuses_a_directory_of_another_kind(tmp_path, capsys, kind):
    out = tmp_path / "dir"
    if kind == "deploy":
        (out / "run").mkdir(parents=True)
        (out / "run" / "aggregator.json").write_text("{}")
        (out / "sites").mkdir()
        expected = "privfl deploy local directory"
    elif kind == "server":
        out.mkdir()
        (out / "aggregator.json").write_text("{}")
        expected = "deployment's server run directory"
    else:
        out.mkdir()
        (out / SITE_FILE).write_text('{"site": "a"}')
        (out / LEDGER_FILE).write_text("")
        expected = "site's state directory"
    before = sorted(p.name for p in out.rglob("*"))
    for resume in ([], ["--resume"]):
        assert main(["run", "--out", str(out), "--quiet", *resume]) == 2
        err = capsys.readouterr().err
        assert expected in err and "not a privfl run directory" in err
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing written there


def test_audit_of_a_sites_state_directory_points_to_site_and_an_empty_history_is_not_called_consistent(
    tmp_path, capsys, monkeypatch
):
    import privfl.federation as federation_module
    from privfl.audit.report import audit_run

    state = tmp_path / "state"
    state.mkdir()
    (state / SITE_FILE).write_text('{"site": "a"}')
    assert main(["audit", str(state)]) == 2
    assert f"privfl audit --site {state}" in capsys.readouterr().err

    def interrupted(*_, **__):  # stands in for train_dp_sgd: stopped before the first round is recorded
        raise KeyboardInterrupt

    out = tmp_path / "run"
    config = _default_with_rounds(tmp_path, 1)
    with monkeypatch.context() as patch:
        patch.setattr(federation_module, "train_dp_sgd", interrupted)
        assert main(["run", str(config), "--out", str(out), "--quiet"]) == 130
    assert not (out / "history.json").exists()
    text = audit_run(out).to_markdown()
    assert "no round recorded in history.json yet" in text and "consistent with history.json" not in text


def test_identity_refuses_a_run_or_deployment_directory_and_makes_no_key(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / LEDGER_FILE).write_text("")
    deploy = tmp_path / "deploy"
    (deploy / "run").mkdir(parents=True)
    (deploy / "run" / "aggregator.json").write_text("{}")
    for directory, expected in ((run, "a privfl run directory"), (deploy, "privfl deploy local directory")):
        assert main(["identity", str(directory)]) == 2
        assert expected in capsys.readouterr().err
        assert not (directory / "identity.key").exists()
    site = tmp_path / "site"
    site.mkdir()  # a new site's empty state directory: its key is made
    assert main(["identity", str(site)]) == 0 and (site / "identity.key").exists()


def test_attack_run_on_an_unrecorded_deployment_names_the_deploy_flag(tmp_path):
    from privfl.errors import ConfigError
    from privfl.recording import load_server_view

    (tmp_path / "aggregator.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"privfl deploy local --record"):
        load_server_view(tmp_path)
    with pytest.raises(ConfigError, match=r"privfl run --record"):
        load_server_view(tmp_path / "missing")


def test_export_reads_the_config_the_run_kept(tmp_path, capsys):
    config = tmp_path / "other.toml"
    text = _default_with_rounds(tmp_path, 1).read_text()
    assert "\nlearning_rate = 0.5\n" in text
    config.write_text(text.replace("\nlearning_rate = 0.5\n", "\nlearning_rate = 0.25\n"))
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    # No --config: the run's config.toml, not the embedded default (whose learning rate differs)
    assert main(["export", str(out), "--out", str(tmp_path / "model.pt")]) == 0
    assert (tmp_path / "model.pt").is_file()
    (out / CONFIG_FILE).unlink()  # a run directory without one: the embedded default, refused as not the run's
    assert main(["export", str(out), "--out", str(tmp_path / "model2.pt")]) == 2
    assert "pass that TOML file with --config" in capsys.readouterr().err
