"""Encrypted aggregation: the server sums CKKS ciphertexts it cannot read.

Sites send their adapter update multiplied by their example count, packed, encrypted under the
consortium's secret context and tagged (``client.he_mod``); this strategy holds only the public
context (no secret key), checks each upload's envelope, adds the valid ones and sends the
encrypted sum, the total example count and the sum's provenance (every summed upload's site,
count, tag and first ciphertext) back. Sites verify the provenance, then decrypt and divide.

The server cannot tell an upload made under a foreign key, or one whose count slot disagrees
with its claimed count; the sites can, and answer with a verdict naming it. :meth:`revise` then
sums again without the uploads a majority of the replying sites named; a sum that still does
not decrypt, with no upload named, is discarded and the previous global kept. Either way the
round is logged and the study goes on. Refusals, errors and malformed replies are handled as
in plaintext mode: left out, with the reason logged and reported.
"""

from __future__ import annotations

import base64
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from core.federation import protocol as P
from core.he.ckks import (
    CkksContext,
    CkksError,
    CkksLayout,
    EncryptedUpdate,
    aggregate_encrypted,
    make_layout,
)
from core.he.provenance import SumProvenance, UploadSource, parse_verdict
from server.strategy import AdapterFedAvg

log = logging.getLogger(f"flwr.{__name__}")  # under Flower's logger: its handler prints INFO


def ciphertexts_to_record(ciphertexts: list[bytes]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in P.ciphertexts_to_arrays(ciphertexts).items()})


def record_to_ciphertexts(record: ArrayRecord) -> list[bytes]:
    return P.arrays_to_ciphertexts({k: v.numpy() for k, v in record.items()})


