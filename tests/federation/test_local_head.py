"""Head-sharing "local" (FedPer): each site trains and keeps its own head (segmentation: its
decoder and segmentation head); "shared+local" (FedRoD-style, a classifier's default): the
shared read-out ``head.fc`` travels trained and each site keeps a personal read-out
``head.personal`` whose scores it adds. What a site keeps is sent as the global values
unchanged, so the coordinator never sees it."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import safetensors.torch
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import safe_open, save_file

from core.config import RunConfig
from core.data import HospitalSpec, PhantomSite, generate_hospitals
from core.federation.policy import SitePolicy, release_manifest, released_metrics
from core.federation.rounds import evaluate_round, initial_adapters, train_round
from core.federation.sites import LOCAL_HEAD_FILES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    spec = HospitalSpec((PhantomSite("xr", "xr2d", 40, (32, 32)),), alpha=None)
    generate_hospitals(root, spec, seed=0)
    return root, root / "xr"


def config(root, **values):
    flat = {"data-root": str(root), "in-plane-size": 32, "dp": False, "learning-rate": 0.5}
    return RunConfig.from_flat(flat | values)


def heads(state):
    return {k: v for k, v in state.items() if k.startswith("head.")}


# What a classifier site keeps under each mode, stated here independently of the code.
KEPT = {"local": ("head.",), "shared+local": ("head.personal.",)}
MODES = list(KEPT)


def kept_part(state, mode):
    return {k: v for k, v in state.items() if k.startswith(KEPT[mode])}


def segmentation(root, **values):
    """A small segmentation run on the same site (phantom sites write a mask per case)."""
    small = {"task": "segmentation", "decoder-features": 4, "lora-rank": 2}
    return config(root, **(small | values))


def decoders(state):
    return {k: v for k, v in state.items() if k.startswith(("decoder.", "seg_head."))}


def one_round(cfg, site_dir, global_adapters, digest, *, server_round=1, local_head=None):
    """One training round at the site, without a privacy ledger yet."""
    return train_round(
        cfg,
        site_dir=site_dir,
        global_adapters=global_adapters,
        server_round=server_round,
        expected_fingerprint=digest,
        ledger_state=None,
        local_head=local_head,
    )


@pytest.mark.parametrize("mode", MODES)
def test_the_reply_carries_the_global_head_and_the_site_keeps_its_trained_head(site, mode):
    root, site_dir = site
    cfg = config(root, **{"head-sharing": mode})
    global_adapters, digest = initial_adapters(cfg)
    kwargs = {"site_dir": site_dir, "expected_fingerprint": digest, "ledger_state": None}
    outcome = train_round(cfg, global_adapters=global_adapters, server_round=1, **kwargs)
    assert outcome.adapters is not None and outcome.local_head is not None
    kept = outcome.local_head.tensors
    for key, value in kept_part(global_adapters, mode).items():
        assert torch.equal(outcome.adapters[key], value)  # nothing of the kept part is sent
        assert not torch.equal(kept[key], value)  # but it was trained
    assert set(kept) == set(kept_part(global_adapters, mode)) and kept
    moved = [k for k in global_adapters if "lora_B" in k]
    if mode == "shared+local":  # the shared read-out travels trained, as the adapters do
        moved += ["head.fc.weight", "head.fc.bias"]
    assert all(not torch.equal(outcome.adapters[k], global_adapters[k]) for k in moved[-2:])
    assert any(not torch.equal(outcome.adapters[k], global_adapters[k]) for k in moved)

    # Shared heads send what they trained: the same round, head-sharing "shared" (whose model
    # has no personal read-out).
    shared_cfg = config(root, **{"head-sharing": "shared"})
    shared_global, _ = initial_adapters(shared_cfg)
    assert not any("personal" in k for k in shared_global)
    shared = train_round(shared_cfg, global_adapters=shared_global, server_round=1, **kwargs)
    assert shared.local_head is None and shared.adapters is not None
    assert not torch.equal(shared.adapters["head.fc.weight"], shared_global["head.fc.weight"])


def assert_trains_and_evaluates_from_own(
    cfg, shared, site_dir, global_adapters, digest, own, **evaluate_kwargs
):
    """Training starts from the site's own local part (head or decoder), evaluation uses it
    and says so (``local-head`` 1 / 0), and a shared-head run (``shared``, None: not
    comparable, its model has no such part) ignores it."""
    outcome = one_round(cfg, site_dir, global_adapters, digest, server_round=2, local_head=own)
    assert outcome.local_head is not None
    for key, value in own.items():  # training started from the site's part, not the global one
        torch.testing.assert_close(outcome.local_head.tensors[key], value)
    kwargs = {"site_dir": site_dir, "global_adapters": global_adapters, **evaluate_kwargs}
    with_own = evaluate_round(cfg, expected_fingerprint=digest, local_head=own, **kwargs)
    with_global = evaluate_round(cfg, expected_fingerprint=digest, **kwargs)
    assert with_own["loss"] != pytest.approx(with_global["loss"])
    # Under "local" the metrics say which part they come from: the site's own, or the initial
    # one; under "shared+local" the global one is the trained shared head: nothing to flag.
    if cfg.head_sharing == "local":
        assert (with_own.pop("local-head"), with_global.pop("local-head")) == (1.0, 0.0)
    else:
        assert "local-head" not in with_own and "local-head" not in with_global
    if shared is not None:
        assert evaluate_round(shared, expected_fingerprint=digest, local_head=own, **kwargs) == (
            pytest.approx(with_global, nan_ok=True)
        )


@pytest.mark.parametrize("mode", MODES)
def test_the_site_trains_and_evaluates_from_its_own_head(site, mode):
    root, site_dir = site
    cfg = config(root, **{"learning-rate": 1e-12, "head-sharing": mode})  # a step of ~0
    global_adapters, digest = initial_adapters(cfg)
    own = {k: torch.randn_like(v) for k, v in kept_part(global_adapters, mode).items()}
    # A shared-head run ignores it (its model has no personal read-out to compare under
    # "shared+local").
    shared = config(root, **{"head-sharing": "shared"}) if mode == "local" else None
    assert_trains_and_evaluates_from_own(cfg, shared, site_dir, global_adapters, digest, own)


@pytest.mark.parametrize(
    ("task", "mode"),
    [("classification", "local"), ("classification", "shared+local"), ("segmentation", "local")],
)
def test_a_site_without_its_own_head_starts_from_the_initial_one_not_the_sent_one(site, task, mode):
    """A lying coordinator (or a lying site whose reply it averaged in) sends poisoned values
    for the part the sites keep; a site that has no head of its own yet trains and evaluates
    from the run's seeded initial one, as if the values had been honest."""
    root, site_dir = site
    small_step = {"learning-rate": 1e-12, "head-sharing": mode}
    cfg = config(root, **small_step) if task == "classification" else None
    cfg = cfg or segmentation(root, **small_step)
    honest, digest = initial_adapters(cfg)
    local = kept_part(honest, mode) if task == "classification" else decoders(honest)
    poisoned = honest | {k: torch.randn_like(v) * 100 for k, v in local.items()}
    kwargs = {"site_dir": site_dir, "expected_fingerprint": digest}
    assert evaluate_round(cfg, global_adapters=poisoned, **kwargs) == pytest.approx(
        evaluate_round(cfg, global_adapters=honest, **kwargs),
        nan_ok=True,  # HD95 of empty masks
    )
    outcome = train_round(
        cfg, global_adapters=poisoned, server_round=1, ledger_state=None, **kwargs
    )
    assert outcome.local_head is not None
    for key, value in local.items():  # trained from the initial values (a step of ~0)
        torch.testing.assert_close(outcome.local_head.tensors[key], value)


