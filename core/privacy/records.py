"""What a ledger records per round (:class:`RoundRecord`), the decisions it hands a site
(:class:`RoundCheck`, :class:`BudgetDecision`), and the field readers its JSON parsing uses:
every error names the field and what was found."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.privacy.errors import LedgerFormatError, PrivacyConfigError
from core.privacy.plan import real_number


@dataclass(frozen=True)
class RoundRecord:
    """What one round did to a site's budget; ``epsilon`` is cumulative, at the target delta.

    A refused round took no steps, so its noise and sample rate are ``None``. A round whose
    steps mixed several ``(noise, rate)`` pairs is summarised by the weakest (smallest noise,
    largest rate); the ledger history keeps the exact segments either way.

    ``global_digest`` is the sha256 (``core.model.checkpoint.fingerprint``) of the global
    adapters the round trained from, or was asked to train from. ``replay`` marks a round
    number the site had already trained: re-sent with the same global model it is served from
    the kept release at no privacy cost (``refused`` False, 0 steps), with another model it is
    refused.
    """

    server_round: int
    epsilon: float
    steps: int
    noise_multiplier: float | None
    sample_rate: float | None
    refused: bool = False
    reason: str = ""
    global_digest: str = ""
    replay: bool = False

    @property
    def trained(self) -> bool:
        """True when this record charged DP-SGD steps (not a refusal, not a served replay)."""
        return not self.refused and not self.replay


@dataclass(frozen=True)
class RoundCheck:
    """What a site does with a server round, decided from its ledger before any training.

    ``verdict``: ``"train"`` (a round number the ledger has not trained), ``"replay"`` (the
    same round and global model as a trained round: re-send that release, no new cost) or
    ``"refuse"`` (a trained round number with another global model, or an earlier round).
    """

    verdict: str
    reason: str


@dataclass(frozen=True)
class BudgetDecision:
    """Whether a site may train one more round without exceeding its target epsilon."""

    allowed: bool
    current_epsilon: float
    projected_epsilon: float
    target_epsilon: float
    target_delta: float
    reason: str


def field_of(data: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise LedgerFormatError(f"{where}: expected an object, got {type(data).__name__}")
    if key not in data:
        raise LedgerFormatError(f"{where}.{key}: missing field")
    return data[key]


def float_field(data: Mapping[str, Any], key: str, where: str) -> float:
    value = field_of(data, key, where)
    number = real_number(value)
    if number is None or not math.isfinite(number):
        raise LedgerFormatError(f"{where}.{key}: expected a finite number, got {value!r}")
    return number


def optional_float_field(data: Mapping[str, Any], key: str, where: str) -> float | None:
    if data.get(key) is None:
        return None
    return float_field(data, key, where)


def int_field(data: Mapping[str, Any], key: str, where: str) -> int:
    value = field_of(data, key, where)
    if not isinstance(value, int) or isinstance(value, bool):
        raise LedgerFormatError(f"{where}.{key}: expected an integer, got {value!r}")
    return value


def str_field(data: Mapping[str, Any], key: str, where: str) -> str:
    value = field_of(data, key, where)
    if not isinstance(value, str):
        raise LedgerFormatError(f"{where}.{key}: expected a string, got {value!r}")
    return value


def list_field(data: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = field_of(data, key, where)
    if not isinstance(value, list | tuple):
        raise LedgerFormatError(f"{where}.{key}: expected a list, got {value!r}")
    return list(value)


def rebuild(build: Any, where: str, **kwargs: Any) -> Any:
    """Construct a validated dataclass, turning its config error into a format error."""
    try:
        return build(**kwargs)
    except PrivacyConfigError as err:
        raise LedgerFormatError(f"{where}: {err}") from err


def record_to_dict(record: RoundRecord) -> dict[str, Any]:
    return {
        "round": record.server_round,
        "epsilon": record.epsilon,
        "steps": record.steps,
        "noise_multiplier": record.noise_multiplier,
        "sample_rate": record.sample_rate,
        "refused": record.refused,
        "reason": record.reason,
        "global_digest": record.global_digest,
        "replay": record.replay,
    }


def record_from_dict(data: Mapping[str, Any], where: str) -> RoundRecord:
    refused = field_of(data, "refused", where)
    replay = data.get("replay", False)
    for key, flag in (("refused", refused), ("replay", replay)):
        if not isinstance(flag, bool):
            raise LedgerFormatError(f"{where}.{key}: expected true or false, got {flag!r}")
    digest = data.get("global_digest", "")
    if not isinstance(digest, str):
        raise LedgerFormatError(f"{where}.global_digest: expected a string, got {digest!r}")
    return RoundRecord(
        server_round=int_field(data, "round", where),
        epsilon=float_field(data, "epsilon", where),
        steps=int_field(data, "steps", where),
        noise_multiplier=optional_float_field(data, "noise_multiplier", where),
        sample_rate=optional_float_field(data, "sample_rate", where),
        refused=refused,
        reason=str_field(data, "reason", where),
        global_digest=digest,
        replay=replay,
    )
