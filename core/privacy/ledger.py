"""Sample-level DP-SGD accounting that is cumulative across federated rounds.

A site's privacy loss is a property of *everything* it ever released from its data, so the
accountant must compose every DP-SGD step of every round. The common mistake is to create a
fresh Opacus ``PrivacyEngine`` each round and report that round's epsilon, which hides a
cumulative epsilon several times larger. A :class:`PrivacyLedger` prevents this: it keeps
the Opacus accountant history (a list of ``(noise_multiplier, sample_rate, steps)``), survives
in Flower's ``context.state`` (plain lists and strings) and on disk (atomic JSON), and recomputes
epsilon from the full history with a fresh Opacus accountant each time, which is exactly how
Opacus itself resumes an accountant.

Steps per round. Opacus's Poisson loader includes every record in a step independently with
probability ``q = 1 / len(data_loader)``, so ``1 / q`` steps see the data set once in
expectation (an "epoch") and a round of ``E`` local epochs is ``ceil(E / q)`` steps
(:func:`steps_per_round`). Epsilon depends only on the composed history (how many steps at
which ``(noise, q)``), never on how the steps were grouped into rounds. Opacus's own loader
yields ``int(1 / q)`` batches per pass, which float rounding can make one short (``q = 1/93``
gives 92), so a training loop should count optimizer steps up to the planned number rather
than iterate epochs; either way the ledger records the steps actually taken.

Noise is calibrated once, from the site's target ``(epsilon, delta)`` over the planned total
``planned_rounds * steps_per_round`` steps (:func:`calibrate_noise`); every round then uses that
noise, so the budget is reached after the last planned round and not before. Before each round
:meth:`PrivacyLedger.check_budget` projects the epsilon after that round and refuses to train
past the target.

Use in a ClientApp, each round (the ledger lives in ``context.state`` and, in deployment, in a
JSON file next to the site's data)::

    ledger = PrivacyLedger.resume_or_start(stored_state, settings=..., dataset_size=n)
    plan = ledger.plan or ledger.adopt_plan(plan_dp(settings, dataset_size=n, ...))
    decision = ledger.check_budget(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    if not decision.allowed:
        ledger.record_refusal(server_round, decision.reason)   # and reply without training
    else:
        engine = PrivacyEngine(accountant=settings.accountant)
        ledger.restore_into(engine.accountant)                  # continue, never reset
        ...make_private(noise_multiplier=plan.noise_multiplier, ...); train the planned steps
        ledger.update_from(engine.accountant, server_round)     # or record_round(...)
    store ledger.to_record() / ledger.save(path)

Opacus is imported lazily: it pulls in torch (seconds), which the report CLI never needs.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from core.io import write_json_atomic

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

ACCOUNTANTS = ("rdp", "prv")
LEDGER_FORMAT = "fedmedvit.privacy-ledger"
LEDGER_VERSION = 1


class PrivacyError(Exception):
    """Base class of the privacy layer's errors."""


class PrivacyConfigError(PrivacyError, ValueError):
    """A DP setting or training parameter that cannot give a meaningful guarantee."""


class LedgerFormatError(PrivacyError, ValueError):
    """A serialised ledger that is missing a field or holds a value of the wrong kind."""


class AccountantMismatchError(PrivacyError):
    """An Opacus accountant that does not continue the ledger (reset, or another mechanism)."""


class AccountantStep(NamedTuple):
    """One entry of an Opacus accountant history; a tuple so Opacus accepts it as is."""

    noise_multiplier: float
    sample_rate: float
    steps: int


class OpacusAccountant(Protocol):
    """What the ledger needs from an Opacus accountant (``PrivacyEngine.accountant``)."""

    history: list[Any]

    def mechanism(self) -> str: ...


