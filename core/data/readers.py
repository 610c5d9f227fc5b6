"""Read medical images from disk into depth-first arrays with their voxel spacing.

Whatever the format, a reader returns a :class:`Volume`: ``(C, D, H, W)`` with D the
through-plane axis, and the spacing ``(d, h, w)`` in mm. Getting D right is what lets SAC treat
a 5 mm MR like a stack of slices rather than a blurry cube:

* Volumes with an affine (NIfTI, DICOM series, enhanced multi-frame DICOM) are first turned to
  the closest canonical RAS voxel order (axis permutations and flips only, no resampling), so
  every site presents anatomy the same way. Then the axis with the largest spacing becomes
  depth; ties (isotropic data) keep the superior-inferior axis, i.e. axial slices. The other two
  axes keep their RAS order.
* Volumes without an affine (npz arrays) have no anatomical frame: the largest-spacing axis
  becomes depth, ties keep axis 0 (numpy's ``(D, H, W)`` habit).
* 2D images (PNG, JPEG, a single DICOM slice, a NIfTI with one slice) become ``D == 1`` with a
  depth spacing of :data:`TWO_D_DEPTH_SPACING_MM`, so their DA is the maximum (5).

Where spacing comes from, and which source wins when several disagree (a disagreement is
logged as a warning naming the file, never resolved silently):

* NIfTI: the sform when its code is set and it is invertible, else the qform when its code is
  set, else pixdim. The spacing is the length of the chosen affine's voxel axes, so spacing and
  orientation always come from the same matrix. A sheared affine is refused.
* DICOM in-plane: PixelSpacing (at the patient) over ImagerPixelSpacing (at the detector), each
  from the enhanced multi-frame functional groups (per-frame, then shared) before the top level.
  A single value where the standard says two is taken as isotropic.
* DICOM through-plane: the distance between slice positions along the slice normal; without
  positions, SpacingBetweenSlices, then SliceThickness. Tilted (sheared) stacks, unequal gaps,
  mixed orientations or pixel spacings are refused.
* Header-less images: the datalist's spacing, else :data:`DEFAULT_SPACING_MM` per axis.

Every problem with a file, expected or not, leaves :func:`read_image` as a
:class:`~core.data.errors.DatasetError` naming the file (and the DICOM attribute at fault), so
``on_error="skip"`` can skip it. ``core/data/README.md`` tabulates what is read and refused.
"""

from __future__ import annotations

import gzip
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut

from core.data.errors import DatasetError

logger = logging.getLogger(__name__)

TWO_D_DEPTH_SPACING_MM = 1.0e4  # "infinitely thick": DA of a 2D image is the maximum, 5
DEFAULT_SPACING_MM = 1.0  # stated default when neither header nor datalist gives a spacing
_TIE_TOLERANCE = 1e-3  # spacings within 0.1 % count as equal when choosing the depth axis
_SLICE_GAP_TOLERANCE = 0.1  # DICOM slice gaps may differ from their median by 10 %
_AGREE = 0.01  # two spacing sources within 1 % agree; beyond, the disagreement is logged
_SHEAR_TOLERANCE = 0.01  # |cos| between voxel axes (about 0.6 degrees) / in-plane step per gap
_PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_SNIFF_BYTES = 352  # a NIfTI-1 header with its magic at 344
_EXIF_ORIENTATION = 0x0112
_EXIF_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap rows and columns


@dataclass(frozen=True)
class Volume:
    """An image as read: depth-first, native resolution, intensities as stored (HU for CT)."""

    array: np.ndarray  # (C, D, H, W) float32
    spacing: tuple[float, float, float]  # (d, h, w) mm
    calibrated: bool  # intensities in physical units (HU for CT) rather than display values


