"""The head a site keeps under head-sharing "local" (FedPer) or "shared+local" (FedRoD-style),
with what it was trained for.

The "head" is the part of the model a site personalises (:func:`local_prefixes`): under
"local", a classifier's head or a segmentation model's decoder and segmentation head (one
decoder cannot serve a hypodense CT lesion, a bright MR lesion and an X-ray nodule at once),
and only the LoRA adapters are averaged; under "shared+local", a classifier's personal
read-out (``head.personal``, whose logits add to the averaged ``head.fc``'s).

A classifier head reads features of one backbone, pooled one way (``head-pool``) and
conditioned one way (``head-norm`` as resolved: "auto" becomes "reference" or "layer" by the
backbone), for one task and number of classes. A head of the same shapes from another run
loads without complaint and scores with weights fitted to other features (so does a decoder
fitted to another backbone or site), so the kept file records its
provenance (:class:`HeadProvenance`, in the safetensors metadata) and a site refuses a head
whose record differs from its run, naming the file, each differing field (stored vs current)
and the fix. Nothing here deletes or overwrites a kept head.

A head file without the record (written before heads carried one) is refused as well: its
shapes match every run with the same number of classes, so shapes cannot tell a stale head
from a current one, and accepting it would keep exactly the silent reuse the record exists to
stop. Removing it costs the site its head for one round (it restarts from the global head).

The ClientApp (``client.app``) and ``fedmedvit explain`` (``client.explain``) read and write
heads only through :class:`LocalHead`; :func:`with_local_head` puts one on the adapters.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
from torch import Tensor, nn

from core.config import ConfigError, RunConfig
from core.federation.sites import DATALIST, LOCAL_HEAD_FILES
from core.model.segmentation import SEGMENTATION_TRAINABLE

# What a site keeps under head-sharing "local", by task: adapter-state key prefixes.
LOCAL_PREFIXES = {
    "classification": ("head.",),
    "segmentation": tuple(f"{module}." for module in SEGMENTATION_TRAINABLE),
}
# What it keeps under "shared+local" (a classifier only): its personal read-out.
PERSONAL_PREFIXES = ("head.personal.",)
# The same, in words, for the run's README and the privacy report.
LOCAL_PART_NAMES = {"classification": "head", "segmentation": "decoder and segmentation head"}
PERSONAL_PART_NAME = "personal head"
HEAD_FORMAT = "fedmedvit.local-head"
HEAD_VERSION = 2  # 2: the datalist digest
# Where a site's state folder is set, for the fix in an error message.
STATE_DIR_HINT = (
    "point the site's state folder elsewhere (node config 'state-dir'; run config "
    "'state-root' in a simulation; --state-dir for fedmedvit explain)"
)


class LocalHeadError(ConfigError):
    """A kept head that does not belong to this run (or cannot be shown to); names the file."""


@dataclass(frozen=True)
class HeadProvenance:
    """What a site's head was trained for; stored as string metadata beside its tensors."""

    backbone_fingerprint: str  # core.model.checkpoint.fingerprint of the frozen backbone
    # How a classifier head reads the backbone; "" for a segmentation decoder (it reads encoder
    # blocks the backbone's depth fixes, and its width shows in its shapes).
    head_pool: str
    head_norm: str  # as resolved on the backbone, never "auto"
    num_classes: int
    task: str
    # sha256 of the site's dataset.json (its cases, labels and class names): a head fitted to
    # other data (another datalist, labels swapped) is not this site's head. Stays at the site.
    datalist_digest: str = ""
    version: int = HEAD_VERSION

    def to_metadata(self) -> dict[str, str]:
        return {"format": HEAD_FORMAT} | {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], *, source: str) -> HeadProvenance | None:
        """The record in a head file's metadata; None when it has none (an older file).

        Raises:
            LocalHeadError: a record that is not this format, or misses a field.
        """
        if "format" not in metadata:
            return None
        try:
            if metadata["format"] != HEAD_FORMAT:
                raise ValueError(f"format {metadata['format']!r}, expected {HEAD_FORMAT!r}")
            values: dict[str, Any] = {f.name: metadata[f.name] for f in fields(cls)}
            values["num_classes"], values["version"] = (
                int(values["num_classes"]),
                int(values["version"]),
            )
            return cls(**values)
        except (KeyError, ValueError) as err:
            raise LocalHeadError(
                f"{source}: not a local head written by fedmedvit ({err}); remove it to start "
                f"the site's head from the global head, or {STATE_DIR_HINT}"
            ) from err

    def differences(self, current: HeadProvenance) -> list[str]:
        """One "field: stored X, current Y" per field that differs."""
        return [
            f"{_LABELS[f.name]}: stored {getattr(self, f.name)!r}, current "
            f"{getattr(current, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(current, f.name)
        ]


