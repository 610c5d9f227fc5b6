"""Run config: unknown keys, wrong types and impossible values fail before training, by name."""

import pytest

from core.config import ConfigError, RunConfig


def test_defaults_are_valid_and_round_trip():
    cfg = RunConfig()
    assert RunConfig.from_flat(cfg.to_flat()) == cfg
    assert cfg.lora().mode == "ffa" and cfg.privacy().target_epsilon == 8.0


def test_pyproject_app_config_declares_every_key_with_its_default():
    """Flower only accepts --run-config overrides of keys the app declares."""
    import tomllib
    from pathlib import Path

    data = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    declared = data["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_flat(declared) == RunConfig()
    assert set(declared) == set(RunConfig().to_flat())


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (
            {"target-epsilon": 8.0, "lora-rnak": 4},
            "unknown key 'lora-rnak'; did you mean 'lora-rank'",
        ),
        ({"num-server-rounds": "3"}, "'num-server-rounds' must be int, got str"),
        ({"dp": 1}, "'dp' must be bool"),
        ({"learning-rate": float("nan")}, "finite"),
        ({"num-server-rounds": 0}, "num-server-rounds"),
        ({"lora-rank": 0}, "rank must be >= 1"),
        ({"target-epsilon": -1.0}, "target_epsilon"),
        ({"target-delta": 1.5}, "target_delta"),
        ({"lora-mode": "both"}, "lora-mode"),
        ({"model-size": "huge"}, "model-size"),
        ({"accountant": "gdp"}, "accountant"),
        ({"in-plane-size": 60}, "multiple of the patch size"),
        ({"he": True}, "he-public-context"),
        ({"fraction-train": 1.5}, "fraction-train"),
    ],
)
def test_bad_values_name_the_key(values, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flat(values)


def test_ints_are_accepted_for_floats():
    assert RunConfig.from_flat({"target-epsilon": 3}).target_epsilon == 3.0
