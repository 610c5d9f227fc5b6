"""``python -m core.model.convert`` (``fedmedvit import``): a checkpoint -> a backbone file."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from core.model.checkpoint import save_backbone
from core.model.convert.common import IMAGENET_NORM, PretrainedImportError
from core.model.convert.mapping import FORMATS, import_checkpoint
from core.model.sizes import MODEL_SIZES


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.model.convert",
        description="Import a timm/EVA 2D ViT or a PUMIT checkpoint as a universal ViT backbone.",
    )
    parser.add_argument("--format", required=True, choices=tuple(FORMATS))
    parser.add_argument("--in", dest="source", required=True, type=Path, help="checkpoint file")
    parser.add_argument("--out", required=True, type=Path, help="backbone .safetensors to write")
    parser.add_argument(
        "--size", default=None, choices=sorted(MODEL_SIZES), help="default: from the weights"
    )
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument(
        "--input-norm",
        default="auto",
        choices=("auto", "none", "imagenet"),
        help="fold the source's input normalisation into the patch embedding (auto: the "
        "format's own, imagenet for pumit, as PUMIT pretrained on ImageNet-normalised input; "
        "none for timm)",
    )
    parser.add_argument(
        "--pos-grid", type=int, nargs=3, default=None, metavar=("D", "H", "W"), help="resample"
    )
    parser.add_argument(
        "--rope",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rotary embedding (default: off for timm, on for pumit)",
    )
    args = parser.parse_args(argv)
    input_norm = {
        "auto": FORMATS[args.format].default_input_norm,
        "none": None,
        "imagenet": IMAGENET_NORM,
    }[args.input_norm]
    try:
        model, report = import_checkpoint(
            args.source,
            format=args.format,
            size=args.size,
            in_channels=args.in_channels,
            input_norm=input_norm,
            pos_grid=args.pos_grid,
            rope=args.rope,
        )
    except PretrainedImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for key, why in report.ignored:
        print(f"ignored {key}: {why}")
    for note in report.notes:
        print(f"note: {note}")
    digest = save_backbone(model.float(), args.out)
    c = report.config
    print(
        f"wrote {args.out}: embed {c.embed_dim}, depth {c.depth}, heads {c.num_heads}, "
        f"in_channels {c.in_channels}, pos_grid {c.pos_grid}, rope {c.rope}"
    )
    print(f"fingerprint: {digest}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
