"""Site datasets: medical image formats, spacing-aware batching, and phantom hospitals.

``open_site`` reads one split of a site (NIfTI, DICOM, PNG/JPEG or MedMNIST-style npz, listed
by a Decathlon-style ``dataset.json`` or a CSV), validates every item, orients it depth-first,
normalises intensities and resamples it onto a grid the SAC patch embedding can cut. Items are
``{"image": (C, D, H, W) float32, "spacing": (3,) float64, "label": ...}``; batches share one
degree of anisotropy (DA), drawn by :class:`DABatchSampler` or, under DP-SGD, by
:class:`PoissonDABatchSampler`.

No Flower import here; the phantom generator is imported on first use so that
``python -m core.data.phantoms`` runs cleanly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.data.datalist import MODALITIES, SPLITS, ItemSpec, SiteInfo
from core.data.dataset import SiteDataset, collate, open_site
from core.data.errors import DatasetError, SkippedItem
from core.data.preprocess import GridConfig, IntensityConfig
from core.data.readers import DEFAULT_SPACING_MM, TWO_D_DEPTH_SPACING_MM
from core.data.samplers import DABatchSampler, PoissonDABatchSampler

if TYPE_CHECKING:
    from core.data.phantoms import HospitalSpec, PhantomSite, generate_hospitals, preset

__all__ = [
    "DEFAULT_SPACING_MM",
    "MODALITIES",
    "SPLITS",
    "TWO_D_DEPTH_SPACING_MM",
    "DABatchSampler",
    "DatasetError",
    "GridConfig",
    "HospitalSpec",
    "IntensityConfig",
    "ItemSpec",
    "PhantomSite",
    "PoissonDABatchSampler",
    "SiteDataset",
    "SiteInfo",
    "SkippedItem",
    "collate",
    "generate_hospitals",
    "open_site",
    "preset",
]

_LAZY = {"HospitalSpec", "PhantomSite", "generate_hospitals", "preset"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from core.data import phantoms

        return getattr(phantoms, name)
    raise AttributeError(f"module 'core.data' has no attribute {name!r}")
