"""A site's split as a torch Dataset that yields exactly what the model and training loop take.

One item is ``{"image": float32 (C, D, H, W), "spacing": float64 (3,) as (d, h, w) mm,
"label": int64 () or float32 (K,) multi-hot}``; :func:`collate` stacks items of one DA into
``image (N, C, D, H, W)``, ``spacing (N, 3)``, ``label (N,)`` or ``(N, K)``.

Opening a site reads and preprocesses every item once, so a missing, truncated or mislabelled
file fails (or is skipped) at open, never mid-training, and each item's DA and final shape are
known up front for the batch samplers. The preprocessed tensors are kept in memory unless
``cache=False``.

With ``cache_dir`` (the site's own state folder, see :mod:`core.data.cache`) each image file is
decoded once, ever: the first open preprocesses the items missing from the cache on all cores
(worker processes, with a progress bar) and stores them; later opens, in later rounds and later
runs, check each file's stat signature and load the stored tensor (milliseconds, no decode), and
with ``cache=False`` items are read back from the cache rather than decoded again. A file that
changed since it was cached is decoded again at open, so a corrupt one is still reported by name
before training starts. Without ``cache_dir`` and with ``cache=False``, every item is decoded at
open (to validate it and learn its shape) and again whenever it is read.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from core.data.cache import DEFAULT_MAX_BYTES, CacheError, PreprocessCache
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
# workers=None starts worker processes only when this many source bytes wait to be
# preprocessed: a spawned worker spends about 3 s importing torch, nibabel and pydicom before
# its first item.
_POOL_MIN_BYTES = 64 * 2**20
# glibc mallopt parameters (malloc.h): how many mmaps, and when the heap's top is given back.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


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
        cache_dir: str | Path | None = None,
        workers: int | None = None,
        cache_max_bytes: int = DEFAULT_MAX_BYTES,
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

        self._store = (
            None
            if cache_dir is None
            else PreprocessCache(
                cache_dir, {"grid": grid, "intensity": intensity}, max_bytes=cache_max_bytes
            )
        )
        parsed: list[ItemSpec] = []
        failed: dict[int, DatasetError] = {}
        self._found: dict[int, Path] = {}  # position -> its cache entry, found before the fill
        for position in range(len(datalist.entries)):
            try:
                parsed.append(parse_item(datalist, position))
            except DatasetError as err:
                failed[position] = err
        if self._store is not None:
            self._store.drop_format_1_entries()
            failed.update(self._fill_cache(parsed, workers))

        items: list[ItemSpec] = []
        prepared: list[Tensor] = []  # kept only when cache=True
        depths: list[int] = []
        spacings: list[tuple[float, float, float]] = []
        for item in parsed:
            if item.position in failed:
                continue
            try:
                image, spacing = self._prepare(item)
            except DatasetError as err:
                failed[item.position] = err
                continue
            items.append(item)
            depths.append(image.shape[1])
            spacings.append(spacing)
            if cache:
                prepared.append(image)
        errors = [failed[position] for position in sorted(failed)]
        skipped = [
            SkippedItem(self.split, position, failed[position].path, str(failed[position]))
            for position in sorted(failed)
        ]
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
        for da, depth in zip(self.das, depths, strict=True):
            padded = grid.padded_depth(depth, da)
            self.depth_by_da[da] = max(padded, self.depth_by_da.get(da, 0))
        self._warn_mixed_depths(depths)
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
        """Read (or load from the cache dir), normalise, fix channels and resample; depth
        padding comes later, per DA. npz rows are not cached (the npz is one file for all)."""
        if self._store is None or item.array_index is not None:
            return preprocess(self._read(item), item, self.grid, self.intensity)
        variant = _variant(item)
        found = self._found.pop(item.position, None)  # used once: a later read re-checks
        hit = self._store.read(found) if found else self._store.load(item.image, variant)
        if hit is not None:
            return hit
        image, spacing = prepare_file(item, self.grid, self.intensity)
        self._store.store(item.image, variant, image, spacing)
        return image, spacing

    def _fill_cache(
        self, parsed: Sequence[ItemSpec], workers: int | None
    ) -> dict[int, DatasetError]:
        """Preprocess the file items missing from the cache dir and store them; returns the
        items that failed, by position. ``workers``: processes (None: one per core the process
        may use, for at least ``_POOL_MIN_BYTES`` of sources; 1: in this one). With
        ``workers=None`` a single core still gets one worker process: its heap keeps the pages
        of the last volume (:func:`_worker_init`), which this process cannot do for itself.

        Raises:
            CacheError: the cache folder cannot hold the entries (see :mod:`core.data.cache`).
        """
        store = self._store
        assert store is not None
        pending = []
        for item in parsed:
            if item.array_index is not None or not item.image.exists():
                continue
            found = store.find(item.image, _variant(item))
            if found is None:
                pending.append(item)
            else:
                self._found[item.position] = found
        if not pending:
            return {}
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        count = min(workers or cores or 1, len(pending))
        in_process = (
            workers == 1
            or len(pending) == 1  # a worker's kept heap pays from its second item on
            or (workers is None and _source_bytes(pending) < _POOL_MIN_BYTES)
        )
        failed: dict[int, DatasetError] = {}
        settings = (store.folder, self.grid, self.intensity, store.max_bytes)
        progress = tqdm(
            total=len(pending),
            desc=f"preprocessing {self.info.source.parent.name}/{self.split}",
            unit="item",
            disable=None,  # off when stderr is not a terminal (logs)
        )
        with progress:
            if in_process:
                for item in pending:
                    _record(failed, item, _fill_one(settings, item))
                    progress.update()
                return failed
            # spawn: fork after torch threads can hang; forkserver would share one torch import,
            # but its children still import __main__ and the start is a few per cent of a
            # 200-volume pass (benchmarks/README.md)
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(count, mp_context=context, initializer=_worker_init) as pool:
                futures = {pool.submit(_fill_one, settings, item): item for item in pending}
                for future in as_completed(futures):
                    _record(failed, futures[future], future.result())
                    progress.update()
        return failed

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

    def _warn_mixed_depths(self, depths: list[int]) -> None:
        for da, depth in self.depth_by_da.items():
            pairs = zip(self.das, depths, strict=True)
            flat = sum(1 for d, item_depth in pairs if d == da and item_depth == 1)
            if flat and depth > 1:
                logger.warning(
                    "%s: DA %d holds %d 2D image(s) and volumes; the 2D ones are padded to "
                    "%d slices so the bucket stacks. Put 2D and 3D data in separate sites.",
                    self.info.source,
                    da,
                    flat,
                    depth,
                )


def preprocess(
    volume: Volume, item: ItemSpec, grid: GridConfig, intensity: IntensityConfig
) -> tuple[Tensor, tuple[float, float, float]]:
    """Normalise, fix channels and resample one read volume.

    Returns ``image`` (C, D, H, W) float32 on the grid (depth not yet padded) and its spacing
    (d, h, w) mm.

    Raises:
        DatasetError: the image's channels cannot be brought to ``grid.channels``.
    """
    normalized = normalize_intensity(volume.array, item.modality, volume.calibrated, intensity)
    image = match_channels(torch.from_numpy(normalized), grid.channels)
    if image is None:
        raise DatasetError(
            item.image,
            f"image has {volume.array.shape[0]} channels but the grid wants {grid.channels}",
            f"open the site with GridConfig(channels={volume.array.shape[0]})",
        )
    return resample_to_grid(image, volume.spacing, grid)


def prepare_file(
    item: ItemSpec, grid: GridConfig, intensity: IntensityConfig
) -> tuple[Tensor, tuple[float, float, float]]:
    """Read one file item and :func:`preprocess` it (the only place a file's pixels are
    decoded for a site). Raises DatasetError naming the file."""
    return preprocess(read_image(item.image, item.spacing), item, grid, intensity)


def _variant(item: ItemSpec) -> dict[str, object]:
    """The item's own preprocessing settings, part of its cache key."""
    return {"modality": item.modality, "spacing": item.spacing}


