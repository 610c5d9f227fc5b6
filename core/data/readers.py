"""Read medical images from disk into depth-first arrays with their voxel spacing.

Whatever the format, a reader returns a :class:`Volume`: ``(C, D, H, W)`` with D the
through-plane axis, and the spacing ``(d, h, w)`` in mm. Getting D right is what lets SAC treat
a 5 mm MR like a stack of slices rather than a blurry cube:

* Volumes with an affine (NIfTI, DICOM series) are first turned to the closest canonical RAS
  voxel order (axis permutations and flips only, no resampling), so every site presents anatomy
  the same way. Then the axis with the largest spacing becomes depth; ties (isotropic data) keep
  the superior-inferior axis, i.e. axial slices. The other two axes keep their RAS order.
* Volumes without an affine (npz arrays) have no anatomical frame: the largest-spacing axis
  becomes depth, ties keep axis 0 (numpy's ``(D, H, W)`` habit).
* 2D images (PNG, JPEG, a single DICOM slice, a NIfTI with one slice) become ``D == 1`` with a
  depth spacing of :data:`TWO_D_DEPTH_SPACING_MM`, so their DA is the maximum (5).

Spacing comes from the header where the format has one (NIfTI zooms; DICOM PixelSpacing or
ImagerPixelSpacing and slice positions); otherwise from the datalist, else
:data:`DEFAULT_SPACING_MM` per axis.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from core.data.errors import DatasetError

logger = logging.getLogger(__name__)

TWO_D_DEPTH_SPACING_MM = 1.0e4  # "infinitely thick": DA of a 2D image is the maximum, 5
DEFAULT_SPACING_MM = 1.0  # stated default when neither header nor datalist gives a spacing
_TIE_TOLERANCE = 1e-3  # spacings within 0.1 % count as equal when choosing the depth axis
_SLICE_GAP_TOLERANCE = 0.1  # DICOM slice gaps may differ from their median by 10 %
_PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


@dataclass(frozen=True)
class Volume:
    """An image as read: depth-first, native resolution, intensities as stored (HU for CT)."""

    array: np.ndarray  # (C, D, H, W) float32
    spacing: tuple[float, float, float]  # (d, h, w) mm
    calibrated: bool  # intensities in physical units (HU for CT) rather than display values


def image_format(path: Path) -> str:
    """``"nifti"``, ``"dicom"`` or ``"pillow"``; raises DatasetError for a missing/unknown file."""
    if not path.exists():
        raise DatasetError(
            path,
            "image file not found",
            f"check the path (relative paths start at the datalist's folder {path.parent})",
        )
    name = path.name.lower()
    if path.is_dir() or name.endswith(_DICOM_SUFFIXES):
        return "dicom"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(_PILLOW_SUFFIXES):
        return "pillow"
    if "." not in name:
        with path.open("rb") as handle:
            if handle.read(132)[128:] == b"DICM":
                return "dicom"
    raise DatasetError(
        path,
        "unsupported image format",
        "use NIfTI (.nii, .nii.gz), DICOM (file or series folder), PNG or JPEG",
    )


def read_image(path: Path, spacing_hint: Sequence[float] | None = None) -> Volume:
    """Read one image file (or DICOM series folder); ``spacing_hint`` is the datalist's spacing."""
    kind = image_format(path)
    if kind == "nifti":
        return _read_nifti(path, spacing_hint)
    if kind == "dicom":
        return _read_dicom(path, spacing_hint)
    return _read_pillow(path, spacing_hint)


def volume_from_array(
    array: np.ndarray, path: Path, spacing_hint: Sequence[float] | None = None
) -> Volume:
    """An in-memory array (one npz row): ``(H, W)``, ``(H, W, 1|3)``, ``(D, H, W)`` or
    ``(D, H, W, C)``; no header, so the spacing is the datalist's or the default."""
    pixels = np.asarray(array)
    if pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] in (1, 3)):
        return _planar(pixels, path, spacing_hint, calibrated=False)
    if pixels.ndim in (3, 4):
        channels_first = pixels[None] if pixels.ndim == 3 else np.moveaxis(pixels, -1, 0)
        spacing = _spacing_or_hint(None, spacing_hint, 3, path)
        data, dhw = depth_first(_as_float(channels_first, path), spacing, tie_axis=0)
        return Volume(data, dhw, calibrated=False)
    raise DatasetError(
        path,
        f"array of shape {pixels.shape} is neither a 2D image nor a 3D volume",
        "store (N, H, W), (N, H, W, 3), (N, D, H, W) or (N, D, H, W, C) arrays",
    )


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
    out = np.ascontiguousarray(array.transpose(0, depth + 1, rest[0] + 1, rest[1] + 1))
    d = TWO_D_DEPTH_SPACING_MM if singletons else float(spacing[depth])
    return out, (d, float(spacing[rest[0]]), float(spacing[rest[1]]))


