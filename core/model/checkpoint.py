"""Backbone checkpoints as safetensors, with a content fingerprint.

Every site must fine-tune adapters on the *same* frozen backbone, or averaging adapters is
meaningless. The fingerprint (sha256 over the architecture config, then the tensors in sorted
key order, including names, dtypes and shapes) lets the server announce which backbone a round
uses and a site prove it holds exactly that one. The config is covered because the same tensors
compute a different function under another config (number of heads, RoPE, norm epsilon). The
head-input references (:mod:`core.model.reference`) are stored beside the weights as
``reference.<pool>.*`` tensors and covered by the same fingerprint.

Files of the first format (``fedmedvit-backbone-v1``) recorded a digest of the tensors only;
they are still read (that digest checks their integrity) and get the same fingerprint as the
current format would give them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor

from core.io import atomic_path
from core.model.reference import ReferenceError, split_state
from core.model.sizes import ViTConfig
from core.model.vit import UniversalViT

CHECKPOINT_FORMAT = "fedmedvit-backbone-v2"
FIRST_CHECKPOINT_FORMAT = "fedmedvit-backbone-v1"  # tensors-only digest: read, never written


class BackboneError(ValueError):
    """A backbone checkpoint is unreadable, incomplete or not the one the federation uses."""


def backbone_state(model: UniversalViT) -> dict[str, Tensor]:
    """The frozen part of the model: everything but the task head, plus its head-input
    references (``reference.<pool>.shift`` / ``.projection``)."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    for pool, reference in sorted(model.references.items()):
        state |= reference.to_state(pool)
    return state


def fingerprint(state: Mapping[str, Tensor], config: ViTConfig) -> str:
    """sha256 over the config (canonical JSON) and (name, dtype, shape, bytes) of every tensor,
    in sorted key order."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    _hash_tensors(digest, state)
    return digest.hexdigest()


def tensors_digest(state: Mapping[str, Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted key order: a set of
    tensors without an architecture (adapters), and what the first backbone format recorded."""
    digest = hashlib.sha256()
    _hash_tensors(digest, state)
    return digest.hexdigest()


def _hash_tensors(digest: hashlib._Hash, state: Mapping[str, Tensor]) -> None:
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def save_backbone(model: UniversalViT, path: str | Path) -> str:
    """Write the backbone (no head) and its config; returns the fingerprint."""
    state = {k: v.detach().cpu().contiguous() for k, v in backbone_state(model).items()}
    digest = fingerprint(state, model.config)
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "config": json.dumps(model.config.to_dict()),
        "fingerprint": digest,
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return digest


def read_backbone_metadata(path: str | Path) -> tuple[ViTConfig, str, str]:
    """Config, recorded digest and format of a checkpoint, without loading the tensors."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"backbone checkpoint {path} does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise BackboneError(f"{path} is not a readable safetensors file: {err}") from err
    if metadata.get("format") not in (CHECKPOINT_FORMAT, FIRST_CHECKPOINT_FORMAT):
        raise BackboneError(
            f"{path} has format {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}; "
            "write it with core.model.checkpoint.save_backbone (or import it with "
            "core.model.convert)"
        )
    config = ViTConfig.from_dict(json.loads(metadata["config"]))
    return config, metadata["fingerprint"], metadata["format"]


def load_backbone(
    path: str | Path, *, num_classes: int = 0, expected_fingerprint: str | None = None
) -> tuple[UniversalViT, str]:
    """Build the model from a checkpoint and verify its content; returns (model, fingerprint).

    Raises BackboneError when the tensors do not hash to the recorded fingerprint (a corrupt
    file) or to ``expected_fingerprint`` (a different backbone than the federation's).
    """
    config, recorded, file_format = read_backbone_metadata(path)
    state = load_file(str(path))
    actual = fingerprint(state, config)
    stored = actual if file_format == CHECKPOINT_FORMAT else tensors_digest(state)
    if stored != recorded:
        raise BackboneError(
            f"{path} is corrupt: its content hashes to {stored[:12]}..., the file records "
            f"{recorded[:12]}...; copy the checkpoint again"
        )
    if expected_fingerprint is not None and actual != expected_fingerprint:
        raise BackboneError(
            f"backbone {path} has fingerprint {actual[:12]}..., but the federation uses "
            f"{expected_fingerprint[:12]}...; install the coordinator's backbone checkpoint"
        )
    try:
        weights, references = split_state(state)
    except ReferenceError as err:
        raise BackboneError(f"{path}: {err}") from err
    model = UniversalViT(config)
    model.references = references
    model.reset_head(num_classes)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise BackboneError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    return model, actual
