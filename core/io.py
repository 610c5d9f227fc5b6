"""Atomic file writing: the one place that writes a file so a crash leaves the old or the new one.

Every file the project writes that another process (or a resumed run) reads goes through here:
JSON ledgers and reports, key files with an exact mode, checkpoints written by third-party
savers (``torch.save``, ``safetensors``, matplotlib) through :func:`atomic_path`.
The data is flushed and fsync'ed before the rename (POSIX ``rename`` is atomic within a folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    ``mode``: exact permission bits for the new file (the umask can neither widen nor narrow
    them); None keeps the default of ``mkstemp`` (0600) widened to 0644.
    Raises whatever the writer raises; the temporary file is removed then.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644 if mode is None else mode)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes_atomic(
    path: str | os.PathLike[str], data: bytes, *, mode: int | None = None
) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path` for ``mode``)."""
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str, *, mode: int | None = None) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"), mode=mode)


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, mode: int | None = None) -> Path:
    """Write ``data`` as indented JSON atomically. Raises ValueError on NaN or infinity (JSON
    has no spelling for them) before anything is written."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    return write_text_atomic(path, text, mode=mode)