def _number(value: object) -> float | None:
    """``value`` as a float if it is a real number (bools are not), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _check_positive_finite(value: object, name: str, fix: str) -> float:
    number = _number(value)
    if number is None or not math.isfinite(number) or number <= 0:
        raise PrivacyConfigError(f"{name} must be a finite number > 0, got {value!r}; {fix}")
    return number


def _check_sample_rate(sample_rate: object) -> float:
    rate = _number(sample_rate)
    if rate is None or not 0 < rate <= 1:
        raise PrivacyConfigError(
            f"sample_rate must be in (0, 1], got {sample_rate!r}; "
            "use poisson_sample_rate(dataset_size, batch_size)"
        )
    return rate


def _check_count(value: object, name: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PrivacyConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class DPSettings:
    """A site's privacy budget and clipping norm, validated once at the config boundary."""

    target_epsilon: float
    target_delta: float
    max_grad_norm: float
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        _check_positive_finite(
            self.target_epsilon, "target_epsilon", "pick the site's budget, e.g. 1 to 10"
        )
        delta = _number(self.target_delta)
        if delta is None or not 0 < delta < 1:
            raise PrivacyConfigError(
                f"target_delta must be in (0, 1), got {self.target_delta!r}; "
                "use a value well below 1 / dataset_size, e.g. 1e-5"
            )
        _check_positive_finite(
            self.max_grad_norm, "max_grad_norm", "set the per-sample clipping norm, e.g. 1.0"
        )
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyConfigError(
                f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}"
            )

    def check_dataset_size(self, dataset_size: int) -> None:
        """Reject a delta of 1/n or more: publishing one random record outright meets it."""
        _check_count(dataset_size, "dataset_size")
        if self.target_delta >= 1.0 / dataset_size:
            raise PrivacyConfigError(
                f"target_delta={self.target_delta!r} is not below 1/dataset_size = "
                f"1/{dataset_size}; such a guarantee allows leaking a whole record. "
                f"Use target_delta <= {0.1 / dataset_size:.1e}"
            )


@dataclass(frozen=True)
class DPPlan:
    """Per-round DP parameters, fixed once at a site's first round and kept in its ledger."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int

    def __post_init__(self) -> None:
        _check_positive_finite(self.noise_multiplier, "noise_multiplier", "calibrate it first")
        _check_sample_rate(self.sample_rate)
        _check_count(self.steps_per_round, "steps_per_round")
        _check_count(self.planned_rounds, "planned_rounds")


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


def poisson_sample_rate(dataset_size: int, batch_size: int) -> float:
    """``1 / len(DataLoader(batch_size))``: the exact float Opacus's ``make_private`` records."""
    _check_count(dataset_size, "dataset_size")
    _check_count(batch_size, "batch_size")
    return 1 / math.ceil(dataset_size / batch_size)


def steps_per_round(sample_rate: float, local_epochs: int) -> int:
    """``ceil(local_epochs / sample_rate)``, ignoring float noise: ``q = 1/7`` gives 7 per epoch."""
    rate = _check_sample_rate(sample_rate)
    epochs = _check_count(local_epochs, "local_epochs")
    exact = epochs / rate
    nearest = round(exact)
    if abs(exact - nearest) <= 1e-9 * max(1.0, exact):
        return int(nearest)
    return math.ceil(exact)


def _new_accountant(mechanism: str) -> IAccountant:
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=mechanism)


def calibrate_noise(
    settings: DPSettings,
    sample_rate: float,
    steps_per_round: int,
    planned_rounds: int,
    *,
    epsilon_tolerance: float = 0.01,
) -> float:
    """Noise multiplier reaching ``settings.target_epsilon`` after exactly the planned rounds.

    Calls Opacus's ``get_noise_multiplier`` over ``planned_rounds * steps_per_round`` steps, so
    the result is at most ``epsilon_tolerance`` below the target after the last planned round.
    """
    from opacus.accountants.utils import get_noise_multiplier

    rate = _check_sample_rate(sample_rate)
    total_steps = _check_count(steps_per_round, "steps_per_round") * _check_count(
        planned_rounds, "planned_rounds"
    )
    tolerance = _check_positive_finite(
        epsilon_tolerance, "epsilon_tolerance", "use e.g. 0.01 (Opacus's default)"
    )
    try:
        with warnings.catch_warnings():
            # The bisection probes huge noise levels whose tiny epsilons sit at the largest RDP
            # order; those probes are not the answer, so their warning is noise in the logs.
            warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
            return float(
                get_noise_multiplier(
                    target_epsilon=settings.target_epsilon,
                    target_delta=settings.target_delta,
                    sample_rate=rate,
                    steps=total_steps,
                    accountant=settings.accountant,
                    epsilon_tolerance=tolerance,
                )
            )
    except ValueError as err:
        raise PrivacyConfigError(
            f"cannot reach target_epsilon={settings.target_epsilon} at "
            f"delta={settings.target_delta} over {total_steps} steps at sample_rate={rate} "
            f"({err}); raise the budget, plan fewer rounds or local epochs, or use a larger "
            "dataset / smaller batch"
        ) from err


