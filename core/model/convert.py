"""Import pre-trained ViT weights from other code bases into the universal ViT.

Why: pretraining a ViT-B from scratch is out of reach for a hospital consortium, but public
2D ViTs (timm, EVA) and PUMIT's universal medical ViT exist. PUMIT showed how to carry 2D
weights into a SAC model without breaking what they compute ("inflation"); this module applies
those rules, maps parameter names onto ours, and refuses anything it cannot map exactly.

Two source formats:

``"timm"``: a 2D ViT of timm's ``VisionTransformer`` or EVA family (``.pth``/``.bin``/
``.safetensors``). Names read::

    patch_embed.proj.weight (E, C_src, P, P), patch_embed.proj.bias (E,)
    cls_token (1, 1, E);  pos_embed (1, 1 + h*w, E) with the CLS position first, or (1, h*w, E)
    blocks.N.norm1 / norm2 .weight .bias
    blocks.N.attn.qkv.weight (3E, E) fused, rows q | k | v  -> attn.q_proj / k_proj / v_proj
    blocks.N.attn.qkv.bias (3E,)  or EVA's  attn.q_bias, attn.v_bias [, attn.k_bias]
    blocks.N.attn.q_proj / k_proj / v_proj .weight [.bias]   (EVA with qkv_fused=False)
    blocks.N.attn.proj .weight .bias                           -> attn.out_proj
    blocks.N.ls1.gamma, ls2.gamma (timm) / gamma_1, gamma_2 (EVA, BEiT): LayerScale, folded
        exactly into attn.out_proj / mlp.fc2 (gamma * (W x + b) == (gamma W) x + gamma b)
    blocks.N.mlp.fc1 / fc2 .weight .bias  (GELU) or mlp.fc1_g / fc1_x / fc2 (EVA SwiGLU)
    blocks.N.mlp.norm .weight .bias (optional sub-LN);  norm .weight .bias

``"pumit"``: the PUMIT release (``function2-llx/PUMIT``, ``pumit/model/vit.py``; the
``state_dict`` of its Lightning ``.ckpt``, read weights-only with paths allowed, as Lightning
stores its checkpoint folder as one). It is 3D and EVA-02-like; names read::

    patch_embed.proj.weight (E, C_src, 16, 16, 16), .bias;  cls_token (1, 1, E)
    pos_embed (1, E, d, h, w)                    a 3D grid like ours (added before the CLS)
    blocks.N.norm1 / norm2 .weight .bias         LayerNorm eps 1e-5
    blocks.N.attn.q_proj / k_proj / v_proj .weight (no bias) with attn.q_bias, attn.v_bias
        (k has none);  blocks.N.attn.proj -> attn.out_proj
    blocks.N.mlp.w1 (gate) / w2 (value) / ffn_ln (sub-LN) / w3 .weight .bias: SwiGLU,
        w3(ffn_ln(SiLU(w1 x) * w2 x))        -> mlp.fc1_g / fc1_x / norm / fc2
    norm .weight .bias;  mask_token, mim_head.* (MIM only) are ignored

Its 3D rotary embedding (bases 2333 / 10000 / 10000 for d / h / w, EVA-02's merged h-w layout,
interleaved pairs) is ``rope_style="pumit"`` of core.model.vit. Our RoPE rotates split pairs (j,
j + hd/2), so the importer permutes the rows of q and k inside every head to match; q.k, and so
the attention, is unchanged by a common permutation. With that, eps 1e-5 and the SwiGLU sub-LN
MLP, the imported model computes PUMIT's ``ViT.forward`` (tested against a reference written
from PUMIT's code).

Inflation and adaptation rules (PUMIT's):

* A 2D patch kernel becomes 3D by dividing by the depth P and repeating it over the P depth
  taps: on a slice-repeated volume at DA 0 it gives the 2D kernel's response on the slice, and
  on a 2D image (DA 5, taps summed by SAC) it *is* the 2D kernel.
* Input channels: the source's ``C_src`` (3 for RGB) weights are summed and, for
  ``in_channels > 1``, shared equally: a grey image repeated to ``in_channels`` gets the source
  kernel's response on the grey image repeated to ``C_src`` channels.
* Optional ``input_norm=(mean, std)`` per source channel (timm and PUMIT expect ImageNet-
  normalised input, ours is about [0, 1]) is folded exactly into the kernel and bias.
* The 2D position grid is repeated over depth to a 3D grid (its in-plane size is kept unless
  ``pos_grid`` asks for another, then resampled as the model does at run time); the CLS position
  is added into ``cls_token`` (it was always added to CLS).

Loading is complete or it fails: every target parameter must come from the checkpoint, and every
checkpoint key must be mapped or known to be irrelevant (classifier heads, MIM decoders, mask
tokens, rotary tables), which are listed in the report; anything else raises
:class:`PretrainedImportError` naming the keys.

CLI::

    python -m core.model.convert --format timm --in vit.pth --out backbone.safetensors
        [--size base] [--in-channels 1] [--input-norm auto|none|imagenet] [--rope | --no-rope]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from core.model.checkpoint import save_backbone
from core.model.vit import MODEL_SIZES, UniversalViT, ViTConfig, resample_position_grid

SourceFormat = Literal["timm", "pumit"]
FORMATS: tuple[SourceFormat, ...] = ("timm", "pumit")
IMAGENET_NORM: tuple[tuple[float, ...], tuple[float, ...]] = (
    (0.485, 0.456, 0.406),
    (0.229, 0.224, 0.225),
)
_SAFE_CLASSES: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
    pathlib.PosixPath,
    pathlib.WindowsPath,
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
]
_WRAPPERS = ("state_dict", "model", "module", "model_state", "state")
_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.")

_ROTARY_TABLES = r"((^|\.)rope\.|freqs_(cos|sin)$)"
# Keys that carry nothing the backbone computes: listed in the report, then dropped.
_IGNORABLE: tuple[tuple[str, str], ...] = (
    (r"^head(\.|$)", "classifier head"),
    (r"^fc_norm\.", "norm of the pooled classifier feature"),
    (r"^(pre_logits|attn_pool|head_drop)\.", "classifier pooling"),
    (r"^mask_token$", "MIM mask token (pretraining only)"),
    (r"^(lm_head|mim_head|decoder|decoder_\w+)(\.|$)", "MIM / MAE decoder (pretraining only)"),
    (_ROTARY_TABLES, "rotary tables (PUMIT's RoPE is recomputed by the model)"),
    (r"\.relative_position_index$", "index buffer"),
)
# Keys of architecture features our ViT does not have: refusing beats silently dropping them.
_UNSUPPORTED: tuple[tuple[str, str], ...] = (
    (r"^(dist_token|reg_token)$", "extra prefix tokens (distillation / registers)"),
    (r"\.attn\.(q_norm|k_norm)\.", "QK-normalisation"),
    (
        r"\.attn\.(norm|inner_attn_ln)\.",
        "a LayerNorm before the attention output projection (EVA-02 inner_attn_ln / timm "
        "scale_attn_inner); core.model.vit.Attention has none",
    ),
    (r"relative_position_bias_table$", "relative position biases (BEiT)"),
)


class PretrainedImportError(ValueError):
    """A checkpoint cannot be mapped exactly onto the universal ViT."""


@dataclass(frozen=True)
class ImportReport:
    """What an import did: the resulting config, and the source keys it left out and why."""

    config: ViTConfig
    ignored: tuple[tuple[str, str], ...]  # (key, reason)
    notes: tuple[str, ...]


# ------------------------------------------------------------------------------------ reading


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file, unwrapped from ``{"state_dict": ...}``-style containers
    and from a prefix every key shares (``module.``, ``model.``...)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedImportError(f"checkpoint {path} does not exist; check --in")
    raw: Any
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise PretrainedImportError(
                f"{path} is not a readable safetensors file: {err}"
            ) from err
    else:
        try:
            # weights_only: a checkpoint must never run code when it is read. Paths are allowed:
            # Lightning keeps its checkpoint folder as one (PUMIT's .ckpt), and building a
            # path runs nothing.
            with torch.serialization.safe_globals(_SAFE_CLASSES):
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle and zip errors come in many types
            raise PretrainedImportError(
                f"{path} cannot be read as a tensors-only torch checkpoint ({err}); if it holds "
                "other pickled objects, re-save only its state dict where you trust the file: "
                "torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pth')"
            ) from err
    return unwrap_state_dict(raw, source=str(path))


def unwrap_state_dict(raw: Any, *, source: str = "checkpoint") -> dict[str, Tensor]:
    """The flat ``{name: tensor}`` inside a checkpoint object."""
    for _ in range(3):  # nested wrappers such as {"model": {"state_dict": ...}}
        if not isinstance(raw, Mapping):
            break
        if all(isinstance(v, Tensor) for v in raw.values()):
            break
        inner = next((raw[k] for k in _WRAPPERS if isinstance(raw.get(k), Mapping)), None)
        if inner is None:
            break
        raw = inner
    if not isinstance(raw, Mapping) or not raw:
        raise PretrainedImportError(f"{source} holds no state dict (found {type(raw).__name__})")
    bad = sorted(k for k, v in raw.items() if not isinstance(v, Tensor))
    if bad:
        raise PretrainedImportError(
            f"{source}: entries {bad[:5]} are not tensors; pass the model's state dict "
            f"(top-level keys: {sorted(raw)[:8]})"
        )
    state = {str(k): v for k, v in raw.items()}
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


# --------------------------------------------------------------------------------- conversion


def _reason(key: str, table: tuple[tuple[str, str], ...]) -> str | None:
    return next((why for pattern, why in table if re.search(pattern, key)), None)


def _resolve_config(
    size: str | ViTConfig | None, embed_dim: int, depth: int, source: str
) -> ViTConfig:
    if isinstance(size, ViTConfig):
        config = size
    elif isinstance(size, str):
        if size not in MODEL_SIZES:
            raise PretrainedImportError(
                f"unknown size {size!r}; choose one of {sorted(MODEL_SIZES)} or pass a ViTConfig"
            )
        config = MODEL_SIZES[size]
    else:
        matches = [
            name for name, c in MODEL_SIZES.items() if (c.embed_dim, c.depth) == (embed_dim, depth)
        ]
        if not matches:
            raise PretrainedImportError(
                f"{source}: no named size has embed_dim {embed_dim} and depth {depth}; pass "
                "size=ViTConfig(embed_dim=..., depth=..., num_heads=...) (heads cannot be read "
                "from the weights)"
            )
        config = MODEL_SIZES[matches[0]]
    if (config.embed_dim, config.depth) != (embed_dim, depth):
        fitting = [
            n for n, c in MODEL_SIZES.items() if (c.embed_dim, c.depth) == (embed_dim, depth)
        ]
        raise PretrainedImportError(
            f"{source} has embed_dim {embed_dim} and depth {depth}, the requested size has "
            f"{config.embed_dim} and {config.depth}; use size {fitting[0] if fitting else '...'}"
            " or a matching ViTConfig"
        )
    return config


class _Source:
    """The checkpoint's tensors, tracking which keys were consumed and which are missing."""

    def __init__(self, state: Mapping[str, Tensor]) -> None:
        self.state = dict(state)
        self.used: set[str] = set()
        self.missing: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> Tensor:
        if key not in self.state:
            self.missing.append(key)
            return torch.zeros(shape or (0,), dtype=torch.float64)
        value = self.state[key]
        self.used.add(key)
        if shape is not None and tuple(value.shape) != shape:
            raise PretrainedImportError(
                f"checkpoint key {key!r} has shape {tuple(value.shape)}, expected {shape}; the "
                "checkpoint does not fit this architecture (check --format and --size; the MLP "
                "width is read from blocks.0)"
            )
        return value.detach().to(torch.float64).clone()  # float64: exact folds; never aliases

    def optional(self, key: str, shape: tuple[int, ...]) -> Tensor | None:
        return self.take(key, shape) if key in self.state else None


