"""Segmentation sites: each item's label is a mask image on the image's own grid.

A segmentation datalist is an ordinary one (``dataset.json``, see :mod:`core.data.datalist`)
whose items name a label-map file: Decathlon's ``{"image": ..., "label": "labelsTr/x.nii.gz"}``
or the phantom generator's ``{"image": ..., "label": 1, "mask": "masks/x.nii.gz"}`` (a string
``label`` is the mask; otherwise ``mask`` is). A mask is a NIfTI label map (3D) or a grey PNG
(2D) of integer class indices ``0 .. num_classes - 1`` (0 = background).

The mask is read with the same reader as its image, so it is put depth-first and oriented by
its own header exactly as the image is; it must then have the image's shape and spacing, and
(NIfTI) cover the same box in the scanner's world coordinates. Anything else is refused naming
the mask file, what differs and how to fix it: a mask is never silently stretched onto an image.
It is then brought to the image's final grid with nearest neighbour (labels are not blended)
and depth-padded with background where the image is padded.

One item is ``{"image": float32 (C, D, H, W), "spacing": float64 (3,), "label": int64
(1, D, H, W)}``; :func:`core.data.collate` stacks them like classification items, so the same
DA-bucketed samplers and training loops serve both tasks. Items are read and checked when the
site is opened (no preprocessing cache for masks yet: they are decoded at every open).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from core.data.datalist import Datalist, ItemSpec, parse_item, read_datalist
from core.data.dataset import preprocess
from core.data.errors import DatasetError
from core.data.preprocess import GridConfig, IntensityConfig, pad_depth
from core.data.readers import Volume, image_format, read_image
from core.model.sac import degree_of_anisotropy

MASK_FIELDS = ("label", "mask")
_SPACING_RTOL = 1e-3
_WORLD_ATOL_MM = 1e-2


def mask_path(entry: Mapping[str, Any], source: Path, where: str) -> Path:
    """The mask file of a datalist entry: a string ``label``, else ``mask``."""
    value = entry.get("label")
    if not isinstance(value, str):
        value = entry.get("mask")
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(
            source,
            f"item {where} (image {entry.get('image')}) has no mask file",
            'give every item a label-map path: "label": "labelsTr/case.nii.gz" (or "mask")',
        )
    path = Path(value)
    return path if path.is_absolute() else source.parent / path


def _nifti(path: Path) -> Any:
    """The nibabel image (header read, voxels not yet)."""
    return nib.load(str(path))


def _world_corners(path: Path, shape: Sequence[int]) -> np.ndarray:
    """The 8 corners of a NIfTI voxel grid in world mm, sorted (storage order cancels)."""
    affine = np.asarray(_nifti(path).affine, dtype=np.float64)
    size = list(shape[:3]) + [1] * (3 - len(shape[:3]))
    ijk = np.array(
        [
            [i, j, k, 1.0]
            for i in (0, size[0] - 1)
            for j in (0, size[1] - 1)
            for k in (0, size[2] - 1)
        ]
    )
    corners = (affine @ ijk.T).T[:, :3]
    return corners[np.lexsort(corners.T[::-1])]


def check_geometry(image_path: Path, image: Volume, mask_file: Path, mask: Volume) -> None:
    """Refuse a mask whose grid is not its image's (shape, spacing, world box for NIfTI)."""
    fix = (
        "write the mask on the image's voxel grid (same size, spacing and header affine; "
        f"resample it with nearest neighbour onto {image_path.name} in the tool that made it)"
    )
    if mask.array.shape[0] != 1:
        raise DatasetError(
            mask_file,
            f"mask has {mask.array.shape[0]} channels; a label map has one",
            "save the mask as a single-channel (grey) label map",
        )
    if mask.array.shape[1:] != image.array.shape[1:]:
        raise DatasetError(
            mask_file,
            f"mask grid (D, H, W) = {mask.array.shape[1:]} differs from the image's "
            f"{image.array.shape[1:]} ({image_path})",
            fix,
        )
    if not np.allclose(mask.spacing, image.spacing, rtol=_SPACING_RTOL, atol=0):
        raise DatasetError(
            mask_file,
            f"mask spacing {tuple(round(s, 4) for s in mask.spacing)} mm differs from the "
            f"image's {tuple(round(s, 4) for s in image.spacing)} mm ({image_path})",
            fix,
        )
    if image_format(image_path) == "nifti" and image_format(mask_file) == "nifti":
        shape = _nifti(image_path).shape
        if tuple(_nifti(mask_file).shape[:3]) != tuple(shape[:3]):
            raise DatasetError(mask_file, f"mask stored shape differs from {image_path}", fix)
        image_box, mask_box = _world_corners(image_path, shape), _world_corners(mask_file, shape)
        if not np.allclose(image_box, mask_box, atol=_WORLD_ATOL_MM):
            shift = float(np.abs(image_box - mask_box).max())
            raise DatasetError(
                mask_file,
                f"mask covers another region of the scanner's space than {image_path} "
                f"(header affines differ, corners up to {shift:.3g} mm apart)",
                fix,
            )


