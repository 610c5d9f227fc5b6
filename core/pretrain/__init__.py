"""Self-supervised pretraining of the universal ViT by masked image modelling (SimMIM, plus a
weighted reconstruction of the visible tokens).

Why: the federation fine-tunes LoRA adapters on a *frozen* backbone, so everything the adapters
cannot express must already be in the backbone. Unlabeled images are plentiful (every archive
has them); labels are not. Masked image modelling learns from images alone, and with SAC it
learns from 2D images, thin-slice CT and thick-slice MR with one set of weights.

Objective. For every batch (one degree of anisotropy, DA, per batch as everywhere):

* Masking: a random ``mask_ratio`` (0.6) of each sample's patch tokens is replaced by one learned
  mask token. The replacement happens *after* the patch embedding and *before* the position
  embedding is added, so a masked token still knows where it is but not what it saw. The CLS
  token is never masked. :meth:`MaskedImageModel.encode` is ``UniversalViT.forward_features``
  with an ``edit_tokens`` hook that does the swap.
* Target: the voxels of each masked patch, normalised per patch (mean 0, std 1) with a
  variance floor ``target_eps`` = 0.01 on the ~[0, 1] intensity scale: patches with a std below
  0.1 (flat tissue, air, padding, where the voxels are mostly noise) keep a proportionally
  smaller target instead of having their noise blown up to unit variance. A patch is
  ``C x p_d x 16 x 16`` voxels with depth patch ``p_d = max(16 >> DA, 1)``: 16 for isotropic
  CT, 4 for 5 mm MR, 1 for a 2D image.
* Decoder: one linear layer from each final token to a full ``C x 16 x 16 x 16`` patch, shared by
  every DA. For an input whose depth patch is ``p_d < 16``, the 16 predicted depth planes are
  averaged in ``p_d`` consecutive groups of ``g = 16 / p_d``. This is the SAC rule read
  backwards: the patch embedding *sums* g consecutive depth taps because a thick slice acts like
  g repeated thin ones; the decoder *averages* g consecutive predicted thin planes because a
  thick slice is (to first order, partial-volume) the average of the thin slices it covers.
  One head therefore serves every spacing and every DA trains it, instead of five heads of
  which the 16-deep one would only ever see isotropic volumes.
* Loss: mean squared error per masked token (averaged over its voxels, so a 2D token and a 3D
  token weigh the same), averaged with weight 1 per masked token (SimMIM, Xie et al. 2022)
  and ``visible_weight`` w per visible token (default 0.3; 0 is SimMIM): with w > 0 a
  visible token must keep what its own patch holds. Masked tokens alone never ask for that,
  and a lesion smaller than a patch cannot be predicted from its context, so SimMIM features
  may drop it (measured on the phantoms: README, learning quality).

Data: site datalists (labels ignored; items without a label are accepted), pooled into one
:class:`ImagePool` whose batches share a DA; volumes of one DA from different sites are
depth-padded to a common depth as within a site. Training is resumable: the checkpoint holds
model, optimizer and step, and the batch order and masks are pure functions of (seed, step), so
a resumed run is bitwise the uninterrupted one.

CLI (the default demo, without ``--data``, pretrains on freshly generated phantom hospitals)::

    python -m core.pretrain --out backbone.safetensors [--data DIR_OR_DATASET_JSON ...]
        [--size micro] [--steps 1000] [--resume CKPT] [--device auto] [--visible-weight W]
"""

from __future__ import annotations

from core.pretrain.cli import demo_backbone, main
from core.pretrain.data import ImageData, ImagePool, find_datalists, open_pool, open_unlabeled
from core.pretrain.loop import (
    PretrainOutcome,
    PretrainState,
    batch_order,
    batches_from,
    build_state,
    learning_rate,
    load_checkpoint,
    make_optimizer,
    pretrain,
    save_checkpoint,
    train_steps,
)
from core.pretrain.model import (
    MaskedImageModel,
    depth_patch_size,
    normalized_patches,
    patchify,
    random_token_mask,
)
from core.pretrain.settings import (
    CHECKPOINT_FORMAT,
    PHANTOM_PRETRAIN_SEED,
    MIMSettings,
    PretrainError,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "PHANTOM_PRETRAIN_SEED",
    "ImageData",
    "ImagePool",
    "MIMSettings",
    "MaskedImageModel",
    "PretrainError",
    "PretrainOutcome",
    "PretrainState",
    "batch_order",
    "batches_from",
    "build_state",
    "demo_backbone",
    "depth_patch_size",
    "find_datalists",
    "learning_rate",
    "load_checkpoint",
    "main",
    "make_optimizer",
    "normalized_patches",
    "open_pool",
    "open_unlabeled",
    "patchify",
    "pretrain",
    "random_token_mask",
    "save_checkpoint",
    "train_steps",
]
