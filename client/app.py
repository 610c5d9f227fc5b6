"""The hospital's Flower ClientApp: parse the message, call ``core.federation.rounds``, reply.

A site is named by the SuperNode's ``--node-config`` in deployment (``site-name``, ``data-dir``,
optional ``state-dir`` for the privacy ledger and the last release on disk, optional
``policy-*`` keys) and by its partition id in simulation (the sorted site folders under run
config ``data-root``; state in ``state-root/<site>``). The site's policy
(``core.federation.policy``) is checked before any data is touched; only the metrics it allows
leave (never the training loss under DP); an exception leaves as a category and an error id.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from torch import Tensor

from core.config import ConfigError, RunConfig
from core.data.errors import DatasetError
from core.federation.policy import (
    SitePolicy,
    check_run,
    load_policy,
    release_manifest,
    released_metrics,
)
from core.federation.protocol import (
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
)
from core.federation.rounds import Release, evaluate_round, train_round
from core.federation.sites import ERROR_LOG, LEDGER_FILE, RELEASE_FILE, SiteRef, resolve_site
from core.io import write_bytes_atomic, write_json_atomic
from core.model.checkpoint import BackboneError
from core.privacy.ledger import PrivacyError

app = ClientApp()
log = logging.getLogger(__name__)
LEDGER_KEY = "privacy-ledger"
RELEASE_KEY = "last-release"
# Fault injection for the fault-tolerance tests: "crash:SITE" makes that site's ClientApp fail
# mid-round; "nan:SITE" makes it send a NaN update; "tamper:SITE" flips bytes of its first
# ciphertext (HE mode). Comma-separated; unset in normal use.
FAULT_ENV = "FEDMEDVIT_FAULT"
HE_LAYOUT_KEY = "he-layout"  # the server's keys (server.he_strategy), repeated: no import
HE_TOTAL_KEY = "he-total"


def _global_adapters(msg: Message, cfg: RunConfig) -> dict[str, Tensor]:
    """The global adapters: plaintext, or the server's encrypted sum decrypted and averaged."""
    config = msg.content["config"]
    if not (cfg.he and HE_TOTAL_KEY in config):
        return msg.content["arrays"].to_torch_state_dict()
    from core.federation.protocol import arrays_to_ciphertexts
    from core.he.ckks import CkksLayout, decrypt_average, load_secret_context

    secret = load_secret_context(cfg.he_secret_context)
    ciphertexts = arrays_to_ciphertexts({k: v.numpy() for k, v in msg.content["arrays"].items()})
    layout = CkksLayout.from_json(str(config[HE_LAYOUT_KEY]))
    return decrypt_average(ciphertexts, int(config[HE_TOTAL_KEY]), layout, secret)


def _encrypted(
    adapters: dict[str, Tensor], num_examples: int, cfg: RunConfig
) -> tuple[ArrayRecord, str]:
    from core.federation.protocol import ciphertexts_to_arrays
    from core.he.ckks import encrypt_update, load_secret_context

    update = encrypt_update(adapters, num_examples, load_secret_context(cfg.he_secret_context))
    record = ArrayRecord(
        {k: Array(v) for k, v in ciphertexts_to_arrays(update.ciphertexts).items()}
    )
    return record, update.layout.to_json()


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
    record = context.state.config_records.get(RELEASE_KEY)
    if record is not None:
        return Release.from_bytes(bytes(record["bytes"]), source="node state")  # type: ignore[arg-type]
    if site.state_dir is not None and (site.state_dir / RELEASE_FILE).is_file():
        path = site.state_dir / RELEASE_FILE
        return Release.from_bytes(path.read_bytes(), source=str(path))
    return None


def _save_release(context: Context, site: SiteRef, release: Release) -> None:
    """Kept before the ledger is saved and the reply sent: a re-sent round finds it."""
    data = release.to_bytes()
    context.state[RELEASE_KEY] = ConfigRecord({"bytes": data})
    if site.state_dir is not None:
        site.state_dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(site.state_dir / RELEASE_FILE, data, mode=0o600)


def _faults(site: str) -> set[str]:
    entries = [e.split(":", 1) for e in os.environ.get(FAULT_ENV, "").split(",") if ":" in e]
    return {kind for kind, name in entries if name == site}


def _error_category(err: BaseException) -> str:
    if isinstance(err, DatasetError | OSError):
        return "data"
    if isinstance(err, BackboneError):
        return "backbone"
    if isinstance(err, ConfigError | PrivacyError):
        return "configuration"
    if type(err).__module__.startswith("core.he"):
        return "encryption"
    return "internal"


