"""The runner runs on the user's own site folders (issue 14: ``--set data-root=/my/sites`` was
silently replaced by phantoms), and a folder without sites is a clear error before any run."""

from __future__ import annotations

import pytest

from core.config import ConfigError
from core.data import HospitalSpec, PhantomSite, generate_hospitals
from simulations.run import load_scenario, main, resolve_data_root


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
