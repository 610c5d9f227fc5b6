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
from collections import Counter
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
from core.federation import protocol as P
from core.privacy.ledger import PrivacyLedger
from core.training.loops import mean_metrics

log = logging.getLogger(f"flwr.{__name__}")  # under Flower's logger: its handler prints INFO
WEIGHT_KEY = P.NUM_EXAMPLES


@dataclass
class RoundLog:
    """What happened in one round, per site; becomes one entry of metrics.json."""

    round: int
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)
    sites: dict[str, dict[str, float | None]] = field(default_factory=dict)  # numbers only
    status: dict[str, str] = field(default_factory=dict)  # trained/refused/rejected/error
    events: list[dict[str, Any]] = field(default_factory=list)
    # Wall-clock seconds the ServerApp spent on this round: "train" (send, wait for every
    # train reply, aggregate), "evaluate" (the same for evaluation, re-evaluations included)
    # and "round" (the two; the checkpoint and report writing after them are not included).
    # Empty when the round was not driven by server.app.run_rounds.
    seconds: dict[str, float] = field(default_factory=dict)

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
            "seconds": self.seconds,
        }

    def event(self, site: str, kind: str, reason: str) -> None:
        self.events.append({"site": site, "kind": kind, "reason": reason})
        log.warning("round %d, site %s %s: %s", self.round, site, kind, reason)


class ReplyError(ValueError):
    """A reply that does not follow ``core.federation.protocol``; the message says what."""


@dataclass(frozen=True)
class SiteReply:
    """A reply that passed validation, from the site its node is bound to."""

    node: int
    site: str
    kind: str  # "train" | "refusal" | "evaluate" | "verdict" (protocol.REPLY_RECORDS)
    content: RecordDict
    ledger: dict[str, Any] | None = None


def _record_type(record: object) -> str:
    for kind, cls in (("array", ArrayRecord), ("metric", MetricRecord), ("config", ConfigRecord)):
        if isinstance(record, cls):
            return kind
    return type(record).__name__