def to_canonical(
    array: np.ndarray, spacing: Sequence[float], affine: np.ndarray
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Permute/flip (C, A0, A1, A2) into the closest RAS voxel order; spacing follows the axes."""
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


def _as_float(array: np.ndarray, path: Path) -> np.ndarray:
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


def _spacing_or_hint(
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


def _planar(
    pixels: np.ndarray,
    path: Path,
    spacing_hint: Sequence[float] | None,
    *,
    calibrated: bool,
    header_spacing: Sequence[float] | None = None,
) -> Volume:
    """(H, W) or (H, W, C) -> (C, 1, H, W) with the 2D depth spacing."""
    channels_first = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
    row, col = _spacing_or_hint(header_spacing, spacing_hint, 2, path)
    data = _as_float(channels_first, path)[:, None]
    return Volume(np.ascontiguousarray(data), (TWO_D_DEPTH_SPACING_MM, row, col), calibrated)


# ---------------------------------------------------------------------------------------- NIfTI


def _read_nifti(path: Path, spacing_hint: Sequence[float] | None) -> Volume:
    try:
        image: Any = nib.load(str(path))
        data = image.get_fdata(dtype=np.float32)  # applies scl_slope / scl_inter
    except Exception as err:  # nibabel raises many types for damaged files
        raise DatasetError(
            path,
            f"NIfTI file is truncated or corrupt ({type(err).__name__}: {err})",
            "re-export or re-download the image; check it opens with nibabel.load",
        ) from err
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
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    zooms = zooms + (1.0,) * (3 - len(zooms))  # a 2D header has two zooms
    hint = spacing_hint
    if hint is not None and len(hint) == 2 and data.shape[3] == 1:
        hint = (*hint, TWO_D_DEPTH_SPACING_MM)
    spacing = _spacing_or_hint(zooms, hint, 3, path)
    data = _as_float(data, path)
    affine = np.array(image.affine, dtype=np.float64)
    if np.isfinite(affine).all() and abs(np.linalg.det(affine[:3, :3])) > 0:
        data, spacing = to_canonical(data, spacing, affine)
    else:
        logger.warning("%s: affine is singular; voxel axes kept as stored", path)
    oriented, dhw = depth_first(data, spacing, tie_axis=2)
    return Volume(oriented, dhw, calibrated=True)


# ---------------------------------------------------------------------------------------- DICOM


def _read_dicom(path: Path, spacing_hint: Sequence[float] | None) -> Volume:
    if path.is_file():
        return _dicom_slice(path, _dcmread(path), spacing_hint)
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
    )
    if not files:
        raise DatasetError(path, "DICOM series folder is empty", "put the series' slices in it")
    datasets = [_dcmread(f) for f in files]
    if len(datasets) == 1:
        return _dicom_slice(files[0], datasets[0], spacing_hint)
    return _dicom_series(path, files, datasets, spacing_hint)


def _dcmread(path: Path) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as err:
        raise DatasetError(
            path, f"not a DICOM file ({err})", "export it as a DICOM Part 10 file (with preamble)"
        ) from err
    except Exception as err:
        raise DatasetError(
            path, f"DICOM file is truncated or corrupt ({err})", "re-export the file"
        ) from err
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DatasetError(
            path,
            "DICOM file has no pixel data (no PixelData element)",
            "point the datalist at image files, not reports or presentation states",
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DatasetError(
            path,
            f"multi-frame DICOM ({frames} frames) is not supported",
            "convert the series to NIfTI (e.g. with dcm2niix) and list the .nii.gz",
        )
    return ds


def _dicom_pixels(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """(H, W) or (H, W, 3) in modality units (HU for CT); MONOCHROME1 turned positive."""
    try:
        pixels = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)
    except Exception as err:  # pydicom raises many types for short or undecodable data
        raise DatasetError(
            path,
            f"DICOM pixel data cannot be decoded ({type(err).__name__}: {err})",
            "re-export the file uncompressed, or install the decoder pydicom names",
        ) from err
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":  # bright means low signal
        pixels = pixels.max() + pixels.min() - pixels
    return pixels


def _pixel_spacing(ds: pydicom.Dataset) -> tuple[float, ...] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            return tuple(float(v) for v in value)
    return None


def _dicom_slice(path: Path, ds: pydicom.Dataset, spacing_hint: Sequence[float] | None) -> Volume:
    pixels = _dicom_pixels(path, ds)
    return _planar(pixels, path, spacing_hint, calibrated=True, header_spacing=_pixel_spacing(ds))


def _dicom_series(
    folder: Path,
    files: list[Path],
    datasets: list[pydicom.Dataset],
    spacing_hint: Sequence[float] | None,
) -> Volume:
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise DatasetError(
            folder,
            f"folder mixes {len(series)} DICOM series",
            "keep one series per folder and list each folder as its own item",
        )
    slices = [_dicom_pixels(f, ds) for f, ds in zip(files, datasets, strict=True)]
    for f, pixels in zip(files, slices, strict=True):
        if pixels.shape != slices[0].shape:
            raise DatasetError(
                f,
                f"slice shape {pixels.shape} differs from {slices[0].shape} of {files[0].name}",
                "keep only slices of one series in the folder",
            )
    in_plane = _pixel_spacing(datasets[0])
    orientations = [ds.get("ImageOrientationPatient") for ds in datasets]
    positions = [ds.get("ImagePositionPatient") for ds in datasets]
    affine: np.ndarray | None = None
    if all(o is not None and len(o) == 6 for o in orientations) and all(
        p is not None and len(p) == 3 for p in positions
    ):
        row_dir = np.array(orientations[0][:3], dtype=float)
        col_dir = np.array(orientations[0][3:], dtype=float)
        normal = np.cross(row_dir, col_dir)
        along = np.array([float(np.dot(np.array(p, float), normal)) for p in positions])
        order = np.argsort(along, kind="stable")
        gaps = np.diff(along[order])
        slice_gap = float(np.median(gaps))
        if gaps.min() <= 1e-6 * max(1.0, abs(slice_gap)):
            raise DatasetError(
                folder,
                "two slices share one position (duplicate files?)",
                "remove duplicate slices from the series folder",
            )
        if np.abs(gaps - slice_gap).max() > _SLICE_GAP_TOLERANCE * slice_gap:
            raise DatasetError(
                folder,
                f"slice gaps are uneven ({gaps.min():.3g} to {gaps.max():.3g} mm)",
                "resample the series to even slices (or convert it to NIfTI) first",
            )
        row_mm, col_mm = _spacing_or_hint(in_plane, _tail(spacing_hint, 2), 2, folder)
        # voxel (slice, row, col) -> LPS mm, then LPS -> RAS by negating x and y.
        affine = np.eye(4)
        affine[:3, 0] = normal * slice_gap
        affine[:3, 1] = col_dir * row_mm
        affine[:3, 2] = row_dir * col_mm
        affine[:2] *= -1
        spacing: tuple[float, ...] = (slice_gap, row_mm, col_mm)
    else:
        order = np.argsort([int(ds.get("InstanceNumber", i)) for i, ds in enumerate(datasets)])
        thickness = datasets[0].get("SpacingBetweenSlices") or datasets[0].get("SliceThickness")
        header = (float(thickness), *in_plane) if thickness and in_plane else None
        spacing = _spacing_or_hint(header, spacing_hint, 3, folder)
    stacked = np.stack([slices[i] for i in order])  # (S, H, W) or (S, H, W, 3)
    channels_first = stacked[None] if stacked.ndim == 3 else np.moveaxis(stacked, -1, 0)
    data = _as_float(channels_first, folder)
    if affine is not None:
        data, spacing = to_canonical(data, spacing, affine)
    oriented, dhw = depth_first(data, spacing, tie_axis=2 if affine is not None else 0)
    return Volume(oriented, dhw, calibrated=True)


def _tail(values: Sequence[float] | None, n: int) -> Sequence[float] | None:
    return None if values is None else values[-n:]


# --------------------------------------------------------------------------------- PNG / JPEG


def _read_pillow(path: Path, spacing_hint: Sequence[float] | None) -> Volume:
    try:
        with Image.open(path) as image:
            image.load()
            pixels = _pillow_pixels(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(
            path,
            f"image cannot be decoded, it is truncated or not a {path.suffix} file ({err})",
            "re-export the image as PNG or JPEG",
        ) from err
    return _planar(pixels, path, spacing_hint, calibrated=False)


def _pillow_pixels(image: Image.Image) -> np.ndarray:
    """(H, W) for grey modes (8/16/32 bit kept), (H, W, 3) for colour; alpha dropped."""
    if image.mode in ("1", "LA", "PA"):
        image = image.convert("L")
    elif image.mode in ("P", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    return np.asarray(image)
