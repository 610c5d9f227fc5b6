"""Importing timm/EVA and PUMIT checkpoints: complete loading, and the inflation rules hold.

State dicts are built with the reference key names and random values at micro sizes (embed 96,
depth 4, heads 3); a 40-line reference 2D ViT written from timm's documented computation is the
oracle for the whole imported network.

Over 500 lines: the converter tests share the reference ViT and state-dict builders defined here.
"""

import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from core.model.checkpoint import load_backbone
from core.model.convert import (
    IMAGENET_NORM,
    PretrainedImportError,
    _resolve_config,
    build_model,
    convert_state_dict,
    import_checkpoint,
    main,
    read_state_dict,
)
from core.model.sizes import MODEL_SIZES, ViTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

E, DEPTH, HEADS, HIDDEN, P, SIDE = 96, 4, 3, 384, 16, 4  # micro; a 64 x 64 image = 4 x 4 tokens
F64 = torch.float64


def timm_state(
    *, layer_scale=False, with_cls_pos=True, swiglu=False, seed=0
) -> dict[str, torch.Tensor]:
    """A timm VisionTransformer state dict (fused qkv) with a head and fc_norm to ignore;
    ``swiglu``: timm Eva's SwiGLU MLP with sub-LN (fc1_g, fc1_x, norm, fc2)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g, dtype=F64) * scale

    n_pos = SIDE * SIDE + (1 if with_cls_pos else 0)
    state = {
        "cls_token": r(1, 1, E),
        "pos_embed": r(1, n_pos, E),
        "patch_embed.proj.weight": r(E, 3, P, P),
        "patch_embed.proj.bias": r(E),
        "norm.weight": 1 + r(E),
        "norm.bias": r(E),
        "fc_norm.weight": r(E),
        "fc_norm.bias": r(E),
        "head.weight": r(1000, E),
        "head.bias": r(1000),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        state |= {
            p + "norm1.weight": 1 + r(E),
            p + "norm1.bias": r(E),
            p + "attn.qkv.weight": r(3 * E, E, scale=0.2),
            p + "attn.qkv.bias": r(3 * E),
            p + "attn.proj.weight": r(E, E, scale=0.2),
            p + "attn.proj.bias": r(E),
            p + "norm2.weight": 1 + r(E),
            p + "norm2.bias": r(E),
            p + "mlp.fc2.weight": r(E, HIDDEN, scale=0.2),
            p + "mlp.fc2.bias": r(E),
        }
        hidden_in = ("fc1_g", "fc1_x") if swiglu else ("fc1",)
        for name in hidden_in:
            state |= {p + f"mlp.{name}.weight": r(HIDDEN, E, scale=0.2)}
            state |= {p + f"mlp.{name}.bias": r(HIDDEN)}
        if swiglu:
            state |= {p + "mlp.norm.weight": 1 + r(HIDDEN), p + "mlp.norm.bias": r(HIDDEN)}
        if layer_scale:
            state |= {p + "ls1.gamma": r(E, scale=0.5), p + "ls2.gamma": r(E, scale=0.5)}
    return state


def reference_timm_features(state, rgb: torch.Tensor) -> torch.Tensor:
    """timm's 2D ViT forward, spelled out. rgb: (N, 3, H, W) -> normalised tokens (N, 1+T, E)."""
    x = F.conv2d(rgb, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=P)
    x = x.flatten(2).transpose(1, 2)  # (N, T, E)
    cls = state["cls_token"].expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + state["pos_embed"]  # CLS position included
    for i in range(DEPTH):
        p = f"blocks.{i}."

        def ln(t, name, p=p):
            return F.layer_norm(
                t, (E,), state[p + name + ".weight"], state[p + name + ".bias"], 1e-6
            )

        n, t, _ = x.shape
        qkv = F.linear(ln(x, "norm1"), state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(n, t, 3, HEADS, E // HEADS).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(E // HEADS), dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(n, t, E)
        y = F.linear(y, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        x = x + y * state.get(p + "ls1.gamma", torch.ones(E, dtype=F64))

        def fc(t, name, p=p):
            return F.linear(t, state[p + f"mlp.{name}.weight"], state[p + f"mlp.{name}.bias"])

        h = ln(x, "norm2")
        if p + "mlp.fc1.weight" in state:
            h = F.gelu(fc(h, "fc1"))
        else:  # timm Eva SwiGLU: norm(silu(fc1_g h) * fc1_x h)
            h = F.silu(fc(h, "fc1_g")) * fc(h, "fc1_x")
            w, b = state[p + "mlp.norm.weight"], state[p + "mlp.norm.bias"]
            h = F.layer_norm(h, (HIDDEN,), w, b, 1e-6)
        y = fc(h, "fc2")
        x = x + y * state.get(p + "ls2.gamma", torch.ones(E, dtype=F64))
    return F.layer_norm(x, (E,), state["norm.weight"], state["norm.bias"], 1e-6)


def imported(state, **kwargs):
    converted, report = convert_state_dict(state, size="micro", dtype=F64, **kwargs)
    return build_model(converted, report.config).eval(), report


GREY_2D = (1e4, 1.0, 1.0)  # a 2D image: DA 5


def grey_image(n=2, seed=1):
    return torch.rand(n, 1, 1, 64, 64, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize(("layer_scale", "swiglu"), [(False, False), (True, False), (True, True)])
def test_imported_timm_vit_computes_what_timm_computes_on_a_grey_image(layer_scale, swiglu):
    """The whole chain at once: RGB sum, inflation, CLS position into cls_token, qkv split,
    LayerScale fold, position grid, GELU or SwiGLU sub-LN MLP; rope off as the source had
    none."""
    state = timm_state(layer_scale=layer_scale, swiglu=swiglu)
    model, report = imported(state)
    assert report.config.rope is False and report.config.pos_grid == (8, SIDE, SIDE)
    assert report.config.mlp == ("swiglu" if swiglu else "gelu")
    assert report.config.mlp_norm is swiglu
    assert {k for k, _ in report.ignored} == {
        "head.weight",
        "head.bias",
        "fc_norm.weight",
        "fc_norm.bias",
    }
    x = grey_image()
    ours = model.forward_features(x, GREY_2D)
    reference = reference_timm_features(state, x[:, :, 0].expand(-1, 3, -1, -1))
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


def test_inflated_kernel_on_slice_repeated_volume_equals_2d_kernel_on_the_slice():
    state = timm_state()
    model, _ = imported(state, in_channels=3)
    slice_ = torch.randn(2, 3, 64, 64, dtype=F64)
    volume = slice_.unsqueeze(2).expand(-1, -1, P, -1, -1)  # (N, 3, 16, H, W), DA 0
    tokens = model.patch_embed(volume, da=0)  # (N, E, 1, 4, 4)
    expected = F.conv2d(
        slice_, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=P
    )
    torch.testing.assert_close(tokens[:, :, 0], expected, rtol=1e-12, atol=1e-12)
    # And a 2D image (DA 5: SAC sums the 16 taps) sees exactly the 2D kernel.
    flat = model.patch_embed(slice_.unsqueeze(2), da=5)
    torch.testing.assert_close(flat[:, :, 0], expected, rtol=1e-12, atol=1e-12)


def test_rgb_summed_kernel_on_grey_equals_rgb_kernel_on_repeated_grey():
    state = timm_state()
    grey = torch.randn(2, 1, 64, 64, dtype=F64)
    expected = F.conv2d(
        grey.expand(-1, 3, -1, -1),
        state["patch_embed.proj.weight"],
        state["patch_embed.proj.bias"],
        stride=P,
    )
    for channels in (1, 2):  # summed to one channel, or shared equally over two
        model, _ = imported(state, in_channels=channels)
        tokens = model.patch_embed(grey.unsqueeze(2).expand(-1, channels, -1, -1, -1), da=5)
        torch.testing.assert_close(tokens[:, :, 0], expected, rtol=1e-12, atol=1e-12)


def test_imagenet_input_norm_is_folded_exactly():
    state = timm_state()
    model, report = imported(state, input_norm=IMAGENET_NORM)
    assert report.notes
    grey = torch.rand(2, 1, 64, 64, dtype=F64)
    mean = torch.tensor(IMAGENET_NORM[0], dtype=F64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_NORM[1], dtype=F64).view(1, 3, 1, 1)
    normalised = (grey.expand(-1, 3, -1, -1) - mean) / std
    expected = F.conv2d(
        normalised, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=P
    )
    tokens = model.patch_embed(grey.unsqueeze(2), da=5)
    torch.testing.assert_close(tokens[:, :, 0], expected, rtol=1e-10, atol=1e-10)


def test_position_grid_repeats_depth_keeps_or_resamples_in_plane_and_cls_position_folds():
    state = timm_state()
    converted, report = convert_state_dict(state, size="micro", dtype=F64)
    grid = state["pos_embed"][:, 1:].transpose(1, 2).reshape(1, E, SIDE, SIDE)
    assert converted["pos_embed"].shape == (1, E, 8, SIDE, SIDE)
    for d in range(8):
        torch.testing.assert_close(converted["pos_embed"][:, :, d], grid)
    torch.testing.assert_close(
        converted["cls_token"], state["cls_token"] + state["pos_embed"][:, :1]
    )
    resampled, report = convert_state_dict(state, size="micro", pos_grid=(8, 16, 16))
    assert resampled["pos_embed"].shape == (1, E, 8, 16, 16) and report.config.pos_grid == (
        8,
        16,
        16,
    )
    # Without a CLS position (timm no_embed_class): cls_token is taken as is.
    plain = timm_state(with_cls_pos=False)
    converted, _ = convert_state_dict(plain, size="micro", dtype=F64)
    torch.testing.assert_close(converted["cls_token"], plain["cls_token"])


def test_split_qkv_equals_fused_qkv_output():
    state = timm_state()
    converted, _ = convert_state_dict(state, size="micro", dtype=F64)
    x = torch.randn(5, E, dtype=F64)
    fused = F.linear(x, state["blocks.2.attn.qkv.weight"], state["blocks.2.attn.qkv.bias"])
    split = torch.cat(
        [
            F.linear(
                x,
                converted[f"blocks.2.attn.{n}_proj.weight"],
                converted[f"blocks.2.attn.{n}_proj.bias"],
            )
            for n in "qkv"
        ],
        dim=1,
    )
    torch.testing.assert_close(split, fused, rtol=0, atol=0)


def eva_state(fused: bool) -> dict[str, torch.Tensor]:
    """EVA (BEiT-style) layout: q/v biases apart from the weights (k has none), gamma_1/2."""
    state = timm_state(layer_scale=False)
    g = torch.Generator().manual_seed(3)
    for i in range(DEPTH):
        p = f"blocks.{i}.attn."
        qkv_w, qkv_b = state.pop(p + "qkv.weight"), state.pop(p + "qkv.bias")
        q_b, _, v_b = qkv_b.split(E)
        if fused:
            state[p + "qkv.weight"] = qkv_w
        else:
            for name, w in zip("qkv", qkv_w.split(E), strict=True):
                state[p + f"{name}_proj.weight"] = w
        state[p + "q_bias"], state[p + "v_bias"] = q_b, v_b
        state[f"blocks.{i}.gamma_1"] = torch.rand(E, generator=g, dtype=F64)
        state[f"blocks.{i}.gamma_2"] = torch.rand(E, generator=g, dtype=F64)
    return state


@pytest.mark.parametrize("fused", [True, False])
def test_eva_layouts_load_with_zero_k_bias_and_folded_gammas(fused):
    state = eva_state(fused)
    converted, _ = convert_state_dict(state, size="micro", dtype=F64)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        assert torch.equal(converted[p + "attn.k_proj.bias"], torch.zeros(E, dtype=F64))
        assert torch.equal(converted[p + "attn.q_proj.bias"], state[p + "attn.q_bias"])
        gamma = state[p + "gamma_2"]
        torch.testing.assert_close(converted[p + "mlp.fc2.bias"], state[p + "mlp.fc2.bias"] * gamma)


def test_timm_checkpoint_with_rotary_tables_is_refused():
    """A 2D source that used RoPE (EVA-02's tables) would lose it silently in the timm format."""
    state = eva_state(fused=False)
    state["rope.freqs_cos"] = torch.randn(16, 32)
    with pytest.raises(PretrainedImportError, match="rotary position embedding"):
        convert_state_dict(state, size="micro")


PUMIT_GRID = (5, 10, 10)  # pos_embed_shape of PUMIT's pretraining config


@dataclasses.dataclass(frozen=True)
class PumitShape:
    embed: int = E
    depth: int = DEPTH
    heads: int = HEADS
    grid: tuple[int, int, int] = PUMIT_GRID

    @property
    def hidden(self) -> int:  # PUMIT's mlp_ratio 8/3: 256 at micro width, 341 at 128
        return int(self.embed * 8 / 3)

    def config(self):
        return ViTConfig(embed_dim=self.embed, depth=self.depth, num_heads=self.heads)


MICRO_PUMIT = PumitShape()


def pumit_state(shape: PumitShape = MICRO_PUMIT, seed: int = 5) -> dict[str, torch.Tensor]:
    """The state dict of PUMIT's ``ViTForMIM`` (pumit/model/vit.py, mim.py; sub_ln=True as
    released) under its own names: what ``state_dict()`` returns, the tokenizer excluded and
    the rotary frequencies non-persistent."""
    g = torch.Generator().manual_seed(seed)
    e, hidden = shape.embed, shape.hidden

    def r(*size, scale=0.1):
        return torch.randn(*size, generator=g, dtype=F64) * scale

    state = {
        "patch_embed.proj.weight": r(e, 3, P, P, P, scale=0.02),
        "patch_embed.proj.bias": r(e),
        "cls_token": r(1, 1, e),
        "pos_embed": r(1, e, *shape.grid),
        "norm.weight": 1 + r(e),
        "norm.bias": r(e),
        "mask_token": r(1, 1, e),
        "mim_head.0.weight": r(e, e),
        "mim_head.0.bias": r(e),
        "mim_head.2.weight": r(1024, e),
        "mim_head.2.bias": r(1024),
    }
    for i in range(shape.depth):
        p = f"blocks.{i}."
        for name, width in (("norm1", e), ("norm2", e), ("mlp.ffn_ln", hidden)):
            state |= {p + f"{name}.weight": 1 + r(width), p + f"{name}.bias": r(width)}
        state |= {p + f"attn.{n}_proj.weight": r(e, e, scale=0.3) for n in "qkv"}
        state |= {p + "attn.q_bias": r(e), p + "attn.v_bias": r(e)}
        state |= {p + "attn.proj.weight": r(e, e), p + "attn.proj.bias": r(e)}
        for name, size in (("w1", (hidden, e)), ("w2", (hidden, e)), ("w3", (e, hidden))):
            state |= {p + f"mlp.{name}.weight": r(*size), p + f"mlp.{name}.bias": r(size[0])}
    return state


def reference_pumit_features(state, x: torch.Tensor, aniso_d: int, heads: int) -> torch.Tensor:
    """PUMIT's ``ViT.forward`` (sub_ln, adaptive patch embedding), spelled out from its code
    with loops where it vectorises. x: (N, 3, D, H, W) -> normalised tokens (N, 1+T, E)."""
    weight, bias = state["patch_embed.proj.weight"], state["patch_embed.proj.bias"]
    e = weight.shape[0]
    depth_stride = max(P >> aniso_d, 1)  # SAC: fewer depth taps for thick slices
    if depth_stride < P:  # sum groups of consecutive depth taps
        weight = weight.reshape(e, 3, depth_stride, P // depth_stride, P, P).sum(3)
    x = F.conv3d(x, weight, bias, stride=(depth_stride, P, P))  # (N, E, d, h, w)
    grid = tuple(x.shape[2:])
    pos = state["pos_embed"]
    small = tuple(min(a, b) for a, b in zip(pos.shape[2:], grid, strict=True))
    pos = F.interpolate(pos, small, mode="area")  # PUMIT's resample: area down, trilinear up
    pos = F.interpolate(pos, grid, mode="trilinear") if small != grid else pos
    x = (x + pos).flatten(2).transpose(1, 2)  # (N, T, E)
    x = torch.cat([state["cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    n, t, _ = x.shape
    hd = e // heads
    half = hd // 2  # rotary pairs (2j, 2j+1), j < half; h for j < half/2, w for the rest
    angles = torch.zeros(t, half, dtype=F64)
    for token, (z, yy, xx) in enumerate(itertools.product(*(range(s) for s in grid)), start=1):
        for j in range(half):
            jj = j % (half // 2)
            angle = z * 2333.0 ** (-(2 * jj + 1) / half)
            angle += (yy if j < half // 2 else xx) * 10000.0 ** (-(2 * jj) / half)
            angles[token, j] = angle

    def rotate(v):  # (N, T, heads, hd), the CLS row has angle 0
        out = v.clone()
        for j in range(half):
            c, s_ = angles[:, j].cos().view(1, t, 1), angles[:, j].sin().view(1, t, 1)
            a_, b_ = v[..., 2 * j], v[..., 2 * j + 1]
            out[..., 2 * j], out[..., 2 * j + 1] = a_ * c - b_ * s_, b_ * c + a_ * s_
        return out

    def ln(v, key):
        w_, b_ = state[key + ".weight"], state[key + ".bias"]
        return F.layer_norm(v, w_.shape, w_, b_, 1e-5)

    for i in itertools.count():
        p = f"blocks.{i}."
        if p + "norm1.weight" not in state:
            break
        h = ln(x, p + "norm1")
        q = F.linear(h, state[p + "attn.q_proj.weight"], state[p + "attn.q_bias"])
        k = F.linear(h, state[p + "attn.k_proj.weight"])
        v = F.linear(h, state[p + "attn.v_proj.weight"], state[p + "attn.v_bias"])
        q, k, v = (u.reshape(n, t, heads, hd) for u in (q, k, v))
        q, k = rotate(q), rotate(k)
        scores = torch.einsum("nihd,njhd->nhij", q, k) / math.sqrt(hd)
        y = torch.einsum("nhij,njhd->nihd", scores.softmax(-1), v).reshape(n, t, e)
        x = x + F.linear(y, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        h = ln(x, p + "norm2")
        w1 = F.linear(h, state[p + "mlp.w1.weight"], state[p + "mlp.w1.bias"])
        w2 = F.linear(h, state[p + "mlp.w2.weight"], state[p + "mlp.w2.bias"])
        h = ln(F.silu(w1) * w2, p + "mlp.ffn_ln")
        x = x + F.linear(h, state[p + "mlp.w3.weight"], state[p + "mlp.w3.bias"])
    return ln(x, "norm")


@pytest.mark.parametrize(
    ("pumit", "volume", "spacing", "aniso_d"),
    [
        (MICRO_PUMIT, (32, 48, 32), (1.0, 1.0, 1.0), 0),  # isotropic CT: 2 x 3 x 2 tokens
        (MICRO_PUMIT, (8, 48, 48), (5.0, 0.7, 0.7), 2),  # 5 mm MR: 4 depth taps per patch
        (MICRO_PUMIT, (1, 64, 64), (1e4, 1.0, 1.0), 5),  # a 2D image: taps summed
        # Head dim 32 -> 32 with 4 heads, hidden 341, and a token grid (2, 3, 2) larger than the
        # position grid (3, 2, 4) in h: PUMIT's trilinear growth runs too.
        (PumitShape(128, 2, 4, (3, 2, 4)), (32, 48, 32), (1.0, 1.0, 1.0), 0),
    ],
    ids=["3d-iso", "3d-thick", "2d", "e128-pos-grows"],
)
def test_imported_pumit_release_computes_what_pumit_computes(pumit, volume, spacing, aniso_d):
    """Loading is complete and the network is PUMIT's: SAC patch embedding of the 3D kernel,
    its position grid resampled, SwiGLU with sub-LN, eps 1e-5 and PUMIT's 3D RoPE (through
    the q/k pair reordering)."""
    state = pumit_state(pumit)
    converted, report = convert_state_dict(
        state, format="pumit", size=pumit.config(), in_channels=3, dtype=F64
    )
    c = report.config
    assert (c.mlp, c.mlp_norm, c.rope, c.rope_style, c.norm_eps) == (
        "swiglu",
        True,
        True,
        "pumit",
        1e-5,
    )
    assert c.pos_grid == pumit.grid and int(pumit.embed * c.mlp_ratio) == pumit.hidden
    assert {k for k, _ in report.ignored} == {
        "mask_token",
        "mim_head.0.weight",
        "mim_head.0.bias",
        "mim_head.2.weight",
        "mim_head.2.bias",
    }
    model = build_model(converted, c).eval()
    x = torch.randn(2, 3, *volume, generator=torch.Generator().manual_seed(2), dtype=F64)
    ours = model.forward_features(x, spacing)
    reference = reference_pumit_features(state, x, aniso_d, pumit.heads)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)
    # Not by luck: without the pair reordering the same weights compute something else.
    model.config = dataclasses.replace(c, rope_style="universal")
    assert (model.forward_features(x, spacing) - reference).abs().max() > 1e-3


def test_pumit_checkpoint_file_loads_completely_and_sums_its_3d_kernel_over_rgb(tmp_path):
    state = {k: v.float() for k, v in pumit_state().items()}
    path = tmp_path / "pumit.pth"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 10}, path)  # Lightning-shaped
    model, report = import_checkpoint(path, format="pumit", size="micro")
    assert model.config.in_channels == 1 and model.config.mlp == "swiglu"
    torch.testing.assert_close(
        model.patch_embed.proj.weight, state["patch_embed.proj.weight"].sum(1, keepdim=True)
    )
    torch.testing.assert_close(model.pos_embed, state["pos_embed"])
    assert torch.equal(model.blocks[1].attn.k_proj.bias, torch.zeros(E))
    torch.testing.assert_close(model.blocks[2].mlp.norm.weight, state["blocks.2.mlp.ffn_ln.weight"])
    torch.testing.assert_close(model.blocks[2].mlp.fc1_x.bias, state["blocks.2.mlp.w2.bias"])
    assert any("reordered" in note for note in report.notes)
    assert any("ImageNet-normalised" in note for note in report.notes)  # none was folded


def test_pumit_errors_name_pumit_keys():
    state = pumit_state()
    del state["blocks.3.mlp.w1.weight"]
    with pytest.raises(PretrainedImportError) as err:
        convert_state_dict(state, format="pumit", size="micro")
    assert "blocks.3.mlp.w1.weight" in str(err.value) and "fc1_g" not in str(err.value)
    fused = pumit_state()
    for n in "qkv":
        fused.pop(f"blocks.0.attn.{n}_proj.weight")
    fused["blocks.0.attn.qkv.weight"] = torch.zeros(3 * E, E, dtype=F64)
    with pytest.raises(PretrainedImportError, match=r"blocks\.0\.attn\.qkv\.weight is a fused"):
        convert_state_dict(fused, format="pumit", size="micro")


def test_eva02_attention_sub_ln_is_refused_with_the_reason():
    state = pumit_state()
    state["blocks.0.attn.inner_attn_ln.weight"] = torch.ones(E)
    with pytest.raises(PretrainedImportError, match="LayerNorm before the attention output"):
        convert_state_dict(state, format="pumit", size="micro")


def test_sizes_are_read_from_width_and_depth_including_pumit_l():
    assert _resolve_config(None, 768, 12, "x").num_heads == 12  # PUMIT-B
    assert _resolve_config(None, 1024, 24, "x").num_heads == 16  # PUMIT-L


def test_missing_and_unexpected_keys_are_named():
    state = timm_state()
    del state["blocks.1.norm2.weight"]
    state["blocks.0.attn.mystery"] = torch.zeros(3)
    with pytest.raises(PretrainedImportError) as err:
        convert_state_dict(state, size="micro")
    assert "blocks.1.norm2.weight" in str(err.value) and "blocks.0.attn.mystery" in str(err.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update({"reg_token": torch.zeros(1, 4, E)}), "prefix tokens"),
        (lambda s: s.update({"blocks.0.attn.q_norm.weight": torch.ones(32)}), "QK-normal"),
        (lambda s: s.update({"blocks.0.attn.qkv.weight": torch.zeros(3 * E, E + 1)}), "shape"),
        (lambda s: s.pop("cls_token"), "cls_token"),
    ],
)
def test_unsupported_or_malformed_checkpoints_raise_clearly(change, message):
    state = timm_state()
    change(state)
    with pytest.raises(PretrainedImportError, match=message):
        convert_state_dict(state, size="micro")


def test_wrong_format_and_wrong_size_are_explained():
    with pytest.raises(PretrainedImportError, match="use format 'pumit'"):
        convert_state_dict(pumit_state(), format="timm", size="micro")
    with pytest.raises(PretrainedImportError, match="use size micro"):
        convert_state_dict(timm_state(), size="tiny")
    _, report = convert_state_dict(timm_state())  # size inferred from width and depth
    assert report.config.embed_dim == MODEL_SIZES["micro"].embed_dim


def test_read_state_dict_unwraps_containers_and_shared_prefixes(tmp_path):
    state = {"module.cls_token": torch.zeros(1, 1, E), "module.norm.weight": torch.ones(E)}
    torch.save({"model": state}, tmp_path / "w.pth")
    assert set(read_state_dict(tmp_path / "w.pth")) == {"cls_token", "norm.weight"}
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedImportError, match="tensors-only"):
        read_state_dict(tmp_path / "junk.pth")


def test_cli_writes_a_backbone_whose_fingerprint_it_prints(tmp_path, capsys):
    state = {k: v.float() for k, v in timm_state(layer_scale=True).items()}
    save_file(state, str(tmp_path / "vit.safetensors"))
    out = tmp_path / "backbone.safetensors"
    code = main(
        [
            "--format",
            "timm",
            "--in",
            str(tmp_path / "vit.safetensors"),
            "--out",
            str(out),
            "--size",
            "micro",
            "--input-norm",
            "imagenet",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "ignored head.weight" in printed
    digest = printed.split("fingerprint: ")[1].strip()
    model, loaded_digest = load_backbone(out)
    assert loaded_digest == digest and model.config.in_channels == 1 and not model.config.rope


def test_cli_imports_a_lightning_shaped_pumit_checkpoint_into_a_loadable_backbone(tmp_path, capsys):
    """What a user does with the release file: import it, then federate from the backbone."""
    state = {k: v.float() for k, v in pumit_state().items()}
    checkpoint = {
        "epoch": 0,
        "global_step": 300000,
        "pytorch-lightning_version": "2.1.0",
        "state_dict": state,
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-6, "params": [0]}]}],
        "callbacks": {"ModelCheckpoint{'every_n_train_steps': 10000}": {"dirpath": Path("/runs")}},
        "lr_schedulers": [{"t_in_epochs": False, "base_values": [2e-5]}],
    }
    torch.save(checkpoint, tmp_path / "pumit.ckpt")
    out = tmp_path / "backbone.safetensors"
    args = ["--format", "pumit", "--in", str(tmp_path / "pumit.ckpt"), "--out", str(out)]
    assert main(args) == 0
    assert "note: input normalisation mean (0.485" in capsys.readouterr().out  # auto: ImageNet
    model, _ = load_backbone(out, num_classes=2)
    c = model.config
    assert (c.mlp, c.mlp_norm, c.rope_style, c.norm_eps, c.pos_grid) == (
        "swiglu",
        True,
        "pumit",
        1e-5,
        PUMIT_GRID,
    )
    logits = model(torch.rand(2, 1, 8, 32, 32), (5.0, 0.7, 0.7))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_a_site_fine_tunes_an_imported_pumit_backbone_under_dp(tmp_path):
    """The imported architecture goes through a hospital's real round: LoRA on every linear
    (SwiGLU's fc1_g / fc1_x too), Opacus DP-SGD, the ledger spends epsilon."""
    from core.config import RunConfig
    from core.data import HospitalSpec, PhantomSite, generate_hospitals
    from core.federation.rounds import initial_adapters, train_round

    state = {k: v.float() for k, v in pumit_state().items()}
    save_file(state, str(tmp_path / "pumit.safetensors"))
    backbone = tmp_path / "backbone.safetensors"
    args = ["--format", "pumit", "--in", str(tmp_path / "pumit.safetensors"), "--out"]
    assert main([*args, str(backbone), "--size", "micro"]) == 0
    spec = HospitalSpec((PhantomSite("xr", "xr2d", 24, (32, 32)),), alpha=None)
    generate_hospitals(tmp_path / "sites", spec, seed=0)
    cfg = RunConfig.from_flat(
        {
            "backbone": str(backbone),
            "lora-targets": "attn-mlp",
            "in-plane-size": 32,
            "batch-size": 8,
            "num-server-rounds": 2,
        }
    )
    adapters, digest = initial_adapters(cfg)
    assert digest == load_backbone(backbone)[1]
    outcome = train_round(
        cfg,
        site_dir=tmp_path / "sites" / "xr",
        global_adapters=adapters,
        server_round=1,
        expected_fingerprint=digest,
        ledger_state=None,
        dp_seed=7,
    )
    assert outcome.status == "trained" and outcome.adapters is not None
    assert "blocks.0.mlp.fc1_g.lora_B.weight" in outcome.adapters
    assert outcome.local_head is not None  # "shared+local": the site keeps its personal head
    kept = outcome.local_head.tensors["head.personal.weight"]
    assert not torch.equal(kept, adapters["head.personal.weight"])
    assert not torch.equal(outcome.adapters["head.fc.weight"], adapters["head.fc.weight"])
    assert outcome.ledger is not None and 0 < outcome.metrics["epsilon"] <= 8.0
