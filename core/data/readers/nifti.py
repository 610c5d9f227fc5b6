"""NIfTI-1 and NIfTI-2 (``.nii``, ``.nii.gz``, or found by their magic, also inside gzip).

Spacing and orientation come from one matrix: the sform when its code is set and it is
invertible, else the qform when its code is set, else pixdim. The spacing is the length of the
chosen affine's voxel axes; another source disagreeing by more than 1 % is logged as a warning
naming the file. A sheared affine is refused. A 4th axis holds channels (the Decathlon
convention); RGB24 / RGBA32 records become three colour channels.
"""

from __future__ import annotations

import gzip
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.data.errors import DatasetError
from core.data.readers.base import (
    AGREE,
    SHEAR_TOLERANCE,
    TWO_D_DEPTH_SPACING_MM,
    Volume,
    as_float,
    depth_first,
    format_mm,
    spacing_or_hint,
    to_canonical,
)

logger = logging.getLogger(__name__)

SUFFIXES = (".nii", ".nii.gz")


def has_magic(head: bytes) -> bool:
    """The NIfTI-1 (at byte 344) or NIfTI-2 (at byte 4) magic in a file's first 352 bytes."""
    return head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] == b"n+2\x00"


def _load_nifti(path: Path) -> Any:
    """A nibabel image; a file whose name does not say NIfTI (found by its magic) is parsed
    from its bytes, since nibabel picks the image class by the suffix. nibabel is imported
    here, on the first NIfTI read: a site of PNG or DICOM files, or one served from its
    preprocessing cache, never loads it (benchmarks/start_cost.py)."""
    import nibabel as nib

    if path.name.lower().endswith(SUFFIXES):
        return nib.load(str(path))
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    image_class = nib.Nifti2Image if raw[4:8] == b"n+2\x00" else nib.Nifti1Image
    return image_class.from_bytes(raw)


def read_nifti(path: Path, spacing_hint: Sequence[float] | None) -> Volume:
    try:
        image: Any = _load_nifti(path)
        colour = image.header.get_data_dtype().names is not None  # RGB24 / RGBA32 records
        data = (
            np.asanyarray(image.dataobj)
            if colour
            else image.get_fdata(dtype=np.float32)  # applies scl_slope / scl_inter
        )
    except Exception as err:  # nibabel raises many types for damaged files
        raise DatasetError(
            path,
            f"NIfTI file is truncated or corrupt ({type(err).__name__}: {err})",
            "re-export or re-download the image; check it opens with nibabel.load",
        ) from err
    if colour:
        data = _nifti_colour(path, data)  # (3, X, Y, Z)
    else:
        if data.ndim == 2:
            data = data[:, :, None]
        if data.ndim == 3:
            data = data[None]
        elif data.ndim == 4:  # Decathlon convention: the 4th axis holds channels (modalities)
            data = np.moveaxis(data, -1, 0)
        else:
            raise DatasetError(
                path,
                f"NIfTI image has {data.ndim} dimensions {data.shape}",
                "store 2D, 3D, or 4D with channels on the 4th axis",
            )
    affine, header_spacing = _nifti_geometry(path, image.header)
    hint = spacing_hint
    if hint is not None and len(hint) == 2 and data.shape[3] == 1:
        hint = (*hint, TWO_D_DEPTH_SPACING_MM)
    spacing = spacing_or_hint(header_spacing, hint, 3, path)
    array = as_float(data, path)
    if affine is not None:
        array, spacing = to_canonical(array, spacing, affine)
    oriented, dhw = depth_first(array, spacing, tie_axis=2)
    return Volume(oriented, dhw, calibrated=not colour)


def _nifti_colour(path: Path, data: np.ndarray) -> np.ndarray:
    """RGB24 / RGBA32 records (X, Y[, Z]) -> (3, X, Y, Z) colour channels, alpha dropped."""
    names = data.dtype.names or ()
    label = "RGBA32" if "A" in names else "RGB24"
    if not {"R", "G", "B"} <= set(names):
        raise DatasetError(
            path, f"NIfTI datatype {data.dtype} is not scalar, RGB24 or RGBA32", "store scalars"
        )
    if data.ndim not in (2, 3):
        raise DatasetError(
            path,
            f"{label} NIfTI has {data.ndim} dimensions {data.shape}; colour is read only for 2D"
            " or 3D images",
            "store one colour volume per file (or split the 4th axis into files)",
        )
    planes = np.stack([np.asarray(data[c], dtype=np.float32) for c in "RGB"])
    return planes if planes.ndim == 4 else planes[..., None]


def _nifti_geometry(path: Path, header: Any) -> tuple[np.ndarray | None, tuple[float, ...]]:
    """The affine that places the voxels, and the spacing read from that same affine.

    Rule: the sform if its code is set and it is invertible, else the qform if its code is set,
    else pixdim (no orientation: voxel axes kept as stored). The spacing is the length of the
    chosen affine's three voxel axes; pixdim or the other form disagreeing by more than 1 % is
    logged. A sheared affine (voxel axes not perpendicular) is refused.
    """
    zooms = tuple(float(z) for z in header.get_zooms()[:3])
    zooms = zooms + (1.0,) * (3 - len(zooms))  # a 2D header has two zooms
    candidates = []
    for name, (matrix, code) in (
        ("sform", header.get_sform(coded=True)),
        ("qform", header.get_qform(coded=True)),
    ):
        if code and matrix is not None:
            usable = np.isfinite(matrix).all() and abs(np.linalg.det(matrix[:3, :3])) > 0
            if usable:
                candidates.append((name, np.asarray(matrix, dtype=np.float64)))
            else:
                logger.warning("%s: the %s is set but singular; it is ignored", path, name)
    if not candidates:
        if header.get_sform(coded=True)[1] or header.get_qform(coded=True)[1]:
            logger.warning("%s: no usable affine; voxel axes kept as stored", path)
        return None, zooms
    name, affine = candidates[0]
    axes = affine[:3, :3]
    lengths = np.linalg.norm(axes, axis=0)
    spacing = tuple(float(v) for v in lengths)
    cosines = np.abs((axes.T @ axes) / np.outer(lengths, lengths))[np.triu_indices(3, 1)]
    if cosines.max() > SHEAR_TOLERANCE:
        angle = math.degrees(math.acos(min(float(cosines.max()), 1.0)))
        raise DatasetError(
            path,
            f"the {name} is sheared: two voxel axes meet at {angle:.1f} degrees, not 90 (a"
            " tilted acquisition saved without correction)",
            "resample the image onto a rectangular grid first (e.g. dcm2niix with its default"
            " gantry-tilt correction, or nibabel.processing.resample_from_to)",
        )
    for other, values in [(o, np.linalg.norm(m[:3, :3], axis=0)) for o, m in candidates[1:]] + [
        ("pixdim", np.asarray(zooms))
    ]:
        if not np.allclose(values, lengths, rtol=AGREE, atol=0):
            logger.warning(
                "%s: the %s gives voxel spacing %s mm but the %s gives %s mm; the %s is used"
                " (NIfTI rule: sform, then qform, then pixdim)",
                path,
                name,
                format_mm(lengths),
                other,
                format_mm(values),
                name,
            )
    return affine, spacing