def guarded(
    handler: Callable[[Message, Context], Message],
) -> Callable[[Message, Context], Message]:
    """Run a handler; an exception leaves the site as a category and an error id only.

    Exception texts name files (often after patients) and absolute paths, and Flower would
    send them to the server verbatim. The full text and traceback go to the site's own log
    (and ``errors.log`` in its state folder), keyed by the error id the reply carries.
    """

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:
            error_id = secrets.token_hex(6)
            category = _error_category(err)
            text = "".join(traceback.format_exception(err))
            log.error("site error %s (%s): %s", error_id, category, text)
            state_dir = _state_dir_or_none(context)
            if state_dir is not None:
                state_dir.mkdir(parents=True, exist_ok=True)
                with (state_dir / ERROR_LOG).open("a", encoding="utf-8") as handle:
                    handle.write(f"--- error {error_id} ({category})\n{text}\n")
            reason = (
                f"{category} error at the site, error id {error_id}; the full text stays in the "
                "site's local log"
            )
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)

    return wrapper


def _state_dir_or_none(context: Context) -> Path | None:
    """The site's state folder for the error log, if the site can still be resolved."""
    try:
        cfg = RunConfig.from_flat(context.run_config)
        return resolve_site(cfg, context.node_config).state_dir
    except Exception:  # the error being reported may be this one: log to the process only
        return None


def _site_statement(cfg: RunConfig, policy: SitePolicy, ledger: dict | None) -> str:
    """The reply's privacy statement (protocol.PRIVACY_LEDGER): the ledger with the site's
    policy and what its replies release, for the run's privacy report."""
    if ledger is None:
        return ""
    released = release_manifest(cfg, policy)
    return json.dumps({**ledger, "policy": policy.to_dict(), "released": released})


@app.train()
@guarded
def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_flat(context.run_config)
    site = resolve_site(cfg, context.node_config)
    policy = load_policy(site.data_dir, context.node_config)
    faults = _faults(site.name)
    if "crash" in faults:
        raise RuntimeError(f"fault injection: site {site.name} dies mid-round")
    config = msg.content[CONFIG]
    outcome = train_round(
        cfg,
        site_dir=site.data_dir,
        global_adapters=_global_adapters(msg, cfg),
        server_round=int(config[SERVER_ROUND]),
        expected_fingerprint=str(config.get(BACKBONE_FINGERPRINT, "")),
        ledger_state=_load_ledger(context, site),
        policy=policy,
        last_release=_load_release(context, site) if cfg.dp else None,
    )
    if outcome.release is not None:
        _save_release(context, site, outcome.release)
    if outcome.ledger is not None:
        _save_ledger(context, site, outcome.ledger)
    if "nan" in faults and outcome.adapters is not None:
        outcome.adapters = {
            k: torch.full_like(v, float("nan")) for k, v in outcome.adapters.items()
        }
    metrics = released_metrics(cfg, policy, outcome.metrics)
    content = RecordDict(
        {
            METRICS: MetricRecord(metrics),
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
    if outcome.adapters is not None and cfg.he:
        count = int(outcome.metrics["num-examples"])
        content["arrays"], content["site"][HE_LAYOUT_KEY] = _encrypted(outcome.adapters, count, cfg)
        if "tamper" in faults:
            first = sorted(content["arrays"])[0]
            raw = content["arrays"][first].numpy().copy()
            raw[len(raw) // 2 :] ^= 0xFF
            content["arrays"][first] = Array(raw)
    elif outcome.adapters is not None:
        content["arrays"] = ArrayRecord(outcome.adapters)
    return Message(content=content, reply_to=msg)


@app.evaluate()
@guarded
def evaluate(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_flat(context.run_config)
    site = resolve_site(cfg, context.node_config)
    policy = load_policy(site.data_dir, context.node_config)
    refusal = check_run(cfg, policy, None)
    info = ConfigRecord({SITE_NAME: site.name})
    if refusal:
        info[SITE_STATUS], info[SITE_REASON] = REFUSED, refusal
        return Message(content=RecordDict({SITE: info}), reply_to=msg)
    config = msg.content[CONFIG]
    metrics = evaluate_round(
        cfg,
        site_dir=site.data_dir,
        global_adapters=_global_adapters(msg, cfg),
        expected_fingerprint=str(config.get(BACKBONE_FINGERPRINT, "")),
    )
    content = RecordDict(
        {METRICS: MetricRecord(released_metrics(cfg, policy, metrics)), SITE: info}
    )
    return Message(content=content, reply_to=msg)
