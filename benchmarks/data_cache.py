"""Data time per round at real CT size: uncached vs the site-local preprocessing cache.

``python -m benchmarks.data_cache [--volumes N] [--workers 1,2] [--folder DIR] [--out PATH]``

Writes a site of N CT volumes of hospital size (512 x 512 x 200 int16, 0.7 x 0.7 x 2.5 mm,
``.nii.gz`` through nibabel: an elliptic body of soft tissue, lungs and a bone ring in air, with
noise so it compresses like a scan rather than like zeros) and measures, in one run, side by
side:

* ``uncached``: ``open_site`` without a cache dir, i.e. what every round paid before the cache
  (decode, orient, window, resample every item); run before and after the first passes, the
  faster of the two reported (the machine is shared: background load only adds time);
* ``first_pass_w<k>``: ``open_site`` with an empty cache dir and ``workers=k`` (first-time
  preprocessing on k worker processes, spawn and import included; ``workers=1`` runs in this
  process);
* ``cached``: ``open_site`` with the warm cache dir (a later round or run: stat check and load);
* ``train``: one local epoch of the micro model (LoRA, plain, batch 4) on the site, so that the
  data share of a round is ``data / (data + train)`` for the uncached and the cached open.

The files were just written, so they sit in the page cache: the uncached numbers are decode
and preprocessing cost without disk reads, a lower bound for a cold disk.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from core.config import RunConfig
from core.data import GridConfig, open_site
from core.data.cache import entries_size
from core.federation.rounds import build_lora_model
from core.io import write_json_atomic
from core.training.loops import pick_device, train_plain

SHAPE = (512, 512, 200)  # (x, y, z) voxels as stored
SPACING = (0.7, 0.7, 2.5)  # mm
RESULTS = Path(__file__).parent / "results" / "data_cache.json"


def write_volume(path: Path, seed: int) -> None:
    """One synthetic abdominal CT, int16 HU."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, SHAPE[0]), np.linspace(-1, 1, SHAPE[1]), indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2
    slice_hu = np.full(SHAPE[:2], -1000.0)
    slice_hu[body < 1] = 40.0
    slice_hu[(body > 0.85) & (body < 0.95)] = 700.0  # ribs
    for cx in (-0.4, 0.4):
        slice_hu[((x - cx) / 0.25) ** 2 + (y / 0.35) ** 2 < 1] = -820.0  # lungs
    volume = np.repeat(slice_hu[:, :, None], SHAPE[2], axis=2)
    volume += rng.normal(0, 15, size=SHAPE).astype(np.float32)
    affine = np.diag([*SPACING, 1.0])
    nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), str(path))


def make_site(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(count):
        name = f"ct{i:04d}.nii.gz"
        if not (folder / name).exists():
            write_volume(folder / name, seed=i)
        items.append({"image": name, "label": i % 2})
    doc = {"name": "real-size-ct", "modality": "CT", "num_classes": 2, "training": items}
    (folder / "dataset.json").write_text(json.dumps(doc))
    return folder / "dataset.json"


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def run(volumes: int, workers: list[int], folder: Path) -> dict[str, Any]:
    grid = GridConfig(in_plane=(64, 64))
    start = time.perf_counter()
    datalist = make_site(folder / "site", volumes)
    generated = time.perf_counter() - start
    source_mb = sum(p.stat().st_size for p in (folder / "site").glob("*.nii.gz")) / 2**20

    t_uncached_before, site = timed(lambda: open_site(datalist, grid=grid))
    first: dict[str, float] = {}
    for k in workers:
        cache = folder / f"cache-w{k}"
        shutil.rmtree(cache, ignore_errors=True)
        first[f"first_pass_w{k}"], _ = timed(
            lambda c=cache, k=k: open_site(datalist, grid=grid, cache_dir=c, workers=k)
        )
    t_uncached_after, _ = timed(lambda: open_site(datalist, grid=grid))
    t_uncached = min(t_uncached_before, t_uncached_after)  # background load only adds time
    warm = folder / f"cache-w{workers[0]}"
    cached_runs = [
        timed(lambda: open_site(datalist, grid=grid, cache_dir=warm))[0] for _ in range(3)
    ]
    t_cached = min(cached_runs)

    cfg = RunConfig.from_flat({"in-plane-size": 64, "num-classes": 2, "batch-size": 4})
    model, _ = build_lora_model(cfg)
    generator = torch.Generator().manual_seed(0)
    t_train, _ = timed(
        lambda: train_plain(
            model, site, cfg.training(), device=pick_device("cpu"), generator=generator, amp=True
        )
    )
    result: dict[str, Any] = {
        "volumes": volumes,
        "shape_xyz": list(SHAPE),
        "spacing_mm": list(SPACING),
        "grid": [site.image_shape(da) for da in sorted(site.depth_by_da)],
        "source_mib": round(source_mb, 1),
        "cache_mib": round(entries_size(warm) / 2**20, 1),
        "generate_s": round(generated, 2),
        "uncached_s": round(t_uncached, 3),
        "uncached_runs_s": [round(t_uncached_before, 3), round(t_uncached_after, 3)],
        **{key: round(value, 3) for key, value in first.items()},
        "cached_s": round(t_cached, 4),
        "cached_runs_s": [round(t, 4) for t in cached_runs],
        "train_epoch_s": round(t_train, 3),
        "uncached_per_volume_s": round(t_uncached / volumes, 3),
        "cached_per_volume_ms": round(1000 * t_cached / volumes, 2),
        "data_share_uncached": round(t_uncached / (t_uncached + t_train), 3),
        "data_share_cached": round(t_cached / (t_cached + t_train), 4),
        "cache_speedup": round(t_uncached / t_cached, 1),
    }
    if len(workers) > 1:
        one, many = f"first_pass_w{workers[0]}", f"first_pass_w{workers[-1]}"
        result["first_pass_speedup"] = round(first[one] / first[many], 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=8, help="CT volumes in the site")
    parser.add_argument("--workers", default="1,2", help="worker counts for the first pass")
    parser.add_argument("--folder", type=Path, help="where the site and caches go (kept)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="data-cache-") as scratch:
        result = run(args.volumes, workers, args.folder or Path(scratch))
    result.update(
        command=" ".join(["python -m benchmarks.data_cache", *(argv or sys.argv[1:])]),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine={"cpus": os.cpu_count(), "python": platform.python_version()},
        load_average=os.getloadavg(),
    )
    write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
