"""A site-local cache of preprocessed items, so a site decodes each image file once, ever.

What :func:`core.data.dataset.open_site` computes per item (the oriented, normalised,
channel-matched, resampled ``(C, D, H, W)`` float32 tensor and its ``(d, h, w)`` mm spacing) is
stored in a folder the caller passes: in the ClientApp, the site's own state folder
(``SiteRef.state_dir``), which never leaves the site. Labels are not cached: they come from the
datalist on every open, so relabelling an item never serves a stale label.

Layout (everything is written inside ``folder`` and nowhere else, each file through
:func:`core.io.atomic_path`)::

    folder/entries/<key>.safetensors  tensor "image"; metadata "version", "spacing", "crc32"
    folder/sources/<stat>.json  {"content": <sha256 of the source's bytes>}

Keys. An entry's key is the SHA-256 of the source's *content* hash, the preprocessing settings
(``GridConfig`` and ``IntensityConfig`` field by field, the format version) and the item's own
settings (modality, datalist spacing). Hashing a source is cheap next to decoding and
resampling it (``benchmarks/README.md``), but it still costs a read of every byte, so it is not
done on every open: a ``sources/`` record maps the file's stat signature (resolved path, size,
``st_mtime_ns``, ``st_ctime_ns``, inode, device) to its content hash. When the signature is
unchanged the recorded hash is trusted without reading the file; ``st_ctime_ns`` is set by the
kernel on every write and cannot be set back by ``touch -d`` or ``rsync -t``, so an in-place
rewrite that restores size and mtime still changes the signature. When the signature changes
(a rewrite, a copy, a restore from backup, a ``touch``) the content is hashed again: new bytes
miss and are rebuilt, identical bytes hit the old entry. A changed setting changes every key.

Integrity. Each entry stores a CRC-32 of its tensor's bytes; an entry that fails to
load, has the wrong version or digest is logged, deleted and rebuilt from the source.

Speed. A round that finds every item cached reads one ``sources/`` record per item and one
safetensors file (no pickle: about 0.4 ms less than ``torch.load`` per 3.4 MB CT entry,
whose CRC pass costs about 1 ms), so data stays a small share of the round
(``benchmarks/data_cache.py``).

Size. ``max_bytes`` bounds ``entries/``: before a write the least recently used entries (by
mtime, refreshed on every hit) are evicted to make room. When the disk holding the folder has
less free space than the entry plus :data:`DISK_RESERVE_BYTES`, or a write fails for want of
space, :class:`CacheError` names the folder, the space needed and the fix.

Why not MONAI's ``PersistentDataset`` / ``LMDBDataset``: they key an entry by a hash of the
item *dict* (the file name), so a file rewritten under the same name is served stale, and
nothing invalidates on content; they have no size bound or disk-space check; ``LMDBDataset``
needs the ``lmdb`` package and one shared database file that concurrent worker processes must
lock; and importing ``monai`` costs seconds in every client process, which
``core.data.preprocess`` avoids on purpose. What they do that is worth keeping (storing
the transformed tensors, write to a temporary file then rename) is done here too, with
safetensors instead of ``torch.save``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from core.io import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the preprocessing code changes what an entry holds
DEFAULT_MAX_BYTES = 50 * 2**30  # 50 GiB: 1,000 CT volumes at a 256 x 256 x 200 grid
DISK_RESERVE_BYTES = 256 * 2**20  # left free on the disk beyond the entry being written
_CHUNK = 2**20
ENTRY_SUFFIX = ".safetensors"
_FORMAT_1_NAME = re.compile(r"[0-9a-f]{64}\.pt")


class CacheError(OSError):
    """The cache folder cannot hold an entry (disk short, size bound too small, unwritable).

    Not a :class:`~core.data.errors.DatasetError`: the site's data is fine, so opening with
    ``on_error="skip"`` must not skip items for it.
    """


Spacing = tuple[float, float, float]


def source_files(source: Path) -> list[Path]:
    """The files whose bytes make an item: the file itself, or every file of a DICOM folder
    (sorted, so the hash does not depend on directory order)."""
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.is_file())
    return [source]


def stat_signature(source: Path) -> str:
    """SHA-256 over (resolved path, size, mtime_ns, ctime_ns, inode, device) of every file.

    Raises:
        FileNotFoundError: the source (or a file of it) is gone.
    """
    digest = hashlib.sha256()
    for path in source_files(source):
        st = path.stat()
        line = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
        digest.update(f"{line}|{st.st_dev}\n".encode())
    return digest.hexdigest()


def content_digest(source: Path) -> str:
    """SHA-256 over the bytes of every file of the source (with names relative to it)."""
    digest = hashlib.sha256()
    for path in source_files(source):
        relative = path.relative_to(source) if source.is_dir() else Path(path.name)
        digest.update(f"{relative.as_posix()}\0".encode())
        with path.open("rb") as handle:
            while block := handle.read(_CHUNK):
                digest.update(block)
    return digest.hexdigest()


def _tensor_digest(image: Tensor) -> str:
    """CRC-32 of the tensor's bytes (read in place, about 1 GB/s): catches disk and copy
    damage; the folder is the site's own, so tampering is not what it guards against."""
    return f"{zlib.crc32(image.contiguous().numpy().data):08x}"


