"""Federated lesion segmentation on phantom hospitals, per site, side by side in one run.

    python -m benchmarks.segmentation [--rounds 10] [--seeds 3] [--arms ...] [--out FILE]

Sites: the ``segmentation`` phantom preset (1 mm CT, 2.5 mm CT, 5 mm MR, 2D X-ray; 120
training, 40 validation, 40 test cases each, half with a lesion), on a 32 x 32 in-plane grid.
Arms, each scored on every site's test split (Dice over images with a lesion, HD95 in mm):

* ``unet-central``: a small MONAI ``UNet`` (3D convs, in-plane strides only, so 2D images and
  thick slices fit one network), pooled training data of all sites, non-private.
* ``ours-central``: our model (demo backbone + LoRA + SAC decoder), pooled, non-private.
* ``local-dp``: each site alone, DP-SGD at epsilon 8 over the same rounds.
* ``fl-dp``: the federation, DP-SGD at epsilon 8 at every site, FFA LoRA; adapters, decoder
  and head averaged (``head-sharing = "shared"``).
* ``fl-dp-local``: the same, but each site keeps its own decoder and head (``head-sharing =
  "local"``, FedPer): only the LoRA adapters are averaged.

Centralized arms train ``rounds`` epochs; DP arms ``rounds`` rounds of ``local-epochs``. The DP
and FL arms run in-process through ``core.federation.rounds.train_round`` / ``evaluate_round``
(what the ClientApp calls) with the server's example-weighted average. Also counted from the
wire format (``adapter_state``): upload per site per round vs the full model at ``base`` size.
A PNG of predicted masks over images (the FL arm with local decoders, seed 0) goes next to the
JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.federated import Pooled, federated_round, site_test_metrics
from core.adapters.lora import adapter_state, load_adapter_state
from core.config import RunConfig
from core.data.phantoms import PHANTOM_VERSION, generate_hospitals
from core.federation.local_head import LocalHead, with_local_head
from core.federation.rounds import (
    build_lora_model,
    initial_adapters,
    open_task_split,
)
from core.federation.sites import list_sites
from core.model.vit import count_parameters
from core.training.loops import pick_device, train_plain
from core.training.segmentation import evaluate_segmentation, predict_masks, segmentation_loss
from core.training.settings import TrainSettings
from simulations.run import load_scenario, parse_set, prepare_backbone

RESULTS = Path(__file__).parent / "results"
ARMS = ("unet-central", "ours-central", "local-dp", "fl-dp", "fl-dp-local")
CPU = torch.device("cpu")


class SpacingBlind(nn.Module):
    """A plain network called like ours: ``forward(x, spacing)`` ignores the spacing."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, spacing: Tensor) -> Tensor:
        return self.net(x)


def monai_unet() -> nn.Module:
    from monai.networks.nets import UNet

    net = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=(8, 16, 32, 64),
        strides=((1, 2, 2), (1, 2, 2), (1, 2, 2)),  # depth kept: 2D images and 5 mm MR fit
        num_res_units=1,
        norm="instance",
    )
    return SpacingBlind(net)


def evaluate_sites(model: nn.Module, cfg: RunConfig, sites: list[Path]) -> dict[str, Any]:
    return {
        site.name: evaluate_segmentation(
            model,
            open_task_split(cfg, site, "test"),
            num_classes=cfg.num_classes,
            batch_size=cfg.max_physical_batch,
            device=CPU,
        )
        for site in sites
    }


