"""The local training loop: per-sample clipping really bounds each example, DP steps and noise
follow the plan, plain training learns, and evaluation's AUC matches scikit-learn."""

import math

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from core.adapters.lora import adapter_state, add_lora
from core.adapters.settings import LoraSettings
from core.model.vit import create_vit
from core.training.loops import (
    DPStepPlan,
    balanced_accuracy,
    evaluate,
    mean_metrics,
    train_dp,
    train_plain,
)
from core.training.settings import TrainSettings

CPU = torch.device("cpu")


class TensorSite:
    """A site held in memory: 2D items of one DA (1e4 mm depth spacing)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels
        self.das = [5] * len(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        spacing = torch.tensor([1e4, 1.0, 1.0], dtype=torch.float64)
        return {"image": self.images[i], "spacing": spacing, "label": self.labels[i]}


def bright_square_site(n: int, seed: int = 0) -> TensorSite:
    """Label 1 = a bright square somewhere: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 1, 32, 32, generator=g) * 0.3
    labels = torch.arange(n) % 2
    for i in range(n):
        if labels[i]:
            r, c = torch.randint(0, 24, (2,), generator=g)
            images[i, 0, 0, r : r + 8, c : c + 8] += 3.0
    return TensorSite(images, labels)


def lora_model(mode="ffa"):
    torch.manual_seed(0)
    return add_lora(create_vit("micro", num_classes=2), LoraSettings(rank=4, mode=mode))


def trainable_vector(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("copies", [1, 4])
def test_each_per_sample_gradient_is_clipped_to_the_norm(copies):
    """One example (repeated) with a huge loss: with SGD lr 1, no noise, q = 1, the step moves the
    trainable parameters by exactly the clipping norm C (sum of `copies` clipped gradients
    divided by the expected batch size `copies`), whereas unclipped it moves far more."""
    site = bright_square_site(1)
    site = TensorSite(site.images.repeat(copies, 1, 1, 1, 1) * 50, site.labels.repeat(copies))
    settings = TrainSettings(optimizer="sgd", learning_rate=1.0, batch_size=copies)
    clip = 0.01
    model = lora_model()
    before = trainable_vector(model)
    plan = DPStepPlan(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=1.0, steps=1)
    train_dp(model, site, settings, plan, device=CPU, generator=torch.Generator().manual_seed(0))
    moved = (trainable_vector(model) - before).norm().item()
    assert moved == pytest.approx(clip, rel=1e-3)

    plain = lora_model()
    before = trainable_vector(plain)
    train_plain(plain, site, settings, device=CPU, generator=torch.Generator().manual_seed(0))
    assert (trainable_vector(plain) - before).norm().item() > 100 * clip


def test_dp_takes_the_planned_steps_and_noise_moves_b_even_on_empty_batches():
    site = bright_square_site(20)
    model = lora_model()
    plan = DPStepPlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1e-4, steps=3)
    before = adapter_state(model)
    result = train_dp(
        model, site, TrainSettings(), plan, device=CPU, generator=torch.Generator().manual_seed(0)
    )
    assert result.steps == 3 and result.examples_seen == 0  # q = 1e-4: all batches empty
    after = adapter_state(model)
    key = "blocks.0.attn.q_proj.lora_B.weight"
    assert not torch.equal(before[key], after[key])  # pure noise was released and applied


def test_dp_training_uses_poisson_batches_over_the_whole_site():
    site = bright_square_site(40)
    model = lora_model()
    plan = DPStepPlan(noise_multiplier=0.5, max_grad_norm=1.0, sample_rate=0.25, steps=8)
    result = train_dp(
        model, site, TrainSettings(), plan, device=CPU, generator=torch.Generator().manual_seed(1)
    )
    assert result.steps == 8
    assert 40 < result.examples_seen < 120  # expectation 80
    assert math.isfinite(result.loss)


def test_plain_training_learns_the_task():
    train, test = bright_square_site(64, seed=0), bright_square_site(32, seed=1)
    model = lora_model()
    untrained = evaluate(model, test, batch_size=16, device=CPU)
    settings = TrainSettings(local_epochs=5, batch_size=16, learning_rate=1e-2, optimizer="adamw")
    train_plain(model, train, settings, device=CPU, generator=torch.Generator().manual_seed(0))
    metrics = evaluate(model, test, batch_size=16, device=CPU)
    assert metrics["auc"] > 0.8 and metrics["auc"] > untrained["auc"] + 0.15
    assert metrics["loss"] < untrained["loss"]


def test_evaluate_auc_matches_sklearn():
    site = bright_square_site(30, seed=3)
    model = lora_model("vanilla")
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    metrics = evaluate(model, site, batch_size=7, device=CPU)
    model.eval()
    with torch.no_grad():
        batch = [site[i] for i in range(len(site))]
        images = torch.stack([b["image"] for b in batch])
        probs = torch.softmax(model(images, (1e4, 1.0, 1.0)), dim=1)[:, 1]
    assert metrics["auc"] == pytest.approx(roc_auc_score(site.labels.numpy(), probs.numpy()))
    expected = balanced_accuracy_score(site.labels.numpy(), (probs > 0.5).numpy())
    assert metrics["balanced-accuracy"] == pytest.approx(expected)
    assert metrics["num-examples"] == 30


def test_mean_metrics_weights_by_examples_and_skips_nan():
    merged = mean_metrics(
        {
            "a": {"loss": 1.0, "accuracy": 0.5, "auc": float("nan"), "num-examples": 10},
            "b": {"loss": 2.0, "accuracy": 1.0, "auc": 0.8, "num-examples": 30},
        }
    )
    for unreported in ("balanced-accuracy", "sensitivity", "specificity"):  # no site did
        assert math.isnan(merged.pop(unreported))
    assert merged == {"loss": 1.75, "accuracy": 0.875, "auc": 0.8}


@pytest.mark.parametrize("multi_label", [False, True])
def test_balanced_accuracy_matches_sklearn(multi_label):
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(40, 3, generator=g)
    if multi_label:
        labels = (torch.rand(40, 3, generator=g) < 0.3).float()
        labels[:, 2] = 1.0  # one outcome only: left out
        expected = (
            sum(
                balanced_accuracy_score(labels[:, k].numpy(), (probs[:, k] > 0.5).numpy())
                for k in (0, 1)
            )
            / 2
        )
    else:
        labels = torch.tensor([0] * 28 + [1] * 9 + [2] * 3)  # imbalanced
        expected = balanced_accuracy_score(labels.numpy(), probs.argmax(1).numpy())
    got = balanced_accuracy(probs, labels, multi_label=multi_label)
    assert got == pytest.approx(expected)
    majority = torch.zeros(40, 3)
    majority[:, 0] = 1.0
    if not multi_label:  # always predicting the majority class: accuracy 0.7, balanced 1/3
        assert balanced_accuracy(majority, labels, multi_label=False) == pytest.approx(1 / 3)
