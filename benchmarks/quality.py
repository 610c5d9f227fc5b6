"""Learning quality per site: does the federated ViT learn what a small CNN learns, under DP?

    python -m benchmarks.quality [--rounds 10] [--seeds 3] [--arms cnn,central,...] [--quick]

Every arm is evaluated the same way at every phantom site: ROC AUC on the site's test split,
and balanced accuracy, sensitivity and specificity at the decision threshold the site picks on
its own validation split (:func:`core.training.loops.calibrate_threshold`). Arms:

* ``cnn``: a MONAI ResNet (basic blocks [1, 1, 1, 1], widths 16-128), centralized per
  modality (the CT site, the MR site, both X-ray sites pooled), non-private, Adam.
* ``central``: the run-config recipe (LoRA on the demo backbone), all training splits pooled,
  non-private, ``rounds`` epochs.
* ``local-dp``: each site alone, DP-SGD at epsilon 8 over ``rounds`` rounds (what a site gets
  without the federation).
* ``fl``: federated, non-private; ``fl-dp8`` / ``fl-dp3``: federated, DP at epsilon 8 / 3;
  all three share the head (run config ``head-sharing = "shared"``).
* ``fl-dp8-shared+local``: as ``fl-dp8``, and each site adds the scores of a personal head it
  keeps (FedRoD-style, the run config's default for a classifier, ``head-sharing =
  "shared+local"``).
* ``fl-dp8-local-head``: as ``fl-dp8``, but each site keeps its own head (FedPer,
  ``head-sharing = "local"``): only the LoRA adapters are averaged.

* ``cnn-local-dp`` / ``cnn-fl-dp8``: the CNN under the privacy the ViT arms get: each site
  alone, or federated (FedAvg of the whole CNN), DP-SGD at epsilon 8 with the run config's
  training settings; GroupNorm for BatchNorm (:func:`small_resnet`). ``cnn-local``: the
  same network and settings, each site alone, without DP (what the noise costs it).

The ``central`` and ``local-dp`` arms train one head (``head-sharing = "shared"``'s model):
with one site there is nothing to personalise.

The federated arms run in-process with the recipe's pieces (``build_lora_model``,
``train_plain`` / ``train_dp`` with the site's ``plan_dp`` plan, the server's example-weighted
average) on datasets opened once; the Flower path is exercised by the simulation tests. Writes
``benchmarks/results/quality.json`` and prints a per-site table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets.resnet import ResNetBlock
from torch import Tensor, nn

from benchmarks.federated import Pooled, weighted_average
from core.adapters.lora import adapter_state, load_adapter_state
from core.config import RunConfig
from core.data import DABatchSampler, SiteDataset, collate
from core.data.phantoms import PHANTOM_VERSION, generate_hospitals
from core.federation.local_head import local_part
from core.federation.rounds import build_lora_model, open_split
from core.federation.sites import list_sites
from core.pretrain.cli import demo_backbone
from core.pretrain.settings import MIMSettings
from core.privacy.plan import plan_dp
from core.training.loops import (
    DPStepPlan,
    binary_scores,
    calibrate_threshold,
    metrics_from_logits,
    predict,
    rates_at_threshold,
    train_dp,
    train_plain,
)
from simulations.run import parse_set

RESULTS = Path(__file__).parent / "results" / "quality.json"
CPU = torch.device("cpu")
SPLITS = ("training", "validation", "test")
ARMS = (
    "cnn",
    "central",
    "local-dp",
    "fl",
    "fl-dp8",
    "fl-dp8-shared+local",
    "fl-dp8-local-head",
    "fl-dp3",
    "cnn-local",
    "cnn-local-dp",
    "cnn-fl-dp8",
)
# head-sharing of each federated arm
FEDERATED_ARMS = {
    "fl": "shared",
    "fl-dp8": "shared",
    "fl-dp8-shared+local": "shared+local",
    "fl-dp8-local-head": "local",
    "fl-dp3": "shared",
}
Sites = dict[str, dict[str, SiteDataset]]


def site_metrics(validation: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]) -> dict[str, Any]:
    """Test AUC, and test rates at the threshold calibrated on the validation logits/labels."""
    threshold = calibrate_threshold(binary_scores(validation[0]), validation[1])
    logits, labels = test
    rates = rates_at_threshold(binary_scores(logits), labels, threshold)
    auc = metrics_from_logits(logits, labels, multi_label=False)["auc"]
    return {"auc": auc, **rates, "threshold": threshold}


def evaluate_sites(model: nn.Module, data: Sites, names: list[str]) -> dict[str, dict[str, Any]]:
    return {
        name: site_metrics(
            predict(model, data[name]["validation"], batch_size=32, device=CPU),
            predict(model, data[name]["test"], batch_size=32, device=CPU),
        )
        for name in names
    }


# ------------------------------------------------------------------------------- ViT arms


def run_central(cfg: RunConfig, data: Sites) -> dict[str, dict[str, Any]]:
    model, _ = build_lora_model(cfg)
    pooled = Pooled([split["training"] for split in data.values()])
    settings = cfg.training()
    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.num_server_rounds):
        train_plain(model, pooled, settings, device=CPU, generator=generator)
    return evaluate_sites(model, data, list(data))


def _local_update(
    cfg: RunConfig, model: nn.Module, dataset: SiteDataset, round_seed: int
) -> dict[str, Tensor]:
    """One site's round from the adapters loaded in ``model``: plain or DP-SGD at the site's
    plan (noise calibrated for ``cfg.planned_rounds`` rounds at ``cfg.target_epsilon``)."""
    _train_round(cfg, model, dataset, round_seed)
    return adapter_state(model)


def _round_seed(cfg: RunConfig, site_index: int, server_round: int) -> int:
    """The seed of one site's round: distinct per run seed, site and round."""
    return (cfg.seed * 1_000 + site_index) * 1_000_003 + server_round


