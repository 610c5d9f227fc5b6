"""Which site a node is: from the SuperNode's node config, or its simulation partition id.

A site's state folder (node config ``state-dir``, or ``state-root/<site>`` in simulation) holds
what must survive a restart and never leaves the site: the privacy ledger
(:data:`LEDGER_FILE`), the last DP release (:data:`RELEASE_FILE`, re-sent if the coordinator
repeats that round with the same global model), the site's own head under head-sharing
"local" or personal read-out under "shared+local" (:data:`LOCAL_HEAD_FILES`, one file per
task, so a node that serves a classification and a segmentation study keeps both) and the full
text of errors (:data:`ERROR_LOG`, replies carry only an error id).

In an encrypted run the site's secret CKKS context is the site's too, so the node names it,
never the run config the coordinator sends to every node: node config ``he-secret-context``
when set (a SuperNode mounting the file read-only elsewhere), else ``site_secret.ctx`` in the
state folder (:meth:`SiteRef.secret_context`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import ConfigError, RunConfig

DATALIST = "dataset.json"
LEDGER_FILE = "privacy-ledger.json"
RELEASE_FILE = "last-release.safetensors"
# What a site keeps under head-sharing "local" or "shared+local", by task
# (core.federation.local_head).
LOCAL_HEAD_FILES = {
    "classification": "local-head.safetensors",
    "segmentation": "local-decoder.safetensors",
}
ERROR_LOG = "errors.log"


@dataclass(frozen=True)
class SiteRef:
    name: str
    data_dir: Path
    state_dir: Path | None = None
    he_secret_context: Path | None = None  # node config 'he-secret-context', if set

    def secret_context(self) -> Path:
        """The file holding this site's secret CKKS context (encrypted runs).

        Raises:
            ConfigError: neither the node config nor the state folder holds one, naming both.
        """
        from core.he.keys import SECRET_CONTEXT_FILE  # core.he only in encrypted runs

        path = self.he_secret_context
        if path is None and self.state_dir is not None:
            path = self.state_dir / SECRET_CONTEXT_FILE
        if path is not None and path.is_file():
            return path
        where = f"nothing at {path}" if path is not None else "no state folder"
        raise ConfigError(
            f"site {self.name}: an encrypted run (he = true) needs the site's secret context, "
            f"and there is {where}. Put the {SECRET_CONTEXT_FILE} the coordinator provisioned "
            "(mode 600) in the site's state folder (node config 'state-dir'), or name it with "
            "node config 'he-secret-context=PATH'"
        )


def list_sites(cfg: RunConfig) -> list[str]:
    """Site folder names under ``data-root``: ``sites`` if given, else every folder with a
    dataset.json, sorted (so partition ids map to the same sites on every run)."""
    root = Path(cfg.data_root)
    if not cfg.data_root or not root.is_dir():
        raise ConfigError(
            f"run config 'data-root' = {cfg.data_root!r} is not a folder; generate phantom "
            "hospitals (python -m core.data.phantoms --out DIR) and pass its absolute path"
        )
    if cfg.sites:
        names = [s.strip() for s in cfg.sites.split(",") if s.strip()]
        missing = [n for n in names if not (root / n / DATALIST).is_file()]
        if missing:
            raise ConfigError(f"run config 'sites': no {DATALIST} under {root} for {missing}")
        return names
    names = sorted(p.parent.name for p in root.glob(f"*/{DATALIST}"))
    if not names:
        raise ConfigError(
            f"run config 'data-root' (--data) = {root} holds no */{DATALIST}; give it one "
            f"sub-folder per site, each with a {DATALIST} (format: core/data/README.md)"
        )
    return names


def resolve_site(cfg: RunConfig, node_config: Mapping[str, Any]) -> SiteRef:
    if "data-dir" in node_config:  # a real SuperNode
        data_dir = Path(str(node_config["data-dir"]))
        name = str(node_config.get("site-name", data_dir.name))
        state = node_config.get("state-dir")
        secret = node_config.get("he-secret-context")
        return SiteRef(
            name,
            data_dir,
            Path(str(state)) if state else None,
            Path(str(secret)) if secret else None,
        )
    if "partition-id" not in node_config:
        raise ConfigError(
            "node config has neither 'data-dir' (deployment: start the SuperNode with "
            "--node-config 'site-name=... data-dir=...') nor 'partition-id' (simulation)"
        )
    names = list_sites(cfg)
    partition, partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if partitions != len(names):
        raise ConfigError(
            f"the simulation has {partitions} nodes but data-root {cfg.data_root} has "
            f"{len(names)} sites; set num-supernodes={len(names)} in the federation config"
        )
    name = names[partition]
    state_dir = Path(cfg.state_root) / name if cfg.state_root else None
    return SiteRef(name, Path(cfg.data_root) / name, state_dir)
