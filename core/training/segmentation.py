"""Segmentation loss and evaluation: Dice + cross-entropy to train, Dice and HD95 to judge.

Training runs through :func:`core.training.loops.train_plain` / ``train_dp`` with the loss of
:func:`segmentation_loss`: MONAI's ``DiceCELoss`` with ``batch=False``, i.e. the mean over the
batch of each image's own Dice + CE loss. That is the form DP-SGD needs (Opacus
``loss_reduction="mean"``): each image's gradient is clipped as a whole, so the privacy unit is
one image (one volume), never one voxel.

Evaluation (:func:`evaluate_segmentation`) reports, per site, the mean Dice of the foreground
classes over the images that contain them (MONAI ``DiceMetric``, ``ignore_empty``), the 95th
percentile Hausdorff distance in mm (MONAI ``HausdorffDistanceMetric`` with each image's own
spacing; 2D images are measured in 2D) over images where both the truth and the prediction
hold foreground, the fraction of lesion-free images predicted lesion-free, and the loss.
MONAI is imported on first use (it takes seconds).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from core.data import DABatchSampler, collate
from core.training.loops import SiteData


def segmentation_loss() -> nn.Module:
    """MONAI ``DiceCELoss`` on logits (N, K, ...) and label maps (N, 1, ...), per image."""
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, batch=False)


def _case_metrics(pred: Tensor, truth: Tensor, spacing: Tensor, num_classes: int) -> dict[str, Any]:
    """Dice, HD95 and emptiness of one case. pred and truth (D, H, W) int64 class maps."""
    from monai.metrics import compute_dice, compute_hausdorff_distance

    planar = pred.shape[0] == 1  # a 2D image: measured in-plane
    if planar:
        pred, truth, spacing = pred[0], truth[0], spacing[1:]
    onehot_pred = nn.functional.one_hot(pred, num_classes).movedim(-1, 0)[None].float()
    onehot_truth = nn.functional.one_hot(truth, num_classes).movedim(-1, 0)[None].float()
    dice = compute_dice(onehot_pred, onehot_truth, include_background=False, ignore_empty=True)
    present = bool((truth > 0).any())
    found = bool((pred > 0).any())
    hd95 = math.nan
    if present and found:
        with warnings.catch_warnings():  # MONAI 1.6 warns about its own internal argument
            warnings.filterwarnings("ignore", "monai.metrics.utils get_mask_edges", FutureWarning)
            distance = compute_hausdorff_distance(
                onehot_pred,
                onehot_truth,
                include_background=False,
                percentile=95,
                spacing=[float(s) for s in spacing],
            )
        finite = distance[torch.isfinite(distance)]
        hd95 = float(finite.mean()) if finite.numel() else math.nan
    values = dice[torch.isfinite(dice)]
    return {
        "dice": float(values.mean()) if values.numel() else math.nan,
        "hd95": hd95,
        "present": present,
        "found": found,
    }


@torch.no_grad()
def predict_masks(
    model: nn.Module, dataset: SiteData, *, batch_size: int, device: torch.device
) -> list[dict[str, Tensor]]:
    """Per item, in dataset order: ``pred`` and ``truth`` (D, H, W) int64, ``spacing`` (3,),
    ``image`` (C, D, H, W) and ``loss`` (the item's Dice + CE loss)."""
    model.to(device).eval()
    criterion = segmentation_loss()
    out: list[dict[str, Tensor]] = [{} for _ in range(len(dataset))]
    for indices in DABatchSampler(dataset.das, batch_size=batch_size, shuffle=False):
        batch = collate([dataset[i] for i in indices])
        logits = model(batch["image"].to(device), batch["spacing"].to(device)).float().cpu()
        for row, index in enumerate(indices):
            out[index] = {
                "pred": logits[row].argmax(dim=0),
                "truth": batch["label"][row, 0],
                "spacing": batch["spacing"][row],
                "image": batch["image"][row],
                "loss": criterion(logits[row : row + 1], batch["label"][row : row + 1]),
            }
    return out


def evaluate_segmentation(
    model: nn.Module,
    dataset: SiteData,
    *,
    num_classes: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """``dice`` (mean over images holding foreground), ``hd95`` (mm, over images where truth
    and prediction hold foreground), ``empty-correct`` (lesion-free images predicted empty),
    ``loss``, ``num-examples``; NaN where no image qualifies."""
    cases = predict_masks(model, dataset, batch_size=batch_size, device=device)
    rows = [
        _case_metrics(c["pred"], c["truth"], c["spacing"], num_classes) | {"loss": c["loss"]}
        for c in cases
    ]

    def mean(values: list[float]) -> float:
        finite = [v for v in values if math.isfinite(v)]
        return float(np.mean(finite)) if finite else math.nan

    empty = [not r["found"] for r in rows if not r["present"]]
    return {
        "dice": mean([r["dice"] for r in rows if r["present"]]),
        "hd95": mean([r["hd95"] for r in rows]),
        "empty-correct": float(np.mean(empty)) if empty else math.nan,
        "loss": mean([float(r["loss"]) for r in rows]),
        "num-examples": len(rows),
    }
