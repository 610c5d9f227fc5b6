"""Cumulative DP accounting: oracles are Opacus itself and Google's dp_accounting."""

from __future__ import annotations

import copy
import functools
import json
import math
import warnings

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from core.privacy.errors import AccountantMismatchError, LedgerFormatError, PrivacyConfigError
from core.privacy.ledger import PrivacyLedger
from core.privacy.plan import (
    AccountantStep,
    DPPlan,
    DPSettings,
    calibrate_noise,
    epsilon_of_history,
    plan_dp,
    poisson_sample_rate,
    steps_per_round,
)

DELTA = 1e-5
SETTINGS = DPSettings(target_epsilon=3.0, target_delta=DELTA, max_grad_norm=1.0)
DATASET_SIZE = 1000
# Three rounds with a change of noise and rate in the middle, so merging and order both matter.
ROUNDS = [(1.1, 0.1, 10), (1.1, 0.1, 10), (1.5, 0.05, 20)]


def _ledger(settings: DPSettings = SETTINGS, rounds=ROUNDS) -> PrivacyLedger:
    ledger = PrivacyLedger(settings, dataset_size=DATASET_SIZE)
    for server_round, (noise, rate, steps) in enumerate(rounds, start=1):
        ledger.record_round(server_round, noise, rate, steps)
    return ledger


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon must be a finite number > 0, got 0.0"),
        ({"target_epsilon": math.inf}, "target_epsilon must be a finite number > 0, got inf"),
        ({"target_delta": 0.0}, "target_delta must be in (0, 1), got 0.0"),
        ({"target_delta": 1.0}, "target_delta must be in (0, 1), got 1.0"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be a finite number > 0, got -1.0"),
        ({"accountant": "gdp"}, "accountant must be one of ('rdp', 'prv'), got 'gdp'"),
        ({"target_epsilon": True}, "target_epsilon must be a finite number > 0, got True"),
    ],
)
def test_settings_reject_bad_values_naming_them(kwargs, fragment):
    base = {"target_epsilon": 3.0, "target_delta": DELTA, "max_grad_norm": 1.0}
    with pytest.raises(PrivacyConfigError) as excinfo:
        DPSettings(**(base | kwargs))
    assert fragment in str(excinfo.value)


def test_delta_must_be_below_one_over_dataset_size():
    settings = DPSettings(target_epsilon=3.0, target_delta=0.01, max_grad_norm=1.0)
    settings.check_dataset_size(99)
    with pytest.raises(PrivacyConfigError, match=r"target_delta=0.01 is not below 1/dataset_size"):
        PrivacyLedger(settings, dataset_size=100)


def test_sample_rate_and_steps_match_what_opacus_records():
    import torch

    for dataset_size, batch_size in [(1000, 10), (1000, 64), (93, 1), (7, 1), (40, 10)]:
        loader = torch.utils.data.DataLoader(range(dataset_size), batch_size=batch_size)
        # PrivacyEngine.make_private records exactly 1 / len(data_loader).
        assert poisson_sample_rate(dataset_size, batch_size) == 1 / len(loader)
    assert steps_per_round(1 / 7, 1) == 7
    assert steps_per_round(1 / 93, 2) == 186  # int(1 / (1/93)) is 92 in floating point
    assert steps_per_round(0.3, 1) == 4
    assert steps_per_round(0.25, 3) == 12
    with pytest.raises(PrivacyConfigError, match="sample_rate must be in"):
        steps_per_round(1.5, 1)


# -- calibration ----------------------------------------------------------------------------


