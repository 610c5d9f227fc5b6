"""The universal Vision Transformer: one model for 2D images and 3D volumes of any spacing.

The patch embedding is one SAC downsampling conv, so a 2D X-ray ``(N, C, 1, H, W)``, a 1 mm CT
and a 5 mm MR all become token grids with the same weights. Position is a learned 3D absolute
embedding resampled to each token grid, plus a 3D rotary embedding inside attention. Every
projection is an ``nn.Linear`` (LoRA and Opacus's per-sample gradients apply) and attention runs
through ``scaled_dot_product_attention``.

The MLP is fc1-GELU-fc2 (ViT) or SwiGLU (EVA-02, PUMIT), optionally with a LayerNorm before its
output projection (sub-LN); with ``rope_style="pumit"``, ``norm_eps=1e-5`` and SwiGLU + sub-LN
the network computes what PUMIT's released ViT computes (see ``core.model.convert``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.model.pooling import pool_tokens, pool_width
from core.model.reference import FeatureReference
from core.model.sac import SACConv3d, SpatialState, batch_degree_of_anisotropy
from core.model.sizes import MODEL_SIZES, ViTConfig


def resample_position_grid(pos: Tensor, size: tuple[int, int, int]) -> Tensor:
    """Resample a learned position grid: area (mean) where shrinking, trilinear where growing.

    pos: (1, E, Dp, Hp, Wp) -> (1, E, d, h, w)
    """
    if tuple(pos.shape[2:]) == size:
        return pos
    d, h, w = pos.shape[2:]
    shrunk = (min(size[0], d), min(size[1], h), min(size[2], w))
    if shrunk != tuple(pos.shape[2:]):
        pos = F.adaptive_avg_pool3d(pos, shrunk)
    if shrunk != size:
        pos = F.interpolate(pos, size=size, mode="trilinear", align_corners=False)
    return pos


def _grid_angles(
    grid: tuple[int, int, int], freq_h: Tensor, freq_w: Tensor, freq_d: Tensor
) -> Tensor:
    """Angles of 2D axial RoPE plus a depth term: pair j turns with the row index at freq_h[j],
    pair Q + j with the column index at freq_w[j], and both with the slice index at freq_d[j].
    Frequencies (Q,) -> (1 + d*h*w, 2Q), CLS first (angle 0), in the frequencies' dtype."""
    d, h, w = grid
    zz, yy, xx = torch.meshgrid(
        *(torch.arange(size, dtype=freq_h.dtype) for size in (d, h, w)), indexing="ij"
    )
    zz, yy, xx = zz.reshape(-1, 1), yy.reshape(-1, 1), xx.reshape(-1, 1)  # (T, 1)
    angles = torch.cat([yy * freq_h + zz * freq_d, xx * freq_w + zz * freq_d], dim=1)  # (T, 2Q)
    return torch.cat([angles.new_zeros(1, angles.shape[1]), angles], dim=0)


def rope_angles(grid: tuple[int, int, int], head_dim: int, base: float) -> Tensor:
    """Rotation angles of this project's 3D RoPE for a token grid, CLS first (angle 0).

    Half of the rotation pairs turn with the row index, half with the column index (2D axial
    RoPE); every pair also turns with the slice index at a frequency taken in reverse order, so
    depth never aliases onto the same pair frequencies as h or w. A 2D input (d = 0) therefore gets
    plain 2D RoPE. Returns (1 + d*h*w, head_dim // 2).
    """
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float32) / quarter)  # (Q,)
    return _grid_angles(grid, freqs, freqs, freqs.flip(0))


PUMIT_ROPE_BASES = (2333.0, 10000.0, 10000.0)  # (d, h, w), PUMIT's defaults


def pumit_rope_angles(grid: tuple[int, int, int], head_dim: int) -> Tensor:
    """PUMIT's 3D RoPE angles for a token grid, CLS first (angle 0), in our pair order.

    Pair j < hd/4 turns with the row index at 10000^(-4j/hd), pair hd/4 + j with the column
    index at the same frequency (EVA-02's 2D layout), and every pair also turns with the slice
    index at 2333^(-2(2j+1)/hd). PUMIT rotates interleaved pairs (2j, 2j+1); the importer
    permutes q/k channels so that its pair j is our pair (j, j + hd/2). Float64, (1 + d*h*w,
    head_dim // 2).
    """
    quarter = head_dim // 4
    exponent = torch.arange(quarter, dtype=torch.float64) / (2 * quarter)  # (Q,)
    base_d, base_h, base_w = PUMIT_ROPE_BASES
    freq_d = base_d ** -(2 * exponent + 1 / (2 * quarter))  # (Q,)
    return _grid_angles(grid, base_h ** -(2 * exponent), base_w ** -(2 * exponent), freq_d)


