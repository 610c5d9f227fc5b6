"""What a run chooses about local training: epochs, batch sizes, optimizer, learning rate.

Apart from :mod:`core.training.loops` (torch and Opacus) so that the run config can validate
and default these settings without importing either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

OptimizerName = Literal["adamw", "sgd"]


@dataclass(frozen=True)
class TrainSettings:
    local_epochs: int = 1
    batch_size: int = 16  # expected (Poisson) batch size under DP, fixed batch size otherwise
    max_physical_batch: int = 32  # memory cap for one forward/backward
    learning_rate: float = 1e-3
    optimizer: OptimizerName = "adamw"
    weight_decay: float = 0.0
    multi_label: bool = False

    def __post_init__(self) -> None:
        if self.local_epochs < 1:
            raise ValueError(f"local-epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1 or self.max_physical_batch < 1:
            raise ValueError("batch-size and max-physical-batch must be >= 1")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning-rate must be a positive number, got {self.learning_rate}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer {self.optimizer!r} unknown; choose 'adamw' or 'sgd'")
