"""Tests for the config linter: every rule fires on a crafted config, and the embedded default raises only INFO."""

from __future__ import annotations

import copy
import sys
from importlib import resources

import pytest

import privfl.config
from privfl.audit.lint import RULES, Finding, Severity, lint_config, lint_file
from privfl.config import config_from_dict, default_config
from privfl.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_TABLE = tomllib.loads(resources.files("privfl").joinpath("defaults/healthcare.toml").read_text())
SIZES = {"a": 120, "b": 60, "c": 200, "d": 90, "e": 150}


def make(**overrides: object) -> privfl.config.RunConfig:
    """The embedded default with dotted-path overrides, e.g. make(**{"training.dp.delta": 0.1})."""
    table = copy.deepcopy(DEFAULT_TABLE)
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = table
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return config_from_dict(table)


def codes(findings: list[Finding]) -> dict[str, Finding]:
    return {f.code: f for f in findings}


def fired(findings: list[Finding], code: str) -> Finding:
    by_code = codes(findings)
    assert code in by_code, f"{code} did not fire: {sorted(by_code)}"
    finding = by_code[code]
    assert finding.severity is RULES[code][0]
    assert finding.message and finding.fix
    return finding


@pytest.fixture(scope="module")
def default_findings() -> list[Finding]:
    return lint_file(resources.files("privfl").joinpath("defaults/healthcare.toml"))


def test_default_config_has_only_info_findings(default_findings: list[Finding]) -> None:
    assert default_findings, "the default should at least state its INFO facts"
    assert [f for f in default_findings if f.severity is not Severity.INFO] == []
    # The facts a reader of the default needs: whole-run budget, crypto randomness, CKKS margin, no client DP.
    assert {"PFL011", "PFL013", "PFL016", "PFL017"} <= set(codes(default_findings))
    # Sizes were known (the dataset was partitioned), so nothing was skipped.
    assert "PFL019" not in codes(default_findings)


def test_default_config_object_without_sizes_says_what_was_skipped() -> None:
    findings = lint_config(default_config())
    assert fired(findings, "PFL019").field == "data"
    assert all(f.severity is Severity.INFO for f in findings)


def test_findings_are_sorted_errors_first() -> None:
    findings = lint_config(make(**{"training.dp.target_epsilon": None, "training.dp.noise_multiplier": 0.05}))
    order = [f.severity for f in findings]
    assert order == sorted(order, key=[Severity.ERROR, Severity.WARNING, Severity.INFO].index)
    assert order[0] is Severity.ERROR


def test_high_epsilon() -> None:
    f = fired(lint_config(make(**{"training.dp.target_epsilon": 20.0})), "PFL001")
    assert f.field == "training.dp.target_epsilon" and "20" in f.message
    assert "PFL001" not in codes(lint_config(make(**{"training.dp.target_epsilon": 8.0})))


def test_delta_at_or_above_one_over_n_is_an_error() -> None:
    cfg = make(**{"training.dp.delta": 0.02})
    f = fired(lint_config(cfg, client_sizes=SIZES), "PFL002")
    assert "'b'" in f.message and "n=60" in f.message  # the smallest client
    assert "1/n" in f.fix


def test_delta_close_to_one_over_n_is_a_warning() -> None:
    cfg = make(**{"training.dp.delta": 0.002})  # 1/60 > 0.002 >= 0.1/60
    findings = lint_config(cfg, client_sizes=SIZES)
    fired(findings, "PFL003")
    assert "PFL002" not in codes(findings)
    assert not {"PFL002", "PFL003"} & set(codes(lint_config(make(), client_sizes=SIZES)))


def test_fixed_low_noise() -> None:
    cfg = make(**{"training.dp.target_epsilon": None, "training.dp.noise_multiplier": 0.3, "training.dp.budget_epsilon": 5.0})
    f = fired(lint_config(cfg), "PFL004")
    assert f.field == "training.dp.noise_multiplier"
    assert "PFL005" not in codes(lint_config(cfg))


