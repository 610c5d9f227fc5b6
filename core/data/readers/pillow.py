"""PNG and JPEG through Pillow: turned upright by the EXIF orientation, grey modes kept at
their bit depth, colour as RGB, alpha dropped. No header spacing: the datalist's, else the
default."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from core.data.errors import DatasetError
from core.data.readers.base import Volume, planar

SUFFIXES = (".png", ".jpg", ".jpeg")
_EXIF_ORIENTATION = 0x0112
_EXIF_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap rows and columns


def has_magic(head: bytes) -> bool:
    """The PNG or JPEG signature."""
    return head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"))


def read_pillow(path: Path, spacing_hint: Sequence[float] | None) -> Volume:
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
    return planar(pixels, path, hint, calibrated=False)


def _pillow_pixels(image: Image.Image) -> np.ndarray:
    """(H, W) for grey modes (8/16/32 bit kept), (H, W, 3) for colour; alpha dropped."""
    if image.mode in ("1", "LA", "PA"):
        image = image.convert("L")
    elif image.mode in ("P", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    return np.asarray(image)
