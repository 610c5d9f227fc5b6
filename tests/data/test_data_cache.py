"""The site-local preprocessing cache: real NIfTI files on disk, the real reader counted (a
wrapper that calls it), hits without decoding, invalidation on a changed file or setting, a
corrupt entry rebuilt, a size bound, and nothing written outside the folder the caller gives."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

import core.data.cache as cache_module
import core.data.dataset as dataset_module
from core.config import RunConfig
from core.data import DatasetError, GridConfig, IntensityConfig, open_site
from core.data.cache import ENTRY_SUFFIX, CacheError, PreprocessCache, entries_size
from core.federation.rounds import open_split

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = GridConfig(in_plane=(32, 32))


def write_ct(path: Path, seed: int, shape: tuple[int, int, int] = (40, 40, 6)) -> None:
    """An int16 HU volume, 0.8 x 0.8 x 3 mm, RAS affine."""
    data = np.random.default_rng(seed).integers(-1000, 1500, size=shape, dtype=np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 3.0, 1.0])), str(path))


def make_site(folder: Path, count: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(count):
        write_ct(folder / f"ct{i}.nii.gz", seed=i)
        items.append({"image": f"ct{i}.nii.gz", "label": i % 2})
    doc = {"modality": "CT", "num_classes": 2, "training": items}
    (folder / "dataset.json").write_text(json.dumps(doc))
    return folder / "dataset.json"


class CountingReader:
    """Wraps the real ``read_image``: counts the files it decodes, by name."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.names: list[str] = []

    def __call__(self, path: Path, *args: Any) -> Any:
        self.names.append(path.name)
        return self.real(path, *args)


@pytest.fixture
def reader(monkeypatch: pytest.MonkeyPatch) -> CountingReader:
    counter = CountingReader(dataset_module.read_image)
    monkeypatch.setattr(dataset_module, "read_image", counter)
    return counter


def images(site: Any) -> list[torch.Tensor]:
    return [site[i]["image"] for i in range(len(site))]