def image_format(path: Path) -> str:
    """``"nifti"``, ``"dicom"`` or ``"pillow"``.

    A folder is a DICOM series. A file is judged by its suffix when the suffix is one of the
    formats' (``.nii``, ``.nii.gz``, ``.dcm``, ``.dicom``, ``.ima``, ``.png``, ``.jpg``,
    ``.jpeg``), otherwise by its content: ``DICM`` at byte 128, the NIfTI-1/2 magic (also
    inside gzip), the PNG or JPEG signature. Names full of dots, such as DICOM UIDs, are
    therefore sniffed too.

    Raises:
        DatasetError: the file does not exist, or neither its name nor its content tells.
    """
    if not path.exists():
        raise DatasetError(
            path,
            "image file not found",
            f"check the path (relative paths start at the datalist's folder {path.parent})",
        )
    name = path.name.lower()
    if path.is_dir() or name.endswith(_DICOM_SUFFIXES):
        return "dicom"
    if name.endswith(_NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(_PILLOW_SUFFIXES):
        return "pillow"
    kind = _sniff(path)
    if kind is None:
        raise DatasetError(
            path,
            "unsupported image format (neither the name nor the content is NIfTI, DICOM, PNG"
            " or JPEG)",
            "use NIfTI (.nii, .nii.gz), DICOM (Part 10 file or series folder), PNG or JPEG",
        )
    return kind


def _sniff(path: Path) -> str | None:
    """The format a file's first bytes announce, or None. Inside gzip only NIfTI counts (the
    only format here that is read compressed)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as handle:
                inner = handle.read(_SNIFF_BYTES)
            nifti = inner[344:348] in (b"n+1\x00", b"ni1\x00") or inner[4:8] == b"n+2\x00"
            return "nifti" if nifti else None
    except (OSError, EOFError):
        return None
    if head[128:132] == b"DICM":
        return "dicom"
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] == b"n+2\x00":
        return "nifti"
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")):
        return "pillow"
    return None


def read_image(path: Path, spacing_hint: Sequence[float] | None = None) -> Volume:
    """Read one image file (or DICOM series folder) as a depth-first :class:`Volume`.

    ``spacing_hint`` is the datalist's spacing (mm per file axis), used only where the header
    has none. Returns ``array`` (C, D, H, W) float32 and ``spacing`` (d, h, w) mm.

    Raises:
        DatasetError: for every problem with the file, including failures the readers did not
            foresee (wrapped, naming the file), so a site opened with ``on_error="skip"``
            skips it instead of crashing.
    """
    kind = image_format(path)
    try:
        if kind == "nifti":
            return _read_nifti(path, spacing_hint)
        if kind == "dicom":
            return _read_dicom(path, spacing_hint)
        return _read_pillow(path, spacing_hint)
    except (DatasetError, MemoryError):
        raise
    except Exception as err:  # a reader bug or a library surprise must not escape untyped
        raise DatasetError(
            path,
            f"reading failed unexpectedly ({type(err).__name__}: {err})",
            "check the file opens in a viewer and re-export it; if it does, report this message",
        ) from err


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


def _load_nifti(path: Path) -> Any:
    """A nibabel image; a file whose name does not say NIfTI (found by its magic) is parsed
    from its bytes, since nibabel picks the image class by the suffix."""
    if path.name.lower().endswith(_NIFTI_SUFFIXES):
        return nib.load(str(path))
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    image_class = nib.Nifti2Image if raw[4:8] == b"n+2\x00" else nib.Nifti1Image
    return image_class.from_bytes(raw)


def _read_nifti(path: Path, spacing_hint: Sequence[float] | None) -> Volume:
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
    spacing = _spacing_or_hint(header_spacing, hint, 3, path)
    array = _as_float(data, path)
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
    if cosines.max() > _SHEAR_TOLERANCE:
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
        if not np.allclose(values, lengths, rtol=_AGREE, atol=0):
            logger.warning(
                "%s: the %s gives voxel spacing %s mm but the %s gives %s mm; the %s is used"
                " (NIfTI rule: sform, then qform, then pixdim)",
                path,
                name,
                _mm(lengths),
                other,
                _mm(values),
                name,
            )
    return affine, spacing


def _mm(values: Sequence[float] | np.ndarray) -> str:
    return "x".join(f"{float(v):.4g}" for v in values)


# ---------------------------------------------------------------------------------------- DICOM

# How each PhotometricInterpretation becomes numbers: grey (MONOCHROME2 as stored, MONOCHROME1
# inverted), colour through the palette, or colour as decoded (pydicom returns the YBR family
# as RGB). Anything else is refused by name.
_GREY = ("MONOCHROME1", "MONOCHROME2")
_PALETTE = "PALETTE COLOR"
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_PHOTOMETRIC = (*_GREY, _PALETTE, *_COLOUR)
_DICOM_FIX = "correct the attribute (e.g. with dcmodify) or leave the file out"


@dataclass(frozen=True)
class _Plane:
    """One DICOM image plane (a file, or one frame of a multi-frame file) before stacking."""

    source: Path
    pixels: np.ndarray  # float32 (H, W) grey, modality units (MONOCHROME1 not inverted); or RGB
    photometric: str
    display_range: tuple[float, float]  # modality units of the stored bit range (MONOCHROME1)
    position: tuple[float, ...] | None  # ImagePositionPatient, mm (LPS)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient, 6 direction cosines
    pixel_spacing: tuple[float, float] | None  # (row, column) mm
    instance: float | None  # InstanceNumber
    location: float | None  # SliceLocation
    between: float | None  # SpacingBetweenSlices (centre to centre), mm
    thickness: float | None  # SliceThickness, mm (may exceed the gap: overlapping slices)


def _read_dicom(path: Path, spacing_hint: Sequence[float] | None) -> Volume:
    if path.is_file():
        planes = _planes(path, _dcmread(path))
    else:
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
        )
        if not files:
            raise DatasetError(path, "DICOM series folder is empty", "put the series' slices in it")
        datasets = [_dcmread(f) for f in files]
        series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
        if len(series) > 1:
            raise DatasetError(
                path,
                f"folder mixes {len(series)} DICOM series",
                "keep one series per folder and list each folder as its own item",
            )
        planes = []
        for f, ds in zip(files, datasets, strict=True):
            got = _planes(f, ds)
            if len(got) > 1 and len(files) > 1:
                raise DatasetError(
                    f,
                    f"multi-frame file ({len(got)} frames) inside a series folder",
                    "list the multi-frame file as its own item",
                )
            planes.extend(got)
    if len(planes) == 1:
        return _single_plane(planes[0], spacing_hint)
    return _stack(path, planes, spacing_hint)


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
    return ds


def _numbers(path: Path, holder: Any, keyword: str) -> tuple[float, ...] | None:
    """A numeric element's values; None when absent or empty (Type 2), never a bare string.

    Raises:
        DatasetError: the element cannot be parsed or holds something other than finite numbers.
    """
    if holder is None:
        return None
    try:
        value = holder.get(keyword)
    except Exception as err:  # pydicom converts lazily: a malformed DS/IS fails on access
        raise DatasetError(
            path, f"DICOM attribute {keyword} cannot be parsed ({err})", _DICOM_FIX
        ) from err
    if value is None or value == "":
        return None
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    try:
        numbers = tuple(float(v) for v in values if v not in (None, ""))
    except (TypeError, ValueError) as err:
        raise DatasetError(
            path, f"DICOM attribute {keyword} is {value!r}, not numbers", _DICOM_FIX
        ) from err
    if not all(math.isfinite(v) for v in numbers):
        raise DatasetError(path, f"DICOM attribute {keyword} is {value!r}, not finite", _DICOM_FIX)
    return numbers or None


def _scalar(path: Path, holder: Any, keyword: str) -> float | None:
    """A single-valued numeric element (VM 1); repeated equal values are accepted."""
    values = _numbers(path, holder, keyword)
    if values is None:
        return None
    if len(set(values)) > 1:
        raise DatasetError(
            path,
            f"DICOM attribute {keyword} has {len(values)} different values {values}; the standard"
            " says 1",
            _DICOM_FIX,
        )
    return values[0]


def _vector(path: Path, holder: Any, keyword: str, size: int) -> tuple[float, ...] | None:
    values = _numbers(path, holder, keyword)
    if values is not None and len(values) != size:
        raise DatasetError(
            path,
            f"DICOM attribute {keyword} has {len(values)} values {values}; the standard says"
            f" {size}",
            _DICOM_FIX,
        )
    return values


def _holder(ds: pydicom.Dataset, frame: int, group: str, keyword: str, *, top: bool = True) -> Any:
    """The dataset that holds ``keyword`` for this frame: the enhanced multi-frame per-frame
    functional group, then the shared one, then (if ``top``) the top level; None if absent."""
    for groups, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups)
        if items and len(items) > index:
            sequence = items[index].get(group)
            if sequence and keyword in sequence[0]:
                return sequence[0]
    return ds if top and keyword in ds else None


def _in_plane_spacing(path: Path, ds: pydicom.Dataset, frame: int) -> tuple[float, float] | None:
    """(row, column) mm: PixelSpacing (at the patient) over ImagerPixelSpacing (at the
    detector); one value where the standard says two is taken as isotropic, and logged."""
    found: dict[str, tuple[float, float]] = {}
    for keyword, holder in (
        ("PixelSpacing", _holder(ds, frame, "PixelMeasuresSequence", "PixelSpacing")),
        ("ImagerPixelSpacing", ds if "ImagerPixelSpacing" in ds else None),
    ):
        values = _numbers(path, holder, keyword)
        if values is None:
            continue
        if len(values) == 1:
            logger.warning(
                "%s: %s has one value (%s mm) where the standard says two; taken as isotropic",
                path,
                keyword,
                values[0],
            )
            values = (values[0], values[0])
        if len(values) != 2:
            raise DatasetError(
                path,
                f"DICOM attribute {keyword} has {len(values)} values {values}; the standard says 2"
                " (row, column spacing in mm)",
                _DICOM_FIX,
            )
        found[keyword] = (values[0], values[1])
    pixel, imager = found.get("PixelSpacing"), found.get("ImagerPixelSpacing")
    if pixel and imager and not np.allclose(pixel, imager, rtol=_AGREE, atol=0):
        logger.warning(
            "%s: PixelSpacing %s mm and ImagerPixelSpacing %s mm disagree; PixelSpacing (at the"
            " patient) is used",
            path,
            _mm(pixel),
            _mm(imager),
        )
    return pixel or imager


def _photometric(path: Path, ds: pydicom.Dataset) -> str:
    value = ds.get("PhotometricInterpretation")
    if value in (None, ""):
        raise DatasetError(
            path,
            "DICOM attribute PhotometricInterpretation is missing or empty",
            "re-export the file: the attribute is required (Type 1) to know what pixels mean",
        )
    name = str(value).strip().upper()
    if name not in _PHOTOMETRIC:
        raise DatasetError(
            path,
            f"PhotometricInterpretation {name!r} is not supported",
            f"convert the image to one of {', '.join(_PHOTOMETRIC)} (e.g. with gdcmconv)",
        )
    return name


def _rescale(path: Path, ds: pydicom.Dataset, frame: int, stored: np.ndarray) -> np.ndarray:
    """Stored values -> modality units (HU for CT): the Modality LUT, else RescaleSlope and
    RescaleIntercept (per-frame / shared functional groups first)."""
    if ds.get("ModalityLUTSequence"):
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    holder = _holder(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    slope = _scalar(path, holder, "RescaleSlope")
    intercept = _scalar(path, holder, "RescaleIntercept")
    if holder is None:  # an intercept may stand alone at the top level
        intercept = _scalar(path, ds, "RescaleIntercept")
    if slope == 0:
        raise DatasetError(path, "DICOM attribute RescaleSlope is 0", _DICOM_FIX)
    out = np.asarray(stored, dtype=np.float64)
    return out * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)


def _stored_range(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """The smallest and largest value BitsStored and PixelRepresentation allow."""
    bits = _scalar(path, ds, "BitsStored") or _scalar(path, ds, "BitsAllocated") or 16
    if _scalar(path, ds, "PixelRepresentation") == 1:
        return np.array([-(2 ** (int(bits) - 1)), 2 ** (int(bits) - 1) - 1])
    return np.array([0, 2 ** int(bits) - 1])


def _planes(path: Path, ds: pydicom.Dataset) -> list[_Plane]:
    """Every image plane of one file, in modality units, with its geometry."""
    photometric = _photometric(path, ds)
    count = _scalar(path, ds, "NumberOfFrames") or 1.0
    if count != int(count) or count < 1:
        raise DatasetError(path, f"DICOM attribute NumberOfFrames is {count}", _DICOM_FIX)
    frames = int(count)
    try:
        stored = np.asarray(ds.pixel_array)
    except Exception as err:  # pydicom raises many types for short or undecodable data
        raise DatasetError(
            path,
            f"DICOM pixel data cannot be decoded ({type(err).__name__}: {err})",
            "re-export the file uncompressed, or install the decoder pydicom names",
        ) from err
    if frames == 1:
        stored = stored[None]
    planes = []
    for frame in range(frames):
        position = _vector(
            path,
            _holder(ds, frame, "PlanePositionSequence", "ImagePositionPatient", top=frames == 1),
            "ImagePositionPatient",
            3,
        )
        if frames > 1 and position is None:
            raise DatasetError(
                path,
                f"multi-frame DICOM with {frames} frames has no per-frame ImagePositionPatient"
                " (a cine loop or legacy multi-frame), so its frames are not known to be slices",
                "convert it with dcm2niix and list the NIfTI, or export one file per slice",
            )
        if photometric == _PALETTE:
            pixels = np.asarray(apply_color_lut(stored[frame], ds), dtype=np.float64)
            display = (0.0, 0.0)
        elif photometric in _GREY:
            pixels = _rescale(path, ds, frame, stored[frame])
            bounds = _rescale(path, ds, frame, _stored_range(path, ds))
            display = (float(bounds.min()), float(bounds.max()))
        else:
            pixels, display = np.asarray(stored[frame], dtype=np.float64), (0.0, 0.0)
        orientation = _holder(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
        measures = _holder(ds, frame, "PixelMeasuresSequence", "SliceThickness")
        between = _holder(ds, frame, "PixelMeasuresSequence", "SpacingBetweenSlices")
        planes.append(
            _Plane(
                source=path,
                pixels=pixels.astype(np.float32),  # what the volume holds; half of float64
                photometric=photometric,
                display_range=display,
                position=position,
                orientation=_vector(path, orientation, "ImageOrientationPatient", 6),
                pixel_spacing=_in_plane_spacing(path, ds, frame),
                instance=_scalar(path, ds, "InstanceNumber"),
                location=_scalar(path, ds, "SliceLocation"),
                between=abs(_scalar(path, between, "SpacingBetweenSlices") or 0.0) or None,
                thickness=_scalar(path, measures, "SliceThickness"),
            )
        )
    return planes


def _invert_monochrome1(pixels: np.ndarray, planes: Sequence[_Plane]) -> np.ndarray:
    """MONOCHROME1 (bright = low signal) turned positive once for the whole series, over the
    union of its slices' stored bit ranges, so one stored value gives one grey value."""
    low = min(p.display_range[0] for p in planes)
    high = max(p.display_range[1] for p in planes)
    return low + high - pixels


def _single_plane(plane: _Plane, spacing_hint: Sequence[float] | None) -> Volume:
    """One slice -> (C, 1, H, W). With ImageOrientationPatient its rows and columns are turned
    to the closest RAS order, exactly as the same slice inside a series would be; without it
    (most radiographs) they are kept as stored."""
    pixels = plane.pixels
    if plane.photometric == "MONOCHROME1":
        pixels = _invert_monochrome1(pixels, [plane])
    calibrated = plane.photometric == "MONOCHROME2"
    if plane.orientation is None:
        return _planar(
            pixels,
            plane.source,
            spacing_hint,
            calibrated=calibrated,
            header_spacing=plane.pixel_spacing,
        )
    row_dir, col_dir, normal = _directions(plane)
    row_mm, col_mm = _spacing_or_hint(plane.pixel_spacing, _tail(spacing_hint, 2), 2, plane.source)
    channels_first = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
    data = _as_float(channels_first, plane.source)[:, None]  # (C, 1, rows, cols)
    spacing = (TWO_D_DEPTH_SPACING_MM, row_mm, col_mm)
    data, spacing = to_canonical(data, spacing, _voxel_to_ras(normal, col_dir, row_dir, spacing))
    oriented, dhw = depth_first(data, spacing, tie_axis=2)
    return Volume(oriented, dhw, calibrated)


def _directions(plane: _Plane) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row, column and slice-normal directions (LPS) from ImageOrientationPatient."""
    assert plane.orientation is not None
    row_dir = np.array(plane.orientation[:3], dtype=float)
    col_dir = np.array(plane.orientation[3:], dtype=float)
    norms = np.linalg.norm(row_dir), np.linalg.norm(col_dir)
    if min(norms) == 0 or abs(np.dot(row_dir, col_dir)) / (norms[0] * norms[1]) > _SHEAR_TOLERANCE:
        raise DatasetError(
            plane.source,
            f"ImageOrientationPatient {plane.orientation} does not hold two perpendicular"
            " directions",
            _DICOM_FIX,
        )
    row_dir, col_dir = row_dir / norms[0], col_dir / norms[1]
    return row_dir, col_dir, np.cross(row_dir, col_dir)


def _voxel_to_ras(
    normal: np.ndarray, col_dir: np.ndarray, row_dir: np.ndarray, spacing: Sequence[float]
) -> np.ndarray:
    """Affine of voxel (slice, row, col) -> RAS mm. Moving down a row goes along the column
    direction, moving along a row along the row direction; LPS -> RAS negates x and y."""
    affine = np.eye(4)
    affine[:3, 0] = normal * spacing[0]
    affine[:3, 1] = col_dir * spacing[1]
    affine[:3, 2] = row_dir * spacing[2]
    affine[:2] *= -1
    return affine


def _stack(where: Path, planes: list[_Plane], spacing_hint: Sequence[float] | None) -> Volume:
    """Slices of one series (or frames of one multi-frame file) -> a depth-first volume."""
    first = planes[0]
    for plane in planes[1:]:
        for what, mine, theirs in (
            ("slice shape", plane.pixels.shape, first.pixels.shape),
            ("PhotometricInterpretation", plane.photometric, first.photometric),
        ):
            if mine != theirs:
                raise DatasetError(
                    plane.source,
                    f"{what} {mine} differs from {theirs} of {first.source.name}",
                    "keep only slices of one series in the folder",
                )
        mine_mm, first_mm = plane.pixel_spacing, first.pixel_spacing
        if ((mine_mm is None or first_mm is None) and mine_mm != first_mm) or (
            mine_mm is not None
            and first_mm is not None
            and not np.allclose(mine_mm, first_mm, rtol=_AGREE, atol=0)
        ):
            raise DatasetError(
                where,
                f"PixelSpacing differs between slices ({first.source.name}: "
                f"{first.pixel_spacing}, {plane.source.name}: {plane.pixel_spacing})",
                "keep only slices of one series in the folder, or resample them to one grid",
            )
    if all(p.position is not None and p.orientation is not None for p in planes):
        order, affine, spacing = _slice_geometry(where, planes, spacing_hint)
    else:
        order = _fallback_order(where, planes)
        thickness = first.between or first.thickness
        in_plane = first.pixel_spacing
        header = (thickness, *in_plane) if thickness and in_plane else None
        spacing = _spacing_or_hint(header, spacing_hint, 3, where)
        affine = None
    stacked = np.stack([planes[i].pixels for i in order])  # (S, H, W) or (S, H, W, 3)
    if first.photometric == "MONOCHROME1":
        stacked = _invert_monochrome1(stacked, planes)
    channels_first = stacked[None] if stacked.ndim == 3 else np.moveaxis(stacked, -1, 0)
    data = _as_float(channels_first, where)
    if affine is not None:
        data, spacing = to_canonical(data, spacing, affine)
    oriented, dhw = depth_first(data, spacing, tie_axis=2 if affine is not None else 0)
    return Volume(oriented, dhw, calibrated=first.photometric == "MONOCHROME2")


def _slice_geometry(
    where: Path, planes: list[_Plane], spacing_hint: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Slice order, voxel (slice, row, col) -> RAS affine and spacing from the positions.

    Raises:
        DatasetError: orientations differ, the stack is tilted (sheared), slices coincide or
            their gaps are uneven: geometry a (C, D, H, W) grid with one spacing cannot hold.
    """
    first = planes[0]
    assert first.orientation is not None
    for plane in planes[1:]:
        assert plane.orientation is not None
        if not np.allclose(plane.orientation, first.orientation, atol=1e-4):
            raise DatasetError(
                where,
                f"ImageOrientationPatient differs between slices ({first.source.name}: "
                f"{first.orientation}, {plane.source.name}: {plane.orientation})",
                "keep one orientation per series (move localisers and reformats to their own"
                " folders)",
            )
    row_dir, col_dir, normal = _directions(first)
    positions = np.array([p.position for p in planes], dtype=float)  # (S, 3) mm
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    slice_gap = float(np.median(gaps))
    if gaps.min() <= 1e-6 * max(1.0, abs(slice_gap)):
        raise DatasetError(
            where,
            "two slices share one position (duplicate files?)",
            "remove duplicate slices from the series folder",
        )
    if np.abs(gaps - slice_gap).max() > _SLICE_GAP_TOLERANCE * slice_gap:
        raise DatasetError(
            where,
            f"slice gaps are uneven ({gaps.min():.3g} to {gaps.max():.3g} mm)",
            "resample the series to even slices (or convert it to NIfTI) first",
        )
    steps = np.diff(positions[order], axis=0)  # (S-1, 3)
    sideways = steps - np.outer(steps @ normal, normal)
    drift = float(np.linalg.norm(sideways, axis=1).max())
    if drift > _SHEAR_TOLERANCE * slice_gap:
        raise DatasetError(
            where,
            f"slice stack is sheared: each slice moves {drift:.3g} mm in-plane per"
            f" {slice_gap:.3g} mm step (gantry tilt of about"
            f" {math.degrees(math.atan2(drift, slice_gap)):.1f} degrees)",
            "resample it onto slices stacked along their normal (dcm2niix corrects gantry tilt"
            " by default) and list the NIfTI",
        )
    if first.between and abs(first.between - slice_gap) > _AGREE * slice_gap:
        logger.warning(
            "%s: slices are %.4g mm apart by ImagePositionPatient but SpacingBetweenSlices says"
            " %.4g mm; the positions are used",
            where,
            slice_gap,
            first.between,
        )
    row_mm, col_mm = _spacing_or_hint(first.pixel_spacing, _tail(spacing_hint, 2), 2, where)
    spacing = (slice_gap, row_mm, col_mm)
    return order, _voxel_to_ras(normal, col_dir, row_dir, spacing), spacing


def _fallback_order(where: Path, planes: list[_Plane]) -> np.ndarray:
    """Slice order without positions: InstanceNumber, else SliceLocation, else file order
    (logged), each used only when every slice has a distinct value."""
    for keyword, values in (
        ("InstanceNumber", [p.instance for p in planes]),
        ("SliceLocation", [p.location for p in planes]),
    ):
        if all(v is not None for v in values) and len(set(values)) == len(values):
            logger.info("%s: no ImagePositionPatient; slices ordered by %s", where, keyword)
            return np.argsort(np.array(values, dtype=float), kind="stable")
    logger.warning(
        "%s: no ImagePositionPatient, and InstanceNumber and SliceLocation are missing, empty"
        " or repeated; the %d slices are stacked in file-name order",
        where,
        len(planes),
    )
    return np.arange(len(planes))


def _tail(values: Sequence[float] | None, n: int) -> Sequence[float] | None:
    return None if values is None else values[-n:]


# --------------------------------------------------------------------------------- PNG / JPEG


def _read_pillow(path: Path, spacing_hint: Sequence[float] | None) -> Volume:
    """PNG / JPEG, turned upright by its EXIF orientation (the datalist's ``[row, col]``
    spacing follows the file's axes, so a transposing orientation swaps it)."""
    try:
        with Image.open(path) as image:
            image.load()
            orientation = image.getexif().get(_EXIF_ORIENTATION)
            upright = image if orientation in (None, 1) else ImageOps.exif_transpose(image)
            pixels = _pillow_pixels(upright)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(
            path,
            f"image cannot be decoded, it is truncated or not a {path.suffix} file ({err})",
            "re-export the image as PNG or JPEG",
        ) from err
    hint = spacing_hint
    if hint is not None and len(hint) == 2 and orientation in _EXIF_TRANSPOSED:
        hint = (hint[1], hint[0])
    return _planar(pixels, path, hint, calibrated=False)


def _pillow_pixels(image: Image.Image) -> np.ndarray:
    """(H, W) for grey modes (8/16/32 bit kept), (H, W, 3) for colour; alpha dropped."""
    if image.mode in ("1", "LA", "PA"):
        image = image.convert("L")
    elif image.mode in ("P", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    return np.asarray(image)
