"""A run folder read back at a site: ``fedmedvit explain`` and ``fedmedvit decrypt`` use the
run's backbone and the site's own head, or refuse by name. A real run folder (the ClientApp's
train handler, the server's strategy and RunFolder), real backbone files, real CKKS."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import save_file

from core.adapters.lora import adapter_state, load_adapter_folder
from core.config import RunConfig
from core.data import HospitalSpec, PhantomSite, generate_hospitals
from core.federation.rounds import build_backbone, build_lora_model, initial_adapters
from core.model.checkpoint import save_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def backbone_file(path, seed):
    """A seeded micro backbone saved as a checkpoint; returns its fingerprint."""
    model, _ = build_backbone(RunConfig.from_flat({"backbone-seed": seed}))
    return save_backbone(model, path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One trained round of a one-site run on a backbone file, as the server leaves it:
    config.json, checkpoints (latest.json records the backbone), final adapters, and the
    site's head in the run folder's state (as a simulation writes it)."""
    from client.app import train
    from server.run_files import RunFolder
    from server.strategy import AdapterFedAvg

    root = tmp_path_factory.mktemp("run-folder")
    spec = HospitalSpec((PhantomSite("xr", "xr2d", 20, (32, 32)),), alpha=None)
    generate_hospitals(root / "sites", spec, seed=0)
    digest = backbone_file(root / "backbone.safetensors", seed=0)
    cfg = RunConfig.from_flat(
        {
            "data-root": str(root / "sites"),
            "state-root": str(root / "run" / "state"),
            "backbone": str(root / "backbone.safetensors"),
            "in-plane-size": 32,
            "dp": False,
            "num-server-rounds": 1,
        }
    )
    adapters, announced = initial_adapters(cfg)
    assert announced == digest
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    config = ConfigRecord({"server-round": 1, "backbone-fingerprint": digest})
    instruction = Message(
        RecordDict({"arrays": ArrayRecord(adapters), "config": config}),
        dst_node_id=1,
        message_type="train",
    )
    node = Context(1, 1, {"partition-id": 0, "num-partitions": 1}, RecordDict(), cfg.to_flat())
    reply = train(instruction, node)
    strategy = AdapterFedAvg(backbone_fingerprint=digest, reference=adapters)
    arrays, _ = strategy.aggregate_train(1, [reply])
    assert arrays is not None
    folder = RunFolder(root / "run")
    folder.write_config(cfg)
    folder.save_round(1, arrays.to_torch_state_dict(), strategy)
    folder.save_final_adapters(cfg, arrays.to_torch_state_dict())
    return root, cfg, digest, arrays.to_torch_state_dict()


@pytest.fixture
def other_backbone(run):
    """The run's backbone file replaced by another one of the same size (then restored)."""
    root, _, _, _ = run
    path = root / "backbone.safetensors"
    kept = root / "kept.safetensors"
    shutil.copy(path, kept)
    digest = backbone_file(path, seed=1)
    yield path, digest
    shutil.copy(kept, path)


def explain(run, capsys, tmp_path, *extra):
    from client.explain import main

    root, _, _, _ = run
    site = ["--site-dir", str(root / "sites" / "xr"), "--out", str(tmp_path / "out")]
    capsys.readouterr()
    code = main([str(root / "run"), *site, "--limit", "1", *extra])
    return code, capsys.readouterr().err


def test_explain_names_the_head_file_it_loaded_and_refuses_a_head_of_unknown_provenance(
    run, capsys, tmp_path
):
    root, _, digest, _ = run
    code, _ = explain(run, capsys, tmp_path)
    assert code == 0
    index = (tmp_path / "out" / "index.html").read_text()
    head_file = root / "run" / "state" / "xr" / "local-head.safetensors"
    assert f"the site's personal read-out <code>{head_file}</code>" in index  # shared+local
    assert f"adapters <code>{root / 'run' / 'adapters'}</code>" in index
    assert f"backbone <code>{digest[:12]}</code>" in index

    # The same tensors without their provenance, as the previous version wrote them.
    state = tmp_path / "old-state"
    state.mkdir()
    save_file(safetensors.torch.load(head_file.read_bytes()), str(state / head_file.name))
    code, err = explain(run, capsys, tmp_path, "--state-dir", str(state))
    assert code == 2 and err.startswith("error: ")
    assert f"{state / head_file.name} predates local-head provenance" in err
    assert "Remove it" in err and "--state-dir" in err


