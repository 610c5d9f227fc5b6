"""Head-sharing "local" (FedPer): each site trains and keeps its own head; what it sends carries
the global head unchanged, so the coordinator never sees a site's head."""

from __future__ import annotations

import pytest
import torch

from core.config import RunConfig
from core.data import HospitalSpec, PhantomSite, generate_hospitals
from core.federation.rounds import evaluate_round, initial_adapters, train_round


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    spec = HospitalSpec((PhantomSite("xr", "xr2d", 40, (32, 32)),), alpha=None)
    generate_hospitals(root, spec, seed=0)
    return root, root / "xr"


def config(root, **values):
    flat = {"data-root": str(root), "in-plane-size": 32, "dp": False, "learning-rate": 0.5}
    return RunConfig.from_flat(flat | values)


def heads(state):
    return {k: v for k, v in state.items() if k.startswith("head.")}


def test_the_reply_carries_the_global_head_and_the_site_keeps_its_trained_head(site):
    root, site_dir = site
    cfg = config(root)
    assert cfg.head_sharing == "local"  # the default recipe
    global_adapters, digest = initial_adapters(cfg)
    kwargs = {"site_dir": site_dir, "expected_fingerprint": digest, "ledger_state": None}
    outcome = train_round(cfg, global_adapters=global_adapters, server_round=1, **kwargs)
    assert outcome.adapters is not None and outcome.local_head is not None
    for key, value in heads(global_adapters).items():
        assert torch.equal(outcome.adapters[key], value)  # nothing of the trained head is sent
        assert not torch.equal(outcome.local_head[key], value)  # but it was trained
    assert set(outcome.local_head) == set(heads(global_adapters))
    moved = [k for k in global_adapters if "lora_B" in k]
    assert any(not torch.equal(outcome.adapters[k], global_adapters[k]) for k in moved)

    # Shared heads send what they trained: the same round, head-sharing "shared".
    shared = train_round(
        config(root, **{"head-sharing": "shared"}),
        global_adapters=global_adapters,
        server_round=1,
        **kwargs,
    )
    assert shared.local_head is None and shared.adapters is not None
    assert not torch.equal(shared.adapters["head.fc.weight"], global_adapters["head.fc.weight"])


def test_the_site_trains_and_evaluates_from_its_own_head(site):
    root, site_dir = site
    cfg = config(root, **{"learning-rate": 1e-12})  # a step that changes nothing
    global_adapters, digest = initial_adapters(cfg)
    own = {k: torch.randn_like(v) for k, v in heads(global_adapters).items()}
    outcome = train_round(
        cfg,
        site_dir=site_dir,
        global_adapters=global_adapters,
        server_round=2,
        expected_fingerprint=digest,
        ledger_state=None,
        local_head=own,
    )
    assert outcome.local_head is not None
    for key, value in own.items():  # training started from the site's head, not the global one
        torch.testing.assert_close(outcome.local_head[key], value)
    kwargs = {"site_dir": site_dir, "global_adapters": global_adapters}
    with_own = evaluate_round(cfg, expected_fingerprint=digest, local_head=own, **kwargs)
    with_global = evaluate_round(cfg, expected_fingerprint=digest, **kwargs)
    assert with_own["loss"] != pytest.approx(with_global["loss"])
    shared = config(root, **{"head-sharing": "shared"})  # a shared-head run ignores it
    assert evaluate_round(shared, expected_fingerprint=digest, local_head=own, **kwargs) == (
        pytest.approx(with_global)
    )


@pytest.mark.parametrize("foreign", ["other-key", "three-classes"])
def test_a_local_head_of_another_configuration_is_refused_by_name(site, foreign):
    root, site_dir = site
    cfg = config(root)
    global_adapters, digest = initial_adapters(cfg)
    head = {"head.other.weight": torch.zeros(2, 2)}
    if foreign == "three-classes":
        head = {k: torch.zeros(3, *v.shape[1:]) for k, v in heads(global_adapters).items()}
    with pytest.raises(ValueError, match=r"another run configuration.*local-head\.safetensors"):
        evaluate_round(
            cfg,
            site_dir=site_dir,
            global_adapters=global_adapters,
            expected_fingerprint=digest,
            local_head=head,
        )


def test_segmentation_keeps_no_local_head_and_old_run_folders_shared_theirs():
    assert RunConfig.from_flat({}).keeps_local_head
    assert not RunConfig.from_flat({"task": "segmentation"}).keeps_local_head
    assert not RunConfig.from_flat({"head-sharing": "shared"}).keeps_local_head
    # A run folder written before head-sharing and head-norm modes still opens, as it ran.
    old = RunConfig.from_record({"head-norm": True, "head-pool": "contrast"})
    assert (old.head_norm, old.head_sharing, old.keeps_local_head) == ("layer", "shared", False)
    assert RunConfig.from_record({"head-norm": False}).head_norm == "none"
