"""What a run chooses about its LoRA adapters: rank, scale, dropout, where they go, the mode.

Apart from :mod:`core.adapters.lora` (peft and torch) so that the run config can validate and
default these settings without importing either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LoraMode = Literal["ffa", "vanilla"]
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "qv": ("q_proj", "v_proj"),
    "attn": ("q_proj", "k_proj", "v_proj", "out_proj"),
    # fc1 (GELU MLP) or fc1_g and fc1_x (SwiGLU): peft adapts whichever the model has.
    "attn-mlp": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc1_g", "fc1_x", "fc2"),
}


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: str = "qv"
    mode: LoraMode = "ffa"
    seed: int = 0  # every site derives the same A from it

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.targets not in LORA_TARGETS:
            raise ValueError(
                f"LoRA targets {self.targets!r} unknown; choose {sorted(LORA_TARGETS)}"
            )
        if self.mode not in ("ffa", "vanilla"):
            raise ValueError(f"LoRA mode {self.mode!r} unknown; choose 'ffa' or 'vanilla'")
