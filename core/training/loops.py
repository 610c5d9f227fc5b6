"""One local training loop (DP-SGD or plain) and evaluation, shared by every site and benchmark.

DP-SGD here is Opacus's mechanism, assembled by hand rather than through
``PrivacyEngine.make_private`` because our batches come from a DA-bucketed Poisson sampler,
not a DataLoader: a ``GradSampleModule`` computes per-sample gradients of the trainable
(adapter and head) parameters, a ``DPOptimizer`` clips each one to ``max_grad_norm``, sums,
adds Gaussian noise once per *logical* (Poisson) batch and divides by the expected batch size.
A logical batch whose examples have different DAs is run as several physical sub-batches whose
clipped gradients are accumulated with ``signal_skip_step`` (Opacus's virtual-step mechanism),
so the released gradient is exactly the one the accountant analyses. Accounting itself lives
in :mod:`core.privacy.ledger`; this module reports what it did (noise, sample rate, steps).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn

from core.data import DABatchSampler, PoissonDABatchSampler, collate
from core.training.settings import TrainSettings


class SiteData(Protocol):
    """What training needs of a site dataset (core.data.SiteDataset satisfies it)."""

    @property
    def das(self) -> Sequence[int]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Tensor]: ...


@dataclass(frozen=True)
class DPStepPlan:
    """The DP-SGD mechanism of one round: what the accountant composes."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    secure_mode: bool = False  # Opacus secure_mode: noise from torchcsprng (must be installed)


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the examples seen
    num_examples: int  # dataset size (the FedAvg weight)
    steps: int  # optimizer steps taken
    examples_seen: int


def pick_device(prefer: str = "auto") -> torch.device:
    """CUDA when present (and asked for), CPU otherwise."""
    if prefer == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def loss_function(multi_label: bool) -> nn.Module:
    return nn.BCEWithLogitsLoss() if multi_label else nn.CrossEntropyLoss()


def _make_optimizer(params: list[nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=settings.learning_rate, momentum=0.9, weight_decay=settings.weight_decay
        )
    return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)


def _batch(dataset: SiteData, indices: Sequence[int], device: torch.device) -> dict[str, Tensor]:
    batch = collate([dataset[i] for i in indices])
    return {k: v.to(device) for k, v in batch.items()}