def test_each_file_is_decoded_once_across_open_training_and_later_opens(
    tmp_path: Path, reader: CountingReader
) -> None:
    datalist = make_site(tmp_path / "site")
    cache = tmp_path / "state" / "preprocess-cache"
    reference = open_site(datalist, grid=GRID)  # no cache dir: the old path, decoded here
    assert len(reader.names) == 4
    reader.names.clear()

    first = open_site(datalist, grid=GRID, cache=False, cache_dir=cache, workers=1)
    assert sorted(reader.names) == [f"ct{i}.nii.gz" for i in range(4)]  # pixel data once
    for got, want in zip(images(first), images(reference), strict=True):  # training reads
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(first.spacings, reference.spacings)
    assert len(reader.names) == 4, "reading items of a cached site decoded a file again"

    again = open_site(datalist, grid=GRID, cache_dir=cache, workers=1)  # a later round
    assert len(reader.names) == 4, "a cache hit decoded the file"
    for got, want in zip(images(again), images(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert again.labels.tolist() == [0, 1, 0, 1]  # labels come from the datalist


def test_a_cached_open_looks_each_source_up_once(
    tmp_path: Path, reader: CountingReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round that finds everything cached stats each source once and decodes nothing (it
    looked each up twice: once to see what to fill, again to load it)."""
    datalist = make_site(tmp_path / "site")
    cache = tmp_path / "cache"
    want = images(open_site(datalist, grid=GRID, cache_dir=cache, workers=1))
    looked_up: list[str] = []
    real = cache_module.stat_signature

    def counting(source: Path) -> str:
        looked_up.append(source.name)
        return real(source)

    monkeypatch.setattr(cache_module, "stat_signature", counting)
    reader.names.clear()
    got = images(open_site(datalist, grid=GRID, cache_dir=cache, workers=1))
    assert sorted(looked_up) == [f"ct{i}.nii.gz" for i in range(4)]
    assert reader.names == []
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_entries_of_the_old_format_are_removed_and_nothing_else(
    tmp_path: Path, reader: CountingReader
) -> None:
    """Format-1 ``<sha256>.pt`` entries are unreachable after the format change; left in place
    they would sit outside the size bound forever. Any other file stays."""
    datalist = make_site(tmp_path / "site", count=2)
    cache = tmp_path / "cache"
    want = images(open_site(datalist, grid=GRID, cache_dir=cache, workers=1))
    old = cache / "entries" / ("0" * 64 + ".pt")
    torch.save({"version": 1, "image": torch.zeros(1, 6, 32, 32)}, old)
    users = cache / "entries" / "model_final.pt"
    users.write_text("not ours")
    reader.names.clear()
    got = images(open_site(datalist, grid=GRID, cache_dir=cache, workers=1))
    assert not old.exists() and reader.names == []
    assert users.read_text() == "not ours"
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_lazy_site_reads_a_source_changed_after_the_open(
    tmp_path: Path, reader: CountingReader
) -> None:
    """With ``cache=False`` each read looks the source up again: an entry found at open must
    not be served after the file changed."""
    datalist = make_site(tmp_path / "site", count=2)
    cache = tmp_path / "cache"
    open_site(datalist, grid=GRID, cache_dir=cache, workers=1)
    lazy = open_site(datalist, grid=GRID, cache=False, cache_dir=cache, workers=1)
    write_ct(tmp_path / "site" / "ct0.nii.gz", seed=99)
    fresh = open_site(datalist, grid=GRID)  # no cache: straight from the files
    torch.testing.assert_close(lazy[0]["image"], fresh[0]["image"], rtol=0, atol=0)


def test_cached_images_do_not_map_the_cache_files(tmp_path: Path) -> None:
    """A site's images are copies in memory: a mapped entry would keep an evicted file's disk
    space and kill the process (SIGBUS) if the file were rewritten in place."""
    datalist = make_site(tmp_path / "site", count=2)
    cache = tmp_path / "cache"
    grid = GridConfig(in_plane=(256, 256))  # entries of 1.5 MiB, which safetensors maps
    open_site(datalist, grid=grid, cache_dir=cache, workers=1)
    site = open_site(datalist, grid=grid, cache_dir=cache, workers=1)
    maps = Path("/proc/self/maps").read_text()
    assert str(cache / "entries") not in maps
    assert len(site) == 2


def test_a_changed_file_is_rebuilt_and_a_touched_one_is_not(
    tmp_path: Path, reader: CountingReader
) -> None:
    datalist = make_site(tmp_path / "site")
    cache = tmp_path / "cache"
    before = images(open_site(datalist, grid=GRID, cache_dir=cache, workers=1))
    reader.names.clear()

    write_ct(tmp_path / "site" / "ct2.nii.gz", seed=99)  # same name, new content
    now = os.stat(tmp_path / "site" / "ct1.nii.gz").st_mtime + 100
    os.utime(tmp_path / "site" / "ct1.nii.gz", (now, now))  # new mtime, same bytes
    after = images(open_site(datalist, grid=GRID, cache_dir=cache, workers=1))
    assert reader.names == ["ct2.nii.gz"]
    assert not torch.equal(after[2], before[2])
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)
    uncached = open_site(datalist, grid=GRID)
    torch.testing.assert_close(after[2], images(uncached)[2], rtol=0, atol=0)


@pytest.mark.parametrize(
    "settings",
    [
        {"grid": GridConfig(in_plane=(48, 48))},
        {"grid": GRID, "intensity": IntensityConfig(ct_window=(-1000.0, 1000.0))},
    ],
    ids=["grid", "intensity"],
)
def test_a_changed_setting_misses(
    tmp_path: Path, reader: CountingReader, settings: dict[str, Any]
) -> None:
    datalist = make_site(tmp_path / "site", count=2)
    cache = tmp_path / "cache"
    open_site(datalist, grid=GRID, cache_dir=cache, workers=1)
    reader.names.clear()
    changed = images(open_site(datalist, cache_dir=cache, workers=1, **settings))
    assert len(reader.names) == 2
    torch.testing.assert_close(changed, images(open_site(datalist, **settings)), rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "garbage"])
def test_a_corrupt_entry_is_rebuilt(
    tmp_path: Path, reader: CountingReader, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    datalist = make_site(tmp_path / "site", count=2)
    cache = tmp_path / "cache"
    want = images(open_site(datalist, grid=GRID, cache_dir=cache, workers=1))
    entry = sorted((cache / "entries").glob("*.safetensors"))[0]
    raw = bytearray(entry.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "flipped":  # inside the tensor's bytes, which follow the JSON header
        raw[len(raw) - 2000] ^= 0xFF
    else:
        raw = bytearray(b"not a safetensors file")
    entry.write_bytes(bytes(raw))
    reader.names.clear()
    with caplog.at_level(logging.WARNING, logger="core.data.cache"):
        got = images(open_site(datalist, grid=GRID, cache_dir=cache, workers=1))
    assert len(reader.names) == 1
    assert "corrupt cache entry" in caplog.text and entry.name in caplog.text
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_file_corrupted_after_caching_is_named_at_open(
    tmp_path: Path, reader: CountingReader
) -> None:
    datalist = make_site(tmp_path / "site", count=3)
    cache = tmp_path / "cache"
    open_site(datalist, grid=GRID, cache_dir=cache, workers=1)
    bad = tmp_path / "site" / "ct1.nii.gz"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated in place
    with pytest.raises(DatasetError, match=r"ct1\.nii\.gz") as raised:
        open_site(datalist, grid=GRID, cache_dir=cache, workers=1)
    assert raised.value.path == bad
    site = open_site(datalist, grid=GRID, cache_dir=cache, workers=1, on_error="skip")
    assert [s.path for s in site.skipped] == [bad] and len(site) == 2


def test_worker_processes_match_one_process_and_name_bad_files(tmp_path: Path) -> None:
    datalist = make_site(tmp_path / "site", count=4)
    (tmp_path / "site" / "ct3.nii.gz").write_bytes(b"\x1f\x8b broken")
    serial = open_site(datalist, grid=GRID, on_error="skip")
    pooled = open_site(datalist, grid=GRID, cache_dir=tmp_path / "c", workers=2, on_error="skip")
    assert [s.path.name for s in pooled.skipped] == ["ct3.nii.gz"]
    assert [s.reason for s in pooled.skipped] == [s.reason for s in serial.skipped]
    torch.testing.assert_close(images(pooled), images(serial), rtol=0, atol=0)


def test_one_core_still_preprocesses_a_large_site_in_a_worker_process(
    tmp_path: Path, reader: CountingReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default on one core: a worker, whose kept heap this process cannot have (the counting
    reader lives in this process only, so a decode here would be counted)."""
    datalist = make_site(tmp_path / "site", count=3)
    monkeypatch.setattr(dataset_module, "_POOL_MIN_BYTES", 0)  # the tiny site counts as large
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    site = open_site(datalist, grid=GRID, cache_dir=tmp_path / "cache")
    assert reader.names == [] and len(site) == 3
    open_site(datalist, grid=GRID, cache_dir=tmp_path / "other", workers=1)
    assert len(reader.names) == 3  # workers=1 still means this process


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or not Path("/proc/self/statm").exists(),
    reason="the worker tunes glibc's malloc; RSS read from /proc",
)
def test_a_worker_keeps_the_pages_of_a_freed_volume_for_the_next() -> None:
    script = """
import os
import numpy as np
from core.data.dataset import _worker_init

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

_worker_init()
before = resident()
volume = np.ones(256 * 2**20, dtype=np.uint8)  # touched: every page resident
del volume
print(resident() - before)
"""
    kept = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    ).stdout
    assert int(kept) >= 200 * 2**20  # glibc's default unmaps it on free: about 0 kept


def test_nothing_is_written_outside_the_cache_folder(tmp_path: Path) -> None:
    datalist = make_site(tmp_path / "site", count=2)
    cache = tmp_path / "state" / "site-a" / "preprocess-cache"

    def tree() -> dict[Path, tuple[int, int]]:
        return {
            p: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()
        }

    before = tree()
    open_site(datalist, grid=GRID, cache_dir=cache, workers=1)
    write_ct(tmp_path / "site" / "ct0.nii.gz", seed=5)
    before[tmp_path / "site" / "ct0.nii.gz"] = tree()[tmp_path / "site" / "ct0.nii.gz"]
    open_site(datalist, grid=GRID, cache_dir=cache, workers=1)
    after = tree()
    changed = {p for p in after if before.get(p) != after[p]}
    assert changed and all(p.is_relative_to(cache) for p in changed)
    assert all(p in after for p in before)  # nothing outside was removed


def test_the_size_bound_evicts_old_entries_and_refuses_an_entry_too_big(tmp_path: Path) -> None:
    datalist = make_site(tmp_path / "site", count=4)
    cache = tmp_path / "cache"
    one = 32 * 32 * 6 * 4 + 4096  # an entry's tensor bytes plus the allowance store() adds
    site = open_site(datalist, grid=GRID, cache_dir=cache, workers=1, cache_max_bytes=2 * one)
    assert len(site) == 4
    assert 0 < entries_size(cache) <= 2 * one
    assert len(list((cache / "entries").glob("*.safetensors"))) <= 2
    with pytest.raises(CacheError, match=re.escape(str(cache / "x"))):
        open_site(datalist, grid=GRID, cache_dir=cache / "x", workers=1, cache_max_bytes=1000)
    with pytest.raises(ValueError, match="max_bytes"):
        PreprocessCache(cache, {}, max_bytes=0)


def test_a_short_disk_is_a_clear_error_naming_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk check is real (``shutil.disk_usage`` of the folder's disk); the reserve it keeps
    free is raised beyond this disk's free space, which is what a short disk looks like."""
    import shutil

    import core.data.cache as cache_module

    datalist = make_site(tmp_path / "site", count=2)
    cache = tmp_path / "state" / "preprocess-cache"
    monkeypatch.setattr(cache_module, "DISK_RESERVE_BYTES", shutil.disk_usage(tmp_path).free)
    with pytest.raises(CacheError, match=re.escape(str(cache))) as raised:
        open_site(datalist, grid=GRID, cache_dir=cache, workers=1, on_error="skip")
    assert "the disk is short" in str(raised.value) and "Fix:" in str(raised.value)
    assert not list((cache / "entries").glob("*.safetensors"))


def test_open_split_passes_the_site_cache_dir(tmp_path: Path, reader: CountingReader) -> None:
    make_site(tmp_path / "site", count=2)
    cfg = RunConfig.from_flat({"in-plane-size": 32, "num-classes": 2})
    cache = tmp_path / "state" / "preprocess-cache"
    first = open_split(cfg, tmp_path / "site", "training", cache)
    second = open_split(cfg, tmp_path / "site", "training", cache)
    assert len(reader.names) == 2 and entries_size(cache) > 0
    torch.testing.assert_close(images(first), images(second), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_real_simulation_keeps_each_sites_cache_in_its_state_folder(tmp_path: Path) -> None:
    """Flower's real Simulation Engine, 2 sites, 2 rounds: every ClientApp process (a new one
    per message) fills and reuses ``<state-root>/<site>/preprocess-cache`` and writes nothing
    of it elsewhere."""
    from simulations.run import load_scenario, run_scenario

    scenario = load_scenario("default") | {"phantoms": {"preset": "many", "n-sites": 2}}
    scenario.pop("pretrain", None)
    state = tmp_path / "state"
    overrides = {
        "num-server-rounds": 2,
        "model-size": "micro",
        "in-plane-size": 32,
        "batch-size": 8,
        "min-train-nodes": 2,
        "backbone": "",
        "state-root": str(state),
    }
    out = tmp_path / "run"
    run_scenario(
        scenario, overrides=overrides, out_dir=out, data_cache=tmp_path / "data", quiet=True
    )
    sites = sorted(p.parent.name for p in (tmp_path / "data").glob("*/*/dataset.json"))
    assert len(sites) == 2
    for site in sites:
        assert entries_size(state / site / "preprocess-cache") > 0
    pattern = f"entries/*{ENTRY_SUFFIX}"
    strays = [p for root in (out, tmp_path / "data") for p in root.rglob(pattern)]
    assert not strays