def test_explain_refuses_a_backbone_that_is_not_the_runs(run, capsys, tmp_path, other_backbone):
    path, other = other_backbone
    _, _, digest, _ = run
    code, err = explain(run, capsys, tmp_path)
    assert code == 2 and err.startswith("error: ")
    assert f"backbone file {path} has fingerprint {other}" in err
    assert f"was trained on backbone {digest}" in err
    assert not (tmp_path / "out" / "index.html").exists()


def test_a_run_recorded_before_fingerprints_covered_the_config_is_still_read(run, tmp_path):
    """Run folders written before the fingerprint covered the architecture config recorded
    the tensors' digest alone: they are read on the same tensors (decrypt, explain and resume
    must still reach them); any other recorded value is still refused."""
    from core.federation.runs import build_run_model
    from core.model.checkpoint import BackboneError, backbone_state, tensors_digest

    root, cfg, digest, _ = run
    run_dir = tmp_path / "old-run"
    shutil.copytree(root / "run", run_dir)
    latest = run_dir / "checkpoints" / "latest.json"
    state = json.loads(latest.read_text())
    backbone, _ = build_backbone(cfg)
    for recorded, readable in ((tensors_digest(backbone_state(backbone)), True), ("0" * 64, False)):
        latest.write_text(json.dumps(state | {"backbone_fingerprint": recorded}))
        if readable:
            assert build_run_model(run_dir)[2] == digest
        else:
            with pytest.raises(BackboneError, match="was trained on backbone"):
                build_run_model(run_dir)


def test_decrypt_refuses_a_backbone_that_is_not_the_runs(run, tmp_path, capsys):
    """An encrypted run's folder (the HE strategy's checkpoint of a real CKKS sum): decrypts
    on the run's backbone, refuses before decrypting on another one."""
    from client.decrypt import main
    from core.federation.protocol import ciphertexts_to_arrays
    from core.he.ckks import encrypt_update, load_public_context, load_secret_context, provision
    from server.he_strategy import EncryptedAdapterFedAvg
    from server.run_files import RunFolder

    root, cfg, digest, adapters = run
    secret, public = provision(tmp_path / "he")
    he = RunConfig.from_flat(cfg.to_flat() | {"he": True, "he-public-context": str(public)})
    update = encrypt_update(adapters, 20, load_secret_context(secret))
    strategy = EncryptedAdapterFedAvg(
        public_context=load_public_context(public), backbone_fingerprint=digest, reference=adapters
    )
    strategy.global_total = 20
    folder = RunFolder(tmp_path / "he-run")
    folder.write_config(he)
    arrays = ciphertexts_to_arrays(update.ciphertexts)
    folder.save_round(1, {k: torch.from_numpy(v) for k, v in arrays.items()}, strategy)

    out = tmp_path / "decrypted"
    assert main([str(folder.root), "--secret-context", str(secret), "--out", str(out)]) == 0
    model, _ = build_lora_model(cfg)
    load_adapter_folder(model, out)
    for key, value in adapter_state(model).items():  # the run's adapters, through CKKS
        torch.testing.assert_close(value, adapters[key], rtol=1e-5, atol=1e-6)

    path = root / "backbone.safetensors"
    kept = path.read_bytes()
    try:
        other = backbone_file(path, seed=1)
        capsys.readouterr()
        again = tmp_path / "again"
        code = main([str(folder.root), "--secret-context", str(secret), "--out", str(again)])
        err = capsys.readouterr().err
    finally:
        path.write_bytes(kept)
    assert code == 2 and f"backbone file {path} has fingerprint {other}" in err
    assert f"was trained on backbone {digest}" in err and not again.exists()
    latest = json.loads((folder.root / "checkpoints" / "latest.json").read_text())
    assert latest["backbone_fingerprint"] == digest


