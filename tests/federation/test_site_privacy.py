"""A site's privacy holds against the coordinator: fresh noise for every release, each round
number trained once (a re-sent round costs nothing), a ledger that cannot silently restart,
the site's own policy, only allowed metrics leave, errors without patient data, and no budget
spent on an update HE cannot carry. Real Opacus, real TenSEAL, real files; no Flower server."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from core.config import RunConfig
from core.data import HospitalSpec, PhantomSite, generate_hospitals
from core.federation.policy import (
    PolicyError,
    SitePolicy,
    load_policy,
    release_manifest,
    released_metrics,
)
from core.federation.rounds import Release, initial_adapters, train_round
from core.privacy.ledger import PrivacyLedger

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def site_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    spec = HospitalSpec((PhantomSite("xr", "xr2d", 30, (32, 32)),), alpha=None)
    generate_hospitals(root, spec, seed=0)
    cfg = RunConfig.from_flat(
        {"data-root": str(root), "in-plane-size": 32, "batch-size": 8, "num-server-rounds": 3}
    )
    return cfg, root / "xr"


def one_round(cfg, site_dir, *, server_round=1, ledger=None, adapters=None, **kwargs):
    initial, digest = initial_adapters(cfg)
    return train_round(
        cfg,
        site_dir=site_dir,
        global_adapters=initial if adapters is None else adapters,
        server_round=server_round,
        expected_fingerprint=digest,
        ledger_state=ledger,
        **kwargs,
    )


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_release_draws_fresh_noise_the_server_cannot_choose(site_cfg):
    """Same global model, same round number, same site, fresh ledgers: today a site seeded its
    noise from the round number, so the two updates were bit-identical and their difference
    cancelled the noise. Now the seeds come from the OS CSPRNG."""
    cfg, site_dir = site_cfg
    first = one_round(cfg, site_dir)
    second = one_round(cfg, site_dir)
    assert first.status == second.status == "trained"
    sent = [k for k in first.adapters if "lora_B" in k or k.startswith("head.fc.")]
    assert sent and all(not torch.equal(first.adapters[k], second.adapters[k]) for k in sent)
    assert first.local_head is not None and second.local_head is not None  # the personal head
    first_head, second_head = first.local_head.tensors, second.local_head.tensors
    assert not torch.equal(first_head["head.personal.weight"], second_head["head.personal.weight"])


def test_a_trained_round_number_is_refused_with_another_global_and_replayed_with_the_same(
    site_cfg,
):
    cfg, site_dir = site_cfg
    initial, _ = initial_adapters(cfg)
    first = one_round(cfg, site_dir)
    assert first.status == "trained" and first.release is not None
    epsilon = first.metrics["epsilon"]

    other = {k: v + 0.01 for k, v in initial.items()}  # another global under round 1
    refused = one_round(cfg, site_dir, ledger=first.ledger, adapters=other, last_release=None)
    assert refused.status == "refused" and refused.adapters is None
    assert "replay refused" in refused.reason and "round 1" in refused.reason
    ledger = PrivacyLedger.from_dict(refused.ledger)
    assert ledger.epsilon() == epsilon and ledger.records[-1].replay

    # The coordinator crashed and re-sends round 1 with the same global: the kept release,
    # bit for bit (through its on-disk form), at no new privacy cost.
    kept = Release.from_bytes(first.release.to_bytes(), source="test")
    again = one_round(cfg, site_dir, ledger=refused.ledger, last_release=kept)
    assert again.status == "trained" and again.replayed and again.release is None
    assert same(again.adapters, first.adapters)
    assert again.metrics == first.metrics
    replayed = PrivacyLedger.from_dict(again.ledger)
    assert replayed.epsilon() == epsilon and replayed.total_steps == ledger.total_steps
    assert [r.trained for r in replayed.records] == [True, False, False]

    # Without the kept release the same re-sent round is refused, never trained twice.
    lost = one_round(cfg, site_dir, ledger=again.ledger, last_release=None)
    assert lost.status == "refused" and "no longer keeps" in lost.reason
    # An earlier round number after a later one was trained is refused too.
    later = one_round(cfg, site_dir, server_round=3, ledger=lost.ledger, adapters=other)
    assert later.status == "trained"
    back = one_round(cfg, site_dir, server_round=2, ledger=later.ledger)
    assert back.status == "refused" and "must increase" in back.reason


def test_a_dp_site_without_its_ledger_after_round_1_refuses_before_opening_data(tmp_path):
    cfg = RunConfig.from_flat({"in-plane-size": 32, "num-server-rounds": 3})
    outcome = one_round(cfg, tmp_path / "no-data-here", server_round=2)
    assert outcome.status == "refused" and "no privacy ledger" in outcome.reason
    assert outcome.adapters is None and outcome.ledger is None


STRICT = """\
require-dp = true
require-he = true
max-epsilon = 4.0
min-noise-multiplier = 0.5
max-rounds = 2
allowed-metrics = ["num-examples", "auc"]
"""


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"dp": False}, "require-dp"),
        ({"he": False}, "require-he"),
        ({"target-epsilon": 1e6}, "max-epsilon 4"),
    ],
)
def test_the_site_policy_refuses_a_weaker_run_config_before_touching_data(
    tmp_path, override, words
):
    """The data folder holds only the site's policy: a refusal that opened data would fail."""
    (tmp_path / "policy.toml").write_text(STRICT)
    policy = load_policy(tmp_path, {})
    keys = tmp_path / "keys"
    from core.he.ckks import provision

    secret, public = provision(keys)
    base = {
        "in-plane-size": 32,
        "target-epsilon": 4.0,
        "he": True,
        "he-public-context": str(public),
    }
    cfg = RunConfig.from_flat(base | override)
    outcome = one_round(cfg, tmp_path, policy=policy, he_secret_context=secret)
    assert outcome.status == "refused" and words in outcome.reason
    assert str(tmp_path / "policy.toml") in outcome.reason
    past = one_round(
        RunConfig.from_flat(base), tmp_path, server_round=3, policy=policy, he_secret_context=secret
    )
    assert past.status == "refused" and "max-rounds 2" in past.reason


