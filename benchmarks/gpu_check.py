"""One-command GPU check: correctness against the CPU, a DP simulation on the GPU, throughput.

``python -m benchmarks.gpu_check [--quick] [--skip-simulation] [--out PATH]``

On a machine with CUDA, in about 5 minutes:

1. ``grad_samples``: Opacus per-sample gradients of the LoRA parameters (micro model, 3D batch of
   4 at mixed spacing) on the GPU against the CPU, same weights and inputs; passes within
   ``rtol=1e-3, atol=1e-5`` (fp32; TF32 matmuls are switched off for the check).
2. ``dp_step``: one DP-SGD step (per-sample clipping at 0.05, so every sample is clipped;
   noise 0 so both devices must land on the same weights) on both devices; the updated trainable
   parameters must agree within the same tolerance.
3. ``simulation``: a real Flower simulation (local SuperLink, ``flwr run``) of 2 phantom sites,
   2 rounds, DP-SGD, ``device=cuda``, each simulated node given half a GPU; wall time.
4. ``sites_per_gpu``: peak GPU memory of one site's training round (``train_round`` on one
   phantom site, micro, DP) and how many such sites fit the GPU's memory at once.
5. ``throughput``: training samples/s of our LoRA model for micro, tiny and base, 2D
   (1x224x224) and 3D (1x64x128x128), plain fp32, bf16 autocast (outside the per-sample
   gradient path) and DP-SGD (Opacus hooks, fp32), median of timed steps after warm-up.

Without CUDA it prints that, writes ``{"cuda": false, ...}`` and exits 0 (a test runs this).
JSON goes to ``benchmarks/results/gpu_check.json``; the exit code is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn

from core.adapters.lora import add_lora
from core.adapters.settings import LoraSettings
from core.io import write_json_atomic
from core.model.vit import create_vit

RESULTS = Path(__file__).parent / "results" / "gpu_check.json"
RTOL, ATOL = 1e-3, 1e-5
SIZES = ("micro", "tiny", "base")
# (C, D, H, W) input and (d, h, w) mm spacing; 2D images are D == 1 at the 2D depth spacing
INPUTS: dict[str, tuple[tuple[int, int, int, int], tuple[float, float, float]]] = {
    "2d": ((1, 1, 224, 224), (1e4, 1.0, 1.0)),
    "3d": ((1, 64, 128, 128), (1.0, 1.0, 1.0)),
}
BATCH = {"micro": {"2d": 16, "3d": 8}, "tiny": {"2d": 16, "3d": 8}, "base": {"2d": 8, "3d": 2}}


def lora_model(size: str, seed: int = 0) -> nn.Module:
    """Our ViT with LoRA r=8 on q and v, head trainable, seeded (same weights everywhere)."""
    torch.manual_seed(seed)
    return add_lora(create_vit(size, num_classes=2), LoraSettings(rank=8, targets="qv"))


def _inputs(shape: tuple[int, ...], batch: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=generator), torch.arange(batch) % 2


def grad_samples(device: torch.device) -> dict[str, Tensor]:
    """Per-sample gradients (name -> (N, *shape)) of the trainable parameters, on CPU."""
    model = lora_model("micro").to(device)
    private = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    x, y = _inputs((1, 16, 32, 32), 4)
    spacing = torch.tensor([[2.0, 1.0, 1.0]] * 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' full-backward-hook notice
        loss = nn.functional.cross_entropy(private(x.to(device), spacing.to(device)), y.to(device))
        loss.backward()
    out = {
        name: p.grad_sample.detach().cpu()  # type: ignore[attr-defined]
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    private._close()
    return out


def dp_step(device: torch.device) -> dict[str, Tensor]:
    """Trainable parameters after one clipped, noiseless DP-SGD step, on CPU."""
    model = lora_model("micro").to(device)
    private = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=0.5),
        noise_multiplier=0.0,
        max_grad_norm=0.05,
        expected_batch_size=4,
        loss_reduction="mean",
    )
    x, y = _inputs((1, 16, 32, 32), 4, seed=1)
    spacing = torch.tensor([[2.0, 1.0, 1.0]] * 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = nn.functional.cross_entropy(private(x.to(device), spacing.to(device)), y.to(device))
        loss.backward()
        optimizer.step()
    private._close()
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def compare(
    reference: dict[str, Tensor], other: dict[str, Tensor], *, min_changed: bool = False
) -> dict[str, Any]:
    """Largest absolute and relative differences; ``ok`` when all are within tolerance."""
    worst_abs = worst_rel = 0.0
    ok = reference.keys() == other.keys()
    for name, want in reference.items():
        got = other[name]
        diff = (got - want).abs()
        worst_abs = max(worst_abs, float(diff.max()))
        worst_rel = max(worst_rel, float((diff / want.abs().clamp_min(ATOL)).max()))
        ok = ok and torch.allclose(got, want, rtol=RTOL, atol=ATOL)
    return {"ok": ok, "max_abs": worst_abs, "max_rel": worst_rel, "tensors": len(reference)}


def cpu_vs(device: torch.device) -> dict[str, Any]:
    """Checks 1 and 2: ``device`` against the CPU."""
    cpu = torch.device("cpu")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return {
            "grad_samples": compare(grad_samples(cpu), grad_samples(device)),
            "dp_step": compare(dp_step(cpu), dp_step(device)),
        }
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_fn(
    size: str, dims: str, mode: str, device: torch.device
) -> tuple[Callable[[], None], int]:
    """One training step of ``mode`` (plain, bf16, dp) and its batch size."""
    batch = BATCH[size][dims]
    shape, mm = INPUTS[dims]
    model = lora_model(size).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=1e-4)
    net: nn.Module = model
    if mode == "dp":
        net = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=batch,
            loss_reduction="mean",
        )
    x, y = (t.to(device) for t in _inputs(shape, batch))
    spacing = torch.tensor([mm] * batch, dtype=torch.float64, device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
            logits = net(x, spacing)
        nn.functional.cross_entropy(logits.float(), y).backward()
        optimizer.step()

    return step, batch


def throughput(device: torch.device, steps: int, warmup: int) -> list[dict[str, Any]]:
    rows = []
    for size in SIZES:
        for dims in INPUTS:
            for mode in ("plain", "bf16", "dp"):
                step, batch = step_fn(size, dims, mode, device)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for _ in range(warmup):
                        step()
                    times = []
                    for _ in range(steps):
                        _sync(device)
                        start = time.perf_counter()
                        step()
                        _sync(device)
                        times.append(time.perf_counter() - start)
                seconds = statistics.median(times)
                rows.append(
                    {
                        "size": size,
                        "dims": dims,
                        "mode": mode,
                        "batch": batch,
                        "step_s": seconds,
                        "samples_per_s": batch / seconds,
                    }
                )
                print(f"  {size:5} {dims} {mode:5} {batch / seconds:8.1f} samples/s", flush=True)
                del step
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def sites_per_gpu(device: torch.device, data_root: Path) -> dict[str, Any]:
    """Peak GPU memory of one DP training round of one phantom site, and sites that fit."""
    from core.config import RunConfig
    from core.federation.rounds import initial_adapters, train_round

    site = sorted(p.parent for p in data_root.glob("*/dataset.json"))[0]
    values = {"data-root": str(data_root), "model-size": "micro", "batch-size": 8}
    cfg = RunConfig.from_flat(values | {"device": "cuda", "dp": True, "target-epsilon": 8.0})
    adapters, digest = initial_adapters(cfg)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    outcome = train_round(
        cfg,
        site_dir=site,
        global_adapters=adapters,
        server_round=1,
        expected_fingerprint=digest,
        ledger_state=None,
        dp_seed=1,
    )
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device)
    total = torch.cuda.get_device_properties(device).total_memory
    return {
        "status": outcome.status,
        "round_s": seconds,
        "peak_mib": peak / 2**20,
        "gpu_mib": total / 2**20,
        # each simulated node also holds a CUDA context (about 300-500 MiB) besides its tensors
        "sites_fit": int(total // (peak + 500 * 2**20)),
    }


def simulation(data_root: Path, out_dir: Path) -> dict[str, Any]:
    """A real 2-site, 2-round DP Flower simulation with ``device=cuda``."""
    from simulations.flower_cli import flwr_run, local_superlink
    from simulations.run import ROOT

    values = {
        "data-root": str(data_root),
        "out-dir": str(out_dir),
        "num-server-rounds": 2,
        "model-size": "micro",
        "dp": True,
        "target-epsilon": 8.0,
        "batch-size": 8,
        "device": "cuda",
    }
    federation = {
        "num-supernodes": 2,
        "client-resources-num-cpus": 1,
        "client-resources-num-gpus": 0.5,  # both simulated nodes on the one GPU
    }
    start = time.perf_counter()
    with local_superlink() as link:
        run_id = flwr_run(link.env, ROOT, "local", run_config=values, federation_config=federation)
    return {"run_id": str(run_id), "wall_s": time.perf_counter() - start, "ok": True}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        print("no CUDA device here (torch.cuda.is_available() is False): nothing to check")
        return {"cuda": False}
    from core.data.phantoms import generate_hospitals

    device = torch.device("cuda")
    result: dict[str, Any] = {"cuda": True, "gpu": torch.cuda.get_device_name(device)}
    started = time.perf_counter()
    result["checks"] = cpu_vs(device)
    print(f"CPU vs GPU: {json.dumps(result['checks'])}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        data_root = Path(scratch) / "sites"
        generate_hospitals(data_root, "many", seed=0, n_sites=2)
        result["sites_per_gpu"] = sites_per_gpu(device, data_root)
        print(f"one site's round: {json.dumps(result['sites_per_gpu'])}", flush=True)
        if not args.skip_simulation:
            result["simulation"] = simulation(data_root, Path(scratch) / "run")
            print(f"simulation: {json.dumps(result['simulation'])}", flush=True)
    steps, warmup = (3, 1) if args.quick else (10, 3)
    result["throughput"] = throughput(device, steps, warmup)
    result["wall_s"] = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed steps instead of 10")
    parser.add_argument("--skip-simulation", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = run(args)
    given = sys.argv[1:] if argv is None else argv
    result |= {
        "command": " ".join(["python -m benchmarks.gpu_check", *given]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    write_json_atomic(args.out, result)
    checks = result.get("checks", {})
    return 0 if all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
