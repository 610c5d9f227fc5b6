"""Masked image modelling: the masked forward is the model's forward, masked content is
invisible, targets line up with tokens at every DA, training learns, and resuming is bitwise."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.data import DABatchSampler, GridConfig, HospitalSpec, PhantomSite, generate_hospitals
from core.model.checkpoint import BackboneError, load_backbone, tensors_digest
from core.model.pooling import pool_tokens
from core.model.sac import sum_depth_taps
from core.model.sizes import MODEL_SIZES
from core.model.vit import create_vit
from core.pretrain import (
    MaskedImageModel,
    MIMSettings,
    PretrainError,
    build_state,
    demo_backbone,
    load_checkpoint,
    main,
    normalized_patches,
    open_pool,
    open_unlabeled,
    patchify,
    random_token_mask,
    save_checkpoint,
    train_steps,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
GRID = GridConfig(in_plane=(32, 32))
MICRO = MODEL_SIZES["micro"]
SPACINGS = {0: (1.0, 1.0, 1.0), 2: (4.0, 1.0, 1.0), 5: (1e4, 1.0, 1.0)}


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """Four tiny phantom sites: thin CT at two depths (one DA, padded to stack), thick MR, X-ray."""
    spec = HospitalSpec(
        (
            PhantomSite("ct16", "ct3d", 10, (32, 32), 16, (1.0, 1.0, 1.0)),
            PhantomSite("ct32", "ct3d", 10, (32, 32), 32, (1.0, 1.0, 1.0)),
            PhantomSite("mr", "mr3d", 10, (32, 32), 8, (4.0, 1.0, 1.0)),
            PhantomSite("xr", "xr2d", 10, (32, 32), spacing=(1.0, 1.0, 1.0)),
        ),
        alpha=None,
    )
    root = tmp_path_factory.mktemp("phantoms")
    generate_hospitals(root, spec, seed=3)
    return root


@pytest.fixture(scope="module")
def pool(sites):
    return open_pool([sites], ["training", "validation"], grid=GRID, log=lambda _: None)


def mim_model(seed=0):
    torch.manual_seed(seed)
    return MaskedImageModel(create_vit("micro"), visible_weight=0.0).eval()


def volume(da, n=2, depth=None, seed=0):
    depth = depth or {0: 32, 2: 8, 5: 1}[da]
    return torch.randn(n, 1, depth, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("da", [0, 2, 5])
def test_unmasked_encode_is_forward_features_bit_for_bit(da):
    model = mim_model()
    x = volume(da)
    features, got_da = model.encode(x, SPACINGS[da])
    assert got_da == da
    assert torch.equal(features, model.encoder.forward_features(x, SPACINGS[da]))


def test_masked_patch_content_is_invisible_to_the_encoder():
    model = mim_model()
    x = volume(0)  # (2, 1, 32, 32, 32): tokens (2, 2, 2) per sample
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 5] = True  # token 5 = depth 1, row 0, column 1
    changed = x.clone()
    changed[:, :, 16:32, 0:16, 16:32] = 100.0  # the voxels of token 5 only
    assert torch.equal(
        model.encode(x, SPACINGS[0], mask)[0], model.encode(changed, SPACINGS[0], mask)[0]
    )
    assert not torch.equal(model.encode(x, SPACINGS[0])[0], model.encode(changed, SPACINGS[0])[0])


@pytest.mark.parametrize("da", [0, 2, 5])
def test_target_patches_line_up_with_the_patch_embedding_tokens(da):
    """Token t of the SAC patch embedding is the (depth-summed) kernel applied to patchify's
    patch t: the reconstruction target of a token is exactly what that token saw."""
    model = mim_model().double()
    x = volume(da).double()
    depth_patch = max(16 >> da, 1)
    tokens = model.encoder.patch_embed(x, da).flatten(2).transpose(1, 2)  # (N, T, E)
    proj = model.encoder.patch_embed.proj
    kernel = sum_depth_taps(proj.weight, depth_patch).flatten(1)  # (E, C * p_d * 16 * 16)
    expected = patchify(x, 16, depth_patch) @ kernel.T + proj.bias
    torch.testing.assert_close(tokens, expected)


def test_decoder_averages_consecutive_predicted_depth_planes():
    model = mim_model()
    features = torch.randn(2, 3, MICRO.embed_dim)
    full = model.predict(features, 16).reshape(2, 3, 1, 16, 16, 16)
    thick = model.predict(features, 4).reshape(2, 3, 1, 4, 16, 16)
    torch.testing.assert_close(thick, full.reshape(2, 3, 1, 4, 4, 16, 16).mean(dim=4))
    flat = model.predict(features, 1).reshape(2, 3, 1, 1, 16, 16)
    torch.testing.assert_close(flat, full.mean(dim=3, keepdim=True))


def test_random_token_mask_masks_a_fixed_count_reproducibly():
    mask = random_token_mask(5, 16, 0.6, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 16) and mask.sum(dim=1).tolist() == [10] * 5
    assert torch.equal(mask, random_token_mask(5, 16, 0.6, torch.Generator().manual_seed(0)))
    assert random_token_mask(3, 1, 0.6, torch.Generator()).all()  # one token: it is masked
    assert random_token_mask(3, 2, 0.99, torch.Generator()).sum(dim=1).tolist() == [1] * 3


@pytest.mark.parametrize("visible_weight", [0.0, 0.3])
def test_loss_is_mse_of_normalised_voxels_weighted_by_masked_and_visible(visible_weight):
    """Brute force: masked tokens weigh 1, visible ones ``visible_weight``; 0 is SimMIM's
    mean over masked tokens only."""
    torch.manual_seed(0)
    model = MaskedImageModel(create_vit("micro"), visible_weight=visible_weight).eval()
    x = volume(2)  # depth patch 4: tokens (2, 2, 2)
    mask = random_token_mask(2, 8, 0.5, torch.Generator().manual_seed(1))
    features, _ = model.encode(x, SPACINGS[2], mask)
    pred = model.predict(features[:, 1:], 4)
    target = normalized_patches(patchify(x, 16, 4), model.target_eps)
    errors = (pred - target).pow(2).mean(dim=-1)  # (N, T)
    masked, visible = errors[mask], errors[~mask]
    weighted = masked.sum() + visible_weight * visible.sum()
    expected = weighted / (len(masked) + visible_weight * len(visible))
    torch.testing.assert_close(model(x, SPACINGS[2], mask), expected)
    if visible_weight == 0.0:
        torch.testing.assert_close(model(x, SPACINGS[2], mask), masked.mean())


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.3"])
def test_a_visible_weight_that_is_not_a_finite_number_ge_0_is_refused(bad):
    with pytest.raises(PretrainError, match="visible-weight"):
        MIMSettings(visible_weight=bad)


def test_the_visible_weight_reaches_the_model_and_old_checkpoints_resume_as_simmim(tmp_path):
    """A checkpoint from before the field was trained on masked tokens only: it must resume
    with weight 0, not with today's default."""
    assert build_state(MICRO, MIMSettings(visible_weight=0.7)).model.visible_weight == 0.7
    settings = MIMSettings(batch_size=8, visible_weight=0.0)
    path = tmp_path / "old.pt"
    save_checkpoint(path, build_state(MICRO, settings), settings, "d")
    payload = torch.load(path, weights_only=False)
    del payload["settings"]["visible_weight"]
    torch.save(payload, path)
    state, _, saved = load_checkpoint(path, config=MICRO, settings=settings, data_signature="d")
    assert state.model.visible_weight == 0.0 and saved.visible_weight == 0.0
    with pytest.raises(PretrainError, match="visible_weight"):
        load_checkpoint(path, settings=dataclasses.replace(settings, visible_weight=0.3))


