"""Federated fine-tuning on phantom hospitals, side by side in one run.

    python -m benchmarks.federated [--rounds 10] [--seeds 3] [--size micro] [--quick]

Every arm starts from the demo backbone (``core.pretrain.demo_backbone``: masked image
modelling on the unlabeled phantom archive, built once) with the run-config defaults, the
default scenario's recipe. Arms: centralized non-private (pooled training data, one pass per
"round"), FL non-private, FL with DP at epsilon 8 and 3 (FFA LoRA), and vanilla LoRA under DP
at epsilon 8; each repeated for ``--seeds`` seeds. FL arms run in-process with the same
``core.federation.rounds.train_round`` / ``evaluate_round`` the Flower ClientApp calls and the same
example-weighted average as the server (Flower's transport is measured by the simulation tests,
not here). Also measured: upload bytes per site per round (adapters vs the full model) and the
DP-SGD step time vs the non-private step time. Writes ``benchmarks/results/federated.json``.
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
from torch.utils.data import ConcatDataset

from core.adapters.lora import adapter_state
from core.config import RunConfig
from core.data.phantoms import PHANTOM_VERSION, generate_hospitals
from core.federation.rounds import (
    build_lora_model,
    evaluate_round,
    initial_adapters,
    open_split,
    train_round,
)
from core.federation.sites import list_sites
from core.model.vit import count_parameters
from core.pretrain import demo_backbone
from core.training.loops import (
    DPStepPlan,
    evaluate,
    mean_metrics,
    train_dp,
    train_plain,
)
from core.training.settings import TrainSettings
from simulations.run import parse_set

RESULTS = Path(__file__).parent / "results" / "federated.json"


def weighted_average(updates: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    total = sum(n for _, n in updates)
    return {
        key: sum(state[key].double() * (n / total) for state, n in updates).float()
        for key in updates[0][0]
    }


def federated_round(
    cfg: RunConfig,
    sites: list[Path],
    global_state: dict[str, torch.Tensor],
    fingerprint: str,
    ledgers: dict[Path, Any],
    server_round: int,
    seed_base: int,
    heads: dict[Path, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """One round in-process: every site's ``train_round`` (its ledger kept in ``ledgers``, its
    own head in ``heads`` when it keeps one: head-sharing "local" or "shared+local"), then the
    server's example-weighted average; the new global (the old one if none trained)."""
    heads = {} if heads is None else heads
    updates = []
    for index, site in enumerate(sites):
        outcome = train_round(
            cfg,
            site_dir=site,
            global_adapters=global_state,
            server_round=server_round,
            expected_fingerprint=fingerprint,
            ledger_state=ledgers.get(site),
            dp_seed=seed_base + index,  # distinct per site; reproducible
            local_head=heads.get(site),
        )
        ledgers[site] = outcome.ledger
        if outcome.local_head is not None:
            heads[site] = outcome.local_head
        if outcome.adapters is not None:
            updates.append((outcome.adapters, int(outcome.metrics["num-examples"])))
    return weighted_average(updates) if updates else global_state


