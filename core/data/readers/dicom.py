"""DICOM: a Part 10 file (single frame or enhanced multi-frame) or a series folder.

In-plane spacing is PixelSpacing (at the patient) over ImagerPixelSpacing (at the detector),
each from the enhanced multi-frame functional groups (per-frame, then shared) before the top
level; a single value where the standard says two is taken as isotropic. Through-plane spacing
is the distance between slice positions along the slice normal; without positions,
SpacingBetweenSlices, then SliceThickness. Tilted (sheared) stacks, unequal gaps, mixed
orientations or pixel spacings are refused, naming the file and the attribute at fault.

Over 500 lines because it is one reader: the attribute fallbacks above and the slice geometry
that uses them are the DICOM format's, and no other module needs either.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    planar,
    spacing_or_hint,
    to_canonical,
)

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import pydicom

# pydicom (0.6-0.8 s to import) is imported on the first DICOM read, not with this module:
# the reader registry (core.data.readers) loads every format's suffixes and magic bytes, and a
# site without DICOM files, or one whose items all come from the preprocessing cache, never
# needs pydicom (benchmarks/start_cost.py).

SUFFIXES = (".dcm", ".dicom", ".ima")
_SLICE_GAP_TOLERANCE = 0.1  # DICOM slice gaps may differ from their median by 10 %


def has_magic(head: bytes) -> bool:
    """``DICM`` at byte 128 (a Part 10 file with its preamble)."""
    return head[128:132] == b"DICM"


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


def read_dicom(path: Path, spacing_hint: Sequence[float] | None) -> Volume:
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
    import pydicom
    from pydicom.errors import InvalidDicomError

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
    from pydicom.multival import MultiValue  # loaded: the holder came from pydicom

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
    if pixel and imager and not np.allclose(pixel, imager, rtol=AGREE, atol=0):
        logger.warning(
            "%s: PixelSpacing %s mm and ImagerPixelSpacing %s mm disagree; PixelSpacing (at the"
            " patient) is used",
            path,
            format_mm(pixel),
            format_mm(imager),
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
        from pydicom.pixels import apply_modality_lut

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
            from pydicom.pixels import apply_color_lut

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
        return planar(
            pixels,
            plane.source,
            spacing_hint,
            calibrated=calibrated,
            header_spacing=plane.pixel_spacing,
        )
    row_dir, col_dir, normal = _directions(plane)
    row_mm, col_mm = spacing_or_hint(plane.pixel_spacing, _tail(spacing_hint, 2), 2, plane.source)
    channels_first = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
    data = as_float(channels_first, plane.source)[:, None]  # (C, 1, rows, cols)
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
    if min(norms) == 0 or abs(np.dot(row_dir, col_dir)) / (norms[0] * norms[1]) > SHEAR_TOLERANCE:
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
            and not np.allclose(mine_mm, first_mm, rtol=AGREE, atol=0)
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
        spacing = spacing_or_hint(header, spacing_hint, 3, where)
        affine = None
    stacked = np.stack([planes[i].pixels for i in order])  # (S, H, W) or (S, H, W, 3)
    if first.photometric == "MONOCHROME1":
        stacked = _invert_monochrome1(stacked, planes)
    channels_first = stacked[None] if stacked.ndim == 3 else np.moveaxis(stacked, -1, 0)
    data = as_float(channels_first, where)
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
    if drift > SHEAR_TOLERANCE * slice_gap:
        raise DatasetError(
            where,
            f"slice stack is sheared: each slice moves {drift:.3g} mm in-plane per"
            f" {slice_gap:.3g} mm step (gantry tilt of about"
            f" {math.degrees(math.atan2(drift, slice_gap)):.1f} degrees)",
            "resample it onto slices stacked along their normal (dcm2niix corrects gantry tilt"
            " by default) and list the NIfTI",
        )
    if first.between and abs(first.between - slice_gap) > AGREE * slice_gap:
        logger.warning(
            "%s: slices are %.4g mm apart by ImagePositionPatient but SpacingBetweenSlices says"
            " %.4g mm; the positions are used",
            where,
            slice_gap,
            first.between,
        )
    row_mm, col_mm = spacing_or_hint(first.pixel_spacing, _tail(spacing_hint, 2), 2, where)
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
