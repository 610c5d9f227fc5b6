"""The segmentation model: logits on the input grid for 2D and 3D of any spacing; LoRA +
decoder + head are what trains and travels; per-sample gradients of every trainable layer
match a brute-force loop (2D and 3D), so DP-SGD clips each image's true gradient."""

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from core.adapters.lora import adapter_state, add_lora
from core.adapters.settings import LoraSettings
from core.model.segmentation import SEGMENTATION_TRAINABLE, create_segmenter
from core.model.vit import create_vit

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

INPUTS = {
    "2d": ((2, 1, 1, 32, 48), (1e4, 1.0, 1.0)),
    "3d-thick": ((2, 1, 4, 32, 32), (5.0, 0.7, 0.7)),  # DA 2: depth patch 4
    "3d-iso": ((2, 1, 16, 16, 32), (1.0, 1.0, 1.0)),
}


def seg_model(mode: str = "ffa", dtype=torch.float32):
    torch.manual_seed(0)
    model = add_lora(
        create_segmenter(create_vit("micro", depth=2), 2, features=4),
        LoraSettings(rank=2, mode=mode),
        trainable=SEGMENTATION_TRAINABLE,
    ).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("case", sorted(INPUTS))
def test_logits_land_on_the_input_grid(case):
    shape, spacing = INPUTS[case]
    model = seg_model()
    logits = model(torch.randn(*shape), spacing)
    assert logits.shape == (shape[0], 2, *shape[2:])


def test_only_lora_decoder_and_head_train_and_travel():
    model = seg_model("ffa")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        "lora_B" in n or ".decoder." in n or ".seg_head." in n for n in trainable
    )
    wire = adapter_state(model)
    assert not any("lora_A" in k or "original_module" in k for k in wire)
    assert {k.split(".")[0] for k in wire} == {"encoder", "decoder", "seg_head"}
    assert sum(v.numel() for v in wire.values()) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def test_opacus_validator_accepts_the_model():
    ModuleValidator.validate(seg_model().train(), strict=True)


@pytest.mark.parametrize("case", ["2d", "3d-thick"])
@pytest.mark.parametrize("mode", ["ffa", "vanilla"])
def test_per_sample_gradients_match_a_brute_force_loop(case, mode):
    shape, spacing = INPUTS[case]
    model = seg_model(mode, torch.float64).train()
    x = torch.randn(*shape, dtype=torch.float64)
    masks = (torch.rand(shape[0], *shape[2:]) > 0.7).long()
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    expected = {n: [] for n in params}
    for i in range(shape[0]):
        model.zero_grad()
        loss_fn(model(x[i : i + 1], spacing), masks[i : i + 1]).backward()
        for n, p in params.items():
            expected[n].append(p.grad.detach().clone())

    model.zero_grad()
    private = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    loss_fn(private(x, spacing), masks).backward()
    for n, p in params.items():
        assert p.grad_sample is not None, n
        torch.testing.assert_close(
            p.grad_sample, torch.stack(expected[n]), rtol=1e-8, atol=1e-10, msg=n
        )
    private._close()
