"""Signed releases of the Flower app, and the private app registry that serves them.

    python -m deploy.release keygen --out release-keys/consortium
    python -m deploy.release sign APP_DIR --key release-keys/consortium --releases releases
    python -m deploy.release serve --releases releases --host 127.0.0.1 --port 9180

SuperNodes started with ``--trusted-entities trusted-entities.yaml`` run an app only if its
bundle (FAB) carries an Ed25519 signature by one of the keys listed there; an unsigned app gets
an error reply and never starts. In flwr 1.41 (and 1.42) the SuperLink attaches signatures to a
FAB only when it fetches the app from an app registry (Flower Hub's ``/hub/fetch-fab``); an app
uploaded by ``flwr run DIR`` never has any. So the consortium signs each release here and the
coordinator serves the signed FABs from its own registry, on its internal network, to a
SuperLink started with ``FLWR_SUPERGRID_API_URL`` pointing at it; ``flwr run
@fedmedvit/fedmedvit==0.1.0`` then starts the signed release. Signing and verification are
Flower's own: the signed message is ``signed_at`` (8 bytes, big-endian) followed by the
SHA-256 digest of the FAB, exactly what ``flower-supernode`` checks.

The registry needs nothing but the standard library (it runs in any image with Python); its
releases folder is ``RELEASES/<publisher>/<name>/<version>.fab`` plus ``<version>.json``
(the FAB's SHA-256 and its signatures, one per signer).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

FETCH_ROUTE = "/hub/fetch-fab"  # what the SuperLink POSTs to (flwr.supercore.utils)
FAB_ROUTE = "/fab/"
KEY_ID_PREFIX = "fpk_"  # Flower's own prefix for public key ids in trusted-entities files
VERSION = re.compile(r"^\d+\.\d+\.\d+$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ReleaseError(RuntimeError):
    """A release key, app folder or releases folder is missing or inconsistent."""


@dataclass(frozen=True)
class Release:
    """One signed release: ``spec`` is what ``flwr run`` takes (``@publisher/name==x.y.z``)."""

    spec: str
    fab: Path
    sha256: str
    signers: tuple[str, ...]


def key_id(public_openssh: str) -> str:
    """A stable id for a public key: ``fpk_`` + the first 32 hex digits of the SHA-256 of
    its OpenSSH line's key blob (the same key always gets the same id)."""
    blob = public_openssh.split()[1]
    return KEY_ID_PREFIX + hashlib.sha256(blob.encode("ascii")).hexdigest()[:32]


def keygen(out: Path) -> tuple[Path, Path]:
    """A signing key pair: ``out`` (OpenSSH Ed25519 private key, mode 600) and ``out.pub``;
    also prints the trusted-entities line hospitals add. Returns (private, public) paths.

    Raises:
        ReleaseError: ``out`` exists (a release key is never overwritten).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    if out.exists():
        raise ReleaseError(f"{out} exists; refusing to overwrite a release key")
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, private)
    finally:
        os.close(fd)
    pub = out.with_name(out.name + ".pub")
    pub.write_bytes(public + b"\n")
    return out, pub


def trusted_entities(public_keys: list[Path], out: Path) -> Path:
    """The ``--trusted-entities`` YAML for SuperNodes: key id -> OpenSSH public key line.
    Written as JSON, which is YAML, so no YAML writer is needed."""
    entries = {}
    for path in public_keys:
        line = path.read_text().strip()
        if not line.startswith("ssh-ed25519 "):
            raise ReleaseError(f"{path}: not an Ed25519 OpenSSH public key (ssh-ed25519 ...)")
        entries[key_id(line)] = line
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(entries, indent=2) + "\n")
    return out


def _app_identity(app_dir: Path) -> tuple[str, str, str]:
    import tomllib

    pyproject = app_dir / "pyproject.toml"
    try:
        with pyproject.open("rb") as handle:
            config = tomllib.load(handle)
        publisher = config["tool"]["flwr"]["app"]["publisher"]
        name, version = config["project"]["name"], config["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as err:
        raise ReleaseError(
            f"{pyproject}: need [project] name/version and [tool.flwr.app] publisher ({err})"
        ) from err
    if not (NAME.match(publisher) and NAME.match(name) and VERSION.match(version)):
        raise ReleaseError(f"{pyproject}: publisher/name/version {publisher}/{name}/{version}")
    return publisher, name, version


def sign(app_dir: Path, key: Path, releases: Path) -> Release:
    """Build the app's FAB exactly as ``flwr run`` builds it, sign its digest with ``key``
    (OpenSSH Ed25519) and add it to ``releases``. A second signer (another consortium
    member) runs the same command on the same app: the FAB is byte-identical (Flower builds
    it with fixed timestamps) and the signature is appended.

    Raises:
        ReleaseError: the key is unreadable or not Ed25519, the app's pyproject.toml lacks
            its identity, or this version was already released with different content.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from flwr.cli.build import build_fab_from_disk
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

    try:
        private = serialization.load_ssh_private_key(key.read_bytes(), None)
    except (OSError, ValueError) as err:
        raise ReleaseError(
            f"{key}: cannot read an unencrypted OpenSSH private key ({err}); make one with "
            "`python -m deploy.release keygen --out KEY`"
        ) from err
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise ReleaseError(f"{key}: the release key must be Ed25519 (deploy.release keygen)")
    public = (
        private.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    publisher, name, version = _app_identity(app_dir)
    fab = build_fab_from_disk(app_dir.resolve())
    digest = hashlib.sha256(fab).digest()
    signed_at = int(time.time())
    signature = private.sign(create_message_to_sign(digest, signed_at))
    folder = releases / publisher / name
    folder.mkdir(parents=True, exist_ok=True)
    fab_path, meta_path = folder / f"{version}.fab", folder / f"{version}.json"
    meta: dict[str, Any] = {"sha256": digest.hex(), "verifications": []}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["sha256"] != digest.hex():
            raise ReleaseError(
                f"{meta_path}: {publisher}/{name}=={version} was released with other content "
                f"(sha256 {meta['sha256'][:12]}, now {digest.hex()[:12]}); bump the version"
            )
    signer = key_id(public)
    meta["verifications"] = [v for v in meta["verifications"] if v["public_key_id"] != signer]
    meta["verifications"].append(
        {
            "public_key_id": signer,
            "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii"),
            "signed_at": signed_at,
        }
    )
    fab_path.write_bytes(fab)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return Release(
        spec=f"@{publisher}/{name}=={version}",
        fab=fab_path,
        sha256=digest.hex(),
        signers=tuple(v["public_key_id"] for v in meta["verifications"]),
    )


