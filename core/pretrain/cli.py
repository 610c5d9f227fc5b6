"""``python -m core.pretrain`` (``fedmedvit pretrain``)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from core.data import GridConfig
from core.data.datalist import SPLITS
from core.model.checkpoint import (
    FIRST_CHECKPOINT_FORMAT,
    load_backbone,
    read_backbone_metadata,
    tensors_digest,
)
from core.model.sizes import MODEL_SIZES
from core.pretrain.data import (
    open_pool,
)
from core.pretrain.loop import (
    pretrain,
)
from core.pretrain.settings import (
    PHANTOM_PRETRAIN_SEED,
    MIMSettings,
    PretrainError,
)
from core.training.loops import pick_device


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core.pretrain",
        description="Masked-image-modelling pretraining of the universal ViT on unlabeled images.",
    )
    parser.add_argument(
        "--data",
        nargs="*",
        default=None,
        help="folders (searched for dataset.json) or datalist files; omitted: generate phantom "
        "hospitals (the demo)",
    )
    parser.add_argument(
        "--splits",
        default=None,
        help="comma-separated splits to read (default: training; all for generated phantoms)",
    )
    parser.add_argument("--out", required=True, type=Path, help="backbone .safetensors to write")
    parser.add_argument("--size", default="micro", choices=sorted(MODEL_SIZES))
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--in-plane", type=int, default=64, help="in-plane grid size (x16)")
    parser.add_argument("--steps", type=int, default=1000, help="total optimizer steps")
    parser.add_argument("--batch-size", type=int, default=MIMSettings.batch_size)
    parser.add_argument("--lr", type=float, default=MIMSettings.learning_rate)
    parser.add_argument("--mask-ratio", type=float, default=MIMSettings.mask_ratio)
    parser.add_argument("--target-eps", type=float, default=MIMSettings.target_eps)
    parser.add_argument(
        "--visible-weight",
        type=float,
        default=MIMSettings.visible_weight,
        help="loss weight of visible tokens' reconstruction (0: masked tokens only, SimMIM)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (1 is fastest on a busy machine)"
    )
    parser.add_argument("--resume", type=Path, default=None, help="checkpoint to continue from")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="where to write resumable checkpoints (default: OUT with suffix .pretrain.pt)",
    )
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument(
        "--phantoms", type=Path, default=None, help="demo: keep generated phantoms in this folder"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; use --device auto or cpu")
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or args.out.with_suffix(".pretrain.pt")
    try:
        config = dataclasses.replace(MODEL_SIZES[args.size], in_channels=args.in_channels)
        grid = GridConfig(
            in_plane=(args.in_plane, args.in_plane),
            patch=config.patch_size,
            channels=args.in_channels,
        )
        settings = MIMSettings(
            mask_ratio=args.mask_ratio,
            visible_weight=args.visible_weight,
            target_eps=args.target_eps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            seed=args.seed,
        )
        with tempfile.TemporaryDirectory(prefix="pretrain-phantoms-") as scratch:
            if args.data is None:
                from core.data.phantoms import generate_hospitals

                folder = args.phantoms or Path(scratch)
                paths: list[Path] = generate_hospitals(
                    folder, "default", seed=PHANTOM_PRETRAIN_SEED, overwrite=True
                )
                splits = args.splits.split(",") if args.splits else list(SPLITS)
                print(f"generated {len(paths)} phantom sites in {folder} (labels ignored)")
            else:
                paths = [Path(p) for p in args.data]
                splits = args.splits.split(",") if args.splits else ["training"]
            pool = open_pool(paths, splits, grid=grid)
        counts = {da: pool.das.count(da) for da in sorted(set(pool.das))}
        print(
            f"pretraining {args.size} on {len(pool)} images (count per DA {counts}), "
            f"{args.steps} steps on {device}",
            flush=True,
        )
        outcome = pretrain(
            pool,
            out=args.out,
            config=config,
            settings=settings,
            steps=args.steps,
            device=device,
            resume=args.resume,
            checkpoint=checkpoint,
            checkpoint_every=args.checkpoint_every,
            log_every=args.log_every,
            log=lambda line: print(line, flush=True),
        )
    except (PretrainError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out} after {outcome.steps} steps in {outcome.seconds:.0f} s "
        f"(loss {outcome.first_loss:.3f} -> {outcome.last_loss:.3f}); checkpoint {checkpoint}"
    )
    print(f"fingerprint: {outcome.fingerprint}", flush=True)
    return 0


def datalists_digest(sites: Sequence[Path]) -> str:
    """SHA-256 over the site folders' names and ``dataset.json`` bytes, in sorted order: a
    cache key that changes when a site's datalist does (hex)."""
    digest = hashlib.sha256()
    for site in sorted(Path(p) for p in sites):
        digest.update(site.name.encode() + b"\0" + (site / "dataset.json").read_bytes() + b"\0")
    return digest.hexdigest()


def demo_backbone(
    cache: str | Path,
    *,
    size: str = "micro",
    steps: int = 1000,
    seed: int = 0,
    data: Sequence[Path] = (),
    visible_weight: float = MIMSettings.visible_weight,
) -> tuple[Path, str]:
    """The demo backbone: ``size`` pretrained for ``steps`` on unlabeled images, by default the
    phantom archive; with ``data`` (site folders, each with a ``dataset.json``) their training
    images instead, labels ignored. ``visible_weight``: :class:`MIMSettings`'s; a nonzero
    weight is part of the folder name (``-vis0.3``), so backbones of different objectives
    never share a folder.

    Built once under ``cache`` (a folder named by size, steps, seed and, with ``data``, a digest
    of the sites' datalists) and reused: the federated demo and the benchmarks start from it.
    Returns (path, fingerprint), the file checked against the fingerprint recorded when it was
    built. Raises PretrainError when pretraining fails (e.g. unreadable site images).
    """
    # "-ref": the file carries the head-input reference (core.model.reference); folders of
    # backbones built before it are not reused. The phantom archive's generator version too.
    tag = f"backbone-{size}-steps{steps}-seed{seed}-ref"
    if visible_weight:
        tag += f"-vis{float(visible_weight)!r}"
    if data:
        tag += f"-data{datalists_digest(data)[:12]}"
    else:
        from core.data.phantoms import PHANTOM_VERSION

        tag += f"-v{PHANTOM_VERSION}"
    folder = Path(cache) / tag
    out = folder / "backbone.safetensors"
    marker = folder / "fingerprint.txt"
    if not marker.is_file():
        started = time.perf_counter()
        args = ["--out", str(out), "--size", size, "--steps", str(steps), "--seed", str(seed)]
        args += ["--visible-weight", str(visible_weight)]
        if data:
            args += ["--data", *(str(site) for site in data)]
        code = main([*args, "--log-every", str(max(1, steps // 5))])
        if code:
            raise PretrainError(f"pretraining the demo backbone into {folder} failed (exit {code})")
        marker.write_text(load_backbone(out)[1] + "\n")
        print(f"pretrained the demo backbone in {time.perf_counter() - started:.0f} s", flush=True)
    recorded = marker.read_text().strip()
    config, _, file_format = read_backbone_metadata(out)
    if (
        file_format == FIRST_CHECKPOINT_FORMAT  # a cache from before the config was covered
        and config == MODEL_SIZES[size]
        and recorded == tensors_digest(load_file(str(out)))
    ):
        recorded = load_backbone(out)[1]
        marker.write_text(recorded + "\n")
    _, digest = load_backbone(out, expected_fingerprint=recorded)
    return out, digest
