"""A site's own privacy policy: the minimum it insists on, whatever the coordinator's run config.

The coordinator writes the run config; a hospital signs off on its own minimum. Before a site
touches any data it checks the run config against its policy (:func:`check_run`) and refuses
the round with the reason when the run is weaker; after planning DP it checks the calibrated
noise (:func:`check_noise`). The policy also decides which metrics may leave the site
(:func:`released_metrics`); what leaves is listed by :func:`release_manifest`, each item
marked covered or not by the site's epsilon guarantee, for the privacy report.

Where a policy comes from (:func:`load_policy`):

- a TOML file ``policy.toml`` in the site's data folder (simulation and deployment)::

      require-dp = true
      require-he = true
      max-epsilon = 8.0
      min-noise-multiplier = 0.8
      max-rounds = 20
      allowed-metrics = ["num-examples", "auc"]

- the SuperNode's node config (deployment), the same keys prefixed ``policy-``, e.g.
  ``--node-config 'data-dir=... policy-require-he=true policy-max-epsilon=4.0'``
  (``policy-allowed-metrics`` is comma-separated). A node-config key overrides the file's.

No policy file and no keys: the site follows the run config (the coordinator decides), and only
the default metric release applies: under HE only the example count leaves (beside the
ciphertexts and the ledger); under DP the training loss never leaves.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.config import ConfigError, RunConfig
from core.federation.local_head import local_part_name
from core.federation.protocol import EPSILON, LOCAL_HEAD, NUM_EXAMPLES, TRAIN_LOSS
from core.training.loops import EVAL_METRICS, SEGMENTATION_METRICS

POLICY_FILE = "policy.toml"
NODE_PREFIX = "policy-"
# The averaging weight: the server cannot weight an update (or an evaluation) without it.
WEIGHT_METRIC = NUM_EXAMPLES
# Training metrics computed from the data outside the DP mechanism: never sent under DP.
UNNOISED_TRAIN_METRICS = (TRAIN_LOSS,)
# Metrics derived from the site's ledger and plan; the ledger itself travels beside them.
LEDGER_METRICS = (EPSILON, "delta", "noise-multiplier", "sample-rate", "steps")


class PolicyError(ConfigError):
    """A site policy file or node-config key that is malformed; names the source and key."""


@dataclass(frozen=True)
class SitePolicy:
    """What a site requires of any run it joins (None / empty = no requirement).

    ``max_epsilon``: the largest target epsilon the site accepts (so DP is required too).
    ``min_noise_multiplier``: the smallest calibrated DP noise it trains with.
    ``max_rounds``: the last server round it trains. ``allowed_metrics``: the metric names
    that may leave the site (None = the default release for the run's mode).
    """

    require_dp: bool = False
    require_he: bool = False
    max_epsilon: float | None = None
    min_noise_multiplier: float | None = None
    max_rounds: int | None = None
    allowed_metrics: tuple[str, ...] | None = None
    source: str = "none (the run config decides)"

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as it appears in the site's reply and the privacy report."""
        data = asdict(self)
        if self.allowed_metrics is not None:
            data["allowed_metrics"] = list(self.allowed_metrics)
        return data


_KEYS = {
    "require-dp": bool,
    "require-he": bool,
    "max-epsilon": float,
    "min-noise-multiplier": float,
    "max-rounds": int,
    "allowed-metrics": list,
}


def _value(key: str, raw: Any, source: str) -> Any:
    kind = _KEYS[key]
    if kind is bool and isinstance(raw, str) and raw.lower() in ("true", "false"):
        return raw.lower() == "true"  # node config values may arrive as strings
    if kind is list and isinstance(raw, str):
        return tuple(name.strip() for name in raw.split(",") if name.strip())
    if kind is list and isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        return tuple(raw)
    if kind is bool and isinstance(raw, bool):
        return raw
    if kind is int and isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
        return raw
    if (
        kind is float
        and isinstance(raw, int | float)
        and not isinstance(raw, bool)
        and math.isfinite(raw)
        and raw > 0
    ):
        return float(raw)
    expected = {
        bool: "true or false",
        int: "an integer >= 1",
        float: "a finite number > 0",
        list: "a list of metric names (comma-separated in node config)",
    }[kind]
    raise PolicyError(f"site policy {source}: '{key}' must be {expected}, got {raw!r}")


def parse_policy(values: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """Validated policy fields (snake_case) from kebab-case keys; unknown keys raise."""
    fields: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in _KEYS:
            raise PolicyError(
                f"site policy {source}: unknown key '{key}'; valid keys: {sorted(_KEYS)}"
            )
        fields[key.replace("-", "_")] = _value(key, raw, source)
    return fields


def load_policy(data_dir: str | Path, node_config: Mapping[str, Any]) -> SitePolicy:
    """The site's policy: ``<data_dir>/policy.toml``, then ``policy-*`` node-config keys.

    Raises :class:`PolicyError` naming the file or key when a value is malformed.
    """
    fields: dict[str, Any] = {}
    sources = []
    path = Path(data_dir) / POLICY_FILE
    if path.is_file():
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise PolicyError(f"site policy {path}: not valid TOML ({err})") from err
        fields |= parse_policy(document, source=str(path))
        sources.append(str(path))
    node_keys = {
        key.removeprefix(NODE_PREFIX): value
        for key, value in node_config.items()
        if str(key).startswith(NODE_PREFIX)
    }
    if node_keys:
        fields |= parse_policy(node_keys, source="node config")
        sources.append("node config")
    if not sources:
        return SitePolicy()
    return SitePolicy(**fields, source=" + ".join(sources))


def check_run(cfg: RunConfig, policy: SitePolicy, server_round: int | None) -> str:
    """Why the site refuses this run config (or this round), "" when it complies.

    Checked before the site opens any data. ``server_round`` None: an evaluation, which
    trains nothing, so ``max_rounds`` does not apply.
    """
    problems = []
    if policy.require_dp and not cfg.dp:
        problems.append("the site requires DP (require-dp) but the run config has dp=false")
    if policy.require_he and not cfg.he:
        problems.append("the site requires HE (require-he) but the run config has he=false")
    if policy.max_epsilon is not None:
        if not cfg.dp:
            problems.append(
                f"the site allows at most epsilon {policy.max_epsilon:g} (max-epsilon) but the "
                "run config has dp=false (no bound at all)"
            )
        elif cfg.target_epsilon > policy.max_epsilon:
            problems.append(
                f"the run config's target-epsilon {cfg.target_epsilon:g} is above the site's "
                f"max-epsilon {policy.max_epsilon:g}"
            )
    rounds = policy.max_rounds
    if rounds is not None and server_round is not None and server_round > rounds:
        problems.append(f"round {server_round} is past the site's max-rounds {rounds}")
    if not problems:
        return ""
    return f"site policy ({policy.source}) refuses the run: " + "; ".join(problems)


def check_noise(policy: SitePolicy, noise_multiplier: float) -> str:
    """Why the site refuses DP with this calibrated noise, "" when it complies."""
    floor = policy.min_noise_multiplier
    if floor is None or noise_multiplier >= floor:
        return ""
    return (
        f"site policy ({policy.source}) refuses the run: the calibrated noise multiplier "
        f"{noise_multiplier:.4f} is below the site's min-noise-multiplier {floor:g}; lower the "
        "run's target-epsilon or plan fewer rounds"
    )


def default_metrics(cfg: RunConfig, names: Sequence[str]) -> tuple[str, ...]:
    """What leaves without a policy list: under HE only the weight; under DP no unnoised
    training metric; otherwise everything."""
    if cfg.he:
        return (WEIGHT_METRIC,)
    if cfg.dp:
        return tuple(n for n in names if n not in UNNOISED_TRAIN_METRICS)
    return tuple(names)


def released_metrics(
    cfg: RunConfig, policy: SitePolicy, metrics: Mapping[str, float]
) -> dict[str, float]:
    """The metrics that may leave the site: the policy's list (or the default for the mode),
    never an unnoised training metric under DP; the example count always (it weights the
    average and is needed for any reply the server can use); the local-head flag whenever
    another evaluation number leaves (it says which head that number comes from, a fact about
    the site's model, not its data)."""
    allowed = set(
        default_metrics(cfg, list(metrics))
        if policy.allowed_metrics is None
        else policy.allowed_metrics
    )
    allowed.add(WEIGHT_METRIC)
    if cfg.dp:
        allowed -= set(UNNOISED_TRAIN_METRICS)
    released = {name: value for name, value in metrics.items() if name in allowed}
    if LOCAL_HEAD in metrics and set(released) - {WEIGHT_METRIC, LOCAL_HEAD}:
        released[LOCAL_HEAD] = metrics[LOCAL_HEAD]
    return released


def release_manifest(cfg: RunConfig, policy: SitePolicy) -> list[dict[str, Any]]:
    """What this site's replies carry under ``policy``, each item marked covered (or not) by
    the epsilon guarantee: the privacy report's "what left the site".

    Only the DP-trained update is covered; the example count, evaluation metrics, the ledger
    and its figures are released as they are.
    """
    form = "CKKS ciphertexts" if cfg.he else "plaintext adapters"
    note = f"{form}, DP-SGD" if cfg.dp else f"{form}, no DP"
    if cfg.keeps_local_head:
        note += (
            f"; the site's {local_part_name(cfg)} stays at the site (the reply carries "
            "the global values unchanged)"
        )
    if cfg.has_personal_head and not cfg.dp and not cfg.he:
        # Both read-outs see the same input and add their scores: equal gradients at the site.
        note += (
            "; without DP the personal head equals the sum of the shared head's changes in "
            "these replies (weight-decay 0, the default; approximately otherwise), so the "
            "coordinator can compute it"
        )
    items: list[dict[str, Any]] = [
        {"item": "adapter update", "reply": "train", "covered": cfg.dp, "note": note}
    ]
    train_names = (NUM_EXAMPLES, *LEDGER_METRICS) if cfg.dp else (TRAIN_LOSS, NUM_EXAMPLES)
    evaluated: tuple[str, ...] = (
        ("loss", *SEGMENTATION_METRICS) if cfg.task == "segmentation" else EVAL_METRICS
    )
    evaluated += (LOCAL_HEAD,) if cfg.head_sharing == "local" else ()
    for reply, names in (("train", train_names), ("evaluate", (*evaluated, NUM_EXAMPLES))):
        for name in released_metrics(cfg, policy, dict.fromkeys(names, 0.0)):
            if name in LEDGER_METRICS:
                note = "a figure of the ledger, which travels beside it"
            elif name == WEIGHT_METRIC:
                note = "example count, needed to weight the average"
            elif name == LOCAL_HEAD:
                note = "whether the site had a head of its own yet (1) or used the initial one"
            else:
                note = "computed on the site's data without noise"
            items.append({"item": f"metric {name}", "reply": reply, "covered": False, "note": note})
    if cfg.dp:
        items.append(
            {
                "item": "privacy ledger",
                "reply": "train",
                "covered": False,
                "note": "settings, plan and epsilon per round; reveals the dataset size",
            }
        )
    return items
