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
    """Local training of one site; the defaults are the run's (run config section ``train``)."""

    local_epochs: int = 1
    # Expected (Poisson) batch size under DP, fixed batch size otherwise: under DP larger
    # batches drown less in noise.
    batch_size: int = 32
    max_physical_batch: int = 32  # memory cap for one forward/backward
    learning_rate: float = 0.05
    # SGD with momentum 0.9: Adam's per-coordinate scaling amplifies DP noise.
    optimizer: OptimizerName = "sgd"
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