def test_a_node_keeps_a_classifier_head_and_a_decoder_apart(site, tmp_path):
    """One SuperNode's state folder serves every study on it: a segmentation study must not
    read (and be refused on) the head a classification study kept there, nor overwrite it."""
    from core.federation.local_head import LocalHead

    root, site_dir = site
    kept = {}
    for cfg in (config(root), segmentation(root)):
        global_adapters, digest = initial_adapters(cfg)
        outcome = one_round(cfg, site_dir, global_adapters, digest)
        assert outcome.local_head is not None
        kept[cfg.task] = outcome.local_head
        (tmp_path / LOCAL_HEAD_FILES[cfg.task]).write_bytes(outcome.local_head.to_bytes())
    for task, head in kept.items():
        read = LocalHead.read(tmp_path, task)
        assert read is not None and read.provenance == head.provenance
        assert read.tensors.keys() == head.tensors.keys()


@pytest.mark.parametrize("foreign", ["other-key", "three-classes", "other-mode"])
def test_a_local_head_of_another_configuration_is_refused_by_name(site, foreign):
    root, site_dir = site
    cfg = config(root)  # "shared+local": the site keeps its personal read-out
    global_adapters, digest = initial_adapters(cfg)
    head = {"head.other.weight": torch.zeros(2, 2)}
    if foreign == "three-classes":
        part = kept_part(global_adapters, "shared+local")
        head = {k: torch.zeros(3, *v.shape[1:]) for k, v in part.items()}
    expected = r"another run configuration \(head-sharing.*local-head\.safetensors"
    if foreign == "other-mode":  # a whole head kept under "local" (the default until 2026-12)
        head = kept_part(initial_adapters(config(root, **{"head-sharing": "local"}))[0], "local")
        expected = (
            r"was kept under head-sharing 'local' .*this run uses 'shared\+local'.*Run with "
            r"head-sharing = 'local' to keep using it, or remove local-head\.safetensors"
        )
    with pytest.raises(ValueError, match=expected):
        evaluate_round(
            cfg,
            site_dir=site_dir,
            global_adapters=global_adapters,
            expected_fingerprint=digest,
            local_head=head,
        )


