"""The segmentation task in a federation: the pieces ``core.federation.rounds`` dispatches to
when run config ``task = "segmentation"``.

Everything else of a round is the classifier's: the backbone fingerprint check, the site
policy, the privacy ledger and its budget, DP-SGD (per-image clipping: the unit is one image or
volume), HE packing, the wire format. What differs: the model (frozen universal ViT + LoRA +
SAC decoder + head, :mod:`core.model.segmentation`; LoRA travels, ``decoder`` and
``seg_head`` too unless each site keeps its own: head-sharing "local",
:mod:`core.federation.local_head`), the data (a mask per image,
:mod:`core.data.segmentation`), the loss (Dice + CE) and the evaluation (Dice and HD95 per
site, :mod:`core.training.segmentation`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from core.adapters.lora import add_lora
from core.config import RunConfig
from core.data import GridConfig
from core.data.segmentation import SegmentationDataset, open_segmentation_site
from core.federation.rounds import build_backbone
from core.model.segmentation import SEGMENTATION_TRAINABLE, create_segmenter
from core.training.loops import pick_device
from core.training.segmentation import evaluate_segmentation

# A decoder seed apart from the backbone's: every site and the server build the same decoder.
_DECODER_SEED_OFFSET = 1_000_003


def build_segmentation_model(cfg: RunConfig) -> tuple[nn.Module, str]:
    """Backbone (frozen) + LoRA + SAC decoder + head; returns (model, backbone fingerprint).
    The decoder and head are initialised from ``cfg.backbone_seed``: identical everywhere."""
    backbone, digest = build_backbone(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.backbone_seed + _DECODER_SEED_OFFSET)
        model = create_segmenter(backbone, cfg.num_classes, features=cfg.decoder_features)
    return add_lora(model, cfg.lora(), trainable=SEGMENTATION_TRAINABLE), digest


def open_segmentation_split(
    cfg: RunConfig, site_dir: str | Path, split: str
) -> SegmentationDataset:
    """One split of a segmentation site on the run's grid."""
    grid = GridConfig(in_plane=(cfg.in_plane_size, cfg.in_plane_size), channels=cfg.in_channels)
    return open_segmentation_site(
        Path(site_dir) / "dataset.json", split, grid=grid, num_classes=cfg.num_classes
    )


def evaluate_segmentation_model(
    cfg: RunConfig, model: nn.Module, site_dir: str | Path, split: str = "validation"
) -> dict[str, float]:
    """Dice, HD95 (mm), empty-case accuracy and loss of ``model`` (the site's: global
    adapters, with its own decoder under head-sharing "local") on ``split``."""
    return evaluate_segmentation(
        model,
        open_segmentation_split(cfg, site_dir, split),
        num_classes=cfg.num_classes,
        batch_size=cfg.max_physical_batch,
        device=pick_device(cfg.device),
    )
