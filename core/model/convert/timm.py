"""timm's 2D ``VisionTransformer`` and the EVA / BEiT layouts (fused or split qkv, q/v biases,
LayerScale, GELU or SwiGLU MLP with sub-LN); names in ``core.model.convert``'s docstring."""

from __future__ import annotations

from core.model.convert.common import SourceFormat

TIMM = SourceFormat(
    name="timm",
    kernel_dims=4,
    position="sequence",
    mlp_names={"fc1": "fc1", "fc1_g": "fc1_g", "fc1_x": "fc1_x", "norm": "norm", "fc2": "fc2"},
    always_swiglu=False,
    rotary=False,  # its weights never saw a rotary embedding; EVA-02's RoPE layout is refused
    norm_eps=1e-6,  # timm's default
    default_input_norm=None,
)