def _lookup(releases: Path, app_id: str, version: str | None) -> tuple[Path, dict[str, Any]]:
    """The FAB and metadata of ``@publisher/name`` at ``version``; KeyError if unknown."""
    match = re.fullmatch(r"@([^/]+)/([^/]+)", app_id)
    if not match or version is None or not VERSION.match(version):
        raise KeyError(app_id)
    publisher, name = match.groups()
    if not (NAME.match(publisher) and NAME.match(name)):
        raise KeyError(app_id)
    folder = releases / publisher / name
    fab, meta = folder / f"{version}.fab", folder / f"{version}.json"
    if not (fab.is_file() and meta.is_file()):
        raise KeyError(app_id)
    return fab, json.loads(meta.read_text())


def make_handler(releases: Path) -> type[BaseHTTPRequestHandler]:
    """Request handler for the registry: ``POST /hub/fetch-fab`` answers with the FAB's URL
    and its signatures, ``GET /fab/<publisher>/<name>/<version>`` with the FAB, ``GET
    /health`` with ok. Versions must be given (no "latest"); anything else is a 404."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, value: dict[str, Any]) -> None:
            self._reply(status, json.dumps(value).encode(), "application/json")

        def do_POST(self) -> None:
            if self.path != FETCH_ROUTE:
                self._json(HTTPStatus.NOT_FOUND, {"detail": "not found"})
                return
            try:
                length = min(int(self.headers.get("Content-Length", "0")), 1 << 16)
                request = json.loads(self.rfile.read(length))
                app_id, version = str(request["app_id"]), request.get("app_version")
                fab, meta = _lookup(releases, app_id, version)
            except (KeyError, TypeError, ValueError):
                self._json(HTTPStatus.NOT_FOUND, {"detail": "no such signed release"})
                return
            host = self.headers.get("Host", "localhost")
            publisher, name = app_id[1:].split("/")
            self._json(
                HTTPStatus.OK,
                {
                    "fab_url": f"http://{host}{FAB_ROUTE}{publisher}/{name}/{fab.stem}",
                    "verifications": meta["verifications"],
                },
            )

        def do_GET(self) -> None:
            if self.path == "/health":
                self._reply(HTTPStatus.OK, b"ok", "text/plain")
                return
            parts = self.path.removeprefix(FAB_ROUTE).split("/")
            try:
                if not self.path.startswith(FAB_ROUTE) or len(parts) != 3:
                    raise KeyError(self.path)
                fab, meta = _lookup(releases, f"@{parts[0]}/{parts[1]}", parts[2])
            except KeyError:
                self._json(HTTPStatus.NOT_FOUND, {"detail": "not found"})
                return
            content = fab.read_bytes()
            if hashlib.sha256(content).hexdigest() != meta["sha256"]:
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"detail": f"{fab} was altered"})
                return
            self._reply(HTTPStatus.OK, content, "application/octet-stream")

    return Handler


def serve(releases: Path, host: str, port: int) -> None:
    """Serve ``releases`` until interrupted. Bind it to the coordinator's internal network
    only: the SuperLink is its one client."""
    server = ThreadingHTTPServer((host, port), make_handler(releases.resolve()))
    print(f"app registry on http://{host}:{port} serving {releases}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("keygen", help="a release signing key pair (Ed25519)")
    gen.add_argument("--out", type=Path, required=True)
    trust = commands.add_parser("trust", help="write a --trusted-entities YAML")
    trust.add_argument("public_keys", type=Path, nargs="+")
    trust.add_argument("--out", type=Path, required=True)
    sig = commands.add_parser("sign", help="build and sign the app; add it to the releases")
    sig.add_argument("app", type=Path)
    sig.add_argument("--key", type=Path, required=True)
    sig.add_argument("--releases", type=Path, required=True)
    srv = commands.add_parser("serve", help="serve the releases to the SuperLink")
    srv.add_argument("--releases", type=Path, required=True)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=9180)
    args = parser.parse_args(argv)
    try:
        if args.command == "keygen":
            private, public = keygen(args.out)
            line = public.read_text().strip()
            print(f"{private} (keep offline), {public}\ntrusted entity: {key_id(line)}: {line}")
        elif args.command == "trust":
            print(trusted_entities(args.public_keys, args.out))
        elif args.command == "sign":
            release = sign(args.app, args.key, args.releases)
            print(f"{release.spec} sha256 {release.sha256} signed by {', '.join(release.signers)}")
        else:
            serve(args.releases, args.host, args.port)
    except ReleaseError as err:
        parser.exit(1, f"error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