def _chunks(indices: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def train_plain(
    model: nn.Module,
    dataset: SiteData,
    settings: TrainSettings,
    *,
    device: torch.device,
    generator: torch.Generator,
    amp: bool = False,
    criterion: nn.Module | None = None,
) -> TrainResult:
    """Non-private local training: shuffled DA-bucketed batches, one step per batch.
    ``criterion(output, label)``: the task's loss (default: the classifier's)."""
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(params, settings)
    criterion = criterion or loss_function(settings.multi_label)
    total_loss, seen, steps = 0.0, 0, 0
    use_amp = amp and device.type == "cuda"
    for _ in range(settings.local_epochs):
        sampler = DABatchSampler(
            dataset.das, batch_size=settings.batch_size, shuffle=True, generator=generator
        )
        for indices in sampler:
            batch = _batch(dataset, indices, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = criterion(model(batch["image"], batch["spacing"]), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(indices)
            seen += len(indices)
            steps += 1
    return TrainResult(total_loss / max(seen, 1), len(dataset), steps, seen)


def train_dp(
    model: nn.Module,
    dataset: SiteData,
    settings: TrainSettings,
    plan: DPStepPlan,
    *,
    device: torch.device,
    generator: torch.Generator,
    criterion: nn.Module | None = None,
) -> TrainResult:
    """DP-SGD on the trainable parameters with Poisson sampling over the whole site dataset.

    Runs exactly ``plan.steps`` noisy steps at ``plan.sample_rate``. Always fp32: the per-sample
    gradients that the clipping bound rests on are not computed in reduced precision.
    ``criterion``: the task's loss (default: the classifier's); it must be a mean over the
    batch of per-example losses (Opacus ``loss_reduction="mean"``): one example is the unit.
    """
    model.to(device).train()
    private = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = DPOptimizer(
        _make_optimizer(params, settings),
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=max(1, round(plan.sample_rate * len(dataset))),
        loss_reduction="mean",
        generator=None,  # torch's global RNG, seeded per release by the caller
        secure_mode=plan.secure_mode,
    )
    criterion = criterion or loss_function(settings.multi_label)
    sampler = PoissonDABatchSampler(
        dataset.das,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        generator=generator,
        max_batch_size=settings.max_physical_batch,
    )
    total_loss, seen, steps = 0.0, 0, 0
    # The frozen backbone means no module input requires grad, so torch notes that Opacus's full
    # backward hooks fire on outputs only: exactly what per-sample gradients of LoRA need.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
        try:
            for sub_batches in sampler:
                optimizer.zero_grad(set_to_none=True)
                if not sub_batches:  # nothing sampled: the step still releases pure noise
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), device=device)  # type: ignore[attr-defined]
                    optimizer.step()
                    steps += 1
                    continue
                for position, indices in enumerate(sub_batches):
                    last = position == len(sub_batches) - 1
                    batch = _batch(dataset, indices, device)
                    loss = criterion(private(batch["image"], batch["spacing"]), batch["label"])
                    loss.backward()
                    optimizer.signal_skip_step(do_skip=not last)
                    optimizer.step()
                    if not last:
                        optimizer.zero_grad(set_to_none=True)  # keeps the clipped sum
                    total_loss += loss.item() * len(indices)
                    seen += len(indices)
                steps += 1
        finally:
            private._close()  # remove Opacus hooks: the model object may be reused
    return TrainResult(total_loss / max(seen, 1), len(dataset), steps, seen)


@torch.no_grad()
def predict(
    model: nn.Module, dataset: SiteData, *, batch_size: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Logits (N, K) float32 and labels ((N,) or (N, K)) of every item, on the CPU, in the
    order of a non-shuffled DA-bucketed pass (the same pairing for both)."""
    model.to(device).eval()
    logits_all, labels_all = [], []
    for indices in DABatchSampler(dataset.das, batch_size=batch_size, shuffle=False):
        batch = _batch(dataset, indices, device)
        logits_all.append(model(batch["image"], batch["spacing"]).float().cpu())
        labels_all.append(batch["label"].cpu())
    return torch.cat(logits_all), torch.cat(labels_all)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: SiteData,
    *,
    batch_size: int,
    device: torch.device,
    multi_label: bool = False,
) -> dict[str, float]:
    """Loss, accuracy, balanced accuracy and ROC AUC (macro over classes, MONAI's definition:
    :mod:`core.training.auc`).

    Balanced accuracy (the mean recall over the classes present; per label (TPR + TNR) / 2 for
    multi-label) does not reward predicting the majority class, which plain accuracy does on a
    site with 70% negatives.
    """
    logits, labels = predict(model, dataset, batch_size=batch_size, device=device)
    return metrics_from_logits(logits, labels, multi_label=multi_label)


def metrics_from_logits(logits: Tensor, labels: Tensor, *, multi_label: bool) -> dict[str, float]:
    """The metrics of :func:`evaluate` from logits (N, K) and labels ((N,) or (N, K))."""
    from core.training.auc import macro_roc_auc  # MONAI's numbers without importing MONAI

    criterion = loss_function(multi_label)
    n = len(labels)
    loss = float(criterion(logits, labels)) if n else float("nan")
    if multi_label:
        probs = torch.sigmoid(logits)
        accuracy = float(((probs > 0.5).float() == labels).float().mean())
        onehot = labels
    else:
        probs = torch.softmax(logits, dim=1)
        accuracy = float((probs.argmax(dim=1) == labels).float().mean())
        onehot = torch.nn.functional.one_hot(labels, num_classes=logits.shape[1]).float()
    present = onehot.sum(dim=0)
    usable = (present > 0) & (present < n)  # AUC needs both outcomes of a class
    balanced = balanced_accuracy(probs, labels, multi_label=multi_label)
    auc = macro_roc_auc(probs[:, usable], onehot[:, usable]) if usable.any() else float("nan")
    return {
        "loss": loss,
        "accuracy": accuracy,
        "balanced-accuracy": balanced,
        "auc": auc,
        "num-examples": n,
    }


def binary_scores(logits: Tensor) -> Tensor:
    """The positive-class score of a binary classifier: logit(1) - logit(0) for (N, 2) logits
    (monotone in softmax p(1)), the logit itself for (N, 1). -> (N,) float64."""
    if logits.dim() != 2 or logits.shape[1] not in (1, 2):
        raise ValueError(f"binary scores need (N, 1) or (N, 2) logits, got {tuple(logits.shape)}")
    scores = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
    return scores.double()


def rates_at_threshold(scores: Tensor, labels: Tensor, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity and balanced accuracy of "positive when score >= threshold".

    scores (N,), labels (N,) in {0, 1}. A rate whose class is absent is NaN, and so is the
    balanced accuracy then.
    """
    positive = labels.bool()
    decided = scores >= threshold
    sensitivity = float(decided[positive].double().mean()) if positive.any() else float("nan")
    specificity = float((~decided[~positive]).double().mean()) if (~positive).any() else math.nan
    return {
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced-accuracy": (sensitivity + specificity) / 2,
    }


def calibrate_threshold(scores: Tensor, labels: Tensor) -> float:
    """The decision threshold on ``scores`` (N,) that maximises balanced accuracy (Youden's J)
    on these labels (N,) in {0, 1}: a site picks it on its own validation split.

    Candidates are the midpoints between consecutive distinct scores (and one below/above
    all); among tied candidates the middle one is taken. Raises ValueError when the
    labels do not hold both classes (no threshold is identifiable then).
    """
    positive = labels.bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"threshold calibration needs both classes, got {n_pos} positive and {n_neg} "
            "negative examples; use a validation split that holds both"
        )
    values = torch.unique(scores.double())  # sorted ascending
    candidates = torch.cat(
        [values[:1] - 1.0, (values[1:] + values[:-1]) / 2, values[-1:] + 1.0]
    )  # (U + 1,)
    decided = scores.double()[None, :] >= candidates[:, None]  # (U + 1, N)
    tpr = decided[:, positive].double().mean(dim=1)
    tnr = (~decided[:, ~positive]).double().mean(dim=1)
    balanced = (tpr + tnr) / 2
    best = torch.nonzero(balanced >= balanced.max() - 1e-12).flatten()
    return float(candidates[best[len(best) // 2]])


def balanced_accuracy(probs: Tensor, labels: Tensor, *, multi_label: bool) -> float:
    """Mean recall over the classes present in ``labels`` (probs (N, K), labels (N,)); for
    multi-label (labels (N, K) 0/1, decision at 0.5), the mean over labels with both outcomes
    present of (TPR + TNR) / 2. NaN when no class qualifies."""
    if multi_label:
        decided, truth = probs > 0.5, labels.bool()
        rates = [
            (decided[truth[:, k], k].float().mean() + (~decided[~truth[:, k], k]).float().mean())
            / 2
            for k in range(labels.shape[1])
            if 0 < int(truth[:, k].sum()) < len(labels)
        ]
    else:
        predicted = probs.argmax(dim=1)
        rates = [(predicted[labels == c] == c).float().mean() for c in labels.unique()]
    return float(torch.stack(rates).mean()) if rates else float("nan")


# The evaluation metrics sites report and the server averages (weighted by examples).
# Binary sites report balanced accuracy, sensitivity and specificity at their own threshold.
EVAL_METRICS = ("loss", "accuracy", "balanced-accuracy", "auc", "sensitivity", "specificity")
# Segmentation sites report these (core.training.segmentation); averaged when reported.
SEGMENTATION_METRICS = ("dice", "hd95", "empty-correct")


def mean_metrics(per_site: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Example-weighted mean of site metrics, NaN values left out (the server aggregates
    evaluation with it; benchmarks average in-process with it)."""
    out: dict[str, float] = {}
    weights = {site: float(m["num-examples"]) for site, m in per_site.items()}
    reported = [k for k in SEGMENTATION_METRICS if any(k in m for m in per_site.values())]
    for key in (*EVAL_METRICS, *reported):
        pairs = [
            (float(m[key]), weights[s])
            for s, m in per_site.items()
            if key in m and np.isfinite(m[key])
        ]
        total = sum(w for _, w in pairs)
        out[key] = sum(v * w for v, w in pairs) / total if total else float("nan")
    return out
