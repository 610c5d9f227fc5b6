"""The mapping every format shares: patch kernel inflation, position grids, blocks, LayerScale
folding, and the completeness check; format differences come from a :class:`SourceFormat`."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from core.model.convert.common import (
    IGNORABLE,
    ROTARY_TABLES,
    UNSUPPORTED,
    ImportReport,
    PretrainedImportError,
    SourceFormat,
    SourceTensors,
    read_state_dict,
    table_reason,
)
from core.model.convert.pumit import PUMIT
from core.model.convert.timm import TIMM
from core.model.sizes import MODEL_SIZES, ViTConfig
from core.model.vit import UniversalViT, resample_position_grid

# The dispatch table: format name -> its rules.
FORMATS: dict[str, SourceFormat] = {f.name: f for f in (TIMM, PUMIT)}


def source_format(name: str) -> SourceFormat:
    """The rules of format ``name``. Raises PretrainedImportError naming the known formats."""
    if name not in FORMATS:
        raise PretrainedImportError(f"unknown format {name!r}; choose one of {tuple(FORMATS)}")
    return FORMATS[name]


def _other_format(fmt: SourceFormat, **rule: object) -> str:
    """The name of another format whose rules match ``rule`` (for "use format X" hints)."""
    return next(
        (
            f.name
            for f in FORMATS.values()
            if f is not fmt and all(getattr(f, k) == v for k, v in rule.items())
        ),
        "another format",
    )


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


def _patch_kernel(
    src: SourceTensors,
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
    if weight.dim() != fmt.kernel_dims:
        raise PretrainedImportError(
            f"patch_embed.proj.weight has shape {tuple(weight.shape)}: a "
            f"{'3D' if weight.dim() == 5 else '2D'} kernel, not what format {fmt.name!r} holds; "
            f"use format {_other_format(fmt, kernel_dims=weight.dim())!r}"
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
    src: SourceTensors,
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
        if fmt.position != "sequence":
            raise PretrainedImportError(
                f"pos_embed has shape {tuple(pos.shape)} (a 2D sequence) in a {fmt.name} "
                f"checkpoint, whose grid is (1, E, d, h, w); use format "
                f"{_other_format(fmt, position='sequence')!r}"
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
        if fmt.position != "grid":
            raise PretrainedImportError(
                f"pos_embed has shape {tuple(pos.shape)}: a 3D grid, not a {fmt.name} 2D "
                f"sequence; use format {_other_format(fmt, position='grid')!r}"
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


@dataclass(frozen=True)
class _MlpLayout:
    """Which of our MLP layers the checkpoint has (read from block 0) and their source names."""

    layers: tuple[str, ...]  # ours, e.g. ("fc1", "fc2") or ("fc1_g", "fc1_x", "norm", "fc2")
    names: Mapping[str, str]  # ours -> source
    hidden: int | None  # width read from block 0, None if absent there

    @classmethod
    def read(cls, state: Mapping[str, Tensor], fmt: SourceFormat) -> _MlpLayout:
        names = fmt.mlp_names

        def present(ours: str) -> bool:
            return ours in names and f"blocks.0.mlp.{names[ours]}.weight" in state

        swiglu = fmt.always_swiglu or present("fc1_g")
        layers: tuple[str, ...] = ("fc1_g", "fc1_x") if swiglu else ("fc1",)
        layers += ("norm", "fc2") if present("norm") else ("fc2",)
        first = state.get(f"blocks.0.mlp.{names[layers[0]]}.weight")
        return cls(layers, names, int(first.shape[0]) if first is not None else None)


def _mlp(src: SourceTensors, p: str, e: int, hidden: int, layout: _MlpLayout) -> dict[str, Tensor]:
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
    src: SourceTensors,
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
    format: str = "timm",
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
    fmt = source_format(format)
    if in_channels < 1:
        raise PretrainedImportError(f"in_channels must be >= 1, got {in_channels}")
    keys = list(state)
    unsupported = sorted(
        (k, why) for k in keys if (why := table_reason(k, UNSUPPORTED)) is not None
    )
    if unsupported:
        listed = "; ".join(f"{k} ({why})" for k, why in unsupported[:6])
        more = f" and {len(unsupported) - 6} more" if len(unsupported) > 6 else ""
        raise PretrainedImportError(
            f"the checkpoint uses features the universal ViT does not have: {listed}{more}. "
            "Importing would silently change what the network computes; choose a plain ViT "
            "checkpoint or extend core.model.vit with the feature"
        )
    rotary = sorted(k for k in keys if re.search(ROTARY_TABLES, k))
    if not fmt.rotary and rotary:
        raise PretrainedImportError(
            f"keys {rotary[:3]}: the source used a rotary position embedding (EVA-02 and RoPE "
            "ViTs) whose layout core.model.vit does not implement; importing without it would "
            "change what the network computes"
        )
    src = SourceTensors(state)
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
    mlp = _MlpLayout.read(state, fmt)
    hidden = mlp.hidden if mlp.hidden is not None else int(embed_dim * base.mlp_ratio)
    patch_weight = state.get("patch_embed.proj.weight")
    patch = int(patch_weight.shape[-1]) if patch_weight is not None else base.patch_size
    if patch & (patch - 1):
        raise PretrainedImportError(f"patch size {patch} is not a power of two; SAC needs one")

    weight, bias = _patch_kernel(src, fmt, embed_dim, patch, in_channels, input_norm)
    grid, cls_pos = _position(src, fmt, embed_dim, pos_grid, base.pos_grid[0])
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
    pair_order = _pair_order(embed_dim, base.num_heads) if fmt.rotary else None
    for i in range(depth):
        out.update(_block(src, i, embed_dim, mlp, hidden, pair_order))

    ignored = tuple(
        (k, why)
        for k in sorted(keys)
        if k not in src.used and (why := table_reason(k, IGNORABLE)) is not None
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
        rope=fmt.rotary if rope is None else rope,
        rope_style="pumit" if fmt.rotary else "universal",
        qkv_bias=True,  # absent source biases are exact zeros
        mlp="swiglu" if "fc1_g" in mlp.layers else "gelu",
        mlp_norm="norm" in mlp.layers,
        norm_eps=fmt.norm_eps,
    )
    if int(embed_dim * config.mlp_ratio) != hidden:
        raise PretrainedImportError(f"MLP width {hidden} is not representable for E {embed_dim}")
    notes = list(fmt.notes)
    if input_norm is not None:
        notes.append(f"input normalisation mean {input_norm[0]} std {input_norm[1]} folded in")
    elif fmt.unnormalised_note:
        notes.append(fmt.unnormalised_note)
    converted = {k: v.to(dtype).contiguous() for k, v in out.items()}
    return converted, ImportReport(config, ignored, tuple(notes))


def import_checkpoint(
    path: str | Path,
    *,
    format: str = "timm",
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
