"""What one hospital does in a round, as plain functions the Flower ClientApp calls.

``train_round``: verify the backbone, load the global adapters, check the privacy budget,
fine-tune locally (DP-SGD or plain), and return the new adapters with metrics and the updated
privacy ledger. ``evaluate_round``: evaluate the global adapters on the site's held-out split.
Nothing here knows about Flower; the ledger travels as a plain dict.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.adapters.lora import adapter_state, add_lora, load_adapter_state
from core.config import RunConfig
from core.data import GridConfig, SiteDataset, open_site
from core.model.checkpoint import BackboneError, backbone_state, fingerprint, load_backbone
from core.model.vit import UniversalViT, create_vit
from core.privacy.ledger import PrivacyLedger, plan_dp
from core.training.loops import (
    DPStepPlan,
    binary_scores,
    calibrate_threshold,
    metrics_from_logits,
    pick_device,
    predict,
    rates_at_threshold,
    train_dp,
    train_plain,
)

log = logging.getLogger(__name__)


def build_backbone(cfg: RunConfig) -> tuple[UniversalViT, str]:
    """The frozen backbone every site shares, with its head, and the backbone's fingerprint.

    From ``cfg.backbone`` (a safetensors checkpoint) when set; otherwise built from
    ``cfg.backbone_seed``, which is bitwise identical on every machine. The head is initialised
    from the seed too, so every site and the server start from the same head.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.backbone_seed)
        if cfg.backbone:
            model, digest = load_backbone(cfg.backbone)
        else:
            model = create_vit(cfg.model_size, in_channels=cfg.in_channels)
            digest = fingerprint(backbone_state(model))
        model.reset_head(cfg.num_classes, pool=cfg.head_pool, head_norm=cfg.head_norm)
    return model, digest


def build_lora_model(cfg: RunConfig) -> tuple[nn.Module, str]:
    """Backbone + LoRA adapters + head; returns (model, backbone fingerprint)."""
    backbone, digest = build_backbone(cfg)
    return add_lora(backbone, cfg.lora()), digest


def initial_adapters(cfg: RunConfig) -> tuple[dict[str, Tensor], str]:
    """The round-0 global adapters (B = 0, seeded head) and the backbone fingerprint."""
    model, digest = build_lora_model(cfg)
    return adapter_state(model), digest


@dataclass
class TrainOutcome:
    status: str  # "trained" | "refused"
    reason: str
    adapters: dict[str, Tensor] | None
    metrics: dict[str, float]
    ledger: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def open_split(cfg: RunConfig, site_dir: str | Path, split: str) -> SiteDataset:
    grid = GridConfig(in_plane=(cfg.in_plane_size, cfg.in_plane_size), channels=cfg.in_channels)
    return open_site(Path(site_dir) / "dataset.json", split, grid=grid, num_classes=cfg.num_classes)


def _checked_model(cfg: RunConfig, expected_fingerprint: str) -> nn.Module:
    model, digest = build_lora_model(cfg)
    if expected_fingerprint and digest != expected_fingerprint:
        raise BackboneError(
            f"this site's backbone has fingerprint {digest[:12]}..., the server's round uses "
            f"{expected_fingerprint[:12]}...; install the federation's backbone checkpoint "
            f"(run config 'backbone' = {cfg.backbone or '<seeded>'!r}) and restart the site"
        )
    return model


