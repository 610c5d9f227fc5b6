"""The masked-image model: patchify, per-patch targets, token masks, the masked encoder and
its linear decoder shared by every DA."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from core.model.sac import batch_degree_of_anisotropy
from core.model.vit import UniversalViT


def depth_patch_size(patch: int, da: int) -> int:
    """Depth extent of one patch token at this DA: ``max(P >> DA, 1)`` (the SAC depth stride)."""
    return max(patch >> da, 1)


def patchify(x: Tensor, patch: int, depth_patch: int) -> Tensor:
    """Cut a volume into the patch embedding's patches, in token order (d, h, w).

    x: (N, C, D, H, W) -> (N, T, C * p_d * P * P) with T = (D / p_d) (H / P) (W / P).
    """
    n, c, d, h, w = x.shape
    gd, gh, gw = d // depth_patch, h // patch, w // patch
    x = x.reshape(n, c, gd, depth_patch, gh, patch, gw, patch)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (N, gd, gh, gw, C, p_d, P, P)
    return x.reshape(n, gd * gh * gw, c * depth_patch * patch * patch)


def normalized_patches(patches: Tensor, eps: float) -> Tensor:
    """Per-patch standardisation of the target. patches: (N, T, V) -> (N, T, V)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, unbiased=False, keepdim=True)
    return (patches - mean) / torch.sqrt(var + eps)


def random_token_mask(n: int, tokens: int, ratio: float, generator: torch.Generator) -> Tensor:
    """Exactly ``round(ratio * T)`` masked tokens per sample (at least 1, at most T - 1 when
    T > 1): a fixed count keeps the loss scale equal across batches. Returns (N, T) bool."""
    count = min(max(round(ratio * tokens), 1), max(tokens - 1, 1))
    ranks = torch.rand(n, tokens, generator=generator).argsort(dim=1).argsort(dim=1)  # (N, T)
    return ranks < count


class MaskedImageModel(nn.Module):
    """The universal ViT (``encoder``) with a mask token and a linear voxel decoder."""

    def __init__(
        self, encoder: UniversalViT, *, target_eps: float = 1e-2, visible_weight: float
    ) -> None:
        super().__init__()
        config = encoder.config
        self.encoder = encoder
        self.patch = config.patch_size
        self.channels = config.in_channels
        self.target_eps = target_eps
        self.visible_weight = visible_weight
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        # Full-depth patch per token; shallower depth patches average it (module docstring).
        self.decoder = nn.Linear(config.embed_dim, config.in_channels * config.patch_size**3)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder.weight, std=0.02)
        nn.init.zeros_(self.decoder.bias)

    def encode(
        self, x: Tensor, spacing: Tensor | Sequence[float], mask: Tensor | None = None
    ) -> tuple[Tensor, int]:
        """``UniversalViT.forward_features`` with masked tokens replaced by the mask token.

        x: (N, C, D, H, W); mask: (N, T) bool or None -> ((N, 1 + T, E) normalised tokens, DA).
        """

        def apply_mask(tokens: Tensor) -> Tensor:  # (N, T, E) -> (N, T, E)
            if mask is None:
                return tokens
            if mask.shape != tokens.shape[:2]:
                raise ValueError(
                    f"mask must be (N, T) = {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}"
                )
            return torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)

        features = self.encoder.forward_features(x, spacing, edit_tokens=apply_mask)
        return features, batch_degree_of_anisotropy(spacing)

    def predict(self, features: Tensor, depth_patch: int) -> Tensor:
        """Voxel predictions per token. features: (N, T, E) -> (N, T, C * p_d * P * P)."""
        n, t, _ = features.shape
        p = self.patch
        full = self.decoder(features).reshape(n, t, self.channels, p, p, p)  # depth first
        if depth_patch < p:
            group = p // depth_patch
            full = full.reshape(n, t, self.channels, depth_patch, group, p, p).mean(dim=4)
        return full.reshape(n, t, -1)

    def forward(self, x: Tensor, spacing: Tensor | Sequence[float], mask: Tensor) -> Tensor:
        """Patch reconstruction loss (a scalar): the weighted mean of per-token errors, weight 1
        for a masked token and ``visible_weight`` for a visible one. x: (N, C, D, H, W);
        mask: (N, T) bool."""
        features, da = self.encode(x, spacing, mask)
        depth_patch = depth_patch_size(self.patch, da)
        pred = self.predict(features[:, 1:], depth_patch)  # (N, T, V)
        target = normalized_patches(patchify(x, self.patch, depth_patch).float(), self.target_eps)
        per_token = (pred.float() - target).pow(2).mean(dim=-1)  # (N, T)
        weights = torch.where(mask, 1.0, self.visible_weight).to(per_token.dtype)  # (N, T)
        # At least one token per sample is masked (random_token_mask), so the sum is >= 1.
        return (per_token * weights).sum() / weights.sum()
