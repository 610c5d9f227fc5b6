"""A site's split as a torch Dataset that yields exactly what the model and training loop take.

One item is ``{"image": float32 (C, D, H, W), "spacing": float64 (3,) as (d, h, w) mm,
"label": int64 () or float32 (K,) multi-hot}``; :func:`collate` stacks items of one DA into
``image (N, C, D, H, W)``, ``spacing (N, 3)``, ``label (N,)`` or ``(N, K)``.

Opening a site reads and preprocesses every item once, so a missing, truncated or mislabelled
file fails (or is skipped) at open, never mid-training, and each item's DA and final shape are
known up front for the batch samplers. Sites are small: the preprocessed tensors are kept in
memory unless ``cache=False``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from core.data.datalist import Datalist, ItemSpec, parse_item, read_datalist
from core.data.errors import DatasetError, SkippedItem
from core.data.preprocess import (
    GridConfig,
    IntensityConfig,
    match_channels,
    normalize_intensity,
    pad_depth,
    resample_to_grid,
)
from core.data.readers import Volume, read_image, volume_from_array
from core.model.sac import batch_degree_of_anisotropy, degree_of_anisotropy

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
_MAX_LISTED = 5  # problems spelled out in a summary message


class SiteDataset(Dataset[dict[str, Tensor]]):
    """One split of one site, validated and preprocessed at construction (use :func:`open_site`).

    Attributes known without touching an image again: ``das`` (one int per item), ``spacings``
    (N, 3) float64, ``labels`` (N,) int64 or (N, K) float32, ``depth_by_da`` (the common depth
    of each DA bucket), ``items`` (the datalist entries kept) and ``skipped``.
    """

    def __init__(
        self,
        datalist: Datalist,
        *,
        grid: GridConfig,
        intensity: IntensityConfig,
        on_error: OnError = "raise",
        cache: bool = True,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.info = datalist.info
        self.split = datalist.split
        self.grid = grid
        self.intensity = intensity
        source = datalist.info.source
        if not datalist.entries:
            raise DatasetError(
                source,
                f"split {self.split!r} is empty",
                f"add items to the {self.split!r} list or open another split",
            )
        self._npz_images = _load_npz_images(datalist)

        items: list[ItemSpec] = []
        prepared: list[Tensor] = []
        spacings: list[tuple[float, float, float]] = []
        errors: list[DatasetError] = []
        skipped: list[SkippedItem] = []
        for position in range(len(datalist.entries)):
            try:
                item = parse_item(datalist, position)
                image, spacing = self._prepare(item)
            except DatasetError as err:
                errors.append(err)
                skipped.append(SkippedItem(self.split, position, err.path, str(err)))
                continue
            items.append(item)
            prepared.append(image)
            spacings.append(spacing)
        self.skipped: tuple[SkippedItem, ...] = tuple(skipped)
        if errors:
            self._report(errors, on_error, total=len(datalist.entries))
        if not items:
            raise DatasetError(
                source,
                f"split {self.split!r} has no usable item ({len(skipped)} skipped)",
                "fix the files listed in SiteDataset.skipped / the warning above",
            )

        self.items: tuple[ItemSpec, ...] = tuple(items)
        self.spacings: Tensor = torch.tensor(spacings, dtype=torch.float64)  # (N, 3)
        self.das: tuple[int, ...] = tuple(degree_of_anisotropy(s) for s in spacings)
        self.depth_by_da: dict[int, int] = {}
        for da, image in zip(self.das, prepared, strict=True):
            depth = grid.padded_depth(image.shape[1], da)
            self.depth_by_da[da] = max(depth, self.depth_by_da.get(da, 0))
        self._warn_mixed_depths(prepared)
        self.labels: Tensor = _label_tensor(items, multi_label=self.info.multi_label)
        self._images: list[Tensor] | None = None
        if cache:
            self._images = [
                pad_depth(image, self.depth_by_da[da])
                for image, da in zip(prepared, self.das, strict=True)
            ]
            self._npz_images = None  # everything needed is in the cache now

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """``image`` (C, D, H, W) float32 (read-only when cached), ``spacing`` (3,), ``label``."""
        if self._images is not None:
            image = self._images[index]
        else:
            raw, _ = self._prepare(self.items[index])
            image = pad_depth(raw, self.depth_by_da[self.das[index]])
        return {"image": image, "spacing": self.spacings[index], "label": self.labels[index]}

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        """The collated batch of these items (they must share a DA)."""
        return collate([self[i] for i in indices])

    def image_shape(self, da: int) -> tuple[int, int, int, int]:
        """(C, D, H, W) of every item of this DA."""
        return (self.grid.channels, self.depth_by_da[da], *self.grid.in_plane)

    def _read(self, item: ItemSpec) -> Volume:
        if item.array_index is None:
            return read_image(item.image, item.spacing)
        assert self._npz_images is not None, "npz arrays are kept whenever the cache is off"
        return volume_from_array(self._npz_images[item.array_index], item.image, item.spacing)

    def _prepare(self, item: ItemSpec) -> tuple[Tensor, tuple[float, float, float]]:
        """Read, normalise, fix channels and resample; depth padding comes later, per DA."""
        volume = self._read(item)
        normalized = normalize_intensity(
            volume.array, item.modality, volume.calibrated, self.intensity
        )
        image = match_channels(torch.from_numpy(normalized), self.grid.channels)
        if image is None:
            raise DatasetError(
                item.image,
                f"image has {volume.array.shape[0]} channels but the grid wants "
                f"{self.grid.channels}",
                f"open the site with GridConfig(channels={volume.array.shape[0]})",
            )
        return resample_to_grid(image, volume.spacing, self.grid)

    def _report(self, errors: list[DatasetError], on_error: OnError, total: int) -> None:
        if on_error == "raise":
            if len(errors) == 1:
                raise errors[0]
            listed = "\n  ".join(str(e) for e in errors[:_MAX_LISTED])
            more = len(errors) - _MAX_LISTED
            raise DatasetError(
                self.info.source,
                f"{len(errors)} of {total} {self.split} items are unusable:\n  {listed}"
                + (f"\n  ... and {more} more" if more > 0 else ""),
                "fix or remove them, or open the site with on_error='skip'",
            )
        logger.warning(
            "%s: skipped %d of %d %s items (see SiteDataset.skipped): %s",
            self.info.source,
            len(errors),
            total,
            self.split,
            "; ".join(str(e) for e in errors[:_MAX_LISTED]),
        )

    def _warn_mixed_depths(self, prepared: list[Tensor]) -> None:
        for da, depth in self.depth_by_da.items():
            pairs = zip(self.das, prepared, strict=True)
            flat = sum(1 for d, image in pairs if d == da and image.shape[1] == 1)
            if flat and depth > 1:
                logger.warning(
                    "%s: DA %d holds %d 2D image(s) and volumes; the 2D ones are padded to "
                    "%d slices so the bucket stacks. Put 2D and 3D data in separate sites.",
                    self.info.source,
                    da,
                    flat,
                    depth,
                )


def _load_npz_images(datalist: Datalist) -> np.ndarray | None:
    if datalist.npz_images_key is None:
        return None
    with np.load(datalist.info.source, allow_pickle=False) as npz:
        return np.asarray(npz[datalist.npz_images_key])


def _label_tensor(items: Sequence[ItemSpec], *, multi_label: bool) -> Tensor:
    """(N,) int64 class indices or (N, K) float32 multi-hot."""
    if multi_label:
        return torch.tensor([item.label for item in items], dtype=torch.float32)
    return torch.tensor([item.label for item in items], dtype=torch.int64)


def open_site(
    datalist: str | Path,
    split: str = "training",
    *,
    grid: GridConfig | None = None,
    intensity: IntensityConfig | None = None,
    on_error: OnError = "raise",
    cache: bool = True,
    num_classes: int | None = None,
    multi_label: bool | None = None,
    modality: str | None = None,
    spacing: Sequence[float] | None = None,
) -> SiteDataset:
    """Open one split of a site from a ``dataset.json`` (or its folder), a CSV or an ``.npz``.

    Every item is read and validated now; a problem raises :class:`DatasetError` naming the file
    (``on_error="skip"`` leaves bad items out and lists them in ``.skipped``). ``num_classes``,
    ``multi_label``, ``modality`` and ``spacing`` fill site facts a CSV or npz cannot carry.
    """
    listing = read_datalist(
        datalist,
        split,
        num_classes=num_classes,
        multi_label=multi_label,
        modality=modality,
        spacing=spacing,
    )
    return SiteDataset(
        listing,
        grid=grid or GridConfig(),
        intensity=intensity or IntensityConfig(),
        on_error=on_error,
        cache=cache,
    )


def collate(items: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Stack items of one DA and one shape: image (N, C, D, H, W), spacing (N, 3), label."""
    if not items:
        raise ValueError("cannot collate an empty batch; skip empty sub-batches")
    spacing = torch.stack([item["spacing"] for item in items])  # (N, 3)
    batch_degree_of_anisotropy(spacing)  # raises on mixed DAs
    shapes = {tuple(item["image"].shape) for item in items}
    if len(shapes) != 1:
        raise ValueError(
            f"images in one batch must share a shape, got {sorted(shapes)}; draw batches with "
            "DABatchSampler / PoissonDABatchSampler from one SiteDataset"
        )
    return {
        "image": torch.stack([item["image"] for item in items]),  # (N, C, D, H, W)
        "spacing": spacing,
        "label": torch.stack([item["label"] for item in items]),  # (N,) or (N, K)
    }
