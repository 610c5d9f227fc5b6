"""Self-supervised pretraining of the universal ViT by masked image modelling (SimMIM-style).

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
  token weigh the same), averaged over masked tokens only.

Data: site datalists (labels ignored; items without a label are accepted), pooled into one
:class:`ImagePool` whose batches share a DA; volumes of one DA from different sites are
depth-padded to a common depth as within a site. Training is resumable: the checkpoint holds
model, optimizer and step, and the batch order and masks are pure functions of (seed, step), so
a resumed run is bitwise the uninterrupted one.

CLI (the default demo, without ``--data``, pretrains on freshly generated phantom hospitals)::

    python -m core.pretrain.mim --out backbone.safetensors [--data DIR_OR_DATASET_JSON ...]
        [--size micro] [--steps 1000] [--resume CKPT] [--device auto]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from core.data import DABatchSampler, GridConfig, IntensityConfig, SiteDataset, collate
from core.data.datalist import SPLITS, canonical_split, read_datalist
from core.data.preprocess import pad_depth
from core.io import atomic_path
from core.model.checkpoint import load_backbone, save_backbone
from core.model.sac import batch_degree_of_anisotropy
from core.model.vit import MODEL_SIZES, UniversalViT, ViTConfig
from core.training.loops import pick_device

CHECKPOINT_FORMAT = "fedmedvit-mim-v1"
PHANTOM_PRETRAIN_SEED = 1  # the demo archive; the federation's phantom sites use seed 0


class PretrainError(ValueError):
    """Pretraining cannot start or resume: bad settings, data or checkpoint."""


@dataclass(frozen=True)
class MIMSettings:
    """Everything that shapes a pretraining run except its length (stored in checkpoints)."""

    mask_ratio: float = 0.6
    target_eps: float = 1e-2  # variance floor of the per-patch target normalisation
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    flip: bool = True  # random in-plane flips per sample
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise PretrainError(f"mask-ratio must be in (0, 1), got {self.mask_ratio}")
        if not self.target_eps > 0:
            raise PretrainError(f"target-eps must be > 0, got {self.target_eps}")
        if self.batch_size < 1:
            raise PretrainError(f"batch-size must be >= 1, got {self.batch_size}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise PretrainError(
                f"learning-rate must be a positive number, got {self.learning_rate}"
            )
        if self.weight_decay < 0 or self.warmup_steps < 0 or not self.max_grad_norm > 0:
            raise PretrainError("weight-decay and warmup-steps must be >= 0, max-grad-norm > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------- the model


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

    def __init__(self, encoder: UniversalViT, *, target_eps: float = 1e-2) -> None:
        super().__init__()
        config = encoder.config
        self.encoder = encoder
        self.patch = config.patch_size
        self.channels = config.in_channels
        self.target_eps = target_eps
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
        """Masked-patch reconstruction loss (a scalar). x: (N, C, D, H, W); mask: (N, T) bool."""
        features, da = self.encode(x, spacing, mask)
        depth_patch = depth_patch_size(self.patch, da)
        pred = self.predict(features[:, 1:], depth_patch)  # (N, T, V)
        target = normalized_patches(patchify(x, self.patch, depth_patch).float(), self.target_eps)
        per_token = (pred.float() - target).pow(2).mean(dim=-1)  # (N, T)
        weights = mask.to(per_token.dtype)
        return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


# ------------------------------------------------------------------------------------ the data


class ImageData(Protocol):
    """What pretraining needs of its data (:class:`ImagePool` is the real one)."""

    @property
    def das(self) -> Sequence[int]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Tensor]: ...

    def signature(self) -> str: ...


class ImagePool:
    """Several site datasets as one, with one DA per batch (for pretraining and pooled runs).

    ``das`` is the true DA of each item. Volumes of one DA from different sites may differ in
    depth; they are centre-padded to the deepest of that DA (as a site does within itself), so
    any batch drawn by a DA sampler stacks. In-plane size and channels must agree: open every
    site with the same :class:`GridConfig`.
    """

    def __init__(self, datasets: Sequence[SiteDataset]) -> None:
        if not datasets:
            raise PretrainError("no dataset to pool; pass at least one site with images")
        self.datasets = list(datasets)
        self._index: list[tuple[int, int]] = [
            (i, j) for i, ds in enumerate(self.datasets) for j in range(len(ds))
        ]
        in_plane = {(ds.grid.channels, ds.grid.in_plane) for ds in self.datasets}
        if len(in_plane) != 1:
            raise PretrainError(
                f"sites were opened on different grids (channels, in-plane) {sorted(in_plane)}; "
                "open every site with the same GridConfig"
            )
        self.das: tuple[int, ...] = tuple(self.datasets[i].das[j] for i, j in self._index)
        self.depth_by_da: dict[int, int] = {}
        for ds in self.datasets:
            for da, depth in ds.depth_by_da.items():
                self.depth_by_da[da] = max(depth, self.depth_by_da.get(da, 0))

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        site, item = self._index[index]
        sample = self.datasets[site][item]
        depth = self.depth_by_da[self.das[index]]
        if sample["image"].shape[1] != depth:
            sample = {**sample, "image": pad_depth(sample["image"], depth)}
        return sample

    @property
    def labels(self) -> Tensor:
        """(N,) or (N, K): the items' labels in pool order (fine-tuning uses them)."""
        return torch.stack([self.datasets[site].labels[item] for site, item in self._index])

    @property
    def sites(self) -> tuple[int, ...]:
        """Which dataset each item comes from."""
        return tuple(i for i, _ in self._index)

    def subset(self, indices: Sequence[int]) -> ImagePool:
        """A pool of only these items (e.g. a label fraction), keeping depth padding."""
        chosen = sorted(set(int(i) for i in indices))
        if not chosen or chosen[0] < 0 or chosen[-1] >= len(self):
            raise PretrainError(f"subset indices must lie in [0, {len(self)}) and not be empty")
        clone = object.__new__(ImagePool)
        clone.datasets = self.datasets
        clone._index = [self._index[i] for i in chosen]
        clone.das = tuple(self.das[i] for i in chosen)
        clone.depth_by_da = dict(self.depth_by_da)
        return clone

    def signature(self) -> str:
        """A hash of what batching depends on (count, DA, shape, spacing per item), not paths:
        a resumed run must see the same data to continue the same batch order."""
        digest = hashlib.sha256()
        for i, (site, item) in enumerate(self._index):
            ds = self.datasets[site]
            spacing = ds.spacings[item].tolist()
            digest.update(f"{self.das[i]}|{ds.image_shape(self.das[i])}|{spacing};".encode())
        return digest.hexdigest()


