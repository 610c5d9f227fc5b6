"""Context files: provisioning writes them, sites and server load them, each refusing the
other's file.

``provision`` writes ``site_secret.ctx`` (mode 0600, handed to every site out of band),
``server_public.ctx`` (no key at all) and a JSON summary. The sites' file is refused when other
users could read or replace it (like ssh does with keys); the server's loader refuses the
secret file, so a misconfigured server cannot end up able to decrypt.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from core.he.context import (
    CONTEXT_FORMAT,
    PUBLIC_MAGIC,
    SECRET_MAGIC,
    CkksContext,
    context_from_bytes,
    new_secret_context,
)
from core.he.errors import ContextFileError, InsecureKeyFileWarning, KeyFilePermissionError
from core.he.params import CkksParams
from core.io import write_bytes_atomic

SECRET_CONTEXT_FILE = "site_secret.ctx"
PUBLIC_CONTEXT_FILE = "server_public.ctx"
CONTEXT_INFO_FILE = "ckks_context.json"


def provision(
    out_dir: str | os.PathLike[str], params: CkksParams | None = None, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``site_secret.ctx`` (0o600), ``server_public.ctx`` (0o644) and a JSON summary.

    Refuses to overwrite an existing context unless asked: sites holding the old key could no
    longer decrypt anything encrypted under the new one. The sites' upload MAC key is derived
    from the secret key (``core.he.provenance.mac_key``), so it travels inside the 0o600
    secret file and the server, given only the public file, never has it.

    Raises:
        FileExistsError: a context is already there and ``overwrite`` is False.
        CkksParamsError: SEAL rejects the parameters.
        TensealUnavailableError: TenSEAL is not installed.
    """
    params = params or CkksParams()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    secret_path = out / SECRET_CONTEXT_FILE
    public_path = out / PUBLIC_CONTEXT_FILE
    info_path = out / CONTEXT_INFO_FILE
    existing = [str(p) for p in (secret_path, public_path, info_path) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"a CKKS context already exists ({', '.join(existing)}); pass overwrite=True "
            "(--overwrite) to replace it, after which sites must all get the new secret file"
        )
    ctx = new_secret_context(params)
    write_bytes_atomic(secret_path, ctx.serialize_secret(), mode=0o600)
    write_bytes_atomic(public_path, ctx.serialize_public(), mode=0o644)
    info = {
        "format": CONTEXT_FORMAT,
        "params": params.to_dict(),
        "context_id": ctx.context_id,
        "public_context_sha256": ctx.fingerprint,
        "secret_file": SECRET_CONTEXT_FILE,
        "public_file": PUBLIC_CONTEXT_FILE,
        "max_abs_sum": ctx.max_abs_sum,
        "max_abs_per_site": ctx.max_abs_per_site,
    }
    write_bytes_atomic(info_path, (json.dumps(info, indent=2) + "\n").encode(), mode=0o644)
    return secret_path, public_path


def load_secret_context(
    path: str | os.PathLike[str], *, allow_open_permissions: bool = False
) -> CkksContext:
    """Load the sites' context, refusing a file other users can read or own (like ssh does):
    it must belong to the uid this process runs as and have no group/other permission bits.

    Raises:
        KeyFilePermissionError: wrong owner or open mode (a warning instead, when
            ``allow_open_permissions``).
        ContextFileError: the file is the public context, corrupt, or holds no secret key.
        OSError: the file cannot be read.
    """
    path = Path(path)
    if os.name == "posix":
        status = path.stat()
        mode, owner, uid = status.st_mode & 0o777, status.st_uid, os.getuid()
        problems = []
        if owner != uid:
            problems.append(
                f"belongs to uid {owner}, not to uid {uid} that this process runs as, so "
                f"another account controls it; run `chown {uid} {path}`"
            )
        if mode & 0o077:
            problems.append(
                f"has mode {oct(mode)}, so other users can read or replace it; "
                f"run `chmod 600 {path}`"
            )
        if problems:
            message = f"{path} holds the shared secret key but " + " and ".join(problems)
            if not allow_open_permissions:
                raise KeyFilePermissionError(message)
            warnings.warn(message, InsecureKeyFileWarning, stacklevel=2)
    ctx = _read_context(
        path,
        refuse=PUBLIC_MAGIC,
        why=f"is the server's public context (no secret key); sites need {SECRET_CONTEXT_FILE}",
    )
    if not ctx.has_secret_key():  # pragma: no cover - the format always carries one
        raise ContextFileError(f"{path} holds no secret key; sites need {SECRET_CONTEXT_FILE}")
    return ctx


def load_public_context(path: str | os.PathLike[str]) -> CkksContext:
    """Load the server's context, refusing one that holds the secret key.

    Raises:
        ContextFileError: the file is the sites' secret context, or not a valid context.
        OSError: the file cannot be read.
    """
    return _read_context(
        Path(path),
        refuse=SECRET_MAGIC,
        why="holds the sites' secret key; the server must never have it (it could decrypt "
        f"every site's update). Give the server {PUBLIC_CONTEXT_FILE} instead",
    )


def _read_context(path: Path, *, refuse: bytes, why: str) -> CkksContext:
    """The context in ``path``, unless it starts with ``refuse`` (the other role's file)."""
    data = path.read_bytes()
    if data.startswith(refuse):
        raise ContextFileError(f"{path} {why}")
    try:
        return context_from_bytes(data)
    except ContextFileError as exc:
        raise ContextFileError(f"{path}: {exc}") from exc
