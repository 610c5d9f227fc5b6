"""Certificates and SuperNode keys for a real deployment, made with ``cryptography``.

    python -m deploy.pki ca --out certs
    python -m deploy.pki server --ca certs --out certs --host superlink --host fl.example.org
    python -m deploy.pki node-key --out keys/hospital-1

The coordinator owns the CA and the SuperLink's server certificate; every party gets only
``ca.pem``. Each hospital makes its own node key pair and sends only the ``.pub`` file to the
coordinator, who registers it (``flwr supernode register``): the private key never leaves the
hospital. Flower 1.41 and 1.42 read node keys in OpenSSH format on a NIST curve (P-384 here).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
# The SuperLink always needs these: its own SuperExec and the flwr CLI on the coordinator
# reach it on loopback.
LOOPBACK_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class ServerFiles:
    ca: Path
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only, whatever the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(
    out_dir: Path, *, common_name: str = "fedmedvit deployment CA", days: int = 825
) -> Path:
    """A self-signed CA (``ca.pem``, ``ca.key``); returns the certificate path."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_private(out_dir / CA_KEY, _pem_key(key))
    (out_dir / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out_dir / CA_CERT


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*LOOPBACK_NAMES, *hosts]):  # keep order, drop repeats
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_server_cert(
    ca_dir: Path, out_dir: Path, hosts: Sequence[str], *, days: int = 397
) -> ServerFiles:
    """The SuperLink's certificate, signed by the CA in ``ca_dir``, valid for ``hosts`` plus
    localhost and 127.0.0.1 (names the SuperNodes and SuperExecs dial must be listed)."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_dir / CA_KEY} is not an EC key made by `python -m deploy.pki ca`")
    key = ec.generate_private_key(ec.SECP384R1())
    common_name = next((h for h in hosts if h not in LOOPBACK_NAMES), "localhost")
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_private(out_dir / SERVER_KEY, _pem_key(key))
    (out_dir / SERVER_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_copy = out_dir / CA_CERT
    if ca_copy.resolve() != (ca_dir / CA_CERT).resolve():
        ca_copy.write_bytes((ca_dir / CA_CERT).read_bytes())
    return ServerFiles(ca=ca_copy, cert=out_dir / SERVER_CERT, key=out_dir / SERVER_KEY)


def make_node_key(private_path: Path) -> Path:
    """A SuperNode key pair: ``private_path`` (OpenSSH, 0600) and ``private_path.pub``, which
    is what ``flwr supernode register`` reads. Returns the public key path."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public_path = private_path.with_name(private_path.name + ".pub")
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public_path.write_bytes(public + b"\n")
    return public_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.pki", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    ca = commands.add_parser("ca", help="make the deployment CA (ca.pem, ca.key)")
    ca.add_argument("--out", type=Path, required=True)
    server = commands.add_parser("server", help="make the SuperLink certificate")
    server.add_argument("--ca", type=Path, required=True, help="folder holding ca.pem, ca.key")
    server.add_argument("--out", type=Path, required=True)
    server.add_argument(
        "--host",
        action="append",
        default=[],
        help="DNS name or IP the SuperLink is reached at (repeat); localhost is always added",
    )
    node = commands.add_parser("node-key", help="make a SuperNode key pair (KEY and KEY.pub)")
    node.add_argument("--out", type=Path, required=True, help="path of the private key")
    args = parser.parse_args(argv)
    if args.command == "ca":
        print(f"CA certificate: {make_ca(args.out)} (keep {args.out / CA_KEY} offline)")
    elif args.command == "server":
        files = make_server_cert(args.ca, args.out, args.host)
        print(f"SuperLink certificate: {files.cert}\nkey: {files.key}\nCA: {files.ca}")
    else:
        public = make_node_key(args.out)
        print(f"private key: {args.out} (stays at the hospital)\npublic key: {public} (send it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
