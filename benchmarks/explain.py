"""Do the explanations point at the lesion? Pointing game and in/out relevance, per site.

    python -m simulations.run default --out runs/explain-demo
    python -m benchmarks.explain --run runs/explain-demo [--split test] [--limit 40]

For every lesion-positive case of each site's split whose lesion mask (written by the phantom
generator, item field ``"mask"``) survives resampling to the model's grid, and for each method of
``core.explain`` plus two baselines (a random map, seeded; and the intensity-difference map
``|image - median(image)|`` averaged per token), it measures:

* pointing game: the most relevant token's patch contains a lesion voxel (hit rate);
* relevance ratio: mean relevance inside the lesion over mean relevance outside it.

It also times one overlay (explanation + PNG) per site. Prints a table and writes
``benchmarks/results/explain.json``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from client.explain import load_site_head
from core.adapters.lora import adapter_state, load_adapter_folder, load_adapter_state
from core.config import RunConfig
from core.data.datalist import read_datalist
from core.data.preprocess import GridConfig, pad_depth, resample_to_grid
from core.data.readers import read_image
from core.explain.overlay import render_overlay
from core.explain.relevance import (
    DEFAULT_METHOD,
    METHODS,
    explain,
    to_image_grid,
    token_grid,
    universal_vit,
)
from core.federation.rounds import open_split
from core.federation.runs import build_run_model
from core.federation.sites import list_sites
from core.io import write_json_atomic
from core.model.sac import degree_of_anisotropy

BASELINES = ("random", "intensity")
DEFAULT_OUT = Path("benchmarks/results/explain.json")


def mask_on_grid(path: Path, spacing_hint: Any, grid: GridConfig, depth: int) -> torch.Tensor:
    """The lesion mask on the model's grid (D, H, W) bool: read like an image, resampled like
    one (antialiased bilinear in-plane), thresholded at 0.5, centre-padded to ``depth``."""
    volume = read_image(path, spacing_hint)
    mask = torch.from_numpy(volume.array[:1]).float()  # (1, D, H, W)
    resampled, _ = resample_to_grid(mask, volume.spacing, grid)
    return pad_depth(resampled, depth)[0] >= 0.5


def token_footprints(mask: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(d, h, w) bool: the token's patch holds at least one lesion voxel."""
    d, h, w = grid
    D, H, W = mask.shape
    blocks = mask.reshape(d, D // d, h, H // h, w, W // w)
    return blocks.any(dim=5).any(dim=3).any(dim=1)


def intensity_map(image: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """|image - median(image)| averaged over each token's patch, (d, h, w)."""
    d, h, w = grid
    difference = (image[0] - image[0].median()).abs()  # (D, H, W)
    D, H, W = difference.shape
    return difference.reshape(d, D // d, h, H // h, w, W // w).mean(dim=(1, 3, 5))


def score(
    token_map: torch.Tensor, footprints: torch.Tensor, image_map: torch.Tensor, mask: torch.Tensor
) -> tuple[bool, float | None]:
    """(pointing-game hit, mean relevance inside the lesion / mean outside; None when nothing
    outside the lesion is relevant)."""
    hit = bool(footprints.flatten()[int(token_map.flatten().argmax())])
    inside, outside = image_map[mask].mean(), image_map[~mask].mean()
    return hit, (float(inside / outside) if float(outside) > 0 else None)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def benchmark_site(
    cfg: RunConfig,
    model: torch.nn.Module,
    site_dir: Path,
    split: str,
    limit: int | None,
    generator: torch.Generator,
) -> dict[str, Any]:
    dataset = open_split(cfg, site_dir, split)
    datalist = read_datalist(site_dir / "dataset.json", split)
    if len(dataset) != len(datalist.entries):
        raise SystemExit(f"{site_dir}: items were skipped; masks cannot be matched to items")
    grid_config = GridConfig(
        in_plane=(cfg.in_plane_size, cfg.in_plane_size), channels=cfg.in_channels
    )
    vit = universal_vit(model)
    hits: dict[str, list[bool]] = {m: [] for m in (*METHODS, *BASELINES)}
    ratios: dict[str, list[float | None]] = {m: [] for m in (*METHODS, *BASELINES)}
    render_seconds: float | None = None
    used = 0
    for index, entry in enumerate(datalist.entries):
        if limit is not None and used >= limit:
            break
        if int(entry.get("label", 0)) != 1 or "mask" not in entry:
            continue
        item = dataset[index]
        image, spacing = item["image"], item["spacing"]
        hint = tuple(entry["spacing"]) if "spacing" in entry else None
        mask = mask_on_grid(site_dir / entry["mask"], hint, grid_config, image.shape[1])
        if not mask.any():
            continue  # a lesion thinner than half a voxel of the model's grid
        used += 1
        da = degree_of_anisotropy(spacing.tolist())
        grid = token_grid(vit, image.shape[1:], da)
        footprints = token_footprints(mask, grid)
        for method in METHODS:
            result = explain(model, image, spacing, method=method)
            hit, ratio = score(result.token_map, footprints, result.image_map, mask)
            hits[method].append(hit)
            ratios[method].append(ratio)
        for name in BASELINES:
            if name == "random":
                token_map = torch.rand(grid, generator=generator)
            else:
                token_map = intensity_map(image, grid)
            image_map = to_image_grid(token_map, vit.config.patch_size, da)
            hit, ratio = score(token_map, footprints, image_map, mask)
            hits[name].append(hit)
            ratios[name].append(ratio)
        if render_seconds is None:
            with tempfile.TemporaryDirectory() as folder:
                started = time.perf_counter()
                result = explain(model, image, spacing, method=DEFAULT_METHOD)
                render_overlay(
                    image, result.image_map, Path(folder) / "case.png", spacing=spacing.tolist()
                )
                render_seconds = time.perf_counter() - started
    return {
        "cases": used,
        "overlay_seconds": render_seconds,
        "methods": {
            m: {
                "pointing_hit_rate": statistics.fmean(hits[m]) if hits[m] else None,
                "relevance_ratio_median": _median([r for r in ratios[m] if r is not None]),
            }
            for m in hits
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a plaintext run folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="positive cases per site")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=1)
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(arguments)
    torch.set_num_threads(args.threads)
    cfg, model, digest = build_run_model(args.run)  # refused unless the run's backbone
    load_adapter_folder(model, args.run / "adapters")
    generator = torch.Generator().manual_seed(0)
    sites = {}
    global_adapters = adapter_state(model)
    for name in list_sites(cfg):
        started = time.perf_counter()
        load_adapter_state(model, global_adapters)
        site_dir = Path(cfg.data_root) / name
        load_site_head(model, cfg, args.run / "state" / name, digest, site_dir)  # kept there
        sites[name] = benchmark_site(cfg, model, site_dir, args.split, args.limit, generator)
        sites[name]["seconds"] = time.perf_counter() - started
    methods = (*METHODS, *BASELINES)
    print(f"{'site':24s} {'cases':>5s} " + " ".join(f"{m:>16s}" for m in methods))
    for name, site in sites.items():
        cells = []
        for m in methods:
            entry = site["methods"][m]
            rate, ratio = entry["pointing_hit_rate"], entry["relevance_ratio_median"]
            shown = "-" if ratio is None else f"{ratio:.2f}"
            cells.append("-" if rate is None else f"{rate:.2f} ({shown})")
        print(f"{name:24s} {site['cases']:5d} " + " ".join(f"{c:>16s}" for c in cells))
    print("cells: pointing-game hit rate (median relevance inside/outside the lesion)")
    write_json_atomic(
        args.out,
        {
            "command": "python -m benchmarks.explain "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "run": str(args.run),
            "split": args.split,
            "model_size": cfg.model_size,
            "machine": platform.machine(),
            "threads": args.threads,
            "sites": sites,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
