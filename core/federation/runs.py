"""A finished run's folder read back at a site (``fedmedvit explain``, ``fedmedvit decrypt``).

The coordinator writes the folder (``server.run_files``): the run config (:data:`CONFIG_FILE`)
and, after every round, :data:`LATEST` under :data:`CHECKPOINTS` with the fingerprint of the
backbone the rounds announced. The backbone itself is the file the run config names
('backbone'), read from wherever it is at the site now. Another file there (pretrained again,
imported again, another size) builds a model the run's adapters and heads were never trained
on, and may well load without an error; so :func:`build_run_model` refuses a backbone whose
fingerprint is not the one the run recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from core.config import RunConfig
from core.federation.rounds import build_lora_model, recorded_before_config_fingerprints
from core.model.checkpoint import BackboneError

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"  # in CHECKPOINTS: round, backbone fingerprint, strategy state


def read_run_config(run_dir: Path) -> RunConfig:
    """The run config as the run folder recorded it (``RunConfig.from_record``)."""
    return RunConfig.from_record(json.loads((run_dir / CONFIG_FILE).read_text()))


def recorded_fingerprint(run_dir: Path) -> str:
    """The backbone fingerprint the run's rounds used.

    Raises:
        BackboneError: the folder records none (no round finished, or a partial copy).
    """
    latest = run_dir / CHECKPOINTS / LATEST
    try:
        return str(json.loads(latest.read_text())["backbone_fingerprint"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BackboneError(
            f"{latest} does not record the run's backbone fingerprint ({err}), so the backbone "
            "cannot be checked against the run; copy the whole run folder, checkpoints included"
        ) from err


def build_run_model(run_dir: Path) -> tuple[RunConfig, nn.Module, str]:
    """(run config, model with fresh adapters and head, backbone fingerprint) for a past run,
    on the backbone the run used.

    Raises:
        BackboneError: the backbone file (run config 'backbone', or the seeded backbone) has
            another fingerprint than the run recorded, naming both and the file.
        ConfigError: the folder's config.json is not a valid run config.
    """
    cfg = read_run_config(run_dir)
    recorded = recorded_fingerprint(run_dir)
    model, digest = build_lora_model(cfg)
    if digest != recorded and not recorded_before_config_fingerprints(cfg, recorded):
        backbone = (
            f"backbone file {cfg.backbone}"
            if cfg.backbone
            else f"the seeded backbone (backbone-seed {cfg.backbone_seed}, {cfg.model_size})"
        )
        raise BackboneError(
            f"{backbone} has fingerprint {digest}, but run {run_dir} was trained on backbone "
            f"{recorded} ({CHECKPOINTS}/{LATEST}); its adapters and heads mean nothing on "
            "another backbone. Put the run's backbone file at that path (run config 'backbone' "
            f"in {CONFIG_FILE})"
        )
    return cfg, model, digest
