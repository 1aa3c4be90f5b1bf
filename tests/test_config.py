"""Config validation and the TOML loader: every error names the field and the bad value."""

from __future__ import annotations

import pytest

from privfl.config import (
    CkksConfig,
    DPConfig,
    FederationConfig,
    ProtectionKind,
    RunConfig,
    TrainingConfig,
    config_from_dict,
    default_config,
    load_config,
)
from privfl.errors import ConfigError


def test_default_config_is_the_healthcare_demo():
    config = default_config()
    assert config.data.dataset.value == "breast_cancer"
    assert config.data.num_clients == 5
    assert config.data.partition.value == "dirichlet" and config.data.alpha == 0.5
    assert config.training.dp.target_epsilon == 3.0 and config.training.dp.delta == 1e-5
    assert config.federation.protection is ProtectionKind.CKKS


@pytest.mark.parametrize(
    ("build", "field", "value"),
    [
        (lambda: DPConfig(target_epsilon=-1.0), "target_epsilon", -1.0),
        (lambda: DPConfig(target_epsilon=1.0, noise_multiplier=1.0), "target_epsilon/noise_multiplier", (1.0, 1.0)),
        (lambda: DPConfig(target_epsilon=1.0, delta=2.0), "delta", 2.0),
        (lambda: TrainingConfig(batch_size=0), "batch_size", 0),
        (lambda: FederationConfig(client_fraction=1.5), "client_fraction", 1.5),
        (lambda: FederationConfig(device="tpu"), "device", "tpu"),
        (lambda: CkksConfig(data_bits=61), "data_bits", 61),
        (lambda: CkksConfig(scale_bits=50), "scale_bits", 50),
        (lambda: CkksConfig(min_contributors=1), "min_contributors", 1),
        (lambda: CkksConfig(poly_modulus_degree=4096, data_bits=60, special_bits=60, scale_bits=40), "data_bits+special_bits", 120),
        (lambda: CkksConfig(poly_modulus_degree=3000), "poly_modulus_degree", 3000),
    ],
)
def test_config_errors_name_field_and_value(build, field, value):
    try:
        build()
    except ConfigError as exc:
        assert exc.field == field
        if value is not None:
            assert exc.value == value
        assert field in str(exc)
    else:
        pytest.fail("no ConfigError")


def test_ckks_defaults_meet_128_bit_security():
    config = CkksConfig()
    assert config.data_bits + config.special_bits <= 218  # HE standard, N=8192, 128-bit classical


def test_toml_unknown_key_and_bad_enum(tmp_path):
    with pytest.raises(ConfigError, match=r"federation\.rounds_total"):
        config_from_dict({"federation": {"rounds_total": 3}})
    # A typo gets the setting meant; a name like none of them gets the list only.
    with pytest.raises(ConfigError, match=r"training\.dp\.target_epsilom=0\.5: unknown setting; did you mean 'target_epsilon'\?"):
        config_from_dict({"training": {"dp": {"target_epsilom": 0.5}}})
    with pytest.raises(ConfigError) as info:
        config_from_dict({"training": {"dp": {"colour": "blue"}}})
    assert "did you mean" not in str(info.value) and "known ones are" in str(info.value)
    with pytest.raises(ConfigError) as info:
        config_from_dict({"federation": {"protection": "rot13"}})
    assert info.value.field == "federation.protection" and info.value.value == "rot13"
    assert "did you mean" not in str(info.value)
    # Another case is refused (the config's text is what a resume and the sites compare), with the fix.
    with pytest.raises(ConfigError, match=r"did you mean 'ckks'\? the values are lower-case"):
        config_from_dict({"federation": {"protection": "CKKS"}})
    with pytest.raises(ConfigError) as info:
        config_from_dict({"training": {"dp": {"target_epsilon": "three"}}})
    assert info.value.field == "training.dp.target_epsilon"
    with pytest.raises(ConfigError) as info:
        config_from_dict({"training": {"dp": {"target_epsilon": -3}}})
    assert info.value.field == "training.dp.target_epsilon" and info.value.value == -3


def test_load_config_reports_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\nrounds = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    good = tmp_path / "good.toml"
    good.write_text('[federation]\nrounds = 3\nprotection = "plaintext"\n[training.dp]\nnoise_multiplier = 1.0\n')
    config = load_config(good)
    assert isinstance(config, RunConfig)
    assert config.federation.rounds == 3 and config.training.dp.noise_multiplier == 1.0


def test_dp_table_without_epsilon_keeps_the_default_of_three():
    config = config_from_dict({"training": {"dp": {"max_grad_norm": 2.0}}})
    assert config.training.dp.target_epsilon == 3.0 and config.training.dp.max_grad_norm == 2.0
    assert DPConfig(noise_multiplier=1.2).target_epsilon is None


def test_secagg_graph_seed_from_toml_is_hex():
    seed = "00112233445566778899aabbccddeeff"
    config = config_from_dict({"federation": {"protection": "secagg", "secagg": {"graph_seed": seed}}})
    assert config.federation.secagg.graph_seed == bytes.fromhex(seed)
    with pytest.raises(ConfigError, match=r"federation\.secagg\.graph_seed"):
        config_from_dict({"federation": {"secagg": {"graph_seed": "not hex"}}})
    with pytest.raises(ConfigError, match=r"federation\.secagg\.graph_seed"):
        config_from_dict({"federation": {"secagg": {"graph_seed": "0011"}}})  # 2 bytes < 16
