"""What self-supervised pretraining buys: LoRA fine-tuning from a pre-trained vs a random backbone.

``python -m benchmarks.pretraining [--quick] [--pretrain-steps 1000] [--seeds 6] [--threads 1]
[--lora-mode vanilla] [--targets attn-mlp] [--lr 3e-3]
[--out benchmarks/results/pretraining.json]``

Setup (everything generated locally, CPU, micro model):

* Pretraining data: an unlabeled phantom archive, the ``default`` preset at seed
  ``PHANTOM_PRETRAIN_SEED`` (1), all splits, labels ignored: different cases from the
  fine-tuning hospitals (seed 0), same kinds of scanner (thin CT, thick MR, two X-ray).
* Pretraining: ``core.pretrain.pretrain`` (masked image modelling), ``--pretrain-steps``.
* Fine-tuning data: the four ``default`` sites at seed 0, pooled centrally, with every site at
  50 % prevalence: with the preset's Dirichlet label mix, the pooled AUC would partly reward
  recognising the *site*.
* Fine-tuning: ``core.training.loops.train_plain`` on LoRA adapters plus the task head, non-private,
  batch 16. Defaults: vanilla LoRA rank 8 / alpha 16 on attention and MLP linears, AdamW lr
  3e-3 (the federation's FFA on q and v at lr 1e-3 learned nothing in 300 steps from either
  backbone on this task). Training runs in 6 chunks of about 50 optimizer steps, each a
  ``train_plain`` call with a fresh optimizer (as federated rounds do); after each chunk the
  model is evaluated. Label fractions 100 % and 10 % of the pooled training split (10 % drawn
  per seed, stratified by site and class, at least one of each); same steps for both.
* Evaluation: ``core.training.loops.evaluate`` on the pooled validation (60) and test (60) splits,
  never trained on. Reported: test AUC after the last chunk, and test AUC at the chunk the
  validation AUC picks (early stopping). ``--seeds`` seeds per cell (head init, LoRA A, batch
  order, label subset): mean and standard deviation.
* Diagnostic, frozen features: a logistic regression (scikit-learn, standardised features,
  C = 0.1) on the frozen backbone's CLS token and on its mean-pooled patch tokens, same label
  subsets, scored on validation + test: "are the features better?" apart from "does LoRA with
  a CLS head use them?".

Threads: ``--threads 1`` by default because the machine is shared; two threads on two busy
cores were several times slower than one in our measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.adapters.lora import add_lora
from core.adapters.settings import LoraSettings
from core.config import RunConfig
from core.data import DABatchSampler, GridConfig, collate
from core.data.phantoms import HospitalSpec, generate_hospitals, preset
from core.model.checkpoint import backbone_state, fingerprint, load_backbone
from core.model.sizes import MODEL_SIZES
from core.model.vit import UniversalViT, create_vit
from core.pretrain import PHANTOM_PRETRAIN_SEED, ImagePool, MIMSettings, open_pool, pretrain
from core.training.loops import evaluate, train_plain
from core.training.settings import TrainSettings

RESULTS = Path(__file__).resolve().parent / "results" / "pretraining.json"
FRACTIONS = (1.0, 0.1)
INITS = ("random", "pretrained")
CPU = torch.device("cpu")
BATCH = 16
CHUNKS = 6
CHUNK_STEPS = 50


def stratified_indices(pool: ImagePool, fraction: float, seed: int) -> list[int]:
    """``fraction`` of the items of every (site, class) group, at least one each."""
    if fraction >= 1.0:
        return list(range(len(pool)))
    generator = torch.Generator().manual_seed(10_007 * seed + 1)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, (site, label) in enumerate(zip(pool.sites, pool.labels.tolist(), strict=True)):
        groups.setdefault((site, int(label)), []).append(index)
    chosen: list[int] = []
    for key in sorted(groups):
        members = groups[key]
        take = max(1, round(fraction * len(members)))
        order = torch.randperm(len(members), generator=generator)[:take].tolist()
        chosen.extend(members[i] for i in order)
    return sorted(chosen)


def backbone(init: str, path: Path, cfg: RunConfig) -> UniversalViT:
    """The frozen backbone as a site builds it: from the checkpoint, or seeded random."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.backbone_seed)
        if init == "pretrained":
            return load_backbone(path)[0]
        return create_vit(cfg.model_size)


