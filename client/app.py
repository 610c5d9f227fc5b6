"""The hospital's Flower ClientApp: parse the message, call ``core.federation.rounds``, reply.

A site is named by the SuperNode's ``--node-config`` in deployment (``site-name``, ``data-dir``,
optional ``state-dir`` for the privacy ledger and the last release on disk, optional
``he-secret-context``, else ``site_secret.ctx`` in the state folder, optional ``policy-*``
keys) and by its partition id in simulation (the sorted site folders under run config
``data-root``; state, and the secret context, in ``state-root/<site>``). The site's policy
(``core.federation.policy``) is checked before any data is touched; only the metrics it allows
leave (never the training loss under DP). Mods (``client.mods``) wrap both handlers: site
errors leave as a category and an error id; encryption (``client.he_mod``) in HE mode.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.mods import client_mods
from core.config import RunConfig
from core.federation.local_head import LocalHead
from core.federation.policy import (
    SitePolicy,
    check_run,
    load_policy,
    release_manifest,
    released_metrics,
)
from core.federation.protocol import (
    ARRAYS,
    BACKBONE_FINGERPRINT,
    CONFIG,
    METRICS,
    PRIVACY_LEDGER,
    REFUSED,
    SERVER_ROUND,
    SITE,
    SITE_NAME,
    SITE_REASON,
    SITE_STATUS,
    int_of,
)
from core.federation.rounds import Release, evaluate_round, train_round
from core.federation.sites import (
    LEDGER_FILE,
    LOCAL_HEAD_FILES,
    RELEASE_FILE,
    SiteRef,
    resolve_site,
)
from core.io import write_bytes_atomic, write_json_atomic

app = ClientApp()
log = logging.getLogger(f"flwr.{__name__}")  # under Flower's logger: its handler prints INFO
LEDGER_KEY = "privacy-ledger"
RELEASE_KEY = "last-release"


def _load_ledger(context: Context, site: SiteRef) -> dict | None:
    """The site's ledger: from node memory, else from disk (a restarted SuperNode), else none."""
    record = context.state.config_records.get(LEDGER_KEY)
    if record is not None and record.get("json"):
        return json.loads(str(record["json"]))
    if site.state_dir is not None:
        path = site.state_dir / LEDGER_FILE
        if path.is_file():
            return json.loads(path.read_text())
    return None


def _save_ledger(context: Context, site: SiteRef, ledger: dict) -> None:
    context.state[LEDGER_KEY] = ConfigRecord({"json": json.dumps(ledger)})
    if site.state_dir is not None:
        site.state_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(site.state_dir / LEDGER_FILE, ledger)


def _load_release(context: Context, site: SiteRef) -> Release | None:
    """The site's last DP release (to re-send a round): node memory, else disk, else none."""
    kept = _kept_bytes(context, RELEASE_KEY)
    if kept is not None:
        return Release.from_bytes(kept, source="node state")
    if site.state_dir is not None and (site.state_dir / RELEASE_FILE).is_file():
        path = site.state_dir / RELEASE_FILE
        return Release.from_bytes(path.read_bytes(), source=str(path))
    return None


def _save_release(context: Context, site: SiteRef, release: Release) -> None:
    """Kept before the ledger is saved and the reply sent: a re-sent round finds it."""
    _keep_bytes(context, site, RELEASE_KEY, RELEASE_FILE, release.to_bytes())


def _load_local_head(context: Context, site: SiteRef, task: str) -> LocalHead | None:
    """The head this site keeps (head-sharing "local", or "shared+local"'s personal read-out):
    node memory, else disk, else none (the first round starts from the global head). The
    round checks its provenance against the run before using it
    (``core.federation.local_head``)."""
    file_name = LOCAL_HEAD_FILES[task]
    kept = _kept_bytes(context, file_name)
    if kept is not None:
        # The same bytes as the file (written together): errors name the file to remove.
        source = str(site.state_dir / file_name) if site.state_dir else "node memory"
        return LocalHead.from_bytes(kept, source=source)
    return LocalHead.read(site.state_dir, task) if site.state_dir is not None else None


def _save_local_head(context: Context, site: SiteRef, task: str, head: LocalHead) -> None:
    """Kept before the reply is sent, like the release: the next round trains on from it."""
    file_name = LOCAL_HEAD_FILES[task]  # also its node-state key
    _keep_bytes(context, site, file_name, file_name, head.to_bytes())


