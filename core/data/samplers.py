"""Batch samplers that keep one degree of anisotropy (DA) per physical batch.

SAC adapts the patch embedding to the input's DA, so a batch must share one DA (and, within a
site, one DA means one image shape). Two samplers:

* :class:`DABatchSampler`: shuffled, fixed-size batches within each DA bucket; for evaluation
  and non-private training (a ``batch_sampler`` for ``torch.utils.data.DataLoader``).
* :class:`PoissonDABatchSampler`: for DP-SGD. It keeps the sampling the privacy accountant
  analyses and only then groups by DA; see its docstring.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def _as_das(das: Sequence[int]) -> torch.Tensor:
    if len(das) == 0:
        raise ValueError("das must list one DA per example; got an empty sequence")
    values = torch.as_tensor(list(das), dtype=torch.int64)  # (N,)
    if values.dim() != 1 or bool((values < 0).any()):
        raise ValueError("das must be a flat sequence of non-negative integers")
    return values


def _fresh_generator() -> torch.Generator:
    """A generator seeded from torch's global RNG, as torch's own samplers do when given none."""
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    return torch.Generator().manual_seed(seed)


def _chunks(indices: list[int], size: int | None) -> list[list[int]]:
    if size is None or len(indices) <= size:
        return [indices]
    return [indices[start : start + size] for start in range(0, len(indices), size)]


class DABatchSampler(Sampler[list[int]]):
    """Every example once per epoch, in batches of ``batch_size`` that share one DA.

    Within each DA the order is shuffled and cut into batches (the last one of a DA may be
    smaller unless ``drop_last``); then the batches of all DAs are shuffled together. With
    ``shuffle=False`` the order is by DA, then by index: reproducible evaluation.
    """

    def __init__(
        self,
        das: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.das = _as_das(das)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = generator
        self._buckets = {
            int(da): torch.nonzero(self.das == da).flatten() for da in torch.unique(self.das)
        }

    def __iter__(self) -> Iterator[list[int]]:
        generator = self.generator if self.generator is not None else _fresh_generator()
        batches: list[list[int]] = []
        for members in self._buckets.values():
            if self.shuffle:
                members = members[torch.randperm(len(members), generator=generator)]
            for batch in _chunks(members.tolist(), self.batch_size):
                if not (self.drop_last and len(batch) < self.batch_size):
                    batches.append(batch)
        if self.shuffle:
            order = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in order]
        yield from batches

    def __len__(self) -> int:
        if self.drop_last:
            return sum(len(m) // self.batch_size for m in self._buckets.values())
        return sum(-(-len(m) // self.batch_size) for m in self._buckets.values())


class PoissonDABatchSampler:
    """Poisson-subsampled logical steps for DP-SGD, split into single-DA physical batches.

    How bucketing and DP sampling combine. The RDP/PRV accountants in Opacus analyse the
    *sampled Gaussian mechanism*: at every step each example of the site enters the batch
    independently with probability ``q = sample_rate``; the clipped per-example gradients of
    the batch are summed, Gaussian noise is added once, and the result is divided by the
    expected batch size ``q * N``. This sampler does the sampling exactly so, over the whole
    site and regardless of DA. Grouping the drawn examples by DA (and cutting groups into at
    most ``max_batch_size``) happens afterwards and is pure bookkeeping: the sum of clipped
    per-example gradients over the sub-batches is the sum over the drawn set, so the released
    value, and hence the privacy guarantee, is unchanged. Bucketing *before* sampling (drawing
    a DA, then a batch from it) would not be this mechanism and would void the accounting.

    Use: per logical step, for every sub-batch but the last call
    ``optimizer.signal_skip_step(do_skip=True)`` before ``optimizer.step()`` (the DPOptimizer
    then clips and accumulates without noise), and ``do_skip=False`` for the last one, which
    adds the noise once and steps. An empty step (nothing drawn, probability ``(1 - q) ** N``)
    yields ``[]`` and must still be a noise-only optimizer step, because the accountant counts
    ``steps`` steps. Account with ``sample_rate`` and ``steps``, average with
    ``expected_batch_size``.
    """

    def __init__(
        self,
        das: Sequence[int],
        sample_rate: float,
        steps: int,
        generator: torch.Generator | None = None,
        *,
        max_batch_size: int | None = None,
    ) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be None or >= 1, got {max_batch_size}")
        self.das = _as_das(das)
        self.sample_rate = float(sample_rate)
        self.steps = steps
        self.generator = generator
        self.max_batch_size = max_batch_size

    @property
    def expected_batch_size(self) -> float:
        """``q * N``: what the summed noisy gradient is divided by under mean reduction."""
        return self.sample_rate * len(self.das)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[list[int]]]:
        """Per logical step: the drawn indices as single-DA sub-batches, in ascending DA."""
        n = len(self.das)
        for _ in range(self.steps):
            # One independent Bernoulli(q) draw per example: the Poisson subsampling itself.
            drawn = torch.rand(n, generator=self.generator) < self.sample_rate  # (N,) bool
            chosen = torch.nonzero(drawn).flatten()  # ascending indices
            chosen_das = self.das[chosen]
            step: list[list[int]] = []
            for da in torch.unique(chosen_das).tolist():
                step.extend(_chunks(chosen[chosen_das == da].tolist(), self.max_batch_size))
            yield step
