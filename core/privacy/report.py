"""Privacy-budget report of a run folder, for the people who sign off on a site's privacy.

``python -m core.privacy.report RUN_DIR`` reads two JSON files from ``RUN_DIR`` and writes
``report.md``
(tables per site and a plain-language explanation for a data-protection officer) and
``privacy.png`` (cumulative epsilon per round per site; model quality per round), then prints
the path of ``report.md``. Re-running it re-renders from the JSON files alone.

``privacy.json`` (written by :func:`write_privacy_json` from the sites' ledgers)::

    {"format": "fedmedvit.privacy-report", "version": 1,
     "sites": {"site-a": {<PrivacyLedger.to_dict()>, "epsilon_spent": 2.99, "total_steps": 24,
                          "policy": {...}, "released": [...]}}}

  where a ledger's dict is::

    {"format": "fedmedvit.privacy-ledger", "version": 1,
     "settings": {"target_epsilon": 3.0, "target_delta": 1e-05, "max_grad_norm": 1.0,
                  "accountant": "rdp"},
     "dataset_size": 40,
     "plan": {"noise_multiplier": 2.19, "sample_rate": 0.25, "steps_per_round": 8,
              "planned_rounds": 3} | null,
     "history": [[noise_multiplier, sample_rate, steps], ...],          # Opacus accountant
     "rounds": [{"round": 1, "epsilon": 1.82, "steps": 8, "noise_multiplier": 2.19,
                 "sample_rate": 0.25, "refused": false, "reason": "",
                 "global_digest": "<sha256 of the global adapters>", "replay": false}, ...]}

  ``epsilon`` of a round is cumulative (everything spent up to and including that round) at the
  site's target delta; a refused round has ``steps`` 0, null noise and rate, and a reason. A
  ``replay`` record is a round number the site had already trained: served again from the kept
  release (not refused, no cost) or refused (another global model under that number).
  ``policy`` (optional) is the site's own policy (``core.federation.policy.SitePolicy``) and
  ``released`` (optional) what its replies carry, each item
  ``{"item", "reply", "covered", "note"}`` with ``covered`` true only for what the epsilon
  guarantee covers.
  ``epsilon_spent`` and ``total_steps`` are conveniences for other readers; the report uses
  the rounds.

``metrics.json`` (written by the ServerApp, see :func:`write_metrics_json`)::

    {"rounds": [{"round": 1,
                 "train": {"loss": 0.61},                                   # optional
                 "evaluate": {"accuracy": 0.71, "auc": 0.80, "loss": 0.55},  # optional, global
                 "sites": {"site-a": {"accuracy": 0.70, "auc": 0.79, "epsilon": 1.82}}}]}

  Only ``round`` (an integer >= 1) is required. Metric values are numbers, or null when not
  measured; any metric name is allowed. String values are labels (e.g. a site's ``"status"``)
  and other keys of a round (e.g. ``"events"``) are ignored by the report.

Over 500 lines: the readers of its two input files, the Markdown and the plot are one report
for one reader (the data-protection officer), and change together.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.io import write_json_atomic, write_text_atomic
from core.privacy.errors import LedgerFormatError
from core.privacy.ledger import PrivacyLedger
from core.privacy.plan import DPPlan, DPSettings
from core.privacy.records import RoundRecord

PRIVACY_FILE = "privacy.json"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PLOT_FILE = "privacy.png"
REPORT_FORMAT = "fedmedvit.privacy-report"
REPORT_VERSION = 1
# AUC first: under DP a noisy head often predicts the majority class, so plain accuracy can sit
# at the prevalence while the ranking (AUC) and balanced accuracy show what was learned.
PREFERRED_METRICS = ("auc", "balanced-accuracy", "accuracy", "loss")
# A site's evaluate metric (core.federation.protocol.LOCAL_HEAD, which core.privacy may not
# import): 0 when it evaluated with the initial global head, having no head of its own yet.
LOCAL_HEAD = "local-head"
INITIAL_HEAD = "no local head yet (initial head)"
DASH = "—"


class ReportInputError(ValueError):
    """A report input that is missing or malformed; the message names the file and the field."""


@dataclass(frozen=True)
class SiteBudget:
    """One site's privacy settings and per-round records, as read back from ``privacy.json``."""

    name: str
    settings: DPSettings
    dataset_size: int
    plan: DPPlan | None
    total_steps: int
    rounds: tuple[RoundRecord, ...]
    policy: Mapping[str, Any] | None = None
    released: tuple[Mapping[str, Any], ...] = ()

    @property
    def epsilon_spent(self) -> float:
        return self.rounds[-1].epsilon if self.rounds else 0.0

    @property
    def refused_rounds(self) -> tuple[RoundRecord, ...]:
        return tuple(record for record in self.rounds if record.refused)

    @property
    def trained_rounds(self) -> tuple[RoundRecord, ...]:
        return tuple(record for record in self.rounds if record.trained)

    @property
    def replays(self) -> tuple[RoundRecord, ...]:
        """Re-sent round numbers, served from the kept release or refused."""
        return tuple(record for record in self.rounds if record.replay)


