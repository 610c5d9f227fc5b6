"""Training throughput of the universal ViT against MONAI's ViT, side by side, on CPU.

``python -m benchmarks.model_throughput [--quick] [--sizes tiny,base] [--out PATH]``

For every size (``tiny`` 192/12/3, ``base`` 768/12/12) and input (2D ``1x224x224``, 3D
``1x64x128x128`` at isotropic 1 mm) it times one training step (forward, cross-entropy on 2
classes, backward, AdamW step; fp32) of these configurations:

* ``ours_lora``: ``add_lora(create_vit(size), LoraSettings(rank=8, targets="qv",
  mode="vanilla"))``; backbone frozen, A, B and the head trainable.
* ``ours_full``: the same model, every parameter trainable.
* ``monai_lora``: ``monai.networks.nets.ViT`` of the same width, depth, heads, MLP width and
  patch 16 (conv patch embedding, learnable position embedding, classification head), with peft
  LoRA r=8 on ``qkv`` and ``out_proj`` and the head trainable. MONAI's attention has one fused
  ``qkv`` Linear, so LoRA on ``qkv`` (which adapts q, k and v through one shared A) is the closest
  equivalent of our q and v adapters; ``out_proj`` is included as the peer measurement did.
* ``monai_full``: MONAI's ViT, every parameter trainable.
* ``ours_lora_dp``: ``ours_lora`` made private by Opacus ``PrivacyEngine.make_private`` (hooks
  mode, Poisson sampling on, noise 1.0, clip 1.0).
* ``ours_lora_bf16`` (extra, not a target config): ``ours_lora`` under
  ``torch.autocast("cpu", dtype=torch.bfloat16)`` (fp32 weights and optimizer, bf16 matmuls), to
  show what mixed precision buys on a CPU with bf16 instructions. Every other config is fp32.

Interleaving: all models of a row live at once and each repetition runs one timed step of
every configuration, in an order rotated every repetition, so background load (colleagues' tests)
falls on all of them alike. Samples per second is ``batch / median(step seconds)``.

DP overhead, two ways. With Poisson sampling the batch size is random, so a per-step time is only
comparable at equal batch size. (1) Fixed batch: the private module and DP optimizer (configured
for Poisson sampling, expected batch = the row's batch) are fed the same fixed batch of the
expected size as the plain model; the ratio is ``median(DP step) / median(plain step)``.
(2) Paired Poisson batches: batches drawn from Opacus's Poisson ``DPDataLoader`` are each run
through the DP step and through the plain step (same batch, alternating order), and the ratio is
``sum(DP seconds) / sum(plain seconds)`` over the non-empty draws.

Peak memory: one subprocess per configuration (tiny), the RSS high-water mark (``VmHWM``) after
a few training steps; reported absolute and as the delta over the same process after imports and
input creation.

Over 500 lines: a benchmark script, each configuration's set-up next to the interleaved
timer that runs them all.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

THREADS = 2
NUM_CLASSES = 2
LORA_RANK = 8
LORA_ALPHA = 16
LR = 1e-4
DP_NOISE = 1.0
DP_CLIP = 1.0
DP_DATASET_BATCHES = 8  # DP loader dataset = 8 expected batches, so q = 1/8

# Batch size per measured size and input; the dimensions come from core.model.sizes.MODEL_SIZES.
SIZES: dict[str, dict[str, int]] = {"tiny": {"2d": 8, "3d": 4}, "base": {"2d": 2, "3d": 1}}
INPUTS: dict[str, tuple[tuple[int, ...], tuple[float, float, float]]] = {
    "2d": ((1, 224, 224), (1e4, 1.0, 1.0)),  # (C, H, W); ours sees (C, 1, H, W)
    "3d": ((1, 64, 128, 128), (1.0, 1.0, 1.0)),  # (C, D, H, W), isotropic
}
CONFIGS = ("ours_lora", "ours_full", "monai_lora", "monai_full", "ours_lora_dp", "ours_lora_bf16")
MEMORY_CONFIGS = ("ours_lora", "monai_lora", "ours_lora_dp", "ours_full", "monai_full")
DEFAULT_OUT = Path("benchmarks/results/model_throughput.json")
LORA_MODE = ["vanilla"]  # set from --lora-mode; "ffa" trains (and privatises) B only


# --------------------------------------------------------------------------------------------
# Models and training steps


class MonaiClassifier(nn.Module):
    """MONAI's ViT returns ``(logits, hidden_states)``; keep the logits."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: Tensor) -> Tensor:
        return self.vit(x)[0]