def train_round(
    cfg: RunConfig,
    *,
    site_dir: str | Path,
    global_adapters: Mapping[str, Tensor],
    server_round: int,
    expected_fingerprint: str,
    ledger_state: Mapping[str, Any] | None,
    site_secret: int,
) -> TrainOutcome:
    """One round of local fine-tuning at a site (DP-SGD unless ``cfg.dp`` is False).

    ``site_secret``: a random number the site draws once and keeps to itself. Under DP it seeds
    the Poisson sampling and the Gaussian noise: were they seeded from the run config, the
    server could regenerate a site's noise and subtract it, and two sites would add the same
    noise. Kept (not redrawn) so a site that restarts mid-run repeats its round bit for bit.
    """
    model = _checked_model(cfg, expected_fingerprint)
    load_adapter_state(model, global_adapters)
    dataset = open_split(cfg, site_dir, "training")
    settings = cfg.training()
    device = pick_device(cfg.device)
    seed = (site_secret if cfg.dp else cfg.seed) * 1_000_003 + server_round
    generator = torch.Generator().manual_seed(seed % 2**63)  # batch sampling
    torch.manual_seed((seed * 7_919) % 2**63)  # DP noise (Opacus non-secure mode) and dropout

    if not cfg.dp:
        result = train_plain(model, dataset, settings, device=device, generator=generator, amp=True)
        metrics = {"train-loss": result.loss, "num-examples": result.num_examples}
        return TrainOutcome("trained", "", adapter_state(model), metrics)

    ledger = PrivacyLedger.resume_or_start(
        ledger_state, settings=cfg.privacy(), dataset_size=len(dataset)
    )
    if ledger.plan is None:
        ledger.adopt_plan(
            plan_dp(
                cfg.privacy(),
                dataset_size=len(dataset),
                batch_size=settings.batch_size,
                local_epochs=settings.local_epochs,
                planned_rounds=cfg.planned_rounds,
            )
        )
    plan = ledger.plan
    assert plan is not None
    decision = ledger.check_budget(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    if not decision.allowed:
        ledger.record_refusal(server_round, decision.reason)
        log.warning("round %d refused: %s", server_round, decision.reason)
        metrics = {"num-examples": 0, "epsilon": decision.current_epsilon}
        return TrainOutcome("refused", decision.reason, None, metrics, ledger.to_dict())

    step_plan = DPStepPlan(
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        sample_rate=plan.sample_rate,
        steps=plan.steps_per_round,
    )
    result = train_dp(model, dataset, settings, step_plan, device=device, generator=generator)
    # train_dp takes exactly plan.steps_per_round steps: what the budget check projected.
    record = ledger.record_round(
        server_round, plan.noise_multiplier, plan.sample_rate, result.steps
    )
    metrics = {
        "train-loss": result.loss,
        "num-examples": result.num_examples,
        "epsilon": record.epsilon,
        "delta": cfg.target_delta,
        "noise-multiplier": plan.noise_multiplier,
        "sample-rate": plan.sample_rate,
        "steps": result.steps,
    }
    return TrainOutcome("trained", "", adapter_state(model), metrics, ledger.to_dict())


def evaluate_round(
    cfg: RunConfig,
    *,
    site_dir: str | Path,
    global_adapters: Mapping[str, Tensor],
    expected_fingerprint: str,
    split: str = "validation",
    calibration_split: str = "validation",
) -> dict[str, float]:
    """Evaluate the global adapters on the site's held-out ``split``.

    For a binary single-label task the site picks its own decision threshold on
    ``calibration_split`` (the one maximising balanced accuracy there; sites differ in
    prevalence, so one shared head bias cannot serve them all) and reports balanced accuracy,
    sensitivity and specificity at that threshold. The threshold itself stays at the site:
    only these rates are returned. Other tasks report the argmax / 0.5 rates of ``evaluate``.
    """
    model = _checked_model(cfg, expected_fingerprint)
    load_adapter_state(model, global_adapters)
    device = pick_device(cfg.device)
    logits, labels = predict(
        model, open_split(cfg, site_dir, split), batch_size=cfg.max_physical_batch, device=device
    )
    metrics = metrics_from_logits(logits, labels, multi_label=cfg.multi_label)
    if cfg.multi_label or cfg.num_classes != 2:
        return metrics
    if calibration_split == split:
        calibration = (logits, labels)
    else:
        calibration = predict(
            model,
            open_split(cfg, site_dir, calibration_split),
            batch_size=cfg.max_physical_batch,
            device=device,
        )
    try:
        threshold = calibrate_threshold(binary_scores(calibration[0]), calibration[1])
    except ValueError as err:  # one class only in the calibration split: keep argmax rates
        log.warning("site %s: no calibrated threshold (%s)", Path(site_dir).name, err)
        return metrics
    return metrics | rates_at_threshold(binary_scores(logits), labels, threshold)
