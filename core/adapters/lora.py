"""LoRA adapters through peft, and the adapter wire format.

Two aggregation modes:

* ``vanilla``: A and B are both trained and both averaged by the server.
* ``ffa`` (federated freeze-A): A is frozen at a value every site derives from the same seed and
  only B is trained and exchanged. With A fixed the update ``B A`` is linear in B, so averaging
  B is exactly averaging the weight deltas; DP noise is not multiplied by a second noisy factor;
  the upload halves. (Averaging A and B separately is *not* the average of the products.)

The wire format is a flat ``{key: float32 tensor}`` of the LoRA tensors that travel (B only in
FFA) plus the task head, with keys relative to the model (``blocks.0.attn.q_proj.lora_B.weight``,
``head.fc.weight``): no peft, Opacus (``_module.``) or ``torch.compile`` prefixes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor, nn

from core.adapters.settings import LORA_TARGETS, LoraSettings
from core.model.vit import UniversalViT

PEFT_PREFIX = "base_model.model."


class AdapterStateError(ValueError):
    """An adapter update does not match the model (keys, shapes, dtypes, values)."""


def add_lora(
    model: nn.Module, settings: LoraSettings, *, trainable: Sequence[str] = ("head",)
) -> PeftModel:
    """Freeze the backbone, inject LoRA into the target linears, keep the task modules
    ``trainable`` (the classifier's ``head``; a segmentation model's decoder and head).

    A is initialised from ``settings.seed`` (not the global RNG), so every site starts from the
    same A; in FFA mode it stays frozen there. B starts at zero: the model equals the backbone.
    The trainable modules travel whole in the wire format, under their own names.
    """
    if not getattr(model, "num_classes", 0):
        raise ValueError("add a task head first (create_vit(..., num_classes=K))")
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(LORA_TARGETS[settings.targets]),
        modules_to_save=list(trainable),
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(settings.seed)
    for _, layer in sorted(peft_model.named_modules(), key=lambda item: item[0]):
        if isinstance(layer, LoraLayer):
            lora_a = cast(Tensor, cast(nn.ModuleDict, layer.lora_A)["default"].weight)
            with torch.no_grad():
                bound = 1.0 / math.sqrt(lora_a.shape[1])  # kaiming-uniform(a=sqrt 5), as peft
                lora_a.uniform_(-bound, bound, generator=generator)
            lora_a.requires_grad_(settings.mode == "vanilla")
    peft_model.lora_mode = settings.mode  # type: ignore[assignment]
    return peft_model


def unwrap(model: nn.Module) -> PeftModel:
    """The PeftModel inside an Opacus GradSampleModule or a torch.compile wrapper."""
    while not isinstance(model, PeftModel):
        inner = getattr(model, "_module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a LoRA model (PeftModel), got {type(model).__name__}")
        model = inner
    return model


def _travels(key: str, mode: str) -> bool:
    return mode == "vanilla" or ".lora_A." not in key


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The wire format: LoRA tensors that travel in this mode plus the head, float32 on CPU.

    Raises AdapterStateError for a model not built by :func:`add_lora`: without its mode it
    cannot know whether A travels, and guessing "vanilla" would ship A in FFA mode.
    """
    peft_model = unwrap(model)
    mode = getattr(peft_model, "lora_mode", None)
    if mode not in ("ffa", "vanilla"):
        raise AdapterStateError(
            f"the model carries no LoRA mode (found {mode!r}); build it with "
            "core.adapters.lora.add_lora, which records whether A is frozen (ffa) or trained"
        )
    state = get_peft_model_state_dict(peft_model)
    return {
        key.removeprefix(PEFT_PREFIX): value.detach().to("cpu", torch.float32).contiguous().clone()
        for key, value in sorted(state.items())
        if _travels(key, mode)
    }


def update_problems(
    update: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    *,
    max_norm: float = math.inf,
) -> list[str]:
    """Why ``update`` is not a valid adapter update for ``reference``'s keys and shapes.

    Empty when it is valid: exact keys, equal shapes, float dtypes, finite values and a global
    L2 norm of at most ``max_norm``. The server runs this on every reply before averaging.
    """
    missing = sorted(set(reference) - set(update))
    unexpected = sorted(set(update) - set(reference))
    if missing or unexpected:
        return [
            f"adapter keys do not match: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
            f", unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}; check LoRA "
            "rank/targets/mode on both ends"
        ]
    problems = []
    squared_norm = 0.0
    for key, ref in reference.items():
        value = update[key]
        if tuple(value.shape) != tuple(ref.shape):
            problems.append(f"{key}: shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        elif not value.is_floating_point():
            problems.append(f"{key}: dtype {value.dtype}, expected a float tensor")
        elif not torch.isfinite(value).all():
            problems.append(f"{key}: contains NaN or Inf")
        else:
            squared_norm += float(value.double().square().sum())
    if not problems and math.sqrt(squared_norm) > max_norm:
        problems.append(f"update L2 norm {math.sqrt(squared_norm):.3g} exceeds {max_norm:.3g}")
    return problems


def load_adapter_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a wire-format update strictly: exact keys, shapes and finite float values."""
    problems = update_problems(state, adapter_state(model))
    if problems:
        raise AdapterStateError("; ".join(problems))
    peft_model = unwrap(model)
    device = next(peft_model.parameters()).device
    full = {PEFT_PREFIX + k: v.to(device, torch.float32) for k, v in state.items()}
    result: Any = set_peft_model_state_dict(peft_model, full)
    # Keys that do not travel (A in FFA mode) are legitimately absent from ``full``.
    if result.unexpected_keys:
        raise AdapterStateError(f"peft did not accept keys {result.unexpected_keys[:5]}")


def save_adapters(model: nn.Module, directory: str | Path) -> Path:
    """Save in peft's own format (adapter_config.json + adapter_model.safetensors)."""
    directory = Path(directory)
    unwrap(model).save_pretrained(str(directory))
    return directory


def load_adapters(backbone: UniversalViT, directory: str | Path) -> PeftModel:
    """Load adapters saved by :func:`save_adapters` onto a backbone with the same head size."""
    return PeftModel.from_pretrained(backbone, str(directory))


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def load_adapter_folder(model: nn.Module, directory: str | Path) -> None:
    """Load adapters saved by :func:`save_adapters` (peft's folder) onto a model built with the
    same settings: the wire-format tensors are taken from the folder and loaded strictly.

    Raises AdapterStateError when the folder lacks the file or any tensor of the wire format.
    """
    from safetensors.torch import load_file

    path = Path(directory) / "adapter_model.safetensors"
    if not path.is_file():
        raise AdapterStateError(
            f"{path} does not exist: pass the adapters folder of a run (RUN_DIR/adapters; in an "
            "encrypted run, decrypt it first with `fedmedvit decrypt`)"
        )
    saved = {key.removeprefix(PEFT_PREFIX): value for key, value in load_file(str(path)).items()}
    wire = adapter_state(model)
    missing = sorted(set(wire) - set(saved))
    if missing:
        raise AdapterStateError(
            f"{path} lacks adapter tensors {missing[:3]}: it was saved with other LoRA "
            "settings (rank, targets, mode) than this run's config"
        )
    load_adapter_state(model, {key: saved[key] for key in wire})
