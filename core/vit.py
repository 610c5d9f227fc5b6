"""The universal Vision Transformer: one model for 2D images and 3D volumes of any spacing.

The patch embedding is one SAC downsampling conv, so a 2D X-ray ``(N, C, 1, H, W)``, a 1 mm CT
and a 5 mm MR all become token grids with the same weights. Position is a learned 3D absolute
embedding resampled to each token grid, plus a 3D rotary embedding inside attention. Every
projection is an ``nn.Linear`` (LoRA and Opacus's per-sample gradients apply) and attention runs
through ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.sac import SACConv3d, SpatialState, batch_degree_of_anisotropy


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a universal ViT. Frozen: it is stored inside every checkpoint."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 16
    in_channels: int = 1
    pos_grid: tuple[int, int, int] = (8, 16, 16)  # learned absolute position grid (d, h, w)
    rope: bool = True
    rope_base: float = 100.0
    qkv_bias: bool = True
    # What the head reads: "mean" of the patch tokens (as MAE/BEiT fine-tune; a local lesion
    # moves the mean, and MIM pretraining trains patch tokens, never the CLS token) or "cls".
    pool: str = "mean"

    def __post_init__(self) -> None:
        if self.pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {self.pool!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}"
            )
        if self.rope and (self.embed_dim // self.num_heads) % 4:
            raise ValueError(
                f"3D RoPE needs a head dim divisible by 4, got {self.embed_dim // self.num_heads}; "
                "change embed_dim/num_heads or set rope=False"
            )
        p = self.patch_size
        if p < 1 or p & (p - 1):
            raise ValueError(f"patch_size must be a power of two, got {p}")
        if self.in_channels < 1 or self.depth < 1:
            raise ValueError("in_channels and depth must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ViTConfig fields {sorted(unknown)}; valid: {sorted(known)}")
        values = dict(data)
        if "pos_grid" in values:
            values["pos_grid"] = tuple(values["pos_grid"])
        return cls(**values)


# Named sizes. "micro" is for tests and the CPU demo; "base" is ViT-B (about 86M parameters).
MODEL_SIZES: dict[str, ViTConfig] = {
    "micro": ViTConfig(embed_dim=96, depth=4, num_heads=3),
    "tiny": ViTConfig(embed_dim=192, depth=12, num_heads=3),
    "small": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "base": ViTConfig(embed_dim=768, depth=12, num_heads=12),
}


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


def rope_angles(grid: tuple[int, int, int], head_dim: int, base: float) -> Tensor:
    """Rotation angles of the 3D RoPE for a token grid, CLS first (angle 0).

    Half of the rotation pairs turn with the row index, half with the column index (2D axial
    RoPE); every pair also turns with the slice index at a frequency taken in reverse order, so
    depth never aliases onto the same pair frequencies as h or w. A 2D input (d = 0) therefore gets
    plain 2D RoPE. Returns (1 + d*h*w, head_dim // 2).
    """
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float32) / quarter)  # (Q,)
    d, h, w = grid
    zz, yy, xx = torch.meshgrid(
        torch.arange(d, dtype=torch.float32),
        torch.arange(h, dtype=torch.float32),
        torch.arange(w, dtype=torch.float32),
        indexing="ij",
    )
    zz, yy, xx = zz.reshape(-1, 1), yy.reshape(-1, 1), xx.reshape(-1, 1)  # (T, 1)
    depth_freqs = freqs.flip(0)
    angles = torch.cat(
        [yy * freqs + zz * depth_freqs, xx * freqs + zz * depth_freqs], dim=1
    )  # (T, 2Q)
    return torch.cat([torch.zeros(1, 2 * quarter), angles], dim=0)  # (1 + T, head_dim // 2)


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

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        n, t, e = x.shape  # (N, T, E)

        def heads(y: Tensor) -> Tensor:  # (N, T, E) -> (N, heads, T, hd)
            return y.reshape(n, t, self.num_heads, e // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, hd)
        return self.out_proj(out.transpose(1, 2).reshape(n, t, e))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, config.num_heads, config.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))

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
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._init_weights()
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

    def _make_head(self, num_classes: int) -> nn.Module:
        if not num_classes:
            return nn.Identity()
        head = nn.Linear(self.config.embed_dim, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    def reset_head(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)

    def forward_features(
        self,
        x: Tensor,
        spacing: Tensor | Sequence[float],
        *,
        edit_tokens: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """(N, C, D, H, W) -> normalised tokens (N, 1 + d*h*w, E), CLS first.

        ``edit_tokens`` maps the patch tokens (N, T, E) after the embedding and before the
        position embedding: masked image modelling swaps masked tokens for a mask token there.
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
            angles = rope_angles((d, h, w), head_dim, self.config.rope_base).to(x.device)
            rope = (angles.cos().to(x.dtype), angles.sin().to(x.dtype))
        for block in self.blocks:
            tokens = block(tokens, rope)
        return self.norm(tokens)

    def forward_head(self, features: Tensor) -> Tensor:
        """(N, 1 + T, E) -> (N, num_classes) from the mean patch token or the CLS token."""
        pooled = features[:, 1:].mean(dim=1) if self.config.pool == "mean" else features[:, 0]
        return self.head(pooled)  # pooled: (N, E)

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
