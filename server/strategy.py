"""Adapter-only FedAvg that survives refusals, errors and malformed updates.

Flower's FedAvg averages whatever keys the replies carry; our replies carry only the adapter
wire format (LoRA B, plus A in vanilla mode, and the head), so this *is* adapter-only
aggregation. What this subclass adds: it announces the backbone fingerprint, checks every reply
against the expected keys and shapes before averaging (a bad reply is left out with a logged
reason, the round goes on), honours sites that refuse a round to stay within their privacy
budget, and keeps per-site metrics and privacy ledgers for the run's report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from core.adapters.lora import update_problems
from core.training.loops import mean_metrics

log = logging.getLogger(__name__)
WEIGHT_KEY = "num-examples"


@dataclass
class RoundLog:
    """What happened in one round, per site; becomes one entry of metrics.json."""

    round: int
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)
    sites: dict[str, dict[str, float | None]] = field(default_factory=dict)  # numbers only
    status: dict[str, str] = field(default_factory=dict)  # trained/refused/rejected/error
    events: list[dict[str, Any]] = field(default_factory=list)

    def site(self, name: str) -> dict[str, float | None]:
        return self.sites.setdefault(name, {})

    def record_metrics(
        self, name: str, metrics: Mapping[str, Any], skip: tuple[str, ...] = ()
    ) -> None:
        """Numeric metrics only; NaN (e.g. an AUC with one class present) becomes None."""
        entry = self.site(name)
        for key, value in metrics.items():
            if key in skip or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            entry[key] = float(value) if np.isfinite(value) else None

    def to_json(self) -> dict[str, Any]:
        clean = {k: (v if v is None or np.isfinite(v) else None) for k, v in self.train.items()}
        evaluate = {k: (v if np.isfinite(v) else None) for k, v in self.evaluate.items()}
        return {
            "round": self.round,
            "train": clean,
            "evaluate": evaluate,
            "sites": self.sites,
            "status": self.status,
            "events": self.events,
        }

    def event(self, site: str, kind: str, reason: str) -> None:
        self.events.append({"site": site, "kind": kind, "reason": reason})
        log.warning("round %d, site %s %s: %s", self.round, site, kind, reason)


def _site_name(msg: Message) -> str:
    if msg.has_content() and "site" in msg.content.config_records:
        return str(msg.content["site"].get("name", f"node-{msg.metadata.src_node_id}"))
    return f"node-{msg.metadata.src_node_id}"


def _weight_problem(metrics: MetricRecord | None) -> str:
    """Why a reply's example count cannot weight an average ("" when it can)."""
    if metrics is None or WEIGHT_KEY not in metrics:
        return f"the reply has no MetricRecord 'metrics' with '{WEIGHT_KEY}'"
    weight = metrics[WEIGHT_KEY]
    if not isinstance(weight, int | float) or not np.isfinite(weight) or weight <= 0:
        return f"'{WEIGHT_KEY}' must be a positive number, got {weight!r}"
    return ""


def _weighted_mean(pairs: list[tuple[float, float]]) -> float:
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")