def test_plan_calibrates_noise_exactly_as_opacus_over_all_planned_steps():
    # 1000 images in batches of 100: q = 0.1, 2 local epochs = 20 steps, 5 rounds = 100 steps.
    plan = plan_dp(SETTINGS, dataset_size=1000, batch_size=100, local_epochs=2, planned_rounds=5)
    assert (plan.sample_rate, plan.steps_per_round, plan.planned_rounds) == (0.1, 20, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = get_noise_multiplier(
            target_epsilon=3.0, target_delta=DELTA, sample_rate=0.1, steps=100, accountant="rdp"
        )
    assert plan.noise_multiplier == expected
    assert plan.noise_multiplier == 1.796875  # Opacus 1.6.0, bisection with tolerance 0.01


def test_calibrated_noise_reaches_target_after_planned_rounds_and_not_before():
    planned_rounds, steps, rate = 4, 10, 0.1
    noise = calibrate_noise(SETTINGS, rate, steps, planned_rounds)
    ledger = PrivacyLedger(SETTINGS, dataset_size=DATASET_SIZE)
    epsilons = []
    for server_round in range(1, planned_rounds + 1):
        assert ledger.check_budget(noise, rate, steps).allowed
        epsilons.append(ledger.record_round(server_round, noise, rate, steps).epsilon)
    assert epsilons[-2] < SETTINGS.target_epsilon - 0.01
    assert SETTINGS.target_epsilon - 0.01 <= epsilons[-1] <= SETTINGS.target_epsilon
    assert not ledger.check_budget(noise, rate, steps).allowed


def test_a_repeated_calibration_or_epsilon_is_computed_once_and_the_same(monkeypatch):
    """Sites sharing a simulation process often plan with the same sample rate and steps
    (benchmarks/scaling.py: 8.5 s each before); the second site reuses the first's result,
    which equals Opacus's own answer, and a PRV plan is not served from the RDP one. Opacus
    runs for real; the spies only count its calls."""
    import opacus.accountants.utils

    settings = DPSettings(target_epsilon=7.25, target_delta=DELTA, max_grad_norm=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = get_noise_multiplier(
            target_epsilon=7.25, target_delta=DELTA, sample_rate=0.3, steps=8, accountant="rdp"
        )
    reference = RDPAccountant()
    reference.history = [(expected, 0.3, 8)]
    expected_eps = {d: reference.get_epsilon(delta=d) for d in (DELTA, 1e-6)}
    calls = {"noise": 0, "epsilon": 0}

    def counted(name, real):
        def spy(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return spy

    real_noise = opacus.accountants.utils.get_noise_multiplier
    monkeypatch.setattr(
        opacus.accountants.utils, "get_noise_multiplier", counted("noise", real_noise)
    )
    monkeypatch.setattr(RDPAccountant, "get_epsilon", counted("epsilon", RDPAccountant.get_epsilon))
    plans = [calibrate_noise(settings, 0.3, 4, 2) for _ in range(50)]
    assert plans == [expected] * 50 and calls["noise"] == 1
    prv = calibrate_noise(DPSettings(7.25, DELTA, 1.0, accountant="prv"), 0.3, 4, 2)
    assert prv != expected and calls["noise"] == 2
    calls["epsilon"] = 0  # the calibrations' own probes counted too
    for history in ([AccountantStep(expected, 0.3, 8)], [(expected, 0.3, 8)]):
        for _ in range(20):
            assert epsilon_of_history(history, "rdp", DELTA) == expected_eps[DELTA]
    assert epsilon_of_history([(expected, 0.3, 8)], "rdp", 1e-6) == expected_eps[1e-6]
    assert calls["epsilon"] == 2  # one per delta


def test_unreachable_budget_is_a_clear_error():
    tiny = DPSettings(target_epsilon=1e-4, target_delta=DELTA, max_grad_norm=1.0)
    with pytest.raises(PrivacyConfigError, match=r"cannot reach target_epsilon=0\.0001"):
        calibrate_noise(tiny, 1.0, 1000, 100)


# -- epsilon against independent oracles -------------------------------------------------------


def test_rdp_epsilon_matches_google_dp_accounting_within_one_percent():
    dp_accounting = pytest.importorskip("dp_accounting")
    # Same orders as Opacus so the RDP-to-(eps, delta) conversion searches the same grid.
    oracle = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    ledger = PrivacyLedger(SETTINGS, dataset_size=DATASET_SIZE)
    for server_round, (noise, rate, steps) in enumerate(ROUNDS, start=1):
        record = ledger.record_round(server_round, noise, rate, steps)
        event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
        oracle.compose(event, steps)
        assert record.epsilon == pytest.approx(oracle.get_epsilon(DELTA), rel=0.01)


@pytest.mark.parametrize(
    ("accountant", "make_oracle"), [("rdp", RDPAccountant), ("prv", PRVAccountant)]
)
def test_epsilon_equals_one_opacus_accountant_stepped_round_by_round(accountant, make_oracle):
    settings = DPSettings(3.0, DELTA, 1.0, accountant=accountant)
    ledger = PrivacyLedger(settings, dataset_size=DATASET_SIZE)
    oracle = make_oracle()
    for server_round, (noise, rate, steps) in enumerate(ROUNDS, start=1):
        for _ in range(steps):
            oracle.step(noise_multiplier=noise, sample_rate=rate)
        record = ledger.record_round(server_round, noise, rate, steps)
        assert record.epsilon == oracle.get_epsilon(DELTA)
    assert list(ledger.history) == oracle.history


def test_epsilon_strictly_increases_and_refusal_does_not_change_it():
    ledger = _full_ledger()  # three recorded rounds, then a refusal
    epsilons = [record.epsilon for record in ledger.records]
    assert epsilons[0] < epsilons[1] < epsilons[2] == epsilons[3] == ledger.epsilon()
    refusal = ledger.records[3]
    assert refusal.refused and refusal.reason == "would exceed | budget"
    assert (refusal.steps, refusal.noise_multiplier, refusal.sample_rate) == (0, None, None)


def test_projected_epsilon_adds_one_round_without_mutating():
    ledger = PrivacyLedger(SETTINGS, dataset_size=DATASET_SIZE, history=[(1.1, 0.1, 20)])
    projected = ledger.projected_epsilon(1.1, 0.1, 10)
    assert ledger.history == ((1.1, 0.1, 20),)
    assert projected == epsilon_of_history([(1.1, 0.1, 30)], "rdp", DELTA)
    assert ledger.epsilon(1e-6) > ledger.epsilon()  # smaller delta, larger epsilon


def test_history_is_kept_in_opacus_compressed_form():
    assert _full_ledger().history == (
        AccountantStep(1.1, 0.1, 20),
        AccountantStep(1.5, 0.05, 20),
    )
    given = [(1.1, 0.1, 10), (1.1, 0.1, 10), (1.5, 0.05, 20)]
    assert PrivacyLedger(SETTINGS, dataset_size=DATASET_SIZE, history=given).history == (
        (1.1, 0.1, 20),
        (1.5, 0.05, 20),
    )


# -- budget ---------------------------------------------------------------------------------


def test_budget_check_allows_below_target_and_refuses_above():
    spent = [(1.1, 0.1, 20)]
    current = epsilon_of_history(spent, "rdp", DELTA)
    projected = epsilon_of_history([(1.1, 0.1, 30)], "rdp", DELTA)

    def ledger_with_target(target_epsilon: float) -> PrivacyLedger:
        settings = DPSettings(target_epsilon, DELTA, 1.0)
        return PrivacyLedger(settings, dataset_size=DATASET_SIZE, history=spent)

    allowed = ledger_with_target(projected + 0.01).check_budget(1.1, 0.1, 10)
    assert allowed.allowed
    assert (allowed.current_epsilon, allowed.projected_epsilon) == (current, projected)

    tight = ledger_with_target(projected - 0.01)
    refused = tight.check_budget(1.1, 0.1, 10)
    assert not refused.allowed
    assert f"from {current:.3f} to {projected:.3f}" in refused.reason
    assert f"target {projected - 0.01:.3f}" in refused.reason
    record = tight.record_refusal(3, refused.reason)
    assert record.refused and record.reason == refused.reason
    assert record.epsilon == current


def test_bad_round_parameters_are_rejected_naming_the_value():
    ledger = PrivacyLedger(SETTINGS, dataset_size=DATASET_SIZE)
    with pytest.raises(PrivacyConfigError, match="noise_multiplier must be a finite number > 0"):
        ledger.check_budget(0.0, 0.1, 10)
    with pytest.raises(PrivacyConfigError, match="steps must be an integer >= 1, got 0"):
        ledger.record_round(1, 1.0, 0.1, 0)
    with pytest.raises(PrivacyConfigError, match="server_round must be an integer >= 1, got 0"):
        ledger.record_refusal(0, "x")


# -- serialisation --------------------------------------------------------------------------


@functools.cache
def _full_ledger_dict() -> dict:
    """Built once: recording computes an epsilon per round, which is the slow part."""
    ledger = PrivacyLedger(
        SETTINGS,
        dataset_size=DATASET_SIZE,
        plan=DPPlan(noise_multiplier=1.1, sample_rate=0.1, steps_per_round=10, planned_rounds=3),
    )
    for server_round, (noise, rate, steps) in enumerate(ROUNDS, start=1):
        ledger.record_round(server_round, noise, rate, steps)
    ledger.record_refusal(4, "would exceed | budget")
    return ledger.to_dict()


def _full_ledger() -> PrivacyLedger:
    return PrivacyLedger.from_dict(copy.deepcopy(_full_ledger_dict()))


def _assert_same(restored: PrivacyLedger, original: PrivacyLedger) -> None:
    assert restored.epsilon() == original.epsilon()
    assert restored.history == original.history
    assert restored.records == original.records
    assert restored.settings == original.settings
    assert restored.plan == original.plan
    assert restored.dataset_size == original.dataset_size


def test_config_record_form_round_trips_and_holds_only_flower_types():
    original = _full_ledger()
    record = original.to_record()
    for key, value in record.items():
        if isinstance(value, list):
            assert len({type(item) for item in value}) <= 1, key
            assert all(isinstance(item, int | float | str) for item in value), key
        else:
            assert isinstance(value, int | float | str | bool), key
    assert record["history_noise"] == [1.1, 1.5]
    assert record["history_rate"] == [0.1, 0.05]
    assert record["history_steps"] == [20, 20]
    # Through JSON as well, as a stand-in for the wire.
    _assert_same(PrivacyLedger.from_record(json.loads(json.dumps(record))), original)


def test_json_file_round_trips_exactly(tmp_path):
    original = _full_ledger()
    path = original.save(tmp_path / "site" / "ledger.json")
    assert [p.name for p in path.parent.iterdir()] == ["ledger.json"]  # no temp file left
    _assert_same(PrivacyLedger.load(path), original)


def test_restored_ledger_continues_without_losing_or_double_counting():
    straight = _full_ledger()  # the same three rounds in one ledger (then a refusal)
    first = _ledger(rounds=ROUNDS[:1])
    resumed = PrivacyLedger.from_record(first.to_record())
    for server_round, (noise, rate, steps) in enumerate(ROUNDS[1:], start=2):
        resumed.record_round(server_round, noise, rate, steps)
    assert resumed.history == straight.history
    assert resumed.records == straight.records[:3]
    assert resumed.epsilon() == straight.epsilon()


def test_resume_or_start_checks_the_site_settings():
    fresh = PrivacyLedger.resume_or_start(None, settings=SETTINGS, dataset_size=DATASET_SIZE)
    assert fresh.epsilon() == 0.0 and not fresh.records
    state = _full_ledger().to_record()
    resumed = PrivacyLedger.resume_or_start(state, settings=SETTINGS, dataset_size=DATASET_SIZE)
    assert resumed.history == _full_ledger().history
    as_dict = _full_ledger_dict()  # the JSON-file form is accepted as well
    resumed = PrivacyLedger.resume_or_start(as_dict, settings=SETTINGS, dataset_size=DATASET_SIZE)
    assert resumed.records == _full_ledger().records
    other = DPSettings(target_epsilon=8.0, target_delta=DELTA, max_grad_norm=1.0)
    with pytest.raises(PrivacyConfigError, match="keep the site's settings fixed"):
        PrivacyLedger.resume_or_start(state, settings=other, dataset_size=DATASET_SIZE)


def test_malformed_state_names_the_field(tmp_path):
    data = copy.deepcopy(_full_ledger_dict())
    del data["settings"]["target_delta"]
    with pytest.raises(LedgerFormatError, match=r"ledger\.settings\.target_delta: missing field"):
        PrivacyLedger.from_dict(data)

    data = copy.deepcopy(_full_ledger_dict())
    data["rounds"][1]["epsilon"] = "high"
    with pytest.raises(LedgerFormatError, match=r"rounds\[1\]\.epsilon: expected a finite number"):
        PrivacyLedger.from_dict(data)

    record = _full_ledger().to_record()
    record["history_steps"] = [20]
    with pytest.raises(LedgerFormatError, match="must have equal lengths, got 2, 2 and 1"):
        PrivacyLedger.from_record(record)

    bad_file = tmp_path / "ledger.json"
    bad_file.write_text("{not json")
    with pytest.raises(LedgerFormatError, match=r"ledger\.json: not valid JSON"):
        PrivacyLedger.load(bad_file)


def test_plan_is_adopted_once():
    ledger = PrivacyLedger(SETTINGS, dataset_size=DATASET_SIZE)
    plan = DPPlan(noise_multiplier=1.1, sample_rate=0.1, steps_per_round=10, planned_rounds=3)
    assert ledger.adopt_plan(plan) is plan
    assert ledger.adopt_plan(plan) is plan
    with pytest.raises(PrivacyConfigError, match="calibrated once per run"):
        ledger.adopt_plan(DPPlan(2.0, 0.1, 10, 3))


# -- the Opacus accountant bridge --------------------------------------------------------------


def _step(accountant, noise, rate, steps):
    for _ in range(steps):
        accountant.step(noise_multiplier=noise, sample_rate=rate)


def test_restore_and_update_gives_the_same_epsilon_as_recording():
    through_opacus = PrivacyLedger(SETTINGS, dataset_size=DATASET_SIZE)
    for server_round, (noise, rate, steps) in enumerate(ROUNDS, start=1):
        accountant = RDPAccountant()  # a new PrivacyEngine every round, as a ClientApp does
        through_opacus.restore_into(accountant)
        _step(accountant, noise, rate, steps)
        record = through_opacus.update_from(accountant, server_round)
        assert (record.noise_multiplier, record.sample_rate, record.steps) == (noise, rate, steps)
    recorded = _full_ledger().records[:3]  # the same rounds through record_round
    assert through_opacus.records == recorded
    assert through_opacus.epsilon() == recorded[-1].epsilon


def test_update_from_rejects_an_accountant_that_was_not_restored_or_was_reset():
    ledger = _ledger(rounds=ROUNDS[:1])
    expected = ledger.epsilon()
    fresh = RDPAccountant()  # forgot restore_into: only this round's steps
    _step(fresh, 1.1, 0.1, 15)  # same (noise, rate): its history alone looks like a continuation
    with pytest.raises(AccountantMismatchError, match="never restored"):
        ledger.update_from(fresh, 2)

    accountant = RDPAccountant()
    ledger.restore_into(accountant)
    accountant.history = []  # e.g. load_state_dict of an old checkpoint
    _step(accountant, 1.1, 0.1, 5)
    with pytest.raises(
        AccountantMismatchError, match=r"\(5 steps\) does not continue .* \(10 steps\)"
    ):
        ledger.update_from(accountant, 2)

    idle = RDPAccountant()
    ledger.restore_into(idle)
    with pytest.raises(AccountantMismatchError, match="took no steps"):
        ledger.update_from(idle, 2)
    assert ledger.epsilon() == expected and len(ledger.records) == 1

    with pytest.raises(AccountantMismatchError, match=r"PrivacyEngine\(accountant='rdp'\)"):
        ledger.restore_into(PRVAccountant())


def test_mixed_round_is_summarised_conservatively():
    ledger = PrivacyLedger(SETTINGS, dataset_size=DATASET_SIZE)
    accountant = RDPAccountant()
    ledger.restore_into(accountant)
    _step(accountant, 1.1, 0.1, 5)
    _step(accountant, 1.5, 0.2, 5)
    record = ledger.update_from(accountant, 1)
    assert (record.noise_multiplier, record.sample_rate, record.steps) == (1.1, 0.2, 10)
    assert record.epsilon == epsilon_of_history(accountant.history, "rdp", DELTA)


# Test-only: the non-secure RNG is fine here, and the tiny model's inputs need no gradient.
@pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning")
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_privacy_engine_training_loop_matches_recorded_rounds():
    """The real path: a new PrivacyEngine per round whose accountant steps from the ledger."""
    torch = pytest.importorskip("torch")
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    dataset = torch.utils.data.TensorDataset(torch.randn(40, 4), torch.randint(0, 2, (40,)))
    plan = DPPlan(
        noise_multiplier=1.3,
        sample_rate=poisson_sample_rate(40, 10),
        steps_per_round=steps_per_round(poisson_sample_rate(40, 10), 1),
        planned_rounds=2,
    )
    ledger = PrivacyLedger(SETTINGS, dataset_size=40, plan=plan)
    for server_round in (1, 2):
        model = torch.nn.Linear(4, 2)
        engine = PrivacyEngine(accountant="rdp")
        ledger.restore_into(engine.accountant)
        module, optimizer, loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=torch.utils.data.DataLoader(dataset, batch_size=10),
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=SETTINGS.max_grad_norm,
        )
        steps = 0
        while steps < plan.steps_per_round:
            for features, labels in loader:
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(module(features), labels).backward()
                optimizer.step()
                steps += 1
                if steps == plan.steps_per_round:
                    break
        ledger.update_from(engine.accountant, server_round)
        assert engine.get_epsilon(DELTA) == ledger.epsilon()

    recorded = PrivacyLedger(SETTINGS, dataset_size=40)  # path (b): record what was planned
    for server_round in (1, 2):
        recorded.record_round(server_round, 1.3, plan.sample_rate, plan.steps_per_round)
    assert ledger.records == recorded.records
    assert ledger.history == recorded.history == ((1.3, 0.25, 8),)  # 2 rounds of 4 steps


def test_prv_accountant_path_calibrates_records_and_refuses():
    settings = DPSettings(
        target_epsilon=2.0, target_delta=DELTA, max_grad_norm=1.0, accountant="prv"
    )
    # A coarse tolerance keeps the PRV bisection short; the guarantee is checked against it.
    noise = calibrate_noise(settings, 0.05, 10, planned_rounds=2, epsilon_tolerance=0.1)
    ledger = PrivacyLedger(settings, dataset_size=DATASET_SIZE)
    for server_round in (1, 2):
        accountant = PRVAccountant()
        ledger.restore_into(accountant)
        _step(accountant, noise, 0.05, 10)
        ledger.update_from(accountant, server_round)
    assert 2.0 - 0.1 <= ledger.epsilon() <= 2.0
    assert ledger.epsilon() == accountant.get_epsilon(DELTA)
    assert not ledger.check_budget(noise, 0.05, 10).allowed