_LABELS = {
    "backbone_fingerprint": "backbone fingerprint",
    "head_pool": "head-pool",
    "head_norm": "head-norm (resolved)",
    "num_classes": "num-classes",
    "task": "task",
    "datalist_digest": "the site's dataset.json (sha256)",
    "version": "format version",
}


def head_provenance(
    cfg: RunConfig, model: nn.Module, backbone_fingerprint: str, site_dir: str | Path
) -> HeadProvenance:
    """What a head of ``model`` (``core.federation.rounds.build_lora_model(cfg)``, whose
    backbone has ``backbone_fingerprint``) trained on the site at ``site_dir`` is for; head-norm
    as the model resolved it. An unreadable dataset.json gives an empty digest (the site's
    datalist check reports it when the data is opened)."""
    pool, norm = "", ""
    if cfg.task == "classification":
        wrapped: Any = model  # a peft PeftModel around the UniversalViT
        base: Any = wrapped.get_base_model() if hasattr(wrapped, "get_base_model") else wrapped
        pool, norm = str(base.config.pool), str(base.config.head_norm)
    return HeadProvenance(
        backbone_fingerprint=backbone_fingerprint,
        head_pool=pool,
        head_norm=norm,
        num_classes=cfg.num_classes,
        task=cfg.task,
        datalist_digest=_datalist_digest(Path(site_dir) / DATALIST),
    )


def _datalist_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


@dataclass(frozen=True)
class LocalHead:
    """A site's head: its tensors (:func:`local_part` keys), its provenance (None: a file
    written before heads carried one) and where it was read from (for error messages)."""

    tensors: dict[str, Tensor]
    provenance: HeadProvenance | None
    source: str = "this round's training"

    def to_bytes(self) -> bytes:
        """safetensors bytes, the provenance as metadata (a head without one is never written)."""
        if self.provenance is None:
            raise ValueError(f"{self.source}: a head is written only with its provenance")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        return safetensors.torch.save(tensors, metadata=self.provenance.to_metadata())

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str) -> LocalHead:
        """Inverse of :meth:`to_bytes`; also reads a head written without provenance.

        Raises:
            LocalHeadError: unreadable bytes or a malformed record, naming ``source``.
        """
        try:
            # safetensors: an 8-byte little-endian header length, then the JSON header.
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
            tensors = safetensors.torch.load(data)
        except (ValueError, safetensors.SafetensorError) as err:
            raise LocalHeadError(
                f"{source}: not a safetensors head ({err}); remove it to start the site's head "
                f"from the global head, or {STATE_DIR_HINT}"
            ) from err
        metadata = header.get("__metadata__") or {}
        return cls(tensors, HeadProvenance.from_metadata(metadata, source=source), source)

    @classmethod
    def read(cls, state_dir: Path, task: str) -> LocalHead | None:
        """The ``task``'s head kept in a site's state folder (:data:`LOCAL_HEAD_FILES`), None
        if none."""
        path = state_dir / LOCAL_HEAD_FILES[task]
        return cls.from_bytes(path.read_bytes(), source=str(path)) if path.is_file() else None

    def checked(self, current: HeadProvenance) -> dict[str, Tensor]:
        """The tensors, when the head was trained for ``current``.

        Raises:
            LocalHeadError: no provenance, or one that differs, naming the file, each
                differing field (stored vs current) and the fix.
        """
        if self.provenance is None:
            raise LocalHeadError(
                f"{self.source} predates local-head provenance (it was written before heads "
                "recorded their backbone, head-pool, head-norm, num-classes and task), so it "
                "cannot be shown to belong to this run and is not used. Remove it (the site's "
                f"head restarts from the global head), or {STATE_DIR_HINT}"
            )
        differences = self.provenance.differences(current)
        if differences:
            raise LocalHeadError(
                f"{self.source} was trained for another run ({'; '.join(differences)}) and is "
                "not used: its scores would come from weights fitted to other features. Remove "
                f"it (the site's head restarts from the global head), or {STATE_DIR_HINT}"
            )
        return self.tensors