def test_policy_from_node_config_overrides_the_file_and_bad_values_name_the_key(tmp_path):
    (tmp_path / "policy.toml").write_text(STRICT)
    policy = load_policy(tmp_path, {"policy-max-epsilon": 2.0, "policy-require-he": "false"})
    assert policy.max_epsilon == 2.0 and not policy.require_he and policy.require_dp
    assert policy.allowed_metrics == ("num-examples", "auc")
    assert "node config" in policy.source
    with pytest.raises(PolicyError, match="'max-rounds'"):
        load_policy(tmp_path, {"policy-max-rounds": 0})
    with pytest.raises(PolicyError, match="unknown key 'max-eps'"):
        load_policy(tmp_path, {"policy-max-eps": 1.0})


def test_the_noise_floor_of_the_policy_is_checked_after_planning(site_cfg):
    cfg, site_dir = site_cfg
    outcome = one_round(cfg, site_dir, policy=SitePolicy(min_noise_multiplier=50.0))
    assert outcome.status == "refused" and "min-noise-multiplier 50" in outcome.reason
    assert PrivacyLedger.from_dict(outcome.ledger).epsilon() == 0.0


def test_under_dp_the_training_loss_never_leaves_and_he_sends_only_the_weight(site_cfg):
    cfg, site_dir = site_cfg
    outcome = one_round(cfg, site_dir)
    assert "train-loss" not in outcome.metrics
    sent = released_metrics(cfg, SitePolicy(), {**outcome.metrics, "train-loss": 0.5})
    assert "train-loss" not in sent and sent["num-examples"] == 18
    allow_loss = SitePolicy(allowed_metrics=("train-loss", "epsilon"))
    assert set(released_metrics(cfg, allow_loss, {**sent, "train-loss": 0.5})) == {
        "num-examples",
        "epsilon",
    }
    he = RunConfig.from_flat({"he": True, "he-public-context": "p", "dp": False})
    evaluation = {"num-examples": 6, "auc": 0.7, "loss": 0.6, "accuracy": 0.5}
    assert released_metrics(he, SitePolicy(), evaluation) == {"num-examples": 6}
    assert released_metrics(he, SitePolicy(allowed_metrics=("auc",)), evaluation) == {
        "num-examples": 6,
        "auc": 0.7,
    }
    manifest = release_manifest(cfg, SitePolicy())
    assert [i["item"] for i in manifest if i["covered"]] == ["adapter update"]
    assert "metric train-loss" not in [i["item"] for i in manifest]
    assert {"metric auc", "privacy ledger"} <= {i["item"] for i in manifest}
    he_items = {(i["reply"], i["item"]) for i in release_manifest(he, SitePolicy())}
    assert he_items == {
        ("train", "adapter update"),
        ("train", "metric num-examples"),
        ("evaluate", "metric num-examples"),
    }


def test_an_update_he_cannot_carry_is_refused_before_any_budget_is_spent(site_cfg, tmp_path):
    from core.he.ckks import CkksParams, provision

    cfg, site_dir = site_cfg
    # scale 2^52 leaves one site about 1.3 of weighted value: 18 examples cannot be encrypted.
    secret, public = provision(tmp_path, CkksParams(scale_bits=52))
    he = RunConfig.from_flat(cfg.to_flat() | {"he": True, "he-public-context": str(public)})
    outcome = one_round(he, site_dir, he_secret_context=secret)
    assert outcome.status == "refused" and "CKKS capacity" in outcome.reason
    ledger = PrivacyLedger.from_dict(outcome.ledger)
    assert ledger.total_steps == 0 and ledger.epsilon() == 0.0
    no_dp = RunConfig.from_flat(he.to_flat() | {"dp": False})
    plain = one_round(no_dp, site_dir, he_secret_context=secret)
    assert plain.status == "refused" and "CKKS capacity" in plain.reason


