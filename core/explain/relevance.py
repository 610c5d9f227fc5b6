"""Per-token relevance of one input for the fine-tuned universal ViT, and its image-grid map.

Three methods (``METHODS``):

* ``"rollout"``: attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in
  Transformers"): per block the head-averaged attention plus the identity for the residual,
  ``A' = 0.5 A + 0.5 I`` with rows renormalised, multiplied through all blocks. Class-agnostic.
* ``"grad-attention"``: gradient-weighted attention relevance (Chefer, Gur & Wolf, 2021,
  "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
  Transformers", rules 5-6): ``R <- R + mean_heads((dy/dA * A)^+) R`` from ``R = I``, where y is
  the explained class's logit margin. Class-specific.
* ``"gradcam"``: Grad-CAM (Selvaraju et al., 2017) on the token grid entering the last block
  (the last layer where patch tokens still reach a CLS-pooled head): channel weights are the
  token-averaged gradients of y with respect to those tokens, ``relu(sum_e alpha_e *
  tokens[:, e])``. Class-specific. Its token-averaged weights suit a mean- or CLS-pooled head;
  under max/min pooling ("stats", "contrast") the deciding token's gradient is averaged away.
* ``"token-gradient"``: gradient x activation (Shrikumar et al., 2016, "Not Just a Black Box:
  Learning Important Features Through Propagating Activation Differences") on the tokens the
  head pools, ``relu(sum_e dy/dtokens[t, e] * tokens[t, e])`` per token t: under max/min
  pooling only the selected tokens get a gradient, so the map follows whatever pooling the
  head uses (for a CLS head: the tokens entering the last block). Class-specific.
* ``"occlusion"``: occlusion sensitivity (Zeiler & Fergus, 2014, "Visualizing and Understanding
  Convolutional Networks") on the token grid: each token's patch in turn is replaced by its own
  mean (the structure inside the patch goes, its brightness stays), one forward pass per token,
  relevance ``relu(y - y_occluded)``.
  Model-agnostic and class-specific; costs T forward passes (32 for a 64 x 64 x 32 CT at the
  micro size).

The row that is read out follows the head: the CLS row for ``pool == "cls"``, otherwise the mean
of the patch-token rows (the head pools the patch tokens), with the identity (a token's own
residual path) removed so that only what attention routes remains.

Token maps are put on the image grid by repeating each token over the voxels its patch covers:
``p`` in-plane and ``max(p >> DA, 1)`` in depth, SAC's depth patch for the input's degree of
anisotropy, so a 5 mm MR map lines up with its slices and a 2D map with its pixels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.model.sac import batch_degree_of_anisotropy
from core.model.vit import Attention, UniversalViT

METHODS = ("rollout", "grad-attention", "gradcam", "token-gradient", "occlusion")
# The site command's default: the best pointing-game hit rate on the default scenario's model
# (benchmarks/explain.py; README "Where the model looks").
DEFAULT_METHOD = "occlusion"


class ExplainError(ValueError):
    """An explanation cannot be computed for this model, input or method."""


@dataclass(frozen=True)
class Explanation:
    """One input's explanation.

    ``score``: the model's probability of ``target`` (softmax over classes; sigmoid when the
    head has one output). ``token_map``: (d, h, w) float32 relevance on the token grid, >= 0,
    scaled so its maximum is 1 (all zeros when nothing is positively relevant).
    ``image_map``: the same values on the input's (D, H, W) grid.
    """

    score: float
    target: int
    method: str
    token_map: Tensor
    image_map: Tensor


def universal_vit(model: nn.Module) -> UniversalViT:
    """The UniversalViT inside ``model`` (itself, or under a peft wrapper, merged or not).

    Raises ExplainError for any other module."""
    inner: object = model
    get_base = getattr(inner, "get_base_model", None)
    if callable(get_base):
        inner = get_base()
    if not isinstance(inner, UniversalViT):
        raise ExplainError(f"expected a UniversalViT (optionally with LoRA), got {type(model)}")
    return inner


@contextlib.contextmanager
def recording_attention(vit: UniversalViT) -> Iterator[list[list[Tensor]]]:
    """While active, every attention block appends its probabilities (N, heads, T, T) to its
    own list (one list per block, in order); the fused kernel is used again afterwards."""
    modules = [m for m in vit.modules() if isinstance(m, Attention)]
    lists: list[list[Tensor]] = [[] for _ in modules]
    for module, records in zip(modules, lists, strict=True):
        module.recorded = records
    try:
        yield lists
    finally:
        for module in modules:
            module.recorded = None


def token_grid(vit: UniversalViT, shape: Sequence[int], da: int) -> tuple[int, int, int]:
    """Token grid (d, h, w) of an input of spatial shape (D, H, W) at degree of anisotropy da."""
    patch = vit.config.patch_size
    depth_patch = max(patch >> da, 1)
    d, h, w = (int(s) for s in shape)
    return d // depth_patch, h // patch, w // patch


def to_image_grid(token_map: Tensor, patch: int, da: int) -> Tensor:
    """(d, h, w) -> (d * max(patch >> da, 1), h * patch, w * patch): each token's value on every
    voxel of its patch (SAC's depth patch for the DA)."""
    depth_patch = max(patch >> da, 1)
    return (
        token_map.repeat_interleave(depth_patch, dim=0)
        .repeat_interleave(patch, dim=1)
        .repeat_interleave(patch, dim=2)
    )


def _readout(relevance: Tensor, pool: str, subtract_identity: bool) -> Tensor:
    """(1 + T, 1 + T) token-to-token relevance -> (T,) relevance of the patch tokens for what
    the head reads."""
    if subtract_identity:
        relevance = relevance - torch.eye(relevance.shape[0], dtype=relevance.dtype)
    if pool == "cls":
        return relevance[0, 1:]
    return relevance[1:, 1:].mean(dim=0)


def _rollout(attentions: list[Tensor], pool: str) -> Tensor:
    size = attentions[0].shape[-1]
    eye = torch.eye(size, dtype=torch.float64)
    rollout = eye.clone()
    for probs in attentions:  # (heads, 1 + T, 1 + T)
        mixed = 0.5 * probs.mean(dim=0).double() + 0.5 * eye
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed @ rollout
    return _readout(rollout, pool, subtract_identity=False)


def _grad_attention(attentions: list[Tensor], grads: list[Tensor], pool: str) -> Tensor:
    size = attentions[0].shape[-1]
    relevance = torch.eye(size, dtype=torch.float64)
    for probs, grad in zip(attentions, grads, strict=True):  # (heads, 1 + T, 1 + T) each
        weighted = (grad.double() * probs.double()).clamp_min(0).mean(dim=0)
        relevance = relevance + weighted @ relevance
    return _readout(relevance, pool, subtract_identity=True)


def _margin(logits: Tensor, target: int) -> Tensor:
    """(N, K) logits -> (N,) the explained quantity: ``logit[target] - mean(logits)`` (invariant
    to a shift of all logits, as softmax is); +-logit for a single-output (sigmoid) head."""
    if logits.shape[-1] == 1:
        return logits[:, 0] if target == 1 else -logits[:, 0]
    return logits[:, target] - logits.mean(dim=-1)


def _objective(logits: Tensor, target: int | None) -> tuple[Tensor, float, int]:
    """(objective to differentiate, probability of the target, target) for logits (1, K)."""
    classes = logits.shape[-1]
    if target is None:  # a binary head (two logits or one sigmoid output): the positive class
        target = 1 if classes <= 2 else int(logits.argmax(dim=-1))
    if not 0 <= target < max(classes, 2):
        raise ExplainError(f"target {target} out of range for a head with {classes} outputs")
    if classes == 1:
        positive = float(torch.sigmoid(logits.detach()[0, 0]))
        score = positive if target == 1 else 1.0 - positive
    else:
        score = float(logits.detach().softmax(dim=-1)[0, target])
    return _margin(logits, target)[0], score, target


def _occlusion(
    vit: UniversalViT, x: Tensor, spacing: Tensor, da: int, base: Tensor, target: int
) -> Tensor:
    """(1, C, D, H, W) -> (T,) drop of the margin (``base``: (1,), the unoccluded one) when each
    token's patch in turn is replaced by its own per-channel mean, 16 occluded copies a batch.

    Hand-written rather than MONAI's ``OcclusionSensitivity`` (1.6.1): its ``mean_patch`` mode
    multiplies the patch by its mean instead of replacing it (checked: a [2, 0] patch becomes
    [2, 0] x 1, not [1, 1]), and a callable mode raises.
    """
    patch = vit.config.patch_size
    depth_patch = max(patch >> da, 1)
    _, c, D, H, W = x.shape
    d, h, w = D // depth_patch, H // patch, W // patch
    blocks = x.reshape(c, d, depth_patch, h, patch, w, patch)
    means = blocks.mean(dim=(2, 4, 6), keepdim=True).expand_as(blocks)
    drops = []
    batch = 16
    with torch.no_grad():
        tokens = [(k, i, j) for k in range(d) for i in range(h) for j in range(w)]
        for start in range(0, len(tokens), batch):
            copies = []
            for k, i, j in tokens[start : start + batch]:
                copy = blocks.clone()
                copy[:, k, :, i, :, j, :] = means[:, k, :, i, :, j, :]
                copies.append(copy.reshape(c, D, H, W))
            occluded = torch.stack(copies)  # (B, C, D, H, W)
            logits = vit(occluded, spacing.expand(len(copies), 3))  # (B, K)
            drops.append(base - _margin(logits, target))
    return torch.cat(drops).double()  # (T,) in token order (d, h, w)


def explain(
    model: nn.Module,
    image: Tensor,
    spacing: Sequence[float] | Tensor,
    *,
    method: str = DEFAULT_METHOD,
    target: int | None = None,
) -> Explanation:
    """Relevance of each part of ``image`` for the model's score of class ``target``.

    ``image``: (C, D, H, W) as ``core.data`` yields it (2D images have D == 1); ``spacing``:
    (3,) voxel spacing (d, h, w) in mm. ``target``: the class explained; default the positive
    class (1) of a two-class head, else the predicted class. Gradients are of the logit margin
    ``logit[target] - mean(logits)`` (invariant to a shift of all logits, as softmax is).
    The model is put in eval mode; its parameters are not changed (gradients are cleared).

    Raises ExplainError for an unknown method, a bad target or a model without a head.
    """
    if method not in METHODS:
        raise ExplainError(f"unknown method {method!r}; choose one of {METHODS}")
    if image.dim() != 4:
        raise ExplainError(f"image must be (C, D, H, W), got shape {tuple(image.shape)}")
    vit = universal_vit(model)
    if not vit.num_classes:
        raise ExplainError("the model has no classification head (num_classes == 0)")
    model.eval()
    spacing_t = torch.as_tensor(spacing, dtype=torch.float64).reshape(1, 3)
    da = batch_degree_of_anisotropy(spacing_t)
    reference = next(vit.parameters())
    x = image.unsqueeze(0).to(reference.device, reference.dtype)
    if method == "occlusion":  # forward passes only
        with torch.no_grad():
            logits = vit(x, spacing_t)  # (1, K)
        _, score, target = _objective(logits.double(), target)
        base = _margin(logits, target)  # the model's precision, as the occluded margins
        relevance = _occlusion(vit, x, spacing_t.to(x.device), da, base, target)
    else:
        relevance, score, target = _gradient_relevance(vit, x, spacing_t, method, target)
        model.zero_grad(set_to_none=True)
    grid = token_grid(vit, image.shape[1:], da)
    token_map = relevance.clamp_min(0).reshape(grid).float().cpu()
    peak = float(token_map.max())
    token_map = token_map / peak if peak > 0 else torch.zeros_like(token_map)
    image_map = to_image_grid(token_map, vit.config.patch_size, da)
    return Explanation(score, target, method, token_map, image_map)


def _gradient_relevance(
    vit: UniversalViT, x: Tensor, spacing: Tensor, method: str, target: int | None
) -> tuple[Tensor, float, int]:
    """(T,) relevance of the attention- and gradient-based methods for x (1, C, D, H, W), with
    the target's probability and the target."""
    x = x.requires_grad_(True)
    last_input: list[Tensor] = []

    def keep_input(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        args[0].retain_grad()
        last_input.append(args[0])  # (1, 1 + T, E), the tokens entering the last block

    hook = vit.blocks[-1].register_forward_pre_hook(keep_input)
    try:
        with torch.enable_grad(), recording_attention(vit) as records:
            features = vit.forward_features(x, spacing)  # (1, 1 + T, E), what the head pools
            features.retain_grad()
            logits = vit.forward_head(features)  # (1, K)
            objective, score, target = _objective(logits.double(), target)
            objective.backward()
    finally:
        hook.remove()
    attentions = [block[0][0].detach() for block in records]  # (heads, 1 + T, 1 + T)
    pool = vit.config.pool
    if method == "token-gradient":
        # A CLS head reads no patch token after the last block: there, the tokens entering it.
        read = last_input[0] if pool == "cls" else features
        assert read.grad is not None
        tokens, grad = read[0, 1:].detach(), read.grad[0, 1:]  # (T, E) each
        relevance = (tokens * grad).sum(dim=-1).double()  # (T,)
    elif method == "rollout":
        relevance = _rollout(attentions, pool)
    elif method == "grad-attention":
        grads = [block[0].grad[0] for block in records]  # type: ignore[index]
        relevance = _grad_attention(attentions, grads, pool)
    else:
        entering = last_input[0]
        assert entering.grad is not None
        tokens, grad = entering[0, 1:].detach(), entering.grad[0, 1:]  # (T, E) each
        relevance = (tokens @ grad.mean(dim=0)).clamp_min(0).double()  # (T,)
    return relevance, score, target
