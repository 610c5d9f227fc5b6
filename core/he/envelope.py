"""The ciphertext envelope: what one ciphertext looks like on the wire, and the checks a
receiver makes before SEAL sees it.

An envelope is a header (magic ``FMVC``, version, kind, the SHA-256 fingerprint of the public
context, the ciphertext's index and the update's ciphertext count, the payload length), the
SEAL payload and a SHA-256 digest of both. The receiver rejects, naming site and index, a
flipped byte or truncation (digest and lengths; the digest is not a MAC, so it stops
accidents, while TLS and node authentication stop forgers in transit), a ciphertext from a
site provisioned with another context (fingerprint), a ciphertext out of place (index and
count), an aggregate posing as a site update (kind), and a forged envelope around a ciphertext
for other parameters (SEAL's own validity and ``parms_id`` checks, scale, size). A ciphertext
made with another secret key under identical parameters and re-labelled is indistinguishable
here without the key; the sites' count slot catches it (:mod:`core.he.encrypt`).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from typing import Any

from core.he.context import CkksContext
from core.he.errors import CiphertextError, SiteId
from core.he.seal import SEAL_ERRORS, check_seal_header, seal_load, sealapi

# Magic, version, kind, context fingerprint, index, count, payload length.
HEADER = struct.Struct(">4sBB32sIII")
DIGEST_SIZE = hashlib.sha256().digest_size
_MAGIC = b"FMVC"
_VERSION = 1
KIND_SITE_UPDATE = 1
KIND_AGGREGATE = 2
_KIND_NAMES = {KIND_SITE_UPDATE: "a site update", KIND_AGGREGATE: "an aggregate"}


def seal_envelope(payload: bytes, ctx: CkksContext, kind: int, index: int, count: int) -> bytes:
    """Wrap a SEAL payload as ciphertext ``index`` of ``count`` of ``kind`` for ``ctx``."""
    header = HEADER.pack(_MAGIC, _VERSION, kind, ctx.fingerprint_bytes, index, count, len(payload))
    return header + payload + hashlib.sha256(header + payload).digest()


def open_envelope(
    blob: bytes,
    ctx: CkksContext,
    *,
    site: SiteId | None,
    index: int,
    count: int,
    kinds: tuple[int, ...],
) -> bytes:
    """Check one envelope and return its SEAL payload, or say exactly what is wrong.

    Raises:
        CiphertextError: naming ``site`` and ``index``, for every check the module docstring
            lists that fails before SEAL (SEAL's own checks are :func:`load_ciphertext`'s).
    """

    def fail(reason: str) -> CiphertextError:
        return CiphertextError(reason, site=site, index=index)

    if not isinstance(blob, bytes | bytearray | memoryview):
        raise fail(f"expected bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) < HEADER.size + DIGEST_SIZE:
        raise fail(f"only {len(blob)} bytes: truncated or not a ciphertext")
    magic, version, kind, fingerprint, got_index, got_count, length = HEADER.unpack_from(blob)
    if magic != _MAGIC or version != _VERSION:
        raise fail("not a fedmedvit ciphertext envelope (bad magic or version)")
    if length > ctx.max_payload_bytes:
        raise fail(
            f"payload of {length} bytes exceeds the {ctx.max_payload_bytes} a ciphertext of "
            "these parameters can take"
        )
    expected_length = HEADER.size + length + DIGEST_SIZE
    if len(blob) != expected_length:
        raise fail(f"{len(blob)} bytes but the envelope announces {expected_length}: truncated")
    body, digest = blob[:-DIGEST_SIZE], blob[-DIGEST_SIZE:]
    if hashlib.sha256(body).digest() != digest:
        raise fail("digest mismatch: the bytes were altered in transit or storage")
    if fingerprint != ctx.fingerprint_bytes:
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
    payload = body[HEADER.size :]
    problem = check_seal_header(payload)
    if problem:
        raise fail(problem)
    return payload


def load_ciphertext(payload: bytes, ctx: CkksContext, *, site: SiteId | None, index: int) -> Any:
    """Deserialise with SEAL's validation, then check level, size and scale.

    Raises:
        CiphertextError: SEAL rejects the payload, or it is not a fresh ciphertext of ``ctx``.
    """
    sa = sealapi()
    ciphertext = sa.Ciphertext()
    try:
        seal_load(ciphertext, ctx.seal_context, payload)
    except SEAL_ERRORS as exc:
        raise CiphertextError(
            f"SEAL rejects it ({exc}): wrong parameters or corrupt", site=site, index=index
        ) from exc
    if list(ciphertext.parms_id()) != ctx.parms_id:
        raise CiphertextError(
            "its parms_id is not this context's encryption level", site=site, index=index
        )
    if ciphertext.size() != 2 or not ciphertext.is_ntt_form():
        raise CiphertextError(
            f"has {ciphertext.size()} polynomials (expected a fresh 2-polynomial ciphertext)",
            site=site,
            index=index,
        )
    if ciphertext.scale != ctx.scale:
        raise CiphertextError(
            f"scale 2^{math.log2(ciphertext.scale):.2f} differs from the context's "
            f"2^{ctx.params.scale_bits}",
            site=site,
            index=index,
        )
    return ciphertext


def load_site_ciphertexts(
    blobs: Sequence[bytes], ctx: CkksContext, *, site: SiteId, count: int | None
) -> list[Any]:
    """Open and load every ciphertext of one site upload, or raise before any of them is used.

    Raises:
        CiphertextError: naming the site (and index), for the first bad ciphertext or count.
    """
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
        payload = open_envelope(
            blob, ctx, site=site, index=index, count=expected, kinds=(KIND_SITE_UPDATE,)
        )
        loaded.append(load_ciphertext(payload, ctx, site=site, index=index))
    return loaded