def test_loose_target_calibrates_to_low_noise() -> None:
    cfg = make(**{"training.dp.target_epsilon": 60.0})
    findings = lint_config(cfg, client_sizes={"a": 200})
    assert "below 0.5" in fired(findings, "PFL004").message
    # Not without client sizes (the calibration needs them), and not for the default target.
    assert "PFL004" not in codes(lint_config(cfg))
    assert "PFL004" not in codes(lint_config(make(), client_sizes={"a": 200}))


def test_negligible_noise_is_private_in_name_only() -> None:
    cfg = make(**{"training.dp.target_epsilon": None, "training.dp.noise_multiplier": 0.05, "training.dp.budget_epsilon": 5.0})
    assert "in name only" in fired(lint_config(cfg), "PFL005").message
    nominal = make(**{"training.dp.target_epsilon": 500.0})
    assert fired(lint_config(nominal), "PFL005").field == "training.dp.target_epsilon"


def test_fixed_noise_over_the_planned_run_reports_its_epsilon() -> None:
    cfg = make(**{"training.dp.target_epsilon": None, "training.dp.noise_multiplier": 0.6, "federation.rounds": 50})
    f = fired(lint_config(cfg, client_sizes={"a": 40}), "PFL001")
    assert f.field == "training.dp.noise_multiplier" and "epsilon" in f.message


def test_uncapped_fixed_noise() -> None:
    cfg = make(**{"training.dp.target_epsilon": None, "training.dp.noise_multiplier": 1.0})
    assert fired(lint_config(cfg), "PFL006").field == "training.dp.budget_epsilon"
    capped = make(**{"training.dp.target_epsilon": None, "training.dp.noise_multiplier": 1.0, "training.dp.budget_epsilon": 4.0})
    assert "PFL006" not in codes(lint_config(capped))


def test_a_budget_no_site_can_spend_one_round_of_is_an_error_lint_and_run_agree_on() -> None:
    from privfl.federation import Federation
    from privfl.runner import load_dataset, split_clients

    tiny = make(**{"training.dp.target_epsilon": None, "training.dp.noise_multiplier": 1.0, "training.dp.budget_epsilon": 0.1})
    split = load_dataset(tiny)
    clients = split_clients(tiny, split)
    sizes = {name: len(ds) for name, ds in clients.items()}
    f = fired(lint_config(tiny, client_sizes=sizes), "PFL025")
    assert f.field == "training.dp.budget_epsilon" and "no site can train a single round" in f.message
    # The run refuses the same config, naming the same cheapest site and figure.
    from privfl.models import build_model

    federation = Federation(
        model_fn=lambda: build_model(tiny.model, split.train.input_shape, split.train.num_classes),
        clients=clients, training=tiny.training, federation=tiny.federation, progress=False,
    )
    with pytest.raises(ConfigError) as info:
        federation.run()
    assert f.message.split(": ", 1)[1].rstrip(".") in str(info.value)
    # A budget one round fits in (4.0 here): no finding; a calibrated target never gets one.
    enough = make(**{"training.dp.target_epsilon": None, "training.dp.noise_multiplier": 1.0, "training.dp.budget_epsilon": 4.0})
    assert "PFL025" not in codes(lint_config(enough, client_sizes=sizes))
    assert "PFL025" not in codes(lint_config(make(), client_sizes=sizes))