def site_test_metrics(
    cfg: RunConfig,
    sites: list[Path],
    global_state: dict[str, torch.Tensor],
    fingerprint: str,
    heads: dict[Path, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Every site's ``evaluate_round`` of the global adapters (with its own head from
    ``heads`` when it keeps one) on its test split, by name."""
    heads = {} if heads is None else heads
    return {
        site.name: evaluate_round(
            cfg,
            site_dir=site,
            global_adapters=global_state,
            expected_fingerprint=fingerprint,
            split="test",
            local_head=heads.get(site),
        )
        for site in sites
    }


def run_federated(cfg: RunConfig, sites: list[Path]) -> list[dict[str, float]]:
    """Rounds of train (every site) -> weighted average -> evaluate (every site's test split)."""
    global_state, fingerprint = initial_adapters(cfg)
    ledgers: dict[Path, Any] = {}
    heads: dict[Path, Any] = {}
    history = []
    for server_round in range(1, cfg.num_server_rounds + 1):
        global_state = federated_round(
            cfg, sites, global_state, fingerprint, ledgers, server_round, 1_000 * cfg.seed, heads
        )
        per_site = site_test_metrics(cfg, sites, global_state, fingerprint, heads)
        summary = mean_metrics(per_site)
        epsilons = [
            ledger["rounds"][-1]["epsilon"] for ledger in ledgers.values() if ledger is not None
        ]
        summary["max_epsilon"] = max(epsilons) if epsilons else 0.0
        history.append({"round": server_round, **summary})
        print(f"    round {server_round}: {summary}", flush=True)
    return history


class Pooled:
    """All sites' training splits as one dataset (the centralized upper bound)."""

    def __init__(self, parts: list[Any]) -> None:
        self.concat = ConcatDataset(parts)
        self.das = [da for part in parts for da in part.das]

    def __len__(self) -> int:
        return len(self.concat)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.concat[index]


def run_centralized(cfg: RunConfig, sites: list[Path]) -> list[dict[str, float]]:
    """Non-private training on pooled data, evaluated like the FL arms after every "round" of
    ``local-epochs`` epochs: the same number of passes over each example as a site makes.
    One head (head-sharing "shared"'s model): with the data pooled there is nothing to
    personalise, and a second, personal read-out would double the head's step."""
    cfg = RunConfig.from_flat(cfg.to_flat() | {"head-sharing": "shared"})
    model, _ = build_lora_model(cfg)
    pooled = Pooled([open_split(cfg, s, "training") for s in sites])
    tests = {s.name: open_split(cfg, s, "test") for s in sites}
    generator = torch.Generator().manual_seed(cfg.seed)
    history = []
    device = torch.device("cpu")
    for server_round in range(1, cfg.num_server_rounds + 1):
        train_plain(model, pooled, cfg.training(), device=device, generator=generator)
        per_site = {
            name: evaluate(model, data, batch_size=32, device=device)
            for name, data in tests.items()
        }
        summary = mean_metrics(per_site)
        history.append({"round": server_round, **summary})
        print(f"    round {server_round}: {summary}", flush=True)
    return history


def step_times(cfg: RunConfig, site: Path, repeats: int) -> dict[str, float]:
    """Median seconds per optimizer step, DP-SGD (Poisson, clipping, noise) vs plain, at the
    same expected batch size on the same site."""
    dataset = open_split(cfg, site, "training")
    batch = cfg.batch_size
    plain_times, dp_times = [], []
    for _ in range(repeats):
        model, _ = build_lora_model(cfg)
        settings = TrainSettings(
            local_epochs=1, batch_size=batch, learning_rate=1e-3, optimizer="adamw"
        )
        started = time.perf_counter()
        result = train_plain(
            model, dataset, settings, device=torch.device("cpu"), generator=torch.Generator()
        )
        plain_times.append((time.perf_counter() - started) / result.steps)
        model, _ = build_lora_model(cfg)
        plan = DPStepPlan(1.0, 1.0, batch / len(dataset), max(1, len(dataset) // batch))
        started = time.perf_counter()
        result = train_dp(
            model, dataset, settings, plan, device=torch.device("cpu"), generator=torch.Generator()
        )
        dp_times.append((time.perf_counter() - started) / result.steps)
    plain, dp = statistics.median(plain_times), statistics.median(dp_times)
    return {"plain_step_s": plain, "dp_step_s": dp, "dp_over_plain": dp / plain}


def upload_bytes(cfg: RunConfig) -> dict[str, float]:
    model, _ = build_lora_model(cfg)
    adapters = sum(t.numel() * 4 for t in adapter_state(model).values())
    full = count_parameters(model.get_base_model()) * 4
    return {
        "adapter_bytes": adapters,
        "full_model_bytes": full,
        "full_over_adapter": full / adapters,
    }


ARMS: dict[str, dict[str, Any]] = {
    "fl-nonprivate": {"dp": False},
    "fl-dp-eps8-ffa": {"dp": True, "target-epsilon": 8.0},
    "fl-dp-eps3-ffa": {"dp": True, "target-epsilon": 3.0},
    "fl-dp-eps8-vanilla": {"dp": True, "target-epsilon": 8.0, "lora-mode": "vanilla"},
}
CENTRAL = "centralized-nonprivate"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3, help="repeats (LoRA/head init, sampling)")
    parser.add_argument("--size", default="micro")
    parser.add_argument(
        "--presets", default="default,large", help="phantom presets (site sizes) to compare"
    )
    parser.add_argument("--cache", type=Path, default=Path("phantom_data"))
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1 seed, 2 FL arms")
    parser.add_argument(
        "--pretrain-steps", type=int, default=1000, help="demo backbone steps; 0 = random init"
    )
    parser.add_argument("--arms", default="", help=f"comma-separated subset of {CENTRAL}, ...")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds, seeds = (2, 1) if args.quick else (args.rounds, args.seeds)
    base: dict[str, Any] = {"model-size": args.size, "num-server-rounds": rounds}
    base |= parse_set(args.set)
    backbone = {"pretrain_steps": args.pretrain_steps, "fingerprint": "seeded random"}
    if args.pretrain_steps:
        path, digest = demo_backbone(args.cache, size=args.size, steps=args.pretrain_steps)
        base["backbone"] = str(path.resolve())
        backbone["fingerprint"] = digest
    arms = {CENTRAL: {}} | ARMS
    if args.quick:
        arms = {k: arms[k] for k in (CENTRAL, "fl-nonprivate", "fl-dp-eps8-ffa")}
    if args.arms:
        arms = {k: v for k, v in arms.items() if k in args.arms.split(",")}
    results: dict[str, Any] = {
        "command": "python -m benchmarks.federated " + " ".join(argv or sys.argv[1:]),
        "rounds": rounds,
        "seeds": seeds,
        "size": args.size,
        "backbone": backbone,
        "config": RunConfig.from_flat(base).to_flat(),
        "presets": {},
    }
    started = time.perf_counter()
    for preset_name in args.presets.split(","):
        data = args.cache / f"benchmark-{preset_name}-seed0-v{PHANTOM_VERSION}"
        if not (data / "hospitals.json").is_file():
            generate_hospitals(data, preset_name, seed=0, overwrite=True)
        values = base | {"data-root": str(data.resolve())}
        sites = [data / name for name in list_sites(RunConfig.from_flat(values))]
        runs: dict[str, list[Any]] = {name: [] for name in arms}
        for seed in range(seeds):
            for name, overrides in arms.items():
                print(f"{preset_name}: {name}, seed {seed}", flush=True)
                cfg = RunConfig.from_flat(
                    values | overrides | {"seed": seed, "backbone-seed": seed}
                )
                run = run_centralized if name == CENTRAL else run_federated
                runs[name].append(run(cfg, sites))
        results["presets"][preset_name] = {
            "sites": {
                s.name: len(open_split(RunConfig.from_flat(values), s, "training")) for s in sites
            },
            "runs": runs,
            "summary": summarize(runs),
        }
    results["upload"] = {
        mode: upload_bytes(RunConfig.from_flat(base | {"lora-mode": mode}))
        for mode in ("ffa", "vanilla")
    }
    # Step time on the last preset's first site (the thin-slice CT: the largest inputs).
    results["step_time"] = step_times(RunConfig.from_flat(values), sites[0], repeats=3)
    results["wall_time_s"] = time.perf_counter() - started
    results["torch"] = torch.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print_table(results)
    return 0


def summarize(runs: dict[str, list[list[dict[str, float]]]]) -> dict[str, dict[str, float]]:
    """Final-round AUC and accuracy per arm over seeds (mean, sd), and the ratio of the mean AUC
    to the centralized mean AUC."""
    summary = {}
    for name, histories in runs.items():
        aucs = [h[-1]["auc"] for h in histories]
        accuracies = [h[-1]["accuracy"] for h in histories]
        summary[name] = {
            "auc_mean": statistics.fmean(aucs),
            "auc_sd": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
            "accuracy_mean": statistics.fmean(accuracies),
            "max_epsilon": max(h[-1].get("max_epsilon", 0.0) for h in histories),
        }
    central = summary.get(CENTRAL, {}).get("auc_mean", float("nan"))
    for entry in summary.values():
        entry["auc_over_centralized"] = entry["auc_mean"] / central
    return summary


def print_table(results: dict[str, Any]) -> None:
    for preset_name, block in results["presets"].items():
        print(
            f"\n{preset_name} sites (training cases {block['sites']}): after {results['rounds']} "
            f"rounds, {results['seeds']} seed(s), test splits, per-site AUC weighted by examples"
        )
        print("arm                      AUC (mean +- sd)  accuracy  max epsilon  AUC / centralized")
        for name, row in block["summary"].items():
            print(
                f"{name:24} {row['auc_mean']:.3f} +- {row['auc_sd']:.3f}    "
                f"{row['accuracy_mean']:.3f}     {row['max_epsilon']:6.2f}      "
                f"{row['auc_over_centralized']:.2f}"
            )
    for mode, up in results["upload"].items():
        ratio = up["full_over_adapter"]
        print(
            f"upload per site per round ({mode}): {up['adapter_bytes'] / 1024:.1f} KiB "
            f"vs full model {up['full_model_bytes'] / 2**20:.1f} MiB (1/{ratio:.0f})"
        )
    st = results["step_time"]
    print(
        f"DP-SGD step {st['dp_step_s'] * 1000:.1f} ms vs plain {st['plain_step_s'] * 1000:.1f} ms "
        f"({st['dp_over_plain']:.2f}x)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
