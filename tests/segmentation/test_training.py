"""Segmentation training: the loss is a mean of per-image losses (the DP unit is one image),
Opacus's per-sample gradients of that loss equal each image's own gradient, DP-SGD and plain
training run through the shared loops, and Dice / HD95 are the MONAI definitions in mm."""

import math

import pytest
import torch
from opacus import GradSampleModule

from core.adapters.lora import add_lora
from core.adapters.settings import LoraSettings
from core.model.segmentation import SEGMENTATION_TRAINABLE, create_segmenter
from core.model.vit import create_vit
from core.training.loops import DPStepPlan, train_dp, train_plain
from core.training.segmentation import _case_metrics, evaluate_segmentation, segmentation_loss
from core.training.settings import TrainSettings

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
CPU = torch.device("cpu")


class SquareSite:
    """2D items: a bright square and its mask (half the items have none)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, 1, 32, 32, generator=g) * 0.3
        self.masks = torch.zeros(n, 1, 1, 32, 32, dtype=torch.int64)
        for i in range(0, n, 2):
            r, c = torch.randint(0, 24, (2,), generator=g).tolist()
            self.images[i, 0, 0, r : r + 8, c : c + 8] += 3.0
            self.masks[i, 0, 0, r : r + 8, c : c + 8] = 1
        self.das = [5] * n

    def __len__(self) -> int:
        return len(self.das)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        spacing = torch.tensor([1e4, 0.5, 0.5], dtype=torch.float64)
        return {"image": self.images[i], "spacing": spacing, "label": self.masks[i]}


def seg_model():
    torch.manual_seed(0)
    return add_lora(
        create_segmenter(create_vit("micro", depth=2), 2, features=4),
        LoraSettings(rank=2),
        trainable=SEGMENTATION_TRAINABLE,
    )


def test_dice_ce_is_the_mean_of_per_image_losses():
    logits, masks = torch.randn(3, 2, 2, 8, 8), (torch.rand(3, 1, 2, 8, 8) > 0.6).long()
    loss = segmentation_loss()
    per_image = torch.stack([loss(logits[i : i + 1], masks[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(loss(logits, masks), per_image.mean())


def test_per_sample_gradients_of_the_dice_ce_loss_are_each_images_gradient():
    model = seg_model().double().train()
    site = SquareSite(3)
    x = site.images.double()
    spacing = (1e4, 0.5, 0.5)
    loss = segmentation_loss()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = {n: [] for n in params}
    for i in range(3):
        model.zero_grad()
        loss(model(x[i : i + 1], spacing), site.masks[i : i + 1]).backward()
        for n, p in params.items():
            expected[n].append(p.grad.detach().clone())
    model.zero_grad()
    private = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    loss(private(x, spacing), site.masks).backward()
    for n, p in params.items():
        torch.testing.assert_close(p.grad_sample, torch.stack(expected[n]), msg=n)
    private._close()


def test_dp_and_plain_training_run_through_the_shared_loops():
    site = SquareSite(8)
    settings = TrainSettings(batch_size=4, learning_rate=1e-2, optimizer="adamw")
    plan = DPStepPlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=2)
    model = seg_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    result = train_dp(
        model, site, settings, plan, device=CPU, generator=g, criterion=segmentation_loss()
    )
    assert result.steps == 2 and math.isfinite(result.loss)
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == p.requires_grad, n
    plain = train_plain(
        model, site, settings, device=CPU, generator=g, criterion=segmentation_loss()
    )
    assert plain.steps == 2 and math.isfinite(plain.loss)
    metrics = evaluate_segmentation(model, site, num_classes=2, batch_size=4, device=CPU)
    assert set(metrics) >= {"dice", "hd95", "loss", "num-examples"}
    assert metrics["num-examples"] == 8


def test_dice_and_hd95_in_mm_2d_and_3d():
    truth = torch.zeros(1, 16, 16, dtype=torch.int64)
    truth[0, 4:8, 4:8] = 1
    shifted = torch.roll(truth, 2, dims=2)  # 2 pixels along W
    spacing2d = torch.tensor([1e4, 1.0, 0.5])
    same = _case_metrics(truth, truth, spacing2d, 2)
    assert same["dice"] == pytest.approx(1.0) and same["hd95"] == pytest.approx(0.0)
    moved = _case_metrics(shifted, truth, spacing2d, 2)
    assert moved["dice"] == pytest.approx(0.5)
    assert moved["hd95"] == pytest.approx(1.0)  # 2 pixels of 0.5 mm, measured in-plane
    volume = torch.zeros(6, 16, 16, dtype=torch.int64)
    volume[1:4, 4:8, 4:8] = 1
    deeper = torch.roll(volume, 1, dims=0)  # one slice of 5 mm
    case = _case_metrics(deeper, volume, torch.tensor([5.0, 1.0, 1.0]), 2)
    assert case["hd95"] == pytest.approx(5.0)
    empty = _case_metrics(torch.zeros_like(volume), volume, torch.tensor([5.0, 1.0, 1.0]), 2)
    assert empty["dice"] == 0.0 and math.isnan(empty["hd95"])
