"""``core.training.auc`` against MONAI's ``compute_roc_auc`` (the oracle).

Bit for bit when no two scores tie; with ties MONAI computes in float32 (NumPy 2 promotes its
counters), so its value is ours rounded to float32."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_roc_auc

from core.training.auc import macro_roc_auc, roc_auc
from core.training.loops import metrics_from_logits


def _cases():
    generator = torch.Generator().manual_seed(7)
    for n in (2, 3, 5, 17, 64, 301):
        for levels in (2, 5, None):  # few distinct scores (many ties) or continuous ones
            scores = torch.rand(n, generator=generator)
            if levels is not None:
                scores = torch.round(scores * (levels - 1)) / (levels - 1)
            labels = (torch.rand(n, generator=generator) < 0.4).float()
            labels[0], labels[-1] = 0.0, 1.0  # both classes present
            yield scores, labels


def monai_value(ours: float, scores: torch.Tensor) -> float:
    """What MONAI returns for our value: the same when no two scores tie, else float32."""
    tied = len(torch.unique(scores)) < scores.numel()
    return float(np.float32(ours)) if tied else ours


@pytest.mark.parametrize(("scores", "labels"), list(_cases()))
def test_one_column_equals_monai(scores, labels):
    ours = roc_auc(scores, labels)
    assert monai_value(ours, scores) == float(compute_roc_auc(scores, labels))  # type: ignore[arg-type]
    assert ours == pytest.approx(float(compute_roc_auc(scores, labels)), rel=1.2e-7, abs=0)  # type: ignore[arg-type]


def test_macro_over_softmax_columns_equals_monai():
    generator = torch.Generator().manual_seed(3)
    for classes in (2, 3, 4):
        logits = torch.randn(90, classes, generator=generator)
        labels = torch.arange(90) % classes
        onehot = torch.nn.functional.one_hot(labels, classes).float()
        probs = torch.softmax(logits, dim=1)
        expected = compute_roc_auc(probs, onehot, average="macro")
        assert macro_roc_auc(probs, onehot) == float(expected)  # type: ignore[arg-type]
        single = compute_roc_auc(probs[:, :1], onehot[:, :1])
        assert macro_roc_auc(probs[:, :1], onehot[:, :1]) == float(single)  # type: ignore[arg-type]
        logits[::7] = logits[0]  # tied rows: MONAI's float32 rounding, within its precision
        probs = torch.softmax(logits, dim=1)
        expected = compute_roc_auc(probs, onehot, average="macro")
        assert macro_roc_auc(probs, onehot) == pytest.approx(float(expected), rel=2.5e-7, abs=0)  # type: ignore[arg-type]


def test_known_values_and_degenerate_inputs():
    assert roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0])) == 1.0
    assert roc_auc(torch.tensor([0.9, 0.1]), torch.tensor([0.0, 1.0])) == 0.0
    assert roc_auc(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.0, 1.0, 1.0])) == 0.5
    assert math.isnan(roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])))
    assert math.isnan(roc_auc(torch.tensor([float("nan"), 0.2]), torch.tensor([0.0, 1.0])))
    with pytest.raises(ValueError, match="differ"):
        roc_auc(torch.zeros(3), torch.zeros(4))


def test_site_metrics_keep_monais_auc():
    """What a site reports (``metrics_from_logits``) is the AUC MONAI gave before."""
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(40, 2, generator=generator)
    labels = torch.randint(0, 2, (40,), generator=generator)
    labels[:2] = torch.tensor([0, 1])
    probs = torch.softmax(logits, dim=1)
    onehot = torch.nn.functional.one_hot(labels, 2).float()
    metrics = metrics_from_logits(logits, labels, multi_label=False)
    assert metrics["auc"] == float(compute_roc_auc(probs, onehot, average="macro"))  # type: ignore[arg-type]
    multi = (torch.rand(40, 3, generator=generator) < 0.5).float()
    multi[0], multi[1] = 0.0, 1.0
    metrics = metrics_from_logits(logits[:, :1].repeat(1, 3), multi, multi_label=True)
    expected = compute_roc_auc(torch.sigmoid(logits[:, :1].repeat(1, 3)), multi, average="macro")
    assert metrics["auc"] == float(expected)  # type: ignore[arg-type]
