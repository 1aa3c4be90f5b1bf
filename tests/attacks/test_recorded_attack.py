"""Attacks on what a real run's server observed: the recording and `attack_recording`."""

from __future__ import annotations

import json

import pytest
import torch

from privfl.attacks.recorded import attack_recording
from privfl.config import Accountant, DPConfig, FederationConfig, ProtectionKind, TrainingConfig
from privfl.data import ArrayDataset, load_breast_cancer
from privfl.errors import ConfigError
from privfl.federation import Federation
from privfl.models import LogisticRegression
from privfl.recording import OBSERVED_DIR, load_server_view


@pytest.fixture(scope="module")
def rows():
    split = load_breast_cancer(seed=0)
    x, y = split.train.features.numpy(), split.train.targets.numpy()
    return x, y


def _clients(rows, sizes):
    x, y = rows
    out, start = {}, 0
    for i, n in enumerate(sizes):
        out[f"site-{i}"] = ArrayDataset(x[start : start + n], y[start : start + n])
        start += n
    return out


def _run(tmp_path, clients, protection, *, rounds=2, sigma=1e-6, record=True):
    fed = Federation(
        model_fn=lambda: LogisticRegression(30, 2),
        clients=clients,
        training=TrainingConfig(batch_size=1, learning_rate=0.1, dp=DPConfig(noise_multiplier=sigma, max_grad_norm=10.0, accountant=Accountant.RDP)),
        federation=FederationConfig(rounds=rounds, protection=protection, seed=0, noise_seed=1),
        progress=False,
        record=record,
    )
    out = tmp_path / "run"
    fed.run(out)
    return out


def test_plaintext_updates_of_one_example_are_recovered_from_the_recorded_bytes(tmp_path, rows):
    clients = _clients(rows, [1, 1, 1])
    run = _run(tmp_path, clients, ProtectionKind.PLAINTEXT)
    view = load_server_view(run)
    assert [r.round for r in view] == [0, 1]
    assert sum(1 for _ in view[0].received("update")) == 3
    result = attack_recording(run, model_fn=lambda: LogisticRegression(30, 2), clients=clients, iterations=50)
    analytic = [r for r in result.rows if r.view == "plaintext update" and r.attack == "analytic-linear"]
    assert len(analytic) == 6
    # One example, noise 1e-5 per coordinate: the first layer's update gives the example back.
    assert all(r.verdict == "recovered" and r.max_abs_error < 1e-2 for r in analytic), [(r.max_abs_error, r.note) for r in analytic]
    assert sum(r.exact for r in analytic) >= 4


def test_a_large_noise_run_recovers_nothing(tmp_path, rows):
    clients = _clients(rows, [1, 1])
    run = _run(tmp_path, clients, ProtectionKind.PLAINTEXT, rounds=1, sigma=5.0)
    result = attack_recording(run, model_fn=lambda: LogisticRegression(30, 2), clients=clients, iterations=30)
    analytic = [r for r in result.rows if r.attack == "analytic-linear" and r.view == "plaintext update"]
    assert analytic and all(r.exact == 0 for r in analytic)


def test_ciphertexts_give_no_access_and_the_average_is_still_attacked(tmp_path, rows):
    clients = _clients(rows, [1, 1])
    run = _run(tmp_path, clients, ProtectionKind.CKKS, rounds=1)
    result = attack_recording(run, model_fn=lambda: LogisticRegression(30, 2), clients=clients, iterations=30)
    per_site = [r for r in result.rows if r.source != "aggregate"]
    assert {r.view for r in per_site} == {"CKKS ciphertext"}
    assert all(r.verdict == "no access" for r in per_site)
    assert any(r.source == "aggregate" and r.verdict in ("recovered", "not recovered") for r in result.rows)


def test_shared_key_ciphertexts_give_no_access(tmp_path, rows):
    clients = _clients(rows, [1, 1])
    run = _run(tmp_path, clients, ProtectionKind.SHARED_KEY, rounds=1)
    result = attack_recording(run, model_fn=lambda: LogisticRegression(30, 2), clients=clients, iterations=30)
    per_site = [r for r in result.rows if r.source != "aggregate"]
    assert len(per_site) == 2 and {r.view for r in per_site} == {"shared-key ciphertext"}
    assert all(r.verdict == "no access" and "shared key" in r.note for r in per_site)
    assert any(r.source == "aggregate" and r.verdict in ("recovered", "not recovered") for r in result.rows)