def test_the_reply_carries_the_global_decoder_and_the_site_keeps_its_trained_decoder(site):
    """Segmentation: the whole decoder and the segmentation head stay at the site, bit for
    bit the global values in the reply; the LoRA adapters travel trained."""
    root, site_dir = site
    cfg = segmentation(root)
    assert cfg.keeps_local_head  # the default recipe
    global_adapters, digest = initial_adapters(cfg)
    kwargs = {"site_dir": site_dir, "expected_fingerprint": digest, "ledger_state": None}
    outcome = train_round(cfg, global_adapters=global_adapters, server_round=1, **kwargs)
    assert outcome.adapters is not None and outcome.local_head is not None
    kept = outcome.local_head.tensors
    assert set(kept) == set(decoders(global_adapters)) and kept
    for key, value in decoders(global_adapters).items():
        assert torch.equal(outcome.adapters[key], value)  # nothing of the trained decoder is sent
    assert any(not torch.equal(kept[k], global_adapters[k]) for k in kept)  # but it was trained
    assert any(not torch.equal(kept[k], global_adapters[k]) for k in kept if "seg_head" in k)
    moved = [k for k in global_adapters if "lora_B" in k]
    assert any(not torch.equal(outcome.adapters[k], global_adapters[k]) for k in moved)

    shared = segmentation(root, **{"head-sharing": "shared"})  # the decoder travels trained
    sent = train_round(shared, global_adapters=global_adapters, server_round=1, **kwargs)
    assert sent.local_head is None and sent.adapters is not None
    assert any(not torch.equal(sent.adapters[k], v) for k, v in decoders(global_adapters).items())


def test_the_site_trains_and_evaluates_segmentation_from_its_own_decoder(site):
    root, site_dir = site
    cfg = segmentation(root, **{"learning-rate": 1e-12})  # a step that changes nothing
    global_adapters, digest = initial_adapters(cfg)
    generator = torch.Generator().manual_seed(0)
    own = {
        k: torch.randn(v.shape, generator=generator) for k, v in decoders(global_adapters).items()
    }
    shared = segmentation(root, **{"head-sharing": "shared"})  # a shared-decoder run ignores it
    assert_trains_and_evaluates_from_own(
        cfg, shared, site_dir, global_adapters, digest, own, split="test"
    )


def test_both_tasks_keep_their_head_by_default_and_old_run_folders_shared_theirs():
    default = RunConfig.from_flat({})
    assert default.keeps_local_head and default.head_sharing == "shared+local"
    assert default.to_flat()["head-sharing"] == "shared+local"  # resolved, as run folders record
    segmentation_default = RunConfig.from_flat({"task": "segmentation"})
    assert segmentation_default.keeps_local_head and segmentation_default.head_sharing == "local"
    assert not RunConfig.from_flat({"head-sharing": "shared"}).keeps_local_head
    with pytest.raises(ValueError, match=r"'head-sharing' = 'shared\+local' is invalid: a seg"):
        RunConfig.from_flat({"task": "segmentation", "head-sharing": "shared+local"})
    with pytest.raises(ValueError, match=r"'head-sharing' = 'personal' is invalid: choose one"):
        RunConfig.from_flat({"head-sharing": "personal"})
    # A run folder written before head-sharing and head-norm modes still opens, as it ran.
    old = RunConfig.from_record({"head-norm": True, "head-pool": "contrast"})
    assert (old.head_norm, old.head_sharing, old.keeps_local_head) == ("layer", "shared", False)
    assert RunConfig.from_record({"head-norm": False}).head_norm == "none"


