"""Segmentation with the universal ViT: a SAC decoder that reads several encoder blocks.

UNETR's layout (Hatamizadeh et al. 2022) on the universal ViT: the encoder's patch tokens from
blocks spread over its depth become skip features at 1/2, 1/4 and 1/8 of the input grid (one
transposed conv each, from the token grid at 1/P), the last block's normalised tokens are the
bottleneck, a conv block on the image itself is the full-resolution skip, and the decoder goes
up one level at a time (transposed conv, concatenation with the skip, conv block) back to the
input grid; a 1x1x1 conv gives the per-voxel class logits.

Every conv is a SAC conv (:mod:`core.model.sac`), so one decoder serves 2D images and 3D
volumes of any spacing: while in-plane upsampling has not yet undone the depth the patch
embedding left alone, transposed convs keep the slices and 3x3x3 convs work per slice. The
state after each level is what the encoder's downsampling left there, so the logits land on
exactly the input grid ``(N, K, D, H, W)``.

Under DP-SGD every trainable layer has exact per-sample gradients: the SAC convs through the
grad samplers of :mod:`core.model.sac_grad_sample` (imported here), the token projections
(``nn.Linear``) and ``nn.GroupNorm`` through Opacus's own. GroupNorm, not BatchNorm: it mixes no
examples. The decoder is kept narrow (``features`` channels at full resolution, twice that
below, token projections before any upsampling) so that, with LoRA, the update stays a small
fraction of the model (the wire format is LoRA + ``decoder`` + ``seg_head``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

import core.model.sac_grad_sample  # noqa: F401  (registers the SAC grad samplers with Opacus)
from core.model.sac import (
    SACConv3d,
    SACConvTranspose3d,
    SpatialState,
    batch_degree_of_anisotropy,
)
from core.model.vit import UniversalViT

# What travels besides LoRA: the modules a segmentation model trains (peft modules_to_save).
SEGMENTATION_TRAINABLE = ("decoder", "seg_head")
# Initial logit of the background class over the others: lesions cover a few percent of the
# voxels, and a head that starts at 50/50 first spends its (DP-noisy) steps unlearning that.
BACKGROUND_PRIOR_LOGIT = 3.0


@dataclass(frozen=True)
class DecoderConfig:
    """The SAC decoder's width and which encoder blocks feed it."""

    features: int = 16  # channels at full resolution; level l >= 1 has 2 * features
    # 0-based encoder blocks for the skips at levels 1, 2, ... (1/2, 1/4, ...); None: UNETR's
    # choice, blocks at 1/4, 2/4, 3/4 of the depth (3, 6, 9 of 12)
    skip_blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.features < 1:
            raise ValueError(f"decoder features must be >= 1, got {self.features}")


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 when they divide the channels, else the largest divisor below."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ConvBlock(nn.Module):
    """(SAC 3x3x3 conv, GroupNorm, LeakyReLU) twice: MONAI's UnetBasicBlock with SAC convs."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = SACConv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = SACConv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x: Tensor, state: SpatialState) -> tuple[Tensor, SpatialState]:
        x, state = self.conv1(x, state)
        x = self.act(self.norm1(x))
        x, state = self.conv2(x, state)
        return self.act(self.norm2(x)), state


class TokenProjection(nn.Module):
    """Patch tokens of one block -> a feature map on the token grid: a LayerNorm without
    parameters (block outputs are not normalised), then a linear map to ``channels``."""

    def __init__(self, embed_dim: int, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim, elementwise_affine=False)
        self.proj = nn.Linear(embed_dim, channels)

    def forward(self, tokens: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """(N, 1 + T, E) with CLS first -> (N, channels, d, h, w)."""
        n = tokens.shape[0]
        features = self.proj(self.norm(tokens[:, 1:]))  # (N, T, c)
        return features.transpose(1, 2).reshape(n, -1, *grid)


class SACDecoder(nn.Module):
    """UNETR-style decoder on SAC convs; see the module docstring. ``levels`` = log2(patch)."""

    def __init__(
        self, in_channels: int, embed_dim: int, levels: int, config: DecoderConfig
    ) -> None:
        super().__init__()
        self.levels = levels
        ch = [config.features * min(2**level, 2) for level in range(levels + 1)]
        self.stem = ConvBlock(in_channels, ch[0])  # full-resolution skip, from the image
        self.bottleneck = TokenProjection(embed_dim, ch[levels])
        # skip l (1 <= l < levels): tokens -> ch[l], up by 2 (levels - l) times (UNETR's
        # transposed-conv chain; one big 2**k kernel would cost 4**k times more weights)
        self.skip_proj = nn.ModuleList(
            TokenProjection(embed_dim, ch[level]) for level in range(1, levels)
        )
        self.skip_up = nn.ModuleList(
            nn.ModuleList(
                SACConvTranspose3d(ch[level], ch[level], 2) for _ in range(levels - level)
            )
            for level in range(1, levels)
        )
        # up[l]: level l + 1 -> l; block[l] fuses the upsampled features with skip l
        self.up = nn.ModuleList(
            SACConvTranspose3d(ch[level + 1], ch[level], 2) for level in range(levels)
        )
        self.block = nn.ModuleList(ConvBlock(2 * ch[level], ch[level]) for level in range(levels))
        self.out_channels = ch[0]

    def forward(
        self,
        image: Tensor,
        final: Tensor,
        skips: Sequence[Tensor],
        grid: tuple[int, int, int],
        da: int,
    ) -> Tensor:
        """image (N, C, D, H, W); final and skips (N, 1 + T, E) on the token grid ``grid``;
        skips[l - 1] feeds level l -> features (N, features, D, H, W)."""
        tokens_state = SpatialState(da, self.levels)
        y, state = self.bottleneck(final, grid), tokens_state
        for level in range(self.levels - 1, -1, -1):
            y, state = self.up[level](y, state)
            if level == 0:
                skip, _ = self.stem(image, SpatialState(da))
            else:
                skip, skip_state = self.skip_proj[level - 1](skips[level - 1], grid), tokens_state
                for up in cast(nn.ModuleList, self.skip_up[level - 1]):
                    skip, skip_state = up(skip, skip_state)
            y, state = self.block[level](torch.cat([y, skip], dim=1), state)
        return y


class SegmentationViT(nn.Module):
    """Universal ViT encoder + SAC decoder + 1x1x1 head.

    ``forward(x, spacing)``: x (N, C, D, H, W), spacing (N, 3) or (3,), one DA per batch ->
    logits (N, num_classes, D, H, W) on the input grid.
    """

    def __init__(
        self, encoder: UniversalViT, num_classes: int, config: DecoderConfig | None = None
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"segmentation needs >= 2 classes (background too), got {num_classes}")
        config = config or DecoderConfig()
        vit = encoder.config
        self.levels = vit.patch_size.bit_length() - 1
        if self.levels < 1:
            raise ValueError("segmentation needs a patch size of at least 2")
        depth = vit.depth
        skip_blocks = config.skip_blocks or tuple(
            max(round(level * depth / (self.levels)) - 1, 0) for level in range(1, self.levels)
        )
        if len(skip_blocks) != self.levels - 1 or not all(0 <= b < depth for b in skip_blocks):
            raise ValueError(
                f"skip_blocks must name {self.levels - 1} encoder blocks in [0, {depth}), "
                f"got {skip_blocks}"
            )
        self.skip_blocks = skip_blocks
        self.encoder = encoder
        self.decoder = SACDecoder(vit.in_channels, vit.embed_dim, self.levels, config)
        self.seg_head = SACConv3d(self.decoder.out_channels, num_classes, 1)
        with torch.no_grad():  # a background prior (~5% foreground at the start, as RetinaNet)
            self.seg_head.bias[0] = BACKGROUND_PRIOR_LOGIT  # type: ignore[index]
        self.num_classes = num_classes
        self.config = config

    def forward(self, x: Tensor, spacing: Tensor | Sequence[float]) -> Tensor:
        da = batch_degree_of_anisotropy(spacing)
        hidden: list[Tensor] = []
        final = self.encoder.forward_features(x, spacing, hidden=hidden)
        p = self.encoder.config.patch_size
        _, _, d, h, w = x.shape
        grid = (d // max(p >> da, 1), h // p, w // p)
        skips = [hidden[b] for b in self.skip_blocks]
        features = self.decoder(x, final, skips, grid, da)
        logits, _ = self.seg_head(features, SpatialState(da))
        return logits


def create_segmenter(
    encoder: UniversalViT, num_classes: int, *, features: int = 16
) -> SegmentationViT:
    """A segmentation model on ``encoder`` (its classification head is dropped)."""
    encoder.reset_head(0)
    return SegmentationViT(encoder, num_classes, DecoderConfig(features=features))