def plan_dp(
    settings: DPSettings,
    *,
    dataset_size: int,
    batch_size: int,
    local_epochs: int,
    planned_rounds: int,
) -> DPPlan:
    """Sample rate, steps and calibrated noise for a site: the one-off set-up of a run."""
    settings.check_dataset_size(dataset_size)
    rate = poisson_sample_rate(dataset_size, batch_size)
    steps = steps_per_round(rate, local_epochs)
    noise = calibrate_noise(settings, rate, steps, planned_rounds)
    return DPPlan(
        noise_multiplier=noise,
        sample_rate=rate,
        steps_per_round=steps,
        planned_rounds=planned_rounds,
    )


def _compose(
    history: Sequence[AccountantStep], noise_multiplier: float, sample_rate: float, steps: int
) -> list[AccountantStep]:
    """Append ``steps`` steps exactly as Opacus's ``step()`` would (merging equal neighbours)."""
    composed = list(history)
    if composed and composed[-1][:2] == (noise_multiplier, sample_rate):
        last = composed.pop()
        composed.append(AccountantStep(noise_multiplier, sample_rate, last.steps + steps))
    else:
        composed.append(AccountantStep(noise_multiplier, sample_rate, steps))
    return composed


def epsilon_of_history(history: Sequence[AccountantStep], accountant: str, delta: float) -> float:
    """Epsilon of a history, by a fresh Opacus accountant whose ``.history`` is set to it."""
    if not history:
        return 0.0
    fresh = _new_accountant(accountant)
    fresh.history = [tuple(step) for step in history]
    return float(fresh.get_epsilon(delta=delta))


# -- parsing helpers: every error names the field and what was found --------------------------


