"""What the server does: add the sites' ciphertexts without ever holding the key.

:func:`sum_encrypted` fails on the first bad upload (naming site and index);
:func:`aggregate_encrypted` drops bad uploads with a reason and sums the rest, so one bad site
cannot stall a round. Both refuse more updates than the context's ``max_sites``, the bound
that keeps the sum from wrapping around the modulus.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.he.context import CkksContext
from core.he.encrypt import EncryptedUpdate, check_count
from core.he.envelope import KIND_AGGREGATE, load_site_ciphertexts, seal_envelope
from core.he.errors import AggregationError, CapacityError, LayoutError, SiteId
from core.he.packing import CkksLayout
from core.he.seal import seal_save


def _check_site_budget(num_updates: int, ctx: CkksContext) -> None:
    if num_updates > ctx.params.max_sites:
        raise CapacityError(
            f"{num_updates} updates exceed max_sites={ctx.params.max_sites} the context was "
            "provisioned for; the sum could wrap around. Provision with a larger max_sites"
        )


def _serialize_sum(accumulator: list[Any], ctx: CkksContext) -> list[bytes]:
    count = len(accumulator)
    return [
        seal_envelope(seal_save(ct), ctx, KIND_AGGREGATE, index, count)
        for index, ct in enumerate(accumulator)
    ]


def _accumulate(accumulator: list[Any] | None, loaded: list[Any], ctx: CkksContext) -> list[Any]:
    if accumulator is None:
        return loaded
    for total, ciphertext in zip(accumulator, loaded, strict=True):
        ctx.evaluator.add_inplace(total, ciphertext)
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

    Raises:
        AggregationError: ``updates`` is empty.
        CapacityError: more updates than the context's ``max_sites``.
        CiphertextError: the first bad ciphertext, naming site and index.
        ValueError: ``site_ids`` does not match ``updates`` one to one.
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
            accumulator,
            load_site_ciphertexts(blobs, public_ctx, site=site, count=count),
            public_ctx,
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
    updates: Mapping[str, EncryptedUpdate]
    | Mapping[int, EncryptedUpdate]
    | Sequence[EncryptedUpdate],
    public_ctx: CkksContext,
    *,
    expected_layout: CkksLayout | None = None,
) -> EncryptedAggregate:
    """Sum every valid update and drop the rest with a reason, so one bad site cannot stall a
    round. Without ``expected_layout`` the layout most sites sent is taken as the reference.
    Sites are the mapping's keys (site names or node ids), else the sequence's indices.

    Raises:
        AggregationError: no update, or every update was rejected (the reasons are listed).
        CapacityError: more updates than the context's ``max_sites``.
    """
    items: list[tuple[SiteId, EncryptedUpdate]] = (
        [(site, update) for site, update in updates.items()]
        if isinstance(updates, Mapping)
        else list(enumerate(updates))
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
            count = check_count(update.num_examples, f"site {site!r} num_examples")
            loaded = load_site_ciphertexts(
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
