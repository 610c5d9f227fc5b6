"""Issue 13, fault 2: one bad upload no longer stops an encrypted study.

Real TenSEAL ciphertexts, real Flower messages, the real site mod (``client.he_mod``) and the
real server strategy: an outsider encrypts under a foreign key made from the public context,
and a key-holding site claims another count than it encrypted. The sites name both, the
server sums again without them, the honest sites' average is the plaintext weighted mean, and
the next round runs. A sum that fails with no upload named is discarded instead.
"""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.he_mod import he_mod
from core.federation import protocol as P
from core.he.ckks import (
    CkksContext,
    encrypt_update,
    load_public_context,
    load_secret_context,
    provision,
)
from core.he.provenance import tag_upload
from core.he.seal import seal_save, sealapi
from core.io import write_bytes_atomic
from server.he_strategy import EncryptedAdapterFedAvg

# 3002 values: two ciphertexts per upload (2047 values each).
REFERENCE = {
    "blocks.0.attn.q_proj.lora_B.weight": torch.zeros(1000, 3),
    "head.bias": torch.zeros(2),
}
COUNTS = {1: 30, 2: 10, 3: 25, 4: 10, 5: 50}  # node -> examples
NAMES = {1: "hospital-a", 2: "hospital-b", 3: "outsider", 4: "liar", 5: "hospital-a"}


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    secret, public = provision(root / "consortium")
    public_ctx = load_public_context(public)
    sa = sealapi()
    foreign_key = sa.KeyGenerator(
        public_ctx.seal_context
    ).secret_key()  # public context + a new key
    foreign = CkksContext(public_ctx.serialize_public(), seal_save(foreign_key))
    foreign_path = root / "foreign" / "site_secret.ctx"
    foreign_path.parent.mkdir()
    write_bytes_atomic(foreign_path, foreign.serialize_secret(), mode=0o600)
    return {"secret": secret, "public": public, "foreign": foreign_path}


class Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def update(node: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(node)
    return {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in REFERENCE.items()}


def context(node: int, keys, tmp_path, *, foreign: bool = False) -> Context:
    """Every node gets the same run config; each names its own secret context in its node
    config (the outsider's holds a foreign key)."""
    run_config = {"he": True, "he-public-context": str(keys["public"])}
    node_config = {
        "data-dir": str(tmp_path / NAMES[node]),
        "site-name": NAMES[node],
        "he-secret-context": str(keys["foreign" if foreign else "secret"]),
    }
    return Context(1, node, node_config, RecordDict(), run_config)


def trainer(node: int, count: int, seen: dict):
    def handler(msg: Message, ctx: Context) -> Message:
        seen[node] = msg.content[P.ARRAYS].to_torch_state_dict()
        site = ConfigRecord(
            {"name": NAMES[node], "status": "trained", "reason": "", "privacy-ledger": ""}
        )
        metrics = MetricRecord({P.NUM_EXAMPLES: count, P.TRAIN_LOSS: 0.5})
        content = RecordDict(
            {P.ARRAYS: ArrayRecord(update(node)), P.METRICS: metrics, P.SITE: site}
        )
        return Message(content, reply_to=msg)

    return handler


def evaluator(node: int, seen: dict):
    def handler(msg: Message, ctx: Context) -> Message:
        seen[node] = msg.content[P.ARRAYS].to_torch_state_dict()
        content = RecordDict(
            {
                P.METRICS: MetricRecord({"loss": 0.1, P.NUM_EXAMPLES: 5}),
                P.SITE: ConfigRecord({"name": NAMES[node]}),
            }
        )
        return Message(content, reply_to=msg)

    return handler


def by_node(messages) -> dict[int, Message]:
    return {m.metadata.dst_node_id: m for m in messages}


def weighted_mean(nodes) -> dict[str, torch.Tensor]:
    total = sum(COUNTS[n] for n in nodes)
    return {k: sum(COUNTS[n] * update(n)[k].double() for n in nodes) / total for k in REFERENCE}


def assert_close_to(adapters, expected):
    for key in REFERENCE:
        np.testing.assert_allclose(
            adapters[key].numpy(), expected[key].numpy(), rtol=1e-5, atol=1e-6
        )


def strategy(keys) -> EncryptedAdapterFedAvg:
    return EncryptedAdapterFedAvg(
        public_context=load_public_context(keys["public"]),
        reference=REFERENCE,
        backbone_fingerprint="f" * 64,
        min_train_nodes=2,
        min_available_nodes=2,
    )


def evaluate(s, server_round, arrays, nodes, keys, tmp_path, seen):
    messages = by_node(s.configure_evaluate(server_round, arrays, ConfigRecord(), Grid(nodes)))
    replies = [
        he_mod(messages[n], context(n, keys, tmp_path, foreign=n == 3), evaluator(n, seen))
        for n in nodes
    ]
    s.aggregate_evaluate(server_round, replies)
    return replies


def test_outsider_and_count_liar_are_named_and_left_out_and_the_study_goes_on(keys, tmp_path):
    s = strategy(keys)
    nodes = [1, 2, 3, 4]
    seen: dict[int, dict] = {}
    initial = ArrayRecord({k: v.clone() for k, v in REFERENCE.items()})
    messages = by_node(s.configure_train(1, initial, ConfigRecord(), Grid(nodes)))
    replies = []
    for n in nodes:
        claimed = COUNTS[n]
        encrypted_count = 4 * claimed if n == 4 else claimed  # the liar's slot disagrees
        ctx = context(n, keys, tmp_path, foreign=n == 3)
        reply = he_mod(messages[n], ctx, trainer(n, encrypted_count, seen))
        if n == 4:  # a key holder: it re-tags the upload with the count it claims
            secret = load_secret_context(keys["secret"])
            redo = encrypt_update(update(4), encrypted_count, secret)
            assert redo.layout.to_json() == reply.content[P.SITE][P.HE_LAYOUT]
            ciphertexts = P.arrays_to_ciphertexts(
                {k: v.numpy() for k, v in reply.content[P.ARRAYS].items()}
            )
            reply.content[P.METRICS][P.NUM_EXAMPLES] = claimed
            reply.content[P.SITE][P.HE_TAG] = tag_upload(
                ciphertexts,
                secret_ctx=secret,
                server_round=1,
                site="liar",
                num_examples=claimed,
                layout=redo.layout,
            )
        replies.append(reply)
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None
    assert s.global_total == sum(COUNTS[n] for n in nodes)  # the server cannot tell: sums all

    # The sites name both bad uploads instead of evaluating; the handler never runs.
    seen.clear()
    verdicts = evaluate(s, 1, arrays, nodes, keys, tmp_path, seen)
    assert seen == {} and all(P.HE_VERDICT in r.content[P.SITE] for r in verdicts)
    revised = s.revise(1)
    assert revised is not None
    log = s.rounds[1]
    assert log.status == {
        "hospital-a": "trained",
        "hospital-b": "trained",
        "outsider": "rejected",
        "liar": "rejected",
    }
    reasons = {e["site"]: e["reason"] for e in log.events if e["kind"] == "rejected"}
    assert "tag does not verify" in reasons["outsider"]
    assert "count slot decrypts to 40" in reasons["liar"] and "claims 10" in reasons["liar"]

    # Summed again without them: the honest sites decrypt the plaintext weighted mean.
    evaluate(s, 1, revised, [1, 2], keys, tmp_path, seen)
    assert s.revise(1) is None
    assert_close_to(seen[1], weighted_mean([1, 2]))
    assert_close_to(seen[2], weighted_mean([1, 2]))

    # The study goes on: round 2 starts from that global and sums again. A new node (5)
    # replying as hospital-a is rejected: the name belongs to node 1.
    seen.clear()
    messages = by_node(s.configure_train(2, revised, ConfigRecord(), Grid([1, 2, 5])))
    replies = [
        he_mod(messages[n], context(n, keys, tmp_path), trainer(n, COUNTS[n], seen))
        for n in (1, 2, 5)
    ]
    assert_close_to(seen[1], weighted_mean([1, 2]))
    arrays, _ = s.aggregate_train(2, replies)
    assert arrays is not None and s.global_total == COUNTS[1] + COUNTS[2]
    seen.clear()
    evaluate(s, 2, arrays, [1, 2], keys, tmp_path, seen)
    assert s.revise(2) is None
    assert_close_to(seen[1], weighted_mean([1, 2]))
    assert s.rounds[2].status == {
        "hospital-a": "trained",
        "hospital-b": "trained",
        "node-5": "rejected",
    }


def test_a_sum_that_fails_with_no_upload_named_is_discarded(keys, tmp_path):
    """A key holder whose count slot disagrees only in its second ciphertext passes every
    per-upload check; the sum still fails at the sites, so the round's sum is discarded, the
    previous global (here the plaintext round-0 adapters) kept, and the next round runs."""
    s = strategy(keys)
    nodes = [1, 2, 4]
    seen: dict[int, dict] = {}
    initial = ArrayRecord({k: v.clone() for k, v in REFERENCE.items()})
    messages = by_node(s.configure_train(1, initial, ConfigRecord(), Grid(nodes)))
    replies = []
    for n in nodes:
        reply = he_mod(messages[n], context(n, keys, tmp_path), trainer(n, COUNTS[n], seen))
        if n == 4:
            secret = load_secret_context(keys["secret"])
            other = encrypt_update(update(4), 4 * COUNTS[4], secret)
            ciphertexts = P.arrays_to_ciphertexts(
                {k: v.numpy() for k, v in reply.content[P.ARRAYS].items()}
            )
            mixed = [ciphertexts[0], other.ciphertexts[1]]
            reply.content[P.ARRAYS] = ArrayRecord(
                {k: Array(v) for k, v in P.ciphertexts_to_arrays(mixed).items()}
            )
            reply.content[P.SITE][P.HE_TAG] = tag_upload(
                mixed,
                secret_ctx=secret,
                server_round=1,
                site="liar",
                num_examples=COUNTS[4],
                layout=other.layout,
            )
        replies.append(reply)
    arrays, _ = s.aggregate_train(1, replies)
    seen.clear()
    evaluate(s, 1, arrays, nodes, keys, tmp_path, seen)
    assert seen == {}
    previous = s.revise(1)
    assert previous is not None and s.global_total is None  # back to the plaintext global
    log = s.rounds[1]
    assert set(log.status.values()) == {"discarded"}
    assert any(e["kind"] == "discarded" and "count slots" in e["reason"] for e in log.events)
    evaluate(s, 1, previous, nodes, keys, tmp_path, seen)
    assert s.revise(1) is None
    assert_close_to(seen[1], {k: v.double() for k, v in REFERENCE.items()})
    messages = by_node(s.configure_train(2, previous, ConfigRecord(), Grid([1, 2])))
    assert P.HE_TOTAL not in messages[1].content[P.CONFIG]
    replies = [
        he_mod(messages[n], context(n, keys, tmp_path), trainer(n, COUNTS[n], seen)) for n in (1, 2)
    ]
    arrays, _ = s.aggregate_train(2, replies)
    assert arrays is not None and s.rounds[2].status == {
        "hospital-a": "trained",
        "hospital-b": "trained",
    }


def test_an_encrypted_count_claim_beyond_the_ckks_range_is_rejected(keys, tmp_path):
    """Issue 13, fault 4: an HE claim of 2^63 (or anything a count slot cannot hold) is
    rejected before summation; the cap is the smaller of the run config's and the CKKS one."""
    s = strategy(keys)
    assert s.max_examples == int(load_public_context(keys["public"]).max_abs_per_site) < 10**6
    seen: dict[int, dict] = {}
    initial = ArrayRecord({k: v.clone() for k, v in REFERENCE.items()})
    messages = by_node(s.configure_train(1, initial, ConfigRecord(), Grid([1, 2])))
    replies = [
        he_mod(messages[n], context(n, keys, tmp_path), trainer(n, COUNTS[n], seen)) for n in (1, 2)
    ]
    replies[1].content[P.METRICS][P.NUM_EXAMPLES] = 2**63
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None and s.global_total == COUNTS[1]
    assert s.rounds[1].status == {"hospital-a": "trained", "hospital-b": "rejected"}
    # Malformed encrypted arrays (none, floats, a layout that is not JSON): events, no raise.
    for bad in ("empty", "floats", "layout"):
        reply = he_mod(messages[2], context(2, keys, tmp_path), trainer(2, COUNTS[2], seen))
        if bad == "empty":
            reply.content[P.ARRAYS] = ArrayRecord()
        elif bad == "floats":
            reply.content[P.ARRAYS] = ArrayRecord({"ct-00000": Array(np.zeros(3, np.float32))})
        else:
            reply.content[P.SITE][P.HE_LAYOUT] = "{not json"
        assert s.aggregate_train(2, [reply]) == (None, None)
        assert s.rounds[2].status == {"hospital-b": "rejected"}


class SitesGrid(Grid):
    """Delivers the ServerApp's messages to in-process sites running the real HE mod."""

    def __init__(self, nodes, keys, tmp_path, seen):
        super().__init__(nodes)
        self.keys, self.tmp_path, self.seen = keys, tmp_path, seen

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            ctx = context(node, self.keys, self.tmp_path, foreign=node == 3)
            is_train = msg.metadata.message_type == "train"
            handler = (
                trainer(node, COUNTS[node], self.seen) if is_train else evaluator(node, self.seen)
            )
            replies.append(he_mod(msg, ctx, handler))
        return replies


def test_the_serverapp_loop_leaves_the_outsider_out_every_round(keys, tmp_path):
    """``server.app.run_rounds``: the outsider's upload is named by the sites and left out in
    each round, every round's checkpoint is written, and the honest average comes through."""
    import json

    from server.app import run_rounds
    from server.run_files import RunFolder

    seen: dict[int, dict] = {}
    s = strategy(keys)
    folder = RunFolder(tmp_path / "run")
    run_rounds(
        s,
        SitesGrid([1, 2, 3], keys, tmp_path, seen),
        folder,
        arrays=ArrayRecord({k: v.clone() for k, v in REFERENCE.items()}),
        first_round=1,
        num_rounds=2,
        timeout=60.0,
    )
    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    # Round 2: the outsider cannot even read the global; its reply is a verdict (an error).
    for entry, outsider in zip(rounds, ["rejected", "error"], strict=True):
        assert entry["status"] == {
            "hospital-a": "trained",
            "hospital-b": "trained",
            "outsider": outsider,
        }
        assert entry["evaluate"]["loss"] == pytest.approx(0.1)
        # The round's wall time, for the scaling benchmark (benchmarks/scaling.py).
        seconds = entry["seconds"]
        assert set(seconds) == {"train", "evaluate", "round"}
        assert seconds["train"] > 0 and seconds["evaluate"] > 0
        assert seconds["round"] == pytest.approx(seconds["train"] + seconds["evaluate"])
    assert_close_to(seen[1], weighted_mean([1, 2]))
    latest = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    assert latest["round"] == 2 and latest["strategy"]["global_total"] == COUNTS[1] + COUNTS[2]
