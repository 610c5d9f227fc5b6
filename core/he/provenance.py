"""Which uploads an encrypted sum holds, and which of them a site can vouch for.

The server cannot tell a ciphertext encrypted under a foreign key (anyone with the public
context can make one) from a site's, nor a site whose count slot disagrees with the count it
claims: it sums them, and every honest site then fails to decrypt the sum
(:class:`~core.he.errors.IntegrityError`). Sites can tell, so the server forwards the evidence:

* **Tags.** Every site tags its upload with HMAC-SHA256 over the round, its site name, its
  claimed example count, the layout and the SHA-256 digests of its ciphertexts. The MAC key is
  derived from the consortium's secret key (:func:`mac_key`), so it is provisioned with
  ``site_secret.ctx`` (mode 0600) and the server, which holds only the public context, never
  has it: a server or outsider cannot make a valid tag.
* **Provenance.** With the sum, the server sends a :class:`SumProvenance` (site, count, tag
  and digests of every summed upload) and each upload's first ciphertext (its *probe*).
* **Verdict.** Before decrypting, a site runs :func:`find_bad_uploads`: a tag that does not
  verify names an upload made without the key; a probe whose count slot is not the claimed
  count names a site whose count disagrees. The server sums again without the named uploads.
  A sum that still fails to decrypt with no upload named is discarded and the previous global
  kept (``server.he_strategy``).

Out of scope: a site that holds the key and encrypts wrong values consistently (poisoning);
it can also forge other sites' tags. All sites share one key; DP bounds what it learns.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from core.he.context import CkksContext
from core.he.encrypt import CHECK_SLOT_TOLERANCE, decrypt_count_slot
from core.he.errors import CiphertextError, CkksError, SecretKeyRequiredError
from core.he.packing import CkksLayout

_MAC_INFO = b"fedmedvit upload MAC v1"
_PROVENANCE_FORMAT = "fedmedvit-sum-provenance/1"
_MAX_PROVENANCE_CHARS = 1 << 20  # ~200 bytes per source: room for thousands of sites


class ProvenanceError(CkksError, ValueError):
    """A provenance record or tag that is malformed (not one that fails verification)."""


def mac_key(secret_ctx: CkksContext) -> bytes:
    """The sites' upload MAC key: HMAC-SHA256 of the secret key bytes under a fixed label
    and the context fingerprint (32 bytes). Raises SecretKeyRequiredError without the key."""
    secret = secret_ctx.secret_key_bytes
    if secret is None:
        raise SecretKeyRequiredError(
            "upload tags need the sites' secret context (site_secret.ctx); the server's public "
            "context holds no key"
        )
    return hmac.new(secret, _MAC_INFO + secret_ctx.fingerprint_bytes, hashlib.sha256).digest()


def upload_digests(ciphertexts: Sequence[bytes]) -> tuple[str, str]:
    """SHA-256 (hex) of the first ciphertext, and of the others with their lengths."""
    if not ciphertexts:
        raise ProvenanceError("an upload holds at least one ciphertext")
    rest = hashlib.sha256()
    for blob in ciphertexts[1:]:
        rest.update(len(blob).to_bytes(8, "big"))
        rest.update(blob)
    return hashlib.sha256(ciphertexts[0]).hexdigest(), rest.hexdigest()


@dataclass(frozen=True)
class UploadSource:
    """One upload inside a sum: who sent it, the count it claims, its tag and digests."""

    site: str
    num_examples: int
    tag: str  # hex HMAC-SHA256
    head: str  # hex SHA-256 of ciphertext 0 (the probe)
    rest: str  # hex SHA-256 of ciphertexts 1.. (see upload_digests)

    @classmethod
    def of(
        cls, ciphertexts: Sequence[bytes], *, site: str, num_examples: int, tag: str
    ) -> UploadSource:
        """The server's record of an upload it sums (it computes the digests itself)."""
        head, rest = upload_digests(ciphertexts)
        return cls(site, num_examples, tag, head, rest)


