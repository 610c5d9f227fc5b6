"""Phantom hospitals: simulated sites written to disk as real NIfTI and PNG files.

Each site is a folder with ``images/``, ``masks/`` (each case's lesion mask, same geometry and
format as its image, empty for lesion-free cases; the item's ``"mask"`` field) and a
Decathlon-style ``dataset.json`` (training, validation and test splits) that
:func:`core.data.open_site` reads like any real site. The task
is binary, *lesion present* (label 1) or not (label 0), on region-of-interest crops:

* ``ct3d``: CT in HU (int16 NIfTI): air -1000, subcutaneous fat, muscle, an organ with
  texture, a second organ, an enhancing vessel; the lesion is a hypodense blob in the organ.
* ``mr3d``: MR in arbitrary units (int16 NIfTI): other contrasts, a multiplicative bias field,
  Rician noise; the lesion is hyperintense. Thick slices average the anatomy (partial volume).
* ``xr2d``: X-ray-like projection (8- or 16-bit PNG): lung field, ribs, vessel markings; the
  lesion is a nodule, faint to obvious. PNG has no spacing, so the datalist carries it.
  Patients differ in lung size, soft-tissue thickness and lung density, and the nodule covers a
  small part of the field, so the image's brightness and spread (mean, median, std,
  percentiles) rank lesion cases no better than chance: the nodule must be found where it is.
  (Higher moments still carry a little: kurtosis scores AUC 0.6-0.7.)

What makes it learnable but not trivial: lesions vary in size and contrast (some are faint),
sit at random places in the organ, and both classes contain lesion-like distractors (vessels
seen end-on, cysts in the other organ) that differ only in where they are and how they look.

Sites differ as real ones do: spacing and slice thickness (so DA differs), the axis order the
volume is stored in, intensity scale, noise, site size, and label mix: each site's prevalence
is drawn from a Dirichlet(alpha, alpha) (``alpha=None``: IID, every site at 50 %), clipped to
[0.2, 0.8] so every split holds enough of both classes for a per-site AUC. Everything is
deterministic from the seed: the same seed writes the same bytes.

CLI: ``python -m core.data.phantoms --out DIR --preset default --seed 0``

Over 500 lines: the three phantom kinds share the anatomy, noise and writer helpers that make
the sites deterministic; one module keeps that determinism in one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from PIL import Image

# Part of every cache folder name built from generated phantoms (sites, the pretraining archive,
# benchmark data): bump it whenever the same seed writes different images, so that a cache made
# by an older generator is never reused.
PHANTOM_VERSION = 2

Kind = Literal["ct3d", "mr3d", "xr2d"]
KINDS: tuple[Kind, ...] = ("ct3d", "mr3d", "xr2d")
_MODALITY = {"ct3d": "CT", "mr3d": "MR", "xr2d": "XR"}
_CLASS_NAMES = ["no lesion", "lesion"]
_PREVALENCE_RANGE = (0.2, 0.8)
_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # training, validation, test


@dataclass(frozen=True)
class PhantomSite:
    """How one simulated hospital acquires and stores its images."""

    name: str
    kind: Kind
    n_cases: int
    size: tuple[int, int] = (64, 64)  # native (H, W) in pixels
    slices: int = 1  # native depth (3D kinds)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (d, h, w) mm; d unused for 2D
    # 3D storage: file axis j holds canonical axis file_axes[j] (0 = depth S, 1 = R, 2 = A),
    # reversed where flips[j]; the affine records it, the loader undoes it.
    file_axes: tuple[int, int, int] = (1, 2, 0)
    flips: tuple[bool, bool, bool] = (False, False, False)
    compress: bool = True  # .nii.gz rather than .nii
    bit_depth: int = 8  # PNG: 8 or 16
    noise: float = 1.0  # relative noise level (1 = the kind's typical noise)
    gain: float = 1.0  # MR / X-ray intensity scale (arbitrary units)
    # Lesion size and contrast are drawn per case from these ranges: faint small lesions keep
    # the task from being trivial, conspicuous ones keep it learnable from a few dozen cases.
    lesion_radius_mm: tuple[float, float] = (4.0, 10.0)
    lesion_contrast: tuple[float, float] = (1.5, 4.0)  # x 45 HU (CT), 120 a.u. (MR), 0.16 (XR)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"PhantomSite.kind must be one of {KINDS}, got {self.kind!r}")
        if self.n_cases < 10:
            raise ValueError(
                f"PhantomSite.n_cases must be >= 10 for three splits, got {self.n_cases}"
            )
        if min(self.size) < 8 or (self.kind != "xr2d" and self.slices < 2):
            raise ValueError(f"PhantomSite {self.name}: size >= 8 and 3D slices >= 2 required")
        if sorted(self.file_axes) != [0, 1, 2]:
            raise ValueError(f"PhantomSite.file_axes must permute (0, 1, 2), got {self.file_axes}")
        if self.bit_depth not in (8, 16):
            raise ValueError(f"PhantomSite.bit_depth must be 8 or 16, got {self.bit_depth}")


@dataclass(frozen=True)
class HospitalSpec:
    """A federation of phantom sites and how non-IID their label mixes are."""

    sites: tuple[PhantomSite, ...]
    alpha: float | None = 1.0  # Dirichlet concentration of each site's class mix; None = IID
    name: str = "custom"
    extra: dict[str, object] = field(default_factory=dict)  # recorded in hospitals.json

    def __post_init__(self) -> None:
        if not self.sites:
            raise ValueError("HospitalSpec.sites must not be empty")
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique, got {names}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"HospitalSpec.alpha must be > 0 or None (IID), got {self.alpha}")


PRESETS = ("default", "large", "many", "segmentation", "unseen")


def preset(
    name: str, *, n_sites: int | None = None, alpha: float | None = 1.0, seed: int = 0
) -> HospitalSpec:
    """``"default"``: 4 sites (thin CT, thick MR, two X-ray), 120-360 cases each. ``"large"``:
    the same sites with 3x the cases. ``"many"``: ``n_sites`` (default 100) tiny sites of all
    kinds with spacings drawn from realistic ranges (from ``seed``). ``"segmentation"``: four
    small sites of mixed spacing (lesion masks for segmentation on a CPU)."""
    if name == "large":  # the default sites with 3x the cases: what DP-SGD needs (benchmark)
        base = preset("default", n_sites=n_sites, alpha=alpha)
        sites = tuple(dataclasses.replace(s, n_cases=3 * s.n_cases) for s in base.sites)
        return HospitalSpec(sites, alpha=alpha, name="large")
    if name == "default":
        if n_sites not in (None, 4):
            raise ValueError(f"preset 'default' has 4 sites; use preset 'many' for {n_sites}")
        sites = (
            PhantomSite(
                "site-a-ct-thin",
                "ct3d",
                240,
                (64, 64),
                32,
                (1.0, 1.0, 1.0),
                flips=(True, True, False),
            ),
            PhantomSite(
                "site-b-mr-thick",
                "mr3d",
                180,
                (64, 64),
                12,
                (5.0, 0.7, 0.7),
                file_axes=(0, 1, 2),  # thick axis first in the file
                flips=(True, False, False),
                compress=False,
                gain=3.2,
            ),
            PhantomSite("site-c-xr-8bit", "xr2d", 360, (128, 128), spacing=(1.0, 0.6, 0.6)),
            PhantomSite(
                "site-d-xr-16bit",
                "xr2d",
                120,
                (120, 96),
                spacing=(1.0, 0.8, 0.8),
                bit_depth=16,
                noise=1.5,
                gain=0.8,
            ),
        )
        return HospitalSpec(sites, alpha=alpha, name="default")
    if name == "segmentation":
        return _segmentation_preset(n_sites, alpha)
    if name == "unseen":
        return _unseen_preset(n_sites, alpha)
    if name == "many":
        count = 100 if n_sites is None else n_sites
        if count < 1:
            raise ValueError(f"n_sites must be >= 1, got {count}")
        rng = np.random.default_rng([seed, 7_919])
        return HospitalSpec(
            tuple(_tiny_site(i, rng) for i in range(count)),
            alpha=alpha,
            name="many",
            extra={"n_sites": count},
        )
    raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")


def _segmentation_preset(n_sites: int | None, alpha: float | None) -> HospitalSpec:
    """Small sites of mixed spacing for lesion segmentation on a CPU: 1 mm CT, 2.5 mm CT
    (DA 1), 5 mm MR (DA 2) and 2D X-ray, 32 x 32 in-plane (the first ``n_sites`` of them)."""
    sites = (
        PhantomSite("site-a-ct-1mm", "ct3d", 200, (32, 32), 16, (1.0, 1.0, 1.0),
                    flips=(True, True, False), lesion_radius_mm=(4.0, 8.0)),
        PhantomSite("site-b-mr-5mm", "mr3d", 200, (32, 32), 8, (5.0, 0.8, 0.8),
                    file_axes=(0, 1, 2), compress=False, gain=3.2, lesion_radius_mm=(4.0, 8.0)),
        PhantomSite("site-c-xr-2d", "xr2d", 200, (32, 32), spacing=(1.0, 0.8, 0.8),
                    lesion_radius_mm=(3.0, 7.0)),
        PhantomSite("site-d-ct-2.5mm", "ct3d", 200, (32, 32), 8, (2.5, 0.9, 0.9),
                    lesion_radius_mm=(4.0, 8.0)),
    )  # fmt: skip
    count = len(sites) if n_sites is None else n_sites
    if not 1 <= count <= len(sites):
        raise ValueError(f"preset 'segmentation' has 1 to {len(sites)} sites, got {n_sites}")
    return HospitalSpec(sites[:count], alpha=alpha, name="segmentation")


_LAYOUTS: tuple[tuple[tuple[int, int, int], tuple[bool, bool, bool]], ...] = (
    ((1, 2, 0), (False, False, False)),
    ((1, 2, 0), (True, True, False)),
    ((0, 1, 2), (False, False, False)),
    ((1, 0, 2), (False, True, False)),
)


def _unseen_preset(n_sites: int | None, alpha: float | None) -> HospitalSpec:
    """Four hospitals the recipe was not tuned on: other slice thicknesses (CT 2.5 mm, MR 3 mm),
    pixel sizes, file layouts, noise, gain and label mixes than the default sites, as many
    cases as the "large" preset."""
    if n_sites not in (None, 4):
        raise ValueError(f"preset 'unseen' has 4 sites; use preset 'many' for {n_sites}")
    sites = (
        PhantomSite("site-e-ct-2.5mm", "ct3d", 480, (64, 64), 16, (2.5, 0.8, 0.8),
                    file_axes=(1, 0, 2), flips=(False, True, False), noise=1.3),
        PhantomSite("site-f-mr-3mm", "mr3d", 360, (64, 64), 16, (3.0, 0.9, 0.9),
                    flips=(False, False, True), gain=1.5, noise=1.2),
        PhantomSite("site-g-xr-fine", "xr2d", 480, (144, 144), spacing=(1.0, 0.5, 0.5),
                    noise=1.2, gain=1.1),
        PhantomSite("site-h-xr-coarse", "xr2d", 300, (96, 96), spacing=(1.0, 0.9, 0.9),
                    bit_depth=16, noise=0.8, gain=0.7),
    )  # fmt: skip
    return HospitalSpec(sites, alpha=alpha, name="unseen")


def _tiny_site(index: int, rng: np.random.Generator) -> PhantomSite:
    """A small site for many-site simulations: 20-40 cases of 32 x 32 (x 8-16 slices)."""
    kind = KINDS[index % 3]
    n_cases = int(rng.integers(20, 41))
    noise = float(rng.uniform(0.7, 1.5))
    layout, flips = _LAYOUTS[index % len(_LAYOUTS)]
    if kind == "ct3d":
        in_plane = float(rng.uniform(0.6, 1.0))
        thickness = float(rng.choice([0.8, 1.0, 1.25, 1.5, 2.5, 3.0]))
        return PhantomSite(
            f"site-{index:03d}-ct", kind, n_cases, (32, 32), 16, (thickness, in_plane, in_plane),
            file_axes=layout, flips=flips, noise=noise,
        )  # fmt: skip
    if kind == "mr3d":
        in_plane = float(rng.uniform(0.5, 0.9))
        thickness = float(rng.choice([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
        return PhantomSite(
            f"site-{index:03d}-mr", kind, n_cases, (32, 32), 8, (thickness, in_plane, in_plane),
            file_axes=layout, flips=flips, noise=noise, gain=float(rng.uniform(0.5, 4.0)),
        )  # fmt: skip
    pixel = float(rng.uniform(0.4, 0.9))
    return PhantomSite(
        f"site-{index:03d}-xr", kind, n_cases, (32, 32), spacing=(1.0, pixel, pixel),
        bit_depth=int(rng.choice([8, 16])), noise=noise, gain=float(rng.uniform(0.6, 1.2)),
    )  # fmt: skip


# ------------------------------------------------------------------------------------ drawing


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], cells: int) -> np.ndarray:
    """Zero-mean, unit-std noise that varies over about ``cells`` cells per axis.

    Random values on a coarse grid, linearly interpolated one axis at a time (cheap: the
    coarse grid has at most ``cells`` points per axis).
    """
    out = rng.standard_normal([max(2, min(cells, s)) for s in shape], dtype=np.float32)
    for axis, size in enumerate(shape):
        coarse = out.shape[axis]
        position = np.linspace(0.0, coarse - 1.0, size, dtype=np.float32)  # (size,)
        low = np.minimum(position.astype(np.int64), coarse - 2)
        weights = np.zeros((size, coarse), dtype=np.float32)  # (size, coarse) linear weights
        weights[np.arange(size), low] = 1.0 - (position - low)
        weights[np.arange(size), low + 1] = position - low
        out = np.moveaxis(np.tensordot(weights, out, axes=([1], [axis])), 0, axis)
    return (out - out.mean()) / (out.std() + 1e-12)


def _white(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """Unit white noise in float32 (the phantoms are float32 throughout for speed)."""
    return rng.standard_normal(tuple(shape), dtype=np.float32)


def _inside(
    coords: Sequence[np.ndarray], centre: Sequence[float], radii: Sequence[float], edge: float
) -> np.ndarray:
    """Soft membership of an ellipsoid: 1 inside, 0 outside, a ``edge``-wide ramp between."""
    q = sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii, strict=True))
    logit = np.clip((1.0 - np.sqrt(q)) / edge, -40.0, 40.0)  # no float32 overflow
    return 1.0 / (1.0 + np.exp(-logit))


def _point_in_ellipsoid(
    rng: np.random.Generator, centre: Sequence[float], radii: Sequence[float], shrink: float
) -> list[float]:
    """A uniform point inside the ellipsoid scaled by ``shrink`` (keeps blobs off the edge)."""
    while True:
        u = rng.uniform(-1.0, 1.0, size=len(centre))
        if float((u**2).sum()) <= 1.0:
            return [float(m + shrink * r * v) for m, r, v in zip(centre, radii, u, strict=True)]


def _render_3d(
    site: PhantomSite, rng: np.random.Generator, lesion: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(D, H, W) canonical (S, R, A) volume in the site's units (HU for CT, a.u. for MR) and
    the lesion mask on the same grid (uint8, 1 where at least half a voxel is lesion)."""
    s_d, s_h, s_w = site.spacing
    height, width = site.size
    # Thick slices integrate the anatomy over their thickness: render sub-slices, average.
    sub = int(min(4, max(1, round(s_d / min(s_h, s_w)))))
    depth = site.slices * sub
    z = ((np.arange(depth, dtype=np.float32) + 0.5) / sub - site.slices / 2)[:, None, None] * s_d
    x = (np.arange(height, dtype=np.float32) + 0.5 - height / 2)[None, :, None] * s_h
    y = (np.arange(width, dtype=np.float32) + 0.5 - width / 2)[None, None, :] * s_w
    half = (height * s_h / 2, width * s_w / 2, max(site.slices * s_d / 2, 8.0))
    coords = (x, y, z)
    jitter = [float(j) * h for j, h in zip(rng.uniform(-0.06, 0.06, size=3), half, strict=True)]

    # Region of interest around an organ: organ, a second organ, a vessel, and along +y the
    # body wall (muscle, then subcutaneous fat) and the air outside.
    def layer(fraction: float) -> np.ndarray:  # (1, 1, W): 0 before the boundary, 1 after
        return 1.0 / (1.0 + np.exp(-(y - (fraction * half[1] + jitter[1])) / 1.0))

    muscle, fat, air = layer(0.55), layer(0.68), layer(0.8)
    organ_c = (-0.1 * half[0] + jitter[0], -0.15 * half[1] + jitter[1], jitter[2] * 0.2)
    organ_r = (0.62 * half[0], 0.55 * half[1], 1.6 * half[2])
    organ = _inside(coords, organ_c, organ_r, 0.04)
    other_c = (0.62 * half[0], -0.35 * half[1], 0.0)
    other_r = (0.3 * half[0], 0.3 * half[1], 1.4 * half[2])
    other = _inside(coords, other_c, other_r, 0.05) * (1 - organ)
    vessel_c = (0.35 * half[0] + jitter[0], 0.3 * half[1])
    vessel = _inside((x, y), vessel_c, (2.5 + s_h, 2.5 + s_w), 0.08) * (1 - organ)
    texture = _smooth_noise(rng, (depth, height, width), 6)

    def blob(centre: Sequence[float], radius: float) -> np.ndarray:
        return _inside(coords, centre, (radius, radius, radius), 0.12)

    lesion_map = np.zeros_like(organ)
    if lesion:
        radius = float(rng.uniform(*site.lesion_radius_mm))
        lesion_map = blob(_point_in_ellipsoid(rng, organ_c, organ_r, 0.55), radius) * organ
    contrast = float(rng.uniform(*site.lesion_contrast))
    # Distractors in both classes: cysts in the other organ (look like lesions, wrong place)
    # and a small vessel running through the organ (opposite contrast).
    cysts = np.zeros_like(organ)
    for _ in range(int(rng.integers(0, 3))):
        cysts = np.maximum(cysts, blob(_point_in_ellipsoid(rng, other_c, other_r, 0.5), 3.0))
    cysts *= other
    branch_c = _point_in_ellipsoid(rng, organ_c[:2], organ_r[:2], 0.6)
    branch = _inside((x, y), branch_c, (1.2, 1.2), 0.15) * organ * float(rng.uniform(0.0, 1.0))

    # Tissue values: CT in HU, MR in arbitrary units (T2-like: fat bright, lesion bright).
    tissue = {"soft": 40.0, "organ": 60.0, "other": 30.0, "vessel": 160.0, "muscle": 45.0}
    tissue |= {"fat": -100.0, "air": -1000.0, "lesion": -45.0, "cyst": -25.0, "branch": 80.0}
    if site.kind == "mr3d":
        tissue = {"soft": 250.0, "organ": 310.0, "other": 500.0, "vessel": 50.0}
        tissue |= {"muscle": 200.0, "fat": 700.0, "air": 0.0, "lesion": 120.0, "cyst": 100.0}
        tissue |= {"branch": -120.0}
    value = tissue["soft"] + organ * (tissue["organ"] - tissue["soft"])
    value = value + other * (tissue["other"] - tissue["soft"])
    value = value + vessel * (tissue["vessel"] - value)
    value = value + muscle * (tissue["muscle"] - value)
    value = value + fat * (tissue["fat"] - value)
    value = value + organ * 6.0 * texture * (tissue["organ"] / 60.0)
    value = value + branch * tissue["branch"] + cysts * tissue["cyst"]
    value = value + lesion_map * contrast * tissue["lesion"]
    if site.kind == "ct3d":
        value = value + air * (tissue["air"] - value)
        value = value + 14.0 * site.noise * _white(rng, value.shape)
    else:
        value = value * (1 - air) * np.exp(0.15 * _smooth_noise(rng, (depth, height, width), 3))
        sigma = 22.0 * site.noise
        real = value + sigma * _white(rng, value.shape)
        imag = sigma * _white(rng, value.shape)
        value = np.sqrt(real**2 + imag**2) * site.gain  # magnitude image: Rician noise
    volume = value.reshape(site.slices, sub, height, width).mean(axis=1)
    lesion_voxels = np.broadcast_to(lesion_map, value.shape).reshape(
        site.slices, sub, height, width
    )
    return volume, (lesion_voxels.mean(axis=1) >= 0.5).astype(np.uint8)


