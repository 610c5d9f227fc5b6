"""What the classification head reads: the patch tokens pooled into one feature vector per case.

Pools: "mean" of the patch tokens (as MAE/BEiT fine-tune; MIM pretraining trains patch tokens,
never the CLS token); "mean-max" (the mean and the per-channel max, concatenated: a small lesion
moves the max far more than the mean); "contrast" (per channel, how far the highest and the
lowest patch token stand out from the case's own token mean, in units of its token std: a site's
offset or scale cancels); "stats" (per channel the mean, max, min and std of the patch tokens:
what a converged linear probe of the frozen backbone reads best, benchmarks/README.md); "cls".
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.model.sizes import POOLS

_FEATURES_PER_CHANNEL = {"mean-max": 2, "contrast": 2, "stats": 4}


def pool_width(pool: str, embed_dim: int) -> int:
    """Length F of the pooled feature vector for a model of width ``embed_dim``."""
    return embed_dim * _FEATURES_PER_CHANNEL.get(pool, 1)


def pool_tokens(features: Tensor, pool: str, eps: float) -> Tensor:
    """(N, 1 + T, E) normalised tokens, CLS first -> (N, F) with F = ``pool_width(pool, E)``.

    "mean-max": mean, then max; "contrast": (max - mean) / std, then (mean - min) / std;
    "stats": mean, max, min, std. All over the T patch tokens per channel; std is the population
    std with ``eps`` added to the variance. Raises ValueError for an unknown pool.
    """
    if pool == "cls":
        return features[:, 0]
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    patches = features[:, 1:]  # (N, T, E)
    mean = patches.mean(dim=1)  # (N, E)
    if pool == "mean":
        return mean
    if pool == "mean-max":
        return torch.cat([mean, patches.amax(dim=1)], dim=1)
    std = (patches.var(dim=1, unbiased=False) + eps).sqrt()  # (N, E)
    if pool == "stats":
        return torch.cat([mean, patches.amax(dim=1), patches.amin(dim=1), std], dim=1)
    high = (patches.amax(dim=1) - mean) / std
    low = (mean - patches.amin(dim=1)) / std
    return torch.cat([high, low], dim=1)
