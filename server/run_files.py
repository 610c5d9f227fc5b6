"""The run folder: metrics, privacy report, per-round checkpoints and the final adapters.

Layout (``out-dir``)::

    config.json                 the validated run config
    metrics.json                per round: aggregated train/eval metrics, per-site metrics, events,
                                wall time in seconds (train, evaluate, round)
    privacy.json, report.md, privacy.png    the privacy-budget report (core.privacy.report)
    checkpoints/round-NNN.safetensors       global adapters after round NNN
    checkpoints/latest.json     round, fingerprint, strategy state: what a resumed server needs
    adapters/                   final global adapters in peft format (plaintext runs only)
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.adapters.lora import load_adapter_state, save_adapters, update_problems
from core.config import ConfigError, RunConfig
from core.federation.local_head import local_part_name
from core.federation.rounds import build_lora_model
from core.federation.runs import CHECKPOINTS, CONFIG_FILE, LATEST
from core.federation.sites import LOCAL_HEAD_FILES
from core.io import atomic_path, write_json_atomic, write_text_atomic
from core.privacy.ledger import PrivacyLedger
from core.privacy.report import render_report, write_metrics_json, write_privacy_json
from server.strategy import AdapterFedAvg, RoundLog


def adapters_readme(cfg: RunConfig, fingerprint: str) -> str:
    """What a final adapters folder holds and how to use it, for whoever receives it."""
    privacy = (
        f"DP-SGD at each site (target epsilon {cfg.target_epsilon:g}, delta {cfg.target_delta:g}; "
        "the epsilon each site spent is in ../report.md)"
        if cfg.dp
        else "without differential privacy"
    )
    part = local_part_name(cfg)
    kept = (
        f"Each site trained and kept its own {part} (head-sharing = {cfg.head_sharing}): the "
        f"{part} here is the average of what the replies carried there (honest sites send the "
        f"initial one back; no site starts from it); a site loads its own from "
        f"`{LOCAL_HEAD_FILES[cfg.task]}` in its state folder (in Python, read it with "
        "`core.federation.local_head.LocalHead.read` and load it after the adapters with "
        "`with_local_head`, which checks that it was trained for this run; `fedmedvit explain` "
        "does this for a classifier)."
    )
    head = {
        "shared": f"The {part} was averaged with the adapters.",
        "local": kept,
        "shared+local": "The head's shared read-out (`head.fc`) was averaged with the adapters, "
        f"and each site adds the scores of its personal read-out (`head.personal`). {kept}",
    }[cfg.head_sharing]
    return f"""# Federated LoRA adapters (fedmedvit)

LoRA adapters ({cfg.lora_mode} mode, rank {cfg.lora_rank}, targets {cfg.lora_targets!r}) and a
{cfg.num_classes}-class head for the `{cfg.model_size}` universal ViT, averaged over the sites
with FedAvg for {cfg.num_server_rounds} rounds, trained {privacy}. {head}

They only work on the backbone with SHA-256 fingerprint

    {fingerprint}