def _field(data: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise LedgerFormatError(f"{where}: expected an object, got {type(data).__name__}")
    if key not in data:
        raise LedgerFormatError(f"{where}.{key}: missing field")
    return data[key]


def _float_field(data: Mapping[str, Any], key: str, where: str) -> float:
    value = _field(data, key, where)
    number = _number(value)
    if number is None or not math.isfinite(number):
        raise LedgerFormatError(f"{where}.{key}: expected a finite number, got {value!r}")
    return number


def _optional_float_field(data: Mapping[str, Any], key: str, where: str) -> float | None:
    if data.get(key) is None:
        return None
    return _float_field(data, key, where)


def _int_field(data: Mapping[str, Any], key: str, where: str) -> int:
    value = _field(data, key, where)
    if not isinstance(value, int) or isinstance(value, bool):
        raise LedgerFormatError(f"{where}.{key}: expected an integer, got {value!r}")
    return value


def _str_field(data: Mapping[str, Any], key: str, where: str) -> str:
    value = _field(data, key, where)
    if not isinstance(value, str):
        raise LedgerFormatError(f"{where}.{key}: expected a string, got {value!r}")
    return value


def _list_field(data: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = _field(data, key, where)
    if not isinstance(value, list | tuple):
        raise LedgerFormatError(f"{where}.{key}: expected a list, got {value!r}")
    return list(value)


def _rebuild(build: Any, where: str, **kwargs: Any) -> Any:
    """Construct a validated dataclass, turning its config error into a format error."""
    try:
        return build(**kwargs)
    except PrivacyConfigError as err:
        raise LedgerFormatError(f"{where}: {err}") from err


def _record_to_dict(record: RoundRecord) -> dict[str, Any]:
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


def _record_from_dict(data: Mapping[str, Any], where: str) -> RoundRecord:
    refused = _field(data, "refused", where)
    replay = data.get("replay", False)
    for key, flag in (("refused", refused), ("replay", replay)):
        if not isinstance(flag, bool):
            raise LedgerFormatError(f"{where}.{key}: expected true or false, got {flag!r}")
    digest = data.get("global_digest", "")
    if not isinstance(digest, str):
        raise LedgerFormatError(f"{where}.global_digest: expected a string, got {digest!r}")
    return RoundRecord(
        server_round=_int_field(data, "round", where),
        epsilon=_float_field(data, "epsilon", where),
        steps=_int_field(data, "steps", where),
        noise_multiplier=_optional_float_field(data, "noise_multiplier", where),
        sample_rate=_optional_float_field(data, "sample_rate", where),
        refused=refused,
        reason=_str_field(data, "reason", where),
        global_digest=digest,
        replay=replay,
    )


# Keys of the flat form that fits a Flower ConfigRecord (scalars and lists of scalars only).
_PLAN_KEYS = ("noise_multiplier", "sample_rate", "steps_per_round", "planned_rounds")


class PrivacyLedger:
    """A site's never-resetting accountant state plus one record per round.

    Mutable on purpose, like the Opacus accountant it stands for: each round appends. The
    history is kept in Opacus's compressed form (equal consecutive ``(noise, rate)`` merged),
    so recording rounds here or letting Opacus step its accountant gives the same list.
    """

    def __init__(
        self,
        settings: DPSettings,
        *,
        dataset_size: int,
        plan: DPPlan | None = None,
        history: Iterable[Sequence[Any]] = (),
        records: Iterable[RoundRecord] = (),
    ) -> None:
        settings.check_dataset_size(dataset_size)
        self._settings = settings
        self._dataset_size = dataset_size
        self._plan = plan
        self._history: list[AccountantStep] = []
        for index, step in enumerate(history):
            if not isinstance(step, Sequence) or len(step) != 3:
                raise PrivacyConfigError(
                    f"history[{index}] must be (noise_multiplier, sample_rate, steps), got {step!r}"
                )
            noise, rate, steps = step
            # Merged as Opacus would, so every ledger holds the one canonical form.
            self._history = _compose(
                self._history,
                _check_positive_finite(noise, f"history[{index}] noise", "fix the history"),
                _check_sample_rate(rate),
                _check_count(steps, f"history[{index}] steps"),
            )
        self._records: list[RoundRecord] = list(records)
        # Epsilon is a pure function of (history, delta) and costs ~0.1 s (RDP) to 1 s (PRV);
        # check_budget's projection is exactly the next record's epsilon, so remember them.
        self._epsilon_cache: dict[tuple[tuple[AccountantStep, ...], float], float] = {}
        self._restored_into: weakref.ref[Any] | None = None

    # -- state -------------------------------------------------------------------------------

    @property
    def settings(self) -> DPSettings:
        return self._settings

    @property
    def dataset_size(self) -> int:
        return self._dataset_size

    @property
    def plan(self) -> DPPlan | None:
        return self._plan

    @property
    def history(self) -> tuple[AccountantStep, ...]:
        return tuple(self._history)

    @property
    def records(self) -> tuple[RoundRecord, ...]:
        return tuple(self._records)

    @property
    def total_steps(self) -> int:
        return sum(step.steps for step in self._history)

    def adopt_plan(self, plan: DPPlan) -> DPPlan:
        """Fix the run's plan once; a later different plan is refused so noise stays calibrated."""
        if self._plan is not None and self._plan != plan:
            raise PrivacyConfigError(
                f"this ledger already follows {self._plan}, got {plan}; the noise is calibrated "
                "once per run: keep using ledger.plan"
            )
        self._plan = plan
        return plan

    # -- epsilon -------------------------------------------------------------------------------

    def epsilon(self, delta: float | None = None) -> float:
        """Cumulative epsilon of every step recorded so far (at the target delta by default)."""
        return self._epsilon(self._history, self._delta(delta))

    def projected_epsilon(
        self, noise_multiplier: float, sample_rate: float, steps: int, delta: float | None = None
    ) -> float:
        """Epsilon if one more round with these parameters were added; the ledger is unchanged."""
        projected = _compose(
            self._history, *self._checked_step(noise_multiplier, sample_rate, steps)
        )
        return self._epsilon(projected, self._delta(delta))

    def check_budget(
        self, noise_multiplier: float, sample_rate: float, steps: int
    ) -> BudgetDecision:
        """Decide BEFORE training whether one more round stays within the target epsilon."""
        current = self.epsilon()
        projected = self.projected_epsilon(noise_multiplier, sample_rate, steps)
        target = self._settings.target_epsilon
        delta = self._settings.target_delta
        if projected <= target:
            reason = (
                f"epsilon would go from {current:.3f} to {projected:.3f}, within the target "
                f"{target:.3f} at delta {delta:.1e}"
            )
        else:
            reason = (
                f"training this round would raise epsilon from {current:.3f} to {projected:.3f}, "
                f"above the site's target {target:.3f} at delta {delta:.1e}; the site skips the "
                "round and sends nothing derived from its data"
            )
        return BudgetDecision(
            allowed=projected <= target,
            current_epsilon=current,
            projected_epsilon=projected,
            target_epsilon=target,
            target_delta=delta,
            reason=reason,
        )

    # -- recording -----------------------------------------------------------------------------

    def record_round(
        self,
        server_round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        *,
        global_digest: str = "",
    ) -> RoundRecord:
        """Charge a round that trained ``steps`` DP-SGD steps with these parameters, from the
        global adapters whose sha256 is ``global_digest``."""
        _check_count(server_round, "server_round")
        noise, rate, count = self._checked_step(noise_multiplier, sample_rate, steps)
        self._history = _compose(self._history, noise, rate, count)
        record = RoundRecord(
            server_round=server_round,
            epsilon=self.epsilon(),
            steps=count,
            noise_multiplier=noise,
            sample_rate=rate,
            global_digest=global_digest,
        )
        self._records.append(record)
        return record

    def record_refusal(
        self, server_round: int, reason: str, *, global_digest: str = "", replay: bool = False
    ) -> RoundRecord:
        """Note a round the site refused to train (``replay``: a re-sent round number it
        refused); its budget is unchanged."""
        return self._record_without_steps(
            server_round, reason, global_digest=global_digest, replay=replay, refused=True
        )

    def record_replay(self, server_round: int, global_digest: str, reason: str) -> RoundRecord:
        """Note a re-sent round served from the kept release: no steps, epsilon unchanged."""
        return self._record_without_steps(
            server_round, reason, global_digest=global_digest, replay=True, refused=False
        )

    def _record_without_steps(
        self, server_round: int, reason: str, *, global_digest: str, replay: bool, refused: bool
    ) -> RoundRecord:
        _check_count(server_round, "server_round")
        record = RoundRecord(
            server_round=server_round,
            epsilon=self.epsilon(),
            steps=0,
            noise_multiplier=None,
            sample_rate=None,
            refused=refused,
            reason=str(reason),
            global_digest=global_digest,
            replay=replay,
        )
        self._records.append(record)
        return record

    # -- replays -------------------------------------------------------------------------------

    def trained_record(self, server_round: int) -> RoundRecord | None:
        """The record of ``server_round`` if the site trained that round, else None."""
        for record in self._records:
            if record.trained and record.server_round == server_round:
                return record
        return None

    @property
    def last_trained_round(self) -> int:
        """The highest server round this ledger trained (0 before the first)."""
        return max((r.server_round for r in self._records if r.trained), default=0)

    def check_round(self, server_round: int, global_digest: str) -> RoundCheck:
        """Decide before training whether ``server_round`` is new, a replay, or refused.

        Server rounds must increase: training twice under one round number would give the
        coordinator two releases it could compare, and the number it chooses must not make
        the site spend budget on a round it already answered.
        """
        _check_count(server_round, "server_round")
        done = self.trained_record(server_round)
        if done is not None and done.global_digest == global_digest:
            return RoundCheck(
                "replay",
                f"round {server_round} was already trained from this global model (sha256 "
                f"{global_digest[:12]}...); the site re-sends the update it released then, at "
                "no new privacy cost",
            )
        if done is not None:
            return RoundCheck(
                "refuse",
                f"replay refused: round {server_round} was already trained from global model "
                f"{done.global_digest[:12]}..., and the coordinator now sends another model "
                f"({global_digest[:12]}...) under the same round number; a site trains each "
                "round number once. Continue the federation with the next round number",
            )
        last = self.last_trained_round
        if server_round < last:
            return RoundCheck(
                "refuse",
                f"replay refused: round {server_round} is earlier than round {last}, which this "
                "site already trained; server rounds must increase",
            )
        return RoundCheck("train", "")

    # -- Opacus accountant bridge ----------------------------------------------------------------

    def restore_into(self, accountant: OpacusAccountant) -> None:
        """Load the stored history into a new PrivacyEngine's accountant before training."""
        self._check_mechanism(accountant)
        accountant.history = [tuple(step) for step in self._history]
        self._restored_into = weakref.ref(accountant)

    def update_from(self, accountant: OpacusAccountant, server_round: int) -> RoundRecord:
        """Charge the steps Opacus counted since :meth:`restore_into`, as one round's record.

        Raises :class:`AccountantMismatchError` when the accountant was not restored from this
        ledger or does not extend it (reset since): silently accepting that would lose budget.
        A history alone cannot tell "reset, then 15 steps" from "restored at 10, then 5 more"
        when all steps share one ``(noise, rate)``, hence the identity check.
        """
        self._check_mechanism(accountant)
        _check_count(server_round, "server_round")
        if self._restored_into is None or self._restored_into() is not accountant:
            raise AccountantMismatchError(
                "this accountant was never restored from the ledger: call "
                "ledger.restore_into(engine.accountant) on this ledger before training; a fresh "
                "PrivacyEngine per round would otherwise count only that round's steps"
            )
        observed = [
            self._observed_step(index, step) for index, step in enumerate(accountant.history)
        ]
        new_segments = self._segments_after_stored(observed)
        if not new_segments:
            raise AccountantMismatchError(
                "the accountant took no steps since restore_into(); make sure the training loop "
                "steps the optimizer returned by the same PrivacyEngine whose accountant was "
                "restored"
            )
        for noise, rate, steps in new_segments:
            self._history = _compose(self._history, noise, rate, steps)
        pairs = {(noise, rate) for noise, rate, _ in new_segments}
        record = RoundRecord(
            server_round=server_round,
            epsilon=self.epsilon(),
            steps=sum(steps for _, _, steps in new_segments),
            noise_multiplier=min(noise for noise, _ in pairs),
            sample_rate=max(rate for _, rate in pairs),
        )
        self._records.append(record)
        return record

    # -- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (the on-disk format and one site's entry of ``privacy.json``)."""
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "settings": asdict(self._settings),
            "dataset_size": self._dataset_size,
            "plan": None if self._plan is None else asdict(self._plan),
            "history": [list(step) for step in self._history],
            "rounds": [_record_to_dict(record) for record in self._records],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "ledger") -> PrivacyLedger:
        """Inverse of :meth:`to_dict`; errors name ``source`` and the bad field."""
        if isinstance(data, Mapping) and data.get("format", LEDGER_FORMAT) != LEDGER_FORMAT:
            raise LedgerFormatError(
                f"{source}.format: expected {LEDGER_FORMAT!r}, got {data['format']!r}"
            )
        version = _field(data, "version", source)
        if version != LEDGER_VERSION:
            raise LedgerFormatError(
                f"{source}.version: expected {LEDGER_VERSION}, got {version!r}; "
                "this ledger was written by another version of fedmedvit"
            )
        raw_settings = _field(data, "settings", source)
        where = f"{source}.settings"
        settings = _rebuild(
            DPSettings,
            where,
            target_epsilon=_float_field(raw_settings, "target_epsilon", where),
            target_delta=_float_field(raw_settings, "target_delta", where),
            max_grad_norm=_float_field(raw_settings, "max_grad_norm", where),
            accountant=_str_field(raw_settings, "accountant", where),
        )
        plan = None
        raw_plan = data.get("plan")
        if raw_plan is not None:
            where = f"{source}.plan"
            plan = _rebuild(
                DPPlan,
                where,
                noise_multiplier=_float_field(raw_plan, "noise_multiplier", where),
                sample_rate=_float_field(raw_plan, "sample_rate", where),
                steps_per_round=_int_field(raw_plan, "steps_per_round", where),
                planned_rounds=_int_field(raw_plan, "planned_rounds", where),
            )
        history = []
        for index, step in enumerate(_list_field(data, "history", source)):
            where = f"{source}.history[{index}]"
            if not isinstance(step, list | tuple) or len(step) != 3:
                raise LedgerFormatError(
                    f"{where}: expected [noise_multiplier, sample_rate, steps], got {step!r}"
                )
            entry = dict(zip(AccountantStep._fields, step, strict=True))
            history.append(
                (
                    _float_field(entry, "noise_multiplier", where),
                    _float_field(entry, "sample_rate", where),
                    _int_field(entry, "steps", where),
                )
            )
        records = [
            _record_from_dict(raw, f"{source}.rounds[{index}]")
            for index, raw in enumerate(_list_field(data, "rounds", source))
        ]
        return _rebuild(
            cls,
            source,
            settings=settings,
            dataset_size=_int_field(data, "dataset_size", source),
            plan=plan,
            history=history,
            records=records,
        )

    def to_record(self) -> dict[str, Any]:
        """Flat form for a Flower ``ConfigRecord``: scalars, lists of scalars, a JSON string."""
        flat: dict[str, Any] = {
            "version": LEDGER_VERSION,
            **asdict(self._settings),
            "dataset_size": self._dataset_size,
            "history_noise": [float(step.noise_multiplier) for step in self._history],
            "history_rate": [float(step.sample_rate) for step in self._history],
            "history_steps": [int(step.steps) for step in self._history],
            "rounds_json": json.dumps([_record_to_dict(r) for r in self._records]),
        }
        if self._plan is not None:
            flat.update({f"plan_{key}": value for key, value in asdict(self._plan).items()})
        return flat

    @classmethod
    def from_record(
        cls, record: Mapping[str, Any], *, source: str = "ConfigRecord"
    ) -> PrivacyLedger:
        """Inverse of :meth:`to_record` (accepts a Flower ``ConfigRecord`` or any mapping)."""
        noise = _list_field(record, "history_noise", source)
        rate = _list_field(record, "history_rate", source)
        steps = _list_field(record, "history_steps", source)
        if not len(noise) == len(rate) == len(steps):
            raise LedgerFormatError(
                f"{source}: history_noise, history_rate and history_steps must have equal "
                f"lengths, got {len(noise)}, {len(rate)} and {len(steps)}"
            )
        rounds_json = _str_field(record, "rounds_json", source)
        try:
            rounds = json.loads(rounds_json)
        except json.JSONDecodeError as err:
            raise LedgerFormatError(f"{source}.rounds_json: not valid JSON ({err})") from err
        plan = None
        if any(f"plan_{key}" in record for key in _PLAN_KEYS):
            plan = {key: _field(record, f"plan_{key}", source) for key in _PLAN_KEYS}
        return cls.from_dict(
            {
                "version": _field(record, "version", source),
                "settings": {
                    key: _field(record, key, source)
                    for key in ("target_epsilon", "target_delta", "max_grad_norm", "accountant")
                },
                "dataset_size": _field(record, "dataset_size", source),
                "plan": plan,
                "history": [list(step) for step in zip(noise, rate, steps, strict=True)],
                "rounds": rounds,
            },
            source=source,
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Atomically write the ledger as JSON (deployment keeps it beside the site's data)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Read a ledger written by :meth:`save`; errors name the file and the field."""
        file = Path(path)
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise LedgerFormatError(f"{file}: not valid JSON ({err})") from err
        return cls.from_dict(data, source=str(file))

    @classmethod
    def resume_or_start(
        cls, state: Mapping[str, Any] | None, *, settings: DPSettings, dataset_size: int
    ) -> PrivacyLedger:
        """The stored ledger, or a new one on a site's first round.

        ``state`` is either serialised form (:meth:`to_record`, e.g. a Flower ConfigRecord from
        ``context.state``, or :meth:`to_dict`, e.g. a loaded JSON file) or None. A stored ledger
        must match the site's current settings and dataset size: a budget that changes mid-run
        would make the report meaningless.
        """
        if not state:
            return cls(settings, dataset_size=dataset_size)
        if "history_noise" in state:
            ledger = cls.from_record(state)
        else:
            ledger = cls.from_dict(state, source="stored ledger")
        if ledger.settings != settings or ledger.dataset_size != dataset_size:
            raise PrivacyConfigError(
                f"the stored ledger was started with {ledger.settings} and dataset_size="
                f"{ledger.dataset_size}, but this round has {settings} and dataset_size="
                f"{dataset_size}; keep the site's settings fixed for the whole run"
            )
        return ledger

    # -- internals ---------------------------------------------------------------------------

    def _epsilon(self, history: Sequence[AccountantStep], delta: float) -> float:
        key = (tuple(history), delta)
        if key not in self._epsilon_cache:
            self._epsilon_cache[key] = epsilon_of_history(history, self._settings.accountant, delta)
        return self._epsilon_cache[key]

    def _delta(self, delta: float | None) -> float:
        if delta is None:
            return self._settings.target_delta
        number = _number(delta)
        if number is None or not 0 < number < 1:
            raise PrivacyConfigError(f"delta must be in (0, 1), got {delta!r}")
        return number

    @staticmethod
    def _checked_step(noise_multiplier: float, sample_rate: float, steps: int) -> AccountantStep:
        return AccountantStep(
            _check_positive_finite(
                noise_multiplier, "noise_multiplier", "use the plan's calibrated noise"
            ),
            _check_sample_rate(sample_rate),
            _check_count(steps, "steps"),
        )

    def _check_mechanism(self, accountant: OpacusAccountant) -> None:
        mechanism = accountant.mechanism()
        if mechanism != self._settings.accountant:
            raise AccountantMismatchError(
                f"the Opacus accountant is {mechanism!r} but this site's ledger uses "
                f"{self._settings.accountant!r}; create the engine with "
                f"PrivacyEngine(accountant={self._settings.accountant!r})"
            )

    @staticmethod
    def _observed_step(index: int, step: Sequence[Any]) -> AccountantStep:
        try:
            noise, rate, steps = step
        except (TypeError, ValueError) as err:
            raise AccountantMismatchError(
                f"accountant.history[{index}] is {step!r}, not (noise, rate, steps)"
            ) from err
        return AccountantStep(float(noise), float(rate), int(steps))

    def _segments_after_stored(self, observed: list[AccountantStep]) -> list[AccountantStep]:
        """The part of the accountant's history beyond the ledger's (Opacus may merge the seam)."""
        stored = self._history
        if not stored:
            return observed
        last = len(stored) - 1
        seam_ok = (
            len(observed) > last
            and observed[:last] == stored[:last]
            and observed[last][:2] == stored[last][:2]
            and observed[last].steps >= stored[last].steps
        )
        if not seam_ok:
            observed_steps = sum(step.steps for step in observed)
            raise AccountantMismatchError(
                f"the accountant's history ({observed_steps} steps) does not continue this "
                f"ledger's ({self.total_steps} steps): it was reset after restore_into(). Let "
                "Opacus only step it (no make_private_with_epsilon, load_state_dict or history "
                "assignment) between restore_into() and update_from()"
            )
        extra = observed[last].steps - stored[last].steps
        seam = [AccountantStep(*observed[last][:2], extra)] if extra else []
        return seam + observed[last + 1 :]
