"""The LoRA model is ready for DP-SGD: Opacus validates it; its per-sample gradients are exact."""

import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator

from core.adapters.lora import add_lora
from core.adapters.settings import LoraSettings
from core.model.reference import fit_reference
from core.model.vit import create_vit

# PUMIT's architecture (SwiGLU, sub-LN) with LoRA on every linear, next to the default ViT.
ARCHITECTURES = {
    "vit-qv": ({}, "qv"),
    "swiglu-attn-mlp": ({"mlp": "swiglu", "mlp_norm": True, "rope_style": "pumit"}, "attn-mlp"),
    # mean+max pooling, standardised (parameter-free LayerNorm)
    "mean-max-norm-attn-mlp": ({"pool": "mean-max", "head_norm": "layer"}, "attn-mlp"),
    # the run's default head: stats pooling through the backbone's reference projection
    "stats-reference-qv": ({"pool": "stats", "head_norm": "reference"}, "qv"),
    # with the personal read-out of head-sharing "shared+local" (the classifier's default)
    "stats-reference-personal-qv": (
        {"pool": "stats", "head_norm": "reference", "personal": True},
        "qv",
    ),
}


def with_reference(model):
    """A random reference for the stats pool (the head reads 16 whitened components)."""
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(40, 4 * model.config.embed_dim, generator=generator)
    model.references = {"stats": fit_reference(features, components=16)}
    return model


def lora_model(mode: str, arch: str = "vit-qv"):
    torch.manual_seed(0)
    overrides, targets = ARCHITECTURES[arch]
    overrides = dict(overrides)
    head_norm, personal = overrides.get("head_norm", "none"), overrides.pop("personal", False)
    vit = with_reference(create_vit("micro", **(overrides | {"head_norm": "none"})))
    vit.reset_head(3, head_norm=head_norm, personal=personal)
    model = add_lora(vit, LoraSettings(rank=4, mode=mode, targets=targets))
    with torch.no_grad():  # non-zero B (and personal read-out), so every gradient is non-zero
        for name, p in model.named_parameters():
            if "lora_B" in name or "personal" in name:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("mode", ["ffa", "vanilla"])
def test_module_validator_strict_passes(mode, arch):
    ModuleValidator.validate(lora_model(mode, arch).train(), strict=True)


@pytest.mark.parametrize(
    ("x", "spacing"),
    [
        (torch.randn(4, 1, 1, 32, 32), (1e4, 1.0, 1.0)),
        (torch.randn(3, 1, 8, 32, 32), (5.0, 0.7, 0.7)),
    ],
    ids=["2d", "3d"],
)
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("mode", ["ffa", "vanilla"])
def test_per_sample_gradients_match_a_brute_force_loop(x, spacing, mode, arch):
    model = lora_model(mode, arch).train()
    labels = torch.arange(x.shape[0]) % 3
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    expected = {n: [] for n in params}
    for i in range(x.shape[0]):
        model.zero_grad()
        loss_fn(model(x[i : i + 1], spacing), labels[i : i + 1]).backward()
        for n, p in params.items():
            expected[n].append(p.grad.detach().clone())

    model.zero_grad()
    optimizer = torch.optim.SGD(list(params.values()), lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=4)
    private, optimizer, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        loss_reduction="sum",  # matches the loss below; Opacus assumes "mean" by default
    )
    loss_fn(private(x, spacing), labels).backward()
    for n, p in params.items():
        assert p.grad_sample is not None, n
        torch.testing.assert_close(p.grad_sample, torch.stack(expected[n]), rtol=1e-4, atol=1e-6)