def _tag_message(server_round: int, source: UploadSource, layout: CkksLayout) -> bytes:
    fields = {
        "round": server_round,
        "site": source.site,
        "num_examples": source.num_examples,
        "layout": hashlib.sha256(layout.to_json().encode()).hexdigest(),
        "head": source.head,
        "rest": source.rest,
    }
    return _MAC_INFO + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def tag_upload(
    ciphertexts: Sequence[bytes],
    *,
    secret_ctx: CkksContext,
    server_round: int,
    site: str,
    num_examples: int,
    layout: CkksLayout,
) -> str:
    """A site's tag (hex) over its upload for ``server_round``."""
    source = UploadSource.of(ciphertexts, site=site, num_examples=num_examples, tag="")
    message = _tag_message(server_round, source, layout)
    return hmac.new(mac_key(secret_ctx), message, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class SumProvenance:
    """The uploads a sum of ``round`` holds, in summation order."""

    round: int
    sources: tuple[UploadSource, ...]

    @property
    def total_examples(self) -> int:
        return sum(s.num_examples for s in self.sources)

    def to_json(self) -> str:
        data = {
            "format": _PROVENANCE_FORMAT,
            "round": self.round,
            "sources": [asdict(s) for s in self.sources],
        }
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SumProvenance:
        """Parse :meth:`to_json`; raises ProvenanceError naming the bad field."""
        if len(text) > _MAX_PROVENANCE_CHARS:
            raise ProvenanceError(f"provenance of {len(text)} characters is too long")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise ProvenanceError(f"provenance is not JSON: {str(err)[:200]}") from None
        if not isinstance(data, Mapping) or data.get("format") != _PROVENANCE_FORMAT:
            raise ProvenanceError(f"provenance format must be {_PROVENANCE_FORMAT!r}")
        sources = data.get("sources")
        if not isinstance(sources, list) or not sources:
            raise ProvenanceError("provenance.sources must be a non-empty list")
        parsed = []
        for i, raw in enumerate(sources):
            if not isinstance(raw, Mapping) or set(raw) != set(UploadSource.__annotations__):
                raise ProvenanceError(f"provenance.sources[{i}] has the wrong fields")
            count = raw["num_examples"]
            texts = [raw[k] for k in ("site", "tag", "head", "rest")]
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ProvenanceError(f"provenance.sources[{i}].num_examples = {count!r}")
            if not all(isinstance(t, str) and len(t) <= 256 for t in texts):
                raise ProvenanceError(f"provenance.sources[{i}] holds a non-string field")
            parsed.append(UploadSource(**raw))
        server_round = data.get("round")
        if isinstance(server_round, bool) or not isinstance(server_round, int):
            raise ProvenanceError(f"provenance.round = {server_round!r} is not an integer")
        return cls(server_round, tuple(parsed))


def find_bad_uploads(
    provenance: SumProvenance,
    probes: Sequence[bytes],
    layout: CkksLayout,
    secret_ctx: CkksContext,
) -> dict[str, str]:
    """Site -> why, for every upload of the sum a site cannot vouch for (empty when all are
    fine): a tag that does not verify (made without the consortium key, or its count, round,
    site or ciphertexts changed), a probe that is not the tagged upload's first ciphertext, or
    a count slot that is not the claimed count. ``probes[i]`` belongs to
    ``provenance.sources[i]``.

    Raises:
        ProvenanceError: the number of probes does not match the sources.
    """
    if len(probes) != len(provenance.sources):
        raise ProvenanceError(f"{len(probes)} probes for {len(provenance.sources)} summed uploads")
    key = mac_key(secret_ctx)
    bad: dict[str, str] = {}
    for source, probe in zip(provenance.sources, probes, strict=True):
        expected = hmac.new(key, _tag_message(provenance.round, source, layout), hashlib.sha256)
        if not hmac.compare_digest(expected.hexdigest(), source.tag):
            bad[source.site] = (
                "its tag does not verify: the upload was not made with the consortium's key "
                "(e.g. a ciphertext under a foreign key), or its count, round or bytes changed"
            )
            continue
        if hashlib.sha256(probe).hexdigest() != source.head:
            bad[source.site] = "its probe is not the first ciphertext of the tagged upload"
            continue
        try:
            slot = decrypt_count_slot(probe, layout.num_ciphertexts, secret_ctx)
        except CiphertextError as err:
            bad[source.site] = f"its first ciphertext does not load: {err}"
            continue
        if not (math.isfinite(slot) and abs(slot - source.num_examples) <= CHECK_SLOT_TOLERANCE):
            bad[source.site] = (
                f"its count slot decrypts to {slot:.6g} but it claims {source.num_examples} "
                "examples"
            )
    return bad


def verdict_json(server_round: int, bad: Mapping[str, str], error: str = "") -> str:
    """What a site replies instead of training or evaluating on a sum it cannot use."""
    return json.dumps({"round": server_round, "bad": dict(bad), "error": error})


def parse_verdict(text: str) -> tuple[int, dict[str, str], str]:
    """Inverse of :func:`verdict_json`: (round, bad uploads by site, error). Raises
    ProvenanceError on anything else."""
    try:
        data: Any = json.loads(text) if len(text) <= _MAX_PROVENANCE_CHARS else None
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, Mapping) or set(data) != {"round", "bad", "error"}:
        raise ProvenanceError("a verdict is a JSON object with round, bad and error")
    bad, error, server_round = data["bad"], data["error"], data["round"]
    if (
        not isinstance(bad, Mapping)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in bad.items())
        or not isinstance(error, str)
        or isinstance(server_round, bool)
        or not isinstance(server_round, int)
    ):
        raise ProvenanceError("a verdict's round is an int, bad maps sites to reasons")
    return server_round, dict(bad), error