def test_masked_vectors_give_no_access(tmp_path, rows):
    clients = _clients(rows, [1, 1, 1])
    run = _run(tmp_path, clients, ProtectionKind.SECAGG, rounds=1)
    result = attack_recording(run, model_fn=lambda: LogisticRegression(30, 2), clients=clients, iterations=30)
    masked = [r for r in result.rows if r.view == "masked vector"]
    assert len(masked) == 3 and all(r.verdict == "no access" for r in masked)
    assert json.loads(json.dumps(result.to_dict()))["protection"] == "secagg"


def test_a_run_without_recording_and_a_tampered_recording_are_refused(tmp_path, rows):
    clients = _clients(rows, [1, 1])
    plain = tmp_path / "plain"
    plain.mkdir()
    run = _run(plain, clients, ProtectionKind.PLAINTEXT, rounds=1, record=False)
    with pytest.raises(ConfigError, match="--record"):
        attack_recording(run, model_fn=lambda: LogisticRegression(30, 2), clients=clients)
    recorded = _run(tmp_path, clients, ProtectionKind.PLAINTEXT, rounds=1)
    message = recorded / OBSERVED_DIR / "round-0000" / "0000.bin"
    data = bytearray(message.read_bytes())
    data[-1] ^= 1
    message.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="hash"):
        load_server_view(recorded)


def test_another_model_is_refused(tmp_path, rows):
    clients = _clients(rows, [1, 1])
    run = _run(tmp_path, clients, ProtectionKind.PLAINTEXT, rounds=1)

    def other():
        torch.manual_seed(123)
        model = LogisticRegression(30, 2)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        return model

    with pytest.raises(ConfigError, match="does not match"):
        attack_recording(run, model_fn=other, clients=clients)


def test_recording_needs_a_run_directory(rows):
    fed = Federation(
        model_fn=lambda: LogisticRegression(30, 2), clients=_clients(rows, [2]),
        training=TrainingConfig(), federation=FederationConfig(rounds=1, protection=ProtectionKind.PLAINTEXT),
        progress=False, record=True,
    )
    with pytest.raises(ConfigError, match="run directory"):
        fed.run(None)


