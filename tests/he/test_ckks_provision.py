"""Provisioning: file modes, fingerprints, and contexts that refuse the wrong role."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.he import ckks

REPO = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("ckks")
    old_umask = os.umask(0o077)  # a strict umask must not make the public file private
    try:
        return ckks.provision(out, ckks.CkksParams())
    finally:
        os.umask(old_umask)


def test_provision_writes_files_with_the_right_permissions(provisioned) -> None:
    secret_path, public_path = provisioned
    assert secret_path.name == "site_secret.ctx" and public_path.name == "server_public.ctx"
    assert mode(secret_path) == 0o600
    assert mode(public_path) == 0o644
    info_path = secret_path.parent / ckks.CONTEXT_INFO_FILE
    assert mode(info_path) == 0o644
    assert sorted(p.name for p in secret_path.parent.iterdir()) == sorted(
        ["site_secret.ctx", "server_public.ctx", ckks.CONTEXT_INFO_FILE]
    )


def test_summary_json_names_params_and_public_fingerprint(provisioned) -> None:
    secret_path, public_path = provisioned
    info = json.loads((secret_path.parent / ckks.CONTEXT_INFO_FILE).read_text())
    assert info["params"] == ckks.CkksParams().to_dict()
    assert info["public_context_sha256"] == hashlib.sha256(public_path.read_bytes()).hexdigest()
    site = ckks.load_secret_context(secret_path)
    server = ckks.load_public_context(public_path)
    assert site.fingerprint == server.fingerprint == info["public_context_sha256"]


def test_loaded_contexts_aggregate_end_to_end(provisioned) -> None:
    secret_path, public_path = provisioned
    site = ckks.load_secret_context(secret_path)
    server = ckks.load_public_context(public_path)
    assert site.has_secret_key() and not server.has_secret_key()
    state = {"w": torch.linspace(-1, 1, 10, dtype=torch.float64)}
    updates = [ckks.encrypt_update(state, n, site) for n in (3, 9)]
    agg = ckks.aggregate_encrypted(updates, server)
    got = ckks.decrypt_average(agg.ciphertexts, agg.total_examples, agg.layout, site)
    assert torch.allclose(got["w"], state["w"], atol=1e-9)


def test_public_context_loader_refuses_the_secret_file(provisioned) -> None:
    secret_path, _ = provisioned
    with pytest.raises(ckks.ContextFileError, match="server must never have it"):
        ckks.load_public_context(secret_path)


def test_secret_context_loader_refuses_the_public_file(provisioned, tmp_path) -> None:
    _, public_path = provisioned
    copy = tmp_path / "public.ctx"
    copy.write_bytes(public_path.read_bytes())
    copy.chmod(0o600)
    with pytest.raises(ckks.ContextFileError, match="no secret key"):
        ckks.load_secret_context(copy)


def test_secret_context_with_open_permissions_is_refused_or_warned(provisioned, tmp_path) -> None:
    secret_path, _ = provisioned
    copy = tmp_path / "site_secret.ctx"
    copy.write_bytes(secret_path.read_bytes())
    copy.chmod(0o644)
    with pytest.raises(ckks.KeyFilePermissionError, match="chmod 600"):
        ckks.load_secret_context(copy)
    with pytest.warns(ckks.InsecureKeyFileWarning):
        ctx = ckks.load_secret_context(copy, allow_open_permissions=True)
    assert ctx.has_secret_key()


def test_secret_context_owned_by_another_uid_is_refused(provisioned, tmp_path) -> None:
    """The deployment runs ClientApps as uid 49999: a secret context that belongs to another
    account (which could replace it) is refused even with mode 600."""
    secret_path, _ = provisioned
    copy = tmp_path / "site_secret.ctx"
    copy.write_bytes(secret_path.read_bytes())
    copy.chmod(0o600)
    assert ckks.load_secret_context(copy).has_secret_key()  # own file: loads
    if os.getuid() != 0:
        pytest.skip("giving a file to another uid needs root (as on these machines and CI)")
    other = os.getuid() + 1
    os.chown(copy, other, -1)
    with pytest.raises(ckks.KeyFilePermissionError, match=f"belongs to uid {other}.*chown"):
        ckks.load_secret_context(copy)
    with pytest.warns(ckks.InsecureKeyFileWarning, match="belongs to uid"):
        ckks.load_secret_context(copy, allow_open_permissions=True)


def test_corrupt_secret_context_is_refused(provisioned, tmp_path) -> None:
    secret_path, _ = provisioned
    data = bytearray(secret_path.read_bytes())
    data[len(data) // 2] ^= 1
    copy = tmp_path / "corrupt.ctx"
    copy.write_bytes(bytes(data))
    copy.chmod(0o600)
    with pytest.raises(ckks.ContextFileError, match="digest mismatch"):
        ckks.load_secret_context(copy)
    other = tmp_path / "other.ctx"
    other.write_bytes(b"not a context")
    with pytest.raises(ckks.ContextFileError, match="bad magic"):
        ckks.load_public_context(other)


def test_provision_refuses_to_overwrite_unless_asked(provisioned) -> None:
    secret_path, _ = provisioned
    before = secret_path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        ckks.provision(secret_path.parent)
    assert secret_path.read_bytes() == before


def test_reprovisioning_gives_a_new_fingerprint_for_the_same_params(tmp_path) -> None:
    ckks.provision(tmp_path)
    first = ckks.load_public_context(tmp_path / ckks.PUBLIC_CONTEXT_FILE).fingerprint
    ckks.provision(tmp_path, overwrite=True)
    second = ckks.load_public_context(tmp_path / ckks.PUBLIC_CONTEXT_FILE).fingerprint
    assert first != second


def test_cli_provision_and_show(tmp_path) -> None:
    out = tmp_path / "ctx"
    assert ckks.main(["provision", "--out", str(out), "--max-sites", "20"]) == 0
    assert mode(out / "site_secret.ctx") == 0o600
    assert ckks.load_public_context(out / "server_public.ctx").params.max_sites == 20
    assert ckks.main(["provision", "--out", str(out)]) == 1  # exists, no --overwrite
    assert ckks.main(["show", str(out / "server_public.ctx")]) == 0


def test_cli_runs_as_a_module(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "core.he.ckks", "provision", "--out", str(tmp_path / "c")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "c" / "server_public.ctx").exists()
