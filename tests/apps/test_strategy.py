"""Adapter-only FedAvg against fake Flower replies: exact weighted means, refusals, bad updates."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

from server.strategy import AdapterFedAvg

REFERENCE = {"blocks.0.attn.q_proj.lora_B.weight": torch.zeros(4, 2), "head.bias": torch.zeros(2)}


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def reply(node: int, name: str, arrays=None, metrics=None, status="trained", reason=""):
    instruction = Message(
        RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train"
    )
    site = ConfigRecord({"name": name, "status": status, "reason": reason, "privacy-ledger": ""})
    content = RecordDict({"metrics": MetricRecord(metrics or {}), "site": site})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: v.clone() for k, v in arrays.items()})
    return Message(content, reply_to=instruction)


def eval_reply(node: int, name: str, metrics):
    instruction = Message(
        RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="evaluate"
    )
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": name})})
    return Message(content, reply_to=instruction)


def strategy():
    return AdapterFedAvg(backbone_fingerprint="f" * 64, reference=REFERENCE, max_update_norm=100.0)


def random_update(seed: int):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in REFERENCE.items()}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=1000), min_size=1, max_size=8))
def test_weighted_mean_equals_brute_force(counts):
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    updates = [random_update(i) for i in range(len(counts))]
    replies = [
        reply(i + 1, f"site-{i}", u, {"num-examples": n, "train-loss": float(i)})
        for i, (u, n) in enumerate(zip(updates, counts, strict=True))
    ]
    arrays, metrics = strategy().aggregate_train(1, replies)
    result = arrays.to_torch_state_dict()
    for key in REFERENCE:
        expected = sum(n * u[key].double() for u, n in zip(updates, counts, strict=True)) / sum(
            counts
        )
        np.testing.assert_allclose(result[key].numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    expected_loss = sum(i * n for i, n in enumerate(counts)) / sum(counts)
    assert metrics["loss"] == pytest.approx(expected_loss)


def test_bad_replies_are_left_out_and_the_round_goes_on():
    good = random_update(0)
    nan = {k: v.clone() for k, v in good.items()}
    nan["head.bias"][0] = float("nan")
    replies = [
        reply(1, "good", good, {"num-examples": 10, "train-loss": 0.5}),
        reply(2, "wrong-keys", {"x": torch.zeros(1)}, {"num-examples": 10}),
        reply(3, "wrong-shape", good | {"head.bias": torch.zeros(3)}, {"num-examples": 10}),
        reply(4, "nan", nan, {"num-examples": 10}),
        reply(5, "huge", {k: v * 1e6 for k, v in good.items()}, {"num-examples": 10}),
        reply(
            6, "ints", good | {"head.bias": torch.zeros(2, dtype=torch.int64)}, {"num-examples": 10}
        ),
        reply(7, "no-weight", good, {}),
        reply(8, "refuser", None, {"num-examples": 0}, status="refused", reason="budget"),
    ]
    lost = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=9, message_type="train")
    dropped = Message(Error(code=1, reason="site crashed"), reply_to=lost)
    s = strategy()
    arrays, _ = s.aggregate_train(3, [*replies, dropped])
    for key, value in arrays.to_torch_state_dict().items():
        torch.testing.assert_close(value, good[key])
    log = s.rounds[3]
    assert log.status == {
        "good": "trained",
        "wrong-keys": "rejected",
        "wrong-shape": "rejected",
        "nan": "rejected",
        "huge": "rejected",
        "ints": "rejected",
        "no-weight": "rejected",
        "refuser": "refused",
        "node-9": "error",
    }
    reasons = {e["site"]: e["reason"] for e in log.events}
    assert "missing" in reasons["wrong-keys"] and "shape" in reasons["wrong-shape"]
    assert "NaN" in reasons["nan"] and "norm" in reasons["huge"] and "dtype" in reasons["ints"]
    assert reasons["refuser"] == "budget" and reasons["node-9"] == "site crashed"
    json.dumps(log.to_json())  # metrics.json stays valid JSON (no NaN)


def test_no_valid_reply_keeps_the_global_adapters():
    s = strategy()
    arrays, metrics = s.aggregate_train(
        1, [reply(1, "a", None, {"num-examples": 0}, status="refused")]
    )
    assert arrays is None and metrics is None


def test_fingerprint_is_announced():
    s = strategy()

    class OneNodeGrid:
        def get_node_ids(self):
            return [5, 6]

    messages = list(
        s.configure_train(1, ArrayRecord(REFERENCE), ConfigRecord(), OneNodeGrid())  # type: ignore[arg-type]
    )
    assert {m.content["config"]["backbone-fingerprint"] for m in messages} == {"f" * 64}


def test_evaluation_is_example_weighted_and_malformed_replies_are_left_out():
    s = strategy()
    good = {"loss": 0.5, "accuracy": 0.6, "balanced-accuracy": 0.5, "auc": 0.7}
    replies = [
        eval_reply(1, "a", good | {"num-examples": 10}),
        eval_reply(2, "b", {"loss": 1.0, "accuracy": 1.0, "auc": 0.9, "num-examples": 30}),
        eval_reply(3, "no-weight", {"loss": 99.0, "auc": 0.0}),
        eval_reply(4, "nan-weight", {"loss": 99.0, "num-examples": float("nan")}),
    ]
    metrics = s.aggregate_evaluate(1, replies)
    assert metrics["loss"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)
    assert metrics["auc"] == pytest.approx((0.7 * 10 + 0.9 * 30) / 40)
    assert metrics["balanced-accuracy"] == pytest.approx(0.5)  # only site a reported it
    events = {e["site"]: e["kind"] for e in s.round_log(1).events}
    assert events == {"no-weight": "evaluate-rejected", "nan-weight": "evaluate-rejected"}


# --- issue 13: every reply validated as a whole; weights bounded; sites bound to nodes ---


def with_ledger(msg: Message, ledger: str) -> Message:
    msg.content["site"]["privacy-ledger"] = ledger
    return msg


def assert_only(arrays: ArrayRecord, expected: dict[str, torch.Tensor]) -> None:
    for key, value in arrays.to_torch_state_dict().items():
        torch.testing.assert_close(value, expected[key])


def test_a_malformed_reply_is_rejected_with_an_event_never_an_exception(tmp_path):
    """Fault 3: an extra MetricRecord (with or without a weight), a ledger that is not JSON,
    nested too deeply, too large or not a ledger: each reply is left out with an event, the
    honest site's update is the average, and the run folder still saves the round."""
    from server.run_files import RunFolder

    good = random_update(0)
    extra_weight = reply(2, "extra-weight", random_update(2), {"num-examples": 10})
    extra_weight.content["weights"] = MetricRecord({"num-examples": 10_000})
    extra_record = reply(3, "extra-record", random_update(3), {"num-examples": 10})
    extra_record.content["metrics"] = MetricRecord({"accuracy": 1.0})  # count moved away
    extra_record.content["zzz"] = MetricRecord({"num-examples": 10})
    extra_key = reply(4, "extra-key", random_update(4), {"num-examples": 10})
    extra_key.content["site"]["run-this"] = "rm -rf /"
    bad_ledgers = {
        "not-json": "{not json",
        "deep": "[" * 100_000 + "]" * 100_000,
        "huge": json.dumps({"pad": "x" * 300_000}),
        "not-a-ledger": json.dumps({"version": 1, "settings": [[[[]]]]}),
    }
    replies = [
        reply(1, "good", good, {"num-examples": 10}),
        extra_weight,
        extra_record,
        extra_key,
        *[
            with_ledger(reply(10 + i, name, random_update(10 + i), {"num-examples": 10}), text)
            for i, (name, text) in enumerate(bad_ledgers.items())
        ],
    ]
    s = strategy()
    arrays, _ = s.aggregate_train(1, replies)
    assert_only(arrays, good)
    log = s.rounds[1]
    assert log.status["good"] == "trained"
    assert {k for k, v in log.status.items() if v == "rejected"} == {
        "extra-weight",
        "extra-record",
        "extra-key",
        *bad_ledgers,
    }
    reasons = {e["site"]: e["reason"] for e in log.events}
    assert "records" in reasons["extra-weight"] and "keys ['run-this']" in reasons["extra-key"]
    assert "too deeply" in reasons["deep"] and "bytes" in reasons["huge"]
    assert s.ledgers == {}
    RunFolder(tmp_path).save_round(1, arrays.to_torch_state_dict(), s)  # no LedgerFormatError
    # The evaluate phase is held to its own shape the same way.
    odd = eval_reply(5, "good", {"loss": 0.1, "num-examples": 3})
    odd.content["more"] = MetricRecord({"num-examples": 99})
    assert s.aggregate_evaluate(1, [odd]) is None
    assert s.rounds[1].events[-1]["kind"] == "evaluate-rejected"