def _patch_kernel(
    src: _Source,
    fmt: SourceFormat,
    embed_dim: int,
    patch: int,
    in_channels: int,
    input_norm: tuple[Sequence[float], Sequence[float]] | None,
) -> tuple[Tensor, Tensor]:
    """(E, in_channels, P, P, P) kernel and (E,) bias by the rules of the module docstring."""
    weight = src.take("patch_embed.proj.weight")  # (E, C, P, P) or (E, C, P, P, P)
    bias = src.take("patch_embed.proj.bias", (embed_dim,))
    if "patch_embed.proj.weight" not in src.used:
        return torch.zeros(embed_dim, in_channels, patch, patch, patch), bias
    expected_dims = 4 if fmt == "timm" else 5
    if weight.dim() != expected_dims:
        other = "pumit" if fmt == "timm" else "timm"
        raise PretrainedImportError(
            f"patch_embed.proj.weight has shape {tuple(weight.shape)}: a "
            f"{'3D' if weight.dim() == 5 else '2D'} kernel, not what format {fmt!r} holds; "
            f"use format {other!r}"
        )
    if weight.shape[0] != embed_dim or any(k != patch for k in weight.shape[2:]):
        raise PretrainedImportError(
            f"patch_embed.proj.weight has shape {tuple(weight.shape)}, expected "
            f"({embed_dim}, C, {', '.join([str(patch)] * (weight.dim() - 2))})"
        )
    src_channels = weight.shape[1]
    if input_norm is not None:
        mean = torch.tensor(input_norm[0], dtype=torch.float64)
        std = torch.tensor(input_norm[1], dtype=torch.float64)
        if mean.numel() != src_channels or std.numel() != src_channels or (std <= 0).any():
            raise PretrainedImportError(
                f"input_norm needs {src_channels} means and {src_channels} positive stds (one "
                f"per source channel), got {input_norm}"
            )
        view = (1, src_channels) + (1,) * (weight.dim() - 2)
        weight = weight / std.view(view)  # W (x - m) / s == (W / s) x - (W / s) m
        bias = bias - (weight * mean.view(view)).flatten(1).sum(dim=1)
    if src_channels != in_channels:
        shared = weight.sum(dim=1, keepdim=True) / in_channels  # (E, 1, ...)
        weight = shared.expand(-1, in_channels, *weight.shape[2:])
    if weight.dim() == 4:  # inflate: W / P on each of the P depth taps
        weight = (weight / patch).unsqueeze(2).expand(-1, -1, patch, -1, -1)
    return weight.contiguous(), bias