def _canonical(value: Any) -> Any:
    """JSON-able, order-stable form of settings (dataclasses, tuples, paths)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {"type": type(value).__name__, **{k: _canonical(v) for k, v in fields.items()}}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class PreprocessCache:
    """Preprocessed items of one site in ``folder`` (see the module docstring).

    ``settings``: everything site-wide the preprocessing depends on (e.g. ``{"grid": GridConfig,
    "intensity": IntensityConfig}``); each call adds the item's own settings as ``variant``.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        settings: Mapping[str, Any],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.settings = settings
        blob = json.dumps({"version": FORMAT_VERSION, **_canonical(settings)}, sort_keys=True)
        self._settings_key = hashlib.sha256(blob.encode()).hexdigest()
        self._entries = self.folder / "entries"
        self._sources = self.folder / "sources"
        try:
            self._entries.mkdir(parents=True, exist_ok=True)
            self._sources.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CacheError(
                f"{self.folder}: cannot create the preprocessing cache folder ({err}). Fix: "
                "make the site's state folder writable, or open the site without a cache dir"
            ) from err

    def drop_format_1_entries(self) -> None:
        """Delete the ``torch.save`` entries of format 1 (``<64 hex digits>.pt`` in
        ``entries/``, nothing else): no key of this format reaches them, and the size bound,
        which counts only current entries, would keep them forever. They are derived data;
        the sources are untouched. Called once per open of a site, not per item."""
        old = [p for p in self._entries.glob("*.pt") if _FORMAT_1_NAME.fullmatch(p.name)]
        for path in old:
            path.unlink(missing_ok=True)
        if old:
            logger.info("%s: removed %d entries of an older cache format", self.folder, len(old))

    # ------------------------------------------------------------------------------ lookups

    def entry_path(self, source: Path, variant: Mapping[str, Any]) -> Path:
        """Where the entry of this source and variant lives (it may not exist).

        Hashes the source's bytes only when its stat signature has no record yet.
        """
        return self._entry_for(self._content(source), variant)

    def find(self, source: Path, variant: Mapping[str, Any]) -> Path | None:
        """The entry of the source as it is now, judged without reading its bytes: None when
        its stat signature has no record yet (a new or changed file) or the entry is gone."""
        content = self._recorded_content(self._record(source))
        if content is None:
            return None
        entry = self._entry_for(content, variant)
        return entry if entry.exists() else None

    def load(self, source: Path, variant: Mapping[str, Any]) -> tuple[Tensor, Spacing] | None:
        """The cached ``(image (C, D, H, W) float32, spacing (d, h, w) mm)``, or None on a miss.

        A corrupt entry is logged, deleted and reported as a miss.
        """
        return self.read(self.entry_path(source, variant))

    def read(self, path: Path) -> tuple[Tensor, Spacing] | None:
        """:meth:`load` of an entry already found (:meth:`find`); None if it is gone or corrupt
        (then logged and deleted)."""
        if not path.exists():
            return None
        try:
            with safe_open(path, framework="pt") as handle:
                meta = handle.metadata() or {}
                # A copy in memory: the tensor safetensors returns maps the file, which an
                # eviction or a rewrite must be free to delete or replace under a live site.
                image = handle.get_tensor("image").clone()
            spacing = tuple(float(s) for s in json.loads(meta["spacing"]))
            valid = (
                meta["version"] == str(FORMAT_VERSION)
                and image.dtype == torch.float32
                and image.ndim == 4
                and len(spacing) == 3
                and meta["crc32"] == _tensor_digest(image)
            )
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
            valid, reason = False, f"{type(err).__name__}: {err}"
        else:
            reason = "wrong version, shape or checksum"
        if not valid:
            logger.warning("%s: corrupt cache entry (%s); rebuilding it", path, reason)
            path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(FileNotFoundError):  # another process evicted it meanwhile
            os.utime(path)  # least recently used goes first when the size bound is hit
        return image, (spacing[0], spacing[1], spacing[2])

    # ------------------------------------------------------------------------------- writes

    def store(
        self, source: Path, variant: Mapping[str, Any], image: Tensor, spacing: Spacing
    ) -> Path:
        """Write one entry (atomically), evicting old entries beyond ``max_bytes``.

        Raises:
            CacheError: the entry alone exceeds ``max_bytes``, or the disk is short.
        """
        path = self.entry_path(source, variant)
        image = image.detach().to("cpu", torch.float32).contiguous()
        metadata = {
            "version": str(FORMAT_VERSION),
            "spacing": json.dumps([float(s) for s in spacing]),
            "crc32": _tensor_digest(image),
        }
        needed = image.numel() * image.element_size() + 4096
        self._make_room(needed, path)
        try:
            with atomic_path(path) as tmp:
                save_file({"image": image}, tmp, metadata=metadata)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._short(needed) from err
            raise
        return path

    def _make_room(self, needed: int, keep: Path) -> None:
        if needed > self.max_bytes:
            raise CacheError(
                f"{self.folder}: one preprocessed item needs {needed / 2**20:.1f} MiB but the "
                f"cache is bounded at {self.max_bytes / 2**20:.1f} MiB. Fix: raise max_bytes, "
                "or use a smaller GridConfig"
            )
        entries = []
        for found in os.scandir(self._entries):
            if found.name.endswith(ENTRY_SUFFIX) and found.path != str(keep):
                try:
                    st = found.stat()
                except FileNotFoundError:  # evicted by another process sharing the folder
                    continue
                entries.append((st.st_mtime_ns, st.st_size, Path(found.path)))
        total = sum(size for _, size, _ in entries)
        for _, size, old in sorted(entries):
            if total + needed <= self.max_bytes:
                break
            old.unlink(missing_ok=True)
            total -= size
        if shutil.disk_usage(self.folder).free < needed + DISK_RESERVE_BYTES:
            raise self._short(needed)

    def _short(self, needed: int) -> CacheError:
        free = shutil.disk_usage(self.folder).free
        return CacheError(
            f"{self.folder}: the disk is short: {free / 2**20:.0f} MiB free, a cache entry needs "
            f"{needed / 2**20:.1f} MiB plus {DISK_RESERVE_BYTES / 2**20:.0f} MiB kept free. Fix: "
            "free space on that disk, move the site's state folder to a larger one, or open the "
            "site without a cache dir"
        )

    # ----------------------------------------------------------------------------- internals

    def _record(self, source: Path) -> Path:
        return self._sources / f"{stat_signature(source)}.json"

    @staticmethod
    def _recorded_content(record: Path) -> str | None:
        """The content hash a ``sources/`` record holds; None if missing or damaged."""
        try:
            content = json.loads(record.read_text())["content"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return content if isinstance(content, str) and len(content) == 64 else None

    def _content(self, source: Path) -> str:
        record = self._record(source)
        content = self._recorded_content(record)
        if content is not None:
            return content
        content = content_digest(source)  # no record yet, or a damaged one: hash the bytes
        try:
            write_json_atomic(record, {"content": content, "source": str(source)})
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._short(4096) from err
            raise
        return content

    def _entry_for(self, content: str, variant: Mapping[str, Any]) -> Path:
        blob = json.dumps([content, self._settings_key, _canonical(variant)], sort_keys=True)
        return self._entries / f"{hashlib.sha256(blob.encode()).hexdigest()}{ENTRY_SUFFIX}"


def entries_size(folder: str | os.PathLike[str]) -> int:
    """Bytes held by the entries of a cache folder (0 when it has none)."""
    entries = Path(folder) / "entries"
    if not entries.is_dir():
        return 0
    return sum(p.stat().st_size for p in entries.glob(f"*{ENTRY_SUFFIX}"))
