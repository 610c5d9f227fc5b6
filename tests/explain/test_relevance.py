"""Relevance maps: shapes and normalisation on real models, and the right token on models
built so that the decision provably depends on one known token."""

from __future__ import annotations

import pytest
import torch

from core.adapters.lora import add_lora
from core.adapters.settings import LoraSettings
from core.explain.relevance import METHODS, ExplainError, explain, token_grid
from core.model.sac import degree_of_anisotropy
from core.model.sizes import ViTConfig
from core.model.vit import UniversalViT, create_vit

pytestmark = pytest.mark.usefixtures("one_thread")

# (image shape (C, D, H, W), spacing (d, h, w) mm): 2D, isotropic 3D, thick-slice 3D (DA 2).
INPUTS = {
    "2d": ((1, 1, 64, 64), (1e4, 0.5, 0.5)),
    "3d-iso": ((1, 32, 64, 64), (1.0, 1.0, 1.0)),
    "3d-thick": ((1, 8, 64, 64), (4.0, 1.0, 1.0)),
}


# Every method with every pool, except Grad-CAM under "stats" pooling: its token-averaged
# channel weights can make every token negative there (an all-zero map, as documented).
POOLED = [(m, p) for p in ("mean", "cls", "contrast", "stats") for m in METHODS]
POOLED.remove(("gradcam", "stats"))


@pytest.mark.parametrize("kind", sorted(INPUTS))
@pytest.mark.parametrize(("method", "pool"), POOLED)
def test_maps_have_the_input_grid_and_are_scaled_to_one(kind, method, pool):
    shape, spacing = INPUTS[kind]
    torch.manual_seed(0)
    model = add_lora(create_vit("micro", num_classes=2, pool=pool), LoraSettings(rank=4))
    image = torch.rand(shape)
    result = explain(model, image, spacing, method=method)
    da = degree_of_anisotropy(spacing)
    assert tuple(result.token_map.shape) == token_grid(model.get_base_model(), shape[1:], da)
    assert tuple(result.image_map.shape) == shape[1:]
    assert result.image_map.dtype == torch.float32
    assert float(result.token_map.min()) >= 0.0
    assert float(result.token_map.max()) == pytest.approx(1.0)
    assert 0.0 <= result.score <= 1.0 and result.target == 1
    assert all(p.grad is None for p in model.parameters())  # nothing left behind


