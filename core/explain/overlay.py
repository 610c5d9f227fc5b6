"""PNG overlays of a relevance map on its image, for a clinician to look at (matplotlib, Agg).

2D: the image with the heat map. 3D: the slice of maximum relevance in each plane (axial =
depth, coronal, sagittal; displayed with the voxel spacing's aspect ratio) and a montage of up
to eight depth slices around the most relevant one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from core.io import atomic_path

HEAT_ALPHA = 0.45
MONTAGE_SLICES = 8
HEAT_CMAP = "inferno"
COLORBAR_LABEL = "relevance (1 = this case's maximum)"


def _panel(axis: Any, image: np.ndarray, heat: np.ndarray, title: str, aspect: float) -> None:
    axis.imshow(image, cmap="gray", aspect=aspect, interpolation="nearest")
    axis.imshow(heat, cmap=HEAT_CMAP, alpha=HEAT_ALPHA * heat, vmin=0.0, vmax=1.0, aspect=aspect)
    axis.set_title(title, fontsize=8)
    axis.axis("off")


def render_overlay(
    image: Tensor,
    relevance: Tensor,
    path: str | Path,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    title: str = "",
) -> Path:
    """Write the overlay of ``relevance`` (D, H, W, in [0, 1]) on ``image`` (C, D, H, W; the
    first channel is shown) to ``path`` (PNG), with a colour bar of the relevance scale.
    ``spacing``: (d, h, w) in mm, for the aspect ratio of coronal and sagittal views.
    Raises ValueError when the grids differ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volume = image[0].detach().float().cpu().numpy()  # (D, H, W)
    heat = relevance.detach().float().cpu().numpy()
    if volume.shape != heat.shape:
        raise ValueError(f"image grid {volume.shape} and relevance grid {heat.shape} differ")
    depth = volume.shape[0]
    if depth == 1:
        figure, axis = plt.subplots(1, 1, figsize=(3.2, 3.4))
        _panel(axis, volume[0], heat[0], title, aspect=1.0)
    else:
        d, h, w = np.unravel_index(int(heat.argmax()), heat.shape)
        s_d, s_h, s_w = (float(s) for s in spacing)
        start = int(np.clip(d - MONTAGE_SLICES // 2, 0, max(depth - MONTAGE_SLICES, 0)))
        montage = list(range(start, min(start + MONTAGE_SLICES, depth)))
        figure, axes = plt.subplots(
            2, max(3, len(montage)), figsize=(1.6 * max(3, len(montage)), 3.6)
        )
        for axis in axes.flat:
            axis.axis("off")
        _panel(axes[0, 0], volume[d], heat[d], f"axial {d}", 1.0)
        _panel(axes[0, 1], volume[:, h, :], heat[:, h, :], f"coronal {h}", s_d / s_h)
        _panel(axes[0, 2], volume[:, :, w], heat[:, :, w], f"sagittal {w}", s_d / s_w)
        for axis, index in zip(axes[1], montage, strict=False):
            _panel(axis, volume[index], heat[index], f"slice {index}", 1.0)
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    scale = plt.cm.ScalarMappable(cmap=HEAT_CMAP, norm=matplotlib.colors.Normalize(0.0, 1.0))
    bar = figure.colorbar(scale, ax=figure.axes, fraction=0.04, pad=0.02)
    bar.set_label(COLORBAR_LABEL, fontsize=7)
    bar.ax.tick_params(labelsize=6)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)
    return Path(path)