def _train_round(cfg: RunConfig, model: nn.Module, dataset: SiteDataset, round_seed: int) -> None:
    """One round of local training of ``model``'s trainable parameters with the run config's
    settings and DP plan (the site's training loop without its policy checks and ledger)."""
    settings = cfg.training()
    generator = torch.Generator().manual_seed(round_seed)
    torch.manual_seed(round_seed * 7_919 % 2**63)
    if not cfg.dp:
        train_plain(model, dataset, settings, device=CPU, generator=generator)
        return
    plan = plan_dp(
        cfg.privacy(),
        dataset_size=len(dataset),
        batch_size=settings.batch_size,
        local_epochs=settings.local_epochs,
        planned_rounds=cfg.planned_rounds,
    )
    step_plan = DPStepPlan(
        plan.noise_multiplier, cfg.max_grad_norm, plan.sample_rate, plan.steps_per_round
    )
    train_dp(model, dataset, settings, step_plan, device=CPU, generator=generator)


def run_federated(cfg: RunConfig, data: Sites) -> dict[str, dict[str, Any]]:
    """FedAvg over the sites; the part each site keeps under ``cfg.head_sharing``
    (:func:`core.federation.local_head.local_part`: the whole head under "local", the personal
    read-out under "shared+local") is neither averaged nor sent."""
    model, _ = build_lora_model(cfg)
    global_state = adapter_state(model)
    names = list(data)
    kept = {name: local_part(cfg, global_state) for name in names}
    for server_round in range(1, cfg.num_server_rounds + 1):
        updates = []
        for index, name in enumerate(names):
            load_adapter_state(model, global_state | kept[name])
            seed = _round_seed(cfg, index, server_round)
            train = data[name]["training"]
            update = _local_update(cfg, model, train, seed)
            kept[name] = local_part(cfg, update)
            updates.append((update, len(train)))
        global_state = weighted_average(updates)
    out = {}
    for name in names:
        load_adapter_state(model, global_state | kept[name])
        out |= evaluate_sites(model, data, [name])
    return out


def run_local(cfg: RunConfig, data: Sites) -> dict[str, dict[str, Any]]:
    """Each site alone: its own rounds of local training, nothing shared."""
    out = {}
    for index, name in enumerate(data):
        model, _ = build_lora_model(cfg)
        for server_round in range(1, cfg.num_server_rounds + 1):
            seed = _round_seed(cfg, index, server_round)
            _local_update(cfg, model, data[name]["training"], seed)
        out |= evaluate_sites(model, data, [name])
    return out


# ------------------------------------------------------------------------------- CNN arm


def small_resnet(*, private: bool = False) -> nn.Module:
    """MONAI ResNet with one basic block per stage, widths 16-128 (about 0.9M parameters),
    a 3^3 stride-2 stem (MONAI's default 7^3 stride-1 stem costs ~10x the compute at 64^2).

    ``private``: the same network for DP-SGD: GroupNorm for BatchNorm, which mixes the
    examples of a batch (Opacus's ``ModuleValidator.fix``; MONAI 1.6.1's ResNet passes its
    ``norm`` argument to the stem only), and no in-place ReLU or residual add (Opacus's backward
    hooks forbid modifying a hooked layer's output in place).
    """
    from monai.networks.nets import ResNet
    from opacus.validators import ModuleValidator

    if private:
        network = ResNet(block=_OutOfPlaceBlock, act=("relu", {"inplace": False}), **_RESNET_SHAPE)
        return ModuleValidator.fix(network)
    return ResNet(block="basic", **_RESNET_SHAPE)