def _render_2d(
    site: PhantomSite, rng: np.random.Generator, lesion: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) X-ray-like projection of a lung region, intensity in [0, 1] (bright = dense), and
    the nodule mask (uint8, 1 inside the nodule's half-maximum)."""
    height, width = site.size
    _, s_h, s_w = site.spacing
    x = (np.arange(height, dtype=np.float32) + 0.5 - height / 2)[
        :, None
    ] * s_h  # rows: superior -> inferior
    y = (np.arange(width, dtype=np.float32) + 0.5 - width / 2)[None, :] * s_w
    half = (height * s_h / 2, width * s_w / 2)
    jitter = [float(j) * h for j, h in zip(rng.uniform(-0.08, 0.08, size=2), half, strict=True)]
    lung_c = (0.05 * half[0] + jitter[0], -0.1 * half[1] + jitter[1])
    size = rng.uniform(0.8, 1.05, size=2)  # patients differ in lung size and inspiration
    lung_r = (0.95 * size[0] * half[0], 0.75 * size[1] * half[1])
    lung = _inside((x, y), lung_c, lung_r, 0.05)
    mediastinum = 1.0 / (1.0 + np.exp(-(y - (0.7 * half[1] + jitter[1])) / 1.5))
    # Soft tissue over the lung differs between patients: a thickness offset and a gradient.
    # With the lung size and density drawn per patient, this varies an image's brightness and
    # spread more than a nodule does (generator v1 let the mean intensity give the label away).
    tissue = rng.uniform(-0.15, 0.15) + rng.uniform(-0.15, 0.15) * (x / half[0])
    attenuation = 1.2 + tissue - float(rng.uniform(0.55, 0.8)) * lung + 0.5 * mediastinum
    # Ribs: oblique bright bands across the field.
    phase = float(rng.uniform(0, 2 * math.pi))
    tilt = float(rng.uniform(0.2, 0.5))
    ribs = np.cos((x + tilt * y) * (2 * math.pi / (0.45 * half[0])) + phase)
    attenuation = attenuation + 0.22 * (ribs > 0.55)
    # Vessel markings (both classes): short thin bright lines and end-on dots.
    for _ in range(int(rng.integers(2, 5))):
        c = _point_in_ellipsoid(rng, lung_c, lung_r, 0.8)
        angle = float(rng.uniform(0, math.pi))
        along = (x - c[0]) * math.cos(angle) + (y - c[1]) * math.sin(angle)
        across = -(x - c[0]) * math.sin(angle) + (y - c[1]) * math.cos(angle)
        line = _inside((along, across), (0.0, 0.0), (0.3 * half[0], 0.9), 0.2)
        attenuation = attenuation + 0.12 * line
    for _ in range(int(rng.integers(0, 3))):
        c = _point_in_ellipsoid(rng, lung_c, lung_r, 0.8)
        attenuation = attenuation + 0.15 * _inside((x, y), c, (1.6, 1.6), 0.2)
    mask = np.zeros((height, width), dtype=np.uint8)
    if lesion:
        c = _point_in_ellipsoid(rng, lung_c, lung_r, 0.7)
        radius = float(rng.uniform(*site.lesion_radius_mm))
        contrast = float(rng.uniform(*site.lesion_contrast)) * 0.16
        nodule = _inside((x, y), c, (radius, radius), 0.25)
        attenuation = attenuation + contrast * nodule
        mask = (nodule >= 0.5).astype(np.uint8)
    attenuation = attenuation + 0.05 * _smooth_noise(rng, (height, width), 5)
    signal = 1.0 - np.exp(-attenuation)  # detector response: dense is bright
    signal = signal + 0.02 * site.noise * _white(rng, signal.shape)
    low, high = 1.0 - math.exp(-0.3), 1.0 - math.exp(-2.2)
    return np.clip((signal - low) / (high - low), 0.0, 1.0) ** (1.0 / site.gain), mask


# ------------------------------------------------------------------------------------ writing


def _nifti(site: PhantomSite, volume: np.ndarray) -> nib.Nifti1Image:
    """Store a canonical (S, R, A) volume in the site's axis order with a matching affine."""
    dims = volume.shape
    canonical = np.zeros((4, 4))  # canonical voxel -> RAS mm, centred on the origin
    world_axis = (2, 0, 1)  # canonical axes S, R, A are world z, x, y
    for axis in range(3):
        canonical[world_axis[axis], axis] = site.spacing[axis]
        canonical[world_axis[axis], 3] = -(dims[axis] - 1) / 2 * site.spacing[axis]
    canonical[3, 3] = 1.0
    to_canonical = np.zeros((4, 4))  # file voxel -> canonical voxel
    to_canonical[3, 3] = 1.0
    data = volume.transpose(site.file_axes)
    for j, axis in enumerate(site.file_axes):
        if site.flips[j]:
            data = np.flip(data, axis=j)
            to_canonical[axis, j] = -1.0
            to_canonical[axis, 3] = dims[axis] - 1
        else:
            to_canonical[axis, j] = 1.0
    affine = canonical @ to_canonical
    image = nib.Nifti1Image(np.ascontiguousarray(np.rint(data).astype(np.int16)), affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image


def _labels(site: PhantomSite, rng: np.random.Generator, alpha: float | None) -> np.ndarray:
    """Per-case labels with the site's class mix (Dirichlet over the two classes)."""
    prevalence = 0.5 if alpha is None else float(rng.dirichlet([alpha, alpha])[1])
    prevalence = min(max(prevalence, _PREVALENCE_RANGE[0]), _PREVALENCE_RANGE[1])
    positives = min(max(round(prevalence * site.n_cases), 3), site.n_cases - 3)
    labels = np.zeros(site.n_cases, dtype=np.int64)
    labels[:positives] = 1
    return rng.permutation(labels)


def _splits(labels: np.ndarray, rng: np.random.Generator) -> dict[str, list[int]]:
    """Stratified training/validation/test case indices; each split gets both classes."""
    splits: dict[str, list[int]] = {"training": [], "validation": [], "test": []}
    for cls in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == cls)).tolist()
        n_val = max(1, round(_SPLIT_FRACTIONS[1] * len(members)))
        n_test = max(1, round(_SPLIT_FRACTIONS[2] * len(members)))
        splits["validation"] += members[:n_val]
        splits["test"] += members[n_val : n_val + n_test]
        splits["training"] += members[n_val + n_test :]
    return {name: sorted(indices) for name, indices in splits.items()}