def build_ours(size: str, lora: bool, mode: str = "vanilla") -> nn.Module:
    from core.adapters.lora import add_lora
    from core.adapters.settings import LoraMode, LoraSettings
    from core.model.vit import create_vit

    torch.manual_seed(0)
    model = create_vit(size, num_classes=NUM_CLASSES)
    if lora:
        settings = LoraSettings(
            rank=LORA_RANK, alpha=LORA_ALPHA, targets="qv", mode=cast(LoraMode, mode)
        )
        return add_lora(model, settings)
    return model


def build_monai(size: str, dims: str, lora: bool) -> nn.Module:
    from monai.networks.nets import ViT

    from core.model.sizes import MODEL_SIZES

    spec = MODEL_SIZES[size]
    shape = INPUTS[dims][0]
    torch.manual_seed(0)
    vit = ViT(
        in_channels=shape[0],
        img_size=shape[1:],
        patch_size=16,
        hidden_size=spec.embed_dim,
        mlp_dim=int(spec.mlp_ratio * spec.embed_dim),
        num_layers=spec.depth,
        num_heads=spec.num_heads,
        proj_type="conv",
        pos_embed_type="learnable",
        classification=True,
        num_classes=NUM_CLASSES,
        spatial_dims=len(shape) - 1,
    )
    model = MonaiClassifier(vit)
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=["qkv", "out_proj"],
        modules_to_save=["classification_head"],
    )
    return get_peft_model(model, config)


@dataclass
class Runner:
    """One configuration: ``step(x, y)`` runs forward, loss, backward and optimizer step."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    forward: Callable[[Tensor], Tensor]
    trainable: int
    total: int
    bf16: bool = False

    def step(self, x: Tensor, y: Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.forward(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start


def _counts(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_runner(name: str, size: str, dims: str, batch: int) -> tuple[Runner, Any]:
    """Build one configuration; for ``ours_lora_dp`` also return Opacus's Poisson loader."""
    spacing = INPUTS[dims][1]
    loader = None
    if name.startswith("ours"):
        model = build_ours(size, name != "ours_full", LORA_MODE[0]).train()  # *_bf16: same
        trainable, total = _counts(model)
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(_trainable(model), lr=LR)
        if name == "ours_lora_dp":
            model, optimizer, loader = make_private(model, optimizer, dims, batch)
        net = model

        def forward(x: Tensor) -> Tensor:
            return net(x.unsqueeze(2) if dims == "2d" else x, spacing)

    else:
        model = build_monai(size, dims, lora=name == "monai_lora").train()
        trainable, total = _counts(model)
        optimizer = torch.optim.AdamW(_trainable(model), lr=LR)
        forward = model
    bf16 = name.endswith("_bf16")
    return Runner(name, model, optimizer, forward, trainable, total, bf16), loader


def make_private(
    model: nn.Module, optimizer: torch.optim.Optimizer, dims: str, batch: int
) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    from opacus import PrivacyEngine

    x, y = make_batch(dims, batch * DP_DATASET_BATCHES, seed=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure-RNG and accountant notices
        private, dp_optimizer, dp_loader = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=DP_NOISE,
            max_grad_norm=DP_CLIP,
            poisson_sampling=True,
            grad_sample_mode="hooks",
        )
    return private, dp_optimizer, dp_loader


def make_batch(dims: str, batch: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *INPUTS[dims][0], generator=generator)
    y = torch.arange(batch) % NUM_CLASSES
    return x, y


