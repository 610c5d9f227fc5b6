"""Run config: unknown keys, wrong types and impossible values fail before training, by name."""

import pytest

from core.config import ConfigError, RunConfig


def test_defaults_are_valid_and_round_trip():
    cfg = RunConfig()
    assert RunConfig.from_flat(cfg.to_flat()) == cfg
    assert cfg.lora().mode == "ffa" and cfg.privacy().target_epsilon == 8.0


def test_each_default_has_one_home_and_the_run_uses_it():
    """A setting's default lives in the dataclass that owns it (LoRA in LoraSettings, local
    training in TrainSettings, DP in DPSettings); the run config takes it from there, so the
    run and a direct caller of the dataclass cannot disagree (they did: TrainSettings had lr
    1e-3 AdamW, batch 16, the run 0.05 SGD, batch 32)."""
    from core.adapters.settings import LoraSettings
    from core.privacy.plan import DPSettings
    from core.training.settings import TrainSettings

    cfg = RunConfig()
    assert cfg.lora() == LoraSettings()
    assert cfg.training() == TrainSettings()
    assert cfg.privacy() == DPSettings()
    # The values the run used before the defaults moved (behaviour unchanged).
    assert (cfg.learning_rate, cfg.optimizer, cfg.batch_size) == (0.05, "sgd", 32)
    assert (cfg.target_epsilon, cfg.target_delta, cfg.max_grad_norm) == (8.0, 1e-5, 1.0)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_mode) == (8, 16, "qv", "ffa")


def test_every_key_sits_in_one_section():
    from core.config import SECTIONS, section_of

    assert list(SECTIONS) == ["model", "lora", "train", "dp", "he", "federation", "data"]
    keys = [key for section in SECTIONS.values() for key in section]
    assert sorted(keys) == sorted(RunConfig().to_flat()) and len(keys) == len(set(keys))
    assert section_of("lora-rank") == "lora" and section_of("target-epsilon") == "dp"
    assert section_of("he-public-context") == "he" and section_of("data-root") == "data"


def test_an_unknown_key_names_the_closest_key_and_its_section():
    with pytest.raises(ConfigError, match=r"did you mean 'lora-rank' \(section lora\)\?"):
        RunConfig.from_flat({"lora-rnak": 4})
    with pytest.raises(ConfigError, match=r"valid keys by section: model: .*; lora: lora-rank"):
        RunConfig.from_flat({"zzzzzz": 1})


def test_simulate_help_lists_the_keys_by_section_with_their_defaults(capsys):
    from simulations.run import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert "lora:\n  lora-rank = 8\n  lora-alpha = 16" in shown
    assert "dp:\n  dp = true\n  target-epsilon = 8.0" in shown
    assert '  head-sharing = "auto"' in shown  # the declared default, resolved per task later
    assert shown.index("model:") < shown.index("lora:") < shown.index("data:")


def test_pyproject_app_config_declares_every_key_with_its_default():
    """Flower only accepts --run-config overrides of keys the app declares."""
    import tomllib
    from pathlib import Path

    data = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    declared = data["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_flat(declared) == RunConfig()
    assert set(declared) == set(RunConfig().to_flat())
    # The declared value, not the one it resolves to for a classifier: "auto" also serves a
    # segmentation run, which refuses "shared+local".
    assert declared["head-sharing"] == "auto"
    segmentation = RunConfig.from_flat(declared | {"task": "segmentation"})
    assert segmentation.head_sharing == "local"


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
