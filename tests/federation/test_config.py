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


def test_an_old_run_config_naming_the_secret_context_says_where_it_moved():
    """The secret CKKS context is one hospital's file: the run config, which the coordinator
    sends to every node, must not carry its path. An old config that still sets it fails,
    naming the node-config key and the state-folder file that replace it."""
    old = {"he": True, "he-public-context": "p", "he-secret-context": "/app/he/site_secret.ctx"}
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flat(old)
    message = str(caught.value)
    assert "'he-secret-context' is no longer a run-config key" in message
    assert "node config key 'he-secret-context'" in message
    assert "site_secret.ctx in the site's state folder" in message
    assert "he-secret-context" not in RunConfig().to_flat()


def test_a_run_folder_written_before_the_move_still_opens():
    """``fedmedvit decrypt`` / ``explain`` read a past run's config.json, which named the
    secret context then: that record is read back, not sent, so the key is dropped."""
    written_before = RunConfig().to_flat() | {"he-secret-context": "/old/site_secret.ctx"}
    assert RunConfig.from_record(written_before) == RunConfig()
    with pytest.raises(ConfigError, match="unknown key 'lora-rnak'"):
        RunConfig.from_record(written_before | {"lora-rnak": 4})


def test_ints_are_accepted_for_floats():
    assert RunConfig.from_flat({"target-epsilon": 3}).target_epsilon == 3.0


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"fraction-train": 0.0}, "'fraction-train' = 0.0 .*samples no node"),
        ({"fraction-evaluate": 0.0}, "'fraction-evaluate' = 0.0"),
        ({"min-train-nodes": 0}, "'min-train-nodes' = 0"),
        ({"round-timeout": 5.0}, "'round-timeout' = 5.0 .*at least 30 s"),
        ({"max-examples-per-site": 0}, "'max-examples-per-site'"),
    ],
)
def test_settings_that_cannot_work_are_refused(values, match):
    """Issue 13, fault 5: refused at once, naming the key and the fix."""
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flat(values)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"min-train-nodes": 3}, "'min-train-nodes' = 3 .*has 2 site.*at most 2"),
        ({"min-available-nodes": 5}, "'min-available-nodes' = 5"),
        ({"min-train-nodes": 1, "min-available-nodes": 1, "fraction-train": 0.1}, None),
    ],
)
def test_min_nodes_above_the_number_of_sites_are_refused(values, match):
    cfg = RunConfig.from_flat(values)
    if match is None:
        cfg.check_federation(2)  # 0.1 * 2 rounds to 0 nodes, but min-train-nodes = 1 samples one
        return
    with pytest.raises(ConfigError, match=match):
        cfg.check_federation(2)


def test_the_runner_refuses_a_typo_before_generating_data_or_pretraining(tmp_path):
    """A misspelt --set key fails at once, naming the closest key, with nothing generated."""
    from simulations.run import load_scenario, run_scenario

    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(ConfigError, match="did you mean 'num-server-rounds'"):
        run_scenario(
            load_scenario("default"),
            overrides={"num-server-round": 2},
            out_dir=tmp_path / "run",
            data_cache=cache,
            quiet=True,
        )
    assert list(cache.iterdir()) == []
