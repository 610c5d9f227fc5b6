"""SEAL access: the lazy import of TenSEAL's SEAL bindings and in-memory (de)serialisation.

TenSEAL's high-level ``CKKSVector`` cannot emit seeded ciphertexts and insists on a second
prime for relinearisation keys, so ``core.he`` drives SEAL through ``tenseal.sealapi``. Its
objects serialise only to file paths, which an in-memory file (``memfd``) serves. Importing
this module does not import TenSEAL; :func:`sealapi` does, on first use.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from core.he.errors import CkksError, TensealUnavailableError

# SEAL serialisation header: magic, header size, version, compression, reserved, total size.
_SEAL_HEADER = struct.Struct("<HBBBBHQ")
_SEAL_MAGIC = 0xA15E


def sealapi() -> ModuleType:
    """Import SEAL's bindings on first use, so ``core`` imports without TenSEAL installed.

    Raises:
        TensealUnavailableError: TenSEAL is not installed.
    """
    try:
        import tenseal.sealapi as sealapi
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise TensealUnavailableError(
            "homomorphic encryption needs TenSEAL: pip install tenseal==0.3.18 "
            f"(import failed: {exc})"
        ) from exc
    return sealapi


def _memfd_usable() -> bool:
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


def _read_fd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _write_fd(fd: int, data: bytes) -> None:
    view, offset = memoryview(data), 0
    while offset < len(view):
        offset += os.pwrite(fd, view[offset:], offset)


def seal_save(obj: Any) -> bytes:
    """SEAL's Python bindings save only to a path: give them an in-memory file.

    Raises:
        CkksError: SEAL wrote nothing.
    """
    if _memfd_usable():
        fd = os.memfd_create("fedmedvit-seal")
        try:
            obj.save(f"/proc/self/fd/{fd}")
            data = _read_fd(fd)
        finally:
            os.close(fd)
    else:  # pragma: no cover - non-Linux fallback
        with tempfile.TemporaryDirectory(prefix="fedmedvit-seal-") as tmp:
            path = os.path.join(tmp, "object")
            obj.save(path)
            data = Path(path).read_bytes()
    if not data:
        raise CkksError("SEAL wrote nothing when serialising an object (scratch file not writable)")
    return data


def seal_load(obj: Any, seal_context: Any, data: bytes) -> None:
    """Load a SEAL object from bytes through an in-memory file; SEAL validates it on load."""
    if _memfd_usable():
        fd = os.memfd_create("fedmedvit-seal")
        try:
            _write_fd(fd, data)
            obj.load(seal_context, f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    else:  # pragma: no cover - non-Linux fallback
        with tempfile.TemporaryDirectory(prefix="fedmedvit-seal-") as tmp:
            path = os.path.join(tmp, "object")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_fd(fd, data)
            finally:
                os.close(fd)
            obj.load(seal_context, path)


# Exceptions pybind11 raises for SEAL's C++ exceptions.
SEAL_ERRORS = (RuntimeError, ValueError, IndexError, OverflowError, MemoryError)


def check_seal_header(payload: bytes) -> str | None:
    """Why ``payload`` is not one SEAL object of exactly its length, or None if it is."""
    if len(payload) < _SEAL_HEADER.size:
        return f"SEAL payload of {len(payload)} bytes is shorter than SEAL's header"
    magic, header_size, _major, _minor, compr_mode, _reserved, size = _SEAL_HEADER.unpack_from(
        payload
    )
    if magic != _SEAL_MAGIC or header_size != _SEAL_HEADER.size or compr_mode > 2:
        return "payload is not a SEAL object (bad SEAL header)"
    if size != len(payload):
        return f"SEAL header announces {size} bytes but the payload has {len(payload)}"
    return None