def _write_site(site: PhantomSite, index: int, root: Path, seed: int, alpha: float | None) -> Path:
    folder = root / site.name
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    labels = _labels(site, np.random.default_rng([seed, index, 1]), alpha)
    entries: list[dict[str, object]] = []
    for case, label in enumerate(labels.tolist()):
        rng = np.random.default_rng([seed, index, 2, case])
        if site.kind == "xr2d":
            pixels, mask = _render_2d(site, rng, bool(label))
            top = 255 if site.bit_depth == 8 else 4095  # 16-bit PNG holding a 12-bit detector
            dtype = np.uint8 if site.bit_depth == 8 else np.uint16
            name, mask_name = f"images/case_{case:04d}.png", f"masks/case_{case:04d}.png"
            Image.fromarray(np.rint(pixels * top).astype(dtype)).save(folder / name)
            Image.fromarray(mask).save(folder / mask_name)
            spacing = list(site.spacing[1:])
            entries.append({"image": name, "label": label, "spacing": spacing, "mask": mask_name})
        else:
            volume, mask = _render_3d(site, rng, bool(label))
            suffix = ".nii" + (".gz" if site.compress else "")
            name, mask_name = f"images/case_{case:04d}{suffix}", f"masks/case_{case:04d}{suffix}"
            nib.save(_nifti(site, volume), folder / name)
            nib.save(_nifti(site, mask.astype(np.float32)), folder / mask_name)
            entries.append({"image": name, "label": label, "mask": mask_name})
    splits = _splits(labels, np.random.default_rng([seed, index, 3]))
    document: dict[str, object] = {
        "name": site.name,
        "description": f"phantom hospital ({site.kind}), binary lesion presence",
        "modality": _MODALITY[site.kind],
        "num_classes": 2,
        "multi_label": False,
        "class_names": _CLASS_NAMES,
        "tensorImageSize": "2D" if site.kind == "xr2d" else "3D",
        "numTraining": len(splits["training"]),
        "phantom": {
            **asdict(site),
            "seed": seed,
            "prevalence": float(labels.mean()),
            "generator_version": PHANTOM_VERSION,
        },
    }
    for split, members in splits.items():
        document[split] = [entries[i] for i in members]
    path = folder / "dataset.json"
    path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return path


