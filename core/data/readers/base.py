"""What every reader shares: the :class:`Volume` it returns, the :class:`Reader` protocol, the
depth-first axis order and the spacing rules (header, else datalist, else a stated default).

Getting D (the through-plane axis) right is what lets SAC treat a 5 mm MR like a stack of
slices rather than a blurry cube: volumes with an affine are first turned to the closest
canonical RAS voxel order (:func:`to_canonical`), then :func:`depth_first` makes the axis with
the largest spacing depth; 2D images get a depth spacing of :data:`TWO_D_DEPTH_SPACING_MM`, so
their DA is the maximum (5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from core.data.errors import DatasetError

TWO_D_DEPTH_SPACING_MM = 1.0e4  # "infinitely thick": DA of a 2D image is the maximum, 5
DEFAULT_SPACING_MM = 1.0  # stated default when neither header nor datalist gives a spacing
AGREE = 0.01  # two spacing sources within 1 % agree; beyond, the disagreement is logged
SHEAR_TOLERANCE = 0.01  # |cos| between voxel axes (about 0.6 degrees) / in-plane step per gap
_TIE_TOLERANCE = 1e-3  # spacings within 0.1 % count as equal when choosing the depth axis


@dataclass(frozen=True)
class Volume:
    """An image as read: depth-first, native resolution, intensities as stored (HU for CT)."""

    array: np.ndarray  # (C, D, H, W) float32
    spacing: tuple[float, float, float]  # (d, h, w) mm
    calibrated: bool  # intensities in physical units (HU for CT) rather than display values


class Reader(Protocol):
    """Reads one file (or DICOM series folder) of its format as a depth-first :class:`Volume`.

    ``spacing_hint`` is the datalist's spacing (mm per file axis), used only where the header
    has none. Every problem with the file is raised as a
    :class:`~core.data.errors.DatasetError` naming it.
    """

    def __call__(self, path: Path, spacing_hint: Sequence[float] | None) -> Volume: ...


def depth_first(
    array: np.ndarray, spacing: Sequence[float], *, tie_axis: int
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Move the through-plane axis to the front.

    array: (C, A0, A1, A2) -> (C, D, H, W). The depth is a singleton axis if there is one (a 2D
    image, whose depth spacing becomes :data:`TWO_D_DEPTH_SPACING_MM`), else the axis with the
    largest spacing, ``tie_axis`` among equals. H and W keep their relative order.
    """
    sizes = array.shape[1:]
    singletons = [a for a in range(3) if sizes[a] == 1]
    if singletons:
        depth = singletons[-1]
    else:
        largest = max(spacing)
        tied = [a for a in range(3) if spacing[a] >= largest * (1 - _TIE_TOLERANCE)]
        depth = tie_axis if tie_axis in tied else tied[-1]
    rest = [a for a in range(3) if a != depth]
    out = _contiguous_by_slice(array.transpose(0, depth + 1, rest[0] + 1, rest[1] + 1))
    d = TWO_D_DEPTH_SPACING_MM if singletons else float(spacing[depth])
    return out, (d, float(spacing[rest[0]]), float(spacing[rest[1]]))


def _contiguous_by_slice(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of (C, D, H, W), one (H, W) slice at a time (no copy if it already
    is one). For a NIfTI stored with a flipped in-plane axis (LAS / LPS, common from DICOM
    converters) the whole-array copy is a transpose against the stride that misses the CPU
    cache: 3.5-17 s for a 512 x 512 x 200 float32 CT with ``np.ascontiguousarray`` against
    0.6-1.2 s slice by slice on this loaded 2-core machine; unflipped (RAS) both take about the
    same. Same values."""
    if array.flags.c_contiguous:
        return array
    out = np.empty(array.shape, dtype=array.dtype)
    for channel in range(array.shape[0]):
        for index in range(array.shape[1]):
            out[channel, index] = array[channel, index]
    return out


def to_canonical(
    array: np.ndarray, spacing: Sequence[float], affine: np.ndarray
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Permute/flip (C, A0, A1, A2) into the closest RAS voxel order; spacing follows the axes."""
    import nibabel as nib  # on the first NIfTI or DICOM volume, not with the readers

    ornt = nib.orientations.io_orientation(affine)
    out = array
    for axis in range(3):
        if ornt[axis, 1] < 0:
            out = np.flip(out, axis=axis + 1)
    order = np.argsort(ornt[:, 0])  # input axis that lands on each RAS axis
    out = out.transpose(0, *(int(a) + 1 for a in order))
    return out, (
        float(spacing[order[0]]),
        float(spacing[order[1]]),
        float(spacing[order[2]]),
    )


def as_float(array: np.ndarray, path: Path) -> np.ndarray:
    try:
        data = np.asarray(array, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise DatasetError(
            path, f"pixel type {array.dtype} is not numeric", "store scalar intensities"
        ) from err
    if not np.isfinite(data).all():
        raise DatasetError(
            path, "image contains NaN or infinite values", "replace non-finite voxels before use"
        )
    return data


def _valid(spacing: Sequence[float] | None, n: int) -> bool:
    return (
        spacing is not None
        and len(spacing) == n
        and all(math.isfinite(float(s)) and float(s) > 0 for s in spacing)
    )


def spacing_or_hint(
    header: Sequence[float] | None, hint: Sequence[float] | None, n: int, path: Path
) -> tuple[float, ...]:
    """Header spacing if valid, else the datalist's (which must match the image's axes)."""
    if header is not None and _valid(header, n):
        return tuple(float(s) for s in header)
    if hint is not None:
        if len(hint) != n:
            raise DatasetError(
                path,
                f"datalist field 'spacing' has {len(hint)} values but the image has {n} spatial"
                " axes",
                f"give {n} spacings in mm, in the file's axis order",
            )
        return tuple(float(s) for s in hint)
    if header is not None:
        raise DatasetError(
            path,
            f"header spacing {tuple(header)} is not positive and finite",
            "add a 'spacing' field (mm per file axis) to this item in the datalist",
        )
    return (DEFAULT_SPACING_MM,) * n


def planar(
    pixels: np.ndarray,
    path: Path,
    spacing_hint: Sequence[float] | None,
    *,
    calibrated: bool,
    header_spacing: Sequence[float] | None = None,
) -> Volume:
    """(H, W) or (H, W, C) -> (C, 1, H, W) with the 2D depth spacing."""
    channels_first = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
    row, col = spacing_or_hint(header_spacing, spacing_hint, 2, path)
    data = as_float(channels_first, path)[:, None]
    return Volume(np.ascontiguousarray(data), (TWO_D_DEPTH_SPACING_MM, row, col), calibrated)


def format_mm(values: Sequence[float] | np.ndarray) -> str:
    return "x".join(f"{float(v):.4g}" for v in values)
