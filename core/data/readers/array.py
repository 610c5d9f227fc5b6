"""In-memory arrays: one row of a MedMNIST-style ``.npz`` (the datalist names the file and
the row; :mod:`core.data.dataset` loads the arrays once). No header and no anatomical frame:
the spacing is the datalist's or the default, and the largest-spacing axis becomes depth, ties
keeping axis 0 (numpy's ``(D, H, W)`` habit)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.data.errors import DatasetError
from core.data.readers.base import Volume, as_float, depth_first, planar, spacing_or_hint


def volume_from_array(
    array: np.ndarray, path: Path, spacing_hint: Sequence[float] | None = None
) -> Volume:
    """An in-memory array (one npz row): ``(H, W)``, ``(H, W, 1|3)``, ``(D, H, W)`` or
    ``(D, H, W, C)``; no header, so the spacing is the datalist's or the default."""
    pixels = np.asarray(array)
    if pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] in (1, 3)):
        return planar(pixels, path, spacing_hint, calibrated=False)
    if pixels.ndim in (3, 4):
        channels_first = pixels[None] if pixels.ndim == 3 else np.moveaxis(pixels, -1, 0)
        spacing = spacing_or_hint(None, spacing_hint, 3, path)
        data, dhw = depth_first(as_float(channels_first, path), spacing, tie_axis=0)
        return Volume(data, dhw, calibrated=False)
    raise DatasetError(
        path,
        f"array of shape {pixels.shape} is neither a 2D image nor a 3D volume",
        "store (N, H, W), (N, H, W, 3), (N, D, H, W) or (N, D, H, W, C) arrays",
    )
