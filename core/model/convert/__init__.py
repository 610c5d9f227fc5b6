"""Import pre-trained ViT weights from other code bases into the universal ViT.

Why: pretraining a ViT-B from scratch is out of reach for a hospital consortium, but public
2D ViTs (timm, EVA) and PUMIT's universal medical ViT exist. PUMIT showed how to carry 2D
weights into a SAC model without breaking what they compute ("inflation"); this module applies
those rules, maps parameter names onto ours, and refuses anything it cannot map exactly.

Two source formats:

``"timm"``: a 2D ViT of timm's ``VisionTransformer`` or EVA family (``.pth``/``.bin``/
``.safetensors``). Names read::

    patch_embed.proj.weight (E, C_src, P, P), patch_embed.proj.bias (E,)
    cls_token (1, 1, E);  pos_embed (1, 1 + h*w, E) with the CLS position first, or (1, h*w, E)
    blocks.N.norm1 / norm2 .weight .bias
    blocks.N.attn.qkv.weight (3E, E) fused, rows q | k | v  -> attn.q_proj / k_proj / v_proj
    blocks.N.attn.qkv.bias (3E,)  or EVA's  attn.q_bias, attn.v_bias [, attn.k_bias]
    blocks.N.attn.q_proj / k_proj / v_proj .weight [.bias]   (EVA with qkv_fused=False)
    blocks.N.attn.proj .weight .bias                           -> attn.out_proj
    blocks.N.ls1.gamma, ls2.gamma (timm) / gamma_1, gamma_2 (EVA, BEiT): LayerScale, folded
        exactly into attn.out_proj / mlp.fc2 (gamma * (W x + b) == (gamma W) x + gamma b)
    blocks.N.mlp.fc1 / fc2 .weight .bias  (GELU) or mlp.fc1_g / fc1_x / fc2 (EVA SwiGLU)
    blocks.N.mlp.norm .weight .bias (optional sub-LN);  norm .weight .bias

``"pumit"``: the PUMIT release (``function2-llx/PUMIT``, ``pumit/model/vit.py``; the
``state_dict`` of its Lightning ``.ckpt``, read weights-only with paths allowed, as Lightning
stores its checkpoint folder as one). It is 3D and EVA-02-like; names read::

    patch_embed.proj.weight (E, C_src, 16, 16, 16), .bias;  cls_token (1, 1, E)
    pos_embed (1, E, d, h, w)                    a 3D grid like ours (added before the CLS)
    blocks.N.norm1 / norm2 .weight .bias         LayerNorm eps 1e-5
    blocks.N.attn.q_proj / k_proj / v_proj .weight (no bias) with attn.q_bias, attn.v_bias
        (k has none);  blocks.N.attn.proj -> attn.out_proj
    blocks.N.mlp.w1 (gate) / w2 (value) / ffn_ln (sub-LN) / w3 .weight .bias: SwiGLU,
        w3(ffn_ln(SiLU(w1 x) * w2 x))        -> mlp.fc1_g / fc1_x / norm / fc2
    norm .weight .bias;  mask_token, mim_head.* (MIM only) are ignored

Its 3D rotary embedding (bases 2333 / 10000 / 10000 for d / h / w, EVA-02's merged h-w layout,
interleaved pairs) is ``rope_style="pumit"`` of core.model.vit. Our RoPE rotates split pairs (j,
j + hd/2), so the importer permutes the rows of q and k inside every head to match; q.k, and so
the attention, is unchanged by a common permutation. With that, eps 1e-5 and the SwiGLU sub-LN
MLP, the imported model computes PUMIT's ``ViT.forward`` (tested against a reference written
from PUMIT's code).

Inflation and adaptation rules (PUMIT's):

* A 2D patch kernel becomes 3D by dividing by the depth P and repeating it over the P depth
  taps: on a slice-repeated volume at DA 0 it gives the 2D kernel's response on the slice, and
  on a 2D image (DA 5, taps summed by SAC) it *is* the 2D kernel.
* Input channels: the source's ``C_src`` (3 for RGB) weights are summed and, for
  ``in_channels > 1``, shared equally: a grey image repeated to ``in_channels`` gets the source
  kernel's response on the grey image repeated to ``C_src`` channels.
* Optional ``input_norm=(mean, std)`` per source channel (timm and PUMIT expect ImageNet-
  normalised input, ours is about [0, 1]) is folded exactly into the kernel and bias.
* The 2D position grid is repeated over depth to a 3D grid (its in-plane size is kept unless
  ``pos_grid`` asks for another, then resampled as the model does at run time); the CLS position
  is added into ``cls_token`` (it was always added to CLS).

Loading is complete or it fails: every target parameter must come from the checkpoint, and every
checkpoint key must be mapped or known to be irrelevant (classifier heads, MIM decoders, mask
tokens, rotary tables), which are listed in the report; anything else raises
:class:`PretrainedImportError` naming the keys.

Layout: ``common`` (errors, reading, key tables), ``timm`` and ``pumit`` (one
:class:`SourceFormat` each), ``mapping`` (the shared mapping and ``FORMATS``, the dispatch
table), ``cli``.

CLI::

    python -m core.model.convert --format timm --in vit.pth --out backbone.safetensors
        [--size base] [--in-channels 1] [--input-norm auto|none|imagenet] [--rope | --no-rope]
"""

from core.model.convert.cli import main
from core.model.convert.common import (
    IMAGENET_NORM,
    ImportReport,
    PretrainedImportError,
    SourceFormat,
    read_state_dict,
    unwrap_state_dict,
)
from core.model.convert.mapping import (
    FORMATS,
    _resolve_config,
    build_model,
    convert_state_dict,
    import_checkpoint,
    source_format,
)

__all__ = [
    "FORMATS",
    "IMAGENET_NORM",
    "ImportReport",
    "PretrainedImportError",
    "SourceFormat",
    "_resolve_config",
    "build_model",
    "convert_state_dict",
    "import_checkpoint",
    "main",
    "read_state_dict",
    "source_format",
    "unwrap_state_dict",
]