def run_central(cfg: RunConfig, sites: list[Path], *, unet: bool) -> dict[str, Any]:
    """Non-private training on all sites' pooled training splits, ``rounds`` epochs."""
    torch.manual_seed(cfg.seed)
    model = monai_unet() if unet else build_lora_model(cfg)[0]
    pooled = Pooled([open_task_split(cfg, s, "training") for s in sites])
    settings = TrainSettings(
        local_epochs=cfg.num_server_rounds,
        batch_size=8,
        learning_rate=cfg.learning_rate if not unet else 3e-3,
        optimizer="adamw",
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    criterion = segmentation_loss()
    train_plain(model, pooled, settings, device=CPU, generator=generator, criterion=criterion)
    return evaluate_sites(model, cfg, sites)


def run_rounds(
    cfg: RunConfig, sites: list[Path], *, seed_base: int
) -> tuple[dict[str, Any], dict[str, nn.Module]]:
    """``rounds`` rounds of DP-SGD at every site, weighted average (one site: local-only);
    per site its test metrics and its final model (the global adapters, with its own decoder
    and head under head-sharing "local")."""
    global_state, fingerprint = initial_adapters(cfg)
    ledgers: dict[Path, Any] = {}
    heads: dict[Path, LocalHead] = {}
    for server_round in range(1, cfg.num_server_rounds + 1):
        global_state = federated_round(
            cfg, sites, global_state, fingerprint, ledgers, server_round, seed_base, heads
        )
    per_site = site_test_metrics(cfg, sites, global_state, fingerprint, heads)
    models = {}
    for site in sites:
        ledger = ledgers.get(site)
        per_site[site.name]["epsilon"] = ledger["rounds"][-1]["epsilon"] if ledger else 0.0
        head = heads[site].tensors if site in heads else None
        models[site.name], _ = build_lora_model(cfg)
        load_adapter_state(models[site.name], with_local_head(cfg, global_state, head))
    return per_site, models


def upload_counts(values: Mapping[str, Any], size: str) -> dict[str, Any]:
    """Wire-format values of one site's upload vs the full model's parameters."""
    cfg = RunConfig.from_flat(dict(values) | {"model-size": size, "backbone": ""})
    model, _ = build_lora_model(cfg)
    wire = adapter_state(model)
    upload = sum(t.numel() for t in wire.values())
    base = model.get_base_model()  # type: ignore[operator]
    full = count_parameters(base, lambda n: "lora_" not in n and "original_module" not in n)
    return {
        "size": size,
        "upload_values": upload,
        "upload_bytes_fp32": 4 * upload,
        "full_model_values": full,
        "upload_over_full": upload / full,
        "lora_mode": cfg.lora_mode,
        "decoder_features": cfg.decoder_features,
    }


def overlay_png(
    models: Mapping[str, nn.Module], cfg: RunConfig, sites: list[Path], out: Path, title: str
) -> Path:
    """Per site (its model by name), one lesion test case: image, truth contour (green),
    prediction (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sites), figsize=(3.2 * len(sites), 3.4))
    for ax, site in zip(np.atleast_1d(axes), sites, strict=True):
        model, split = models[site.name], open_task_split(cfg, site, "test")
        cases = predict_masks(model, split, batch_size=8, device=CPU)
        case = max(cases, key=lambda c: int(c["truth"].sum()))  # the largest lesion
        depth = int(case["truth"].flatten(1).sum(dim=1).argmax())
        image = case["image"][0, depth].numpy()
        truth, pred = case["truth"][depth].numpy(), case["pred"][depth].numpy()
        ax.imshow(image, cmap="gray")
        ax.imshow(np.ma.masked_where(pred == 0, pred), cmap="autumn", alpha=0.45)
        ax.contour(truth, levels=[0.5], colors="lime", linewidths=1.0)
        ax.set_title(f"{site.name}\nslice {depth}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{title}: prediction (red) and truth (green outline)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _stats(values: list[float]) -> dict[str, Any]:
    finite = [v for v in values if np.isfinite(v)]
    return {
        "mean": statistics.fmean(finite) if finite else None,
        "sd": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "n": len(finite),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm and site: mean and sd over seeds of Dice, HD95 and empty-case accuracy."""
    table: dict[str, Any] = {}
    for run in runs:
        for site, metrics in run["sites"].items():
            entry = table.setdefault(run["arm"], {}).setdefault(site, {})
            for key in ("dice", "hd95", "empty-correct"):
                entry.setdefault(key, []).append(float(metrics[key]))
    return {
        arm: {site: {k: _stats(v) for k, v in m.items()} for site, m in sites.items()}
        for arm, sites in table.items()
    }


def merge(files: list[Path], out: Path) -> int:
    """One document from several (seeds split over processes): runs concatenated."""
    documents = [json.loads(f.read_text()) for f in files]
    merged = dict(documents[0])
    merged["runs"] = [run for doc in documents for run in doc["runs"]]
    merged["table"] = summarize(merged["runs"])
    merged["seeds"] = len({run["seed"] for run in merged["runs"]})
    merged["commands"] = [doc.get("command") for doc in documents]
    merged["upload"] = next((d["upload"] for d in documents if d.get("upload")), [])
    out.write_text(json.dumps(merged, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="split seeds over processes")
    parser.add_argument("--merge", nargs="+", type=Path, help="merge result files into --out")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--cache", type=Path, default=Path("phantom_data"))
    parser.add_argument("--out", type=Path, default=RESULTS / "segmentation.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-upload", action="store_true", help="no base-size count")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.merge:
        return merge(args.merge, args.out)
    arms = [a for a in args.arms.split(",") if a]
    unknown = set(arms) - set(ARMS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}; choose from {ARMS}")

    scenario = load_scenario("segmentation")
    spec = scenario["phantoms"]
    root = args.cache / f"segmentation-alpha{spec['alpha']}-seed{spec['seed']}-v{PHANTOM_VERSION}"
    if not (root / "hospitals.json").is_file():
        generate_hospitals(root, "segmentation", seed=spec["seed"], alpha=spec["alpha"])
    base_values = dict(scenario["run-config"])
    prepare_backbone(scenario, base_values, args.cache)  # the scenario's [pretrain] table
    base_values |= {"num-server-rounds": args.rounds, "data-root": str(root.resolve())}
    base_values |= parse_set(args.set)
    sites = [root / name for name in list_sites(RunConfig.from_flat(base_values))]
    runs: list[dict[str, Any]] = []
    started_all = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        values = base_values | {"seed": seed, "backbone-seed": seed}
        for arm in arms:
            started = time.perf_counter()
            if arm in ("unet-central", "ours-central"):
                cfg = RunConfig.from_flat(
                    values | {"dp": False, "optimizer": "adamw", "learning-rate": 0.003}
                )
                per_site = run_central(cfg, sites, unet=arm == "unet-central")
            elif arm == "local-dp":
                cfg = RunConfig.from_flat(
                    values | {"min-train-nodes": 1, "head-sharing": "shared"}
                )  # one site: its decoder is its own either way
                per_site = {}
                for index, site in enumerate(sites):
                    alone, _ = run_rounds(cfg, [site], seed_base=1_000 * seed + 10 * index)
                    per_site |= alone
            else:
                sharing = "local" if arm == "fl-dp-local" else "shared"
                cfg = RunConfig.from_flat(values | {"head-sharing": sharing})
                per_site, models = run_rounds(cfg, sites, seed_base=1_000 * seed)
                if seed == 0 and arm == "fl-dp-local":  # the README picture
                    png = overlay_png(
                        models, cfg, sites, args.out.with_name("segmentation-overlay.png"),
                        f"FL, DP epsilon {cfg.target_epsilon:g}, {cfg.num_server_rounds} rounds, "
                        "local decoders",
                    )  # fmt: skip
                    print(f"  overlay: {png}", flush=True)
            seconds = time.perf_counter() - started
            dice = {s: round(m["dice"], 3) for s, m in per_site.items()}
            print(f"seed {seed} {arm} ({seconds:.0f} s): dice {dice}", flush=True)
            runs.append({"arm": arm, "seed": seed, "seconds": seconds, "sites": per_site})
            partial = {"runs": runs, "table": summarize(runs)}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(partial, indent=1) + "\n")

    upload = [] if args.skip_upload else [upload_counts(base_values, s) for s in ("micro", "base")]
    for count in upload:
        print(f"upload ({count['size']}): {count['upload_values']} values, "
              f"1/{1 / count['upload_over_full']:.0f} of the model", flush=True)  # fmt: skip
    document = {
        "command": "python -m benchmarks.segmentation " + " ".join(argv or sys.argv[1:]),
        "run_config": base_values,
        "arms": arms,
        "seeds": args.seeds,
        "seconds": time.perf_counter() - started_all,
        "device": str(pick_device("cpu")),
        "threads": args.threads,
        "upload": upload,
        "table": summarize(runs),
        "runs": runs,
    }
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