def message(adapters, fingerprint, server_round, kind, node=1):
    """A server message as Flower delivers it to the ClientApp's handlers."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    config = ConfigRecord({"server-round": server_round, "backbone-fingerprint": fingerprint})
    content = RecordDict({"arrays": ArrayRecord(adapters), "config": config})
    return Message(content, dst_node_id=node, message_type=kind)


def node(cfg, partition=0, partitions=1):
    """A fresh simulated node (nothing in its memory): what it keeps is on disk."""
    where = {"partition-id": partition, "num-partitions": partitions}
    return Context(1, partition + 1, where, RecordDict(), cfg.to_flat())


def test_a_kept_head_records_what_it_was_trained_for_and_another_runs_is_refused(site, tmp_path):
    """The real ClientApp handlers, a real state folder: the kept head's file records the
    backbone, head-pool, head-norm as resolved, num-classes, task and the site's datalist. A
    run that differs in any of them (here: another backbone, another head-norm, the site's
    labels swapped; the head's shapes are the same, so shapes alone let it through before)
    refuses to train or evaluate from it, naming the file,
    the field (stored vs current) and the fix, and leaves the file as it was. A head file from
    before provenance is refused too: it cannot be shown to be this run's."""
    from client.app import evaluate, train

    root, site_dir = site
    cfg = config(root, **{"state-root": str(tmp_path / "state")})
    swapped = tmp_path / "swapped"  # the same site with every label swapped
    shutil.copytree(site_dir, swapped / "xr")
    document = json.loads((swapped / "xr" / "dataset.json").read_text())
    for split in ("training", "validation", "test"):
        for entry in document[split]:
            entry["label"] = 1 - entry["label"]
    (swapped / "xr" / "dataset.json").write_text(json.dumps(document))
    datalist = hashlib.sha256((site_dir / "dataset.json").read_bytes()).hexdigest()
    adapters, digest = initial_adapters(cfg)
    reply = train(message(adapters, digest, 1, "train"), node(cfg))
    assert reply.content["site"]["status"] == "trained"
    head_file = tmp_path / "state" / "xr" / "local-head.safetensors"
    with safe_open(str(head_file), framework="pt") as handle:
        assert handle.metadata() == {
            "format": "fedmedvit.local-head",
            "version": "2",
            "backbone_fingerprint": digest,
            "head_pool": "stats",
            "head_norm": "layer",  # "auto" on a backbone without a reference
            "num_classes": "2",
            "task": "classification",
            "datalist_digest": datalist,
        }
    kept = head_file.read_bytes()

    def shapes(state):
        return {k: v.shape for k, v in heads(state).items()}

    for overrides, difference in (
        ({"backbone-seed": 1}, f"backbone fingerprint: stored '{digest}', current '"),
        ({"head-norm": "none"}, "head-norm (resolved): stored 'layer', current 'none'"),
        ({"data-root": str(swapped)}, f"the site's dataset.json (sha256): stored '{datalist}'"),
    ):
        other = RunConfig.from_flat(cfg.to_flat() | overrides)
        other_adapters, other_digest = initial_adapters(other)
        assert shapes(other_adapters) == shapes(adapters)  # the shapes cannot tell
        for handler, kind in ((train, "train"), (evaluate, "evaluate")):
            with pytest.raises(ValueError) as caught:
                handler(message(other_adapters, other_digest, 2, kind), node(other))
            text = str(caught.value)
            assert str(head_file) in text and difference in text, text
            assert "Remove it" in text and "state-dir" in text
        assert head_file.read_bytes() == kept  # neither deleted nor overwritten

    save_file(safetensors.torch.load(kept), str(head_file))  # as the previous version wrote it
    with pytest.raises(ValueError, match=r"local-head\.safetensors predates local-head provenance"):
        evaluate(message(adapters, digest, 1, "evaluate"), node(cfg))


def test_a_site_without_a_head_of_its_own_yet_is_marked_not_reported_as_its_model(tmp_path):
    """Round 1 trains only site a (fraction-train < 1); both evaluate. Site b's numbers come
    from the untrained initial head: its reply says so, and the server's per-round line and
    the report mark them instead of presenting them as site b's model. The report says where
    the heads went."""
    from client.app import evaluate, train
    from server.app import site_progress
    from server.run_files import RunFolder
    from server.strategy import AdapterFedAvg

    spec = HospitalSpec(
        (PhantomSite("a", "xr2d", 30, (32, 32)), PhantomSite("b", "xr2d", 30, (32, 32))),
        alpha=None,
    )
    generate_hospitals(tmp_path / "sites", spec, seed=0)
    cfg = RunConfig.from_flat(  # DP (the default): the report needs the sites' ledgers
        {
            "head-sharing": "local",
            "data-root": str(tmp_path / "sites"),
            "state-root": str(tmp_path / "state"),
            "in-plane-size": 32,
            "batch-size": 8,
            "num-server-rounds": 2,
        }
    )
    adapters, digest = initial_adapters(cfg)
    strategy = AdapterFedAvg(backbone_fingerprint=digest, reference=adapters)
    trained = train(message(adapters, digest, 1, "train", node=1), node(cfg, 0, 2))
    arrays, _ = strategy.aggregate_train(1, [trained])
    assert arrays is not None
    new_global = arrays.to_torch_state_dict()
    replies = [
        evaluate(message(new_global, digest, 1, "evaluate", node=n + 1), node(cfg, n, 2))
        for n in (0, 1)
    ]
    assert [r.content["metrics"]["local-head"] for r in replies] == [1, 0]
    strategy.aggregate_evaluate(1, replies)
    line_a, line_b = site_progress(strategy.round_log(1))
    assert line_b.startswith("round 1 site b: [no local head yet (initial head)]")
    assert "no local head" not in line_a

    folder = RunFolder(tmp_path / "run")
    folder.write_config(cfg)
    folder.save_round(1, new_global, strategy)
    report = (folder.root / "report.md").read_text()
    assert "Classifier heads: **local**. Each site trained and kept its own head; it never " in (
        report
    )
    assert "Evaluated with no local head yet (initial head)" in report
    assert "- Round 1: b\n" in report


def test_the_local_head_flag_leaves_with_the_numbers_it_qualifies():
    """Alone it says nothing (HE by default sends only the example count); with an AUC the
    policy lets out, it goes too, even when the policy does not list it."""
    he = RunConfig.from_flat({"he": True, "he-public-context": "p", "dp": False})
    evaluation = {"num-examples": 6, "auc": 0.7, "local-head": 0.0}
    assert released_metrics(he, SitePolicy(), evaluation) == {"num-examples": 6}
    assert released_metrics(he, SitePolicy(allowed_metrics=("auc",)), evaluation) == evaluation
    local = RunConfig.from_flat({"head-sharing": "local"})
    items = {(i["reply"], i["item"]) for i in release_manifest(local, SitePolicy())}
    assert ("evaluate", "metric local-head") in items
    # "shared+local" (the default): a site without a personal read-out scores with the trained
    # shared head, the federated model itself: no flag.
    assert "metric local-head" not in {
        i["item"] for i in release_manifest(RunConfig(), SitePolicy())
    }
    shared = RunConfig.from_flat({"head-sharing": "shared"})
    assert "metric local-head" not in {i["item"] for i in release_manifest(shared, SitePolicy())}


@pytest.mark.parametrize("dp", [False, True])
def test_what_a_coordinator_learns_of_a_personal_head_from_the_shared_one(site, dp):
    """The hostile coordinator of a "shared+local" run sums a site's changes to the shared
    read-out over its rounds (each reply minus what it sent). Without DP that sum IS the site's
    personal read-out (both read-outs get the same gradient), so the release manifest says the
    personal head is computable; under DP each read-out gets its own noise, and the sum is a
    noisy estimate (covered by the site's epsilon), far from it after two rounds here."""
    root, site_dir = site
    values = {"head-sharing": "shared+local", "num-server-rounds": 2, "batch-size": 8}
    cfg = config(root, **(values | ({"dp": True} if dp else {})))
    sent, digest = initial_adapters(cfg)
    ledger, kept, computed = None, None, torch.zeros_like(sent["head.fc.weight"])
    for server_round in (1, 2):
        outcome = train_round(
            cfg,
            site_dir=site_dir,
            global_adapters=sent,
            server_round=server_round,
            expected_fingerprint=digest,
            ledger_state=ledger,
            local_head=kept,
        )
        assert outcome.adapters is not None and outcome.local_head is not None
        computed += outcome.adapters["head.fc.weight"] - sent["head.fc.weight"]
        ledger, kept, sent = outcome.ledger, outcome.local_head, outcome.adapters
    personal = kept.tensors["head.personal.weight"]
    error = (computed - personal).norm() / personal.norm()
    note = release_manifest(cfg, SitePolicy())[0]["note"]
    if dp:
        assert error > 0.5, float(error)
        assert "coordinator can compute it" not in note
    else:
        assert error < 1e-4, float(error)
        assert "without DP the personal head equals the sum of the shared head's" in note
