"""The pretraining loop: resumable steps whose batches and masks are pure functions of
(seed, step), and its checkpoints."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.data import DABatchSampler, collate
from core.io import atomic_path
from core.model.checkpoint import save_backbone
from core.model.reference import (
    FeatureReference,
    ReferenceError,
    fit_reference,
    pooled_features,
)
from core.model.sac import batch_degree_of_anisotropy
from core.model.sizes import ViTConfig
from core.model.vit import UniversalViT
from core.pretrain.data import (
    ImageData,
)
from core.pretrain.model import (
    MaskedImageModel,
    depth_patch_size,
    random_token_mask,
)
from core.pretrain.settings import (
    CHECKPOINT_FORMAT,
    MIMSettings,
    PretrainError,
)


def _step_seed(seed: int, step: int, stream: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + stream) % (2**63)


def batch_order(das: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a pure function of (seed, epoch), so resuming mid-epoch
    recomputes the same order and skips what was done."""
    generator = torch.Generator().manual_seed(_step_seed(seed, epoch, 1))
    return list(DABatchSampler(das, batch_size, shuffle=True, generator=generator))


def batches_from(pool: ImageData, settings: MIMSettings, start: int) -> Iterator[list[int]]:
    """Batch indices for steps ``start, start + 1, ...`` (epochs follow each other)."""
    per_epoch = len(DABatchSampler(pool.das, settings.batch_size))
    epoch, position = divmod(start, per_epoch)
    while True:
        order = batch_order(pool.das, settings.batch_size, settings.seed, epoch)
        yield from order[position:]
        epoch, position = epoch + 1, 0


def learning_rate(settings: MIMSettings, step: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero at ``total`` steps."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    span = max(total - settings.warmup_steps, 1)
    progress = min((step - settings.warmup_steps) / span, 1.0)
    return settings.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: MaskedImageModel, settings: MIMSettings) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, tokens and the position grid."""
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        flat = param.dim() < 2 or name.endswith(("cls_token", "pos_embed", "mask_token"))
        (plain if flat else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.learning_rate, betas=(0.9, 0.95))


@dataclass
class PretrainState:
    """A run in progress: what a checkpoint holds."""

    model: MaskedImageModel
    optimizer: torch.optim.AdamW
    step: int
    losses: list[float]


def build_state(config: ViTConfig, settings: MIMSettings) -> PretrainState:
    """A fresh run: weights from ``settings.seed`` (bitwise the same on every machine)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = MaskedImageModel(
            UniversalViT(config),
            target_eps=settings.target_eps,
            visible_weight=settings.visible_weight,
        )
    return PretrainState(model, make_optimizer(model, settings), 0, [])


def save_checkpoint(
    path: str | Path, state: PretrainState, settings: MIMSettings, data_signature: str
) -> None:
    """Model, optimizer and step, written atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": state.step,
        "vit_config": state.model.encoder.config.to_dict(),
        "settings": settings.to_dict(),
        "data_signature": data_signature,
        "model": {k: v.detach().cpu() for k, v in state.model.state_dict().items()},
        "optimizer": state.optimizer.state_dict(),
        "losses": list(state.losses),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(
    path: str | Path,
    *,
    config: ViTConfig | None = None,
    settings: MIMSettings | None = None,
    data_signature: str | None = None,
    device: torch.device | None = None,
) -> tuple[PretrainState, ViTConfig, MIMSettings]:
    """Rebuild a run from a checkpoint; given ``config``/``settings``/``data_signature`` must
    match what the checkpoint was trained with (a mismatch names the differing field)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainError(f"checkpoint {path} does not exist; check --resume")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged or foreign file
        raise PretrainError(f"{path} is not a readable pretraining checkpoint: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise PretrainError(
            f"{path} has format {found!r}, expected {CHECKPOINT_FORMAT!r}; resume from a "
            "checkpoint written by core.pretrain"
        )
    saved_config = ViTConfig.from_dict(payload["vit_config"])
    # Checkpoints from before visible_weight were trained with masked tokens only (SimMIM).
    saved_settings = MIMSettings(**{"visible_weight": 0.0, **payload["settings"]})
    if config is not None:
        _require_equal(path, "model config", config.to_dict(), saved_config.to_dict())
    if settings is not None:
        _require_equal(path, "settings", settings.to_dict(), saved_settings.to_dict())
    if data_signature is not None and data_signature != payload["data_signature"]:
        raise PretrainError(
            f"{path} was trained on other data (signature {payload['data_signature'][:12]}..., "
            f"now {data_signature[:12]}...); resume with the same --data and --splits"
        )
    state = build_state(saved_config, saved_settings)
    state.model.load_state_dict(payload["model"])
    if device is not None:
        state.model.to(device)
    state.optimizer = make_optimizer(state.model, saved_settings)
    state.optimizer.load_state_dict(payload["optimizer"])
    state.step = int(payload["step"])
    state.losses = [float(v) for v in payload["losses"]]
    return state, saved_config, saved_settings


def _require_equal(
    path: Path, what: str, wanted: Mapping[str, Any], saved: Mapping[str, Any]
) -> None:
    for key in sorted(set(wanted) | set(saved)):
        if wanted.get(key) != saved.get(key):
            raise PretrainError(
                f"{path}: {what} field {key!r} is {saved.get(key)!r} in the checkpoint but "
                f"{wanted.get(key)!r} now; resume with the original value or start a new run"
            )


