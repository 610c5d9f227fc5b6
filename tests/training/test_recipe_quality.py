"""The run-config recipe learns the phantom task at the 3D sites where the old recipe ranked
lesions at chance (issue 14: centralized CT 0.54 and MR 0.51 with a mean-pooled head)."""

import dataclasses

import pytest
import torch

from benchmarks.federated import Pooled
from core.config import RunConfig
from core.data.phantoms import HospitalSpec, generate_hospitals, preset
from core.federation.rounds import build_lora_model, open_split
from core.pretrain import demo_backbone
from core.training.loops import evaluate, train_plain

CPU = torch.device("cpu")


@pytest.mark.slow
def test_short_centralized_run_ranks_ct_and_mr_lesions_well_above_chance(tmp_path):
    torch.set_num_threads(1)
    sites = tuple(s for s in preset("default").sites if s.kind in ("ct3d", "mr3d"))
    spec = HospitalSpec(tuple(dataclasses.replace(s, n_cases=300) for s in sites), alpha=None)
    generate_hospitals(tmp_path / "sites", spec, seed=1)
    path, _ = demo_backbone(tmp_path / "cache", steps=1000)  # the demo backbone's steps
    cfg = RunConfig.from_flat({"backbone": str(path), "dp": False})  # the default recipe
    model, _ = build_lora_model(cfg)
    pooled = Pooled([open_split(cfg, tmp_path / "sites" / s.name, "training") for s in sites])
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        train_plain(model, pooled, cfg.training(), device=CPU, generator=generator)
    aucs = {
        site.name: evaluate(
            model,
            open_split(cfg, tmp_path / "sites" / site.name, "test"),
            batch_size=32,
            device=CPU,
        )["auc"]
        for site in sites
    }
    # The mean-pooled head ranked these lesions at chance (CT 0.54, MR 0.51). Measured with
    # this recipe on the SimMIM backbone (visible weight 0): CT 0.84, MR 0.44 (then an xfail);
    # on the default backbone (visible weight 0.3): CT 0.98, MR 0.91.
    assert aucs["site-a-ct-thin"] >= 0.7, aucs
    assert aucs["site-b-mr-thick"] >= 0.6, aucs