def test_cli_records_a_run_and_attacks_it(tmp_path, capsys):
    from privfl.cli import main

    config = tmp_path / "plain.toml"
    config.write_text(
        '[model]\nkind = "logistic"\n[training]\nbatch_size = 16\nlearning_rate = 0.5\n'
        "[training.dp]\nnoise_multiplier = 1.0\naccountant = \"rdp\"\n"
        '[federation]\nrounds = 1\nprotection = "plaintext"\nseed = 0\n'
    )
    run = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run), "--record", "--quiet"]) == 0
    out = tmp_path / "attack"
    assert main(["attack", "--run", str(run), "--run-config", str(config), "--out", str(out), "--quiet",
                 "--iterations", "5"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["protection"] == "plaintext"
    views = {row["view"] for row in result["rows"]}
    assert views == {"plaintext update", "round average"}
    assert (out / "results.md").read_text().startswith("# Attacks on what the server observed")
    capsys.readouterr()
    # Without --run-config: the run's own config.toml.
    assert main(["attack", "--run", str(run), "--out", str(tmp_path / "own"), "--quiet", "--iterations", "5"]) == 0
    assert json.loads((tmp_path / "own" / "results.json").read_text())["rows"] == result["rows"]
    # Without it, the embedded config, which is not this run's: refused with the sections that differ, exit 2.
    (run / "config.toml").unlink()
    assert main(["attack", "--run", str(run), "--out", str(tmp_path / "other"), "--quiet"]) == 2
    assert "pass that TOML file with --run-config" in capsys.readouterr().err
    # A matrix config with --run is ambiguous.
    assert main(["attack", str(config), "--run", str(run), "--out", str(tmp_path / "x"), "--quiet"]) == 2


def test_a_deployments_recorded_server_view_is_attacked_like_an_in_process_one(tmp_path, rows, run_toml):
    """Aggregator(record=True) writes the server's view of a deployment (sites as separate roles) in the
    in-process layout: the plaintext updates it received are attacked from their bytes; ciphertexts are not."""
    from roles_helpers import make_sites

    from privfl.aggregator import Aggregator, LocalSites

    clients = _clients(rows, [1, 1, 1])
    for protection in ("plaintext", "ckks"):
        text = run_toml(protection, rounds=2).replace("batch_size = 16", "batch_size = 1").replace(
            "learning_rate = 0.5", "learning_rate = 0.1"
        ).replace("target_epsilon = 3.0", 'noise_multiplier = 1e-6\nmax_grad_norm = 10.0\naccountant = "rdp"')
        sites = make_sites(clients, tmp_path / protection, budget=float("inf"))  # uncapped on purpose (sigma 1e-6)
        out = tmp_path / protection / "server"
        Aggregator(text, input_shape=(30,), num_classes=2, progress=False, record=True).run(LocalSites(sites), out)
        view = load_server_view(out)
        assert [r.round for r in view] == [0, 1] and sum(1 for _ in view[0].received("update")) == 3
        result = attack_recording(out, model_fn=lambda: LogisticRegression(30, 2), clients=clients, iterations=30)
        per_site = [r for r in result.rows if r.source != "aggregate"]
        if protection == "plaintext":
            analytic = [r for r in per_site if r.attack == "analytic-linear"]
            # As in-process: one example behind each update, the first layer gives it back (read exactly off
            # two rows for most; one round-1 update here is off by about 1e-2 in one feature).
            assert len(analytic) == 6 and all(r.verdict == "recovered" and r.max_abs_error < 5e-2 for r in analytic)
            assert sum(r.exact for r in analytic) >= 4
        else:
            assert {r.view for r in per_site} == {"CKKS ciphertext"} and all(r.verdict == "no access" for r in per_site)
            # The key holder's release is in the view, as the sites receive it through the server.
            assert [m.sender for m in view[0].messages if m.step == "average"] == ["key-holder"]
    with pytest.raises(ConfigError, match="needs an out_dir"):
        Aggregator(text, input_shape=(30,), num_classes=2, progress=False, record=True).run(LocalSites(sites))


def test_a_deploy_local_layout_gives_attack_run_each_sites_own_data(tmp_path, run_toml):
    """`privfl attack --run DIR/run` on a `privfl deploy local --record` run scores against DIR/sites/NAME/data.csv."""
    from privfl.aggregator import Aggregator, LocalSites
    from privfl.export import run_setup
    from privfl.flower.local import write_site_data
    from privfl.site import Site, SiteRole, _parse_config, load_site_dataset

    text = run_toml("plaintext", rounds=1)
    (tmp_path / "config.toml").write_text(text)
    folders, _, shape, classes = write_site_data(_parse_config(text), 3, tmp_path)
    sites = [Site(name, load_site_dataset(str(folder / "data.csv")), folder / "state", role=SiteRole.KEY_HOLDER if i == 0 else SiteRole.SITE,
                  allow_noise_seed=True)
             for i, (name, folder) in enumerate(folders.items())]
    Aggregator(text, input_shape=shape, num_classes=classes, progress=False, record=True).run(LocalSites(sites), tmp_path / "run")
    model_fn, clients = run_setup(tmp_path / "run", tmp_path / "config.toml")
    assert sorted(clients) == sorted(folders)
    for site in sites:
        assert torch.equal(clients[site.name].features, site.dataset.features)
    result = attack_recording(tmp_path / "run", model_fn=model_fn, clients=clients, iterations=5, max_samples=1)
    assert {r.source for r in result.rows} == {*folders, "aggregate"}

    # The directory `privfl deploy local --out` made stands for its server run everywhere, as for `privfl audit`.
    from privfl import load_model
    from privfl.cli import main

    top_fn, top_clients = run_setup(tmp_path, tmp_path / "config.toml")
    assert sorted(top_clients) == sorted(folders)
    top = attack_recording(tmp_path, model_fn=top_fn, clients=top_clients, iterations=5, max_samples=1)
    assert [(r.round, r.source, r.view) for r in top.rows] == [(r.round, r.source, r.view) for r in result.rows]
    final = load_model(tmp_path / "run", model_fn).state_dict()
    assert all(torch.equal(value, final[key]) for key, value in load_model(tmp_path, model_fn).state_dict().items())
    assert main(["export", str(tmp_path), "--config", str(tmp_path / "config.toml"), "--out", str(tmp_path / "model.pt")]) == 0
    exported = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    assert exported.keys() == final.keys() and all(torch.equal(exported[key], final[key]) for key in final)