@functools.lru_cache(maxsize=64)
def rope_tables(
    style: str, grid: tuple[int, int, int], head_dim: int, base: float
) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, (1 + d*h*w, head_dim // 2) each, computed once per
    token grid on the CPU (PUMIT's angles are float64, which not every device has)."""
    if style == "pumit":
        angles = pumit_rope_angles(grid, head_dim)
    else:
        angles = rope_angles(grid, head_dim, base)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_j, x_{j + hd/2}). x: (N, heads, T, hd); cos/sin: (T, hd/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (so LoRA can target q and v)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)
        # When a list (core.explain.recording_attention), forward computes the softmax
        # explicitly and appends the probabilities (N, heads, T, T), kept in the graph so their
        # gradients can be read; None (always in training) uses the fused SDPA kernel.
        self.recorded: list[Tensor] | None = None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        n, t, e = x.shape  # (N, T, E)

        def heads(y: Tensor) -> Tensor:  # (N, T, E) -> (N, heads, T, hd)
            return y.reshape(n, t, self.num_heads, e // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.recorded is None:
            out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, hd)
        else:
            scale = q.shape[-1] ** -0.5
            probs = (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)  # (N, heads, T, T)
            if probs.requires_grad:
                probs.retain_grad()
            self.recorded.append(probs)
            out = probs @ v
        return self.out_proj(out.transpose(1, 2).reshape(n, t, e))


class Mlp(nn.Module):
    """fc1-GELU-[norm]-fc2."""

    def __init__(self, dim: int, hidden: int, norm: nn.Module) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.norm = norm
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class SwiGLU(nn.Module):
    """Gated MLP: fc2(norm(SiLU(fc1_g x) * fc1_x x)), timm's names (PUMIT's w1, w2, ffn_ln, w3)."""

    def __init__(self, dim: int, hidden: int, norm: nn.Module) -> None:
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.norm = norm
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(self.act(self.fc1_g(x)) * self.fc1_x(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = Attention(dim, config.num_heads, config.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        hidden = int(dim * config.mlp_ratio)
        sub_norm = nn.LayerNorm(hidden, eps=config.norm_eps) if config.mlp_norm else nn.Identity()
        mlp_type = SwiGLU if config.mlp == "swiglu" else Mlp
        self.mlp = mlp_type(dim, hidden, sub_norm)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """One SAC downsampling conv, kernel = stride = patch size."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        p = config.patch_size
        self.proj = SACConv3d(config.in_channels, config.embed_dim, p, stride=p)

    def forward(self, x: Tensor, da: int) -> Tensor:
        """x: (N, C, D, H, W) -> tokens (N, E, d, h, w)."""
        state = SpatialState(da)
        p = self.patch_size
        depth_patch = max(p >> state.pending, 1)
        _, _, d, h, w = x.shape
        if h % p or w % p or d % depth_patch:
            raise ValueError(
                f"input (D, H, W) = {(d, h, w)} with DA {da} needs H and W multiples of {p} and D "
                f"a multiple of {depth_patch}; resample or pad the image (core.data does this)"
            )
        tokens, _ = self.proj(x, state)
        return tokens


class ClassifierHead(nn.Module):
    """Linear classifier on pooled features, conditioned first (``norm``, see ViTConfig).

    (N, F) -> (N, num_classes). With "reference" the linear layer reads the K whitened
    components ``(x - shift) @ projection`` (buffers, not parameters: not trained, not sent;
    every site holds the same ones through the backbone file).

    ``personal``: a second linear read-out of the same conditioned input whose logits are
    added to ``fc``'s (head-sharing "shared+local": ``fc`` is averaged over the sites, each
    site keeps its ``personal``; the personalised head of FedRoD, Chen & Chao, ICLR 2022).
    It starts at zero, so an untrained site scores with the shared read-out alone.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        norm: str,
        reference: FeatureReference | None = None,
        personal: bool = False,
    ) -> None:
        super().__init__()
        self.norm_mode = norm
        width = in_features
        self.norm: nn.Module = nn.Identity()
        if norm == "layer":
            self.norm = nn.LayerNorm(in_features, elementwise_affine=False)
        elif norm == "reference":
            if reference is None or reference.features != in_features:
                found = "none" if reference is None else f"{reference.features} features"
                raise ValueError(
                    f"head_norm 'reference' needs the backbone's reference for {in_features} "
                    f"pooled features, found {found}"
                )
            self.shift: Tensor
            self.projection: Tensor
            self.register_buffer("shift", reference.shift.clone(), persistent=False)
            self.register_buffer("projection", reference.projection.clone(), persistent=False)
            width = reference.components
        self.fc = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)
        self.personal: nn.Linear | None = None
        if personal:
            self.personal = nn.Linear(width, num_classes)
            nn.init.zeros_(self.personal.weight)
            nn.init.zeros_(self.personal.bias)

    def forward(self, pooled: Tensor) -> Tensor:
        if self.norm_mode == "reference":
            conditioned = (pooled - self.shift) @ self.projection  # (N, F) -> (N, K)
        else:
            conditioned = self.norm(pooled)  # (N, F)
        logits = self.fc(conditioned)  # (N, classes)
        if self.personal is not None:
            logits = logits + self.personal(conditioned)
        return logits


class UniversalViT(nn.Module):
    """Universal ViT with a classification head on the pooled tokens (``config.pool``).

    ``forward(x, spacing)``: x (N, C, D, H, W), spacing (N, 3) or (3,) as (d, h, w) in mm, one
    degree of anisotropy per batch -> logits (N, num_classes).
    """

    def __init__(self, config: ViTConfig, num_classes: int = 0) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *config.pos_grid))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self._init_weights()
        # Head-input references by pool, from the backbone file (core.model.reference).
        self.references: dict[str, FeatureReference] = {}
        self.num_classes = num_classes
        self.head: nn.Module = self._make_head(num_classes)  # after init: backbone RNG unaffected

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _make_head(self, num_classes: int, personal: bool = False) -> nn.Module:
        if not num_classes:
            return nn.Identity()
        width = pool_width(self.config.pool, self.config.embed_dim)
        reference = self.references.get(self.config.pool)
        return ClassifierHead(
            width, num_classes, norm=self.config.head_norm, reference=reference, personal=personal
        )

    def reset_head(
        self,
        num_classes: int,
        *,
        pool: str | None = None,
        head_norm: str | None = None,
        personal: bool = False,
    ) -> None:
        """A fresh head for ``num_classes``, optionally reading another pooling (``pool``)
        or conditioned another way (``head_norm``, see ViTConfig), with a ``personal`` read-out
        (:class:`ClassifierHead`); the backbone is untouched.
        Raises ValueError for "reference" when the backbone has no reference for the pool."""
        self.config = dataclasses.replace(
            self.config,
            pool=self.config.pool if pool is None else pool,
            head_norm=self.config.head_norm if head_norm is None else head_norm,
        )
        self.num_classes = num_classes
        self.head = self._make_head(num_classes, personal)

    def forward_features(
        self,
        x: Tensor,
        spacing: Tensor | Sequence[float],
        *,
        edit_tokens: Callable[[Tensor], Tensor] | None = None,
        hidden: list[Tensor] | None = None,
    ) -> Tensor:
        """(N, C, D, H, W) -> normalised tokens (N, 1 + d*h*w, E), CLS first.

        ``edit_tokens`` maps the patch tokens (N, T, E) after the embedding and before the
        position embedding: masked image modelling swaps masked tokens for a mask token there.
        ``hidden``: when a list, every block's output (N, 1 + d*h*w, E) is appended to it (a
        segmentation decoder reads several blocks, as UNETR does).
        """
        if x.dim() != 5:
            raise ValueError(
                f"expected (N, C, D, H, W), got shape {tuple(x.shape)}; a 2D image is D == 1"
            )
        if x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"model takes {self.config.in_channels} channel(s), input has {x.shape[1]}"
            )
        da = batch_degree_of_anisotropy(spacing)
        grid_tokens = self.patch_embed(x, da)  # (N, E, d, h, w)
        n, e, d, h, w = grid_tokens.shape
        tokens = grid_tokens.flatten(2).transpose(1, 2)  # (N, T, E)
        if edit_tokens is not None:
            tokens = edit_tokens(tokens)
        pos = resample_position_grid(self.pos_embed, (d, h, w))  # (1, E, d, h, w)
        tokens = tokens + pos.flatten(2).transpose(1, 2)  # (N, T, E)
        cls = self.cls_token.expand(n, -1, -1)  # (N, 1, E)
        tokens = torch.cat([cls, tokens], dim=1)  # (N, 1 + T, E)
        rope = None
        if self.config.rope:
            head_dim = e // self.config.num_heads
            cos, sin = rope_tables(
                self.config.rope_style, (d, h, w), head_dim, self.config.rope_base
            )
            rope = (cos.to(x.device, x.dtype), sin.to(x.device, x.dtype))
        for block in self.blocks:
            tokens = block(tokens, rope)
            if hidden is not None:
                hidden.append(tokens)
        return self.norm(tokens)

    def pool(self, features: Tensor) -> Tensor:
        """(N, 1 + T, E) -> (N, F), see :func:`core.model.pooling.pool_tokens`."""
        return pool_tokens(features, self.config.pool, self.config.norm_eps)

    def forward_head(self, features: Tensor) -> Tensor:
        """(N, 1 + T, E) -> (N, num_classes) from the pooled tokens (``config.pool``)."""
        return self.head(self.pool(features))

    def forward(self, x: Tensor, spacing: Tensor | Sequence[float]) -> Tensor:
        return self.forward_head(self.forward_features(x, spacing))


def create_vit(name: str, *, num_classes: int = 0, **overrides: Any) -> UniversalViT:
    """Build a named size; keyword overrides replace config fields (e.g. ``in_channels=3``)."""
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(MODEL_SIZES)}")
    config = dataclasses.replace(MODEL_SIZES[name], **overrides)
    return UniversalViT(config, num_classes=num_classes)


def count_parameters(module: nn.Module, predicate: Callable[[str], bool] | None = None) -> int:
    """Number of parameters, optionally only those whose name satisfies ``predicate``."""
    return sum(p.numel() for n, p in module.named_parameters() if predicate is None or predicate(n))
