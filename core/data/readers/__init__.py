"""Read medical images from disk into depth-first arrays with their voxel spacing.

Whatever the format, a reader returns a :class:`~core.data.readers.base.Volume`: ``(C, D, H,
W)`` with D the through-plane axis, and the spacing ``(d, h, w)`` in mm:

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
logged as a warning naming the file, never resolved silently), is each format module's
docstring: :mod:`~core.data.readers.nifti`, :mod:`~core.data.readers.dicom`,
:mod:`~core.data.readers.pillow` (PNG, JPEG) and :mod:`~core.data.readers.array` (npz rows).
Header-less images take the datalist's spacing, else :data:`DEFAULT_SPACING_MM` per axis.

Every file format is one :class:`ImageFormat` in :data:`FORMATS` (its suffixes, its magic bytes
and its :class:`~core.data.readers.base.Reader`); :func:`image_format` picks the entry and
:func:`read_image` calls its reader. Every problem with a file, expected or not, leaves
:func:`read_image` as a :class:`~core.data.errors.DatasetError` naming the file (and the DICOM
attribute at fault), so ``on_error="skip"`` can skip it. ``core/data/README.md`` tabulates
what is read and refused.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.data.errors import DatasetError
from core.data.readers import dicom, nifti, pillow
from core.data.readers.array import volume_from_array
from core.data.readers.base import (
    DEFAULT_SPACING_MM,
    TWO_D_DEPTH_SPACING_MM,
    Reader,
    Volume,
    depth_first,
    to_canonical,
)

__all__ = [
    "DEFAULT_SPACING_MM",
    "FORMATS",
    "TWO_D_DEPTH_SPACING_MM",
    "ImageFormat",
    "Reader",
    "Volume",
    "depth_first",
    "image_format",
    "read_image",
    "to_canonical",
    "volume_from_array",
]

_SNIFF_BYTES = 352  # a NIfTI-1 header with its magic at 344


@dataclass(frozen=True)
class ImageFormat:
    """One file format: the suffixes that name it, the first bytes that announce it (for
    files named otherwise, such as DICOM UIDs) and the reader that reads it."""

    name: str
    suffixes: tuple[str, ...]
    has_magic: Callable[[bytes], bool]
    read: Reader
    gzipped: bool = False  # recognised inside gzip too (only NIfTI is read compressed)


# The dispatch table, in the order names and magic bytes are tried.
FORMATS: dict[str, ImageFormat] = {
    f.name: f
    for f in (
        ImageFormat("dicom", dicom.SUFFIXES, dicom.has_magic, dicom.read_dicom),
        ImageFormat("nifti", nifti.SUFFIXES, nifti.has_magic, nifti.read_nifti, gzipped=True),
        ImageFormat("pillow", pillow.SUFFIXES, pillow.has_magic, pillow.read_pillow),
    )
}


def image_format(path: Path) -> str:
    """``"nifti"``, ``"dicom"`` or ``"pillow"`` (a key of :data:`FORMATS`).

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
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    for fmt in FORMATS.values():
        if name.endswith(fmt.suffixes):
            return fmt.name
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
    """The format a file's first bytes announce, or None. Inside gzip only the formats read
    compressed count."""
    try:
        with path.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as handle:
                inner = handle.read(_SNIFF_BYTES)
            return next(
                (f.name for f in FORMATS.values() if f.gzipped and f.has_magic(inner)), None
            )
    except (OSError, EOFError):
        return None
    return next((f.name for f in FORMATS.values() if f.has_magic(head)), None)


def read_image(path: Path, spacing_hint: Sequence[float] | None = None) -> Volume:
    """Read one image file (or DICOM series folder) as a depth-first :class:`Volume`.

    ``spacing_hint`` is the datalist's spacing (mm per file axis), used only where the header
    has none. Returns ``array`` (C, D, H, W) float32 and ``spacing`` (d, h, w) mm.

    Raises:
        DatasetError: for every problem with the file, including failures the readers did not
            foresee (wrapped, naming the file), so a site opened with ``on_error="skip"``
            skips it instead of crashing.
    """
    reader = FORMATS[image_format(path)].read
    try:
        return reader(path, spacing_hint)
    except (DatasetError, MemoryError):
        raise
    except Exception as err:  # a reader bug or a library surprise must not escape untyped
        raise DatasetError(
            path,
            f"reading failed unexpectedly ({type(err).__name__}: {err})",
            "check the file opens in a viewer and re-export it; if it does, report this message",
        ) from err
