"""Unlabeled images for pretraining: site datalists pooled into batches that share a DA."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from core.data import GridConfig, IntensityConfig, SiteDataset
from core.data.datalist import SPLITS, canonical_split, read_datalist
from core.data.preprocess import pad_depth
from core.pretrain.settings import (
    PretrainError,
)


class ImageData(Protocol):
    """What pretraining needs of its data (:class:`ImagePool` is the real one)."""

    @property
    def das(self) -> Sequence[int]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Tensor]: ...

    def signature(self) -> str: ...


class ImagePool:
    """Several site datasets as one, with one DA per batch (for pretraining and pooled runs).

    ``das`` is the true DA of each item. Volumes of one DA from different sites may differ in
    depth; they are centre-padded to the deepest of that DA (as a site does within itself), so
    any batch drawn by a DA sampler stacks. In-plane size and channels must agree: open every
    site with the same :class:`GridConfig`.
    """

    def __init__(self, datasets: Sequence[SiteDataset]) -> None:
        if not datasets:
            raise PretrainError("no dataset to pool; pass at least one site with images")
        self.datasets = list(datasets)
        self._index: list[tuple[int, int]] = [
            (i, j) for i, ds in enumerate(self.datasets) for j in range(len(ds))
        ]
        in_plane = {(ds.grid.channels, ds.grid.in_plane) for ds in self.datasets}
        if len(in_plane) != 1:
            raise PretrainError(
                f"sites were opened on different grids (channels, in-plane) {sorted(in_plane)}; "
                "open every site with the same GridConfig"
            )
        self.das: tuple[int, ...] = tuple(self.datasets[i].das[j] for i, j in self._index)
        self.depth_by_da: dict[int, int] = {}
        for ds in self.datasets:
            for da, depth in ds.depth_by_da.items():
                self.depth_by_da[da] = max(depth, self.depth_by_da.get(da, 0))

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        site, item = self._index[index]
        sample = self.datasets[site][item]
        depth = self.depth_by_da[self.das[index]]
        if sample["image"].shape[1] != depth:
            sample = {**sample, "image": pad_depth(sample["image"], depth)}
        return sample

    @property
    def labels(self) -> Tensor:
        """(N,) or (N, K): the items' labels in pool order (fine-tuning uses them)."""
        return torch.stack([self.datasets[site].labels[item] for site, item in self._index])

    @property
    def sites(self) -> tuple[int, ...]:
        """Which dataset each item comes from."""
        return tuple(i for i, _ in self._index)

    def subset(self, indices: Sequence[int]) -> ImagePool:
        """A pool of only these items (e.g. a label fraction), keeping depth padding."""
        chosen = sorted(set(int(i) for i in indices))
        if not chosen or chosen[0] < 0 or chosen[-1] >= len(self):
            raise PretrainError(f"subset indices must lie in [0, {len(self)}) and not be empty")
        clone = object.__new__(ImagePool)
        clone.datasets = self.datasets
        clone._index = [self._index[i] for i in chosen]
        clone.das = tuple(self.das[i] for i in chosen)
        clone.depth_by_da = dict(self.depth_by_da)
        return clone

    def signature(self) -> str:
        """A hash of what batching depends on (count, DA, shape, spacing per item), not paths:
        a resumed run must see the same data to continue the same batch order."""
        digest = hashlib.sha256()
        for i, (site, item) in enumerate(self._index):
            ds = self.datasets[site]
            spacing = ds.spacings[item].tolist()
            digest.update(f"{self.das[i]}|{ds.image_shape(self.das[i])}|{spacing};".encode())
        return digest.hexdigest()


def find_datalists(paths: Sequence[str | Path]) -> list[Path]:
    """Datalist files from paths: a file as is, a folder searched for ``dataset.json`` files."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            lists = sorted(path.rglob("dataset.json"))
            if not lists:
                raise PretrainError(
                    f"{path} holds no dataset.json (searched recursively); pass dataset.json "
                    "files, or generate phantom sites with python -m core.data.phantoms"
                )
            found.extend(lists)
        else:
            raise PretrainError(f"--data {path} does not exist; pass a folder or a dataset.json")
    return found


def open_unlabeled(path: str | Path, split: str, grid: GridConfig) -> SiteDataset:
    """One split of a datalist for pretraining: labels are ignored, and may be missing.

    A ``dataset.json`` without ``num_classes`` or with items lacking ``label`` is accepted (a
    placeholder label 0 is filled in, never used); CSV and npz sites open as usual.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    num_classes: int | None = None
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PretrainError(f"{path} is not readable JSON ({err}); fix its syntax") from err
        if isinstance(doc, dict) and "num_classes" not in doc:
            num_classes = 2
    listing = read_datalist(path, split, num_classes=num_classes)
    placeholder: Any = [0] * listing.info.num_classes if listing.info.multi_label else 0
    entries = tuple(
        e if e.get("label") is not None else {**e, "label": placeholder} for e in listing.entries
    )
    listing = dataclasses.replace(listing, entries=entries)
    return SiteDataset(listing, grid=grid, intensity=IntensityConfig())


def open_pool(
    paths: Sequence[str | Path],
    splits: Sequence[str] = ("training",),
    *,
    grid: GridConfig | None = None,
    log: Callable[[str], None] = print,
) -> ImagePool:
    """Pool the images of the given splits of every datalist (a split a datalist lacks is
    skipped with a note; a datalist with none of them is an error)."""
    grid = grid or GridConfig()
    wanted = [canonical_split(s) for s in splits]
    datasets: list[SiteDataset] = []
    for path in find_datalists(paths):
        opened = 0
        for split in wanted:
            if path.suffix.lower() == ".json" and split not in _json_splits(path):
                log(f"note: {path} has no {split!r} split; skipped")
                continue
            datasets.append(open_unlabeled(path, split, grid))
            opened += 1
        if not opened:
            raise PretrainError(f"{path} has none of the splits {wanted}; choose --splits")
    return ImagePool(datasets)


def _json_splits(path: Path) -> set[str]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PretrainError(f"{path} is not readable JSON ({err}); fix its syntax") from err
    return {k for k in doc if k in SPLITS} if isinstance(doc, dict) else set()
