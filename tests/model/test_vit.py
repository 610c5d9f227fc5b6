"""Universal ViT: every registered size builds and runs on 2D and 3D inputs; position and RoPE."""

import pytest
import torch

from core.model.sizes import MODEL_SIZES, ViTConfig
from core.model.vit import (
    apply_rope,
    count_parameters,
    create_vit,
    resample_position_grid,
    rope_angles,
)

SWIGLU_PUMIT = {"mlp": "swiglu", "mlp_norm": True, "rope_style": "pumit", "norm_eps": 1e-5}


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("micro", {}), ("tiny", {}), ("micro", SWIGLU_PUMIT)],
    ids=["micro", "tiny", "micro-swiglu-pumit"],
)
def test_registry_sizes_forward_backward_2d_and_3d(name, overrides):
    torch.manual_seed(0)
    model = create_vit(name, num_classes=3, **overrides)
    for x, spacing in [
        (torch.randn(2, 1, 1, 32, 48), (1e4, 0.2, 0.2)),  # 2D X-ray
        (torch.randn(2, 1, 32, 32, 32), (1.0, 1.0, 1.0)),  # isotropic CT, DA 0
        (torch.randn(2, 1, 8, 32, 32), (5.0, 0.7, 0.7)),  # thick-slice MR, DA 2
    ]:
        logits = model(x, spacing)
        assert logits.shape == (2, 3)
        assert torch.isfinite(logits).all()
        logits.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad()


def test_base_size_is_vit_b():
    config = MODEL_SIZES["base"]
    assert (config.embed_dim, config.depth, config.num_heads) == (768, 12, 12)
    model = create_vit("base")
    blocks = count_parameters(model, lambda n: n.startswith("blocks."))
    assert blocks == 12 * (4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768 + 4 * 768)
    # 85.0M in the blocks; the 3D patch kernel (16^3) and the 3D position grid add 4.7M.
    assert 89_000_000 < count_parameters(model) < 90_500_000


def test_token_grid_follows_anisotropy():
    model = create_vit("micro", num_classes=2)
    x = torch.randn(1, 1, 16, 32, 32)
    assert model.forward_features(x, (1.0, 1.0, 1.0)).shape[1] == 1 + 1 * 2 * 2
    assert model.forward_features(x, (5.0, 0.7, 0.7)).shape[1] == 1 + 4 * 2 * 2  # depth patch 4
    assert model.forward_features(x, (1e4, 1.0, 1.0)).shape[1] == 1 + 16 * 2 * 2  # per slice


def test_bad_inputs_raise_clear_errors():
    model = create_vit("micro", num_classes=2)
    with pytest.raises(ValueError, match="multiple of 4"):
        model(torch.randn(1, 1, 6, 32, 32), (5.0, 0.7, 0.7))
    with pytest.raises(ValueError, match="channel"):
        model(torch.randn(1, 3, 1, 32, 32), (1e4, 1.0, 1.0))
    with pytest.raises(ValueError, match="D == 1"):
        model(torch.randn(1, 1, 32, 32), (1e4, 1.0, 1.0))
    with pytest.raises(ValueError, match="unknown model size"):
        create_vit("huge")
    with pytest.raises(ValueError, match="divisible"):
        ViTConfig(embed_dim=100, depth=1, num_heads=3)
    for field, value in [("mlp", "relu"), ("rope_style", "eva"), ("norm_eps", 0.0)]:
        with pytest.raises(ValueError, match=field):
            ViTConfig(embed_dim=96, depth=1, num_heads=3, **{field: value})


def test_swiglu_sub_ln_block_is_the_gated_formula():
    torch.manual_seed(0)
    model = create_vit("micro", **SWIGLU_PUMIT).double()
    mlp = model.blocks[0].mlp
    with torch.no_grad():
        mlp.norm.weight.normal_()
    x = torch.randn(5, 96, dtype=torch.float64)
    gate, value = x @ mlp.fc1_g.weight.T + mlp.fc1_g.bias, x @ mlp.fc1_x.weight.T + mlp.fc1_x.bias
    hidden = torch.sigmoid(gate) * gate * value  # SiLU(g) = g * sigmoid(g)
    mean, var = hidden.mean(-1, keepdim=True), hidden.var(-1, unbiased=False, keepdim=True)
    normed = (hidden - mean) / torch.sqrt(var + 1e-5) * mlp.norm.weight + mlp.norm.bias
    expected = normed @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), expected, rtol=1e-12, atol=1e-12)
    assert len(mlp.norm.weight) == int(96 * 4.0)  # the sub-LN acts on the hidden width