def _position(
    src: _Source,
    fmt: SourceFormat,
    embed_dim: int,
    pos_grid: Sequence[int] | None,
    default_depth: int,
) -> tuple[Tensor, Tensor | None]:
    """(1, E, d, h, w) grid and the CLS position (1, 1, E) or None."""
    pos = src.take("pos_embed")
    if "pos_embed" not in src.used:
        return torch.zeros(1, embed_dim, 1, 1, 1), None
    cls_pos = None
    if pos.dim() == 3 and pos.shape[0] == 1 and pos.shape[2] == embed_dim:  # 2D sequence
        if fmt == "pumit":
            raise PretrainedImportError(
                f"pos_embed has shape {tuple(pos.shape)} (a 2D sequence) in a PUMIT checkpoint, "
                "whose grid is (1, E, d, h, w); use format 'timm'"
            )
        length = pos.shape[1]
        if math.isqrt(length) ** 2 != length:  # the CLS position comes first
            cls_pos, pos = pos[:, :1], pos[:, 1:]
        side = math.isqrt(pos.shape[1])
        if side < 1 or side * side != pos.shape[1]:
            raise PretrainedImportError(
                f"pos_embed has {length} positions: not n*n or 1 + n*n; non-square grids and "
                "extra prefix tokens are not supported"
            )
        grid = pos.transpose(1, 2).reshape(1, embed_dim, 1, side, side)  # (1, E, 1, h, w)
        depth = int(pos_grid[0]) if pos_grid is not None else default_depth
        grid = grid.expand(-1, -1, depth, -1, -1)  # depth: repeat
    elif pos.dim() == 5 and pos.shape[:2] == (1, embed_dim):
        if fmt == "timm":
            raise PretrainedImportError(
                f"pos_embed has shape {tuple(pos.shape)}: a 3D grid, not a timm 2D sequence; "
                "use format 'pumit'"
            )
        grid = pos
    else:
        raise PretrainedImportError(
            f"pos_embed has shape {tuple(pos.shape)}; expected (1, [1 +] n*n, {embed_dim}) or "
            f"(1, {embed_dim}, d, h, w)"
        )
    if pos_grid is not None and tuple(grid.shape[2:]) != tuple(pos_grid):
        size = (int(pos_grid[0]), int(pos_grid[1]), int(pos_grid[2]))
        grid = resample_position_grid(grid.contiguous(), size)
    return grid.contiguous(), cls_pos


