"""The hospital's Flower ClientApp: parse the message, call ``core.federation.rounds``, reply.

A site is named by the SuperNode's ``--node-config`` in deployment (``site-name``, ``data-dir``,
optional ``state-dir`` for the privacy ledger and the site's secret DP seed on disk) and by its
partition id in simulation (the sorted site folders under run config ``data-root``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.he_mod import he_mod
from core.config import RunConfig
from core.federation.rounds import evaluate_round, train_round
from core.federation.sites import SiteRef, resolve_site
from core.io import write_json_atomic

app = ClientApp()
log = logging.getLogger(__name__)
LEDGER_KEY = "privacy-ledger"
SECRET_KEY = "site-secret"
# Fault injection for the fault-tolerance tests: "crash:SITE" makes that site's ClientApp fail
# mid-round; "nan:SITE" makes it send a NaN update; "tamper:SITE" flips bytes of its first
# ciphertext (HE mode, in client.he_mod). Comma-separated; unset in normal use.
FAULT_ENV = "FEDMEDVIT_FAULT"


def _load_ledger(context: Context, site: SiteRef) -> dict | None:
    """The site's ledger: from node memory, else from disk (a restarted SuperNode), else none."""
    record = context.state.config_records.get(LEDGER_KEY)
    if record is not None and record.get("json"):
        return json.loads(str(record["json"]))
    if site.state_dir is not None:
        path = site.state_dir / "privacy-ledger.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


def _save_ledger(context: Context, site: SiteRef, ledger: dict) -> None:
    context.state[LEDGER_KEY] = ConfigRecord({"json": json.dumps(ledger)})
    if site.state_dir is not None:
        site.state_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(site.state_dir / "privacy-ledger.json", ledger)


def _site_secret(context: Context, site: SiteRef) -> int:
    """The site's secret seed for DP sampling and noise (see
    ``core.federation.rounds.train_round``): drawn once from the OS, kept in node memory and
    in the state folder (mode 0600), never sent."""
    record = context.state.config_records.get(SECRET_KEY)
    if record is not None:
        return int(str(record["value"]))
    path = site.state_dir / "site-secret" if site.state_dir is not None else None
    if path is not None and path.is_file():
        secret = int(path.read_text().strip())
    else:
        secret = secrets.randbits(62)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(f"{secret}\n")
    context.state[SECRET_KEY] = ConfigRecord({"value": str(secret)})
    return secret


def _cache_dir(site: SiteRef) -> Path | None:
    """The site's preprocessing cache: inside its own state folder, never sent anywhere."""
    return site.state_dir / "preprocess-cache" if site.state_dir is not None else None


def _faults(site: str) -> set[str]:
    entries = [e.split(":", 1) for e in os.environ.get(FAULT_ENV, "").split(",") if ":" in e]
    return {kind for kind, name in entries if name == site}


@app.train(mods=[he_mod])
def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_flat(context.run_config)
    site = resolve_site(cfg, context.node_config)
    faults = _faults(site.name)
    if "crash" in faults:
        raise RuntimeError(f"fault injection: site {site.name} dies mid-round")
    config = msg.content["config"]
    outcome = train_round(
        cfg,
        site_dir=site.data_dir,
        global_adapters=msg.content["arrays"].to_torch_state_dict(),
        server_round=int(config["server-round"]),
        expected_fingerprint=str(config.get("backbone-fingerprint", "")),
        ledger_state=_load_ledger(context, site),
        site_secret=_site_secret(context, site),
        cache_dir=_cache_dir(site),
    )
    if outcome.ledger is not None:
        _save_ledger(context, site, outcome.ledger)
    if "nan" in faults and outcome.adapters is not None:
        outcome.adapters = {
            k: torch.full_like(v, float("nan")) for k, v in outcome.adapters.items()
        }
    content = RecordDict(
        {
            "metrics": MetricRecord(outcome.metrics),
            "site": ConfigRecord(
                {
                    "name": site.name,
                    "status": outcome.status,
                    "reason": outcome.reason,
                    LEDGER_KEY: json.dumps(outcome.ledger) if outcome.ledger else "",
                }
            ),
        }
    )
    if outcome.adapters is not None:  # encrypted and tagged by he_mod in HE mode
        content["arrays"] = ArrayRecord(outcome.adapters)
    return Message(content=content, reply_to=msg)


@app.evaluate(mods=[he_mod])
def evaluate(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_flat(context.run_config)
    site = resolve_site(cfg, context.node_config)
    config = msg.content["config"]
    metrics = evaluate_round(
        cfg,
        site_dir=site.data_dir,
        global_adapters=msg.content["arrays"].to_torch_state_dict(),
        expected_fingerprint=str(config.get("backbone-fingerprint", "")),
        cache_dir=_cache_dir(site),
    )
    content = RecordDict(
        {"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})}
    )
    return Message(content=content, reply_to=msg)
