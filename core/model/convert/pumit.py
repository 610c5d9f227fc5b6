"""The PUMIT release (``function2-llx/PUMIT``, ``pumit/model/vit.py``): a 3D EVA-02-like ViT with
SwiGLU sub-LN MLPs, q/v biases and a 3D rotary embedding; names in ``core.model.convert``'s
docstring. Its rotary pairs are interleaved (2j, 2j+1); ours are split (j, j + hd/2), so the
mapping permutes q and k rows inside each head (q.k, hence attention, is unchanged)."""

from __future__ import annotations

from core.model.convert.common import IMAGENET_NORM, SourceFormat

PUMIT = SourceFormat(
    name="pumit",
    kernel_dims=5,
    position="grid",
    mlp_names={"fc1_g": "w1", "fc1_x": "w2", "norm": "ffn_ln", "fc2": "w3"},
    always_swiglu=True,
    rotary=True,
    norm_eps=1e-5,  # torch's LayerNorm default, which PUMIT uses
    # PUMIT's MIM pretraining normalised its input with ImageNet statistics (pumit/model/mim.py).
    default_input_norm=IMAGENET_NORM,
    notes=("q/k channels reordered into our rotary pair layout (attention unchanged)",),
    unnormalised_note=(
        "PUMIT was pretrained on ImageNet-normalised input (pumit/model/mim.py); pass "
        "input_norm=IMAGENET_NORM (CLI: --input-norm imagenet, the default for pumit) "
        "unless your pipeline normalises that way itself"
    ),
)
