"""Segmentation through Flower's real Simulation Engine: 2 phantom sites with masks on disk,
2 rounds, DP on; only LoRA B travels trained (each site keeps its decoder and head, the reply
carries the global ones); every site reports Dice."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, safe_open

from core.config import RunConfig
from core.federation.rounds import initial_adapters
from simulations.run import load_scenario, run_scenario

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_two_sites_two_rounds_segmentation_with_dp(tmp_path):
    scenario = load_scenario("segmentation")
    scenario["phantoms"] = {"preset": "segmentation", "n-sites": 2, "seed": 1}
    del scenario["pretrain"]  # a seeded backbone: the federation path is under test
    small = {
        "num-server-rounds": 2,
        "decoder-features": 4,
        "lora-rank": 2,
        "batch-size": 16,
        "min-train-nodes": 2,
    }
    out = tmp_path / "run"
    run_scenario(scenario, overrides=small, out_dir=out, data_cache=tmp_path, quiet=True)

    masks = sorted((tmp_path).glob("*/site-*/masks/case_*"))
    assert masks  # the sites' labels are mask files on disk
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for entry in metrics["rounds"]:
        assert set(entry["status"].values()) == {"trained"} and len(entry["status"]) == 2
        for site in entry["sites"].values():
            assert site["dice"] is not None and 0.0 <= site["dice"] <= 1.0
        assert 0.0 <= entry["evaluate"]["dice"] <= 1.0

    cfg = RunConfig.from_flat(json.loads((out / "config.json").read_text()))
    reference, _ = initial_adapters(cfg)
    saved = load_file(str(out / "checkpoints" / "round-002.safetensors"))
    assert set(saved) == set(reference)
    assert all(
        ".lora_B." in k or k.startswith(("decoder.", "seg_head.")) for k in saved
    )  # FFA: no A, no backbone
    # Head-sharing "local" (the default): the coordinator's decoder and head are the initial
    # ones, while every site trained and kept its own in its state folder.
    assert cfg.keeps_local_head
    initial = {k: v for k, v in reference.items() if k.startswith(("decoder.", "seg_head."))}
    assert initial and all(torch.equal(saved[k], v) for k, v in initial.items())
    assert any(not torch.equal(saved[k], v) for k, v in reference.items() if ".lora_B." in k)
    kept_files = sorted((out / "state").glob("*/local-decoder.safetensors"))
    assert [f.parent.name for f in kept_files] == sorted(metrics["rounds"][-1]["status"])
    for kept_file in kept_files:
        kept = load_file(str(kept_file))
        assert set(kept) == set(initial)
        assert any(not torch.equal(kept[k], v) for k, v in initial.items())
        with safe_open(str(kept_file), framework="pt") as handle:
            assert handle.metadata()["task"] == "segmentation"
    privacy = json.loads((out / "privacy.json").read_text())
    for site in privacy["sites"].values():
        eps = [r["epsilon"] for r in site["rounds"]]
        assert len(eps) == 2 and 0 < eps[0] < eps[1] <= 8.0 + 1e-9
        released = {i["item"] for i in site["released"]}
        assert "metric dice" in released
    assert math.isfinite(metrics["rounds"][-1]["evaluate"]["dice"])
