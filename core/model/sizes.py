"""The universal ViT's architecture (:class:`ViTConfig`) and its named sizes, without torch.

Apart from :mod:`core.model.vit` so that what only names or checks an architecture (the run
config validating ``model-size`` and ``head-pool``, a checkpoint's stored config, the size
table of a benchmark) does not pay for importing torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

POOLS = ("mean", "mean-max", "contrast", "stats", "cls")  # core.model.pooling says what each reads
HEAD_NORMS = ("reference", "layer", "none")


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
    rope_base: float = 100.0  # "universal" style only
    # "universal": this project's 3D RoPE (rope_angles); "pumit": PUMIT's (pumit_rope_angles).
    rope_style: str = "universal"
    qkv_bias: bool = True
    mlp: str = "gelu"  # "gelu": fc1-GELU-fc2; "swiglu": fc2(SiLU(fc1_g x) * fc1_x x)
    mlp_norm: bool = False  # sub-LN: a LayerNorm on the hidden features before fc2
    norm_eps: float = 1e-6  # every LayerNorm (timm 1e-6, PUMIT 1e-5)
    pool: str = "mean"  # what the head reads (core.model.pooling)
    # How the pooled features are conditioned before the linear head: "reference" (shift and
    # whitening projection fit on the backbone's unlabeled pretraining images and shipped in
    # the backbone file, core.model.reference), "layer" (a LayerNorm without parameters, per
    # example) or "none". Neither has anything to train, so Opacus needs no per-sample gradient
    # for them, and unlike BatchNorm they mix no examples, which DP-SGD forbids.
    head_norm: str = "none"

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.head_norm not in HEAD_NORMS:
            raise ValueError(f"head_norm must be one of {HEAD_NORMS}, got {self.head_norm!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.rope_style not in ("universal", "pumit"):
            raise ValueError(f"rope_style must be 'universal' or 'pumit', got {self.rope_style!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
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
        if isinstance(values.get("head_norm"), bool):  # checkpoints before head-norm modes
            values["head_norm"] = "layer" if values["head_norm"] else "none"
        if "pos_grid" in values:
            values["pos_grid"] = tuple(values["pos_grid"])
        return cls(**values)


# Named sizes. "micro" is for tests and the CPU demo; "base" is ViT-B (about 86M parameters);
# "large" is ViT-L (PUMIT-L's width, depth and heads), for importing such checkpoints.
MODEL_SIZES: dict[str, ViTConfig] = {
    "micro": ViTConfig(embed_dim=96, depth=4, num_heads=3),
    "tiny": ViTConfig(embed_dim=192, depth=12, num_heads=3),
    "small": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "base": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "large": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
}