def test_noise_that_drowns_every_sites_training_is_a_warning_lint_and_run_agree_on() -> None:
    import warnings

    from privfl.errors import PrivacyWarning
    from privfl.federation import Federation
    from privfl.models import build_model
    from privfl.runner import load_dataset, split_clients

    hopeless = make(**{"training.dp.target_epsilon": 0.01, "federation.rounds": 3, "federation.protection": "plaintext"})
    split = load_dataset(hopeless)
    clients = split_clients(hopeless, split)
    sizes = {name: len(ds) for name, ds in clients.items()}
    f = fired(lint_config(hopeless, client_sizes=sizes), "PFL026")
    assert f.severity is Severity.WARNING and f.field == "training.dp.target_epsilon"
    assert "what the model shows is mostly the noise" in f.message and "not privacy" in f.message
    # With a calibrated epsilon, batches and rounds cancel out: the fix says what does help.
    assert f.fix.startswith("Raise target_epsilon") and "cancel out" in f.fix
    fixed = make(**{"training.dp.target_epsilon": None, "training.dp.noise_multiplier": 3000.0, "federation.rounds": 3})
    assert fired(lint_config(fixed, client_sizes=sizes), "PFL026").fix.startswith("Lower noise_multiplier")
    # A calibrated epsilon a model can learn at is not flagged, nor 0.1 (the bound is deliberately loose),
    # nor a config whose client sizes are not known.
    for epsilon in (3.0, 0.1):
        assert "PFL026" not in codes(lint_config(make(**{"training.dp.target_epsilon": epsilon}), client_sizes=sizes))
    assert "PFL026" not in codes(lint_config(hopeless))

    # The run warns with the same words (a UserWarning: the privacy claim holds) before it trains.
    federation = Federation(
        model_fn=lambda: build_model(hopeless.model, split.train.input_shape, split.train.num_classes),
        clients=clients, test_set=split.test, training=hopeless.training, federation=hopeless.federation, progress=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        federation.run()
    drowned = [w for w in caught if "PFL026" in str(w.message)]
    assert len(drowned) == 1 and drowned[0].category is UserWarning and f.message in str(drowned[0].message)
    assert not [w for w in caught if issubclass(w.category, PrivacyWarning)]


def test_client_smaller_than_batch_gets_no_amplification() -> None:
    findings = lint_config(make(), client_sizes={"big": 100, "tiny": 16})  # batch_size 16 -> q = 1
    f = fired(findings, "PFL007")
    assert "'tiny'" in f.message and "'big'" not in f.message
    assert "PFL007" not in codes(lint_config(make(), client_sizes={"big": 100, "ok": 17}))


def test_secagg_fixed_fraction_bits_overflow() -> None:
    cfg = make(**{"federation.protection": "secagg", "federation.secagg": {"fraction_bits": 30, "bits": 32}})
    f = fired(lint_config(cfg), "PFL008")
    assert f.field == "federation.secagg.fraction_bits" and "5 clients" in f.message
    ok = make(**{"federation.protection": "secagg", "federation.secagg": {"fraction_bits": 20, "bits": 32}})
    assert "PFL008" not in codes(lint_config(ok))


def test_secagg_coarse_quantization() -> None:
    cfg = make(**{"federation.protection": "secagg", "federation.secagg": {"bits": 8}})
    fired(lint_config(cfg), "PFL009")
    assert "PFL009" not in codes(lint_config(make(**{"federation.protection": "secagg"})))


def test_secagg_clip_range_below_update_noise() -> None:
    dp = {"noise_multiplier": 1.0, "budget_epsilon": 5.0, "delta": 1e-5}
    small = make(**{"federation.protection": "secagg", "federation.secagg": {"clip_range": 0.01}, "training.dp": dp})
    fired(lint_config(small, client_sizes={"a": 100}), "PFL010")
    wide = make(**{"federation.protection": "secagg", "federation.secagg": {"clip_range": 1.0}, "training.dp": dp})
    assert "PFL010" not in codes(lint_config(wide, client_sizes={"a": 100}))


def test_secagg_threshold_at_or_below_half_of_the_holders() -> None:
    cfg = make(**{"federation.protection": "secagg", "federation.secagg": {"threshold": 2}})  # 5 clients, complete graph
    f = fired(lint_config(cfg), "PFL020")
    assert f.field == "federation.secagg.threshold" and "threshold=2" in f.message and "must be > 2" in f.message
    # neighbours=3: the 5-client round has 3 holders (fine), the 4-client round 4 (refused).
    odd = make(**{"federation.protection": "secagg", "federation.secagg": {"threshold": 2, "neighbours": 3}})
    assert "round of 4 clients" in fired(lint_config(odd), "PFL020").message
    for ok in ({"threshold": 3}, {}, {"threshold": 3, "neighbours": 3}):
        assert "PFL020" not in codes(lint_config(make(**{"federation.protection": "secagg", "federation.secagg": ok})))


def test_whole_run_budget_and_rdp_infos() -> None:
    findings = lint_config(make(**{"training.dp.accountant": "rdp"}))
    assert "10 rounds" in fired(findings, "PFL011").message
    fired(findings, "PFL012")
    single = lint_config(make(**{"federation.rounds": 1}))
    assert not {"PFL011", "PFL012"} & set(codes(single))


def test_randomness_rules() -> None:
    assert fired(lint_config(make()), "PFL013").field == "federation.seed"
    assert "PFL013" not in codes(lint_config(make(**{"federation.protection": "plaintext"})))
    cfg = make(**{"federation.protection": "secagg", "federation.secagg": {"graph_seed": b"0" * 32}})
    assert fired(lint_config(cfg), "PFL014").field == "federation.secagg.graph_seed"
    assert "PFL014" not in codes(lint_config(make(**{"federation.protection": "secagg"})))


def test_pfl013_says_the_seed_fixes_only_partitioning_and_initialisation() -> None:
    message = fired(lint_config(make()), "PFL013").message
    assert "fixes only the data partitioning and the model initialisation" in message
    assert "Client sampling and DP noise come from fresh OS entropy" in message and "noise_seed" in message
    # The old text claimed federation.seed made sampling and DP noise reproducible.
    assert "DP noise reproducible" not in message and "sampling, initialisation" not in message


def test_noise_seed_is_a_warning_for_every_protection() -> None:
    assert "PFL022" not in codes(lint_config(make()))
    for protection in ("plaintext", "ckks", "secagg"):
        finding = fired(lint_config(make(**{"federation.protection": protection, "federation.noise_seed": 7})), "PFL022")
        assert finding.severity is Severity.WARNING and finding.field == "federation.noise_seed"
        assert "client sampling" in finding.message and "whoever has the config" in finding.message
        assert "amplification by client sampling" in finding.message
    with_client_dp = make(**{"federation.noise_seed": 7, "federation.client_dp": {"noise_multiplier": 1.0}})
    assert "client-level noise" in fired(lint_config(with_client_dp), "PFL022").message


def test_shared_key_warns_who_can_decrypt_and_the_step() -> None:
    finding = fired(lint_config(make(**{"federation.protection": "shared_key"})), "PFL024")
    assert finding.severity is Severity.WARNING and "any single site" in finding.message
    assert "2 prime(s)" in finding.message
    coarse = fired(
        lint_config(make(**{"federation.protection": "shared_key", "federation.shared_key.limbs": 1, "data.num_clients": 2000,
                            "data.client_names": None, "data.min_client_size": 1})),
        "PFL024",
    )
    assert "step of 0.25" in coarse.message  # one prime, 2,000 sites: 4 levels either side of zero
    hopeless = fired(
        lint_config(make(**{"federation.protection": "shared_key", "federation.shared_key.limbs": 1, "data.num_clients": 60000,
                            "data.client_names": None, "data.min_client_size": 1})),
        "PFL024",
    )
    assert "cannot serve" in hopeless.message
    assert "PFL024" not in codes(lint_config(make()))


def test_plaintext_is_a_warning() -> None:
    assert fired(lint_config(make(**{"federation.protection": "plaintext"})), "PFL015").severity is Severity.WARNING
    assert "PFL015" not in codes(lint_config(make()))


def test_ckks_security_margin() -> None:
    f = fired(lint_config(make(**{"federation.ckks.data_bits": 60, "federation.ckks.special_bits": 60})), "PFL016")
    assert "120 of the 218" in f.message and "98 bits of margin" in f.message


def test_client_level_rules() -> None:
    fired(lint_config(make()), "PFL017")
    if "client_dp" not in privfl.config.FederationConfig.__dataclass_fields__:
        pytest.skip("this checkout's config has no client-level DP")
    loose = make(**{"federation.client_dp": {"noise_multiplier": 1.0, "delta": 0.5}})
    findings = lint_config(loose)
    assert fired(findings, "PFL018").field == "federation.client_dp.delta"
    assert "PFL017" not in codes(findings)
    tight = make(**{"federation.client_dp": {"noise_multiplier": 1.0, "delta": 1e-3}})
    assert not {"PFL017", "PFL018"} & set(codes(lint_config(tight)))


def test_bad_client_sizes_and_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="client_sizes"):
        lint_config(make(), client_sizes={"a": 0})
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        lint_file(tmp_path / "missing.toml")


