"""What one hospital does in a round, as plain functions the Flower ClientApp calls.

``train_round``: verify the backbone, load the global adapters, check the privacy budget,
fine-tune locally (DP-SGD or plain), and return the new adapters with metrics and the updated
privacy ledger. ``evaluate_round``: evaluate the global adapters on the site's held-out split.
Nothing here knows about Flower; the ledger travels as a plain dict.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from core.adapters.lora import adapter_state, add_lora, load_adapter_state
from core.config import RunConfig
from core.data import GridConfig, SiteDataset, open_site
from core.federation.local_head import (
    HeadProvenance,
    LocalHead,
    head_provenance,
    local_part,
    with_local_head,
)
from core.federation.policy import SitePolicy, check_noise, check_run
from core.federation.protocol import (
    EPSILON,
    LOCAL_HEAD,
    NUM_EXAMPLES,
    REFUSED,
    TRAIN_LOSS,
    TRAINED,
)
from core.model.checkpoint import (
    BackboneError,
    backbone_state,
    fingerprint,
    load_backbone,
    tensors_digest,
)
from core.model.vit import UniversalViT, create_vit
from core.privacy.ledger import PrivacyLedger, plan_dp
from core.training.loops import (
    DPStepPlan,
    SiteData,
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
            digest = fingerprint(backbone_state(model), model.config)
        head_norm = cfg.head_norm
        if head_norm == "auto":
            head_norm = "reference" if cfg.head_pool in model.references else "layer"
        model.reset_head(
            cfg.num_classes,
            pool=cfg.head_pool,
            head_norm=head_norm,
            personal=cfg.has_personal_head,
        )
    return model, digest


def recorded_before_config_fingerprints(cfg: RunConfig, recorded: str) -> bool:
    """Whether ``recorded`` is this config's backbone as run folders recorded it before the
    fingerprint covered the architecture config (the tensors' digest alone): such a run is
    read, resumed and explained on the same tensors, as it was then."""
    backbone, _ = build_backbone(cfg)
    return recorded == tensors_digest(backbone_state(backbone))


def build_lora_model(cfg: RunConfig) -> tuple[nn.Module, str]:
    """Backbone + LoRA adapters + head (segmentation: + decoder); returns (model, backbone
    fingerprint)."""
    if cfg.task == "segmentation":
        from core.federation.segmentation import build_segmentation_model

        return build_segmentation_model(cfg)
    backbone, digest = build_backbone(cfg)
    return add_lora(backbone, cfg.lora()), digest


def initial_adapters(cfg: RunConfig) -> tuple[dict[str, Tensor], str]:
    """The round-0 global adapters (B = 0, seeded head) and the backbone fingerprint."""
    model, digest = build_lora_model(cfg)
    return adapter_state(model), digest


@dataclass
class TrainOutcome:
    """What a site's round produced. ``status``: "trained" (a new release, or a re-sent one:
    ``replayed``) or "refused" (``reason`` says why; nothing derived from the data)."""

    status: str  # "trained" | "refused"
    reason: str
    adapters: dict[str, Tensor] | None
    metrics: dict[str, float]
    ledger: dict[str, Any] | None = None
    release: Release | None = None  # a new DP release the site keeps for a re-sent round
    replayed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    local_head: LocalHead | None = None  # head-sharing "local"/"shared+local": kept, never sent


@dataclass(frozen=True)
class Release:
    """The update a DP site released for a round, kept (state folder) so that a coordinator
    re-sending that round with the same global model gets it again at no privacy cost."""

    server_round: int
    global_digest: str
    adapters: dict[str, Tensor]
    metrics: dict[str, float]

    def to_bytes(self) -> bytes:
        """safetensors bytes: the adapters, with round, digest and metrics as metadata."""
        metadata = {
            "round": str(self.server_round),
            "global_digest": self.global_digest,
            "metrics": json.dumps(self.metrics),
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.adapters.items()}
        return safetensors.torch.save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str) -> Release:
        """Inverse of :meth:`to_bytes`; raises ValueError naming ``source`` when malformed."""
        try:
            # safetensors: an 8-byte little-endian header length, then the JSON header.
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
            metadata = header["__metadata__"]
            return cls(
                server_round=int(metadata["round"]),
                global_digest=str(metadata["global_digest"]),
                adapters=safetensors.torch.load(data),
                metrics={k: float(v) for k, v in json.loads(metadata["metrics"]).items()},
            )
        except (KeyError, ValueError, TypeError, safetensors.SafetensorError) as err:
            raise ValueError(
                f"{source}: not a release written by Release.to_bytes ({err}); delete it and "
                "the site refuses re-sent rounds instead of serving them"
            ) from err


def open_split(
    cfg: RunConfig, site_dir: str | Path, split: str, cache_dir: str | Path | None = None
) -> SiteDataset:
    """One split of a site on the run's grid; ``cache_dir`` (a folder of the site's own, e.g.
    ``SiteRef.state_dir / "preprocess-cache"``) keeps preprocessed items across rounds."""
    grid = GridConfig(in_plane=(cfg.in_plane_size, cfg.in_plane_size), channels=cfg.in_channels)
    return open_site(
        Path(site_dir) / "dataset.json",
        split,
        grid=grid,
        num_classes=cfg.num_classes,
        cache_dir=cache_dir,
    )


def open_task_split(
    cfg: RunConfig, site_dir: str | Path, split: str, cache_dir: str | Path | None = None
) -> SiteData:
    """:func:`open_split` for a classification run, the segmentation site (masks) otherwise."""
    if cfg.task == "segmentation":
        from core.federation.segmentation import open_segmentation_split

        return open_segmentation_split(cfg, site_dir, split)
    return open_split(cfg, site_dir, split, cache_dir)


def task_loss(cfg: RunConfig) -> nn.Module | None:
    """The training loss of the run's task (None: the loops' classification loss)."""
    if cfg.task == "segmentation":
        from core.training.segmentation import segmentation_loss

        return segmentation_loss()
    return None


def _checked_model(cfg: RunConfig, expected_fingerprint: str) -> tuple[nn.Module, str]:
    """:func:`build_lora_model`, refused unless the backbone is the one the round uses."""
    model, digest = build_lora_model(cfg)
    if expected_fingerprint and digest != expected_fingerprint:
        raise BackboneError(
            f"this site's backbone has fingerprint {digest[:12]}..., the server's round uses "
            f"{expected_fingerprint[:12]}...; install the federation's backbone checkpoint "
            f"(run config 'backbone' = {cfg.backbone or '<seeded>'!r}) and restart the site"
        )
    return model, digest


def _site_model(
    cfg: RunConfig,
    site_dir: str | Path,
    expected_fingerprint: str,
    global_adapters: Mapping[str, Tensor],
    local_head: LocalHead | Mapping[str, Tensor] | None,
) -> tuple[nn.Module, HeadProvenance | None]:
    """The checked model with the global adapters and the site's own head (a kept head is
    checked against this run first: ``core.federation.local_head``), and what a head trained
    on it is for (None when the run keeps no head at the site).

    A site that keeps its head but has none yet starts from the run's initial head (seeded,
    the same on every machine and at the server), never from the values a reply or the
    coordinator put in the local part: a lying site or coordinator cannot seed another site's
    head that way.
    """
    model, digest = _checked_model(cfg, expected_fingerprint)
    keeps = cfg.keeps_local_head
    provenance = head_provenance(cfg, model, digest, site_dir) if keeps else None
    if keeps and not local_head:
        local_head = local_part(cfg, adapter_state(model))
    load_adapter_state(model, with_local_head(cfg, global_adapters, local_head, provenance))
    return model, provenance


def fresh_seed() -> int:
    """63 bits from the OS CSPRNG: a seed nothing outside the site can know or choose."""
    return int.from_bytes(os.urandom(8), "big") >> 1


def secure_noise_available() -> bool:
    """Opacus ``secure_mode`` (noise from a CSPRNG) needs ``torchcsprng``; used when present."""
    return importlib.util.find_spec("torchcsprng") is not None


def he_capacity_problem(
    secret_context: Path, global_adapters: Mapping[str, Tensor], num_examples: int
) -> str:
    """Why an update of this site could not be encrypted ("" when it can), checked before
    training so no budget is spent on an update that cannot be sent.

    The update is weighted by ``num_examples`` before encryption; with weights of magnitude
    ``max(1, max |global|)`` that must stay within the context's per-site capacity
    (``core.he.ckks.CkksContext.max_abs_per_site``).
    """
    from core.he.ckks import CkksError, load_secret_context, make_layout

    context = load_secret_context(secret_context)
    try:
        make_layout(global_adapters, context)
    except CkksError as err:
        return f"the update cannot be packed for the CKKS context: {err}"
    largest = max([1.0, *(float(v.abs().max()) for v in global_adapters.values() if v.numel())])
    weighted = num_examples * largest
    if weighted > context.max_abs_per_site:
        return (
            f"CKKS capacity: {num_examples} examples x |w| up to {largest:.3g} = {weighted:.4g} is "
            f"above the {context.max_abs_per_site:.4g} one site may encrypt (max_sites="
            f"{context.params.max_sites}, scale 2^{context.params.scale_bits}); the site does "
            "not train (no budget spent). Provision a context with a smaller scale_bits or "
            "max_sites, or train on a subset of the site's data"
        )
    return ""


def _split_head(
    cfg: RunConfig,
    trained: dict[str, Tensor],
    global_adapters: Mapping[str, Tensor],
    provenance: HeadProvenance | None,
) -> tuple[dict[str, Tensor], LocalHead | None]:
    """(what the site sends, what it keeps). With a local head (segmentation: decoder and
    head) the reply carries the global values unchanged, so the wire format and the server's
    average stay as they are while the trained part never leaves the site."""
    if not cfg.keeps_local_head:
        return trained, None
    assert provenance is not None  # _site_model describes the head whenever one is kept
    head = local_part(cfg, trained)
    sent = trained | {k: global_adapters[k].detach().clone() for k in head}
    return sent, LocalHead(head, provenance)


def train_round(
    cfg: RunConfig,
    *,
    site_dir: str | Path,
    global_adapters: Mapping[str, Tensor],
    server_round: int,
    expected_fingerprint: str,
    ledger_state: Mapping[str, Any] | None,
    policy: SitePolicy | None = None,
    last_release: Release | None = None,
    dp_seed: int | None = None,
    cache_dir: str | Path | None = None,
    he_secret_context: Path | None = None,
    local_head: LocalHead | Mapping[str, Tensor] | None = None,
) -> TrainOutcome:
    """One round of local fine-tuning at a site (DP-SGD unless ``cfg.dp`` is False).

    In order: before any data is opened, the site's ``policy`` against the run config and (DP)
    a missing ledger after round 1, refused (the budget would restart from zero). Then, with
    the datalist open (the ledger is checked against its size), a round number already trained
    is refused unless it is the same global model (sha256 of ``global_adapters``), which
    returns ``last_release`` unchanged at no privacy cost; then the policy's noise floor, (HE)
    the CKKS capacity and the budget check, and only then training.

    Sampling and noise under DP come from fresh OS-CSPRNG seeds for every release
    (:func:`fresh_seed`), never from anything the server sends: two releases never share noise.
    ``dp_seed`` fixes them for reproducible benchmarks only; the ClientApp never passes it.
    Without DP the round is seeded from ``cfg.seed`` and ``server_round`` (reproducible runs).
    ``cache_dir``: the site's preprocessing cache folder (see :func:`open_split`).
    ``he_secret_context``: the site's secret CKKS context file (``cfg.he``; the site's own, see
    ``core.federation.sites.SiteRef.secret_context``), to check the capacity before training.
    ``local_head``: with ``cfg.keeps_local_head``, the head (under "shared+local" the personal
    read-out) this site trained last round
    (None: start from the global head; a :class:`LocalHead` read from the site's state is
    refused, before any data is opened, when it was trained for another run); the outcome's
    ``local_head`` is the one to keep, with its provenance.
    """
    policy = policy or SitePolicy()
    refusal = check_run(cfg, policy, server_round)
    if refusal:
        log.warning("round %d refused: %s", server_round, refusal)
        return TrainOutcome(REFUSED, refusal, None, {NUM_EXAMPLES: 0})
    digest = tensors_digest(dict(global_adapters))
    if cfg.dp and not ledger_state and server_round > 1:
        reason = (
            f"no privacy ledger found at round {server_round}: this site's ledger from earlier "
            "rounds is missing, and starting a new one would restart its epsilon from zero. "
            "Restore the site's state folder (privacy-ledger.json) and resend the round"
        )
        log.warning("round %d refused: %s", server_round, reason)
        return TrainOutcome(REFUSED, reason, None, {NUM_EXAMPLES: 0})

    model, provenance = _site_model(
        cfg, site_dir, expected_fingerprint, global_adapters, local_head
    )
    dataset = open_task_split(cfg, site_dir, "training", cache_dir)
    settings = cfg.training()
    device = pick_device(cfg.device)

    he_problem = ""
    if cfg.he:
        if he_secret_context is None:
            raise ValueError(
                "he = true but no he_secret_context was given: pass the site's file "
                "(core.federation.sites.SiteRef.secret_context())"
            )
        he_problem = he_capacity_problem(he_secret_context, global_adapters, len(dataset))
    if not cfg.dp:
        if he_problem:
            log.warning("round %d refused: %s", server_round, he_problem)
            return TrainOutcome(REFUSED, he_problem, None, {NUM_EXAMPLES: 0})
        seed = cfg.seed * 1_000_003 + server_round
        generator = torch.Generator().manual_seed(seed % 2**63)  # batch sampling
        torch.manual_seed((seed * 7_919) % 2**63)  # dropout
        result = train_plain(
            model,
            dataset,
            settings,
            device=device,
            generator=generator,
            amp=True,
            criterion=task_loss(cfg),
        )
        metrics = {TRAIN_LOSS: result.loss, NUM_EXAMPLES: result.num_examples}
        sent, head = _split_head(cfg, adapter_state(model), global_adapters, provenance)
        return TrainOutcome(TRAINED, "", sent, metrics, local_head=head)

    ledger = PrivacyLedger.resume_or_start(
        ledger_state, settings=cfg.privacy(), dataset_size=len(dataset)
    )

    def refuse(reason: str, *, replay: bool = False) -> TrainOutcome:
        record = ledger.record_refusal(server_round, reason, global_digest=digest, replay=replay)
        log.warning("round %d refused: %s", server_round, reason)
        metrics = {NUM_EXAMPLES: 0, EPSILON: record.epsilon}
        return TrainOutcome(REFUSED, reason, None, metrics, ledger.to_dict())

    check = ledger.check_round(server_round, digest)
    if check.verdict == "replay":
        kept = last_release
        if kept is None or (kept.server_round, kept.global_digest) != (server_round, digest):
            return refuse(
                f"{check.reason}, but the site no longer keeps that release (it keeps only its "
                "last one); the round is refused instead of trained twice",
                replay=True,
            )
        ledger.record_replay(server_round, digest, check.reason)
        log.info("round %d: %s", server_round, check.reason)
        return TrainOutcome(
            TRAINED,
            check.reason,
            dict(kept.adapters),
            dict(kept.metrics),
            ledger.to_dict(),
            replayed=True,
        )
    if check.verdict == "refuse":
        return refuse(check.reason, replay=True)

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
    problem = check_noise(policy, plan.noise_multiplier)
    if problem:
        return refuse(problem)
    if he_problem:
        return refuse(he_problem)
    decision = ledger.check_budget(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    if not decision.allowed:
        return refuse(decision.reason)

    step_plan = DPStepPlan(
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        sample_rate=plan.sample_rate,
        steps=plan.steps_per_round,
        secure_mode=secure_noise_available(),
    )
    sampling_seed, noise_seed = (
        (fresh_seed(), fresh_seed()) if dp_seed is None else (dp_seed, dp_seed * 7_919)
    )
    generator = torch.Generator().manual_seed(sampling_seed % 2**63)  # Poisson sampling
    torch.manual_seed(noise_seed % 2**63)  # DP noise (Opacus non-secure mode) and dropout
    result = train_dp(
        model,
        dataset,
        settings,
        step_plan,
        device=device,
        generator=generator,
        criterion=task_loss(cfg),
    )
    # train_dp takes exactly plan.steps_per_round steps: what the budget check projected.
    record = ledger.record_round(
        server_round, plan.noise_multiplier, plan.sample_rate, result.steps, global_digest=digest
    )
    # No training loss: computed on the data outside the DP mechanism, it is not covered.
    metrics = {
        NUM_EXAMPLES: result.num_examples,
        EPSILON: record.epsilon,
        "delta": cfg.target_delta,
        "noise-multiplier": plan.noise_multiplier,
        "sample-rate": plan.sample_rate,
        "steps": result.steps,
    }
    adapters, head = _split_head(cfg, adapter_state(model), global_adapters, provenance)
    release = Release(server_round, digest, adapters, metrics)
    return TrainOutcome(
        TRAINED, "", adapters, metrics, ledger.to_dict(), release=release, local_head=head
    )


def evaluate_round(
    cfg: RunConfig,
    *,
    site_dir: str | Path,
    global_adapters: Mapping[str, Tensor],
    expected_fingerprint: str,
    split: str = "validation",
    calibration_split: str = "validation",
    cache_dir: str | Path | None = None,
    local_head: LocalHead | Mapping[str, Tensor] | None = None,
) -> dict[str, float]:
    """Evaluate the global adapters (with the site's ``local_head`` when it keeps one: its
    head under head-sharing "local", its personal read-out under "shared+local") on the site's
    held-out ``split``.

    Under head-sharing "local" the metrics say which head they come from (``LOCAL_HEAD``: 1
    the site's own, 0 the untrained initial global head of a site that has not trained yet),
    so that the coordinator does not present the initial head's numbers as the site's model.
    Under "shared+local" a site without a personal read-out yet scores with the trained shared
    head alone, the federated model itself, so there is nothing to flag.

    For a binary single-label task the site picks its own decision threshold on
    ``calibration_split`` (the one maximising balanced accuracy there; sites differ in
    prevalence, so one shared head bias cannot serve them all) and reports balanced accuracy,
    sensitivity and specificity at that threshold. The threshold itself stays at the site:
    only these rates are returned. Other tasks report the argmax / 0.5 rates of ``evaluate``.
    Segmentation reports Dice and HD95 (``core.federation.segmentation``).
    """
    model, _ = _site_model(cfg, site_dir, expected_fingerprint, global_adapters, local_head)
    own = {LOCAL_HEAD: float(bool(local_head))} if cfg.head_sharing == "local" else {}
    if cfg.task == "segmentation":
        from core.federation.segmentation import evaluate_segmentation_model

        return evaluate_segmentation_model(cfg, model, site_dir, split) | own
    device = pick_device(cfg.device)
    logits, labels = predict(
        model,
        open_split(cfg, site_dir, split, cache_dir),
        batch_size=cfg.max_physical_batch,
        device=device,
    )
    metrics = metrics_from_logits(logits, labels, multi_label=cfg.multi_label) | own
    if cfg.multi_label or cfg.num_classes != 2:
        return metrics
    if calibration_split == split:
        calibration = (logits, labels)
    else:
        calibration = predict(
            model,
            open_split(cfg, site_dir, calibration_split, cache_dir),
            batch_size=cfg.max_physical_batch,
            device=device,
        )
    try:
        threshold = calibrate_threshold(binary_scores(calibration[0]), calibration[1])
    except ValueError as err:  # one class only in the calibration split: keep argmax rates
        log.warning("site %s: no calibrated threshold (%s)", Path(site_dir).name, err)
        return metrics
    return metrics | rates_at_threshold(binary_scores(logits), labels, threshold)