@dataclass(frozen=True)
class RoundMetrics:
    """Aggregated and per-site metrics of one round (values None when not measured)."""

    server_round: int
    train: Mapping[str, float | None]
    evaluate: Mapping[str, float | None]
    sites: Mapping[str, Mapping[str, float | None]]
    status: Mapping[str, str] = field(default_factory=dict)  # site -> trained/...
    reasons: Mapping[str, str] = field(default_factory=dict)  # site -> why not


# -- writing the inputs ----------------------------------------------------------------------


def build_privacy_summary(
    ledgers: Mapping[str, PrivacyLedger],
    disclosures: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``privacy.json`` document for a run, from each site's ledger and, when given, the
    ``policy`` and ``released`` a site's reply stated (passed through as they came)."""
    sites: dict[str, Any] = {}
    for name, ledger in ledgers.items():
        if not isinstance(name, str) or not name:
            raise ReportInputError(f"site names must be non-empty strings, got {name!r}")
        records = ledger.records
        stated = (disclosures or {}).get(name, {})
        sites[name] = {
            **ledger.to_dict(),
            "epsilon_spent": records[-1].epsilon if records else 0.0,
            "total_steps": ledger.total_steps,
            **{key: stated[key] for key in ("policy", "released") if key in stated},
        }
    return {"format": REPORT_FORMAT, "version": REPORT_VERSION, "sites": sites}


def write_privacy_json(
    run_dir: str | os.PathLike[str],
    ledgers: Mapping[str, PrivacyLedger],
    disclosures: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Atomically write ``RUN_DIR/privacy.json`` from the sites' ledgers (and statements)."""
    document = build_privacy_summary(ledgers, disclosures)
    parse_privacy(document, source=PRIVACY_FILE)
    return write_json_atomic(Path(run_dir) / PRIVACY_FILE, document)


def write_metrics_json(run_dir: str | os.PathLike[str], metrics: Mapping[str, Any]) -> Path:
    """Validate a ``metrics.json`` document against the schema, then write it atomically.

    Non-finite numbers are written as null, since JSON cannot hold NaN.
    """
    path = Path(run_dir) / METRICS_FILE
    document = _finite_or_null(metrics)
    parse_metrics(document, source=str(path))
    parse_run_facts(document, source=str(path))
    return write_json_atomic(path, document)


# -- reading the inputs ----------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ReportInputError(
            f"{path}: file not found; the run folder must hold {PRIVACY_FILE} and {METRICS_FILE}"
        ) from err

    def reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a number JSON allows")

    try:
        return json.loads(text, parse_constant=reject_constant)
    except ValueError as err:
        raise ReportInputError(f"{path}: not valid JSON ({err})") from err


def _metric_map(value: object, where: str) -> dict[str, float | None]:
    """Numbers and nulls are metrics; strings are labels (e.g. a site's status) and are skipped."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ReportInputError(f"{where}: expected an object of metrics, got {value!r}")
    metrics: dict[str, float | None] = {}
    for key, item in value.items():
        if isinstance(item, str):
            continue
        if item is not None and (
            isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item)
        ):
            raise ReportInputError(
                f"{where}.{key}: expected a number, null or a string label, got {item!r}"
            )
        metrics[str(key)] = None if item is None else float(item)
    return metrics


def _finite_or_null(value: Any) -> Any:
    """NaN/inf (e.g. a mean over no sites) become null: JSON has no NaN and means "not measured"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    return value


def parse_privacy(data: Any, *, source: str = PRIVACY_FILE) -> tuple[SiteBudget, ...]:
    """Validate a ``privacy.json`` document; errors name ``source`` and the field."""
    if not isinstance(data, Mapping):
        raise ReportInputError(f"{source}: expected an object, got {type(data).__name__}")
    if data.get("format", REPORT_FORMAT) != REPORT_FORMAT:
        raise ReportInputError(
            f"{source}: format: expected {REPORT_FORMAT!r}, got {data['format']!r}"
        )
    if "sites" not in data:
        raise ReportInputError(f"{source}: sites: missing field")
    sites = data["sites"]
    if not isinstance(sites, Mapping) or not sites:
        raise ReportInputError(f"{source}: sites: expected a non-empty object, got {sites!r}")
    budgets = []
    for name, entry in sites.items():
        try:
            ledger = PrivacyLedger.from_dict(entry, source=f"sites.{name}")
        except LedgerFormatError as err:
            raise ReportInputError(f"{source}: {err}") from err
        where = f"{source}: sites.{name}"
        policy = entry.get("policy")
        if policy is not None and not isinstance(policy, Mapping):
            raise ReportInputError(f"{where}.policy: expected an object, got {policy!r}")
        released = entry.get("released", [])
        if not isinstance(released, list) or not all(
            isinstance(item, Mapping) and isinstance(item.get("item"), str) for item in released
        ):
            raise ReportInputError(
                f"{where}.released: expected a list of {{'item': ..., 'covered': ...}} objects, "
                f"got {released!r}"
            )
        budgets.append(
            SiteBudget(
                name=str(name),
                settings=ledger.settings,
                dataset_size=ledger.dataset_size,
                plan=ledger.plan,
                total_steps=ledger.total_steps,
                rounds=ledger.records,
                policy=policy,
                released=tuple(released),
            )
        )
    return tuple(budgets)


RUN_LABELS = {
    "run": "Run folder",
    "backbone_fingerprint": "Backbone fingerprint (SHA-256)",
    "num_server_rounds": "Rounds planned",
    "updated_utc": "Written (UTC)",
}


# The summary's line on where the heads went (run fact "head_sharing": "local" or "shared" for
# a classifier's head, "local-decoder" or "shared-decoder" for a segmentation model's decoder).
HEAD_SHARING_LINES = {
    "local": "Classifier heads: **local**. Each site trained and kept its own head; it never "
    "left the site (only the adapters were averaged; replies carried the initial global head).",
    "shared": "Classifier heads: **shared**. Each site's trained head left the site with its "
    "adapter update and was averaged over the sites (under DP, covered like the adapters).",
    "shared+local": "Classifier heads: **shared + local**. Each site's trained shared read-out "
    "left the site with its adapter update and was averaged over the sites (under DP, covered "
    "like the adapters); each site also trained and kept a personal read-out, added to the "
    "shared one's scores, whose values never left the site (replies carried the initial one). "
    "Both read-outs get the same gradient at a site, so without DP the personal read-out "
    "equals the sum of the shared read-out's changes the site sent (weight-decay 0, the "
    "default), and a coordinator that sees them in the clear can compute it; under DP that sum "
    "is a noisy estimate, covered by the site's epsilon like the replies it comes from.",
    "local-decoder": "Decoders: **local**. Each site trained and kept its own decoder and "
    "segmentation head; they never left the site (only the LoRA adapters were averaged; replies "
    "carried the initial global decoder).",
    "shared-decoder": "Decoders: **shared**. Each site's trained decoder and segmentation head "
    "left the site with its adapter update and were averaged over the sites (under DP, covered "
    "like the adapters).",
}


def parse_run_facts(data: Any, *, source: str = METRICS_FILE) -> dict[str, str]:
    """The optional ``run`` block of a ``metrics.json`` document: names to strings/numbers."""
    raw = data.get("run", {}) if isinstance(data, Mapping) else {}
    if not isinstance(raw, Mapping) or not all(
        isinstance(v, str | int | float) and not isinstance(v, bool) for v in raw.values()
    ):
        raise ReportInputError(f"{source}: run: expected an object of strings and numbers")
    return {str(k): str(v) for k, v in raw.items()}


def _text_map(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        raise ReportInputError(f"{where}: expected an object of strings, got {value!r:.80}")
    return {str(k): v for k, v in value.items()}


def _event_reasons(value: object, where: str) -> dict[str, str]:
    """Site -> the reasons logged for it in a round (refusals, rejections, errors), joined."""
    if value is None:
        return {}
    if not isinstance(value, list) or not all(isinstance(e, Mapping) for e in value):
        raise ReportInputError(f"{where}: expected a list of objects, got {value!r:.80}")
    reasons: dict[str, list[str]] = {}
    for event in value:
        site, kind, reason = (str(event.get(k, "")) for k in ("site", "kind", "reason"))
        reasons.setdefault(site, []).append(f"{kind}: {reason}" if reason else kind)
    return {site: "; ".join(texts) for site, texts in reasons.items()}


def parse_metrics(data: Any, *, source: str = METRICS_FILE) -> tuple[RoundMetrics, ...]:
    """Validate a ``metrics.json`` document; errors name ``source`` and the field."""
    if not isinstance(data, Mapping) or "rounds" not in data:
        raise ReportInputError(f"{source}: rounds: missing field (expected {{'rounds': [...]}})")
    raw_rounds = data["rounds"]
    if not isinstance(raw_rounds, list):
        raise ReportInputError(f"{source}: rounds: expected a list, got {raw_rounds!r}")
    parsed = []
    for index, raw in enumerate(raw_rounds):
        where = f"rounds[{index}]"
        if not isinstance(raw, Mapping):
            raise ReportInputError(f"{source}: {where}: expected an object, got {raw!r}")
        server_round = raw.get("round")
        if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 1:
            raise ReportInputError(
                f"{source}: {where}.round: expected an integer >= 1, got {server_round!r}"
            )
        try:
            raw_sites = raw.get("sites")
            raw_sites = {} if raw_sites is None else raw_sites
            if not isinstance(raw_sites, Mapping):
                raise ReportInputError(f"{where}.sites: expected an object, got {raw_sites!r}")
            parsed.append(
                RoundMetrics(
                    server_round=server_round,
                    train=_metric_map(raw.get("train"), f"{where}.train"),
                    evaluate=_metric_map(raw.get("evaluate"), f"{where}.evaluate"),
                    sites={
                        str(site): _metric_map(values, f"{where}.sites.{site}")
                        for site, values in raw_sites.items()
                    },
                    status=_text_map(raw.get("status"), f"{where}.status"),
                    reasons=_event_reasons(raw.get("events"), f"{where}.events"),
                )
            )
        except ReportInputError as err:
            raise ReportInputError(f"{source}: {err}") from err
    return tuple(parsed)


def load_privacy(path: str | os.PathLike[str]) -> tuple[SiteBudget, ...]:
    file = Path(path)
    return parse_privacy(_read_json(file), source=str(file))


def load_metrics(path: str | os.PathLike[str]) -> tuple[RoundMetrics, ...]:
    file = Path(path)
    return parse_metrics(_read_json(file), source=str(file))


# -- markdown --------------------------------------------------------------------------------


def format_epsilon(value: float) -> str:
    return f"{value:.3f}"


def format_delta(value: float) -> str:
    return f"{value:.1e}"


def _format_optional(value: float | None, spec: str) -> str:
    return DASH if value is None else format(value, spec)


def _cell(text: object) -> str:
    """Keep free text (reasons, site names) from breaking a Markdown table row."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _site_status(site: SiteBudget) -> str:
    if site.epsilon_spent > site.settings.target_epsilon:
        return "OVER BUDGET"
    if site.refused_rounds:
        return f"within budget; refused {len(site.refused_rounds)} round(s), reasons below"
    return "within budget"


def _round_status(record: RoundRecord) -> str:
    if record.replay:
        return "replay refused" if record.refused else "replay served (no new cost)"
    return "refused" if record.refused else "trained"


DPO_EXPLANATION = """\
## What these numbers mean

This section is for a hospital's data-protection officer.

- **Epsilon (ε)** measures how much the model updates a hospital sent out could reveal about
  any single training image (sample). With guarantee (ε, δ), whether one image was used or not
  changes the probability of anything the hospital sent by at most a factor of e^ε (about
  2.7 for ε = 1, 20 for ε = 3, 150 for ε = 5), except with probability δ. Smaller is more
  private. The consortium agrees each site's target before training starts.
- **Epsilon is cumulative.** Every round that trains on the data adds to it, and it never
  goes down. The "epsilon spent so far" column is the total from the first round up to and
  including that row, computed by composing every training step of every round with the
  {accountants} accountant; it is not the cost of that round alone.
- **Delta (δ)** is the small probability that the epsilon guarantee does not hold. The
  software refuses any delta that is not below 1 / (number of training images) at a site;
  values around 1e-5 or smaller are usual.
- **Noise multiplier, sample rate, steps** are the training settings that determine epsilon:
  each step uses a random subset of images (each image included with probability "sample
  rate"), limits every image's influence to the clipping norm and adds Gaussian noise of that
  many times the clipping norm. Each site chooses its noise once, at the start, so that its
  target is reached after the planned number of rounds and not before.
- **Refused** means the site did not train that round and sent nothing derived from its
  data, for the reason listed: the epsilon it would reach was above its target (checked
  *before* training), the run config broke the site's own policy, its update could not be
  encrypted, or the round was a replay (below). The federation carried on with the others.
- **Replays.** A site trains each round number once, from the global model whose digest its
  ledger records. If the coordinator re-sends that round with the same model (e.g. after a
  crash), the site re-sends the update it already released: no new privacy cost. Another
  model under a trained round number is refused, so the coordinator can never obtain two
  releases it could compare.

Who decides: each site. Its policy (shown per site below: require DP or HE, maximum epsilon,
minimum noise, maximum rounds, which metrics may leave) is checked against the coordinator's
run config before the site touches any data, and a weaker run is refused. Sampling and noise
are drawn fresh from the operating system's cryptographic random source for every release,
never from anything the coordinator sends.

What the guarantee covers, and what it does not:

- **Sample-level privacy.** The guarantee protects each training image. A patient with k
  images in the data set is protected at roughly k times the epsilon shown (group privacy).
- **The coordinator and the other sites** may be curious or careless: the guarantee covers
  every DP-trained update a site sent, whatever the coordinator sends or repeats.
- **Trusted local code.** Each site runs the training code as written (clipping, noise,
  random sampling, accounting) on its own machines; the guarantee is about what leaves the
  site, not about access to the site's systems.
- **Not covered:** everything else a site sends, listed per site under "What left this site"
  (the example count, evaluation metrics its policy allows, the ledger's figures, which reveal
  the dataset size). Training loss is never sent under DP. Error replies carry only a category
  and an error id; the full text stays in the site's log.
"""


def render_markdown(
    sites: Sequence[SiteBudget],
    metrics: Sequence[RoundMetrics],
    *,
    plot_name: str = PLOT_FILE,
    run: Mapping[str, str] | None = None,
) -> str:
    """The text of ``report.md``: which run, summary, the explanation, one table per site,
    model quality. ``run``: facts identifying the run (``metrics.json``'s ``run`` block)."""
    accountants = sorted({site.settings.accountant.upper() for site in sites})
    facts = {k: v for k, v in (run or {}).items() if k != "head_sharing"}
    lines = ["# Privacy-budget report", ""]
    if facts:
        lines += ["| Run | |", "|---|---|"]
        lines += [f"| {_cell(RUN_LABELS.get(k, k))} | {_cell(v)} |" for k, v in facts.items()]
        lines.append("")
    lines += [
        f"![Cumulative epsilon per round and model quality]({plot_name})",
        "",
        "## Summary",
        "",
    ]
    sharing = (run or {}).get("head_sharing")
    if sharing:
        lines += [HEAD_SHARING_LINES.get(sharing, f"Classifier heads: {_cell(sharing)}."), ""]
    lines += [
        "| Site | Epsilon spent | Target epsilon | Delta | Accountant | Clipping norm "
        "| Dataset size | Rounds trained | Rounds refused | Status |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for site in sites:
        trained = len(site.trained_rounds)
        lines.append(
            f"| {_cell(site.name)} | {format_epsilon(site.epsilon_spent)} "
            f"| {format_epsilon(site.settings.target_epsilon)} "
            f"| {format_delta(site.settings.target_delta)} | {site.settings.accountant.upper()} "
            f"| {site.settings.max_grad_norm:g} | {site.dataset_size} | {trained} "
            f"| {len(site.refused_rounds)} | {_site_status(site)} |"
        )
    lines += ["", DPO_EXPLANATION.format(accountants=" / ".join(accountants))]
    for site in sites:
        lines += _site_section(site)
    lines += _unledgered_section({site.name for site in sites}, metrics)
    lines += _metrics_section(metrics)
    return "\n".join(lines).rstrip() + "\n"


def _site_section(site: SiteBudget) -> list[str]:
    settings = site.settings
    lines = [f"## Site {_cell(site.name)}", ""]
    if site.plan is not None:
        lines += [
            f"Planned: {site.plan.planned_rounds} rounds of {site.plan.steps_per_round} steps, "
            f"noise multiplier {site.plan.noise_multiplier:.4f}, sample rate "
            f"{site.plan.sample_rate:.4g}, clipping norm {settings.max_grad_norm:g}, "
            f"{site.dataset_size} training images.",
            "",
        ]
    if not site.rounds:
        return [*lines, "No rounds recorded yet.", ""]
    lines += [
        "| Round | Epsilon spent so far | Target epsilon | Delta | Noise multiplier "
        "| Sample rate | Steps | Status |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for record in site.rounds:
        status = _round_status(record)
        lines.append(
            f"| {record.server_round} | {format_epsilon(record.epsilon)} "
            f"| {format_epsilon(settings.target_epsilon)} | {format_delta(settings.target_delta)} "
            f"| {_format_optional(record.noise_multiplier, '.4f')} "
            f"| {_format_optional(record.sample_rate, '.4g')} | {record.steps} | {status} |"
        )
    if site.refused_rounds:
        lines += ["", "Refused rounds:", ""]
        lines += [
            f"- Round {record.server_round}: {_cell(record.reason)}"
            for record in site.refused_rounds
        ]
    served = [record for record in site.replays if not record.refused]
    if served:
        lines += ["", "Re-sent rounds served from the kept release (no new privacy cost):", ""]
        lines += [f"- Round {record.server_round}: {_cell(record.reason)}" for record in served]
    return [*lines, "", *_policy_lines(site), *_released_lines(site)]


_POLICY_LABELS = (
    ("require_dp", "Require DP"),
    ("require_he", "Require HE"),
    ("max_epsilon", "Maximum epsilon"),
    ("min_noise_multiplier", "Minimum noise multiplier"),
    ("max_rounds", "Maximum rounds"),
    ("allowed_metrics", "Metrics allowed to leave"),
)


def _policy_lines(site: SiteBudget) -> list[str]:
    if site.policy is None:
        return []
    source = site.policy.get("source", "")
    lines = [f"Site policy (source: {_cell(source)}):", "", "| Requirement | Value |", "|---|---|"]
    for key, label in _POLICY_LABELS:
        value = site.policy.get(key)
        if value is None:
            text = "default for the run's mode" if key == "allowed_metrics" else "none"
        elif isinstance(value, bool):
            text = "yes" if value else "no"
        elif isinstance(value, list):
            text = ", ".join(str(item) for item in value) or "none"
        else:
            text = str(value)
        lines.append(f"| {label} | {_cell(text)} |")
    return [*lines, ""]


def _released_lines(site: SiteBudget) -> list[str]:
    if not site.released:
        return []
    lines = [
        "What left this site (its policy decides the metrics):",
        "",
        "| Item | Reply | Covered by epsilon | Note |",
        "|---|---|---|---|",
    ]
    for item in site.released:
        covered = "yes" if item.get("covered") else "NO"
        lines.append(
            f"| {_cell(item['item'])} | {_cell(item.get('reply', ''))} | {covered} "
            f"| {_cell(item.get('note', ''))} |"
        )
    return [*lines, ""]


METRIC_LABELS = {
    "auc": "AUC",
    # Rates at the threshold each site picks on its own validation split (the deployed rule).
    "balanced-accuracy": "Balanced accuracy (site threshold)",
    "sensitivity": "Sensitivity (site threshold)",
    "specificity": "Specificity (site threshold)",
    # The arg-max rule of the shared head, without the site's threshold.
    "accuracy": "Accuracy (arg-max)",
}


def _unledgered_section(ledgered: set[str], metrics: Sequence[RoundMetrics]) -> list[str]:
    """Sites the coordinator heard from that never sent a privacy ledger (e.g. their policy
    refused every round before training): listed so that no participant is invisible."""
    rows = [
        (row.server_round, name, row.status.get(name, ""), row.reasons.get(name, ""))
        for row in metrics
        for name in sorted((row.status.keys() | row.reasons.keys()) - ledgered)
    ]
    if not rows:
        return []
    lines = [
        "## Sites without a privacy ledger",
        "",
        "These sites replied but sent no privacy ledger, so no epsilon is known for them; "
        "a site that refuses before training (for example because the run config breaks its "
        "policy) spends no budget and sends nothing derived from its data.",
        "",
        "| Round | Site | Status | Reason |",
        "|---:|---|---|---|",
    ]
    lines += [
        f"| {r} | {_cell(name)} | {_cell(status or DASH)} | {_cell(reason[:300] or DASH)} |"
        for r, name, status, reason in rows
    ]
    return [*lines, ""]


def metric_label(name: str) -> str:
    return METRIC_LABELS.get(name, name.replace("_", " ").replace("-", " ").capitalize())


def _metric_names(metrics: Sequence[RoundMetrics]) -> list[str]:
    seen = {name for row in metrics for name in row.evaluate}
    preferred = [name for name in PREFERRED_METRICS if name in seen]
    return preferred + sorted(seen - set(preferred))


def initial_head_sites(row: RoundMetrics) -> list[str]:
    """Sites whose evaluation in ``row`` used the initial global head: they had no head of
    their own yet (head-sharing "local", not trained yet), so their numbers are not theirs."""
    return sorted(name for name, values in row.sites.items() if values.get(LOCAL_HEAD) == 0.0)


def _metrics_section(metrics: Sequence[RoundMetrics]) -> list[str]:
    names = _metric_names(metrics)
    lines = ["## Global model quality per round", ""]
    if not names:
        lines += ["No aggregated evaluation metrics were recorded.", ""]
    else:
        lines += [
            "| Round | " + " | ".join(_cell(metric_label(name)) for name in names) + " |",
            "|---:|" + "---:|" * len(names),
        ]
        for row in metrics:
            cells = [_format_optional(row.evaluate.get(name), ".4f") for name in names]
            lines.append(f"| {row.server_round} | " + " | ".join(cells) + " |")
        lines.append("")
    initial = [(row.server_round, initial_head_sites(row)) for row in metrics]
    if any(sites for _, sites in initial):
        lines += [
            f"Evaluated with {INITIAL_HEAD}: these sites had not trained a head of their own "
            "yet, so their numbers (and their share of the means above; hollow markers in the "
            "plot) are the untrained initial head's, not the site's model quality.",
            "",
        ]
        lines += [
            f"- Round {r}: {', '.join(_cell(name) for name in sites)}"
            for r, sites in initial
            if sites
        ]
        lines.append("")
    return lines


# -- plot ------------------------------------------------------------------------------------


def choose_metric(metrics: Sequence[RoundMetrics]) -> str:
    """The first of PREFERRED_METRICS that was measured: the panel shows what exists."""
    for name in PREFERRED_METRICS:
        for row in metrics:
            values = [row.evaluate.get(name), *(site.get(name) for site in row.sites.values())]
            if any(value is not None for value in values):
                return name
    return PREFERRED_METRICS[0]


def render_plot(
    sites: Sequence[SiteBudget],
    metrics: Sequence[RoundMetrics],
    path: str | os.PathLike[str],
    *,
    metric: str | None = None,
) -> Path:
    """Left: cumulative epsilon per round per site with dashed targets. Right: model quality."""
    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    metric = metric or choose_metric(metrics)
    figure = Figure(figsize=(12, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    eps_axes, metric_axes = figure.subplots(1, 2)
    colors = {site.name: f"C{index % 10}" for index, site in enumerate(sites)}

    for site in sites:
        color = colors[site.name]
        rounds = [record.server_round for record in site.rounds]
        eps_axes.plot(
            rounds,
            [record.epsilon for record in site.rounds],
            marker="o",
            color=color,
            label=site.name,
        )
        refused = site.refused_rounds
        if refused:
            eps_axes.plot(
                [record.server_round for record in refused],
                [record.epsilon for record in refused],
                linestyle="none",
                marker="x",
                markersize=10,
                color=color,
                label=f"{site.name} refused",
            )
        eps_axes.axhline(
            site.settings.target_epsilon,
            linestyle="--",
            color=color,
            linewidth=1,
            label=f"{site.name} target ({format_epsilon(site.settings.target_epsilon)})",
        )
    eps_axes.set_title("Privacy budget spent (cumulative)")
    eps_axes.set_xlabel("Round")
    eps_axes.set_ylabel("Epsilon at each site's delta")
    eps_axes.set_ylim(bottom=0)
    eps_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    eps_axes.legend(fontsize="small")

    plotted = False
    site_names = sorted({name for row in metrics for name in row.sites})
    extra_colors = iter(f"C{index % 10}" for index in range(len(colors), len(colors) + 100))
    initial_heads = {row.server_round: initial_head_sites(row) for row in metrics}
    initial_label = INITIAL_HEAD  # one legend entry for every hollow marker
    for name in site_names:
        points = [
            (row.server_round, row.sites[name][metric])
            for row in metrics
            if name in row.sites and row.sites[name].get(metric) is not None
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            color = colors.get(name) or next(extra_colors)
            metric_axes.plot(xs, ys, marker=".", alpha=0.75, color=color, label=name)
            plotted = True
            initial = [(r, y) for r, y in points if name in initial_heads.get(r, ())]
            if initial:  # not the site's model: hollow markers over the line
                xs, ys = zip(*initial, strict=True)
                metric_axes.plot(
                    xs, ys, "o", color=color, markerfacecolor="none", label=initial_label
                )
                initial_label = "_nolegend_"
    global_points = [
        (row.server_round, row.evaluate[metric])
        for row in metrics
        if row.evaluate.get(metric) is not None
    ]
    if global_points:
        xs, ys = zip(*global_points, strict=True)
        metric_axes.plot(xs, ys, marker="o", color="black", linewidth=2.5, label="global")
        plotted = True
    label = metric_label(metric)
    metric_axes.set_title(f"{label} per round")
    metric_axes.set_xlabel("Round")
    metric_axes.set_ylabel(label)
    metric_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if plotted:
        metric_axes.legend(fontsize="small")
    else:
        metric_axes.text(
            0.5, 0.5, f"no {label} recorded", ha="center", transform=metric_axes.transAxes
        )

    target = Path(path)
    figure.savefig(target, dpi=110)
    return target


# -- entry points ----------------------------------------------------------------------------


def render_report(run_dir: str | os.PathLike[str], *, metric: str | None = None) -> Path:
    """Re-render ``report.md`` and ``privacy.png`` in ``run_dir`` from its JSON files."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise ReportInputError(f"{folder}: not a directory; pass the run folder")
    sites = load_privacy(folder / PRIVACY_FILE)
    metrics = load_metrics(folder / METRICS_FILE)
    run = parse_run_facts(_read_json(folder / METRICS_FILE), source=str(folder / METRICS_FILE))
    render_plot(sites, metrics, folder / PLOT_FILE, metric=metric)
    return write_text_atomic(
        folder / REPORT_FILE, render_markdown(sites, metrics, plot_name=PLOT_FILE, run=run)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.privacy.report",
        description=f"Render {REPORT_FILE} and {PLOT_FILE} from a run folder's "
        f"{PRIVACY_FILE} and {METRICS_FILE}.",
    )
    parser.add_argument("run_dir", help="the run folder")
    parser.add_argument(
        "--metric",
        default=None,
        help="metric for the right panel (default: auc, else balanced-accuracy, accuracy, loss)",
    )
    args = parser.parse_args(argv)
    try:
        report = render_report(args.run_dir, metric=args.metric)
    except ReportInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
