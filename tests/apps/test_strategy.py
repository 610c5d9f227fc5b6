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
        reply(1, "a", None, good | {"num-examples": 10}),
        reply(2, "b", None, {"loss": 1.0, "accuracy": 1.0, "auc": 0.9, "num-examples": 30}),
        reply(3, "no-weight", None, {"loss": 99.0, "auc": 0.0}),
        reply(4, "nan-weight", None, {"loss": 99.0, "num-examples": float("nan")}),
    ]
    metrics = s.aggregate_evaluate(1, replies)
    assert metrics["loss"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)
    assert metrics["auc"] == pytest.approx((0.7 * 10 + 0.9 * 30) / 40)
    assert metrics["balanced-accuracy"] == pytest.approx(0.5)  # only site a reported it
    events = {e["site"]: e["kind"] for e in s.round_log(1).events}
    assert events == {"no-weight": "evaluate-rejected", "nan-weight": "evaluate-rejected"}