def test_pool_bucketing_pads_depth_across_sites_of_one_da(pool):
    assert sorted(set(pool.das)) == [0, 2, 5]
    assert pool.depth_by_da == {0: 32, 2: 8, 5: 1}
    for index in range(len(pool)):
        assert pool[index]["image"].shape == (1, pool.depth_by_da[pool.das[index]], 32, 32)


def test_unlabeled_datalists_are_accepted(sites, tmp_path):
    doc = json.loads((sites / "xr" / "dataset.json").read_text())
    unlabeled = {
        "modality": "XR",
        "training": [
            {"image": str(sites / "xr" / e["image"]), "spacing": e["spacing"]}
            for e in doc["training"]
        ],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(unlabeled))
    dataset = open_unlabeled(tmp_path / "dataset.json", "training", GRID)
    assert len(dataset) == len(doc["training"])


class Ramps:
    """A tiny in-memory set whose masked patches can be predicted from their neighbours: each
    image is one intensity ramp in a random in-plane direction; 2D (DA 5) and 16-slice 3D
    (DA 0) items."""

    def __init__(self, n: int = 24, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.das = [5 if i % 2 else 0 for i in range(n)]
        coords = torch.arange(32, dtype=torch.float32)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        self.images = []
        for da in self.das:
            angle = torch.rand((), generator=g) * 6.283
            ramp = (yy * angle.cos() + xx * angle.sin()) / 32  # (32, 32)
            depth = 1 if da == 5 else 16
            self.images.append(ramp.expand(1, depth, 32, 32).contiguous())

    def __len__(self) -> int:
        return len(self.das)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        spacing = torch.tensor(SPACINGS[self.das[i]], dtype=torch.float64)
        return {"image": self.images[i], "spacing": spacing, "label": torch.tensor(0)}

    def signature(self) -> str:
        return "ramps"


def fixed_eval_loss(model, data) -> float:
    """Loss on one fixed batch and mask per DA: comparable before and after training."""
    total = 0.0
    with torch.no_grad():
        for da in (0, 5):
            items = [data[i] for i, d in enumerate(data.das) if d == da]
            x = torch.stack([item["image"] for item in items])
            mask = random_token_mask(len(items), 4, 0.5, torch.Generator().manual_seed(da))
            total += float(model.eval()(x, items[0]["spacing"], mask))
    return total


def test_loss_decreases_over_a_few_steps():
    data = Ramps()
    settings = MIMSettings(batch_size=12, learning_rate=2e-3, warmup_steps=3, flip=False)
    state = build_state(MICRO, settings)
    before = fixed_eval_loss(state.model, data)
    train_steps(state, data, settings, total_steps=25, device=CPU, log_every=0)
    after = fixed_eval_loss(state.model, data)
    assert after < 0.5 * before, (before, after)


def test_resume_mid_epoch_continues_at_the_same_step_with_identical_state(pool, tmp_path):
    settings = MIMSettings(batch_size=8, warmup_steps=2)
    per_epoch = len(DABatchSampler(pool.das, 8))
    crash_at, total = per_epoch + 1, 2 * per_epoch + 1  # crash one batch into the 2nd epoch
    straight = build_state(MICRO, settings)
    train_steps(straight, pool, settings, total_steps=total, device=CPU, log_every=0)

    crashed = build_state(MICRO, settings)
    ckpt = tmp_path / "run.pt"
    train_steps(
        crashed,
        pool,
        settings,
        total_steps=total,
        until=crash_at,
        device=CPU,
        checkpoint=ckpt,
        log_every=0,
    )
    resumed, _, _ = load_checkpoint(
        ckpt, config=MICRO, settings=settings, data_signature=pool.signature()
    )
    assert resumed.step == crash_at and resumed.losses == crashed.losses
    train_steps(resumed, pool, settings, total_steps=total, device=CPU, log_every=0)

    assert resumed.step == straight.step == total and resumed.losses == straight.losses
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    a, b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert a.keys() == b.keys()
    for index in a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a[index][name], b[index][name]), (index, name)