def _source_bytes(items: Sequence[ItemSpec]) -> int:
    total = 0
    for item in items:
        files = item.image.rglob("*") if item.image.is_dir() else [item.image]
        total += sum(f.stat().st_size for f in files if f.is_file())
    return total


_Outcome = tuple[str, str, str] | None  # None, or (kind, path, message) of a failure


def _worker_init() -> None:
    torch.set_num_threads(1)  # one process per core; intra-op threads would oversubscribe
    _keep_freed_memory()


def _keep_freed_memory() -> None:
    """Make glibc serve large arrays from a heap this process keeps, not from fresh mmaps.

    glibc maps every array above 32 MiB anew and unmaps it on free, so each CT volume's ~750 MB
    of arrays (decoded, float, transposed, windowed) are fresh pages the kernel must fault in;
    on the benchmark machine that cost 0.03-3 s per 200 MB array, erratically, and a volume
    took 1.6-5 s instead of a steady 1.5 s with the pages kept (benchmarks/README.md). Only for
    worker processes: the heap stays at its high-water mark (about 750 MiB) until they exit.
    Other C libraries keep their defaults.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_MAX, 0)  # large blocks come from the heap too
    mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # and freed ones stay in it for the next item


def _fill_one(settings: tuple[Path, GridConfig, IntensityConfig, int], item: ItemSpec) -> _Outcome:
    """Preprocess one item into the cache (in a worker process or this one). Failures come
    back as plain strings: they cross a process boundary."""
    folder, grid, intensity, max_bytes = settings
    store = PreprocessCache(folder, {"grid": grid, "intensity": intensity}, max_bytes=max_bytes)
    try:
        if store.load(item.image, _variant(item)) is None:  # a touched but unchanged file hits
            image, spacing = prepare_file(item, grid, intensity)
            store.store(item.image, _variant(item), image, spacing)
    except DatasetError as err:
        return ("data", str(err.path), f"{err.problem}\0{err.fix}")
    except CacheError as err:
        return ("cache", str(folder), str(err))
    return None


def _record(failed: dict[int, DatasetError], item: ItemSpec, outcome: _Outcome) -> None:
    if outcome is None:
        return
    kind, path, message = outcome
    if kind == "cache":
        raise CacheError(message)
    problem, fix = message.split("\0", 1)
    failed[item.position] = DatasetError(path, problem, fix)


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
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    cache_max_bytes: int = DEFAULT_MAX_BYTES,
    num_classes: int | None = None,
    multi_label: bool | None = None,
    modality: str | None = None,
    spacing: Sequence[float] | None = None,
) -> SiteDataset:
    """Open one split of a site from a ``dataset.json`` (or its folder), a CSV or an ``.npz``.

    Every item is read and validated now; a problem raises :class:`DatasetError` naming the file
    (``on_error="skip"`` leaves bad items out and lists them in ``.skipped``). ``num_classes``,
    ``multi_label``, ``modality`` and ``spacing`` fill site facts a CSV or npz cannot carry.

    ``cache_dir``: a folder of the site's own (its state folder) where preprocessed items are
    stored and reused across opens (see :mod:`core.data.cache`); only that folder is written.
    ``workers``: processes for the first-time preprocessing of items missing from it (None:
    every core, when there is enough to do); ``cache_max_bytes`` bounds the folder.

    Raises:
        DatasetError: an item is unusable (``on_error="raise"``) or none is usable.
        CacheError: ``cache_dir`` cannot be created or the disk holding it is short.
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
        cache_dir=cache_dir,
        workers=workers,
        cache_max_bytes=cache_max_bytes,
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
