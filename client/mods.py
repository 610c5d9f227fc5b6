"""Cross-cutting ClientApp behaviour as Flower mods ``(msg, context, call_next) -> Message``.

``site_errors_mod`` (always first): an exception anywhere below it leaves the site as a
category and an error id only. Exception texts name files (often after patients) and absolute
paths, and Flower would send them to the server verbatim; the full text and traceback go to the
site's own log and to ``errors.log`` in its state folder, keyed by the error id.

``fault_injection_mod`` (only when ``FEDMEDVIT_FAULT`` is set, for the fault-tolerance tests):
``crash:SITE`` makes that site's handler fail, ``nan:SITE`` makes it send a NaN update,
``tamper:SITE`` flips bytes of its first ciphertext (HE mode). Comma-separated.
"""

from __future__ import annotations

import logging
import os
import secrets
import traceback
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.clientapp.typing import Mod as ClientAppMod
from flwr.common.constant import ErrorCode

from client.he_mod import he_mod
from core.config import ConfigError, RunConfig
from core.data.errors import DatasetError
from core.federation import protocol as P
from core.federation.sites import ERROR_LOG, resolve_site
from core.model.checkpoint import BackboneError
from core.privacy.errors import PrivacyError

log = logging.getLogger(f"flwr.{__name__}")  # under Flower's logger: its handler prints INFO
FAULT_ENV = "FEDMEDVIT_FAULT"


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


def _state_dir_or_none(context: Context) -> Path | None:
    """The site's state folder for the error log, if the site can still be resolved."""
    try:
        cfg = RunConfig.from_flat(context.run_config)
        return resolve_site(cfg, context.node_config).state_dir
    except Exception:  # the error being reported may be this one: log to the process only
        return None


def site_errors_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the rest of the app; an exception becomes an error reply with no patient data."""
    try:
        return call_next(msg, context)
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


def _faults(context: Context) -> set[str]:
    cfg = RunConfig.from_flat(context.run_config)
    site = resolve_site(cfg, context.node_config).name
    entries = [e.split(":", 1) for e in os.environ.get(FAULT_ENV, "").split(",") if ":" in e]
    return {kind for kind, name in entries if name == site}


def fault_injection_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Inject the faults ``FEDMEDVIT_FAULT`` names for this site (tests only; see module doc).
    Placed outside ``he_mod``: a NaN update is a plaintext one, a tampered one a ciphertext."""
    faults = _faults(context)
    if "crash" in faults and msg.metadata.message_type == "train":
        raise RuntimeError("fault injection: the site dies mid-round")
    reply = call_next(msg, context)
    if not (reply.has_content() and P.ARRAYS in reply.content.array_records):
        return reply
    record = reply.content.array_records[P.ARRAYS]
    cfg = RunConfig.from_flat(context.run_config)
    if "nan" in faults and not cfg.he:
        reply.content[P.ARRAYS] = ArrayRecord(
            {k: Array(np.full_like(v.numpy(), np.nan)) for k, v in record.items()}
        )
    if "tamper" in faults and cfg.he:  # flip the second half of the first ciphertext's bytes
        first = sorted(record)[0]
        raw = record[first].numpy().copy()
        raw[len(raw) // 2 :] ^= np.uint8(0xFF)
        record[first] = Array(raw)
    return reply


def client_mods() -> list[ClientAppMod]:
    """The ClientApp's mods, outermost first: errors, (fault injection,) encryption."""
    faults = [fault_injection_mod] if os.environ.get(FAULT_ENV) else []
    return [site_errors_mod, *faults, he_mod]