def find_datalists(paths: Sequence[str | Path]) -> list[Path]:
    """Datalist files from paths: a file as is, a folder searched for ``dataset.json`` files."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            lists = sorted(path.rglob("dataset.json"))
            if not lists:
                raise PretrainError(
                    f"{path} holds no dataset.json (searched recursively); pass dataset.json "
                    "files, or generate phantom sites with python -m core.data.phantoms"
                )
            found.extend(lists)
        else:
            raise PretrainError(f"--data {path} does not exist; pass a folder or a dataset.json")
    return found


def open_unlabeled(path: str | Path, split: str, grid: GridConfig) -> SiteDataset:
    """One split of a datalist for pretraining: labels are ignored, and may be missing.

    A ``dataset.json`` without ``num_classes`` or with items lacking ``label`` is accepted (a
    placeholder label 0 is filled in, never used); CSV and npz sites open as usual.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    num_classes: int | None = None
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PretrainError(f"{path} is not readable JSON ({err}); fix its syntax") from err
        if isinstance(doc, dict) and "num_classes" not in doc:
            num_classes = 2
    listing = read_datalist(path, split, num_classes=num_classes)
    placeholder: Any = [0] * listing.info.num_classes if listing.info.multi_label else 0
    entries = tuple(
        e if e.get("label") is not None else {**e, "label": placeholder} for e in listing.entries
    )
    listing = dataclasses.replace(listing, entries=entries)
    return SiteDataset(listing, grid=grid, intensity=IntensityConfig())


def open_pool(
    paths: Sequence[str | Path],
    splits: Sequence[str] = ("training",),
    *,
    grid: GridConfig | None = None,
    log: Callable[[str], None] = print,
) -> ImagePool:
    """Pool the images of the given splits of every datalist (a split a datalist lacks is
    skipped with a note; a datalist with none of them is an error)."""
    grid = grid or GridConfig()
    wanted = [canonical_split(s) for s in splits]
    datasets: list[SiteDataset] = []
    for path in find_datalists(paths):
        opened = 0
        for split in wanted:
            if path.suffix.lower() == ".json" and split not in _json_splits(path):
                log(f"note: {path} has no {split!r} split; skipped")
                continue
            datasets.append(open_unlabeled(path, split, grid))
            opened += 1
        if not opened:
            raise PretrainError(f"{path} has none of the splits {wanted}; choose --splits")
    return ImagePool(datasets)


def _json_splits(path: Path) -> set[str]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PretrainError(f"{path} is not readable JSON ({err}); fix its syntax") from err
    return {k for k in doc if k in SPLITS} if isinstance(doc, dict) else set()


# -------------------------------------------------------------------------------- the training


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
        model = MaskedImageModel(UniversalViT(config), target_eps=settings.target_eps)
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
            "checkpoint written by core.pretrain.mim"
        )
    saved_config = ViTConfig.from_dict(payload["vit_config"])
    saved_settings = MIMSettings(**payload["settings"])
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
    encoder = state.model.encoder.cpu()
    digest = save_backbone(encoder, out)
    tail = state.losses[-10:] or [float("nan")]
    return PretrainOutcome(
        fingerprint=digest,
        steps=state.step,
        first_loss=state.losses[0] if state.losses else float("nan"),
        last_loss=sum(tail) / len(tail),
        seconds=time.perf_counter() - start,
    )


