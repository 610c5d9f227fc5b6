"""Reference statistics of the head's input: a shift and a whitening projection, fit on unlabeled
images when the backbone is built, shipped inside the backbone file.

Why: the pooled token features of a frozen backbone differ between cases by a few hundredths on
a common offset and are strongly correlated across channels, so a linear head trained by noisy
SGD barely moves (issue 14). Under DP-SGD every trained coordinate also receives its own noise,
so the head should read few, well-scaled coordinates. Centring the pooled features, projecting
them on their top principal directions and scaling each direction to unit variance does both.
Fitting that projection on site data would leak it; fit on the backbone's own (public or
unlabeled) pretraining images it costs no privacy, the way a public-data subspace is used in
private learning (Zhou, Wu & Banerjee, "Bypassing the Ambient Dimension: Private SGD with
Gradient Subspace Identification", ICLR 2021; Tramèr & Boneh, "Differentially Private Learning
Needs Better Features (or Much More Data)", ICLR 2021).

Where the backbone is pretrained on the sites' own unlabeled training images (the simulation
runner's ``--data`` without a backbone), the reference comes from those images too, like the
backbone's weights: a simulation convenience, not for a real deployment, where the backbone and
its reference come from public data.

The projection is part of what every site must share, so it lives in the backbone file under
``reference.<pool>.shift`` (F,) and ``reference.<pool>.projection`` (F, K) and is covered by the
backbone fingerprint (:mod:`core.model.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from core.model.pooling import pool_tokens

if TYPE_CHECKING:  # vit.py imports this module for FeatureReference
    from core.model.vit import UniversalViT

DEFAULT_COMPONENTS = 64  # measured: benchmarks/README.md ("head input")
KEY_PREFIX = "reference."


class ReferenceError(ValueError):
    """Reference statistics cannot be fit (too few images) or do not fit the model."""


@dataclass(frozen=True)
class FeatureReference:
    """``shift`` (F,) and ``projection`` (F, K): ``(x - shift) @ projection`` has zero mean and
    unit variance per component on the reference images (population variance)."""

    shift: Tensor
    projection: Tensor

    def __post_init__(self) -> None:
        if self.shift.dim() != 1 or self.projection.dim() != 2:
            raise ReferenceError(
                f"a feature reference is shift (F,) and projection (F, K), got "
                f"{tuple(self.shift.shape)} and {tuple(self.projection.shape)}"
            )
        if self.projection.shape[0] != self.shift.shape[0]:
            raise ReferenceError(
                f"shift has {self.shift.shape[0]} features, projection {self.projection.shape[0]}"
            )

    @property
    def features(self) -> int:
        return int(self.shift.shape[0])

    @property
    def components(self) -> int:
        return int(self.projection.shape[1])

    def to_state(self, pool: str) -> dict[str, Tensor]:
        return {
            f"{KEY_PREFIX}{pool}.shift": self.shift.contiguous(),
            f"{KEY_PREFIX}{pool}.projection": self.projection.contiguous(),
        }


def split_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, FeatureReference]]:
    """A backbone file's tensors -> (model tensors, references by pool name)."""
    model = {k: v for k, v in state.items() if not k.startswith(KEY_PREFIX)}
    pools = {k[len(KEY_PREFIX) :].rsplit(".", 1)[0] for k in state if k.startswith(KEY_PREFIX)}
    references = {}
    for pool in sorted(pools):
        shift = state.get(f"{KEY_PREFIX}{pool}.shift")
        projection = state.get(f"{KEY_PREFIX}{pool}.projection")
        if shift is None or projection is None:
            raise ReferenceError(f"reference for pool {pool!r} lacks its shift or projection")
        references[pool] = FeatureReference(shift, projection)
    return model, references


def fit_reference(features: Tensor, components: int = DEFAULT_COMPONENTS) -> FeatureReference:
    """PCA whitening of ``features`` (N, F): the mean, and the top ``min(components, N - 1, F)``
    principal directions each divided by its standard deviation. Signs are fixed (the largest
    entry of each direction is positive) so the same features give the same file everywhere.

    Raises ReferenceError for fewer than 2 images or directions of (numerically) zero variance.
    """
    if features.dim() != 2 or features.shape[0] < 2:
        raise ReferenceError(
            f"fitting a feature reference needs at least 2 images, got {features.shape[0]}"
        )
    data = features.double()
    n, width = data.shape
    shift = data.mean(dim=0)
    _, singular, vt = torch.linalg.svd(data - shift, full_matrices=False)
    k = min(components, n - 1, width)
    directions = vt[:k]  # (K, F)
    std = singular[:k] / n**0.5  # population std of each component
    if not bool((std > 1e-5 * std[0]).all()):  # float32 features: ~1e-7 is rounding
        raise ReferenceError(
            f"the reference images span fewer than {k} directions of the features; use more "
            "(or more varied) images, or fewer components"
        )
    largest = directions.gather(1, directions.abs().argmax(dim=1, keepdim=True))  # (K, 1)
    directions = directions * largest.sign()
    projection = (directions / std[:, None]).T  # (F, K)
    return FeatureReference(shift.float(), projection.float().contiguous())


@torch.no_grad()
def pooled_features(
    model: UniversalViT, batches: Iterable[tuple[Tensor, Tensor]], pool: str
) -> Tensor:
    """(N, F) pooled features of the backbone for batches of (images (B, C, D, H, W), spacing
    (B, 3) mm), in eval mode, on the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = [
        pool_tokens(model.forward_features(images.to(device), spacing), pool, model.config.norm_eps)
        for images, spacing in batches
    ]
    model.train(was_training)
    if not rows:
        raise ReferenceError("no reference images: pass at least two")
    return torch.cat(rows).cpu()
