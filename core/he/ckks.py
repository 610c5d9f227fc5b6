"""CKKS encryption of LoRA adapter updates, so the server averages what it cannot read.

Protocol
--------
Provisioning makes one secret context that every site holds (handed out of band) and a public
context for the server that holds no key at all. A site multiplies its update by its example
count in plaintext, flattens the tensors in sorted key order, packs them into as few
ciphertexts as possible and encrypts them; it sends the ciphertexts, its count and a layout.
The server only adds the ciphertexts of whichever sites replied; the sites decrypt the sum,
divide by the total count and unflatten it into a state dict. Weighting in plaintext means the
scheme never multiplies a ciphertext, so it needs no multiplicative depth, no rescaling and no
relinearisation or Galois keys.

Parameters (measured by ``benchmarks/he_packing.py``, 10 sites, 2-core CPU)
--------------------------------------------------------------------------
* **One 60-bit prime, N = 4096, scale 2^38, secret-key encryption with a seed.** With no
  multiplication a ciphertext never leaves the first level, so the whole modulus is data
  modulus and one prime suffices (no special prime: no key switching ever happens). 60 bits is
  SEAL's largest prime and N = 4096 the smallest ring that allows it at 128-bit security
  (SEAL's bound is 54 bits for N = 2048, 109 for 4096). N = 8192 gives the same bytes with
  more noise and bigger keys; N = 2048 with a 54-bit prime is 5% smaller but loses 6 bits of
  range (measured error 4.8e-10 instead of 1.1e-11).
* **Precision.** A sum of K site updates must satisfy ``|sum| * scale < q / 2`` or it wraps
  around. Weights up to ~1 times counts up to 1e4 over 100 sites give ``|sum| <= 1e6 < 2^20``;
  scale 2^38 leaves ``q / 2 / scale = 2^21`` (2x headroom). Fresh secret-key noise on the
  decoded sum measures 2^-28.7 for one site and 2^-24.7 for 100 (largest of 41k slots), so
  the relative error stays below 1e-6 whenever the summed update's largest entry is at least
  0.04 (100 sites; 0.003 for one or two): about 2^25 of range between noise and wrap-around.
  Measured: 1e-11 relative on realistic updates (tiny and base), 1e-13 at the top of the range
  (100 sites x 1e4 examples x |w| <= 1), 1.6e-7 at the bottom (2 sites x 1 example x
  |w| <= 0.01). The float32 cast of the result (6e-8) dominates in practice.
* **Size.** Symmetric (secret-key) encryption is natural here, as every encrypting party holds
  the key, and SEAL then serialises the uniformly random half of the ciphertext as a 64-byte
  seed: an uploaded ciphertext is one polynomial of 4096 60-bit coefficients (~32 KiB) for
  2047 values. Measured upload: 4.05x the fp32 bytes for the base update (147,456 + 1,536
  values, 73 ciphertexts) and 4.22x for the tiny one (37,248 values, 19 ciphertexts, last one
  partly empty), against 20.6x and 22.2x for TenSEAL's defaults (N = 8192, [60, 40, 40, 60],
  scale 2^40, public key), and 8x for the same parameters without the seed. The server's sum
  is a full ciphertext (the seed is expanded on load): 8.05x on the way down. SEAL's zstd
  compression gains nothing on 60-bit coefficients; it does on smaller primes (3.6x at 50
  bits, 3.0x at 40) at the cost of 10 or 20 bits of range. Time for the base update (fastest
  of 3, busy 2-core machine): encrypt 0.045 s per site, sum of 10 sites 0.15 s, decrypt 0.02 s
  (TenSEAL defaults, on 2 threads: 0.25, 0.28, 0.05 s). Contexts: 310 bytes public (no keys
  at all), 33 KB secret.
* **Bounds are enforced, not hoped for.** A site whose ``count * |w|`` (or count) exceeds
  ``q / 2 / scale / max_sites`` (about 2.1e4 by default) is refused before encryption
  (:class:`CapacityError`), and the server refuses to sum more than ``max_sites`` updates.
  Provision a smaller ``scale_bits`` or ``max_sites`` for other envelopes.

TenSEAL's high-level ``CKKSVector`` cannot emit seeded ciphertexts and insists on a second
prime for relinearisation keys, so this module drives SEAL through ``tenseal.sealapi``; its
objects serialise only to file paths, which an in-memory file (``memfd``) serves.

Integrity: what is detected, and by whom
----------------------------------------
Every ciphertext travels in a small envelope: magic, kind, the SHA-256 fingerprint of the
public context, its index and count, and a SHA-256 digest. The server rejects, naming site and
index, a flipped byte or truncation (digest and lengths; the digest is not a MAC, so it stops
accidents, while TLS and node authentication stop forgers in transit), a ciphertext from a
site provisioned with another context (fingerprint: each context gets a random id, so even
identical parameters differ), and a forged envelope around a ciphertext for other parameters
(SEAL's own validity and ``parms_id`` checks, scale, size). It cannot tell a ciphertext made
with another secret key under identical parameters whose envelope was re-labelled: without the
key that is cryptographically indistinguishable. The sites catch it: slot 0 of every
ciphertext encrypts the site's example count, so after summation it must decrypt to
``total_examples``; a foreign key turns the whole ciphertext into noise of size ~q, so the
check fails with overwhelming probability, and it also fails when the server summed other
sites than the count it reports.
``core.he.provenance`` lets the sites go further and name the bad upload (per-site tags and
per-upload count slots), so the server can sum again without it.
Nothing detects a site that encrypts wrong values under the right key (poisoning) or a server
that adds plaintext offsets: the threat model is an honest-but-curious server, and a site that
colludes with the server can decrypt everything (all sites share one key).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import secrets
import struct
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from core.io import write_bytes_atomic

__all__ = [
    "AggregationError",
    "CapacityError",
    "CiphertextError",
    "CkksContext",
    "CkksError",
    "CkksLayout",
    "CkksParams",
    "ContextFileError",
    "EncryptedAggregate",
    "EncryptedUpdate",
    "InsecureKeyFileWarning",
    "IntegrityError",
    "KeyFilePermissionError",
    "LayoutError",
    "SecretKeyRequiredError",
    "TensealUnavailableError",
    "aggregate_encrypted",
    "context_from_bytes",
    "decrypt_average",
    "decrypt_count_slot",
    "encrypt_update",
    "flatten_state",
    "load_public_context",
    "load_secret_context",
    "make_layout",
    "new_secret_context",
    "provision",
    "sum_encrypted",
    "unflatten_state",
]

SECRET_CONTEXT_FILE = "site_secret.ctx"
PUBLIC_CONTEXT_FILE = "server_public.ctx"
CONTEXT_INFO_FILE = "ckks_context.json"

# SEAL's 128-bit security bound on the total coefficient modulus bits, per ring degree.
SEAL_MAX_MODULUS_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

# Legit noise on the count slot is ~1e-8; a foreign key makes it ~1e6 or more.
CHECK_SLOT_TOLERANCE = 1e-3

_CONTEXT_FORMAT = "fedmedvit-ckks-context/1"
_LAYOUT_FORMAT = "fedmedvit-ckks-layout/1"
_PUBLIC_MAGIC = b"FMVCKKP1"
_SECRET_MAGIC = b"FMVCKKS1"
_LENGTH = struct.Struct(">I")
_DIGEST_SIZE = 32

# Ciphertext envelope: magic, version, kind, context fingerprint, index, count, payload length.
_ENVELOPE = struct.Struct(">4sBB32sIII")
_ENVELOPE_MAGIC = b"FMVC"
_ENVELOPE_VERSION = 1
_KIND_SITE_UPDATE = 1
_KIND_AGGREGATE = 2
_KIND_NAMES = {_KIND_SITE_UPDATE: "a site update", _KIND_AGGREGATE: "an aggregate"}

# SEAL serialisation header: magic, header size, version, compression, reserved, total size.
_SEAL_HEADER = struct.Struct("<HBBBBHQ")
_SEAL_MAGIC = 0xA15E

_FLOAT_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}

SiteId = str | int


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class CkksError(Exception):
    """Base class, so callers can catch every failure of this module at once."""


class TensealUnavailableError(CkksError, ImportError):
    """TenSEAL is missing: HE mode cannot run without it."""


class CkksParamsError(CkksError, ValueError):
    """Parameters SEAL rejects or that cannot hold the values."""


class ContextFileError(CkksError, ValueError):
    """A context file is of the wrong kind, format or is corrupt."""


class KeyFilePermissionError(CkksError, PermissionError):
    """The secret context file is readable or writable by other users."""


class InsecureKeyFileWarning(UserWarning):
    """The secret context file has open permissions but the caller allowed it."""


class SecretKeyRequiredError(CkksError, ValueError):
    """Encryption or decryption was asked of a context without the secret key."""


class LayoutError(CkksError, ValueError):
    """The state dict, layout and ciphertexts do not describe the same update."""


class CapacityError(CkksError, ValueError):
    """Values or site counts that would wrap around the modulus and corrupt the sum."""


class CiphertextError(CkksError, ValueError):
    """One ciphertext is malformed, tampered with or from another context.

    ``site`` and ``index`` say which, so the server can drop that site and carry on.
    """

    def __init__(self, reason: str, *, site: SiteId | None = None, index: int | None = None):
        self.reason = reason
        self.site = site
        self.index = index
        where = []
        if site is not None:
            where.append(f"site {site!r}")
        if index is not None:
            where.append(f"ciphertext {index}")
        prefix = ", ".join(where) if where else "ciphertext"
        super().__init__(f"{prefix}: {reason}")


class IntegrityError(CkksError, ValueError):
    """The decrypted count slots disagree with ``total_examples``: the sum is not trustworthy."""


class AggregationError(CkksError, ValueError):
    """No update was valid, so there is nothing to aggregate this round."""


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CkksParams:
    """Ring degree, modulus chain and scale; the defaults are justified in the module docstring.

    ``max_sites`` bounds how many updates may be summed, which bounds how large each site's
    weighted values may be before the sum could wrap around the modulus.
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60,)
    scale_bits: int = 38
    max_sites: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(self.coeff_mod_bit_sizes))
        n = self.poly_modulus_degree
        if n not in SEAL_MAX_MODULUS_BITS_128:
            raise CkksParamsError(
                f"poly_modulus_degree must be one of {sorted(SEAL_MAX_MODULUS_BITS_128)}, got {n}"
            )
        bits = self.coeff_mod_bit_sizes
        if not bits or not all(isinstance(b, int) and 20 <= b <= 60 for b in bits):
            raise CkksParamsError(
                f"coeff_mod_bit_sizes must be a non-empty list of ints in [20, 60] (SEAL's prime "
                f"sizes), got {list(bits)}"
            )
        limit = SEAL_MAX_MODULUS_BITS_128[n]
        if sum(bits) > limit:
            raise CkksParamsError(
                f"coeff_mod_bit_sizes {list(bits)} total {sum(bits)} bits, above SEAL's 128-bit "
                f"security bound of {limit} for poly_modulus_degree {n}: use fewer or smaller "
                "primes, or a larger poly_modulus_degree"
            )
        if not isinstance(self.max_sites, int) or self.max_sites < 1:
            raise CkksParamsError(f"max_sites must be a positive int, got {self.max_sites!r}")
        # Each site must be able to encrypt at least values of magnitude 1.
        per_site_bits = self.data_modulus_bits - 1 - self.scale_bits - math.log2(self.max_sites)
        if self.scale_bits < 20 or per_site_bits < 0:
            raise CkksParamsError(
                f"scale_bits={self.scale_bits} must be >= 20 and at most data modulus bits "
                f"({self.data_modulus_bits}) - 1 - log2(max_sites={self.max_sites}) - log2(largest "
                "weighted value a site sends); lower scale_bits or max_sites"
            )

    @property
    def data_bit_sizes(self) -> tuple[int, ...]:
        """Primes a fresh ciphertext carries: all but SEAL's special prime (dropped if >1)."""
        bits = self.coeff_mod_bit_sizes
        return bits if len(bits) == 1 else bits[:-1]

    @property
    def data_modulus_bits(self) -> int:
        return sum(self.data_bit_sizes)

    @property
    def slot_count(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def values_per_ciphertext(self) -> int:
        """Slots minus the one that carries the integrity count."""
        return self.slot_count - 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "max_sites": self.max_sites,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CkksParams:
        try:
            return cls(
                poly_modulus_degree=int(data["poly_modulus_degree"]),
                coeff_mod_bit_sizes=tuple(int(b) for b in data["coeff_mod_bit_sizes"]),
                scale_bits=int(data["scale_bits"]),
                max_sites=int(data["max_sites"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CkksParamsError):
                raise
            raise CkksParamsError(f"invalid CKKS parameter record {dict(data)!r}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# SEAL access (lazy import, in-memory serialisation)
# --------------------------------------------------------------------------------------------


def _sealapi() -> ModuleType:
    """Import SEAL's bindings on first use, so ``core`` imports without TenSEAL installed."""
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


def _seal_save(obj: Any) -> bytes:
    """SEAL's Python bindings save only to a path: give them an in-memory file."""
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


def _seal_load(obj: Any, seal_context: Any, data: bytes) -> None:
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
_SEAL_ERRORS = (RuntimeError, ValueError, IndexError, OverflowError, MemoryError)


def _check_seal_header(payload: bytes) -> str | None:
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


# --------------------------------------------------------------------------------------------
# Contexts
# --------------------------------------------------------------------------------------------


class CkksContext:
    """The SEAL objects of one provisioned context: with the secret key at a site, without it
    at the server (which then can only add).

    Build one with :func:`new_secret_context`, :func:`load_secret_context` or
    :func:`load_public_context`; :meth:`public_context` drops the key.
    """

    def __init__(self, public_bytes: bytes, secret_key_bytes: bytes | None = None) -> None:
        header = _parse_public_bytes(public_bytes)
        self.params = CkksParams.from_dict(header["params"])
        self.context_id: str = header["context_id"]
        self._public_bytes = public_bytes
        self._fingerprint_raw = hashlib.sha256(public_bytes).digest()
        primes = [int(p) for p in header["coeff_modulus"]]
        bits = list(self.params.coeff_mod_bit_sizes)
        if len(primes) != len(bits) or [p.bit_length() for p in primes] != bits:
            raise ContextFileError(
                f"context primes {primes} do not match coeff_mod_bit_sizes {bits}: the file was "
                "edited or is corrupt; provision again"
            )
        sa = _sealapi()
        parms = sa.EncryptionParameters(sa.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(self.params.poly_modulus_degree)
        parms.set_coeff_modulus([sa.Modulus(p) for p in primes])
        self._seal = sa.SEALContext(parms, True, sa.SEC_LEVEL_TYPE.TC128)
        if not self._seal.parameters_set():
            raise CkksParamsError(
                f"SEAL rejects the parameters {self.params}: "
                f"{self._seal.parameters_error_message()}"
            )
        self._parms_id = list(self._seal.first_parms_id())
        self._scale = float(2**self.params.scale_bits)
        data_primes = primes if len(primes) == 1 else primes[:-1]
        self._data_modulus = math.prod(data_primes)
        # A full uncompressed ciphertext (2 polynomials) plus SEAL's header and metadata.
        self._max_payload_bytes = 2 * self.params.poly_modulus_degree * len(data_primes) * 8 + 1024
        self._evaluator = sa.Evaluator(self._seal)
        self._encoder = sa.CKKSEncoder(self._seal)
        self._secret_key_bytes = secret_key_bytes
        self._encryptor: Any = None
        self._decryptor: Any = None
        if secret_key_bytes is not None:
            secret_key = sa.SecretKey()
            try:
                _seal_load(secret_key, self._seal, secret_key_bytes)
            except _SEAL_ERRORS as exc:
                raise ContextFileError(
                    f"the secret key does not load for these parameters ({exc}): the file is "
                    "corrupt or was assembled from two contexts; provision again"
                ) from exc
            self._encryptor = sa.Encryptor(self._seal, secret_key)
            self._decryptor = sa.Decryptor(self._seal, secret_key)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the public context: sites and server compare it to know they match."""
        return self._fingerprint_raw.hex()

    @property
    def slot_count(self) -> int:
        return int(self._encoder.slot_count())

    @property
    def max_abs_sum(self) -> float:
        """Largest magnitude a summed slot may reach before it wraps around the modulus."""
        return float(self._data_modulus // 2) / self._scale - 1.0

    @property
    def max_abs_per_site(self) -> float:
        """Largest weighted value (``count * |w|``) one site may encrypt."""
        return self.max_abs_sum / self.params.max_sites

    def has_secret_key(self) -> bool:
        return self._secret_key_bytes is not None

    def public_context(self) -> CkksContext:
        """The same context without the secret key: what the server gets."""
        return CkksContext(self._public_bytes)

    def serialize_public(self) -> bytes:
        return self._public_bytes

    def serialize_secret(self) -> bytes:
        """The site file: the public part, the SEAL secret key and a digest of both."""
        if self._secret_key_bytes is None:
            raise SecretKeyRequiredError(
                "this context holds no secret key, so there is no secret context to serialise"
            )
        body = b"".join(
            [
                _SECRET_MAGIC,
                _LENGTH.pack(len(self._public_bytes)),
                self._public_bytes,
                _LENGTH.pack(len(self._secret_key_bytes)),
                self._secret_key_bytes,
            ]
        )
        return body + hashlib.sha256(body).digest()

    def __repr__(self) -> str:
        kind = "secret" if self.has_secret_key() else "public"
        return f"CkksContext({kind}, {self.params}, fingerprint={self.fingerprint[:16]}...)"


def _parse_public_bytes(data: bytes) -> dict[str, Any]:
    if data.startswith(_SECRET_MAGIC):
        raise ContextFileError("expected a public context but got the sites' secret context")
    if not data.startswith(_PUBLIC_MAGIC):
        raise ContextFileError(
            "not a fedmedvit CKKS context (bad magic); provision one with "
            "`python -m core.he.ckks provision --out DIR`"
        )
    try:
        header = json.loads(data[len(_PUBLIC_MAGIC) :].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ContextFileError(f"public context header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != _CONTEXT_FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise ContextFileError(
            f"unsupported context format {found!r}, expected {_CONTEXT_FORMAT!r}"
        )
    missing = {"params", "coeff_modulus", "context_id"} - set(header)
    if missing:
        raise ContextFileError(f"public context header lacks {sorted(missing)}")
    return header


def _public_bytes(params: CkksParams, primes: Sequence[int], context_id: str) -> bytes:
    header = {
        "format": _CONTEXT_FORMAT,
        "scheme": "ckks",
        "encryption": "symmetric-seeded",
        "security": "128-bit (SEAL tc128)",
        "params": params.to_dict(),
        "coeff_modulus": [int(p) for p in primes],
        "context_id": context_id,
    }
    return _PUBLIC_MAGIC + json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def new_secret_context(params: CkksParams | None = None) -> CkksContext:
    """A fresh secret context with a random id (in memory; :func:`provision` writes files)."""
    params = params or CkksParams()
    sa = _sealapi()
    primes = [
        m.value()
        for m in sa.CoeffModulus.Create(params.poly_modulus_degree, params.coeff_mod_bit_sizes)
    ]
    public = _public_bytes(params, primes, secrets.token_hex(16))
    # A throwaway context is needed to generate the key, which then belongs to ``public``.
    keygen_ctx = CkksContext(public)
    secret_key = sa.KeyGenerator(keygen_ctx._seal).secret_key()
    return CkksContext(public, _seal_save(secret_key))


def context_from_bytes(data: bytes) -> CkksContext:
    """Load either kind of context from bytes (file contents)."""
    if data.startswith(_PUBLIC_MAGIC):
        return CkksContext(data)
    if not data.startswith(_SECRET_MAGIC):
        raise ContextFileError(
            "not a fedmedvit CKKS context (bad magic); provision one with "
            "`python -m core.he.ckks provision --out DIR`"
        )
    if len(data) < len(_SECRET_MAGIC) + 2 * _LENGTH.size + _DIGEST_SIZE:
        raise ContextFileError("secret context is truncated")
    body, digest = data[:-_DIGEST_SIZE], data[-_DIGEST_SIZE:]
    if hashlib.sha256(body).digest() != digest:
        raise ContextFileError("secret context digest mismatch: the file is corrupt or truncated")
    offset = len(_SECRET_MAGIC)
    (public_len,) = _LENGTH.unpack_from(body, offset)
    offset += _LENGTH.size
    public = body[offset : offset + public_len]
    offset += public_len
    if offset + _LENGTH.size > len(body):
        raise ContextFileError("secret context is truncated")
    (key_len,) = _LENGTH.unpack_from(body, offset)
    offset += _LENGTH.size
    key = body[offset : offset + key_len]
    if len(public) != public_len or len(key) != key_len or offset + key_len != len(body):
        raise ContextFileError("secret context sections do not add up: the file is corrupt")
    return CkksContext(public, key)


def provision(
    out_dir: str | os.PathLike[str], params: CkksParams | None = None, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``site_secret.ctx`` (0o600), ``server_public.ctx`` (0o644) and a JSON summary.

    Refuses to overwrite an existing context unless asked: sites holding the old key could no
    longer decrypt anything encrypted under the new one. The sites' upload MAC key is derived
    from the secret key (``core.he.provenance.mac_key``), so it travels inside the 0o600
    secret file and the server, given only the public file, never has it.
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
        "format": _CONTEXT_FORMAT,
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
    data = path.read_bytes()
    if data.startswith(_PUBLIC_MAGIC):
        raise ContextFileError(
            f"{path} is the server's public context (no secret key); sites need "
            f"{SECRET_CONTEXT_FILE}"
        )
    try:
        ctx = context_from_bytes(data)
    except ContextFileError as exc:
        raise ContextFileError(f"{path}: {exc}") from exc
    if not ctx.has_secret_key():  # pragma: no cover - the format always carries one
        raise ContextFileError(f"{path} holds no secret key; sites need {SECRET_CONTEXT_FILE}")
    return ctx


def load_public_context(path: str | os.PathLike[str]) -> CkksContext:
    """Load the server's context, refusing one that holds the secret key."""
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(_SECRET_MAGIC):
        raise ContextFileError(
            f"{path} holds the sites' secret key; the server must never have it (it could "
            f"decrypt every site's update). Give the server {PUBLIC_CONTEXT_FILE} instead"
        )
    try:
        ctx = context_from_bytes(data)
    except ContextFileError as exc:
        raise ContextFileError(f"{path}: {exc}") from exc
    return ctx


# --------------------------------------------------------------------------------------------
# Layout: how a state dict becomes one flat vector and comes back
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CkksLayout:
    """Everything needed to unpack a decrypted vector, as JSON-friendly scalars and lists.

    It travels beside the ciphertexts (e.g. as one string in a Flower ConfigRecord).
    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    values_per_ciphertext: int
    context_fingerprint: str
    total_values: int = field(init=False)
    num_ciphertexts: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))
        object.__setattr__(self, "shapes", tuple(tuple(int(d) for d in s) for s in self.shapes))
        object.__setattr__(self, "dtypes", tuple(self.dtypes))
        if not self.keys:
            raise LayoutError("a layout needs at least one tensor")
        if not (len(self.keys) == len(self.shapes) == len(self.dtypes)):
            raise LayoutError(
                f"layout has {len(self.keys)} keys, {len(self.shapes)} shapes and "
                f"{len(self.dtypes)} dtypes; they must match one to one"
            )
        if list(self.keys) != sorted(set(self.keys)):
            raise LayoutError("layout keys must be unique and sorted")
        unknown = sorted(set(self.dtypes) - set(_FLOAT_DTYPES))
        if unknown:
            raise LayoutError(f"unsupported dtypes {unknown}; allowed: {sorted(_FLOAT_DTYPES)}")
        if any(d < 0 for s in self.shapes for d in s):
            raise LayoutError("shape dimensions must be >= 0")
        if self.values_per_ciphertext < 1:
            raise LayoutError("values_per_ciphertext must be >= 1")
        total = sum(math.prod(s) for s in self.shapes)
        if total < 1:
            raise LayoutError("the update holds no values")
        object.__setattr__(self, "total_values", total)
        object.__setattr__(self, "num_ciphertexts", math.ceil(total / self.values_per_ciphertext))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["keys"] = list(self.keys)
        data["shapes"] = [list(s) for s in self.shapes]
        data["dtypes"] = list(self.dtypes)
        data["format"] = _LAYOUT_FORMAT
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CkksLayout:
        if data.get("format") != _LAYOUT_FORMAT:
            raise LayoutError(
                f"unsupported layout format {data.get('format')!r}, expected {_LAYOUT_FORMAT!r}"
            )
        try:
            layout = cls(
                keys=tuple(str(k) for k in data["keys"]),
                shapes=tuple(tuple(int(d) for d in s) for s in data["shapes"]),
                dtypes=tuple(str(d) for d in data["dtypes"]),
                values_per_ciphertext=int(data["values_per_ciphertext"]),
                context_fingerprint=str(data["context_fingerprint"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, LayoutError):
                raise
            raise LayoutError(f"malformed layout record: {exc!r}") from exc
        for name in ("total_values", "num_ciphertexts"):
            if name in data and int(data[name]) != getattr(layout, name):
                raise LayoutError(
                    f"layout says {name}={data[name]} but its shapes give {getattr(layout, name)}"
                )
        return layout

    @classmethod
    def from_json(cls, text: str) -> CkksLayout:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LayoutError(f"layout is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise LayoutError("layout JSON must be an object")
        return cls.from_dict(data)


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _FLOAT_DTYPES:
        raise LayoutError(
            f"only floating-point tensors can be encrypted, got {dtype}; "
            f"allowed: {sorted(_FLOAT_DTYPES)}"
        )
    return name


def make_layout(state: Mapping[str, torch.Tensor], ctx: CkksContext) -> CkksLayout:
    """The layout of ``state`` (sorted keys) packed for ``ctx``."""
    if not state:
        raise LayoutError("the update is empty: nothing to encrypt")
    bad = [k for k in state if not isinstance(k, str)]
    if bad:
        raise LayoutError(f"state dict keys must be strings, got {bad[:3]!r}")
    keys = tuple(sorted(state))
    return CkksLayout(
        keys=keys,
        shapes=tuple(tuple(state[k].shape) for k in keys),
        dtypes=tuple(_dtype_name(state[k].dtype) for k in keys),
        values_per_ciphertext=ctx.params.values_per_ciphertext,
        context_fingerprint=ctx.fingerprint,
    )


def flatten_state(state: Mapping[str, torch.Tensor], layout: CkksLayout) -> np.ndarray:
    """Concatenate the tensors in layout order into one float64 vector (exact for floats)."""
    missing = sorted(set(layout.keys) - set(state))
    extra = sorted(set(state) - set(layout.keys))
    if missing or extra:
        raise LayoutError(f"state does not match layout: missing {missing}, unexpected {extra}")
    parts = []
    for key, shape, dtype in zip(layout.keys, layout.shapes, layout.dtypes, strict=True):
        tensor = state[key]
        if tuple(tensor.shape) != shape or _dtype_name(tensor.dtype) != dtype:
            raise LayoutError(
                f"{key!r} is {tuple(tensor.shape)} {tensor.dtype}, layout says {shape} {dtype}"
            )
        parts.append(tensor.detach().to("cpu", torch.float64).reshape(-1).numpy())
    return np.concatenate(parts)


def unflatten_state(values: np.ndarray, layout: CkksLayout) -> dict[str, torch.Tensor]:
    """Split a flat vector back into tensors with the layout's keys, shapes and dtypes."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if flat.size != layout.total_values:
        raise LayoutError(f"got {flat.size} values, layout holds {layout.total_values}")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for key, shape, dtype in zip(layout.keys, layout.shapes, layout.dtypes, strict=True):
        count = math.prod(shape)
        chunk = torch.from_numpy(flat[offset : offset + count].copy())
        out[key] = chunk.reshape(shape).to(_FLOAT_DTYPES[dtype])
        offset += count
    return out


# --------------------------------------------------------------------------------------------
# Ciphertext envelopes
# --------------------------------------------------------------------------------------------


def _seal_envelope(payload: bytes, ctx: CkksContext, kind: int, index: int, count: int) -> bytes:
    header = _ENVELOPE.pack(
        _ENVELOPE_MAGIC, _ENVELOPE_VERSION, kind, ctx._fingerprint_raw, index, count, len(payload)
    )
    return header + payload + hashlib.sha256(header + payload).digest()


def _open_envelope(
    blob: bytes,
    ctx: CkksContext,
    *,
    site: SiteId | None,
    index: int,
    count: int,
    kinds: tuple[int, ...],
) -> bytes:
    """Check one envelope and return its SEAL payload, or say exactly what is wrong."""

    def fail(reason: str) -> CiphertextError:
        return CiphertextError(reason, site=site, index=index)

    if not isinstance(blob, bytes | bytearray | memoryview):
        raise fail(f"expected bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) < _ENVELOPE.size + _DIGEST_SIZE:
        raise fail(f"only {len(blob)} bytes: truncated or not a ciphertext")
    magic, version, kind, fingerprint, got_index, got_count, length = _ENVELOPE.unpack_from(blob)
    if magic != _ENVELOPE_MAGIC or version != _ENVELOPE_VERSION:
        raise fail("not a fedmedvit ciphertext envelope (bad magic or version)")
    if length > ctx._max_payload_bytes:
        raise fail(
            f"payload of {length} bytes exceeds the {ctx._max_payload_bytes} a ciphertext of "
            "these parameters can take"
        )
    expected_length = _ENVELOPE.size + length + _DIGEST_SIZE
    if len(blob) != expected_length:
        raise fail(f"{len(blob)} bytes but the envelope announces {expected_length}: truncated")
    body, digest = blob[:-_DIGEST_SIZE], blob[-_DIGEST_SIZE:]
    if hashlib.sha256(body).digest() != digest:
        raise fail("digest mismatch: the bytes were altered in transit or storage")
    if fingerprint != ctx._fingerprint_raw:
        raise fail(
            f"made for context {fingerprint.hex()[:16]}..., this context is "
            f"{ctx.fingerprint[:16]}...: the site was provisioned with another context"
        )
    if kind not in kinds:
        names = " or ".join(_KIND_NAMES[k] for k in kinds)
        raise fail(f"is {_KIND_NAMES.get(kind, f'of kind {kind}')}, expected {names}")
    if got_index != index or got_count != count:
        raise fail(
            f"envelope says ciphertext {got_index} of {got_count}, expected {index} of {count}: "
            "ciphertexts are missing, reordered or from different updates"
        )
    payload = body[_ENVELOPE.size :]
    problem = _check_seal_header(payload)
    if problem:
        raise fail(problem)
    return payload


def _load_ciphertext(payload: bytes, ctx: CkksContext, *, site: SiteId | None, index: int) -> Any:
    """Deserialise with SEAL's validation, then check level, size and scale."""
    sa = _sealapi()
    ciphertext = sa.Ciphertext()
    try:
        _seal_load(ciphertext, ctx._seal, payload)
    except _SEAL_ERRORS as exc:
        raise CiphertextError(
            f"SEAL rejects it ({exc}): wrong parameters or corrupt", site=site, index=index
        ) from exc
    if list(ciphertext.parms_id()) != ctx._parms_id:
        raise CiphertextError(
            "its parms_id is not this context's encryption level", site=site, index=index
        )
    if ciphertext.size() != 2 or not ciphertext.is_ntt_form():
        raise CiphertextError(
            f"has {ciphertext.size()} polynomials (expected a fresh 2-polynomial ciphertext)",
            site=site,
            index=index,
        )
    if ciphertext.scale != ctx._scale:
        raise CiphertextError(
            f"scale 2^{math.log2(ciphertext.scale):.2f} differs from the context's "
            f"2^{ctx.params.scale_bits}",
            site=site,
            index=index,
        )
    return ciphertext


def _load_site(
    blobs: Sequence[bytes], ctx: CkksContext, *, site: SiteId, count: int | None
) -> list[Any]:
    """Load every ciphertext of one site, or raise before any of them is used."""
    if isinstance(blobs, bytes | bytearray) or not isinstance(blobs, Sequence):
        raise CiphertextError("expected a list of ciphertexts (bytes)", site=site)
    expected = len(blobs) if count is None else count
    if len(blobs) != expected:
        raise CiphertextError(
            f"sent {len(blobs)} ciphertexts, expected {expected} (layout mismatch)", site=site
        )
    if expected < 1:
        raise CiphertextError("sent no ciphertexts", site=site)
    loaded = []
    for index, blob in enumerate(blobs):
        payload = _open_envelope(
            blob, ctx, site=site, index=index, count=expected, kinds=(_KIND_SITE_UPDATE,)
        )
        loaded.append(_load_ciphertext(payload, ctx, site=site, index=index))
    return loaded


# --------------------------------------------------------------------------------------------
# Site: encrypt, decrypt
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncryptedUpdate:
    """What a site uploads: ciphertexts, its example count and how to unpack the sum."""

    ciphertexts: list[bytes]
    num_examples: int
    layout: CkksLayout

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.ciphertexts)


def _check_count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def encrypt_update(
    state: Mapping[str, torch.Tensor], num_examples: int, secret_ctx: CkksContext
) -> EncryptedUpdate:
    """Weight by ``num_examples`` in plaintext, pack, encrypt (seeded, secret-key)."""
    num_examples = _check_count(num_examples, "num_examples")
    if secret_ctx._encryptor is None:
        raise SecretKeyRequiredError(
            "encryption needs the sites' secret context (site_secret.ctx); this context holds "
            "no secret key"
        )
    layout = make_layout(state, secret_ctx)
    values = flatten_state(state, layout) * float(num_examples)
    if not np.all(np.isfinite(values)):
        bad = [k for k in layout.keys if not torch.isfinite(state[k]).all()]
        raise ValueError(f"update holds NaN or inf in {bad}: refusing to encrypt it")
    largest = max(float(np.max(np.abs(values))), float(num_examples))
    if largest > secret_ctx.max_abs_per_site:
        raise CapacityError(
            f"num_examples * |w| reaches {largest:.4g}, above the {secret_ctx.max_abs_per_site:.4g}"
            f" one site may encrypt (max_sites={secret_ctx.params.max_sites}, scale "
            f"2^{secret_ctx.params.scale_bits}); the sum could wrap around. Provision with a "
            "smaller scale_bits or max_sites, or check the update for exploding weights"
        )
    sa = _sealapi()
    per_ct = layout.values_per_ciphertext
    ciphertexts = []
    for index in range(layout.num_ciphertexts):
        chunk = values[index * per_ct : (index + 1) * per_ct]
        slots = [float(num_examples), *chunk.tolist()]
        plaintext = sa.Plaintext()
        secret_ctx._encoder.encode(slots, secret_ctx._scale, plaintext)
        payload = _seal_save(secret_ctx._encryptor.encrypt_symmetric(plaintext))
        ciphertexts.append(
            _seal_envelope(payload, secret_ctx, _KIND_SITE_UPDATE, index, layout.num_ciphertexts)
        )
    return EncryptedUpdate(ciphertexts=ciphertexts, num_examples=num_examples, layout=layout)


def decrypt_average(
    ciphertexts: Sequence[bytes], total_examples: int, layout: CkksLayout, secret_ctx: CkksContext
) -> dict[str, torch.Tensor]:
    """Decrypt the summed update, check its count slots, divide by the total and unflatten."""
    total_examples = _check_count(total_examples, "total_examples")
    if secret_ctx._decryptor is None:
        raise SecretKeyRequiredError(
            "decryption needs the sites' secret context (site_secret.ctx); the server's public "
            "context holds no secret key"
        )
    if layout.context_fingerprint != secret_ctx.fingerprint:
        raise LayoutError(
            f"layout is for context {layout.context_fingerprint[:16]}..., this site's context is "
            f"{secret_ctx.fingerprint[:16]}...: the sites were provisioned differently"
        )
    if len(ciphertexts) != layout.num_ciphertexts:
        raise LayoutError(
            f"got {len(ciphertexts)} ciphertexts, the layout packs {layout.total_values} values "
            f"into {layout.num_ciphertexts}"
        )
    sa = _sealapi()
    sums = np.empty(layout.total_values, dtype=np.float64)
    per_ct = layout.values_per_ciphertext
    mismatches: list[str] = []
    for index, blob in enumerate(ciphertexts):
        payload = _open_envelope(
            blob,
            secret_ctx,
            site=None,
            index=index,
            count=layout.num_ciphertexts,
            kinds=(_KIND_AGGREGATE, _KIND_SITE_UPDATE),
        )
        ciphertext = _load_ciphertext(payload, secret_ctx, site=None, index=index)
        plaintext = sa.Plaintext()
        secret_ctx._decryptor.decrypt(ciphertext, plaintext)
        slots = np.asarray(secret_ctx._encoder.decode_double(plaintext), dtype=np.float64)
        count_slot = float(slots[0])
        if not abs(count_slot - total_examples) <= CHECK_SLOT_TOLERANCE:
            mismatches.append(f"{index}: {count_slot:.6g}")
        start = index * per_ct
        stop = min(start + per_ct, layout.total_values)
        sums[start:stop] = slots[1 : 1 + stop - start]
    if mismatches:
        raise IntegrityError(
            f"count slots of ciphertexts [{', '.join(mismatches[:5])}"
            f"{', ...' if len(mismatches) > 5 else ''}] do not decrypt to total_examples="
            f"{total_examples}: the sum includes a ciphertext made with another key or altered, "
            "or total_examples does not match the sites that were summed. Discard this aggregate"
        )
    return unflatten_state(sums / float(total_examples), layout)


def decrypt_count_slot(blob: bytes, num_ciphertexts: int, secret_ctx: CkksContext) -> float:
    """Slot 0 of a site upload's first ciphertext: the example count the site encrypted.

    ``blob`` is ciphertext 0 of ``num_ciphertexts`` (its envelope must say so). Raises
    CiphertextError for a blob that is not such a ciphertext, SecretKeyRequiredError without
    the key.
    """
    if secret_ctx._decryptor is None:
        raise SecretKeyRequiredError("reading a count slot needs the sites' secret context")
    payload = _open_envelope(
        blob, secret_ctx, site=None, index=0, count=num_ciphertexts, kinds=(_KIND_SITE_UPDATE,)
    )
    ciphertext = _load_ciphertext(payload, secret_ctx, site=None, index=0)
    plaintext = _sealapi().Plaintext()
    secret_ctx._decryptor.decrypt(ciphertext, plaintext)
    return float(secret_ctx._encoder.decode_double(plaintext)[0])


# --------------------------------------------------------------------------------------------
# Server: add
# --------------------------------------------------------------------------------------------


def _check_site_budget(num_updates: int, ctx: CkksContext) -> None:
    if num_updates > ctx.params.max_sites:
        raise CapacityError(
            f"{num_updates} updates exceed max_sites={ctx.params.max_sites} the context was "
            "provisioned for; the sum could wrap around. Provision with a larger max_sites"
        )


def _serialize_sum(accumulator: list[Any], ctx: CkksContext) -> list[bytes]:
    count = len(accumulator)
    return [
        _seal_envelope(_seal_save(ct), ctx, _KIND_AGGREGATE, index, count)
        for index, ct in enumerate(accumulator)
    ]


def _accumulate(accumulator: list[Any] | None, loaded: list[Any], ctx: CkksContext) -> list[Any]:
    if accumulator is None:
        return loaded
    for total, ciphertext in zip(accumulator, loaded, strict=True):
        ctx._evaluator.add_inplace(total, ciphertext)
    return accumulator


def sum_encrypted(
    updates: Sequence[Sequence[bytes]],
    public_ctx: CkksContext,
    *,
    site_ids: Sequence[SiteId] | None = None,
    expected_count: int | None = None,
) -> list[bytes]:
    """Add the ciphertext lists of the given sites; raise :class:`CiphertextError` on the first
    bad one (naming site and index). The server never needs, and should not have, the key.

    ``expected_count`` (the layout's ``num_ciphertexts``) defaults to the first site's count.
    Use :func:`aggregate_encrypted` to skip bad sites instead of failing.
    """
    if not updates:
        raise AggregationError("no updates to sum")
    ids = list(site_ids) if site_ids is not None else list(range(len(updates)))
    if len(ids) != len(updates):
        raise ValueError(f"{len(ids)} site_ids for {len(updates)} updates")
    _check_site_budget(len(updates), public_ctx)
    count = expected_count if expected_count is not None else len(updates[0])
    accumulator: list[Any] | None = None
    for site, blobs in zip(ids, updates, strict=True):
        accumulator = _accumulate(
            accumulator, _load_site(blobs, public_ctx, site=site, count=count), public_ctx
        )
    assert accumulator is not None
    return _serialize_sum(accumulator, public_ctx)


@dataclass(frozen=True)
class EncryptedAggregate:
    """The server's sum, with who is in it: sites divide by ``total_examples``."""

    ciphertexts: list[bytes]
    total_examples: int
    layout: CkksLayout
    included: tuple[SiteId, ...]
    rejected: dict[SiteId, str]


def aggregate_encrypted(
    updates: Mapping[SiteId, EncryptedUpdate] | Sequence[EncryptedUpdate],
    public_ctx: CkksContext,
    *,
    expected_layout: CkksLayout | None = None,
) -> EncryptedAggregate:
    """Sum every valid update and drop the rest with a reason, so one bad site cannot stall a
    round. Without ``expected_layout`` the layout most sites sent is taken as the reference.
    """
    items: list[tuple[SiteId, EncryptedUpdate]] = (
        list(updates.items()) if isinstance(updates, Mapping) else list(enumerate(updates))
    )
    if not items:
        raise AggregationError("no updates to aggregate")
    _check_site_budget(len(items), public_ctx)
    if expected_layout is None:
        votes = Counter(update.layout.to_json() for _, update in items)
        expected_layout = CkksLayout.from_json(votes.most_common(1)[0][0])
    rejected: dict[SiteId, str] = {}
    included: list[SiteId] = []
    total = 0
    accumulator: list[Any] | None = None
    for site, update in items:
        try:
            if update.layout != expected_layout:
                raise LayoutError(
                    f"site {site!r}: its layout differs from the round's (other keys, shapes or "
                    "context)"
                )
            if update.layout.context_fingerprint != public_ctx.fingerprint:
                raise LayoutError(f"site {site!r}: its layout names another context")
            count = _check_count(update.num_examples, f"site {site!r} num_examples")
            loaded = _load_site(
                update.ciphertexts,
                public_ctx,
                site=site,
                count=expected_layout.num_ciphertexts,
            )
        except ValueError as exc:  # CiphertextError and LayoutError included
            rejected[site] = str(exc)
            continue
        accumulator = _accumulate(accumulator, loaded, public_ctx)
        included.append(site)
        total += count
    if accumulator is None:
        raise AggregationError(f"every update was rejected: {rejected}")
    return EncryptedAggregate(
        ciphertexts=_serialize_sum(accumulator, public_ctx),
        total_examples=total,
        layout=expected_layout,
        included=tuple(included),
        rejected=rejected,
    )


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _parse_bit_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated ints such as 60 or 60,40,60, got {text!r}"
        ) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m core.he.ckks provision --out DIR`` and ``python -m core.he.ckks show FILE``."""
    defaults = CkksParams()
    parser = argparse.ArgumentParser(prog="python -m core.he.ckks", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prov = commands.add_parser("provision", help="make the site secret and server public contexts")
    prov.add_argument("--out", required=True, help="directory for the context files")
    prov.add_argument("--poly-modulus-degree", type=int, default=defaults.poly_modulus_degree)
    prov.add_argument(
        "--coeff-mod-bit-sizes",
        type=_parse_bit_sizes,
        default=defaults.coeff_mod_bit_sizes,
        help="comma-separated prime sizes (default: %(default)s)",
    )
    prov.add_argument("--scale-bits", type=int, default=defaults.scale_bits)
    prov.add_argument("--max-sites", type=int, default=defaults.max_sites)
    prov.add_argument("--overwrite", action="store_true", help="replace an existing context")
    show = commands.add_parser("show", help="print a context file's parameters and fingerprint")
    show.add_argument("file")
    args = parser.parse_args(argv)
    try:
        if args.command == "provision":
            params = CkksParams(
                poly_modulus_degree=args.poly_modulus_degree,
                coeff_mod_bit_sizes=args.coeff_mod_bit_sizes,
                scale_bits=args.scale_bits,
                max_sites=args.max_sites,
            )
            secret_path, public_path = provision(args.out, params, overwrite=args.overwrite)
            print(f"site secret context:   {secret_path} (mode 600; give to every site only)")
            print(f"server public context: {public_path}")
            print(f"summary:               {Path(args.out) / CONTEXT_INFO_FILE}")
        else:
            ctx = context_from_bytes(Path(args.file).read_bytes())
            summary = {
                "kind": "secret" if ctx.has_secret_key() else "public",
                "params": ctx.params.to_dict(),
                "context_id": ctx.context_id,
                "public_context_sha256": ctx.fingerprint,
                "max_abs_per_site": ctx.max_abs_per_site,
            }
            print(json.dumps(summary, indent=2))
    except (CkksError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
