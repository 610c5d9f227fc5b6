"""ROC AUC without MONAI: the number ``monai.metrics.compute_roc_auc`` gives, in float64.

Every site's evaluate message computed its AUC with MONAI, and importing ``monai.metrics`` (with
the scikit-learn and matplotlib it pulls in) took 3-7 s of a 2-core machine, paid once per
evaluate message in a deployment, where Flower starts a ClientApp process per message
(``benchmarks/start_cost.py``); the evaluation itself takes milliseconds. MONAI's value is the
Mann-Whitney statistic: over all (positive, negative) pairs, 1 when the positive scores higher,
1/2 on a tie, divided once by ``P * N``. ``U`` is a multiple of 1/2 below 2^52 here, so it is
exact in float64 and the one division rounds it once. MONAI's loop gives the same float64 value
when no two scores tie; when some do, NumPy 2's promotion turns its counters into float32 and
its result is that value rounded to float32 (a relative difference below 6e-8, far below the
three decimals a site reports). ``tests/training/test_auc.py`` checks both against MONAI.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """AUC of one binary column: ``scores`` (N,) any real scores, ``labels`` (N,) 0 or 1.

    NaN when all labels are one class or any score is NaN (MONAI's loop would rank NaN
    scores by its sort order; an AUC of a NaN output means nothing).
    """
    y = labels.detach().cpu().to(torch.float64).numpy().reshape(-1)
    s = scores.detach().cpu().numpy().reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ")
    positive = y == 1
    n_pos = int(positive.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0 or np.isnan(s).any():
        return float("nan")
    # Group equal scores; per group its positives and negatives; negatives ranked below.
    values, group = np.unique(s, return_inverse=True)
    pos = np.bincount(group, weights=positive, minlength=len(values)).astype(np.int64)
    neg = np.bincount(group, weights=~positive, minlength=len(values)).astype(np.int64)
    below = np.cumsum(neg) - neg
    twice_u = int(np.sum(pos * (2 * below + neg)))
    return (twice_u / 2) / float(n_neg * n_pos)


def macro_roc_auc(scores: Tensor, onehot: Tensor) -> float:
    """Mean over the columns of :func:`roc_auc` (``scores`` and ``onehot`` (N, K)), as
    ``compute_roc_auc(scores, onehot, average="macro")``; a single column is that column's."""
    if scores.ndim == 1 or scores.shape[1] == 1:
        return roc_auc(scores.reshape(-1), onehot.reshape(-1))
    if scores.shape != onehot.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(onehot.shape)} differ")
    return float(np.mean([roc_auc(scores[:, k], onehot[:, k]) for k in range(scores.shape[1])]))