class AdapterFedAvg(FedAvg):
    """FedAvg over the adapter wire format, weighted by each site's example count."""

    def __init__(
        self,
        *,
        backbone_fingerprint: str,
        reference: Mapping[str, torch.Tensor],
        max_update_norm: float = 1e3,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(weighted_by_key=WEIGHT_KEY, **fedavg_kwargs)
        self.backbone_fingerprint = backbone_fingerprint
        self.reference = dict(reference)
        self.max_update_norm = max_update_norm
        self.rounds: dict[int, RoundLog] = {}
        self.ledgers: dict[str, dict[str, Any]] = {}

    def extra_state(self) -> dict[str, Any]:
        """Strategy state beyond rounds and ledgers that a resumed server needs."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`extra_state`."""

    def round_log(self, server_round: int) -> RoundLog:
        return self.rounds.setdefault(server_round, RoundLog(server_round))

    def _announce(self, config: ConfigRecord) -> ConfigRecord:
        config["backbone-fingerprint"] = self.backbone_fingerprint
        return config

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_train(server_round, arrays, self._announce(config), grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_evaluate(server_round, arrays, self._announce(config), grid)

    def check_reply(self, content: RecordDict) -> list[str]:
        """Why a train reply cannot be averaged (empty list when it can)."""
        if len(content.array_records) != 1 or "arrays" not in content.array_records:
            return ["the reply must carry exactly one ArrayRecord named 'arrays'"]
        weight_problem = _weight_problem(content.metric_records.get("metrics"))
        if weight_problem:
            return [weight_problem]
        try:
            update = content["arrays"].to_torch_state_dict()
        except Exception as err:  # a payload that does not even decode
            return [f"arrays do not decode as tensors: {err}"]
        return update_problems(update, self.reference, max_norm=self.max_update_norm)

    def triage(self, server_round: int, replies: Iterable[Message]) -> list[tuple[str, RecordDict]]:
        """Record every reply (errors, refusals, metrics, ledgers); return those to aggregate."""
        record = self.round_log(server_round)
        candidates: list[tuple[str, RecordDict]] = []
        for msg in replies:
            name = _site_name(msg)
            if msg.has_error():
                record.event(name, "error", str(msg.error.reason))
                record.status[name] = "error"
                continue
            content = msg.content
            site_info = content.config_records.get("site", ConfigRecord())
            ledger_json = str(site_info.get("privacy-ledger", ""))
            if ledger_json:
                self.ledgers[name] = json.loads(ledger_json)
            record.record_metrics(name, content.metric_records.get("metrics", MetricRecord()))
            if str(site_info.get("status", "trained")) == "refused":
                record.status[name] = "refused"
                record.event(name, "refused", str(site_info.get("reason", "")))
                continue
            candidates.append((name, content))
        return candidates

    def reject(self, server_round: int, name: str, reason: str) -> None:
        record = self.round_log(server_round)
        record.status[name] = "rejected"
        record.event(name, "rejected", reason)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted: list[RecordDict] = []
        # Sorted by site: the float sum, and so a resumed run, does not depend on reply order.
        for name, content in sorted(self.triage(server_round, replies), key=lambda nc: nc[0]):
            problems = self.check_reply(content)
            if problems:
                self.reject(server_round, name, "; ".join(problems))
            else:
                self.round_log(server_round).status[name] = "trained"
                accepted.append(content)
        if not accepted:
            log.warning("round %d: no valid update; the global adapters stay", server_round)
            return None, None
        return aggregate_arrayrecords(accepted, WEIGHT_KEY), self.train_summary(
            server_round, accepted
        )

    def train_summary(self, server_round: int, accepted: list[RecordDict]) -> MetricRecord:
        record = self.round_log(server_round)
        loss_pairs = [
            (float(c["metrics"]["train-loss"]), float(c["metrics"][WEIGHT_KEY]))
            for c in accepted
            if "train-loss" in c["metrics"]
        ]
        record.train = {"loss": _weighted_mean(loss_pairs), "sites": float(len(accepted))}
        return MetricRecord(record.train)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        record = self.round_log(server_round)
        per_site: dict[str, Mapping[str, Any]] = {}
        for msg in replies:
            name = _site_name(msg)
            if msg.has_error():
                record.event(name, "evaluate-error", str(msg.error.reason))
                continue
            metrics = msg.content.metric_records.get("metrics", MetricRecord())
            values = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            record.record_metrics(name, values, skip=(WEIGHT_KEY,))
            problem = _weight_problem(metrics)
            if problem:  # a malformed reply cannot weight the average: left out, not fatal
                record.event(name, "evaluate-rejected", problem)
                continue
            per_site[name] = values
        if not per_site:
            return None
        record.evaluate = mean_metrics(per_site)
        return MetricRecord(record.evaluate)
