"""A site's DP randomness is its own: the server cannot regenerate it, and no two sites share it."""

from __future__ import annotations

import stat

import pytest
import torch
from flwr.app import Context, RecordDict

from client.app import _site_secret
from core.config import RunConfig
from core.data import HospitalSpec, PhantomSite, generate_hospitals
from core.federation.rounds import initial_adapters, train_round
from core.federation.sites import SiteRef


@pytest.fixture(scope="module")
def site_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    spec = HospitalSpec((PhantomSite("xr", "xr2d", 30, (32, 32)),), alpha=None)
    generate_hospitals(root, spec, seed=0)
    cfg = RunConfig.from_flat(
        {"data-root": str(root), "in-plane-size": 32, "batch-size": 8, "num-server-rounds": 2}
    )
    return cfg, root / "xr"


def one_round(cfg, site_dir, secret):
    adapters, digest = initial_adapters(cfg)
    outcome = train_round(
        cfg,
        site_dir=site_dir,
        global_adapters=adapters,
        server_round=1,
        expected_fingerprint=digest,
        ledger_state=None,
        site_secret=secret,
    )
    return outcome.adapters


def test_dp_noise_follows_the_site_secret_not_the_run_config(site_cfg):
    cfg, site_dir = site_cfg
    first = one_round(cfg, site_dir, secret=11)
    again = one_round(cfg, site_dir, secret=11)
    other = one_round(cfg, site_dir, secret=12)
    assert all(torch.equal(first[k], again[k]) for k in first)  # a restarted site repeats
    assert not torch.equal(first["head.fc.weight"], other["head.fc.weight"])  # the secret decides


def test_the_secret_is_drawn_once_kept_private_and_survives_a_restart(tmp_path):
    site = SiteRef("xr", tmp_path / "data", tmp_path / "state")
    context = Context(1, 1, {}, RecordDict(), {})
    secret = _site_secret(context, site)
    assert _site_secret(context, site) == secret  # from node memory
    path = tmp_path / "state" / "site-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    restarted = Context(1, 1, {}, RecordDict(), {})  # a new SuperNode process: memory is empty
    assert _site_secret(restarted, site) == secret
    other_site = SiteRef("ct", tmp_path / "data2", tmp_path / "state2")
    assert _site_secret(Context(1, 2, {}, RecordDict(), {}), other_site) != secret
