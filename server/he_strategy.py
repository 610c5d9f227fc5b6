"""Encrypted aggregation: the server sums CKKS ciphertexts it cannot read.

Sites send their adapter update multiplied by their example count, packed and encrypted under
the consortium's secret context; this strategy holds only the public context (no secret key),
checks each upload's envelope, adds the valid ones and sends the encrypted sum and the total
example count back. Sites decrypt and divide. Refusals, errors and malformed uploads are
handled exactly as in plaintext mode: left out, with the reason logged and reported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from core.federation.protocol import arrays_to_ciphertexts, ciphertexts_to_arrays
from core.he.ckks import (
    CkksContext,
    CkksError,
    CkksLayout,
    EncryptedUpdate,
    aggregate_encrypted,
    make_layout,
)
from server.strategy import WEIGHT_KEY, AdapterFedAvg

log = logging.getLogger(__name__)
HE_LAYOUT_KEY = "he-layout"
HE_TOTAL_KEY = "he-total"


def ciphertexts_to_record(ciphertexts: list[bytes]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in ciphertexts_to_arrays(ciphertexts).items()})


def record_to_ciphertexts(record: ArrayRecord) -> list[bytes]:
    return arrays_to_ciphertexts({k: v.numpy() for k, v in record.items()})


class EncryptedAdapterFedAvg(AdapterFedAvg):
    """Adapter FedAvg over CKKS ciphertexts; the global model stays encrypted after round 1."""

    def __init__(
        self,
        *,
        public_context: CkksContext,
        reference: Mapping[str, torch.Tensor],
        **kwargs: Any,
    ) -> None:
        if public_context.has_secret_key():
            raise ValueError("the server must be given the public context, not the secret one")
        super().__init__(reference=reference, **kwargs)
        self.public_context = public_context
        self.expected_layout: CkksLayout = make_layout(reference, public_context)
        self.global_total: int | None = None  # set once the global model is an encrypted sum

    def _announce(self, config: ConfigRecord) -> ConfigRecord:
        config = super()._announce(config)
        config[HE_LAYOUT_KEY] = self.expected_layout.to_json()
        if self.global_total is not None:
            config[HE_TOTAL_KEY] = self.global_total
        return config

    def extra_state(self) -> dict[str, Any]:
        return {"global_total": self.global_total, "layout": self.expected_layout.to_json()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.global_total = state.get("global_total")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        uploads: dict[str, EncryptedUpdate] = {}
        contents = {}
        for name, content in sorted(self.triage(server_round, replies), key=lambda nc: nc[0]):
            try:
                weight = content["metrics"][WEIGHT_KEY]
                if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
                    raise ValueError(f"'{WEIGHT_KEY}' must be a positive integer, got {weight!r}")
                layout = CkksLayout.from_json(str(content["site"][HE_LAYOUT_KEY]))
                ciphertexts = record_to_ciphertexts(content["arrays"])
            except (KeyError, ValueError, CkksError) as err:
                self.reject(server_round, name, f"malformed encrypted upload: {err}")
                continue
            uploads[name] = EncryptedUpdate(ciphertexts, int(weight), layout)
            contents[name] = content
        if not uploads:
            log.warning("round %d: no valid encrypted update; the global stays", server_round)
            return None, None
        aggregate = aggregate_encrypted(
            uploads, self.public_context, expected_layout=self.expected_layout
        )
        for name, reason in aggregate.rejected.items():
            self.reject(server_round, str(name), reason)
        if not aggregate.included:
            return None, None
        for name in aggregate.included:
            self.round_log(server_round).status[str(name)] = "trained"
        self.global_total = aggregate.total_examples
        accepted = [contents[str(name)] for name in aggregate.included]
        return ciphertexts_to_record(aggregate.ciphertexts), self.train_summary(
            server_round, accepted
        )
