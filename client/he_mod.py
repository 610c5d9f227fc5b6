"""Encrypted aggregation on the site's side: a Flower mod around the train and evaluate handlers.

Incoming, when the global is the server's encrypted sum (``HE_TOTAL`` in the config): check
every summed upload's tag and count slot (``core.he.provenance.find_bad_uploads``), decrypt the
sum and hand the handler plaintext adapters, as in a plaintext run. A sum the site cannot vouch
for is answered with a verdict (the bad uploads by site, or why it does not decrypt) and the
handler does not run; the server then sums again without them, or keeps the previous global.
Outgoing (train): weight the handler's plaintext update by its example count, encrypt it under
the consortium's secret context and tag it. Plaintext runs pass straight through. The secret
context is the site's own file, found from the node (``core.federation.sites.SiteRef``), never
from the run config every node receives.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from core.config import RunConfig
from core.federation import protocol as P
from core.federation.sites import resolve_site

if TYPE_CHECKING:
    from core.he.ckks import CkksContext

# core.he (and through it TenSEAL, on the first context loaded) is imported only in HE mode:
# Flower starts a ClientApp process per message, and a plaintext run's process needs none of it.

log = logging.getLogger(f"flwr.{__name__}")  # under Flower's logger: its handler prints INFO


class UnusableGlobal(Exception):
    """The encrypted global cannot be used; ``verdict`` (JSON) says why, for the server."""

    def __init__(self, verdict: str) -> None:
        super().__init__(verdict)
        self.verdict = verdict


def _ciphertexts(record: ArrayRecord) -> list[bytes]:
    return P.arrays_to_ciphertexts({k: v.numpy() for k, v in record.items()})


def open_global(content: RecordDict, secret_ctx: CkksContext) -> ArrayRecord | None:
    """The plaintext global adapters of a server message, or None when they travel in the
    clear (round 1). Raises UnusableGlobal when an upload of the sum fails its tag or count
    slot, or the sum does not decrypt."""
    from core.he.ckks import CkksError, CkksLayout, decrypt_average
    from core.he.provenance import SumProvenance, find_bad_uploads, verdict_json

    config = content.config_records[P.CONFIG]
    if P.HE_TOTAL not in config:
        return None
    server_round = P.int_of(config, P.SERVER_ROUND, default=0)
    try:
        layout = CkksLayout.from_json(str(config[P.HE_LAYOUT]))
        total = P.int_of(config, P.HE_TOTAL)
        provenance = SumProvenance.from_json(str(config.get(P.HE_SOURCES, "")))
        if provenance.total_examples != total:
            raise UnusableGlobal(
                verdict_json(
                    provenance.round,
                    {},
                    f"the sum's total {total} is not its uploads' {provenance.total_examples}",
                )
            )
        probes = _ciphertexts(content.array_records.get(P.HE_PROBES, ArrayRecord()))
        bad = find_bad_uploads(provenance, probes, layout, secret_ctx)
        if bad:
            raise UnusableGlobal(verdict_json(provenance.round, bad))
        adapters = decrypt_average(
            _ciphertexts(content.array_records[P.ARRAYS]), total, layout, secret_ctx
        )
    except (CkksError, KeyError, ValueError) as err:  # IntegrityError, malformed records
        raise UnusableGlobal(verdict_json(server_round, {}, str(err)[:2000])) from err
    return ArrayRecord(adapters)


def seal_upload(
    content: RecordDict, secret_ctx: CkksContext, *, site: str, server_round: int
) -> None:
    """Replace a train reply's plaintext ``ARRAYS`` by the weighted, encrypted update, and add
    its layout and tag to ``SITE`` (in place)."""
    from core.he.ckks import encrypt_update
    from core.he.provenance import tag_upload

    adapters = content.array_records[P.ARRAYS].to_torch_state_dict()
    count = P.int_of(content.metric_records[P.METRICS], P.NUM_EXAMPLES)
    update = encrypt_update(adapters, count, secret_ctx)
    tag = tag_upload(
        update.ciphertexts,
        secret_ctx=secret_ctx,
        server_round=server_round,
        site=site,
        num_examples=count,
        layout=update.layout,
    )
    arrays = P.ciphertexts_to_arrays(update.ciphertexts)
    content[P.ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    site_record = content.config_records[P.SITE]
    site_record[P.HE_LAYOUT] = update.layout.to_json()
    site_record[P.HE_TAG] = tag


def he_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Decrypt and verify the global before the handler, encrypt and tag its update after."""
    cfg = RunConfig.from_flat(context.run_config)
    if not cfg.he:
        return call_next(msg, context)
    from core.he.ckks import load_secret_context

    site = resolve_site(cfg, context.node_config)
    secret = load_secret_context(site.secret_context())
    try:
        plain = open_global(msg.content, secret)
    except UnusableGlobal as unusable:
        log.warning("site %s cannot use the encrypted global: %s", site.name, unusable.verdict)
        verdict = ConfigRecord({P.SITE_NAME: site.name, P.HE_VERDICT: unusable.verdict})
        return Message(content=RecordDict({P.SITE: verdict}), reply_to=msg)
    if plain is not None:  # a new RecordDict: the incoming one may be shared
        msg.content = RecordDict({**dict(msg.content.items()), P.ARRAYS: plain})
    reply = call_next(msg, context)
    is_update = reply.has_content() and P.ARRAYS in reply.content
    if msg.metadata.message_type == "train" and is_update:
        server_round = P.int_of(msg.content.config_records[P.CONFIG], P.SERVER_ROUND)
        seal_upload(reply.content, secret, site=site.name, server_round=server_round)
    return reply
