"""DP-SGD planning: a site's settings, its per-round plan, and noise calibrated to the budget.

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
noise, so the budget is reached after the last planned round and not before.

Opacus is imported lazily: it pulls in torch (seconds), which the report CLI never needs.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from core.privacy.errors import PrivacyConfigError

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

ACCOUNTANTS = ("rdp", "prv")


class AccountantStep(NamedTuple):
    """One entry of an Opacus accountant history; a tuple so Opacus accepts it as is."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def real_number(value: object) -> float | None:
    """``value`` as a float if it is a real number (bools are not), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def check_positive_finite(value: object, name: str, fix: str) -> float:
    number = real_number(value)
    if number is None or not math.isfinite(number) or number <= 0:
        raise PrivacyConfigError(f"{name} must be a finite number > 0, got {value!r}; {fix}")
    return number


def check_sample_rate(sample_rate: object) -> float:
    rate = real_number(sample_rate)
    if rate is None or not 0 < rate <= 1:
        raise PrivacyConfigError(
            f"sample_rate must be in (0, 1], got {sample_rate!r}; "
            "use poisson_sample_rate(dataset_size, batch_size)"
        )
    return rate


def check_count(value: object, name: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PrivacyConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class DPSettings:
    """A site's privacy budget and clipping norm, validated once at the config boundary. The
    defaults are the run's (run config section ``dp``)."""

    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        check_positive_finite(
            self.target_epsilon, "target_epsilon", "pick the site's budget, e.g. 1 to 10"
        )
        delta = real_number(self.target_delta)
        if delta is None or not 0 < delta < 1:
            raise PrivacyConfigError(
                f"target_delta must be in (0, 1), got {self.target_delta!r}; "
                "use a value well below 1 / dataset_size, e.g. 1e-5"
            )
        check_positive_finite(
            self.max_grad_norm, "max_grad_norm", "set the per-sample clipping norm, e.g. 1.0"
        )
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyConfigError(
                f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}"
            )

    def check_dataset_size(self, dataset_size: int) -> None:
        """Reject a delta of 1/n or more: publishing one random record outright meets it."""
        check_count(dataset_size, "dataset_size")
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
        check_positive_finite(self.noise_multiplier, "noise_multiplier", "calibrate it first")
        check_sample_rate(self.sample_rate)
        check_count(self.steps_per_round, "steps_per_round")
        check_count(self.planned_rounds, "planned_rounds")


def poisson_sample_rate(dataset_size: int, batch_size: int) -> float:
    """``1 / len(DataLoader(batch_size))``: the exact float Opacus's ``make_private`` records."""
    check_count(dataset_size, "dataset_size")
    check_count(batch_size, "batch_size")
    return 1 / math.ceil(dataset_size / batch_size)


def steps_per_round(sample_rate: float, local_epochs: int) -> int:
    """``ceil(local_epochs / sample_rate)``, ignoring float noise: ``q = 1/7`` gives 7 per epoch."""
    rate = check_sample_rate(sample_rate)
    epochs = check_count(local_epochs, "local_epochs")
    exact = epochs / rate
    nearest = round(exact)
    if abs(exact - nearest) <= 1e-9 * max(1.0, exact):
        return int(nearest)
    return math.ceil(exact)


def new_accountant(mechanism: str) -> IAccountant:
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
    rate = check_sample_rate(sample_rate)
    total_steps = check_count(steps_per_round, "steps_per_round") * check_count(
        planned_rounds, "planned_rounds"
    )
    tolerance = check_positive_finite(
        epsilon_tolerance, "epsilon_tolerance", "use e.g. 0.01 (Opacus's default)"
    )
    try:
        return _noise_multiplier(
            settings.target_epsilon,
            settings.target_delta,
            rate,
            total_steps,
            settings.accountant,
            tolerance,
        )
    except ValueError as err:
        raise PrivacyConfigError(
            f"cannot reach target_epsilon={settings.target_epsilon} at "
            f"delta={settings.target_delta} over {total_steps} steps at sample_rate={rate} "
            f"({err}); raise the budget, plan fewer rounds or local epochs, or use a larger "
            "dataset / smaller batch"
        ) from err


# Calibration is a pure function of its inputs and costs 1-10 s of Python (Opacus's RDP series
# for fractional orders, about 16 bisection probes): measured 8.5 s for one phantom site of the
# many-sites scenario. Simulated sites share a few Ray worker processes, and many of them have
# the same sample rate and step count, so a process-wide memo makes every repeat free
# (benchmarks/scaling.py). Bounded: an entry is a few floats.
@functools.lru_cache(maxsize=4096)
def _noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    epsilon_tolerance: float,
) -> float:
    """Opacus's ``get_noise_multiplier``, memoised (a ValueError is raised again, not kept)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # The bisection probes huge noise levels whose tiny epsilons sit at the largest RDP
        # order; those probes are not the answer, so their warning is noise in the logs.
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=target_delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=epsilon_tolerance,
            )
        )


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


def compose_steps(
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
    """Epsilon of a history, by a fresh Opacus accountant whose ``.history`` is set to it.

    Memoised process-wide like the noise calibration (0.4 s per call for a phantom site's
    first round): sites in one simulation process often compose the same history.
    """
    if not history:
        return 0.0
    steps = tuple((float(n), float(q), int(k)) for n, q, k in history)
    return _epsilon_of_steps(steps, accountant, float(delta))


@functools.lru_cache(maxsize=4096)
def _epsilon_of_steps(
    steps: tuple[tuple[float, float, int], ...], accountant: str, delta: float
) -> float:
    fresh = new_accountant(accountant)
    fresh.history = list(steps)
    return float(fresh.get_epsilon(delta=delta))