# The source's names of our MLP layers, per format (timm Eva's SwiGLU / PUMIT's).
_MLP_NAMES: dict[SourceFormat, dict[str, str]] = {
    "timm": {"fc1": "fc1", "fc1_g": "fc1_g", "fc1_x": "fc1_x", "norm": "norm", "fc2": "fc2"},
    "pumit": {"fc1_g": "w1", "fc1_x": "w2", "norm": "ffn_ln", "fc2": "w3"},
}


@dataclass(frozen=True)
class _MlpLayout:
    """Which of our MLP layers the checkpoint has (read from block 0) and their source names."""

    layers: tuple[str, ...]  # ours, e.g. ("fc1", "fc2") or ("fc1_g", "fc1_x", "norm", "fc2")
    names: Mapping[str, str]  # ours -> source
    hidden: int | None  # width read from block 0, None if absent there

    @classmethod
    def read(cls, state: Mapping[str, Tensor], fmt: SourceFormat) -> _MlpLayout:
        names = _MLP_NAMES[fmt]

        def present(ours: str) -> bool:
            return ours in names and f"blocks.0.mlp.{names[ours]}.weight" in state

        swiglu = fmt == "pumit" or present("fc1_g")  # PUMIT's MLP is always SwiGLU
        layers: tuple[str, ...] = ("fc1_g", "fc1_x") if swiglu else ("fc1",)
        layers += ("norm", "fc2") if present("norm") else ("fc2",)
        first = state.get(f"blocks.0.mlp.{names[layers[0]]}.weight")
        return cls(layers, names, int(first.shape[0]) if first is not None else None)