def test_a_missing_patient_file_leaves_the_site_as_an_error_id_only(site_cfg, tmp_path):
    """The real ClientApp (with its mods), a real Flower message, the real strategy and run
    folder: the patient-named file appears in the site's own error log and in no file the
    server writes."""
    from client.app import app
    from core.federation.rounds import initial_adapters as initial
    from server.run_files import RunFolder
    from server.strategy import AdapterFedAvg

    cfg, site_dir = site_cfg
    data_root = tmp_path / "data"
    shutil.copytree(site_dir, data_root / "xr")
    datalist = data_root / "xr" / "dataset.json"
    document = json.loads(datalist.read_text())
    document["training"][0]["image"] = "images/DOE_JOHN_1961.nii.gz"
    datalist.write_text(json.dumps(document))
    state = tmp_path / "state"
    run_config = cfg.to_flat() | {"data-root": str(data_root), "state-root": str(state)}
    adapters, fingerprint = initial(cfg)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    instruction = Message(
        RecordDict(
            {
                "arrays": ArrayRecord(adapters),
                "config": ConfigRecord({"server-round": 1, "backbone-fingerprint": fingerprint}),
            }
        ),
        dst_node_id=1,
        message_type="train",
    )
    context = Context(1, 1, {"partition-id": 0, "num-partitions": 1}, RecordDict(), run_config)
    answer = app(instruction, context)
    assert answer.has_error() and "error id" in answer.error.reason
    assert "DOE_JOHN" not in answer.error.reason and str(data_root) not in answer.error.reason

    strategy = AdapterFedAvg(backbone_fingerprint=fingerprint, reference=adapters)
    strategy.aggregate_train(1, [answer])
    folder = RunFolder(tmp_path / "run")
    folder.save_round(1, adapters, strategy)
    written = [p for p in folder.root.rglob("*") if p.is_file()]
    assert written and not any(b"DOE_JOHN" in p.read_bytes() for p in written)
    assert "DOE_JOHN_1961" in (state / "xr" / "errors.log").read_text()


def _instruction(adapters, fingerprint, server_round):
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    return Message(
        RecordDict(
            {
                "arrays": ArrayRecord(adapters),
                "config": ConfigRecord(
                    {"server-round": server_round, "backbone-fingerprint": fingerprint}
                ),
            }
        ),
        dst_node_id=1,
        message_type="train",
    )


def test_a_restarted_site_continues_its_ledger_from_its_state_folder(site_cfg, tmp_path):
    """The real ClientApp handler, restarted before every round (a new Context: node memory
    gone): round 2 continues the ledger on disk, a re-sent round 2 with the same global gets
    the kept release bit for bit at no cost, another global under round 2 is refused, and the
    same site with its state folder lost refuses."""
    from client.app import train

    cfg, site_dir = site_cfg
    adapters, fingerprint = initial_adapters(cfg)
    run_config = cfg.to_flat() | {"data-root": str(site_dir.parent)}
    node = {"partition-id": 0, "num-partitions": 1}

    def answer(server_round, state_root, global_adapters=adapters):
        values = run_config | {"state-root": str(state_root)}
        message = _instruction(global_adapters, fingerprint, server_round)
        reply = train(message, Context(1, 1, node, RecordDict(), values))
        site = reply.content["site"]
        statement = json.loads(str(site["privacy-ledger"]) or "null")
        update = (
            reply.content["arrays"].to_torch_state_dict() if "arrays" in reply.content else None
        )
        return str(site["status"]), str(site["reason"]), reply.content["metrics"], statement, update

    status, _, metrics, _, _ = answer(1, tmp_path / "state")
    assert status == "trained" and "train-loss" not in metrics
    status, _, metrics, statement, update = answer(2, tmp_path / "state")
    ledger = PrivacyLedger.from_dict(statement)
    assert status == "trained" and [r.server_round for r in ledger.records] == [1, 2]
    assert metrics["epsilon"] == ledger.epsilon() > ledger.records[0].epsilon
    assert statement["policy"]["source"].startswith("none") and statement["released"]

    status, reason, again, statement, resent = answer(2, tmp_path / "state")
    assert status == "trained" and "already trained" in reason and same(resent, update)
    assert again["epsilon"] == metrics["epsilon"]
    assert PrivacyLedger.from_dict(statement).epsilon() == ledger.epsilon()
    other = {k: v + 0.01 for k, v in adapters.items()}
    status, reason, _, statement, none = answer(2, tmp_path / "state", other)
    assert status == "refused" and "replay refused" in reason and none is None
    assert PrivacyLedger.from_dict(statement).epsilon() == ledger.epsilon()

    status, reason, _, _, _ = answer(2, tmp_path / "lost")
    assert status == "refused" and "no privacy ledger" in reason