def local_prefixes(cfg: RunConfig) -> tuple[str, ...]:
    """Adapter-state key prefixes of the part a site keeps under ``cfg`` (none when it keeps
    nothing: head-sharing "shared")."""
    if not cfg.keeps_local_head:
        return ()
    return PERSONAL_PREFIXES if cfg.has_personal_head else LOCAL_PREFIXES[cfg.task]


def local_part_name(cfg: RunConfig) -> str:
    """The part a site keeps, in words (for a run's README and the privacy report)."""
    return PERSONAL_PART_NAME if cfg.has_personal_head else LOCAL_PART_NAMES[cfg.task]


def is_local(cfg: RunConfig, key: str) -> bool:
    """Whether the adapter-state ``key`` belongs to the part a site keeps under ``cfg``."""
    prefixes = local_prefixes(cfg)
    return bool(prefixes) and key.startswith(prefixes)


def local_part(cfg: RunConfig, adapters: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of ``adapters`` a site keeps (none unless ``cfg.keeps_local_head``)."""
    return {k: v for k, v in adapters.items() if is_local(cfg, k)}


def _classifier_mode_of(kept: Mapping[str, object]) -> str | None:
    """The head-sharing mode a classifier's kept head was written under, by its keys: only
    the personal read-out ("shared+local") or the whole head ("local"); None otherwise."""
    if kept and all(k.startswith(PERSONAL_PREFIXES) for k in kept):
        return "shared+local"
    whole = LOCAL_PREFIXES["classification"]
    if all(k.startswith(whole) for k in kept) and any(k.startswith("head.fc.") for k in kept):
        return "local"
    return None


def with_local_head(
    cfg: RunConfig,
    global_adapters: Mapping[str, Tensor],
    local_head: LocalHead | Mapping[str, Tensor] | None,
    current: HeadProvenance | None = None,
) -> dict[str, Tensor]:
    """The adapters a site trains and evaluates: the global ones, with the site's own head
    when ``cfg.keeps_local_head`` and it has one (head-sharing "local", FedPer: Arivazhagan et
    al., 2019; "shared+local": its personal head beside the global shared one).

    ``local_head``: a :class:`LocalHead` (read from a site's state, or kept from training) is
    checked against ``current`` (:func:`head_provenance`; required then); a plain mapping is a
    head this process trained itself (benchmarks, tests) and only its shapes are checked.

    Raises:
        LocalHeadError: a head of another run (provenance, keys or shapes).
    """
    if not cfg.keeps_local_head or not local_head:
        return dict(global_adapters)
    source = "the site's local head"
    if isinstance(local_head, LocalHead):
        if current is None:
            raise ValueError("a LocalHead is checked against the run's HeadProvenance: pass it")
        source = local_head.source
        local_head = local_head.checked(current)
    expected = {k: tuple(v.shape) for k, v in local_part(cfg, global_adapters).items()}
    found = {k: tuple(v.shape) for k, v in local_head.items()}
    kept_under = _classifier_mode_of(found)
    if cfg.task == "classification" and kept_under not in (None, cfg.head_sharing):
        raise LocalHeadError(
            f"{source} was kept under head-sharing {kept_under!r} ({sorted(found)}); this run "
            f"uses {cfg.head_sharing!r} and keeps {sorted(expected)}. Run with head-sharing = "
            f"{kept_under!r} to keep using it, or remove {LOCAL_HEAD_FILES[cfg.task]} from the "
            "site's state folder to start from the initial one"
        )
    if found != expected:
        raise LocalHeadError(
            f"{source} {found} does not fit the run's head {expected}: it was trained under "
            "another run configuration (head-sharing, num-classes, head-pool, head-norm, "
            "decoder-features or backbone). Remove "
            f"{LOCAL_HEAD_FILES[cfg.task]} from the site's state folder to start the head from "
            "the initial one"
        )
    return dict(global_adapters) | dict(local_head)
