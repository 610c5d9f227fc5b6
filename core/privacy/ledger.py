"""Sample-level DP-SGD accounting that is cumulative across federated rounds.

A site's privacy loss is a property of *everything* it ever released from its data, so the
accountant must compose every DP-SGD step of every round. The common mistake is to create a
fresh Opacus ``PrivacyEngine`` each round and report that round's epsilon, which hides a
cumulative epsilon several times larger. A :class:`PrivacyLedger` prevents this: it keeps
the Opacus accountant history (a list of ``(noise_multiplier, sample_rate, steps)``), survives
in Flower's ``context.state`` (plain lists and strings) and on disk (atomic JSON), and recomputes
epsilon from the full history with a fresh Opacus accountant each time, which is exactly how
Opacus itself resumes an accountant.

The plan a ledger keeps (steps per round, noise calibrated once to the budget) is
:mod:`core.privacy.plan`; what it records per round is :mod:`core.privacy.records`. Before each
round :meth:`PrivacyLedger.check_budget` projects the epsilon after that round and refuses to
train past the target.

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

Over 500 lines because :class:`PrivacyLedger` is one invariant (a history that never resets)
with its budget checks and its two serialised forms, which must change together.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from core.io import write_json_atomic
from core.privacy.errors import AccountantMismatchError, LedgerFormatError, PrivacyConfigError
from core.privacy.plan import (
    ACCOUNTANTS,
    AccountantStep,
    DPPlan,
    DPSettings,
    check_count,
    check_positive_finite,
    check_sample_rate,
    compose_steps,
    epsilon_of_history,
    plan_dp,
    real_number,
)
from core.privacy.records import (
    BudgetDecision,
    RoundCheck,
    RoundRecord,
    field_of,
    float_field,
    int_field,
    list_field,
    rebuild,
    record_from_dict,
    record_to_dict,
    str_field,
)

# ACCOUNTANTS, DPSettings and plan_dp are re-exported: core.config and core.federation.rounds
# import them from here.
__all__ = [
    "ACCOUNTANTS",
    "LEDGER_FORMAT",
    "DPSettings",
    "OpacusAccountant",
    "PrivacyLedger",
    "plan_dp",
]

LEDGER_FORMAT = "fedmedvit.privacy-ledger"
LEDGER_VERSION = 1


class OpacusAccountant(Protocol):
    """What the ledger needs from an Opacus accountant (``PrivacyEngine.accountant``)."""

    history: list[Any]

    def mechanism(self) -> str: ...


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
            self._history = compose_steps(
                self._history,
                check_positive_finite(noise, f"history[{index}] noise", "fix the history"),
                check_sample_rate(rate),
                check_count(steps, f"history[{index}] steps"),
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
        projected = compose_steps(
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
        check_count(server_round, "server_round")
        noise, rate, count = self._checked_step(noise_multiplier, sample_rate, steps)
        self._history = compose_steps(self._history, noise, rate, count)
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
        check_count(server_round, "server_round")
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
        check_count(server_round, "server_round")
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
        check_count(server_round, "server_round")
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
            self._history = compose_steps(self._history, noise, rate, steps)
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
            "rounds": [record_to_dict(record) for record in self._records],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "ledger") -> PrivacyLedger:
        """Inverse of :meth:`to_dict`; errors name ``source`` and the bad field."""
        if isinstance(data, Mapping) and data.get("format", LEDGER_FORMAT) != LEDGER_FORMAT:
            raise LedgerFormatError(
                f"{source}.format: expected {LEDGER_FORMAT!r}, got {data['format']!r}"
            )
        version = field_of(data, "version", source)
        if version != LEDGER_VERSION:
            raise LedgerFormatError(
                f"{source}.version: expected {LEDGER_VERSION}, got {version!r}; "
                "this ledger was written by another version of fedmedvit"
            )
        raw_settings = field_of(data, "settings", source)
        where = f"{source}.settings"
        settings = rebuild(
            DPSettings,
            where,
            target_epsilon=float_field(raw_settings, "target_epsilon", where),
            target_delta=float_field(raw_settings, "target_delta", where),
            max_grad_norm=float_field(raw_settings, "max_grad_norm", where),
            accountant=str_field(raw_settings, "accountant", where),
        )
        plan = None
        raw_plan = data.get("plan")
        if raw_plan is not None:
            where = f"{source}.plan"
            plan = rebuild(
                DPPlan,
                where,
                noise_multiplier=float_field(raw_plan, "noise_multiplier", where),
                sample_rate=float_field(raw_plan, "sample_rate", where),
                steps_per_round=int_field(raw_plan, "steps_per_round", where),
                planned_rounds=int_field(raw_plan, "planned_rounds", where),
            )
        history = []
        for index, step in enumerate(list_field(data, "history", source)):
            where = f"{source}.history[{index}]"
            if not isinstance(step, list | tuple) or len(step) != 3:
                raise LedgerFormatError(
                    f"{where}: expected [noise_multiplier, sample_rate, steps], got {step!r}"
                )
            entry = dict(zip(AccountantStep._fields, step, strict=True))
            history.append(
                (
                    float_field(entry, "noise_multiplier", where),
                    float_field(entry, "sample_rate", where),
                    int_field(entry, "steps", where),
                )
            )
        records = [
            record_from_dict(raw, f"{source}.rounds[{index}]")
            for index, raw in enumerate(list_field(data, "rounds", source))
        ]
        return rebuild(
            cls,
            source,
            settings=settings,
            dataset_size=int_field(data, "dataset_size", source),
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
            "rounds_json": json.dumps([record_to_dict(r) for r in self._records]),
        }
        if self._plan is not None:
            flat.update({f"plan_{key}": value for key, value in asdict(self._plan).items()})
        return flat

    @classmethod
    def from_record(
        cls, record: Mapping[str, Any], *, source: str = "ConfigRecord"
    ) -> PrivacyLedger:
        """Inverse of :meth:`to_record` (accepts a Flower ``ConfigRecord`` or any mapping)."""
        noise = list_field(record, "history_noise", source)
        rate = list_field(record, "history_rate", source)
        steps = list_field(record, "history_steps", source)
        if not len(noise) == len(rate) == len(steps):
            raise LedgerFormatError(
                f"{source}: history_noise, history_rate and history_steps must have equal "
                f"lengths, got {len(noise)}, {len(rate)} and {len(steps)}"
            )
        rounds_json = str_field(record, "rounds_json", source)
        try:
            rounds = json.loads(rounds_json)
        except json.JSONDecodeError as err:
            raise LedgerFormatError(f"{source}.rounds_json: not valid JSON ({err})") from err
        plan = None
        if any(f"plan_{key}" in record for key in _PLAN_KEYS):
            plan = {key: field_of(record, f"plan_{key}", source) for key in _PLAN_KEYS}
        return cls.from_dict(
            {
                "version": field_of(record, "version", source),
                "settings": {
                    key: field_of(record, key, source)
                    for key in ("target_epsilon", "target_delta", "max_grad_norm", "accountant")
                },
                "dataset_size": field_of(record, "dataset_size", source),
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
        number = real_number(delta)
        if number is None or not 0 < number < 1:
            raise PrivacyConfigError(f"delta must be in (0, 1), got {delta!r}")
        return number

    @staticmethod
    def _checked_step(noise_multiplier: float, sample_rate: float, steps: int) -> AccountantStep:
        return AccountantStep(
            check_positive_finite(
                noise_multiplier, "noise_multiplier", "use the plan's calibrated noise"
            ),
            check_sample_rate(sample_rate),
            check_count(steps, "steps"),
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