@pytest.mark.parametrize(
    "count",
    [1e300, 1.7e308, float("inf"), 2**63, 1_000_001, 10.0, 0, -5],
    ids=str,
)
def test_example_counts_must_be_bounded_positive_integers(count):
    """Fault 4: a claimed count that is not an int in [1, max-examples] is rejected, so it can
    neither take over the average nor overflow the total (two 1.7e308 claims)."""
    good = random_update(0)
    replies = [
        reply(1, "good", good, {"num-examples": 7}),
        reply(2, "liar", random_update(1), {"num-examples": count}),
        reply(3, "liar-2", random_update(2), {"num-examples": count}),
    ]
    s = strategy()
    arrays, _ = s.aggregate_train(1, replies)
    assert_only(arrays, good)
    assert s.rounds[1].status == {"good": "trained", "liar": "rejected", "liar-2": "rejected"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_only_float32_updates_are_averaged(dtype):
    """Fault 4: the first site's dtype no longer becomes the global's."""
    good = random_update(0)
    other = {k: v.to(dtype) for k, v in random_update(1).items()}
    s = strategy()
    arrays, _ = s.aggregate_train(
        1,
        [reply(1, "odd", other, {"num-examples": 5}), reply(2, "good", good, {"num-examples": 5})],
    )
    assert_only(arrays, good)
    assert {v.dtype for v in arrays.to_torch_state_dict().values()} == {torch.float32}
    assert "float32" in s.rounds[1].events[0]["reason"]


def test_a_second_node_claiming_a_site_name_is_rejected():
    """Fault 4: a site is the node that first used its name; a third node replying as
    hospital-1 cannot overwrite its ledger or its update, in train or evaluate."""
    s = strategy()
    first = [
        reply(1, "hospital-1", random_update(1), {"num-examples": 5}),
        reply(2, "hospital-2", random_update(2), {"num-examples": 5}),
    ]
    s.aggregate_train(1, first)
    assert s.node_of_site == {"hospital-1": 1, "hospital-2": 2}
    impostor = reply(3, "hospital-1", random_update(3), {"num-examples": 50})
    honest = reply(1, "hospital-1", random_update(4), {"num-examples": 5})
    arrays, _ = s.aggregate_train(2, [impostor, honest])
    assert_only(arrays, random_update(4))
    assert s.rounds[2].status == {"hospital-1": "trained", "node-3": "rejected"}
    assert "node 1 already is" in s.rounds[2].events[0]["reason"]
    # A bound node cannot switch names either, and evaluation is bound the same way.
    switch = reply(2, "hospital-1", random_update(5), {"num-examples": 5})
    s.aggregate_train(3, [switch])
    assert s.rounds[3].status == {"hospital-2": "rejected"}
    metrics = s.aggregate_evaluate(
        3,
        [
            eval_reply(3, "hospital-1", {"loss": 9.0, "num-examples": 100}),
            eval_reply(1, "hospital-1", {"loss": 1.0, "num-examples": 5}),
        ],
    )
    assert metrics["loss"] == pytest.approx(1.0)


def test_two_new_nodes_claiming_one_name_at_first_contact_are_both_left_out():
    s = strategy()
    replies = [
        reply(1, "hospital-1", random_update(1), {"num-examples": 5}),
        reply(2, "hospital-1", random_update(2), {"num-examples": 5}),
        reply(3, "hospital-3", random_update(3), {"num-examples": 5}),
    ]
    arrays, _ = s.aggregate_train(1, replies)
    assert_only(arrays, random_update(3))
    assert s.node_of_site == {"hospital-3": 3}