def test_partial_or_broken_run_folders_are_one_error_line_not_a_traceback(run, tmp_path, capsys):
    """A hostile review found tracebacks (exit 1) for decrypt on a folder without
    checkpoints/latest.json, with a truncated one or with an unknown config key, and for
    explain on an encrypted run not yet decrypted (no plaintext adapters) or on a folder that
    is not a site."""
    from client.decrypt import main as decrypt
    from client.explain import main as explain_main

    root, _, _, _ = run

    def copy_run(name):
        folder = tmp_path / name
        shutil.copytree(root / "run", folder)
        return folder

    no_latest = copy_run("no-latest")
    (no_latest / "checkpoints" / "latest.json").unlink()
    truncated = copy_run("truncated")
    latest = truncated / "checkpoints" / "latest.json"
    latest.write_text(latest.read_text()[:20])
    unknown_key = copy_run("unknown-key")
    config = json.loads((unknown_key / "config.json").read_text())
    (unknown_key / "config.json").write_text(json.dumps(config | {"no-such-key": 1}))
    secret = ["--secret-context", str(tmp_path / "none.ctx"), "--out", str(tmp_path / "d")]
    for folder, says in ((no_latest, "latest.json"), (truncated, "latest.json"),
                         (unknown_key, "no-such-key")):  # fmt: skip
        capsys.readouterr()
        assert decrypt([str(folder), *secret]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and "Traceback" not in err

    no_adapters = copy_run("encrypted-not-decrypted")
    shutil.rmtree(no_adapters / "adapters")
    site = ["--out", str(tmp_path / "out"), "--limit", "1"]
    for folder, site_dir, says in (
        (no_adapters, root / "sites" / "xr", "fedmedvit decrypt"),
        (root / "run", tmp_path, "dataset.json"),
    ):
        capsys.readouterr()
        code = explain_main([str(folder), "--site-dir", str(site_dir), *site])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and says in err, err


def test_a_run_resumed_under_another_head_sharing_is_refused_by_name(tmp_path):
    """A run folder written under head-sharing "local" (the classifier default before
    "shared+local"), resumed after the upgrade with the new default: its checkpoint has no
    personal read-out, so every site would refuse the global model with an error about its
    own head file. The server refuses first, naming the folder, the setting and the fix; the
    folder's record is not replaced. The same config resumes."""
    from server.run_files import RunFolder

    before = RunConfig.from_flat({"head-sharing": "local", "lora-rank": 2})
    folder = RunFolder(tmp_path / "run")
    folder.write_config(before)
    saved, _ = initial_adapters(before)
    assert folder.resume_problem(before, saved, saved) == ""
    after = RunConfig.from_flat({"lora-rank": 2})  # the new default: "shared+local"
    current, _ = initial_adapters(after)
    problem = folder.resume_problem(after, saved, current)
    assert problem.startswith(f"cannot resume {folder.root} under this run configuration (")
    assert "head-sharing = 'local' there, 'shared+local' now" in problem
    assert "checkpoint: adapter keys do not match: missing ['head.personal.bias'" in problem
    assert 'Resume with head-sharing="local" (simulations.run: --set' in problem
    assert json.loads((folder.root / "config.json").read_text())["head-sharing"] == "local"
    # Another LoRA rank: the shapes differ even where the keys agree.
    rank_four = RunConfig.from_flat({"head-sharing": "local", "lora-rank": 4})
    problem = folder.resume_problem(rank_four, saved, initial_adapters(rank_four)[0])
    assert "lora-rank = 2 there, 4 now" in problem and "checkpoint: blocks." in problem
    assert ": shape (4, 2), expected (4, 4)" not in problem  # LoRA B is (out, rank)
    assert "expected (96, 4)" in problem and "more checkpoint problems" in problem
    # A damaged checkpoint (a value that is not finite) is refused like a reply would be.
    damaged = dict(saved) | {"head.fc.bias": torch.tensor([0.0, float("nan")])}
    problem = folder.resume_problem(before, damaged, saved)
    assert "checkpoint: head.fc.bias: contains NaN or Inf" in problem
    assert "written under other settings or is damaged" in problem
    # Switching HE on is a change of wire format too (ciphertexts instead of adapters).
    switched = RunConfig.from_flat({"he": True, "he-public-context": "p", "lora-rank": 2})
    problem = folder.resume_problem(switched, saved, initial_adapters(switched)[0])
    assert "he = False there, True now" in problem and "he=false" in problem
    # A key an older version accepted and today's checks refuse does not stop a resume.
    record = json.loads((folder.root / "config.json").read_text()) | {"round-timeout": 10.0}
    (folder.root / "config.json").write_text(json.dumps(record))
    assert folder.resume_problem(before, saved, saved) == ""
    # An HE checkpoint holds ciphertexts: the folder's record alone decides.
    he = {"he": True, "he-public-context": "p", "lora-rank": 2}
    encrypted = RunFolder(tmp_path / "encrypted")
    encrypted.write_config(RunConfig.from_flat(he | {"head-sharing": "local"}))
    problem = encrypted.resume_problem(RunConfig.from_flat(he), {"ct": torch.zeros(3)}, current)
    assert "head-sharing = 'local' there" in problem and "checkpoint:" not in problem
    same_he = RunConfig.from_flat(he | {"head-sharing": "local"})
    assert encrypted.resume_problem(same_he, {"ct": torch.zeros(3)}, current) == ""
