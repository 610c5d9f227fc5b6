"""What every source format shares: errors, the import report, reading checkpoint files, and the
key tables of what may be ignored and what must be refused (see ``core.model.convert``)."""

from __future__ import annotations

import pathlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.model.sizes import ViTConfig

IMAGENET_NORM: tuple[tuple[float, ...], tuple[float, ...]] = (
    (0.485, 0.456, 0.406),
    (0.229, 0.224, 0.225),
)

SAFE_CLASSES: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
    pathlib.PosixPath,
    pathlib.WindowsPath,
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
]
WRAPPERS = ("state_dict", "model", "module", "model_state", "state")
PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.")

ROTARY_TABLES = r"((^|\.)rope\.|freqs_(cos|sin)$)"
# Keys that carry nothing the backbone computes: listed in the report, then dropped.
IGNORABLE: tuple[tuple[str, str], ...] = (
    (r"^head(\.|$)", "classifier head"),
    (r"^fc_norm\.", "norm of the pooled classifier feature"),
    (r"^(pre_logits|attn_pool|head_drop)\.", "classifier pooling"),
    (r"^mask_token$", "MIM mask token (pretraining only)"),
    (r"^(lm_head|mim_head|decoder|decoder_\w+)(\.|$)", "MIM / MAE decoder (pretraining only)"),
    (ROTARY_TABLES, "rotary tables (PUMIT's RoPE is recomputed by the model)"),
    (r"\.relative_position_index$", "index buffer"),
)
# Keys of architecture features our ViT does not have: refusing beats silently dropping them.
UNSUPPORTED: tuple[tuple[str, str], ...] = (
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
            with torch.serialization.safe_globals(SAFE_CLASSES):
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
        inner = next((raw[k] for k in WRAPPERS if isinstance(raw.get(k), Mapping)), None)
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
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def table_reason(key: str, table: tuple[tuple[str, str], ...]) -> str | None:
    return next((why for pattern, why in table if re.search(pattern, key)), None)


class SourceTensors:
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


@dataclass(frozen=True)
class SourceFormat:
    """How one code base lays out a ViT checkpoint: the rules the shared mapping dispatches on.

    One instance per format (``core.model.convert.timm``, ``core.model.convert.pumit``);
    ``core.model.convert.FORMATS`` is the table of them.
    """

    name: str
    kernel_dims: int  # 4: a 2D (E, C, P, P) patch kernel, inflated; 5: a 3D (E, C, P, P, P) one
    position: str  # "sequence": (1, [1 +] n*n, E) 2D positions; "grid": (1, E, d, h, w)
    mlp_names: Mapping[str, str]  # our MLP layer name -> the source's
    always_swiglu: bool  # the format's MLP is SwiGLU even if block 0 does not say so
    rotary: bool  # trained with its rotary embedding: tables ignorable, q/k pairs reordered
    norm_eps: float  # its LayerNorm epsilon
    default_input_norm: tuple[tuple[float, ...], tuple[float, ...]] | None  # CLI --input-norm auto
    notes: tuple[str, ...] = ()  # printed with every import of this format
    # Printed when no input normalisation was folded in although the format expects one.
    unnormalised_note: str = ""