def _augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random in-plane flips per sample. images: (N, C, D, H, W) -> same shape."""
    flips = torch.rand(images.shape[0], 2, generator=generator) < 0.5  # (N, 2): H, W
    flip_h = flips[:, 0].view(-1, 1, 1, 1, 1).to(images.device)
    flip_w = flips[:, 1].view(-1, 1, 1, 1, 1).to(images.device)
    images = torch.where(flip_h, images.flip(3), images)
    return torch.where(flip_w, images.flip(4), images)


def train_steps(
    state: PretrainState,
    pool: ImageData,
    settings: MIMSettings,
    *,
    total_steps: int,
    device: torch.device,
    until: int | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 0,
    log_every: int = 10,
    log: Callable[[str], None] = print,
) -> PretrainState:
    """Advance the run from ``state.step`` to ``until`` (default ``total_steps``); the LR
    schedule spans ``total_steps``. Writes a checkpoint every ``checkpoint_every`` steps and at
    the end when ``checkpoint`` is set."""
    stop = total_steps if until is None else min(until, total_steps)
    model = state.model.to(device).train()
    use_amp = device.type == "cuda"
    signature = pool.signature()
    batches = batches_from(pool, settings, state.step)
    start_time, start_step = time.perf_counter(), state.step
    running: float | None = None
    while state.step < stop:
        indices = next(batches)
        step_rng = torch.Generator().manual_seed(_step_seed(settings.seed, state.step, 2))
        batch = collate([pool[i] for i in indices])
        images = batch["image"]  # (N, C, D, H, W)
        if settings.flip:
            images = _augment(images, step_rng)
        n, _, d, h, w = images.shape
        depth_patch = depth_patch_size(model.patch, batch_degree_of_anisotropy(batch["spacing"]))
        tokens = (d // depth_patch) * (h // model.patch) * (w // model.patch)
        mask = random_token_mask(n, tokens, settings.mask_ratio, step_rng)  # (N, T)
        lr = learning_rate(settings, state.step, total_steps)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = model(images.to(device), batch["spacing"], mask.to(device))
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        state.optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise PretrainError(
                f"loss became {value} at step {state.step}; lower --lr or raise --target-eps"
            )
        state.losses.append(value)
        state.step += 1
        running = value if running is None else 0.9 * running + 0.1 * value
        if log_every and (state.step % log_every == 0 or state.step == stop):
            rate = (state.step - start_step) / max(time.perf_counter() - start_time, 1e-9)
            eta = (stop - state.step) / max(rate, 1e-9)
            log(
                f"step {state.step}/{total_steps}  loss {value:.4f}  (smoothed {running:.4f})  "
                f"lr {lr:.2e}  {rate:.1f} steps/s  eta {eta:.0f} s"
            )
        if checkpoint and checkpoint_every and state.step % checkpoint_every == 0:
            save_checkpoint(checkpoint, state, settings, signature)
    if checkpoint:
        save_checkpoint(checkpoint, state, settings, signature)
    return state


REFERENCE_POOL = "stats"  # the run config's default head-pool


def reference_of(encoder: UniversalViT, pool: ImageData) -> FeatureReference:
    """The head-input reference of the pretrained encoder over its own pretraining images,
    unlabeled (:mod:`core.model.reference`); batches of 16 that share one DA, in pool order."""
    batches = (
        (batch["image"], batch["spacing"])
        for batch in (
            collate([pool[i] for i in indices])
            for indices in DABatchSampler(pool.das, batch_size=16, shuffle=False)
        )
    )
    return fit_reference(pooled_features(encoder, batches, REFERENCE_POOL))


@dataclass(frozen=True)
class PretrainOutcome:
    fingerprint: str
    steps: int
    first_loss: float
    last_loss: float  # mean of the last 10 steps
    seconds: float


def pretrain(
    pool: ImageData,
    *,
    out: str | Path,
    config: ViTConfig,
    settings: MIMSettings,
    steps: int,
    device: torch.device,
    resume: str | Path | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
    log_every: int = 10,
    log: Callable[[str], None] = print,
) -> PretrainOutcome:
    """Pretrain (or resume) to ``steps`` and write the backbone with ``save_backbone``."""
    if steps < 1:
        raise PretrainError(f"steps must be >= 1, got {steps}")
    start = time.perf_counter()
    if resume is not None:
        state, _, _ = load_checkpoint(
            resume,
            config=config,
            settings=settings,
            data_signature=pool.signature(),
            device=device,
        )
        log(f"resumed {resume} at step {state.step}")
    else:
        state = build_state(config, settings)
    state = train_steps(
        state,
        pool,
        settings,
        total_steps=steps,
        device=device,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        log=log,
    )
    encoder = state.model.encoder  # on ``device``: the reference is fit there (on the CPU)
    try:
        encoder.references = {REFERENCE_POOL: reference_of(encoder, pool)}
    except ReferenceError as err:  # the run config's head-norm "auto" then uses "layer"
        log(f"no head-input reference stored with the backbone: {err}")
    encoder = encoder.cpu()
    digest = save_backbone(encoder, out)
    tail = state.losses[-10:] or [float("nan")]
    return PretrainOutcome(
        fingerprint=digest,
        steps=state.step,
        first_loss=state.losses[0] if state.losses else float("nan"),
        last_loss=sum(tail) / len(tail),
        seconds=time.perf_counter() - start,
    )