def count_problem(value: object, cap: int) -> str:
    """Why ``value`` cannot be a site's example count ("" when it can): it must be an int in
    ``[1, cap]``, so no claim can take over the average or overflow the total."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"'{P.NUM_EXAMPLES}' must be an integer, got {type(value).__name__} {value!r}"
    if not 1 <= value <= cap:
        return (
            f"'{P.NUM_EXAMPLES}' = {value} is outside [1, {cap}] (run config "
            "'max-examples-per-site', and the CKKS range in HE mode)"
        )
    return ""


def reply_kind(content: RecordDict, phase: str) -> str:
    """Which protocol reply ``content`` claims to be, for a train or evaluate ``phase``."""
    site = content.config_records.get(P.SITE)
    if site is not None and P.HE_VERDICT in site:
        return "verdict"
    if phase == "train" and site is not None and site.get(P.SITE_STATUS) == P.REFUSED:
        return "refusal"
    return phase


def reply_problems(
    content: RecordDict, kind: str, *, encrypted: bool, max_examples: int
) -> list[str]:
    """Why ``content`` is not exactly the ``kind`` of reply the protocol defines (empty when it
    is): record names and types, the SITE record's keys (strings only), numbers only in
    METRICS, and an example count in ``[1, max_examples]``. Arrays are checked separately."""
    if kind == "verdict" and not encrypted:
        return ["an HE verdict in a plaintext run"]
    expected = P.REPLY_RECORDS[kind]
    got = {name: _record_type(record) for name, record in content.items()}
    if got != expected:
        return [f"records {got}, expected exactly {expected} for a {kind} reply"]
    site = content[P.SITE]
    allowed = [k for k in P.SITE_KEYS[kind] if encrypted or k not in (P.HE_LAYOUT, P.HE_TAG)]
    unexpected = sorted(set(site) - set(allowed))
    if unexpected:
        return [f"record '{P.SITE}' holds keys {unexpected} the protocol does not define"]
    required = [allowed[0]] + ([P.SITE_STATUS] if kind in ("train", "refusal") else [])
    required += [P.HE_LAYOUT, P.HE_TAG] if encrypted and kind == "train" else []
    required += [P.HE_VERDICT] if kind == "verdict" else []
    problems = [f"record '{P.SITE}' lacks '{k}'" for k in required if k not in site]
    problems += [
        f"'{P.SITE}.{k}' must be a string, got {type(v).__name__}"
        for k, v in site.items()
        if not isinstance(v, str)
    ]
    if problems:
        return problems
    name = str(site[P.SITE_NAME])
    if not name or len(name) > P.MAX_SITE_NAME_CHARS or not name.isprintable():
        problems.append(f"site name {name[:40]!r} is empty, too long or not printable")
    if kind == "train" and site[P.SITE_STATUS] != P.TRAINED:
        problems.append(f"status {str(site[P.SITE_STATUS])[:40]!r} is not '{P.TRAINED}'")
    if P.METRICS in content:
        metrics = content[P.METRICS]
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                problems.append(f"metric {key!r} is {type(value).__name__}, expected a number")
        if kind in ("train", "evaluate"):
            problem = count_problem(metrics.get(P.NUM_EXAMPLES), max_examples)
            problems += [problem] if problem else []
    return problems


def parse_ledger(text: str, source: str) -> dict[str, Any] | None:
    """A reply's privacy ledger: None when empty, else the JSON object, checked against the
    ledger schema. Raises ReplyError (too large, not JSON, too deep, not a ledger)."""
    if not text:
        return None
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > P.MAX_LEDGER_BYTES:
        raise ReplyError(f"{source}: {size} bytes, above the {P.MAX_LEDGER_BYTES} allowed")
    try:
        data = json.loads(text)
        PrivacyLedger.from_dict(data, source=source)
    except RecursionError:
        raise ReplyError(f"{source}: nested too deeply to be a ledger") from None
    except (ValueError, TypeError, KeyError) as err:  # JSONDecodeError, LedgerFormatError
        raise ReplyError(f"{source}: not a privacy ledger ({str(err)[:200]})") from None
    return dict(data)


def _weighted_mean(pairs: list[tuple[float, float]]) -> float:
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")


class AdapterFedAvg(FedAvg):
    """FedAvg over the adapter wire format, weighted by each site's example count.

    Every reply is validated as a whole before any of it is used (:func:`reply_problems`,
    :func:`parse_ledger`, :meth:`check_arrays`), and a site is the node that first used its
    name: a second node claiming it is rejected. A rejected reply is an event, never an
    exception.
    """

    encrypted = False

    def __init__(
        self,
        *,
        backbone_fingerprint: str,
        reference: Mapping[str, torch.Tensor],
        max_update_norm: float = 1e3,
        max_examples: int = 1_000_000,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(weighted_by_key=P.NUM_EXAMPLES, **fedavg_kwargs)
        self.backbone_fingerprint = backbone_fingerprint
        self.reference = dict(reference)
        self.max_update_norm = max_update_norm
        self.max_examples = max_examples
        self.rounds: dict[int, RoundLog] = {}
        self.ledgers: dict[str, dict[str, Any]] = {}
        self.site_of_node: dict[int, str] = {}
        self.node_of_site: dict[str, int] = {}

    def extra_state(self) -> dict[str, Any]:
        """Strategy state beyond rounds and ledgers that a resumed server needs."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`extra_state`."""

    def round_log(self, server_round: int) -> RoundLog:
        return self.rounds.setdefault(server_round, RoundLog(server_round))

    def _announce(self, config: ConfigRecord) -> ConfigRecord:
        config[P.BACKBONE_FINGERPRINT] = self.backbone_fingerprint
        return config

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_train(server_round, arrays, self._announce(config), grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_evaluate(server_round, arrays, self._announce(config), grid)

    def check_arrays(self, record: ArrayRecord) -> list[str]:
        """Why a train reply's arrays cannot be averaged (empty list when they can): exactly
        the reference keys and shapes, float32, finite, bounded norm."""
        wrong = {k: a.dtype for k, a in record.items() if a.dtype != "float32"}
        if wrong:
            return [f"arrays must have dtype float32, got {dict(list(wrong.items())[:3])}"]
        try:
            update = record.to_torch_state_dict()
        except Exception as err:  # a payload that does not even decode
            return [f"arrays do not decode as tensors: {err}"]
        return update_problems(update, self.reference, max_norm=self.max_update_norm)

    def _label(self, node: int, content: RecordDict | None) -> str:
        """Who a reply is from, for the round log: the node's bound site, else the name it
        claims if no other node holds that name, else ``node-<id>``."""
        if node in self.site_of_node:
            return self.site_of_node[node]
        site = content.config_records.get(P.SITE) if content is not None else None
        name = site.get(P.SITE_NAME) if site is not None else None
        if (
            isinstance(name, str)
            and name.isprintable()
            and 0 < len(name) <= P.MAX_SITE_NAME_CHARS
            and self.node_of_site.get(name, node) == node
        ):
            return name
        return f"node-{node}"

    def identify(
        self, server_round: int, replies: Iterable[Message], phase: str
    ) -> list[SiteReply]:
        """Validate every reply of a ``phase`` ("train" or "evaluate") and bind its node to
        the site it names. Errors and invalid replies become events; returns the rest."""
        valid: list[SiteReply] = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            label = self._label(node, msg.content if msg.has_content() else None)
            if msg.has_error():
                self.fail(server_round, label, str(msg.error.reason), phase, kind="error")
                continue
            content = msg.content
            kind = reply_kind(content, phase)
            problems = reply_problems(
                content, kind, encrypted=self.encrypted, max_examples=self.max_examples
            )
            ledger = None
            if not problems and kind in ("train", "refusal"):
                try:
                    ledger_text = str(content[P.SITE].get(P.PRIVACY_LEDGER, ""))
                    ledger = parse_ledger(ledger_text, f"privacy ledger of {label}")
                except ReplyError as err:
                    problems = [str(err)]
            if problems:
                self.fail(server_round, label, "; ".join(problems), phase)
                continue
            name = str(content[P.SITE][P.SITE_NAME])
            valid.append(SiteReply(node, name, kind, content, ledger))
        unbound = Counter(
            r.site
            for r in valid
            if r.node not in self.site_of_node and r.site not in self.node_of_site
        )
        bound: list[SiteReply] = []
        for reply in valid:
            owner = self.node_of_site.get(reply.site)
            mine = self.site_of_node.get(reply.node)
            if mine is not None and mine != reply.site:
                problem = f"node {reply.node} is site {mine!r} but this reply claims {reply.site!r}"
            elif owner is not None and owner != reply.node:
                problem = (
                    f"node {reply.node} claims site {reply.site!r}, which node {owner} already "
                    "is; a second node may not use a site's name"
                )
            elif mine is None and unbound[reply.site] > 1:
                problem = (
                    f"{unbound[reply.site]} nodes claim site {reply.site!r} at first contact; "
                    "none is bound and all are left out"
                )
            else:
                self.site_of_node[reply.node] = reply.site
                self.node_of_site[reply.site] = reply.node
                bound.append(reply)
                continue
            label = mine if mine is not None else f"node-{reply.node}"
            self.fail(server_round, label, problem, phase)
        return bound

    def triage(self, server_round: int, replies: Iterable[Message]) -> list[tuple[str, RecordDict]]:
        """Record every train reply (errors, refusals, metrics, ledgers); return the site
        replies to aggregate, sorted by site (the float sum then does not depend on reply
        order, and a resumed run repeats it bit for bit)."""
        record = self.round_log(server_round)
        candidates: list[tuple[str, RecordDict]] = []
        for reply in self.identify(server_round, replies, "train"):
            name, content = reply.site, reply.content
            if reply.ledger is not None:
                self.ledgers[name] = reply.ledger
            if reply.kind == "verdict":
                self.fail(server_round, name, str(content[P.SITE][P.HE_VERDICT]), "train", "error")
                continue
            record.record_metrics(name, content[P.METRICS])
            if reply.kind == "refusal":
                record.status[name] = "refused"
                record.event(name, "refused", str(content[P.SITE].get(P.SITE_REASON, "")))
                continue
            candidates.append((name, content))
        return sorted(candidates, key=lambda nc: nc[0])

    def fail(
        self, server_round: int, name: str, reason: str, phase: str, kind: str = "rejected"
    ) -> None:
        """Log a reply left out: ``kind`` "rejected" or "error"; in the train phase it also
        sets the site's status for the round."""
        record = self.round_log(server_round)
        if phase == "train":
            record.status[name] = kind
            record.event(name, kind, reason)
        else:
            record.event(name, f"{phase}-{kind}", reason)

    def reject(self, server_round: int, name: str, reason: str) -> None:
        self.fail(server_round, name, reason, "train")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted: list[RecordDict] = []
        for name, content in self.triage(server_round, replies):
            problems = self.check_arrays(content.array_records[P.ARRAYS])
            if problems:
                self.reject(server_round, name, "; ".join(problems))
            else:
                self.round_log(server_round).status[name] = "trained"
                accepted.append(content)
        if not accepted:
            log.warning("round %d: no valid update; the global adapters stay", server_round)
            return None, None
        return aggregate_arrayrecords(accepted, P.NUM_EXAMPLES), self.train_summary(
            server_round, accepted
        )

    def train_summary(self, server_round: int, accepted: list[RecordDict]) -> MetricRecord:
        record = self.round_log(server_round)
        metrics = [c.metric_records[P.METRICS] for c in accepted]
        loss_pairs = [
            (P.float_of(m, P.TRAIN_LOSS), P.float_of(m, P.NUM_EXAMPLES))
            for m in metrics
            if P.TRAIN_LOSS in m
        ]
        record.train = {"loss": _weighted_mean(loss_pairs), "sites": float(len(accepted))}
        return MetricRecord(dict(record.train))

    def evaluate_replies(self, server_round: int, replies: Iterable[Message]) -> list[SiteReply]:
        """The valid evaluate replies; HE verdicts are logged (the HE strategy acts on them)."""
        out = []
        for reply in self.identify(server_round, replies, "evaluate"):
            if reply.kind == "verdict":
                verdict = str(reply.content[P.SITE][P.HE_VERDICT])
                self.round_log(server_round).event(reply.site, "verdict", verdict[:2000])
            out.append(reply)
        return out

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.evaluation_summary(server_round, self.evaluate_replies(server_round, replies))

    def evaluation_summary(
        self, server_round: int, checked: list[SiteReply]
    ) -> MetricRecord | None:
        """Example-weighted mean of the valid evaluate replies' metrics (None without any)."""
        record = self.round_log(server_round)
        per_site: dict[str, Mapping[str, Any]] = {}
        for reply in checked:
            if reply.kind != "evaluate":
                continue
            values = dict(reply.content[P.METRICS].items())
            record.record_metrics(reply.site, values, skip=(P.NUM_EXAMPLES,))
            per_site[reply.site] = values
        if not per_site:
            return None
        record.evaluate = mean_metrics(per_site)
        return MetricRecord(dict(record.evaluate))

    def revise(self, server_round: int) -> ArrayRecord | None:
        """A replacement for the global just evaluated, when the sites found it unusable
        (HE: a sum holding a bad upload); None when it stands."""
        return None