def _mlp(src: _Source, p: str, e: int, hidden: int, layout: _MlpLayout) -> dict[str, Tensor]:
    """One block's MLP tensors under our names (``Mlp`` or ``SwiGLU`` of core.model.vit)."""
    shapes: dict[str, tuple[int, ...]] = {"norm": (hidden,), "fc2": (e, hidden)}
    out: dict[str, Tensor] = {}
    for ours in layout.layers:
        shape = shapes.get(ours, (hidden, e))  # fc1, fc1_g, fc1_x: (hidden, E)
        source = f"{p}mlp.{layout.names[ours]}"
        out[f"{p}mlp.{ours}.weight"] = src.take(f"{source}.weight", shape)
        out[f"{p}mlp.{ours}.bias"] = src.take(f"{source}.bias", (shape[0],))
    return out


def _pair_order(embed_dim: int, num_heads: int) -> Tensor:
    """Row order that turns PUMIT's interleaved rotary pairs (2j, 2j+1) of every head into our
    split pairs (j, j + hd/2). q.k is unchanged when q and k are permuted alike."""
    head_dim = embed_dim // num_heads
    within = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])  # (hd,)
    return (torch.arange(num_heads).unsqueeze(1) * head_dim + within).flatten()  # (E,)


def _block(
    src: _Source,
    i: int,
    embed_dim: int,
    mlp: _MlpLayout,
    hidden: int,
    pair_order: Tensor | None,
) -> dict[str, Tensor]:
    """One transformer block's tensors under our names; ``pair_order`` (PUMIT) permutes the
    rows of q and k."""
    p, e = f"blocks.{i}.", embed_dim
    out: dict[str, Tensor] = {}
    for norm in ("norm1", "norm2"):
        out[f"{p}{norm}.weight"] = src.take(f"{p}{norm}.weight", (e,))
        out[f"{p}{norm}.bias"] = src.take(f"{p}{norm}.bias", (e,))
    if pair_order is not None and src.has(f"{p}attn.qkv.weight"):
        raise PretrainedImportError(
            f"{p}attn.qkv.weight is a fused qkv: PUMIT's released ViT (sub_ln) has separate "
            "attn.q_proj/k_proj/v_proj, and its code cannot run a fused qkv with RoPE; if this "
            "is a 2D timm/EVA checkpoint, use format 'timm'"
        )
    # q, k, v weights: fused (timm, EVA fused) or separate (EVA, PUMIT).
    if src.has(f"{p}attn.qkv.weight"):
        q_w, k_w, v_w = src.take(f"{p}attn.qkv.weight", (3 * e, e)).split(e, dim=0)
        fused_bias = src.optional(f"{p}attn.qkv.bias", (3 * e,))
        biases = list(fused_bias.split(e)) if fused_bias is not None else [None, None, None]
    else:
        q_w, k_w, v_w = (src.take(f"{p}attn.{n}_proj.weight", (e, e)) for n in "qkv")
        biases = [src.optional(f"{p}attn.{n}_proj.bias", (e,)) for n in "qkv"]
    # EVA / BEiT / PUMIT keep q and v biases apart from the weights; k has none (zero).
    for j, name in enumerate("qkv"):
        separate = src.optional(f"{p}attn.{name}_bias", (e,))
        if separate is not None:
            if biases[j] is not None:
                raise PretrainedImportError(
                    f"{p}attn has two biases for {name} ({name}_bias and a projection bias); "
                    "the checkpoint is ambiguous"
                )
            biases[j] = separate
    for name, weight, bias in zip("qkv", (q_w, k_w, v_w), biases, strict=True):
        bias = bias if bias is not None else torch.zeros(e, dtype=weight.dtype)
        if pair_order is not None and name in "qk":
            weight, bias = weight[pair_order], bias[pair_order]
        out[f"{p}attn.{name}_proj.weight"] = weight
        out[f"{p}attn.{name}_proj.bias"] = bias
    proj_w = src.take(f"{p}attn.proj.weight", (e, e))
    proj_b = src.take(f"{p}attn.proj.bias", (e,))
    mlp_state = _mlp(src, p, e, hidden, mlp)
    fc2_w, fc2_b = mlp_state[f"{p}mlp.fc2.weight"], mlp_state[f"{p}mlp.fc2.bias"]
    # LayerScale: gamma * (W x + b) == (gamma W) x + gamma b, folded into the projection.
    for names, (w, b) in (
        ((f"{p}ls1.gamma", f"{p}gamma_1"), (proj_w, proj_b)),
        ((f"{p}ls2.gamma", f"{p}gamma_2"), (fc2_w, fc2_b)),
    ):
        present = [n for n in names if src.has(n)]
        if len(present) > 1:
            raise PretrainedImportError(f"both {present} present; the checkpoint is ambiguous")
        if present:
            gamma = src.take(present[0], (e,))
            w.mul_(gamma.unsqueeze(1))
            b.mul_(gamma)
    out[f"{p}attn.out_proj.weight"], out[f"{p}attn.out_proj.bias"] = proj_w, proj_b
    out.update(mlp_state)
    return out


