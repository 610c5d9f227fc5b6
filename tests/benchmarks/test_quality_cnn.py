"""The DP baseline of the quality benchmark: the MONAI ResNet trained under Opacus must get
exact per-example gradients (GroupNorm, no in-place ops), checked against a per-example loop."""

from __future__ import annotations

import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from benchmarks.quality import small_resnet


def test_the_plain_cnn_is_refused_by_opacus_and_the_private_one_is_not() -> None:
    assert ModuleValidator.validate(small_resnet(), strict=False)  # BatchNorm
    assert ModuleValidator.validate(small_resnet(private=True), strict=False) == []


def test_private_cnn_per_example_gradients_match_a_per_example_loop() -> None:
    torch.manual_seed(0)
    model = small_resnet(private=True).double()
    images = torch.randn(3, 1, 1, 16, 16, dtype=torch.float64)  # (N, C, D, H, W): 2D as D == 1
    labels = torch.tensor([0, 1, 1])
    criterion = nn.CrossEntropyLoss(reduction="sum")
    private = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    criterion(private(images), labels).backward()
    per_example = {n: p.grad_sample.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    for i in range(len(images)):
        model.zero_grad(set_to_none=True)
        criterion(model(images[i : i + 1]), labels[i : i + 1]).backward()
        for name, param in model.named_parameters():
            assert param.grad is not None
            torch.testing.assert_close(per_example[name][i], param.grad, rtol=1e-9, atol=1e-12)
