"""The runner runs on the user's own site folders (issue 14: ``--set data-root=/my/sites`` was
silently replaced by phantoms), and a folder without sites is a clear error before any run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import ConfigError
from core.data import HospitalSpec, PhantomSite, generate_hospitals
from core.he.ckks import SECRET_CONTEXT_FILE, provision
from core.model.checkpoint import load_backbone
from simulations.run import (
    load_scenario,
    main,
    prepare_backbone,
    resolve_data_root,
    run_folder,
    run_scenario,
)


def test_data_root_is_honoured_and_no_phantoms_are_generated(tmp_path):
    mine = tmp_path / "my-sites"
    generate_hospitals(mine, HospitalSpec((PhantomSite("h1", "xr2d", 12, (16, 16)),)), seed=0)
    cache = tmp_path / "cache"
    root = resolve_data_root(load_scenario("default"), {"data-root": str(mine)}, cache)
    assert root == mine.resolve()
    assert not cache.exists()  # nothing generated


def test_a_folder_without_sites_is_an_error_naming_it(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        resolve_data_root(load_scenario("default"), {"data-root": str(empty)}, tmp_path / "c")
    for args in (["--data", str(empty)], ["--set", f'data-root="{empty}"']):
        assert main(["default", *args, "--data-cache", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        assert str(empty) in err and "dataset.json" in err
    assert not (tmp_path / "c").exists()


def test_own_sites_pretrain_the_backbone_on_their_training_images(tmp_path, capsys):
    """Without a backbone, the user's hospitals get one pretrained on their own unlabeled
    training images (not the phantom archive), cached by a digest of their datalists."""
    mine = tmp_path / "my-sites"
    spec = HospitalSpec(
        (PhantomSite("h1", "xr2d", 12, (16, 16)), PhantomSite("h2", "xr2d", 10, (16, 16)))
    )
    sites = [p.parent for p in generate_hospitals(mine, spec, seed=0)]
    training = sum(len(json.loads((s / "dataset.json").read_text())["training"]) for s in sites)
    scenario = load_scenario("default") | {"pretrain": {"steps": 2}}
    values: dict = {}
    prepare_backbone(scenario, values, tmp_path / "cache", sites)
    printed = capsys.readouterr().out
    assert f"pretraining micro on {training} images" in printed
    path = values["backbone"]
    assert "-data" in Path(path).parent.name
    assert f"fingerprint {load_backbone(path)[1][:12]}" in printed
    # Same sites: the cached backbone is reused, nothing pretrained again.
    again: dict = {}
    prepare_backbone(scenario, again, tmp_path / "cache", sites)
    assert again["backbone"] == path and "pretraining" not in capsys.readouterr().out
    # A changed datalist is another backbone.
    listing = json.loads((sites[0] / "dataset.json").read_text())
    listing["training"] = listing["training"][:-1]
    (sites[0] / "dataset.json").write_text(json.dumps(listing))
    changed: dict = {}
    prepare_backbone(scenario, changed, tmp_path / "cache", sites)
    assert changed["backbone"] != path
    assert f"pretraining micro on {training - 1} images" in capsys.readouterr().out


def test_a_bad_value_fails_before_any_data_is_generated(tmp_path, capsys):
    cache = tmp_path / "c"
    assert main(["default", "--set", "target-epsilon=-1", "--data-cache", str(cache)]) == 2
    assert "target" in capsys.readouterr().err
    assert not cache.exists()  # no phantoms generated, no backbone pretrained


def test_he_with_the_users_public_context_needs_each_sites_secret_in_its_state(tmp_path):
    """Given a public context, the runner provisions nothing: each simulated site must already
    hold its secret context where its ClientApp looks (state-root/<site>/). A missing one is
    named before any pretraining or process start; with all in place the run config carries
    only the public context."""
    mine = tmp_path / "my-sites"
    spec = HospitalSpec(
        (PhantomSite("h1", "xr2d", 12, (16, 16)), PhantomSite("h2", "xr2d", 10, (16, 16)))
    )
    generate_hospitals(mine, spec, seed=0)
    secret, public = provision(tmp_path / "keys")
    state = tmp_path / "state"
    (state / "h1").mkdir(parents=True)
    (state / "h1" / SECRET_CONTEXT_FILE).write_bytes(secret.read_bytes())
    overrides = {
        "data-root": str(mine),
        "state-root": str(state),
        "he": True,
        "he-public-context": str(public),
    }
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match=r"sites \['h2'\] have no site_secret.ctx"):
        run_scenario(
            load_scenario("default"),
            overrides=overrides,
            out_dir=tmp_path / "run",
            data_cache=cache,
            quiet=True,
        )
    assert not cache.exists()  # nothing pretrained


def test_out_dir_set_in_the_run_config_is_the_run_folder(tmp_path, capsys):
    """``--set out-dir=X`` was silently replaced by ``runs/<scenario>-<time>``."""
    scenario = load_scenario("default")
    overrides = {"out-dir": str(tmp_path / "mine")}
    assert run_folder(scenario, None, overrides) == tmp_path / "mine"
    assert "out-dir" not in overrides  # the runner writes the resolved folder itself
    same = {"out-dir": str(tmp_path / "mine")}
    assert run_folder(scenario, tmp_path / "mine", same) == tmp_path / "mine"
    assert run_folder(scenario, None, {"out-dir": 2024}) == Path("2024")  # a TOML integer
    assert run_folder(scenario, None, {"out-dir": "~/runs/x"}) == Path.home() / "runs" / "x"
    args = ["--out", str(tmp_path / "a"), "--set", f'out-dir="{tmp_path / "b"}"']
    assert main(["default", *args, "--data-cache", str(tmp_path / "c")]) == 2
    assert "name different run folders" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_a_scenario_builds_on_another(tmp_path):
    """``base = "default"``: the base scenario's tables, the file's keys on top (table by table),
    so a variant states only what differs (the "unseen" hospitals scenario)."""
    default = load_scenario("default")
    path = tmp_path / "variant.toml"
    path.write_text(
        'base = "default"\ndescription = "v"\n[phantoms]\npreset = "unseen"\n'
        "[run-config]\nnum-server-rounds = 2\n"
    )
    variant = load_scenario(str(path))
    assert variant["name"] == "variant" and variant["description"] == "v"
    assert variant["phantoms"] == default["phantoms"] | {"preset": "unseen"}
    assert variant["run-config"] == default["run-config"] | {"num-server-rounds": 2}
    assert variant["pretrain"] == default["pretrain"]
    assert "base" not in variant
    unseen = load_scenario("unseen")
    assert unseen["run-config"] == default["run-config"]  # the default recipe, unchanged
    assert unseen["phantoms"]["preset"] == "unseen"


def test_the_pretrain_visible_weight_names_its_backbone_and_bad_values_are_refused(tmp_path):
    """Backbones of different pretraining objectives never share a cache folder; 0 (SimMIM)
    keeps the folder name it had before the weight existed."""
    spec = HospitalSpec((PhantomSite("h1", "xr2d", 12, (16, 16)),))
    sites = [p.parent for p in generate_hospitals(tmp_path / "my-sites", spec, seed=0)]
    folders = {}
    for weight in (0.0, 0.3):
        scenario = load_scenario("default") | {"pretrain": {"steps": 1, "visible-weight": weight}}
        values: dict = {}
        prepare_backbone(scenario, values, tmp_path / "cache", sites)
        folders[weight] = Path(values["backbone"]).parent.name
    assert "-vis" not in folders[0.0] and "-vis0.3" in folders[0.3]
    for bad in (-1, "abc", True, float("nan")):
        scenario = load_scenario("default") | {"pretrain": {"steps": 1, "visible-weight": bad}}
        with pytest.raises(SystemExit, match="visible-weight must be a finite number"):
            prepare_backbone(scenario, {}, tmp_path / "cache", sites)
    with pytest.raises(SystemExit, match="the table takes"):
        prepare_backbone(
            load_scenario("default") | {"pretrain": {"visible_weight": 0.3}}, {}, tmp_path, sites
        )