def convert_state_dict(
    state: Mapping[str, Tensor],
    *,
    format: SourceFormat = "timm",
    size: str | ViTConfig | None = None,
    in_channels: int = 1,
    input_norm: tuple[Sequence[float], Sequence[float]] | None = None,
    pos_grid: Sequence[int] | None = None,
    rope: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, Tensor], ImportReport]:
    """Map a source state dict onto ``UniversalViT`` names and shapes (see module docstring).

    ``size``: a named size, a ViTConfig, or None to pick the named size with the checkpoint's
    width and depth. ``pos_grid``: None keeps the source grid in-plane (depth 8 for 2D
    sources). ``rope``: None means off for timm (its weights never saw a rotary embedding) and
    on for PUMIT. Returns (state dict, report); raises PretrainedImportError on any key that is
    missing, unmapped or of the wrong shape.
    """
    if format not in FORMATS:
        raise PretrainedImportError(f"unknown format {format!r}; choose one of {FORMATS}")
    if in_channels < 1:
        raise PretrainedImportError(f"in_channels must be >= 1, got {in_channels}")
    keys = list(state)
    unsupported = sorted((k, why) for k in keys if (why := _reason(k, _UNSUPPORTED)) is not None)
    if unsupported:
        listed = "; ".join(f"{k} ({why})" for k, why in unsupported[:6])
        more = f" and {len(unsupported) - 6} more" if len(unsupported) > 6 else ""
        raise PretrainedImportError(
            f"the checkpoint uses features the universal ViT does not have: {listed}{more}. "
            "Importing would silently change what the network computes; choose a plain ViT "
            "checkpoint or extend core.model.vit with the feature"
        )
    rotary = sorted(k for k in keys if re.search(_ROTARY_TABLES, k))
    if format == "timm" and rotary:
        raise PretrainedImportError(
            f"keys {rotary[:3]}: the source used a rotary position embedding (EVA-02 and RoPE "
            "ViTs) whose layout core.model.vit does not implement; importing without it would "
            "change "
            "what the network computes"
        )
    src = _Source(state)
    if "cls_token" not in state:
        raise PretrainedImportError(
            f"checkpoint has no cls_token (keys start {sorted(keys)[:6]}); is it a ViT "
            "backbone state dict?"
        )
    embed_dim = int(state["cls_token"].shape[-1])
    block_ids = sorted({int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not block_ids or block_ids != list(range(len(block_ids))):
        raise PretrainedImportError(
            f"checkpoint blocks are {block_ids[:4]}...: expected blocks.0 .. blocks.N-1"
        )
    depth = len(block_ids)
    base = _resolve_config(size, embed_dim, depth, "checkpoint")
    mlp = _MlpLayout.read(state, format)
    hidden = mlp.hidden if mlp.hidden is not None else int(embed_dim * base.mlp_ratio)
    patch_weight = state.get("patch_embed.proj.weight")
    patch = int(patch_weight.shape[-1]) if patch_weight is not None else base.patch_size
    if patch & (patch - 1):
        raise PretrainedImportError(f"patch size {patch} is not a power of two; SAC needs one")

    weight, bias = _patch_kernel(src, format, embed_dim, patch, in_channels, input_norm)
    grid, cls_pos = _position(src, format, embed_dim, pos_grid, base.pos_grid[0])
    cls = src.take("cls_token", (1, 1, embed_dim))
    if cls_pos is not None:
        cls = cls + cls_pos
    out: dict[str, Tensor] = {
        "patch_embed.proj.weight": weight,
        "patch_embed.proj.bias": bias,
        "cls_token": cls,
        "pos_embed": grid,
        "norm.weight": src.take("norm.weight", (embed_dim,)),
        "norm.bias": src.take("norm.bias", (embed_dim,)),
    }
    pair_order = _pair_order(embed_dim, base.num_heads) if format == "pumit" else None
    for i in range(depth):
        out.update(_block(src, i, embed_dim, mlp, hidden, pair_order))

    ignored = tuple(
        (k, why)
        for k in sorted(keys)
        if k not in src.used and (why := _reason(k, _IGNORABLE)) is not None
    )
    unexpected = sorted(set(keys) - src.used - {k for k, _ in ignored})
    if src.missing or unexpected:
        raise PretrainedImportError(
            f"checkpoint does not map completely onto the universal ViT (format {format!r}): "
            f"missing keys {src.missing}, unexpected keys {unexpected}. Missing keys must exist "
            "in the source; unexpected ones are neither mapped nor known to be irrelevant"
        )

    ratio = hidden / embed_dim
    if int(embed_dim * ratio) != hidden:  # float rounding one ulp low
        ratio = math.nextafter(ratio, math.inf)
    config = dataclasses.replace(
        base,
        in_channels=in_channels,
        patch_size=patch,
        mlp_ratio=ratio,
        pos_grid=(int(grid.shape[2]), int(grid.shape[3]), int(grid.shape[4])),
        rope=(format == "pumit") if rope is None else rope,
        rope_style="pumit" if format == "pumit" else "universal",
        qkv_bias=True,  # absent source biases are exact zeros
        mlp="swiglu" if "fc1_g" in mlp.layers else "gelu",
        mlp_norm="norm" in mlp.layers,
        norm_eps=1e-5 if format == "pumit" else 1e-6,  # torch's default / timm's
    )
    if int(embed_dim * config.mlp_ratio) != hidden:
        raise PretrainedImportError(f"MLP width {hidden} is not representable for E {embed_dim}")
    notes = []
    if input_norm is not None:
        notes.append(f"input normalisation mean {input_norm[0]} std {input_norm[1]} folded in")
    if format == "pumit":
        notes.append("q/k channels reordered into our rotary pair layout (attention unchanged)")
        if input_norm is None:
            notes.append(
                "PUMIT was pretrained on ImageNet-normalised input (pumit/model/mim.py); pass "
                "input_norm=IMAGENET_NORM (CLI: --input-norm imagenet, the default for pumit) "
                "unless your pipeline normalises that way itself"
            )
    converted = {k: v.to(dtype).contiguous() for k, v in out.items()}
    return converted, ImportReport(config, ignored, tuple(notes))


def import_checkpoint(
    path: str | Path,
    *,
    format: SourceFormat = "timm",
    size: str | ViTConfig | None = None,
    in_channels: int = 1,
    input_norm: tuple[Sequence[float], Sequence[float]] | None = None,
    pos_grid: Sequence[int] | None = None,
    rope: bool | None = None,
) -> tuple[UniversalViT, ImportReport]:
    """A universal ViT (no head) holding a local checkpoint's weights, and what was converted;
    see :func:`convert_state_dict` for the arguments."""
    state = read_state_dict(path)
    try:
        converted, report = convert_state_dict(
            state,
            format=format,
            size=size,
            in_channels=in_channels,
            input_norm=input_norm,
            pos_grid=pos_grid,
            rope=rope,
        )
    except PretrainedImportError as err:
        raise PretrainedImportError(f"{path}: {err}") from err
    return build_model(converted, report.config), report


def build_model(state: Mapping[str, Tensor], config: ViTConfig) -> UniversalViT:
    """A model from a converted state dict, loaded strictly (every parameter from the file)."""
    model = UniversalViT(config)
    if any(v.dtype == torch.float64 for v in state.values()):
        model = model.double()
    result = model.load_state_dict(dict(state), strict=False)
    if result.missing_keys or result.unexpected_keys:  # a converter bug, reported in full
        raise PretrainedImportError(
            f"converted state does not fit the model: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    return model


# --------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.model.convert",
        description="Import a timm/EVA 2D ViT or a PUMIT checkpoint as a universal ViT backbone.",
    )
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--in", dest="source", required=True, type=Path, help="checkpoint file")
    parser.add_argument("--out", required=True, type=Path, help="backbone .safetensors to write")
    parser.add_argument(
        "--size", default=None, choices=sorted(MODEL_SIZES), help="default: from the weights"
    )
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument(
        "--input-norm",
        default="auto",
        choices=("auto", "none", "imagenet"),
        help="fold the source's input normalisation into the patch embedding (auto: imagenet "
        "for pumit, as PUMIT pretrained on ImageNet-normalised input; none for timm)",
    )
    parser.add_argument(
        "--pos-grid", type=int, nargs=3, default=None, metavar=("D", "H", "W"), help="resample"
    )
    parser.add_argument(
        "--rope",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rotary embedding (default: off for timm, on for pumit)",
    )
    args = parser.parse_args(argv)
    input_norm = args.input_norm
    if input_norm == "auto":
        input_norm = "imagenet" if args.format == "pumit" else "none"
    try:
        model, report = import_checkpoint(
            args.source,
            format=args.format,
            size=args.size,
            in_channels=args.in_channels,
            input_norm=IMAGENET_NORM if input_norm == "imagenet" else None,
            pos_grid=args.pos_grid,
            rope=args.rope,
        )
    except PretrainedImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for key, why in report.ignored:
        print(f"ignored {key}: {why}")
    for note in report.notes:
        print(f"note: {note}")
    digest = save_backbone(model.float(), args.out)
    c = report.config
    print(
        f"wrote {args.out}: embed {c.embed_dim}, depth {c.depth}, heads {c.num_heads}, "
        f"in_channels {c.in_channels}, pos_grid {c.pos_grid}, rope {c.rope}"
    )
    print(f"fingerprint: {digest}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