def label_values(mask_file: Path, array: np.ndarray, num_classes: int) -> np.ndarray:
    """The mask as int64 class indices; refuses fractions and values outside the classes."""
    rounded = np.rint(array)
    if not np.allclose(rounded, array, atol=1e-3):
        raise DatasetError(
            mask_file,
            "mask holds fractional values (it was resampled with interpolation, or it is an "
            "image, not a label map)",
            "save integer class indices; resample masks with nearest neighbour",
        )
    labels = rounded.astype(np.int64)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        hint = " (a 0/255 PNG: save 0/1)" if high == 255 else ""
        raise DatasetError(
            mask_file,
            f"mask values span {low}..{high}, outside the site's classes 0..{num_classes - 1}",
            f"use class indices 0..{num_classes - 1}{hint}, or raise num_classes",
        )
    return labels


def resample_mask(mask: Tensor, grid: GridConfig) -> Tensor:
    """Nearest-neighbour counterpart of :func:`core.data.preprocess.resample_to_grid`:
    (1, D, H, W) int64 -> (1, D', H', W') on the same grid as the image."""
    _, depth, height, width = mask.shape
    new_d = grid.depth if grid.depth is not None and depth > 1 else depth
    if (new_d, height, width) == (depth, *grid.in_plane):
        return mask
    out = F.interpolate(
        mask[None].float(), size=(new_d, *grid.in_plane), mode="nearest-exact"
    )  # (1, 1, D', H', W')
    return out[0].round().long()


def pad_mask_depth(mask: Tensor, depth: int) -> Tensor:
    """Background-pad (1, D, H, W) to ``depth`` slices, centred exactly as :func:`pad_depth`."""
    missing = depth - mask.shape[1]
    if missing <= 0:
        return mask
    before = missing // 2
    return F.pad(mask, (0, 0, 0, 0, before, missing - before), value=0)


def prepare_pair(
    item: ItemSpec,
    mask_file: Path,
    grid: GridConfig,
    intensity: IntensityConfig,
    num_classes: int,
) -> tuple[Tensor, Tensor, tuple[float, float, float]]:
    """Read, check and bring one image and its mask onto the grid (depth not padded yet)."""
    if image_format(mask_file) == "dicom":
        raise DatasetError(
            mask_file,
            "DICOM masks (SEG / RTSTRUCT) are not read",
            "convert the mask to a NIfTI label map on the image's grid (e.g. with dcmqi)",
        )
    volume = read_image(item.image, item.spacing)
    mask_volume = read_image(mask_file, item.spacing)
    check_geometry(item.image, volume, mask_file, mask_volume)
    image, spacing = preprocess(volume, item, grid, intensity)
    labels = label_values(mask_file, mask_volume.array, num_classes)
    mask = resample_mask(torch.from_numpy(labels), grid)
    return image, mask, spacing


class SegmentationDataset(Dataset[dict[str, Tensor]]):
    """One split of a segmentation site, read, checked and preprocessed at construction.

    Attributes as :class:`core.data.SiteDataset` (``das``, ``spacings``, ``depth_by_da``,
    ``items``) plus ``mask_files``.
    """

    def __init__(self, datalist: Datalist, *, grid: GridConfig, intensity: IntensityConfig) -> None:
        info = datalist.info
        if not datalist.entries:
            raise DatasetError(
                info.source, f"split {datalist.split!r} is empty", "add items or open another split"
            )
        # The class-label check of parse_item does not apply: the label is a file here.
        entries = tuple({**entry, "label": 0} for entry in datalist.entries)
        as_images = replace(datalist, entries=entries)
        self.info = info
        self.split = datalist.split
        self.grid = grid
        items, masks, images, labels, spacings = [], [], [], [], []
        for position, entry in enumerate(datalist.entries):
            where = f"{datalist.split}[{position}]"
            item = parse_item(as_images, position)
            mask_file = mask_path(entry, info.source, where)
            image, mask, spacing = prepare_pair(item, mask_file, grid, intensity, info.num_classes)
            items.append(item)
            masks.append(mask_file)
            images.append(image)
            labels.append(mask)
            spacings.append(spacing)
        self.items: tuple[ItemSpec, ...] = tuple(items)
        self.mask_files: tuple[Path, ...] = tuple(masks)
        self.spacings = torch.tensor(spacings, dtype=torch.float64)  # (N, 3)
        self.das: tuple[int, ...] = tuple(degree_of_anisotropy(s) for s in spacings)
        self.depth_by_da: dict[int, int] = {}
        for da, image in zip(self.das, images, strict=True):
            padded = grid.padded_depth(image.shape[1], da)
            self.depth_by_da[da] = max(padded, self.depth_by_da.get(da, 0))
        self._images = [
            pad_depth(image, self.depth_by_da[da])
            for image, da in zip(images, self.das, strict=True)
        ]
        self._masks = [
            pad_mask_depth(mask, self.depth_by_da[da])
            for mask, da in zip(labels, self.das, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """``image`` (C, D, H, W) float32, ``spacing`` (3,), ``label`` (1, D, H, W) int64."""
        return {
            "image": self._images[index],
            "spacing": self.spacings[index],
            "label": self._masks[index],
        }


def open_segmentation_site(
    datalist: str | Path,
    split: str = "training",
    *,
    grid: GridConfig | None = None,
    intensity: IntensityConfig | None = None,
    num_classes: int | None = None,
) -> SegmentationDataset:
    """Open one split of a segmentation site from its ``dataset.json`` (or folder).

    ``num_classes`` (background included) overrides the datalist's. Raises DatasetError
    naming the file for every unusable item.
    """
    listing = read_datalist(datalist, split, num_classes=num_classes)
    return SegmentationDataset(
        listing, grid=grid or GridConfig(), intensity=intensity or IntensityConfig()
    )
