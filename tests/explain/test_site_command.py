"""The site command on a run folder from a real Flower simulation (2 sites, 1 round)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from PIL import Image
from torch import nn

from client.explain import INDEX, load_site_head, main
from core.adapters.lora import load_adapter_folder
from core.config import RunConfig
from core.federation.rounds import open_split
from core.federation.runs import build_run_model
from simulations.run import load_scenario, run_scenario

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_overlays_and_index_from_a_simulated_run(tmp_path, capsys):
    scenario = load_scenario("default") | {
        "phantoms": {"preset": "many", "n-sites": 2, "seed": 3},
        "pretrain": {"steps": 3},
    }
    run = tmp_path / "run"
    overrides = {"num-server-rounds": 1, "in-plane-size": 32, "batch-size": 8}
    run_scenario(scenario, overrides=overrides, out_dir=run, data_cache=tmp_path, quiet=True)
    cfg = json.loads((run / "config.json").read_text())
    sites = sorted(p.parent for p in (tmp_path).glob("**/dataset.json"))
    site = next(p for p in sites if str(p).startswith(cfg["data-root"]))
    out = tmp_path / "explanations"

    started = time.perf_counter()
    assert main([str(run), "--site-dir", str(site), "--out", str(out), "--limit", "3"]) == 0
    per_case = (time.perf_counter() - started) / 3

    pngs = sorted(out.glob("case-*.png"))
    assert len(pngs) == 3
    for png in pngs:
        with Image.open(png) as picture:
            assert picture.format == "PNG" and picture.size[0] > 100
    index = (out / INDEX).read_text()
    scores = [
        float(cell.split("</td>")[0])
        for cell in index.split("<tr><td>")[1:]
        for cell in [cell.split("</td><td>")[2]]
    ]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert all(png.name in index for png in pngs)
    # The phantom sites name their classes: the index says which class the score is for.
    assert "probability of <b>lesion</b>" in index
    # The index says which head scored the cases: the site's own, from its state folder.
    head_file = run / "state" / site.name / "local-head.safetensors"
    assert f"the site's personal read-out <code>{head_file}</code>" in index  # "shared+local"
    labels = [row.split("</td><td>")[3] for row in index.split("<tr><td>")[1:]]
    assert set(labels) <= {"no lesion", "lesion"}
    assert per_case < 30  # generous: a loaded CI machine; the benchmark measures it properly
    # A site without a personal read-out (one that did not train in this run) is explained
    # with the run's shared head alone, as its evaluation scores it; stderr and the index say so.
    elsewhere = ["--state-dir", str(tmp_path / "not-the-site"), "--limit", "3"]
    capsys.readouterr()  # drop the first call's progress bars
    shared_out = tmp_path / "shared-only"
    assert main([str(run), "--site-dir", str(site), "--out", str(shared_out), *elsewhere]) == 0
    message = capsys.readouterr().err
    assert "no personal read-out in" in message and "--state-dir" in message
    shared_index = (shared_out / INDEX).read_text()
    assert "the run's shared head (in the adapters) alone" in shared_index
    # Oracle: the scores are the probabilities of the run's adapters without a personal part.
    run_cfg, model, _ = build_run_model(run)
    load_adapter_folder(model, run / "adapters")
    dataset = open_split(run_cfg, site, "test")
    model.eval()
    with torch.no_grad():
        expected = sorted(
            (
                torch.softmax(model(item["image"][None], item["spacing"]), dim=1)[0, 1].item()
                for item in (dataset[i] for i in range(3))
            ),
            reverse=True,
        )
    found = [float(row.split("</td><td>")[2]) for row in shared_index.split("<tr><td>")[1:]]
    assert found == pytest.approx(expected, abs=6e-4)  # the index prints 3 decimals


@pytest.mark.parametrize(
    ("sharing", "refused"), [("local", True), ("shared+local", False), ("shared", False)]
)
def test_a_missing_site_head_is_refused_only_where_the_adapters_head_was_never_trained(
    tmp_path, sharing, refused
):
    """Under "local" the adapters carry the untrained initial head: explaining with it would
    show a model nobody trained. Under "shared+local" the shared head alone is a trained model."""
    cfg = RunConfig.from_flat({"head-sharing": sharing})
    if refused:
        with pytest.raises(FileNotFoundError, match="head-sharing = local"):
            load_site_head(nn.Identity(), cfg, tmp_path, "", tmp_path)
    else:
        assert load_site_head(nn.Identity(), cfg, tmp_path, "", tmp_path) is None