def test_resume_refuses_other_settings_or_data(pool, tmp_path):
    settings = MIMSettings(batch_size=8)
    state = build_state(MICRO, settings)
    save_checkpoint(tmp_path / "run.pt", state, settings, pool.signature())
    with pytest.raises(PretrainError, match="'mask_ratio'"):
        load_checkpoint(tmp_path / "run.pt", settings=MIMSettings(batch_size=8, mask_ratio=0.4))
    with pytest.raises(PretrainError, match="other data"):
        load_checkpoint(tmp_path / "run.pt", data_signature=pool.subset([0, 1]).signature())
    torch.save({"format": "something-else"}, tmp_path / "foreign.pt")
    with pytest.raises(PretrainError, match="format"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_cli_writes_a_loadable_backbone_with_the_printed_fingerprint_and_resumes(
    sites, tmp_path, capsys
):
    out = tmp_path / "backbone.safetensors"
    common = [
        "--data",
        str(sites),
        "--in-plane",
        "32",
        "--batch-size",
        "8",
        "--out",
        str(out),
        "--log-every",
        "1",
    ]
    assert main([*common, "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "step 2/2" in printed
    model, digest = load_backbone(out)
    assert printed.split("fingerprint: ")[1].strip() == digest
    assert model.config == MICRO

    ckpt = out.with_suffix(".pretrain.pt")
    assert main([*common, "--steps", "4", "--resume", str(ckpt)]) == 0
    printed = capsys.readouterr().out
    assert "at step 2" in printed and "step 3/4" in printed and "step 1/4" not in printed
    assert printed.split("fingerprint: ")[1].strip() == load_backbone(out)[1]
    assert main([*common, "--steps", "4", "--resume", str(ckpt), "--mask-ratio", "0.5"]) == 2
    assert "mask_ratio" in capsys.readouterr().err
    assert main([*common, "--steps", "4", "--resume", str(ckpt), "--visible-weight", "0.5"]) == 2
    assert "visible_weight" in capsys.readouterr().err  # the flag reaches the saved settings


def test_the_backbone_carries_a_head_reference_that_whitens_its_own_pretraining_images(
    sites, pool, tmp_path
):
    out = tmp_path / "backbone.safetensors"
    args = ["--data", str(sites), "--splits", "training,validation", "--in-plane", "32"]
    assert main([*args, "--batch-size", "8", "--steps", "2", "--out", str(out)]) == 0
    model, _ = load_backbone(out)
    reference = model.references["stats"]
    # Oracle: the loaded encoder's own stats-pooled features of every pretraining image, one
    # image at a time, are centred and white after the stored projection.
    with torch.no_grad():
        rows = [
            pool_tokens(
                model.forward_features(item["image"][None], item["spacing"][None]), "stats", 1e-6
            )[0]
            for item in (pool[i] for i in range(len(pool)))
        ]
    features = torch.stack(rows).double()  # (N, 384)
    assert reference.components == min(64, len(pool) - 1)
    projected = (features - reference.shift.double()) @ reference.projection.double()
    k = reference.components
    torch.testing.assert_close(
        projected.mean(0), torch.zeros(k, dtype=torch.float64), atol=1e-3, rtol=0
    )
    covariance = projected.T @ projected / len(projected)
    torch.testing.assert_close(covariance, torch.eye(k, dtype=torch.float64), atol=2e-2, rtol=0)


def test_demo_backbone_is_built_once_then_reused_and_checked(tmp_path, capsys):
    path, digest = demo_backbone(tmp_path, steps=1)
    assert "pretrained the demo backbone" in capsys.readouterr().out
    assert load_backbone(path)[1] == digest
    built = path.stat().st_mtime_ns
    assert demo_backbone(tmp_path, steps=1) == (path, digest)  # cached: not rebuilt
    assert path.stat().st_mtime_ns == built and "pretrained" not in capsys.readouterr().out
    marker = path.parent / "fingerprint.txt"
    # A cache from before the fingerprint covered the config: a first-format file and a
    # marker of the tensors' digest. Still the backbone that was built, so it is reused and its
    # marker brought up to date; with its config edited it is not.
    tensors = load_file(str(path))
    old_marker = tensors_digest(tensors) + "\n"
    config = MODEL_SIZES["micro"]
    for stored, reused in ((config, True), (dataclasses.replace(config, num_heads=1), False)):
        metadata = {"format": "fedmedvit-backbone-v1", "fingerprint": old_marker.strip()}
        save_file(tensors, str(path), metadata=metadata | {"config": json.dumps(stored.to_dict())})
        marker.write_text(old_marker)
        if reused:
            assert demo_backbone(tmp_path, steps=1) == (path, digest)
            assert marker.read_text() == digest + "\n"
        else:
            with pytest.raises(BackboneError, match="fingerprint"):
                demo_backbone(tmp_path, steps=1)
    marker.write_text("0" * 64 + "\n")  # the file no longer matches what was built
    with pytest.raises(BackboneError, match="fingerprint"):
        demo_backbone(tmp_path, steps=1)
