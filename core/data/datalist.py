"""A site's datalist: which images belong to which split, their labels, and site-level facts.

Three sources describe a site, all resolved to one :class:`Datalist`:

``dataset.json`` (Decathlon-style, readable by MONAI's ``load_decathlon_datalist``)::

    {
      "name": "ct-site",                 # optional; default: the folder's name
      "modality": "CT",                  # "CT" | "MR" | "XR" (DICOM codes CR/DX/DR mean XR;
                                         #   Decathlon's {"0": "CT"} form is accepted)
      "num_classes": 2,                  # required: >= 2 (multi-class) or >= 1 (multi-label)
      "multi_label": false,              # optional, default false
      "class_names": ["absent", "present"],   # optional, one per class
      "spacing": [0.8, 0.8],             # optional default spacing in mm for header-less images
      "training":   [{"image": "images/case_000.nii.gz", "label": 1}, ...],
      "validation": [...],
      "test":       [...]
    }

An item is ``{"image": path, "label": ..., "spacing": [...], "modality": ...}``; ``image`` is
relative to the datalist's folder (or absolute) and names a NIfTI, DICOM (file or series
folder), PNG or JPEG file. ``label`` is a class index for multi-class sites and a multi-hot
list of ``num_classes`` 0/1 values for multi-label sites. ``spacing`` (mm, one value per spatial
axis of the file, in file order: ``[row, col]`` for 2D images, three values for volumes) is used
only where the format has no header spacing. Other fields (Decathlon's ``description``,
``numTraining``...) are ignored.

A CSV has columns ``image`` and ``label``, and optional ``split`` (training/validation/test,
default training), ``spacing`` (``"0.7;0.7;5"``) and ``modality``. A label is a class index
(``2``) or a class name (``No Finding``; spaces belong to the name); a site is multi-label when
the caller says so or a label lists several values joined by ``|`` or ``;`` (multi-hot
``"0;1;0"``, or names ``"Cardiomegaly|Effusion"`` as in NIH ChestX-ray14). Names become
``class_names`` in sorted order, which fixes their indices; a column mixing names and indices is
refused. In a ``dataset.json`` a label may also be a name from its ``class_names``. Site-level
facts come from :func:`~core.data.open_site`'s arguments or are inferred.

A MedMNIST-style ``.npz`` (``train_images``, ``train_labels``, ``val_*``, ``test_*``) is a site
on its own: see :func:`read_npz_datalist`.

Over 500 lines: the three datalist sources resolve to one :class:`Datalist` through shared
field checks, so they stay in one module.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.data.errors import DatasetError

logger = logging.getLogger(__name__)

SPLITS = ("training", "validation", "test")
_SPLIT_ALIASES = {
    "training": "training",
    "train": "training",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "test": "test",
}
_NPZ_PREFIX = {"training": "train", "validation": "val", "test": "test"}

MODALITIES = ("CT", "MR", "XR")
_MODALITY_ALIASES = {
    "CT": "CT",
    "MR": "MR",
    "MRI": "MR",
    "XR": "XR",
    "X-RAY": "XR",
    "XRAY": "XR",
    "CR": "XR",
    "DX": "XR",
    "DR": "XR",
}
_LIST_SEPARATORS = re.compile(r"[;\s|]+")  # between spacings: "0.7;0.7;5" or "0.7 0.7 5"
_LABEL_SEPARATORS = re.compile(r"[;|]")  # between labels: class names may contain spaces


@dataclass(frozen=True)
class SiteInfo:
    """Facts about a whole site that every item shares."""

    name: str
    source: Path  # the datalist file (dataset.json, CSV or npz)
    num_classes: int
    multi_label: bool
    modality: str | None  # site default; an item may override it
    class_names: tuple[str, ...] | None = None
    default_spacing: tuple[float, ...] | None = None  # mm, for header-less images


@dataclass(frozen=True)
class ItemSpec:
    """One validated datalist item; nothing about it has been read from disk yet."""

    position: int  # index in its split, for messages
    image: Path
    label: int | tuple[int, ...]  # class index, or multi-hot tuple of 0/1
    modality: str
    spacing: tuple[float, ...] | None  # mm per spatial file axis, from the datalist
    array_index: int | None = None  # row of an npz split array; None for files


@dataclass(frozen=True)
class Datalist:
    """A site's split as listed, before any item is validated.

    Items stay raw mappings so that one bad item can be skipped (``on_error="skip"``) instead of
    failing the whole site; :func:`parse_item` validates one.
    """

    info: SiteInfo
    split: str
    entries: tuple[Mapping[str, Any], ...]
    npz_images_key: str | None = None  # set for npz sites: where the pixel arrays live


def canonical_split(split: str) -> str:
    """``"train"`` -> ``"training"`` etc.; a ValueError names the valid choices."""
    try:
        return _SPLIT_ALIASES[split.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}") from None


def canonical_modality(value: Any, where: Path, field: str) -> str:
    """Map a modality name (or Decathlon's ``{"0": "CT"}``) onto CT, MR or XR."""
    if isinstance(value, Mapping):
        names = {canonical_modality(v, where, field) for v in value.values()}
        if len(names) != 1:
            raise DatasetError(
                where,
                f"field {field!r} lists channels of different modalities {sorted(names)}",
                "use one modality per site (split mixed channels into separate sites)",
            )
        return names.pop()
    if not isinstance(value, str) or value.upper() not in _MODALITY_ALIASES:
        raise DatasetError(
            where,
            f"field {field!r} has unknown modality {value!r}",
            f"use one of {MODALITIES} (DICOM codes CR, DX, DR also mean XR)",
        )
    return _MODALITY_ALIASES[value.upper()]


def _optional_modality(value: Any, where: Path) -> str | None:
    return None if value is None else canonical_modality(value, where, "modality")


def parse_spacing(value: Any, where: Path, field: str) -> tuple[float, ...]:
    """2 or 3 finite positive millimetre values, from a list or a ``"0.7;0.7;5"`` string."""
    raw: Any = value
    if isinstance(value, str):
        raw = [v for v in _LIST_SEPARATORS.split(value.strip()) if v]
    try:
        spacing = tuple(float(v) for v in raw)
    except (TypeError, ValueError):
        spacing = ()
    if len(spacing) not in (2, 3) or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise DatasetError(
            where,
            f"field {field!r} is {value!r}, not 2 or 3 positive spacings in mm",
            "write it as a list such as [0.7, 0.7, 5.0] (file axis order; [row, col] for 2D)",
        )
    return spacing


def read_datalist(
    path: str | Path,
    split: str,
    *,
    num_classes: int | None = None,
    multi_label: bool | None = None,
    modality: str | None = None,
    spacing: Sequence[float] | None = None,
) -> Datalist:
    """Read a ``dataset.json``, a CSV or an ``.npz`` (or a folder holding ``dataset.json``).

    The keyword arguments supply site facts a CSV or npz cannot carry; for a ``dataset.json``
    they must agree with its fields when both are given.
    """
    source = Path(path).expanduser().absolute()  # image paths stay valid after a chdir
    if source.is_dir():
        source = source / "dataset.json"
    if not source.is_file():
        raise DatasetError(
            source, "datalist not found", "pass a dataset.json, a CSV or an .npz that exists"
        )
    split = canonical_split(split)
    suffix = source.suffix.lower()
    overrides = _Overrides(num_classes, multi_label, modality, spacing)
    if suffix == ".json":
        return _read_json(source, split, overrides)
    if suffix == ".csv":
        return _read_csv(source, split, overrides)
    if suffix == ".npz":
        return read_npz_datalist(source, split, overrides)
    raise DatasetError(
        source,
        f"unknown datalist format {suffix!r}",
        "use a Decathlon-style dataset.json, a CSV with image and label columns, or an .npz",
    )


@dataclass(frozen=True)
class _Overrides:
    num_classes: int | None
    multi_label: bool | None
    modality: str | None
    spacing: Sequence[float] | None


def _merge(source: Path, field: str, from_file: Any, from_caller: Any) -> Any:
    """The caller's value fills a gap in the datalist but may not contradict it."""
    if from_file is None:
        return from_caller
    if from_caller is not None and from_caller != from_file:
        raise DatasetError(
            source,
            f"field {field!r} is {from_file!r} in the datalist but {from_caller!r} was passed",
            f"drop the {field} argument or correct the datalist",
        )
    return from_file


def _site_info(
    source: Path,
    *,
    name: str,
    num_classes: Any,
    multi_label: Any,
    modality: Any,
    class_names: Any = None,
    spacing: Any = None,
) -> SiteInfo:
    if not isinstance(multi_label, bool):
        raise DatasetError(
            source, f"field 'multi_label' is {multi_label!r}, not true/false", "write true or false"
        )
    least, kind = (1, "multi-label") if multi_label else (2, "multi-class")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < least:
        raise DatasetError(
            source,
            f"field 'num_classes' is {num_classes!r}; a {kind} site needs an integer >= {least}",
            "set num_classes to the number of classes the labels index",
        )
    names: tuple[str, ...] | None = None
    if class_names is not None:
        if not isinstance(class_names, Sequence) or isinstance(class_names, str):
            class_names = None
        if class_names is None or len(class_names) != num_classes:
            raise DatasetError(
                source,
                "field 'class_names' must be a list of num_classes names",
                f"give exactly {num_classes} names or drop the field",
            )
        names = tuple(str(n) for n in class_names)
    return SiteInfo(
        name=name,
        source=source,
        num_classes=num_classes,
        multi_label=multi_label,
        modality=None if modality is None else canonical_modality(modality, source, "modality"),
        class_names=names,
        default_spacing=None if spacing is None else parse_spacing(spacing, source, "spacing"),
    )


def _read_json(source: Path, split: str, overrides: _Overrides) -> Datalist:
    try:
        doc = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(source, f"not readable JSON ({err})", "fix the JSON syntax") from err
    if not isinstance(doc, dict):
        raise DatasetError(source, "top level is not a JSON object", "see core.data.datalist")
    if "num_classes" not in doc and overrides.num_classes is None:
        raise DatasetError(
            source,
            "field 'num_classes' is missing",
            'add "num_classes": <int> at the top level (2 for present/absent)',
        )
    info = _site_info(
        source,
        name=str(doc.get("name") or source.parent.name),
        num_classes=_merge(source, "num_classes", doc.get("num_classes"), overrides.num_classes),
        multi_label=_merge(source, "multi_label", doc.get("multi_label"), overrides.multi_label)
        or False,
        modality=_merge(
            source,
            "modality",
            _optional_modality(doc.get("modality"), source),
            _optional_modality(overrides.modality, source),
        ),
        class_names=doc.get("class_names"),
        spacing=doc.get("spacing", overrides.spacing),
    )
    if split not in doc:
        present = sorted(k for k in doc if k in SPLITS)
        raise DatasetError(
            source,
            f"field {split!r} is missing (splits present: {present})",
            f'add a "{split}" list of {{"image": ..., "label": ...}} items or open another split',
        )
    entries = doc[split]
    if not isinstance(entries, list):
        raise DatasetError(
            source,
            f"field {split!r} is a {type(entries).__name__}, not a list of items",
            'write it as [{"image": "path", "label": 0}, ...]',
        )
    # Decathlon lists unlabeled test images as bare strings; keep them so the error is per item.
    items = tuple(e if isinstance(e, Mapping) else {"image": e} for e in entries)
    return Datalist(info=info, split=split, entries=items)


def _read_csv(source: Path, split: str, overrides: _Overrides) -> Datalist:
    try:
        with source.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(source, f"not a readable CSV ({err})", "save it as UTF-8 CSV") from err
    missing = [c for c in ("image", "label") if c not in columns]
    if missing:
        raise DatasetError(
            source,
            f"column(s) {missing} missing (columns present: {columns})",
            "add a header row with at least the columns image,label",
        )
    labels = [(row.get("label") or "").strip() for row in rows]
    multi_label = overrides.multi_label
    if multi_label is None:  # a list needs a separator; a space is part of a class name
        multi_label = any(_LABEL_SEPARATORS.search(label) for label in labels)
    class_names = _csv_class_names(source, labels, multi_label)
    num_classes = overrides.num_classes
    if class_names and num_classes is not None and num_classes != len(class_names):
        raise DatasetError(
            source,
            f"the labels name {len(class_names)} classes {list(class_names)} but"
            f" num_classes={num_classes} was passed",
            "drop the num_classes argument (it is inferred from the names) or fix the labels",
        )
    if num_classes is None:
        num_classes = len(class_names) if class_names else _infer_num_classes(labels, multi_label)
        logger.info("%s: inferred num_classes=%d from the labels", source, num_classes)
    info = _site_info(
        source,
        name=source.stem,
        num_classes=num_classes,
        multi_label=multi_label,
        modality=overrides.modality,
        class_names=class_names,
        spacing=overrides.spacing,
    )
    entries = []
    for row in rows:
        try:
            row_split = canonical_split((row.get("split") or "training").strip())
        except ValueError as err:
            problem = f"column 'split' has {row.get('split')!r}"
            raise DatasetError(source, problem, str(err)) from err
        if row_split == split:
            entries.append({k: v for k, v in row.items() if v not in (None, "") and k != "split"})
    return Datalist(info=info, split=split, entries=tuple(entries))


def _label_parts(label: str) -> list[str]:
    """``"Cardiomegaly|Pleural Effusion"`` or ``"0;1;0"`` -> its stripped, non-empty parts."""
    return [part.strip() for part in _LABEL_SEPARATORS.split(label) if part.strip()]


def _is_index(text: str) -> bool:
    return text.strip().lstrip("-").isdigit()


def _csv_class_names(source: Path, labels: list[str], multi_label: bool) -> list[str] | None:
    """Labels written as class names: the sorted set of names (a stated, stable order), which
    maps each name to its index. None when the labels are indices (or multi-hot 0/1 lists).

    Raises:
        DatasetError: the column mixes names and indices.
    """
    tokens = {t for label in labels for t in (_label_parts(label) if multi_label else [label]) if t}
    names = sorted(t for t in tokens if not _is_index(t))
    indices = sorted(t for t in tokens if _is_index(t))
    if names and indices:
        raise DatasetError(
            source,
            f"column 'label' mixes class indices and class names (e.g. {indices[0]!r} and"
            f" {names[0]!r})",
            "write every label as a class name, or every label as a class index",
        )
    return names or None


def _infer_num_classes(labels: list[str], multi_label: bool) -> int:
    best = 0
    for label in labels:
        parts = _label_parts(label)
        if multi_label:
            best = max(best, len(parts))
        elif parts and _is_index(parts[0]):
            best = max(best, int(parts[0]) + 1)
    return max(best, 1 if multi_label else 2)


def read_npz_datalist(source: Path, split: str, overrides: _Overrides) -> Datalist:
    """A MedMNIST-style npz as a site: ``{train,val,test}_{images,labels}`` arrays.

    Labels ``(N,)`` or ``(N, 1)`` are class indices; ``(N, K)`` with K > 1 are multi-hot.
    ``num_classes`` defaults to the largest label over all splits plus one (multi-class) or K.
    """
    try:
        with np.load(source, allow_pickle=False) as npz:
            keys = set(npz.files)
            prefix = _NPZ_PREFIX[split]
            if f"{prefix}_images" not in keys or f"{prefix}_labels" not in keys:
                raise DatasetError(
                    source,
                    f"arrays {prefix}_images and {prefix}_labels missing (arrays: {sorted(keys)})",
                    "store MedMNIST-style train_/val_/test_ images and labels, or open another "
                    "split",
                )
            labels = np.asarray(npz[f"{prefix}_labels"])
            all_labels = [np.asarray(npz[k]) for k in sorted(keys) if k.endswith("_labels")]
            n_images = npz[f"{prefix}_images"].shape[0]
    except DatasetError:
        raise
    except Exception as err:
        raise DatasetError(source, f"not a readable .npz ({err})", "re-save it with numpy") from err
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or labels.shape[0] != n_images:
        raise DatasetError(
            source,
            f"{prefix}_labels has shape {labels.shape} for {n_images} images",
            "store labels as (N,) class indices or (N, K) multi-hot rows",
        )
    multi_label = overrides.multi_label
    if multi_label is None:
        multi_label = labels.shape[1] > 1
    num_classes = overrides.num_classes
    if num_classes is None:
        if multi_label:
            num_classes = labels.shape[1]
        else:
            num_classes = max(int(a.max()) + 1 if a.size else 0 for a in all_labels)
    info = _site_info(
        source,
        name=source.stem,
        num_classes=max(num_classes, 1),
        multi_label=multi_label,
        modality=overrides.modality,
        spacing=overrides.spacing,
    )
    entries = tuple(
        {
            "image": source.name,
            "label": [int(v) for v in row] if multi_label else int(row[0]),
            "array_index": i,
        }
        for i, row in enumerate(labels)
    )
    return Datalist(info=info, split=split, entries=entries, npz_images_key=f"{prefix}_images")


def parse_item(datalist: Datalist, position: int) -> ItemSpec:
    """Validate one item of a split: its fields, its label against the class count."""
    info = datalist.info
    entry = datalist.entries[position]
    where = f"{datalist.split}[{position}]"
    image = entry.get("image")
    if not isinstance(image, str) or not image.strip():
        raise DatasetError(
            info.source,
            f"item {where} has no 'image' path (fields: {sorted(entry)})",
            'give every item an "image" path relative to the datalist\'s folder',
        )
    image_path = Path(image)
    if not image_path.is_absolute():
        image_path = info.source.parent / image_path
    label = _parse_label(entry.get("label"), info, f"item {where} (image {image})")
    modality_value = entry.get("modality", info.modality)
    if modality_value is None:
        raise DatasetError(
            info.source,
            f"item {where} (image {image}) has no modality and the site sets none",
            f'add "modality": one of {MODALITIES} to the datalist (or pass modality=...)',
        )
    modality = canonical_modality(modality_value, info.source, f"{where}.modality")
    spacing = entry.get("spacing")
    parsed_spacing = (
        parse_spacing(spacing, info.source, f"{where}.spacing")
        if spacing is not None
        else info.default_spacing
    )
    array_index = entry.get("array_index")
    return ItemSpec(
        position=position,
        image=image_path,
        label=label,
        modality=modality,
        spacing=parsed_spacing,
        array_index=None if array_index is None else int(array_index),
    )


def _all_names(values: Any) -> bool:
    """A non-empty list of class names (strings that are not indices)."""
    return (
        isinstance(values, Sequence)
        and len(values) > 0
        and all(isinstance(v, str) and not _is_index(v) for v in values)
    )


def _parse_label(value: Any, info: SiteInfo, where: str) -> int | tuple[int, ...]:
    if value is None:
        raise DatasetError(
            info.source,
            f"{where} has no 'label'",
            "give every item a label (a class index, or a multi-hot list for multi-label sites)",
        )
    names = info.class_names
    if info.multi_label:
        raw = _label_parts(value) if isinstance(value, str) else value
        if names and _all_names(raw):
            unknown = [v for v in raw if v not in names]
            if unknown:
                raise DatasetError(
                    info.source,
                    f"{where} has label {value!r} naming {unknown}, not in class_names"
                    f" {list(names)}",
                    "use the names listed in class_names (or add the missing ones there)",
                )
            return tuple(int(name in raw) for name in names)
        try:
            bits = tuple(int(v) for v in raw) if isinstance(raw, Sequence) else None
        except (TypeError, ValueError):
            bits = None
        if bits is None or len(bits) != info.num_classes or any(b not in (0, 1) for b in bits):
            raise DatasetError(
                info.source,
                f"{where} has label {value!r}, not {info.num_classes} multi-hot 0/1 values",
                f"write the label as a list of {info.num_classes} zeros and ones"
                + (" or as class names joined by '|'" if names else ""),
            )
        return bits
    index: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str) and _is_index(value):
        index = int(value.strip())
    elif isinstance(value, str) and names and value.strip() in names:
        index = names.index(value.strip())
    if index is None:
        known = f" nor one of class_names {list(names)}" if names else ""
        raise DatasetError(
            info.source,
            f"{where} has label {value!r}, not an integer class index{known}",
            "write the label as an integer 0 <= label < num_classes"
            + ("" if names else ', or list the class names in "class_names"'),
        )
    if not 0 <= index < info.num_classes:
        raise DatasetError(
            info.source,
            f"{where} has label {index}, out of range for num_classes={info.num_classes}",
            f"use labels 0..{info.num_classes - 1} or raise num_classes",
        )
    return index