def test_position_grid_resampling_area_down_trilinear_up():
    pos = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 1, 2, 4, 4)
    down = resample_position_grid(pos, (1, 2, 2))
    expected = pos.reshape(1, 1, 1, 2, 2, 2, 2, 2).mean(dim=(3, 5, 7))  # block means
    torch.testing.assert_close(down, expected.reshape(1, 1, 1, 2, 2))
    up = resample_position_grid(pos, (2, 8, 8))
    assert up.shape == (1, 1, 2, 8, 8)
    assert resample_position_grid(pos, (2, 4, 4)) is pos


def test_rope_is_2d_rope_for_2d_inputs_and_relative():
    head_dim = 16
    angles = rope_angles((1, 3, 4), head_dim, base=100.0)
    assert angles.shape == (1 + 12, head_dim // 2)
    assert torch.all(angles[0] == 0)  # CLS is not rotated
    freqs = 100.0 ** (-torch.arange(4) / 4)
    # token (row 2, col 3) at index 1 + 2*4 + 3: rows on the first half, columns on the second
    torch.testing.assert_close(angles[1 + 2 * 4 + 3], torch.cat([2 * freqs, 3 * freqs]))
    # Relative: <R(a) q, R(b) k> depends only on a - b.
    q, k = torch.randn(1, 1, 1, head_dim), torch.randn(1, 1, 1, head_dim)

    def rotated_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        qa = apply_rope(q, a.cos(), a.sin())
        kb = apply_rope(k, b.cos(), b.sin())
        return (qa * kb).sum()

    a3 = rope_angles((2, 3, 4), head_dim, 100.0)
    shift = rotated_dot(a3[1 + 0 * 12 + 1 * 4 + 1], a3[1 + 0 * 12 + 0 * 4 + 0])
    shifted = rotated_dot(a3[1 + 1 * 12 + 2 * 4 + 3], a3[1 + 1 * 12 + 1 * 4 + 2])
    torch.testing.assert_close(shift, shifted)


@pytest.mark.parametrize("pool", ["mean", "mean-max", "stats", "cls"])
@pytest.mark.parametrize("head_norm", ["none", "layer"])
def test_pooling_shapes_and_standardised_head_input(pool, head_norm):
    torch.manual_seed(0)
    model = create_vit("micro", num_classes=2, pool=pool, head_norm=head_norm).eval()
    x = torch.randn(3, 1, 8, 32, 32)
    features = model.forward_features(x, (5.0, 0.7, 0.7))  # (3, 1 + T, 96)
    pooled = model.pool(features)
    width = {"mean-max": 2 * 96, "stats": 4 * 96}.get(pool, 96)
    assert pooled.shape == (3, width)
    patches = features[:, 1:]
    if pool == "mean-max":
        torch.testing.assert_close(pooled[:, :96], patches.mean(1))
        torch.testing.assert_close(pooled[:, 96:], patches.amax(1))
    if pool == "stats":  # per channel, by a loop over cases and channels
        for n in range(3):
            for c in (0, 41, 95):
                column = patches[n, :, c].double()
                expected = [column.mean(), column.max(), column.min(), column.std(correction=0)]
                got = pooled[n, [c, 96 + c, 192 + c, 288 + c]].double()
                torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert model.head.fc.in_features == width
    seen = model.head.norm(pooled)
    if head_norm == "layer":  # zero mean, unit variance per example, no trainable parameters
        torch.testing.assert_close(seen.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(seen.var(1, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
        assert not list(model.head.norm.parameters())
    else:
        torch.testing.assert_close(seen, pooled)
    torch.testing.assert_close(model(x, (5.0, 0.7, 0.7)), model.head.fc(seen))


def test_reset_head_switches_pooling_and_keeps_the_backbone():
    torch.manual_seed(0)
    model = create_vit("micro", num_classes=2)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    model.reset_head(2, pool="mean-max", head_norm="layer")
    assert (model.config.pool, model.config.head_norm) == ("mean-max", "layer")
    assert model.head.fc.in_features == 192
    after = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="pool must be one of"):
        ViTConfig(embed_dim=96, depth=1, num_heads=3, pool="max")