def finetuning_sites() -> HospitalSpec:
    """The ``default`` sites at 50 % prevalence."""
    return preset("default", alpha=None)


def finetune(
    init: str,
    backbone_path: Path,
    train: ImagePool,
    evals: dict[str, ImagePool],
    lora: LoraSettings,
    *,
    learning_rate: float,
    seed: int,
    chunks: int = CHUNKS,
    chunk_steps: int = CHUNK_STEPS,
) -> dict[str, Any]:
    """One LoRA fine-tuning run in ``chunks`` chunks of about ``chunk_steps`` steps (whole
    epochs), evaluated after each chunk."""
    cfg = RunConfig(seed=seed)
    model = backbone(init, backbone_path, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.reset_head(2)
    lora_model = add_lora(model, dataclasses.replace(lora, seed=seed))
    epochs = max(1, round(chunk_steps / len(DABatchSampler(train.das, BATCH))))
    settings = TrainSettings(
        local_epochs=epochs, batch_size=BATCH, learning_rate=learning_rate, optimizer="adamw"
    )
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    curve: list[dict[str, float]] = []
    steps = 0
    for _ in range(chunks):
        result = train_plain(lora_model, train, settings, device=CPU, generator=generator)
        steps += result.steps
        point: dict[str, float] = {"steps": steps, "train_loss": result.loss}
        for name, pool in evals.items():
            metrics = evaluate(lora_model, pool, batch_size=32, device=CPU)
            point |= {f"{name}_{k}": metrics[k] for k in ("auc", "accuracy", "loss")}
        curve.append(point)
    best = max(curve, key=lambda p: p["validation_auc"])  # first of equals: fewer steps
    run: dict[str, Any] = {
        "init": init,
        "seed": seed,
        "train_examples": len(train),
        "epochs_per_chunk": epochs,
        "final_test_auc": curve[-1]["test_auc"],
        "final_test_accuracy": curve[-1]["test_accuracy"],
        "final_train_loss": curve[-1]["train_loss"],
        "selected_steps": best["steps"],
        "selected_test_auc": best["test_auc"],
        "selected_test_accuracy": best["test_accuracy"],
        "curve": curve,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return run


@torch.no_grad()
def frozen_features(model: UniversalViT, pool: ImagePool) -> dict[str, np.ndarray]:
    """CLS token and mean patch token of every item, in pool order: {"cls", "mean"} (N, E)."""
    model.eval()
    cls = np.zeros((len(pool), model.config.embed_dim))
    mean = np.zeros_like(cls)
    for indices in DABatchSampler(pool.das, 32, shuffle=False):
        batch = collate([pool[i] for i in indices])
        tokens = model.forward_features(batch["image"], batch["spacing"])  # (N, 1 + T, E)
        cls[indices] = tokens[:, 0].double().numpy()
        mean[indices] = tokens[:, 1:].mean(dim=1).double().numpy()
    return {"cls": cls, "mean": mean}


def probe_auc(
    train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray
) -> float:
    """Held-out AUC of a logistic regression on standardised frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    classifier = LogisticRegression(C=0.1, max_iter=5000)
    classifier.fit(scaler.transform(train), train_labels)
    scores = classifier.predict_proba(scaler.transform(test))[:, 1]
    return float(roc_auc_score(test_labels, scores))


def _quiet(_: str) -> None:
    """Fine-tuning pools have no missing splits worth a note."""


def _mean_sd(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def summarise(
    rows: list[dict[str, Any]], keys: tuple[str, ...], by: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Mean and sd of ``keys`` over seeds for every combination of the ``by`` fields."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[b] for b in by), []).append(row)
    out = []
    for group, members in groups.items():
        cell: dict[str, Any] = dict(zip(by, group, strict=True)) | {"runs": len(members)}
        for key in keys:
            cell[f"{key}_mean"], cell[f"{key}_sd"] = _mean_sd([m[key] for m in members])
        out.append(cell)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pretraining", description=__doc__)
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lora-mode", default="vanilla", choices=("vanilla", "ffa"))
    parser.add_argument("--targets", default="attn-mlp", choices=("qv", "attn", "attn-mlp"))
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny budgets, 1 seed")
    parser.add_argument("--work", type=Path, default=None, help="keep generated data here")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"default {RESULTS.name} (--quick: not written)"
    )
    args = parser.parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    chunks, chunk_steps = CHUNKS, CHUNK_STEPS
    if args.quick:
        args.pretrain_steps, args.seeds, chunks, chunk_steps = 10, 1, 2, 5
    lora = LoraSettings(rank=8, alpha=16, targets=args.targets, mode=args.lora_mode)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    grid = GridConfig(in_plane=(64, 64))
    with tempfile.TemporaryDirectory(prefix="bench-pretraining-") as scratch:
        work = args.work or Path(scratch)
        sites = finetuning_sites()
        generate_hospitals(work / "finetune", sites, seed=0, overwrite=True)
        generate_hospitals(work / "archive", "default", seed=PHANTOM_PRETRAIN_SEED, overwrite=True)
        archive = open_pool([work / "archive"], ["training", "validation", "test"], grid=grid)
        site_dirs = [work / "finetune"]
        train_pool = open_pool(site_dirs, ["training"], grid=grid, log=_quiet)
        evals = {
            "validation": open_pool(site_dirs, ["validation"], grid=grid, log=_quiet),
            "test": open_pool(site_dirs, ["test"], grid=grid, log=_quiet),
        }
        held_out = open_pool(site_dirs, ["validation", "test"], grid=grid, log=_quiet)
        print(
            f"archive {len(archive)} unlabeled images; fine-tuning (50 % prevalence): "
            f"train {len(train_pool)}, validation {len(evals['validation'])}, "
            f"test {len(evals['test'])}",
            flush=True,
        )

        settings = MIMSettings()
        path = work / "backbone-pretrained.safetensors"
        outcome = pretrain(
            archive,
            out=path,
            config=MODEL_SIZES["micro"],
            settings=settings,
            steps=args.pretrain_steps,
            device=CPU,
            checkpoint=None,
            log_every=max(args.pretrain_steps // 5, 1),
            log=lambda line: print("  pretrain " + line, flush=True),
        )
        print(
            f"pretrained in {outcome.seconds:.0f} s, MIM loss {outcome.first_loss:.3f} -> "
            f"{outcome.last_loss:.3f}, fingerprint {outcome.fingerprint[:12]}",
            flush=True,
        )
        random_model = backbone("random", path, RunConfig())
        random_digest = fingerprint(backbone_state(random_model), random_model.config)

        features = {
            init: (
                frozen_features(backbone(init, path, RunConfig()), train_pool),
                frozen_features(backbone(init, path, RunConfig()), held_out),
            )
            for init in INITS
        }
        train_labels, held_labels = train_pool.labels.numpy(), held_out.labels.numpy()
        runs: list[dict[str, Any]] = []
        probes: list[dict[str, Any]] = []
        for fraction in FRACTIONS:
            for seed in range(args.seeds):
                chosen = stratified_indices(train_pool, fraction, seed)
                subset = train_pool.subset(chosen)
                for init in INITS:
                    train_f, held_f = features[init]
                    probe: dict[str, Any] = {"fraction": fraction, "init": init, "seed": seed}
                    for part in ("cls", "mean"):
                        probe[f"{part}_auc"] = probe_auc(
                            train_f[part][chosen], train_labels[chosen], held_f[part], held_labels
                        )
                    probes.append(probe)
                    run = finetune(
                        init,
                        path,
                        subset,
                        evals,
                        lora,
                        learning_rate=args.lr,
                        seed=seed,
                        chunks=chunks,
                        chunk_steps=chunk_steps,
                    )
                    run["fraction"] = fraction
                    runs.append(run)
                    print(
                        f"  labels {fraction:>4.0%}  {init:<10}  seed {seed}  n {len(subset):>3}  "
                        f"test AUC final {run['final_test_auc']:.3f}  at val-best "
                        f"{run['selected_test_auc']:.3f} ({run['selected_steps']} steps)  "
                        f"probe mean-token {probe['mean_auc']:.3f}  ({run['seconds']:.0f} s)",
                        flush=True,
                    )

    keys = (
        "final_test_auc",
        "final_test_accuracy",
        "final_train_loss",
        "selected_test_auc",
        "selected_test_accuracy",
        "selected_steps",
    )
    rows = summarise(runs, keys, ("fraction", "init"))
    probe_rows = summarise(probes, ("cls_auc", "mean_auc"), ("fraction", "init"))

    def cell(row: dict[str, Any], key: str) -> str:
        return f"{row[key + '_mean']:.3f} ± {row[key + '_sd']:.3f}"

    print(f"\nLoRA fine-tuning (mean ± sd over {args.seeds} seeds)")
    print(
        "| labels | backbone | steps | test AUC, final | test AUC, val-selected | "
        "test accuracy, final | train loss, final |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        steps = max(
            r["curve"][-1]["steps"]
            for r in runs
            if (r["fraction"], r["init"]) == (row["fraction"], row["init"])
        )
        print(
            f"| {row['fraction']:.0%} | {row['init']} | {steps} | "
            f"{cell(row, 'final_test_auc')} | {cell(row, 'selected_test_auc')} | "
            f"{cell(row, 'final_test_accuracy')} | {row['final_train_loss_mean']:.3f} |"
        )
    print("\nFrozen features, logistic regression, AUC on validation + test (mean ± sd)")
    print("| labels | backbone | CLS token | mean patch token |")
    print("|---|---|---|---|")
    for row in probe_rows:
        print(
            f"| {row['fraction']:.0%} | {row['init']} | {cell(row, 'cls_auc')} | "
            f"{cell(row, 'mean_auc')} |"
        )
    total = time.perf_counter() - started
    print(f"\ntotal {total:.0f} s")
    document = {
        "benchmark": "pretraining",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.pretraining", *given]),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "setup": {
            "model": "micro",
            "lora": dataclasses.asdict(lora),
            "learning_rate": args.lr,
            "batch_size": BATCH,
            "chunks": chunks,
            "chunk_steps": chunk_steps,
            "seeds": args.seeds,
            "fractions": list(FRACTIONS),
            "finetune_data": "phantoms: preset default sites, seed 0, 50 % prevalence; "
            "pooled training split",
            "train_examples": len(train_pool),
            "validation_examples": len(evals["validation"]),
            "test_examples": len(evals["test"]),
            "probe": "LogisticRegression(C=0.1) on standardised frozen CLS / mean patch tokens, "
            "scored on validation + test",
            "random_backbone_fingerprint": random_digest,
            "pretraining": {
                "data": f"phantoms preset default seed {PHANTOM_PRETRAIN_SEED}, all splits, "
                "labels ignored",
                "images": len(archive),
                "steps": outcome.steps,
                "settings": settings.to_dict(),
                "seconds": round(outcome.seconds, 1),
                "mim_loss_first": outcome.first_loss,
                "mim_loss_last10": outcome.last_loss,
                "fingerprint": outcome.fingerprint,
            },
        },
        "summary": rows,
        "summary_probe": probe_rows,
        "runs": runs,
        "probes": probes,
        "total_seconds": round(total, 1),
    }
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