def generate_hospitals(
    out_dir: str | Path,
    spec: str | HospitalSpec = "default",
    seed: int = 0,
    *,
    n_sites: int | None = None,
    alpha: float | None = 1.0,
    overwrite: bool = False,
) -> list[Path]:
    """Write phantom sites under ``out_dir``; returns each site's ``dataset.json`` path.

    ``spec`` is a preset name (:data:`PRESETS`; ``n_sites`` and ``alpha`` tune it) or a
    :class:`HospitalSpec`. ``out_dir`` must be empty or missing unless ``overwrite``. Also
    writes ``hospitals.json`` listing the sites and the spec.
    """
    hospitals = (
        preset(spec, n_sites=n_sites, alpha=alpha, seed=seed) if isinstance(spec, str) else spec
    )
    root = Path(out_dir)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"{root} is not empty; choose an empty folder or pass overwrite=True")
    root.mkdir(parents=True, exist_ok=True)
    paths = [
        _write_site(site, index, root, seed, hospitals.alpha)
        for index, site in enumerate(hospitals.sites)
    ]
    index_doc = {
        "preset": hospitals.name,
        "seed": seed,
        "alpha": hospitals.alpha,
        **hospitals.extra,
        "sites": [
            {"name": s.name, "kind": s.kind, "datalist": str(p.relative_to(root))}
            for s, p in zip(hospitals.sites, paths, strict=True)
        ],
    }
    (root / "hospitals.json").write_text(json.dumps(index_doc, indent=1) + "\n", encoding="utf-8")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.data.phantoms", description="Write phantom hospitals to disk."
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (empty or new)")
    parser.add_argument("--preset", default="default", choices=PRESETS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-sites", type=int, default=None, help="number of sites ('many')")
    mix = parser.add_mutually_exclusive_group()
    mix.add_argument("--alpha", type=float, default=1.0, help="Dirichlet alpha of label mixes")
    mix.add_argument("--iid", action="store_true", help="every site at 50 %% prevalence")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        paths = generate_hospitals(
            args.out,
            args.preset,
            args.seed,
            n_sites=args.n_sites,
            alpha=None if args.iid else args.alpha,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    for path in paths:
        print(path)
    print(f"wrote {len(paths)} sites in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
