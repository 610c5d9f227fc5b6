"""DA-bucketed batch samplers: one DA per batch, and Poisson sampling that stays Poisson."""

from __future__ import annotations

import math

import pytest
import torch

from core.data import DABatchSampler, PoissonDABatchSampler, collate

DAS = [0] * 50 + [2] * 30 + [5] * 20  # 100 examples in three buckets


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_poisson_inclusion_frequency_matches_sample_rate() -> None:
    steps, rate = 3000, 0.1
    counts = torch.zeros(len(DAS))
    pair_both = 0  # example 0 (DA 0) and example 99 (DA 5) drawn in the same step
    for step in PoissonDABatchSampler(DAS, rate, steps, seeded()):
        drawn = [i for sub in step for i in sub]
        counts[drawn] += 1
        pair_both += 0 in drawn and 99 in drawn
    freq = counts / steps
    sd = math.sqrt(rate * (1 - rate) / steps)  # 0.0055
    assert (freq - rate).abs().max() < 5 * sd  # every example, not just on average
    assert abs(freq.mean().item() - rate) < 5 * sd / math.sqrt(len(DAS))
    # Independence across buckets: P(both) = q^2 = 0.01, not q (as bucket-first sampling gives).
    assert abs(pair_both / steps - rate**2) < 0.006


def test_poisson_sub_batches_single_da_disjoint_and_complete() -> None:
    rate, steps = 0.3, 200
    sizes = []
    reference = torch.Generator().manual_seed(5)
    for step in PoissonDABatchSampler(DAS, rate, steps, seeded(5), max_batch_size=4):
        # the same generator stream, drawn directly: the sampled set before any grouping
        expected = torch.nonzero(torch.rand(len(DAS), generator=reference) < rate).flatten()
        flat = [i for sub in step for i in sub]
        assert sorted(flat) == expected.tolist()  # union is the drawn set, no duplicates
        assert len(set(flat)) == len(flat)
        for sub in step:
            assert len({DAS[i] for i in sub}) == 1
            assert 1 <= len(sub) <= 4
        das_in_order = [DAS[sub[0]] for sub in step]
        assert das_in_order == sorted(das_in_order)
        sizes.append(len(flat))
    assert abs(sum(sizes) / steps - rate * len(DAS)) < 1.5  # expected batch size 30


def test_poisson_is_deterministic_and_can_be_empty() -> None:
    first = list(PoissonDABatchSampler(DAS, 0.05, 50, seeded(3)))
    assert first == list(PoissonDABatchSampler(DAS, 0.05, 50, seeded(3)))
    assert first != list(PoissonDABatchSampler(DAS, 0.05, 50, seeded(4)))
    tiny = list(PoissonDABatchSampler([0, 1], 0.01, 100, seeded(0)))
    assert len(tiny) == 100  # one entry per logical step, empty steps included
    assert [] in tiny
    sampler = PoissonDABatchSampler(DAS, 0.25, 7)
    assert len(sampler) == 7 and sampler.expected_batch_size == 25.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"max_batch_size": 0}, "max_batch_size"),
    ],
)
def test_poisson_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"das": DAS, "sample_rate": 0.1, "steps": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        PoissonDABatchSampler(**args)


def test_da_batch_sampler_covers_every_example_once_per_epoch() -> None:
    sampler = DABatchSampler(DAS, 8, generator=seeded(1))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 7 + 4 + 3  # ceil(50/8) + ceil(30/8) + ceil(20/8)
    assert sorted(i for b in batches for i in b) == list(range(len(DAS)))
    assert all(len({DAS[i] for i in b}) == 1 for b in batches)
    assert all(len(b) <= 8 for b in batches)
    assert sum(len(b) == 8 for b in batches) == 6 + 3 + 2
    assert list(sampler) != batches  # reshuffled next epoch
    dropped = DABatchSampler(DAS, 8, drop_last=True, generator=seeded(1))
    assert len(dropped) == 11 and all(len(b) == 8 for b in dropped)


def test_da_batch_sampler_unshuffled_is_ordered() -> None:
    batches = list(DABatchSampler([1, 0, 1, 0, 0], 2, shuffle=False))
    assert batches == [[1, 3], [4], [0, 2]]


def test_collate_stacks_and_refuses_mixed_batches() -> None:
    def item(da_depth_spacing: float, depth: int, label: int) -> dict:
        return {
            "image": torch.zeros(1, depth, 16, 16),
            "spacing": torch.tensor([da_depth_spacing, 1.0, 1.0], dtype=torch.float64),
            "label": torch.tensor(label),
        }

    batch = collate([item(1.0, 4, 0), item(1.0, 4, 1)])
    assert batch["image"].shape == (2, 1, 4, 16, 16)
    assert batch["spacing"].shape == (2, 3) and batch["spacing"].dtype == torch.float64
    assert batch["label"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="one degree of anisotropy"):
        collate([item(1.0, 4, 0), item(4.0, 4, 0)])
    with pytest.raises(ValueError, match="share a shape"):
        collate([item(1.0, 4, 0), item(1.0, 8, 0)])
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