def _keep_bytes(context: Context, site: SiteRef, key: str, file_name: str, data: bytes) -> None:
    """The same bytes in node memory (``context.state[key]``) and, when the site has a state
    folder, in ``file_name`` there (mode 600, written atomically)."""
    context.state[key] = ConfigRecord({"bytes": data})
    if site.state_dir is not None:
        site.state_dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(site.state_dir / file_name, data, mode=0o600)


def _kept_bytes(context: Context, key: str) -> bytes | None:
    """What :func:`_keep_bytes` put in node memory under ``key``; None when nothing is."""
    record = context.state.config_records.get(key)
    if record is None:
        return None
    value = record["bytes"]
    if not isinstance(value, bytes):
        raise ValueError(f"node state {key!r} holds {type(value).__name__}, not bytes")
    return value


def _cache_dir(site: SiteRef) -> Path | None:
    """The site's preprocessing cache: inside its own state folder, never sent anywhere."""
    return site.state_dir / "preprocess-cache" if site.state_dir is not None else None


def _site_statement(cfg: RunConfig, policy: SitePolicy, ledger: dict | None) -> str:
    """The reply's privacy statement (protocol.PRIVACY_LEDGER): the ledger with the site's
    policy and what its replies release, for the run's privacy report."""
    if ledger is None:
        return ""
    released = release_manifest(cfg, policy)
    return json.dumps({**ledger, "policy": policy.to_dict(), "released": released})


@app.train(mods=client_mods())
def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_flat(context.run_config)
    site = resolve_site(cfg, context.node_config)
    policy = load_policy(site.data_dir, context.node_config)
    config = msg.content.config_records[CONFIG]
    outcome = train_round(
        cfg,
        site_dir=site.data_dir,
        global_adapters=msg.content.array_records[ARRAYS].to_torch_state_dict(),
        server_round=int_of(config, SERVER_ROUND),
        expected_fingerprint=str(config.get(BACKBONE_FINGERPRINT, "")),
        ledger_state=_load_ledger(context, site),
        policy=policy,
        last_release=_load_release(context, site) if cfg.dp else None,
        cache_dir=_cache_dir(site),
        he_secret_context=site.secret_context() if cfg.he else None,
        local_head=_load_local_head(context, site, cfg.task) if cfg.keeps_local_head else None,
    )
    if outcome.release is not None:
        _save_release(context, site, outcome.release)
    if outcome.ledger is not None:
        _save_ledger(context, site, outcome.ledger)
    if outcome.local_head is not None:  # after the ledger: a crash loses a head, not budget
        _save_local_head(context, site, cfg.task, outcome.local_head)
    metrics = released_metrics(cfg, policy, outcome.metrics)
    content = RecordDict(
        {
            METRICS: MetricRecord(dict(metrics)),
            SITE: ConfigRecord(
                {
                    SITE_NAME: site.name,
                    SITE_STATUS: outcome.status,
                    SITE_REASON: outcome.reason,
                    PRIVACY_LEDGER: _site_statement(cfg, policy, outcome.ledger),
                }
            ),
        }
    )
    if outcome.adapters is not None:  # encrypted and tagged by he_mod in HE mode
        content[ARRAYS] = ArrayRecord(outcome.adapters)
    return Message(content=content, reply_to=msg)


@app.evaluate(mods=client_mods())
def evaluate(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_flat(context.run_config)
    site = resolve_site(cfg, context.node_config)
    policy = load_policy(site.data_dir, context.node_config)
    refusal = check_run(cfg, policy, None)
    info = ConfigRecord({SITE_NAME: site.name})
    if refusal:
        info[SITE_STATUS], info[SITE_REASON] = REFUSED, refusal
        return Message(content=RecordDict({SITE: info}), reply_to=msg)
    config = msg.content.config_records[CONFIG]
    metrics = evaluate_round(
        cfg,
        site_dir=site.data_dir,
        global_adapters=msg.content.array_records[ARRAYS].to_torch_state_dict(),
        expected_fingerprint=str(config.get(BACKBONE_FINGERPRINT, "")),
        cache_dir=_cache_dir(site),
        local_head=_load_local_head(context, site, cfg.task) if cfg.keeps_local_head else None,
    )
    content = RecordDict(
        {METRICS: MetricRecord(dict(released_metrics(cfg, policy, metrics))), SITE: info}
    )
    return Message(content=content, reply_to=msg)