class EncryptedAdapterFedAvg(AdapterFedAvg):
    """Adapter FedAvg over CKKS ciphertexts; the global model stays encrypted after round 1."""

    encrypted = True

    def __init__(
        self,
        *,
        public_context: CkksContext,
        reference: Mapping[str, torch.Tensor],
        max_examples: int = 1_000_000,
        **kwargs: Any,
    ) -> None:
        if public_context.has_secret_key():
            raise ValueError("the server must be given the public context, not the secret one")
        # A count is encrypted in every ciphertext's slot 0: it must fit one site's range.
        cap = min(max_examples, int(public_context.max_abs_per_site))
        super().__init__(reference=reference, max_examples=cap, **kwargs)
        self.public_context = public_context
        self.expected_layout: CkksLayout = make_layout(reference, public_context)
        self.global_total: int | None = None  # set once the global model is an encrypted sum
        self.provenance: SumProvenance | None = None  # which uploads the global sums
        self.probes: list[bytes] = []  # their first ciphertexts, in provenance order
        # This round: the valid uploads, the global it started from, the sites' verdicts.
        self.uploads: dict[str, tuple[EncryptedUpdate, UploadSource]] = {}
        self.excluded: dict[str, str] = {}
        self.previous: tuple[ArrayRecord, int | None, SumProvenance | None, list[bytes]] | None
        self.previous = None
        self.verdicts: list[tuple[str, dict[str, str], str]] = []
        self.evaluated: list[str] = []

    def _announce(self, config: ConfigRecord) -> ConfigRecord:
        config = super()._announce(config)
        config[P.HE_LAYOUT] = self.expected_layout.to_json()
        if self.global_total is not None and self.provenance is not None:
            config[P.HE_TOTAL] = self.global_total
            config[P.HE_SOURCES] = self.provenance.to_json()
        return config

    def _with_probes(self, messages: Iterable[Message]) -> list[Message]:
        out = list(messages)
        if self.global_total is not None:
            for msg in out:
                msg.content[P.HE_PROBES] = ciphertexts_to_record(self.probes)
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.previous = (arrays, self.global_total, self.provenance, list(self.probes))
        return self._with_probes(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.verdicts, self.evaluated = [], []
        return self._with_probes(super().configure_evaluate(server_round, arrays, config, grid))

    def extra_state(self) -> dict[str, Any]:
        provenance = self.provenance.to_json() if self.provenance is not None else None
        return {
            "global_total": self.global_total,
            "layout": self.expected_layout.to_json(),
            "provenance": provenance,
            "probes": [base64.b64encode(p).decode() for p in self.probes],
        }

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.global_total = state.get("global_total")
        provenance = state.get("provenance")
        self.provenance = SumProvenance.from_json(provenance) if provenance else None
        self.probes = [base64.b64decode(p) for p in state.get("probes", [])]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.uploads, self.excluded = {}, {}
        contents: dict[str, RecordDict] = {}
        for name, content in self.triage(server_round, replies):
            count = P.int_of(content.metric_records[P.METRICS], P.NUM_EXAMPLES)
            tag = str(content[P.SITE][P.HE_TAG])
            try:
                layout = CkksLayout.from_json(str(content[P.SITE][P.HE_LAYOUT]))
                ciphertexts = record_to_ciphertexts(content.array_records[P.ARRAYS])
                source = UploadSource.of(ciphertexts, site=name, num_examples=count, tag=tag)
            except (KeyError, ValueError, TypeError, CkksError) as err:
                self.reject(server_round, name, f"malformed encrypted upload: {err}")
                continue
            self.uploads[name] = (EncryptedUpdate(ciphertexts, count, layout), source)
            contents[name] = content
        arrays = self._sum(server_round)
        if arrays is None or self.provenance is None:
            log.warning("round %d: no valid encrypted update; the global stays", server_round)
            return None, None
        accepted = [contents[source.site] for source in self.provenance.sources]
        return arrays, self.train_summary(server_round, accepted)

    def _sum(self, server_round: int) -> ArrayRecord | None:
        """Sum this round's uploads minus the excluded ones and make it the global; None
        (and the global unchanged) when nothing is left."""
        record = self.round_log(server_round)
        items = {n: u for n, (u, _) in sorted(self.uploads.items()) if n not in self.excluded}
        if not items:
            return None
        try:
            aggregate = aggregate_encrypted(
                items, self.public_context, expected_layout=self.expected_layout
            )
        except CkksError as err:  # AggregationError, or CapacityError above max_sites
            for name in items:
                self.reject(server_round, name, str(err))
            return None
        for site, reason in aggregate.rejected.items():
            self.reject(server_round, str(site), reason)
        for site in aggregate.included:
            record.status[str(site)] = "trained"
        sources = tuple(self.uploads[str(n)][1] for n in aggregate.included)
        self.global_total = aggregate.total_examples
        self.provenance = SumProvenance(server_round, sources)
        self.probes = [self.uploads[str(n)][0].ciphertexts[0] for n in aggregate.included]
        return ciphertexts_to_record(aggregate.ciphertexts)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        checked = self.evaluate_replies(server_round, replies)
        for reply in checked:
            if reply.kind == "verdict":
                try:
                    verdict = parse_verdict(str(reply.content[P.SITE][P.HE_VERDICT]))
                except CkksError as err:
                    self.fail(server_round, reply.site, str(err), "evaluate")
                    continue
                self.verdicts.append((reply.site, verdict[1], verdict[2]))
            else:
                self.evaluated.append(reply.site)
        return self.evaluation_summary(server_round, checked)

    def revise(self, server_round: int) -> ArrayRecord | None:
        """Act on the sites' verdicts about the global just evaluated: sum again without the
        uploads a majority of the replying sites named, or, when a majority cannot decrypt
        it and names none, discard this round's sum and return the previous global. None when
        the global stands."""
        voters = len(self.verdicts) + len(self.evaluated)
        verdicts, self.verdicts = self.verdicts, []
        if not verdicts or self.provenance is None or self.provenance.round != server_round:
            return None
        record = self.round_log(server_round)
        named = Counter(site for _, bad, _ in verdicts for site in bad)
        summed = {s.site for s in self.provenance.sources}
        bad = {site for site, votes in named.items() if votes * 2 > voters and site in summed}
        if bad:
            for site in sorted(bad):
                reason = next(b[site] for _, b, _ in verdicts if site in b)
                self.excluded[site] = reason
                self.reject(
                    server_round, site, f"the sites found its encrypted upload bad: {reason}"
                )
            arrays = self._sum(server_round)
            if arrays is not None:
                log.warning("round %d: summed again without %s", server_round, sorted(bad))
                return arrays
        elif len(verdicts) * 2 <= voters:
            return None  # a minority cannot use the global: their problem, logged as events
        assert self.previous is not None, "configure_train records the global it started from"
        arrays, self.global_total, self.provenance, self.probes = self.previous
        errors = sorted({error for _, _, error in verdicts if error})
        record.event(
            "server",
            "discarded",
            f"round {server_round}'s encrypted sum is unusable at the sites and was discarded; "
            f"the previous global stays. Sites said: {'; '.join(errors)[:2000]}",
        )
        for site in summed - set(self.excluded):
            record.status[site] = "discarded"
        return arrays