def _lint_rule(table, code="PFL021"):
    return [f for f in lint_config(config_from_dict(table)) if f.code == code]


def test_lint_flags_configs_whose_rounds_cannot_complete():
    one_site = _lint_rule({"data": {"num_clients": 1}, "federation": {"protection": "secagg"}})
    assert len(one_site) == 1 and one_site[0].severity.value == "error" and "every round would abort" in one_site[0].message
    two_of_three = _lint_rule(
        {"data": {"num_clients": 5}, "federation": {"protection": "ckks", "client_fraction": 0.4, "ckks": {"min_contributors": 3}}}
    )
    assert len(two_of_three) == 1 and two_of_three[0].severity.value == "error"
    # The default demo (5 sites, all sampled, CKKS needs 2) completes every round: nothing to say.
    assert _lint_rule({}) == []


def test_lint_counts_the_poisson_rounds_that_will_be_skipped():
    table = {
        "data": {"num_clients": 4},
        "federation": {
            "protection": "ckks",
            "rounds": 10,
            "client_fraction": 0.3,
            "client_dp": {"noise_multiplier": 1.0, "delta": 1e-3, "sampling": "poisson"},
        },
    }
    (finding,) = _lint_rule(table, "PFL021")
    p_short = 0.7**4 + 4 * 0.3 * 0.7**3  # fewer than 2 of 4 sites sampled
    assert finding.severity.value == "warning"
    assert f"{p_short:.3g}" in finding.message and f"{p_short * 10:.1f} of 10 rounds" in finding.message


def test_secagg_clip_range_derived_from_client_level_noise() -> None:
    client_dp = {"target_epsilon": 2.0, "delta": 1e-4, "clip_norm": 0.5, "adaptive": True}
    derived = fired(lint_config(make(**{"federation.protection": "secagg", "federation.client_dp": client_dp})), "PFL023")
    assert derived.severity is Severity.INFO and "zero-out" in derived.message and "aborted" in derived.message
    # 8-bit words cannot hold 5 sites' noise shares: clipping would cut the noise, every round would abort
    narrow = {"federation.protection": "secagg", "federation.secagg": {"bits": 8}, "federation.client_dp": client_dp}
    (finding,) = [f for f in lint_config(make(**narrow)) if f.code == "PFL023"]
    assert finding.severity is Severity.ERROR and finding.field == "federation.secagg.bits"
    assert "PFL023" not in codes(lint_config(make(**{"federation.client_dp": client_dp})))  # central noise


def test_every_rule_has_a_test_above() -> None:
    # Guards the rules table in docs/audits.md and this file against silently growing apart.
    import inspect

    source = inspect.getsource(sys.modules[__name__])
    untested = [code for code in RULES if source.count(f'"{code}"') < 2 and code != "PFL019"]
    assert untested == []