def test_merged_and_unmerged_lora_explain_alike():
    torch.manual_seed(1)
    model = add_lora(create_vit("micro", num_classes=2), LoraSettings(rank=4, mode="vanilla"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)  # B != 0: the adapters change the model
    image, spacing = torch.rand(1, 8, 64, 64), (4.0, 1.0, 1.0)
    unmerged = explain(model, image, spacing, method="grad-attention")
    merged_model = model.merge_and_unload()
    assert isinstance(merged_model, UniversalViT)
    merged = explain(merged_model, image, spacing, method="grad-attention")
    assert merged.score == pytest.approx(unmerged.score, abs=1e-5)
    torch.testing.assert_close(merged.token_map, unmerged.token_map, atol=1e-4, rtol=1e-4)


def _one_token_model(*, routed: bool) -> UniversalViT:
    """A ViT whose score depends on one token only: the one whose patch holds signal.

    The patch embedding puts a patch's left half minus its right half into channel 0 (other
    channels, the CLS token and positions are zero, so an empty patch is the zero token and
    LayerNorm keeps it zero; a patch replaced by its own mean, as occlusion does, is one too).
    ``routed``: every query attends to the token with signal (q is a constant vector, only that
    token has a key) and copies its value into channel 2, which the head reads; the decision
    flows through attention. Otherwise attention adds nothing and the head reads channel 0 of
    each token itself (a local decision, for Grad-CAM and the token gradient).
    """
    config = ViTConfig(embed_dim=8, depth=1, num_heads=1, rope=False, pos_grid=(2, 4, 4))
    model = UniversalViT(config, num_classes=2).double()
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
        left_minus_right = model.patch_embed.proj.weight[0]  # (C, kd, kh, kw)
        left_minus_right[..., :8].fill_(1.0)
        left_minus_right[..., 8:].fill_(-1.0)
        block = model.blocks[0]
        if routed:
            block.attn.q_proj.bias[1] = 10.0  # every query is 10 * e1
            block.attn.k_proj.weight[1, 0] = 10.0  # only a token with signal has a key
            block.attn.v_proj.weight[2, 0] = 1.0  # its value lands in channel 2
            block.attn.out_proj.weight.copy_(torch.eye(8))
            model.head.fc.weight[1, 2] = 1.0
        else:
            model.head.fc.weight[1, 0] = 1.0
    return model


@pytest.mark.parametrize("kind", sorted(INPUTS))
@pytest.mark.parametrize(
    ("method", "routed"),
    [
        ("rollout", True),
        ("grad-attention", True),
        ("gradcam", False),
        ("token-gradient", False),
        ("occlusion", True),
        ("occlusion", False),
    ],
)
def test_the_maximum_is_on_the_token_the_decision_depends_on(kind, method, routed):
    shape, spacing = INPUTS[kind]
    model = _one_token_model(routed=routed)
    da = degree_of_anisotropy(spacing)
    grid = token_grid(model, shape[1:], da)
    depth_patch = max(16 >> da, 1)
    token = (grid[0] - 1, 2, 1)  # the last depth token, row 2, column 1
    image = torch.zeros(shape, dtype=torch.float64)
    d0, h0, w0 = token[0] * depth_patch, token[1] * 16, token[2] * 16
    image[:, d0 : d0 + depth_patch, h0 : h0 + 16, w0 : w0 + 8] = 1.0  # the patch's left half
    result = explain(model, image, spacing, method=method)
    assert result.score > 0.5  # the signal raises the positive class
    flat = int(result.token_map.flatten().argmax())
    assert flat == (token[0] * grid[1] + token[1]) * grid[2] + token[2]
    assert float(result.token_map.flatten().sort().values[-2]) < 0.9  # a clear maximum
    # On the image grid, exactly the voxels of that patch carry the maximum (slices line up).
    hot = result.image_map == result.image_map.max()
    expected = torch.zeros(shape[1:], dtype=torch.bool)
    expected[d0 : d0 + depth_patch, h0 : h0 + 16, w0 : w0 + 16] = True
    assert torch.equal(hot, expected)


def test_bad_requests_are_refused():
    model = create_vit("micro", num_classes=2)
    image = torch.rand(1, 1, 32, 32)
    with pytest.raises(ExplainError, match="unknown method"):
        explain(model, image, (1e4, 1, 1), method="saliency")
    with pytest.raises(ExplainError, match="out of range"):
        explain(model, image, (1e4, 1, 1), target=5)
    with pytest.raises(ExplainError, match="no classification head"):
        explain(create_vit("micro"), image, (1e4, 1, 1))
    with pytest.raises(ExplainError, match=r"\(C, D, H, W\)"):
        explain(model, image[0], (1e4, 1, 1))


class _SquaresModel(torch.nn.Module):
    """Logits (0, sum of w * x^2): w = +1 on one token's patch, -1 on another's, 0 elsewhere.
    Replacing a patch by its own mean lowers its sum of squares by exactly n * variance, so the
    occlusion drop of every token is known in closed form."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.config = ViTConfig(embed_dim=8, depth=1, num_heads=1, patch_size=16)
        self.weights = weights  # (C, D, H, W)

    def forward(self, x: torch.Tensor, spacing: torch.Tensor) -> torch.Tensor:
        score = (self.weights * x**2).flatten(1).sum(dim=1)  # (N,)
        return torch.stack([torch.zeros_like(score), score], dim=1)


@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_occlusion_drops_are_the_closed_form_ones(kind):
    """Occlusion replaces each token's patch by that patch's own mean (not the image's, not
    zero) and reports the signed drop of the explained margin, token by token in (d, h, w)
    order: here +n * var / 2 for the helping patch, -n * var / 2 for the hurting one, 0
    elsewhere."""
    from core.explain.relevance import _margin, _occlusion

    shape, spacing = INPUTS[kind]
    da = degree_of_anisotropy(spacing)
    depth_patch = max(16 >> da, 1)
    grid = (shape[1] // depth_patch, shape[2] // 16, shape[3] // 16)
    torch.manual_seed(0)
    image = torch.rand(shape, dtype=torch.float64)[None]  # (1, C, D, H, W)
    weights = torch.zeros(shape, dtype=torch.float64)
    helping, hurting = (grid[0] - 1, 1, 2), (0, 3, 0)

    def patch(token):
        k, i, j = token
        return (slice(None), slice(k * depth_patch, (k + 1) * depth_patch),
                slice(i * 16, (i + 1) * 16), slice(j * 16, (j + 1) * 16))  # fmt: skip

    weights[patch(helping)], weights[patch(hurting)] = 1.0, -1.0
    model = _SquaresModel(weights)
    spacing_t = torch.tensor([spacing], dtype=torch.float64)
    base = _margin(model(image, spacing_t), 1)
    drops = _occlusion(model, image, spacing_t, da, base, target=1).reshape(grid)
    expected = torch.zeros(grid, dtype=torch.float64)
    for token, sign in ((helping, 1.0), (hurting, -1.0)):
        values = image[0][patch(token)]
        # The margin logit[1] - mean(logits) of logits (0, s) is s / 2.
        expected[token] = sign * values.numel() * values.var(unbiased=False) / 2
    torch.testing.assert_close(drops, expected, rtol=1e-9, atol=1e-9)


def test_a_single_output_head_explains_the_positive_class_with_its_probability():
    """A sigmoid head (one output): by default the positive class, with P(class 1) as its
    score; for target 0, 1 - P(class 1) and the opposite margin (it explained -logit with the
    score of +logit before)."""
    torch.manual_seed(2)
    model = create_vit("micro", num_classes=1)
    image, spacing = torch.rand(1, 1, 32, 32), (1e4, 1.0, 1.0)
    with torch.no_grad():
        positive = float(torch.sigmoid(model(image[None], torch.tensor([spacing]))[0, 0]))
    default = explain(model, image, spacing, method="token-gradient")
    assert default.target == 1 and default.score == pytest.approx(positive, abs=1e-6)
    negative = explain(model, image, spacing, method="token-gradient", target=0)
    assert negative.target == 0 and negative.score == pytest.approx(1 - positive, abs=1e-6)