class _OutOfPlaceBlock(ResNetBlock):
    """MONAI's basic block without in-place ReLU or residual add (for Opacus)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs | {"act": ("relu", {"inplace": False})})

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        residual = x if self.downsample is None else self.downsample(x)
        return self.act(out + residual)


_RESNET_SHAPE: dict[str, Any] = {
    "layers": [1, 1, 1, 1],
    "block_inplanes": [16, 32, 64, 128],
    "spatial_dims": 3,
    "n_input_channels": 1,
    "conv1_t_size": 3,
    "conv1_t_stride": 2,
    "num_classes": 2,
}


def _cnn_predict(model: nn.Module, dataset: Any) -> tuple[Tensor, Tensor]:
    return predict(_IgnoreSpacing(model), dataset, batch_size=32, device=CPU)


class _IgnoreSpacing(nn.Module):
    """Adapts a plain CNN to the (image, spacing) call of the training loops."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor, spacing: Tensor) -> Tensor:
        return self.model(image)


def run_cnn(seed: int, data: Sites, epochs: int) -> dict[str, dict[str, Any]]:
    """One CNN per modality, trained on that modality's pooled training splits (Adam 1e-3,
    batch 16, ``epochs`` epochs), evaluated per site."""
    groups: dict[str, list[str]] = {}
    for name, splits in data.items():
        modality = splits["training"].items[0].modality
        groups.setdefault(modality, []).append(name)
    out = {}
    for names in groups.values():
        torch.manual_seed(seed)
        model = small_resnet()
        pooled = Pooled([data[n]["training"] for n in names])
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(seed)
        criterion = nn.CrossEntropyLoss()
        model.train()
        for _ in range(epochs):
            for indices in DABatchSampler(
                pooled.das, batch_size=16, shuffle=True, generator=generator
            ):
                batch = collate([pooled[i] for i in indices])
                loss = criterion(model(batch["image"]), batch["label"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        for name in names:
            out[name] = site_metrics(
                _cnn_predict(model, data[name]["validation"]),
                _cnn_predict(model, data[name]["test"]),
            )
    return out


def run_cnn_private(cfg: RunConfig, data: Sites, *, federated: bool) -> dict[str, dict[str, Any]]:
    """The private CNN (:func:`small_resnet`) through the rounds a site runs (``cfg``: DP
    plan, training settings): ``federated``, FedAvg of the whole network, example-weighted as
    the server does; else each site alone (nothing shared)."""
    torch.manual_seed(cfg.seed)
    model = _IgnoreSpacing(small_resnet(private=True))
    names = list(data)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = {name: start for name in names}
    for server_round in range(1, cfg.num_server_rounds + 1):
        updates = []
        for index, name in enumerate(names):
            model.load_state_dict(states[name])
            seed = _round_seed(cfg, index, server_round)
            _train_round(cfg, model, data[name]["training"], seed)
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            states[name] = state
            updates.append((state, len(data[name]["training"])))
        if federated:
            averaged = weighted_average(updates)
            states = {name: averaged for name in names}
    out = {}
    for name in names:
        model.load_state_dict(states[name])
        out |= evaluate_sites(model, data, [name])
    return out


# ------------------------------------------------------------------------------- driver


def run_arm(arm: str, values: dict[str, Any], seed: int, data: Sites, epochs: int) -> Any:
    seeded = values | {"seed": seed, "backbone-seed": seed}
    if arm == "cnn":
        return run_cnn(seed, data, epochs)
    dp8: dict[str, Any] = {"dp": True, "target-epsilon": 8.0}
    privacy = {"dp": False} if arm in ("cnn-local", "central", "fl") else dp8
    if arm == "fl-dp3":
        privacy = dp8 | {"target-epsilon": 3.0}
    if arm.startswith("cnn-"):
        return run_cnn_private(RunConfig.from_flat(seeded | privacy), data, federated="-fl-" in arm)
    one_head = seeded | {"head-sharing": "shared"}
    if arm == "central":
        return run_central(RunConfig.from_flat(one_head | privacy), data)
    if arm == "local-dp":
        return run_local(RunConfig.from_flat(one_head | privacy), data)
    sharing = {"head-sharing": FEDERATED_ARMS[arm]}
    return run_federated(RunConfig.from_flat(seeded | privacy | sharing), data)


def summarize(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per site: mean and sd over seeds of AUC and of the rates at the calibrated threshold."""
    out: dict[str, dict[str, float]] = {}
    for site in runs[0]:
        row = {}
        for key in ("auc", "balanced-accuracy", "sensitivity", "specificity"):
            values = [run[site][key] for run in runs]
            row[f"{key}_mean"] = statistics.fmean(values)
            row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[site] = row
    return out


def print_table(results: dict[str, Any]) -> None:
    sites = results["sites"]
    print(
        f"\nper-site test AUC / balanced accuracy at the site's validation-calibrated threshold, "
        f"mean +- sd over {results['seeds']} seed(s), {results['rounds']} rounds"
    )
    print(f"{'arm':10}" + "".join(f"{s:>26}" for s in sites))
    for arm, block in results["arms"].items():
        cells = []
        for site in sites:
            row = block["summary"][site]
            cells.append(
                f"{row['auc_mean']:.3f}+-{row['auc_sd']:.3f} / {row['balanced-accuracy_mean']:.2f}"
            )
        print(f"{arm:10}" + "".join(f"{c:>26}" for c in cells))


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of disjoint arms with equal settings (run in parallel processes)."""
    merged = dict(parts[0]) | {"arms": {}, "commands": [p["command"] for p in parts]}
    for part in parts:
        for key in ("rounds", "seeds", "cnn_epochs", "config", "backbone"):
            if part[key] != merged[key]:
                raise SystemExit(f"cannot merge: '{key}' differs between result files")
        merged["arms"] |= part["arms"]
    merged["wall_time_s"] = max(p["wall_time_s"] for p in parts)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="FL rounds / epochs of ViT arms")
    parser.add_argument("--cnn-epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"subset of {','.join(ARMS)}")
    parser.add_argument("--preset", default="large", help="phantom preset")
    parser.add_argument("--cache", type=Path, default=Path("phantom_data"))
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument(
        "--pretrain-visible-weight",
        type=float,
        default=MIMSettings.visible_weight,
        help="MIMSettings.visible_weight (0: SimMIM)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1 seed, 2 CNN epochs")
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        help="combine result files of runs over disjoint arms into --out, print the table",
    )
    args = parser.parse_args(argv)
    if args.merge:
        merged = merge_results([json.loads(p.read_text()) for p in args.merge])
        args.out.write_text(json.dumps(merged, indent=1))
        print_table(merged)
        return 0
    torch.set_num_threads(1)
    rounds, seeds, epochs = (2, 1, 2) if args.quick else (args.rounds, args.seeds, args.cnn_epochs)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {','.join(ARMS)}")
    root = args.cache / f"benchmark-{args.preset}-seed0-v{PHANTOM_VERSION}"
    if not (root / "hospitals.json").is_file():
        generate_hospitals(root, args.preset, seed=0, overwrite=True)
    path, digest = demo_backbone(
        args.cache,
        size="micro",
        steps=args.pretrain_steps,
        visible_weight=args.pretrain_visible_weight,
    )
    values: dict[str, Any] = {
        "num-server-rounds": rounds,
        "backbone": str(path.resolve()),
        "data-root": str(root.resolve()),
    } | parse_set(args.set)
    cfg = RunConfig.from_flat(values)
    names = list_sites(cfg)
    data = {n: {s: open_split(cfg, root / n, s) for s in SPLITS} for n in names}
    results: dict[str, Any] = {
        "command": "python -m benchmarks.quality " + " ".join(argv or sys.argv[1:]),
        "rounds": rounds,
        "seeds": seeds,
        "cnn_epochs": epochs,
        "backbone": {
            "pretrain_steps": args.pretrain_steps,
            "visible_weight": args.pretrain_visible_weight,
            "fingerprint": digest,
        },
        "config": cfg.to_flat(),
        "sites": {n: {s: len(d) for s, d in data[n].items()} for n in names},
        "arms": {},
    }
    started = time.perf_counter()
    for arm in arms:
        runs = []
        for seed in range(seeds):
            t0 = time.perf_counter()
            runs.append(run_arm(arm, values, seed, data, epochs))
            brief = {s: round(m["auc"], 3) for s, m in runs[-1].items()}
            print(f"{arm} seed {seed}: AUC {brief} ({time.perf_counter() - t0:.0f} s)", flush=True)
        results["arms"][arm] = {"runs": runs, "summary": summarize(runs)}
        results["wall_time_s"] = time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))  # partial results survive a cut
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