def demo_backbone(
    cache: str | Path, *, size: str = "micro", steps: int = 1000, seed: int = 0
) -> tuple[Path, str]:
    """The demo backbone: ``size`` pretrained for ``steps`` on the unlabeled phantom archive.

    Built once under ``cache`` (a folder named by size, steps and seed) and reused: the
    federated demo and the benchmarks start from it. Returns (path, fingerprint), the
    file checked against the fingerprint recorded when it was built.
    """
    folder = Path(cache) / f"backbone-{size}-steps{steps}-seed{seed}"
    out = folder / "backbone.safetensors"
    marker = folder / "fingerprint.txt"
    if not marker.is_file():
        started = time.perf_counter()
        args = ["--out", str(out), "--size", size, "--steps", str(steps), "--seed", str(seed)]
        code = main([*args, "--log-every", str(max(1, steps // 5))])
        if code:
            raise PretrainError(f"pretraining the demo backbone into {folder} failed (exit {code})")
        marker.write_text(load_backbone(out)[1] + "\n")
        print(f"pretrained the demo backbone in {time.perf_counter() - started:.0f} s", flush=True)
    _, digest = load_backbone(out, expected_fingerprint=marker.read_text().strip())
    return out, digest


# --------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core.pretrain.mim",
        description="Masked-image-modelling pretraining of the universal ViT on unlabeled images.",
    )
    parser.add_argument(
        "--data",
        nargs="*",
        default=None,
        help="folders (searched for dataset.json) or datalist files; omitted: generate phantom "
        "hospitals (the demo)",
    )
    parser.add_argument(
        "--splits",
        default=None,
        help="comma-separated splits to read (default: training; all for generated phantoms)",
    )
    parser.add_argument("--out", required=True, type=Path, help="backbone .safetensors to write")
    parser.add_argument("--size", default="micro", choices=sorted(MODEL_SIZES))
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--in-plane", type=int, default=64, help="in-plane grid size (x16)")
    parser.add_argument("--steps", type=int, default=1000, help="total optimizer steps")
    parser.add_argument("--batch-size", type=int, default=MIMSettings.batch_size)
    parser.add_argument("--lr", type=float, default=MIMSettings.learning_rate)
    parser.add_argument("--mask-ratio", type=float, default=MIMSettings.mask_ratio)
    parser.add_argument("--target-eps", type=float, default=MIMSettings.target_eps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (1 is fastest on a busy machine)"
    )
    parser.add_argument("--resume", type=Path, default=None, help="checkpoint to continue from")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="where to write resumable checkpoints (default: OUT with suffix .pretrain.pt)",
    )
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument(
        "--phantoms", type=Path, default=None, help="demo: keep generated phantoms in this folder"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; use --device auto or cpu")
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or args.out.with_suffix(".pretrain.pt")
    try:
        config = dataclasses.replace(MODEL_SIZES[args.size], in_channels=args.in_channels)
        grid = GridConfig(
            in_plane=(args.in_plane, args.in_plane),
            patch=config.patch_size,
            channels=args.in_channels,
        )
        settings = MIMSettings(
            mask_ratio=args.mask_ratio,
            target_eps=args.target_eps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            seed=args.seed,
        )
        with tempfile.TemporaryDirectory(prefix="pretrain-phantoms-") as scratch:
            if args.data is None:
                from core.data.phantoms import generate_hospitals

                folder = args.phantoms or Path(scratch)
                paths: list[Path] = generate_hospitals(
                    folder, "default", seed=PHANTOM_PRETRAIN_SEED, overwrite=True
                )
                splits = args.splits.split(",") if args.splits else list(SPLITS)
                print(f"generated {len(paths)} phantom sites in {folder} (labels ignored)")
            else:
                paths = [Path(p) for p in args.data]
                splits = args.splits.split(",") if args.splits else ["training"]
            pool = open_pool(paths, splits, grid=grid)
        counts = {da: pool.das.count(da) for da in sorted(set(pool.das))}
        print(
            f"pretraining {args.size} on {len(pool)} images (count per DA {counts}), "
            f"{args.steps} steps on {device}",
            flush=True,
        )
        outcome = pretrain(
            pool,
            out=args.out,
            config=config,
            settings=settings,
            steps=args.steps,
            device=device,
            resume=args.resume,
            checkpoint=checkpoint,
            checkpoint_every=args.checkpoint_every,
            log_every=args.log_every,
            log=lambda line: print(line, flush=True),
        )
    except (PretrainError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out} after {outcome.steps} steps in {outcome.seconds:.0f} s "
        f"(loss {outcome.first_loss:.3f} -> {outcome.last_loss:.3f}); checkpoint {checkpoint}"
    )
    print(f"fingerprint: {outcome.fingerprint}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
