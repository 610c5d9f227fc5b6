"""A provisioned CKKS context in memory, and its byte format.

One secret context is made at provisioning and held by every site (the SEAL secret key plus
the public part); the server holds the public part only (parameters, primes and a random
context id, but no key at all), so it can add ciphertexts and nothing else. The SHA-256 of the
public part is the context's fingerprint: every ciphertext envelope carries it, so a site
provisioned with another context is told apart even under identical parameters. Files and
their permissions are :mod:`core.he.keys`.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import struct
from collections.abc import Sequence
from typing import Any

from core.he.errors import CkksParamsError, ContextFileError, SecretKeyRequiredError
from core.he.params import CkksParams
from core.he.seal import SEAL_ERRORS, seal_load, seal_save, sealapi

CONTEXT_FORMAT = "fedmedvit-ckks-context/1"
PUBLIC_MAGIC = b"FMVCKKP1"
SECRET_MAGIC = b"FMVCKKS1"
_LENGTH = struct.Struct(">I")
_DIGEST_SIZE = hashlib.sha256().digest_size
_BAD_MAGIC = (
    "not a fedmedvit CKKS context (bad magic); provision one with "
    "`python -m core.he.ckks provision --out DIR`"
)


class CkksContext:
    """The SEAL objects of one provisioned context: with the secret key at a site, without it
    at the server (which then can only add).

    Build one with :func:`new_secret_context`, :func:`~core.he.keys.load_secret_context` or
    :func:`~core.he.keys.load_public_context`; :meth:`public_context` drops the key.

    The SEAL handles the other ``core.he`` modules work with are plain attributes, to be read
    and not replaced: ``seal_context``, ``parms_id`` (the one level fresh ciphertexts are at),
    ``scale``, ``encoder``, ``evaluator``, ``encryptor`` and ``decryptor`` (None without the
    key), ``secret_key_bytes`` (None without the key), ``fingerprint_bytes`` (raw SHA-256 of the
    public part) and ``max_payload_bytes`` (the largest SEAL ciphertext these parameters make).
    """

    def __init__(self, public_bytes: bytes, secret_key_bytes: bytes | None = None) -> None:
        header = _parse_public_bytes(public_bytes)
        self.params = CkksParams.from_dict(header["params"])
        self.context_id: str = header["context_id"]
        self._public_bytes = public_bytes
        self.fingerprint_bytes = hashlib.sha256(public_bytes).digest()
        primes = [int(p) for p in header["coeff_modulus"]]
        bits = list(self.params.coeff_mod_bit_sizes)
        if len(primes) != len(bits) or [p.bit_length() for p in primes] != bits:
            raise ContextFileError(
                f"context primes {primes} do not match coeff_mod_bit_sizes {bits}: the file was "
                "edited or is corrupt; provision again"
            )
        sa = sealapi()
        parms = sa.EncryptionParameters(sa.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(self.params.poly_modulus_degree)
        parms.set_coeff_modulus([sa.Modulus(p) for p in primes])
        self.seal_context = sa.SEALContext(parms, True, sa.SEC_LEVEL_TYPE.TC128)
        if not self.seal_context.parameters_set():
            raise CkksParamsError(
                f"SEAL rejects the parameters {self.params}: "
                f"{self.seal_context.parameters_error_message()}"
            )
        self.parms_id = list(self.seal_context.first_parms_id())
        self.scale = float(2**self.params.scale_bits)
        data_primes = primes if len(primes) == 1 else primes[:-1]
        self._data_modulus = math.prod(data_primes)
        # A full uncompressed ciphertext (2 polynomials) plus SEAL's header and metadata.
        self.max_payload_bytes = 2 * self.params.poly_modulus_degree * len(data_primes) * 8 + 1024
        self.evaluator = sa.Evaluator(self.seal_context)
        self.encoder = sa.CKKSEncoder(self.seal_context)
        self.secret_key_bytes = secret_key_bytes
        self.encryptor: Any = None
        self.decryptor: Any = None
        if secret_key_bytes is not None:
            secret_key = sa.SecretKey()
            try:
                seal_load(secret_key, self.seal_context, secret_key_bytes)
            except SEAL_ERRORS as exc:
                raise ContextFileError(
                    f"the secret key does not load for these parameters ({exc}): the file is "
                    "corrupt or was assembled from two contexts; provision again"
                ) from exc
            self.encryptor = sa.Encryptor(self.seal_context, secret_key)
            self.decryptor = sa.Decryptor(self.seal_context, secret_key)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the public context: sites and server compare it to know they match."""
        return self.fingerprint_bytes.hex()

    @property
    def slot_count(self) -> int:
        return int(self.encoder.slot_count())

    @property
    def max_abs_sum(self) -> float:
        """Largest magnitude a summed slot may reach before it wraps around the modulus."""
        return float(self._data_modulus // 2) / self.scale - 1.0

    @property
    def max_abs_per_site(self) -> float:
        """Largest weighted value (``count * |w|``) one site may encrypt."""
        return self.max_abs_sum / self.params.max_sites

    def has_secret_key(self) -> bool:
        return self.secret_key_bytes is not None

    def public_context(self) -> CkksContext:
        """The same context without the secret key: what the server gets."""
        return CkksContext(self._public_bytes)

    def serialize_public(self) -> bytes:
        return self._public_bytes

    def serialize_secret(self) -> bytes:
        """The site file: the public part, the SEAL secret key and a digest of both."""
        if self.secret_key_bytes is None:
            raise SecretKeyRequiredError(
                "this context holds no secret key, so there is no secret context to serialise"
            )
        body = b"".join(
            [
                SECRET_MAGIC,
                _LENGTH.pack(len(self._public_bytes)),
                self._public_bytes,
                _LENGTH.pack(len(self.secret_key_bytes)),
                self.secret_key_bytes,
            ]
        )
        return body + hashlib.sha256(body).digest()

    def __repr__(self) -> str:
        kind = "secret" if self.has_secret_key() else "public"
        return f"CkksContext({kind}, {self.params}, fingerprint={self.fingerprint[:16]}...)"


def _parse_public_bytes(data: bytes) -> dict[str, Any]:
    if data.startswith(SECRET_MAGIC):
        raise ContextFileError("expected a public context but got the sites' secret context")
    if not data.startswith(PUBLIC_MAGIC):
        raise ContextFileError(_BAD_MAGIC)
    try:
        header = json.loads(data[len(PUBLIC_MAGIC) :].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ContextFileError(f"public context header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != CONTEXT_FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise ContextFileError(f"unsupported context format {found!r}, expected {CONTEXT_FORMAT!r}")
    missing = {"params", "coeff_modulus", "context_id"} - set(header)
    if missing:
        raise ContextFileError(f"public context header lacks {sorted(missing)}")
    return header


def _public_bytes(params: CkksParams, primes: Sequence[int], context_id: str) -> bytes:
    header = {
        "format": CONTEXT_FORMAT,
        "scheme": "ckks",
        "encryption": "symmetric-seeded",
        "security": "128-bit (SEAL tc128)",
        "params": params.to_dict(),
        "coeff_modulus": [int(p) for p in primes],
        "context_id": context_id,
    }
    return PUBLIC_MAGIC + json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def new_secret_context(params: CkksParams | None = None) -> CkksContext:
    """A fresh secret context with a random id (in memory; :func:`~core.he.keys.provision`
    writes the files).

    Raises:
        CkksParamsError: SEAL rejects the parameters.
        TensealUnavailableError: TenSEAL is not installed.
    """
    params = params or CkksParams()
    sa = sealapi()
    primes = [
        m.value()
        for m in sa.CoeffModulus.Create(params.poly_modulus_degree, params.coeff_mod_bit_sizes)
    ]
    public = _public_bytes(params, primes, secrets.token_hex(16))
    # A throwaway context is needed to generate the key, which then belongs to ``public``.
    keygen_ctx = CkksContext(public)
    secret_key = sa.KeyGenerator(keygen_ctx.seal_context).secret_key()
    return CkksContext(public, seal_save(secret_key))


def context_from_bytes(data: bytes) -> CkksContext:
    """Load either kind of context from bytes (file contents).

    Raises:
        ContextFileError: not a context, of another format, truncated or corrupt.
        TensealUnavailableError: TenSEAL is not installed.
    """
    if data.startswith(PUBLIC_MAGIC):
        return CkksContext(data)
    if not data.startswith(SECRET_MAGIC):
        raise ContextFileError(_BAD_MAGIC)
    if len(data) < len(SECRET_MAGIC) + 2 * _LENGTH.size + _DIGEST_SIZE:
        raise ContextFileError("secret context is truncated")
    body, digest = data[:-_DIGEST_SIZE], data[-_DIGEST_SIZE:]
    if hashlib.sha256(body).digest() != digest:
        raise ContextFileError("secret context digest mismatch: the file is corrupt or truncated")
    offset = len(SECRET_MAGIC)
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