# --------------------------------------------------------------------------------------------
# Timing


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def time_row(size: str, dims: str, steps: int, warmup: int, poisson_steps: int) -> dict[str, Any]:
    batch = SIZES[size][dims]
    x, y = make_batch(dims, batch)
    runners: dict[str, Runner] = {}
    dp_loader = None
    for name in CONFIGS:
        runners[name], loader = make_runner(name, size, dims, batch)
        dp_loader = loader if loader is not None else dp_loader
    names = list(CONFIGS)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(warmup + steps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = runners[name].step(x, y)
            if rep >= warmup:
                times[name].append(seconds)
        print(f"  {size} {dims} rep {rep + 1}/{warmup + steps}", file=sys.stderr, flush=True)

    poisson = time_poisson(runners["ours_lora"], runners["ours_lora_dp"], dp_loader, poisson_steps)
    result: dict[str, Any] = {"size": size, "input": dims, "batch": batch, "configs": {}}
    for name in names:
        med = median(times[name])
        result["configs"][name] = {
            "step_seconds": times[name],
            "median_step_seconds": med,
            "min_step_seconds": min(times[name]),
            "samples_per_second": batch / med,
            "trainable_parameters": runners[name].trainable,
            "total_parameters": runners[name].total,
        }
    cfg = result["configs"]
    paired = [o / m for o, m in zip(times["monai_lora"], times["ours_lora"], strict=True)]
    dp_paired = [d / p for d, p in zip(times["ours_lora_dp"], times["ours_lora"], strict=True)]
    result["ratio_ours_lora_over_monai_lora"] = (
        cfg["ours_lora"]["samples_per_second"] / cfg["monai_lora"]["samples_per_second"]
    )
    result["ratio_ours_lora_over_monai_lora_paired_median"] = median(paired)
    result["ratio_ours_full_over_monai_full"] = (
        cfg["ours_full"]["samples_per_second"] / cfg["monai_full"]["samples_per_second"]
    )
    result["ratio_ours_lora_bf16_over_monai_lora"] = (
        cfg["ours_lora_bf16"]["samples_per_second"] / cfg["monai_lora"]["samples_per_second"]
    )
    result["dp_over_plain_fixed_batch"] = (
        cfg["ours_lora_dp"]["median_step_seconds"] / cfg["ours_lora"]["median_step_seconds"]
    )
    result["dp_over_plain_fixed_batch_paired_median"] = median(dp_paired)
    result["dp_poisson_paired"] = poisson
    del runners
    gc.collect()
    return result


def time_poisson(plain: Runner, dp: Runner, loader: Any, steps: int) -> dict[str, Any]:
    """Run DP and plain steps on the same Poisson-drawn batches; ratio of summed seconds."""
    sizes: list[int] = []
    dp_seconds: list[float] = []
    plain_seconds: list[float] = []
    draws = 0
    iterator: Iterator[Any] = iter(())
    while len(sizes) < steps and draws < 20 * max(steps, 1):
        try:
            xb, yb = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            continue
        draws += 1
        if len(xb) == 0:
            dp.step(xb, yb)  # Opacus supports empty Poisson batches; the plain model does not
            continue
        pair = [(dp, dp_seconds), (plain, plain_seconds)]
        for runner, sink in pair if len(sizes) % 2 == 0 else pair[::-1]:
            sink.append(runner.step(xb, yb))
        sizes.append(len(xb))
    total_dp, total_plain = sum(dp_seconds), sum(plain_seconds)
    return {
        "batch_sizes": sizes,
        "draws_including_empty": draws,
        "dp_step_seconds": dp_seconds,
        "plain_step_seconds": plain_seconds,
        "dp_seconds_per_sample": total_dp / max(sum(sizes), 1),
        "plain_seconds_per_sample": total_plain / max(sum(sizes), 1),
        "dp_over_plain": total_dp / total_plain if total_plain else float("nan"),
    }


# --------------------------------------------------------------------------------------------
# Peak memory, one subprocess per configuration


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def memory_worker(spec: str) -> None:
    """Child process: ``name:size:dims``; prints one JSON line with peak RSS.

    Peak is ``VmHWM`` (the RSS high-water mark of this process's address space), not
    ``getrusage().ru_maxrss``: Linux carries ``ru_maxrss`` over from the forking parent across
    ``exec``, so a child of a large benchmark process would report the parent's peak.
    """
    name, size, dims = spec.split(":")
    torch.set_num_threads(THREADS)
    import monai.networks.nets  # noqa: F401  (import cost counted in the baseline)
    import opacus  # noqa: F401
    import peft  # noqa: F401

    batch = SIZES[size][dims]
    x, y = make_batch(dims, batch)
    gc.collect()
    baseline = _status_mib("VmHWM")
    baseline_rss = _status_mib("VmRSS")
    runner, _ = make_runner(name, size, dims, batch)
    after_build = _status_mib("VmRSS")
    for _ in range(3):
        runner.step(x, y)
    peak = _status_mib("VmHWM")
    print(
        json.dumps(
            {
                "config": name,
                "size": size,
                "input": dims,
                "batch": batch,
                "baseline_hwm_mib": baseline,
                "baseline_rss_mib": baseline_rss,
                "rss_after_build_mib": after_build,
                "peak_hwm_mib": peak,
                "delta_mib": peak - baseline,
                "getrusage_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def measure_memory(size: str, inputs: list[str], configs: tuple[str, ...]) -> list[dict]:
    results = []
    for dims in inputs:
        for name in configs:
            spec = f"{name}:{size}:{dims}"
            print(f"  memory {spec}", file=sys.stderr, flush=True)
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.model_throughput",
                    "--memory-worker",
                    spec,
                    "--lora-mode",
                    LORA_MODE[0],
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                results.append({"config": name, "size": size, "input": dims, "error": proc.stderr})
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


# --------------------------------------------------------------------------------------------
# Profiling (diagnostics, not part of the JSON)


def profile(spec: str, steps: int) -> None:
    """``--profile size:dims``: torch.profiler op table for ours_lora and monai_lora."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    size, dims = spec.split(":")
    batch = SIZES[size][dims]
    x, y = make_batch(dims, batch)
    for name in ("ours_lora", "monai_lora", "ours_full", "monai_full"):
        runner, _ = make_runner(name, size, dims, batch)
        runner.step(x, y)
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            wall = [runner.step(x, y) for _ in range(steps)]
        print(f"\n=== {name} {size} {dims} batch {batch}: median step {median(wall):.3f} s")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))


# --------------------------------------------------------------------------------------------
# Report


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "config",
        "input",
        "batch",
        "ours LoRA sps",
        "ours full sps",
        "MONAI LoRA sps",
        "MONAI full sps",
        "ours/MONAI LoRA",
        "DP/plain fixed",
        "DP/plain Poisson",
        "ours LoRA bf16 sps (vs MONAI LoRA)",
    )
    lines = [header]
    for row in rows:
        c = row["configs"]
        lines.append(
            (
                row["size"],
                row["input"],
                str(row["batch"]),
                f"{c['ours_lora']['samples_per_second']:.2f}",
                f"{c['ours_full']['samples_per_second']:.2f}",
                f"{c['monai_lora']['samples_per_second']:.2f}",
                f"{c['monai_full']['samples_per_second']:.2f}",
                f"{row['ratio_ours_lora_over_monai_lora']:.2f}x",
                f"{row['dp_over_plain_fixed_batch']:.3f}x",
                f"{row['dp_poisson_paired']['dp_over_plain']:.3f}x",
                f"{c['ours_lora_bf16']['samples_per_second']:.2f} "
                f"({row['ratio_ours_lora_bf16_over_monai_lora']:.2f}x)",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def fmt(line: tuple[str, ...]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(lines[0]), rule, *(fmt(line) for line in lines[1:])])


def format_memory(memory: list[dict[str, Any]]) -> str:
    lines = [
        "| config | input | batch | peak RSS (VmHWM) MiB | delta over baseline MiB |",
        "|---|---|---|---|---|",
    ]
    for m in memory:
        if "error" in m:
            lines.append(f"| {m['config']} | {m['input']} | - | error | error |")
            continue
        lines.append(
            f"| {m['config']} | {m['input']} | {m['batch']} | {m['peak_hwm_mib']:.0f} | "
            f"{m['delta_mib']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, tiny only")
    parser.add_argument("--sizes", default=None, help="comma list of sizes (default tiny,base)")
    parser.add_argument("--inputs", default="2d,3d", help="comma list of 2d,3d")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2)")
    parser.add_argument("--poisson-steps", type=int, default=None, help="paired DP steps")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--lora-mode",
        choices=("vanilla", "ffa"),
        default="vanilla",
        help="our LoRA mode: vanilla trains A and B (like peft on MONAI); ffa trains B only",
    )
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--profile", default=None, metavar="SIZE:DIMS", help="op profile only")
    args = parser.parse_args(argv)

    torch.set_num_threads(THREADS)
    LORA_MODE[0] = args.lora_mode
    # Opacus's hooks on a frozen-input first layer: expected, harmless, printed every row.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if args.memory_worker:
        memory_worker(args.memory_worker)
        return
    if args.profile:
        profile(args.profile, args.steps or 3)
        return

    sizes = (args.sizes or ("tiny" if args.quick else "tiny,base")).split(",")
    inputs = args.inputs.split(",")
    for s in sizes:
        if s not in SIZES:
            parser.error(f"unknown size {s!r}; choose from {sorted(SIZES)}")
    for d in inputs:
        if d not in INPUTS:
            parser.error(f"unknown input {d!r}; choose from {sorted(INPUTS)}")
    steps = args.steps or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    poisson_steps = args.poisson_steps if args.poisson_steps is not None else steps

    started = time.perf_counter()
    load_before = os.getloadavg()
    rows = []
    for size in sizes:
        for dims in inputs:
            rows.append(time_row(size, dims, steps, warmup, poisson_steps))
    load_after_timing = os.getloadavg()
    memory: list[dict[str, Any]] = []
    if not args.no_memory and "tiny" in sizes:
        configs = ("ours_lora", "monai_lora") if args.quick else MEMORY_CONFIGS
        memory = measure_memory("tiny", inputs, configs)
    elapsed = time.perf_counter() - started

    import monai
    import opacus
    import peft

    report = {
        "benchmark": "model_throughput",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(
            ["python", "-m", "benchmarks.model_throughput", *(argv or sys.argv[1:])]
        ),
        "quick": args.quick,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "monai": monai.__version__,
            "peft": peft.__version__,
            "opacus": opacus.__version__,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "loadavg_before": load_before,
            "loadavg_after_timing": load_after_timing,
        },
        "settings": {
            "dtype": "float32",
            "timed_steps": steps,
            "warmup_steps": warmup,
            "poisson_paired_steps": poisson_steps,
            "optimizer": f"AdamW lr={LR}",
            "loss": f"cross_entropy, {NUM_CLASSES} classes",
            "lora": {
                "rank": LORA_RANK,
                "alpha": LORA_ALPHA,
                "ours_mode": args.lora_mode,
                "ours_targets": "q_proj, v_proj + head (vanilla: A and B trained; ffa: B only)",
                "monai_targets": "qkv, out_proj (peft) + classification_head",
            },
            "dp": {
                "noise_multiplier": DP_NOISE,
                "max_grad_norm": DP_CLIP,
                "grad_sample_mode": "hooks",
                "poisson_sampling": True,
                "sample_rate": 1 / DP_DATASET_BATCHES,
            },
            "interleaving": "one step of every config per repetition, order rotated each rep",
        },
        "rows": rows,
        "memory_tiny": memory,
        "wall_seconds": elapsed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(rows))
    if memory:
        print()
        print(format_memory(memory))
    print(f"\nwall time {elapsed:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
