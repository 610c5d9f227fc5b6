"""What adopting the PUMIT-B release costs: importing it, and a LoRA DP step on it.

``python -m benchmarks.pumit_import [--steps 6] [--out PATH]``

1. Import: a checkpoint in PUMIT-B's release layout (ViT-B 768/12/12, SwiGLU 2048 with sub-LN,
   3D patch kernel 16^3 over RGB, position grid 5x10x10, MIM head; random values, since the
   release cannot be downloaded here) is written as a Lightning-shaped ``.ckpt`` and converted by
   ``python -m core.model.convert --format pumit`` in a subprocess: wall time, the child's peak
   memory (``ru_maxrss`` of the waited child), file sizes.
2. Training: the imported PUMIT-B against our ViT-B (GELU 3072, our RoPE), both with LoRA r=8 FFA
   on q and v and a 2-class head, made private by Opacus (hooks, Poisson sampling, as
   ``benchmarks.model_throughput``): fixed batches of 2D 1x224x224 (2 images) and 3D
   1x64x128x128 (1 volume); steps interleaved, the order alternating; ratio of median steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.model_throughput import (
    INPUTS,
    LR,
    NUM_CLASSES,
    THREADS,
    Runner,
    _counts,
    _trainable,
    make_batch,
    make_private,
    median,
)

DEFAULT_OUT = Path("benchmarks/results/pumit_import.json")
E, DEPTH, HIDDEN, GRID = 768, 12, 2048, (5, 10, 10)  # PUMIT-B (conf/model/vit-b.yaml)
BATCH = {"2d": 2, "3d": 1}


def pumit_b_state(seed: int = 0) -> dict[str, Tensor]:
    """PUMIT-B's ``ViTForMIM.state_dict()`` names and shapes, random float32 values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    state = {
        "patch_embed.proj.weight": r(E, 3, 16, 16, 16),
        "patch_embed.proj.bias": r(E),
        "cls_token": r(1, 1, E),
        "pos_embed": r(1, E, *GRID),
        "norm.weight": 1 + r(E),
        "norm.bias": r(E),
        "mask_token": r(1, 1, E),
        "mim_head.0.weight": r(E, E),
        "mim_head.0.bias": r(E),
        "mim_head.2.weight": r(1024, E),
        "mim_head.2.bias": r(1024),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        for name, width in (("norm1", E), ("norm2", E), ("mlp.ffn_ln", HIDDEN)):
            state |= {f"{p}{name}.weight": 1 + r(width), f"{p}{name}.bias": r(width)}
        state |= {f"{p}attn.{n}_proj.weight": r(E, E) for n in "qkv"}
        state |= {f"{p}attn.q_bias": r(E), f"{p}attn.v_bias": r(E)}
        state |= {f"{p}attn.proj.weight": r(E, E), f"{p}attn.proj.bias": r(E)}
        for name, shape in (("w1", (HIDDEN, E)), ("w2", (HIDDEN, E)), ("w3", (E, HIDDEN))):
            state |= {f"{p}mlp.{name}.weight": r(*shape), f"{p}mlp.{name}.bias": r(shape[0])}
    return state


def measure_import(folder: Path) -> dict[str, Any]:
    ckpt, out = folder / "pumit.ckpt", folder / "pumit-b.safetensors"
    torch.save({"epoch": 0, "global_step": 300000, "state_dict": pumit_b_state()}, ckpt)
    command = [sys.executable, "-m", "core.model.convert", "--format", "pumit"]
    command += ["--in", str(ckpt), "--out", str(out)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"import failed:\n{done.stderr}")
    return {
        "command": " ".join(command[1:]),
        "seconds": seconds,
        "child_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "checkpoint_mib": ckpt.stat().st_size / 2**20,
        "backbone_mib": out.stat().st_size / 2**20,
        "printed": done.stdout.strip().splitlines()[-2:],
        "backbone": str(out),
    }


def lora_dp_runner(name: str, backbone: nn.Module, dims: str) -> Runner:
    from core.adapters.lora import add_lora
    from core.adapters.settings import LoraSettings

    torch.manual_seed(0)
    backbone.reset_head(NUM_CLASSES)  # type: ignore[operator]
    model = add_lora(backbone, LoraSettings(rank=8, targets="qv", mode="ffa")).train()  # type: ignore[arg-type]
    trainable, total = _counts(model)
    optimizer: torch.optim.Optimizer = torch.optim.SGD(_trainable(model), lr=LR, momentum=0.9)
    private, optimizer, _ = make_private(model, optimizer, dims, BATCH[dims])
    spacing = INPUTS[dims][1]

    def forward(x: Tensor) -> Tensor:
        return private(x.unsqueeze(2) if dims == "2d" else x, spacing)

    return Runner(name, private, optimizer, forward, trainable, total)


def time_training(backbone_path: str, steps: int) -> list[dict[str, Any]]:
    from core.model.checkpoint import load_backbone
    from core.model.vit import create_vit

    rows = []
    for dims in ("2d", "3d"):
        runners = [
            lora_dp_runner("pumit_b", load_backbone(backbone_path)[0], dims),
            lora_dp_runner("ours_vit_b", create_vit("base"), dims),
        ]
        x, y = make_batch(dims, BATCH[dims])
        times: dict[str, list[float]] = {r.name: [] for r in runners}
        for rep in range(steps + 1):  # the first repetition warms up
            for runner in runners if rep % 2 else runners[::-1]:
                seconds = runner.step(x, y)
                if rep:
                    times[runner.name].append(seconds)
            print(f"  {dims} rep {rep + 1}/{steps + 1}", file=sys.stderr, flush=True)
        row: dict[str, Any] = {"input": dims, "batch": BATCH[dims], "configs": {}}
        for runner in runners:
            row["configs"][runner.name] = {
                "step_seconds": times[runner.name],
                "median_step_seconds": median(times[runner.name]),
                "trainable_parameters": runner.trainable,
                "total_parameters": runner.total,
            }
        cfg = row["configs"]
        row["pumit_over_ours_step"] = (
            cfg["pumit_b"]["median_step_seconds"] / cfg["ours_vit_b"]["median_step_seconds"]
        )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pumit_import")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model and input")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        imported = measure_import(Path(tmp))
        print(
            f"import: {imported['seconds']:.1f} s, child peak RSS "
            f"{imported['child_peak_rss_mib']:.0f} MiB, checkpoint "
            f"{imported['checkpoint_mib']:.0f} MiB -> backbone {imported['backbone_mib']:.0f} MiB"
        )
        rows = time_training(imported.pop("backbone"), args.steps)
    for row in rows:
        cfg = row["configs"]
        print(
            f"{row['input']} batch {row['batch']}: LoRA DP step PUMIT-B "
            f"{cfg['pumit_b']['median_step_seconds']:.2f} s, ours ViT-B "
            f"{cfg['ours_vit_b']['median_step_seconds']:.2f} s -> "
            f"{row['pumit_over_ours_step']:.2f}x "
            f"(trainable {cfg['pumit_b']['trainable_parameters']:,} of "
            f"{cfg['pumit_b']['total_parameters']:,})"
        )
    result = {
        "import": imported,
        "training": rows,
        "threads": THREADS,
        "torch": torch.__version__,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