(run config `backbone` = `{cfg.backbone or "<seeded>"}`); the run's `config.json` has every
setting. Files: `adapter_model.safetensors` and `adapter_config.json` (peft's format).

Use at a site: `fedmedvit explain RUN_DIR --site-dir SITE --out DIR` (overlays of where the model
looks), or in Python `core.federation.rounds.build_lora_model(cfg)` then
`core.adapters.lora.load_adapter_folder(model, this_folder)`.
"""


def head_sharing_fact(cfg: RunConfig) -> str:
    """Where the run's heads went, as the privacy report's summary line is keyed
    (``core.privacy.report.HEAD_SHARING_LINES``): the run's head-sharing, "-decoder" added
    for a segmentation run (its head is the decoder and segmentation head)."""
    sharing = cfg.head_sharing
    return sharing if cfg.task == "classification" else f"{sharing}-decoder"


# Run-config keys that shape the adapter wire format (what a checkpoint holds).
# (model-size is not one: the backbone's fingerprint, checked first, covers the architecture.)
WIRE_FORMAT_KEYS = (
    "he",
    "task",
    "num-classes",
    "head-pool",
    "head-sharing",
    "lora-rank",
    "lora-mode",
    "lora-targets",
    "decoder-features",
)


class RunFolder:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.checkpoints = self.root / CHECKPOINTS
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.planned_rounds = 0  # the run config's num-server-rounds, set by write_config
        self.head_sharing = ""  # head_sharing_fact of the run, set by write_config

    def write_config(self, cfg: RunConfig) -> None:
        write_json_atomic(self.root / CONFIG_FILE, cfg.to_flat())
        self.planned_rounds = cfg.num_server_rounds
        self.head_sharing = head_sharing_fact(cfg)

    def save_round(
        self, server_round: int, adapters: dict[str, torch.Tensor], strategy: AdapterFedAvg
    ) -> None:
        """Everything needed to resume after ``server_round``, written atomically."""
        path = self.checkpoints / f"round-{server_round:03d}.safetensors"
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in adapters.items()}, str(tmp))
        state = {
            "round": server_round,
            "adapters": path.name,
            "backbone_fingerprint": strategy.backbone_fingerprint,
            "rounds": [r.to_json() for _, r in sorted(strategy.rounds.items())],
            "ledgers": strategy.ledgers,
            "strategy": strategy.extra_state(),
        }
        write_json_atomic(self.checkpoints / LATEST, state)
        self.write_reports(strategy)

    def resume_problem(
        self, cfg: RunConfig, saved: dict[str, torch.Tensor], current: dict[str, torch.Tensor]
    ) -> str:
        """Why this folder's checkpoint (``saved``) cannot continue under ``cfg``, whose
        initial adapters are ``current``; "" when it can. A run resumed under another
        head-sharing, LoRA rank, targets or mode (an upgrade that changed a default, a changed
        --run-config) would start from a global model its sites refuse, with an error about
        their own files. Checked against the folder's ``config.json`` (call before
        :meth:`write_config` replaces it) and, for a plaintext run, key for key and shape for
        shape against the checkpoint (an HE checkpoint holds ciphertexts)."""
        recorded = self.root / CONFIG_FILE
        problems, fixes = [], []
        if recorded.is_file():
            # Only the wire-format keys are read back (with from_record's rules for old
            # folders): another key an older version accepted must not stop a resume.
            raw = json.loads(recorded.read_text())
            keys = (*WIRE_FORMAT_KEYS, "he-public-context")
            try:
                before = RunConfig.from_record({k: raw[k] for k in keys if k in raw}).to_flat()
            except ConfigError as err:
                return f"cannot resume {self.root}: its {CONFIG_FILE} is not readable ({err})"
            now = cfg.to_flat()
            differing = [key for key in WIRE_FORMAT_KEYS if before[key] != now[key]]
            problems += [f"{k} = {before[k]!r} there, {now[k]!r} now" for k in differing]
            fixes += [f"{k}={json.dumps(before[k])}" for k in differing]
        if not cfg.he:
            # The check every reply passes (keys, shapes, finite float values), the checkpoint
            # standing in for a reply to this config's initial adapters.
            found = update_problems(saved, current)
            problems += [f"checkpoint: {p}" for p in found[:3]]
            if len(found) > 3:
                problems.append(f"and {len(found) - 3} more checkpoint problems")
        if not problems:
            return ""
        header = f"cannot resume {self.root} under this run configuration ({'; '.join(problems)})"
        if fixes:
            return (
                f"{header}. Resume with {' '.join(fixes)} (simulations.run: --set KEY=VALUE "
                "each; flwr run: --run-config), or start a new run folder (out-dir)"
            )
        return (
            f"{header}. The checkpoint was written under other settings or is damaged: resume "
            f"with the settings in {recorded}, or start a new run folder (out-dir)"
        )

    def load_latest(self) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
        latest = self.checkpoints / LATEST
        if not latest.is_file():
            return None
        state = json.loads(latest.read_text())
        adapters = load_file(str(self.checkpoints / state["adapters"]))
        return int(state["round"]), adapters, state

    @staticmethod
    def restore_strategy(strategy: AdapterFedAvg, state: dict[str, Any]) -> None:
        strategy.rounds = {int(r["round"]): RoundLog(**r) for r in state["rounds"]}
        strategy.ledgers = dict(state["ledgers"])
        strategy.load_extra_state(state.get("strategy", {}))

    def write_reports(self, strategy: AdapterFedAvg) -> None:
        rounds = [r.to_json() for _, r in sorted(strategy.rounds.items())]
        run = {
            "run": self.root.name,
            "backbone_fingerprint": strategy.backbone_fingerprint,
            "num_server_rounds": self.planned_rounds,
            **({"head_sharing": self.head_sharing} if self.head_sharing else {}),
            "updated_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        }
        write_metrics_json(self.root, {"run": run, "rounds": rounds})
        if strategy.ledgers:
            # A site's statement is its ledger plus the policy and release list it stated;
            # the report shows them as sent (core.federation.protocol.PRIVACY_LEDGER).
            ledgers = {
                name: PrivacyLedger.from_dict(data, source=f"ledger of {name}")
                for name, data in sorted(strategy.ledgers.items())
            }
            write_privacy_json(self.root, ledgers, disclosures=strategy.ledgers)
            render_report(self.root)

    def save_final_adapters(self, cfg: RunConfig, adapters: dict[str, torch.Tensor]) -> Path:
        """The final adapters in peft's folder format, with a README saying what they are
        (in place of peft's empty model-card template)."""
        model, fingerprint = build_lora_model(cfg)
        load_adapter_state(model, adapters)
        folder = save_adapters(model, self.root / "adapters")
        write_text_atomic(folder / "README.md", adapters_readme(cfg, fingerprint))
        return folder
