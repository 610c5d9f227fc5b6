"""Phantom hospitals: deterministic, heterogeneous like real sites, readable by open_site, and
cut exactly by the SAC patch embedding."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from core.data import DABatchSampler, GridConfig, open_site
from core.data.phantoms import HospitalSpec, PhantomSite, generate_hospitals, main, preset
from core.model.sac import SACConv3d, SpatialState, batch_degree_of_anisotropy

SMALL = HospitalSpec(
    (
        PhantomSite("ct", "ct3d", 12, (16, 16), 8, (1.0, 1.0, 1.0), flips=(True, False, False)),
        PhantomSite(
            "mr", "mr3d", 12, (16, 16), 4, (5.0, 0.7, 0.7), file_axes=(0, 1, 2), compress=False
        ),
        PhantomSite("xr", "xr2d", 12, (16, 16), spacing=(1.0, 0.5, 0.5), bit_depth=16),
    ),
    alpha=1.0,
)


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def default_hospitals(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generate_hospitals(tmp_path_factory.mktemp("default"), "default", seed=0)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    generate_hospitals(tmp_path / "a", SMALL, seed=3)
    generate_hospitals(tmp_path / "b", SMALL, seed=3)
    generate_hospitals(tmp_path / "c", SMALL, seed=4)
    first = digest(tmp_path / "a")
    # 12 images, 12 masks and dataset.json per site, hospitals.json
    assert len(first) == 3 * 25 + 1
    assert first == digest(tmp_path / "b")
    other = digest(tmp_path / "c")
    assert other.keys() == first.keys()
    assert sum(first[k] != other[k] for k in first if "/images/" in k) > 30


def test_default_preset_sites_differ_like_real_ones(default_hospitals: list[Path]) -> None:
    names = [p.parent.name for p in default_hospitals]
    assert names == ["site-a-ct-thin", "site-b-mr-thick", "site-c-xr-8bit", "site-d-xr-16bit"]
    docs = [json.loads(p.read_text()) for p in default_hospitals]
    assert [d["modality"] for d in docs] == ["CT", "MR", "XR", "XR"]
    sizes = [sum(len(d[s]) for s in ("training", "validation", "test")) for d in docs]
    assert sizes == [240, 180, 360, 120]
    prevalences = [d["phantom"]["prevalence"] for d in docs]
    assert len(set(prevalences)) == 4 and all(0.2 <= p <= 0.8 for p in prevalences)
    # What the files' headers say (file axis order), then what the loader makes of it.
    ct_file = nib.load(default_hospitals[0].parent / docs[0]["training"][0]["image"])
    assert ct_file.shape == (64, 64, 32) and ct_file.header.get_zooms() == (1.0, 1.0, 1.0)
    assert nib.aff2axcodes(ct_file.affine) == ("L", "P", "S")
    mr_file = nib.load(default_hospitals[1].parent / docs[1]["training"][0]["image"])
    assert mr_file.shape == (12, 64, 64)  # the thick axis is stored first
    np.testing.assert_allclose(mr_file.header.get_zooms(), (5.0, 0.7, 0.7), rtol=1e-6)
    assert nib.aff2axcodes(mr_file.affine) == ("I", "R", "A")
    grid = GridConfig(in_plane=(64, 64))
    sites = [open_site(p, "training", grid=grid) for p in default_hospitals]
    assert [set(s.das) for s in sites] == [{0}, {2}, {5}, {5}]
    assert [s.image_shape(s.das[0]) for s in sites] == [
        (1, 32, 64, 64),
        (1, 12, 64, 64),  # 12 slices: a multiple of the DA-2 depth patch, 4
        (1, 1, 64, 64),
        (1, 1, 64, 64),
    ]
    np.testing.assert_allclose(sites[1].spacings[0].numpy(), (5.0, 0.7, 0.7), rtol=1e-6)
    assert sites[3].spacings[0].tolist() == [1.0e4, 0.8 * 120 / 64, 0.8 * 96 / 64]  # resized


def _auc(labels: list[int], scores: list[float]) -> float:
    """ROC AUC by brute force over all (positive, negative) pairs, ties counted half."""
    y, v = np.asarray(labels), np.asarray(scores)
    pos, neg = v[y == 1][:, None], v[y == 0][None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def test_no_global_statistic_of_an_x_ray_gives_the_nodule_away(
    default_hospitals: list[Path],
) -> None:
    """Patients differ in lung size, soft tissue and inspiration, and the nodule covers a small
    part of the field, so the label must be found locally: brightness, contrast or extremes of
    the whole image rank lesion cases no better than chance (generator v1: mean AUC 1.00)."""
    statistics = {
        "mean": np.mean,
        "median": np.median,
        "std": np.std,
        "p99.5": lambda image: np.percentile(image, 99.5),
        "p0.5": lambda image: np.percentile(image, 0.5),
    }
    for path in default_hospitals[2:]:
        doc = json.loads(path.read_text())
        items = [item for s in ("training", "validation", "test") for item in doc[s]]
        images = [np.asarray(Image.open(path.parent / item["image"]), np.float64) for item in items]
        labels = [item["label"] for item in items]
        for name, statistic in statistics.items():
            auc = _auc(labels, [float(statistic(image)) for image in images])
            assert 0.35 <= auc <= 0.65, (path.parent.name, name, auc)


def test_splits_are_stratified_disjoint_and_complete(default_hospitals: list[Path]) -> None:
    for path in default_hospitals:
        doc = json.loads(path.read_text())
        images = [item["image"] for s in ("training", "validation", "test") for item in doc[s]]
        assert len(images) == len(set(images)) == doc["phantom"]["n_cases"]
        for split in ("training", "validation", "test"):
            assert {item["label"] for item in doc[split]} == {0, 1}, (path, split)


def test_phantom_batches_go_through_the_sac_patch_embedding(default_hospitals: list[Path]) -> None:
    embed = SACConv3d(1, 4, 16, stride=16)
    for path in default_hospitals:
        site = open_site(path, "validation")
        for indices in DABatchSampler(site.das, 4, generator=torch.Generator().manual_seed(0)):
            batch = site.batch(indices)
            da = batch_degree_of_anisotropy(batch["spacing"])
            tokens, _ = embed(batch["image"], SpatialState(da))
            n, _, depth, height, width = batch["image"].shape
            assert tokens.shape == (n, 4, depth // max(16 >> da, 1), height // 16, width // 16)
            assert depth % max(16 >> da, 1) == 0
            assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.int64


def test_many_preset_scales_and_varies(tmp_path: Path) -> None:
    spec = preset("many", n_sites=9, seed=0)
    assert [s.kind for s in spec.sites[:3]] == ["ct3d", "mr3d", "xr2d"]
    assert all(20 <= s.n_cases <= 40 and s.size == (32, 32) for s in spec.sites)
    assert len({s.spacing for s in spec.sites}) == 9
    paths = generate_hospitals(tmp_path, spec, seed=0)
    das = {da for p in paths for da in open_site(p, "test", grid=GridConfig(in_plane=(32, 32))).das}
    assert len(das) >= 3 and 5 in das
    assert json.loads((tmp_path / "hospitals.json").read_text())["n_sites"] == 9
    assert preset("many", seed=0) == preset("many", seed=0)  # specs reproducible too
    assert len(preset("many").sites) == 100


def test_iid_knob(tmp_path: Path) -> None:
    sites = tuple(PhantomSite(f"s{i}", "xr2d", 20, (16, 16)) for i in range(6))
    iid = generate_hospitals(tmp_path / "iid", HospitalSpec(sites, alpha=None), seed=0)
    skewed = generate_hospitals(tmp_path / "skew", HospitalSpec(sites, alpha=0.05), seed=0)
    mix = [json.loads(p.read_text())["phantom"]["prevalence"] for p in iid]
    assert mix == [0.5] * 6
    mix = [json.loads(p.read_text())["phantom"]["prevalence"] for p in skewed]
    assert all(m in (0.2, 0.8) for m in mix)  # Dirichlet(0.05) is extreme; clipped to [0.2, 0.8]


def test_cli_writes_and_refuses_a_non_empty_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert (
        main(["--out", str(out), "--preset", "many", "--n-sites", "2", "--seed", "1", "--iid"]) == 0
    )
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == [
        str(out / "site-000-ct" / "dataset.json"),
        str(out / "site-001-mr" / "dataset.json"),
    ]
    with pytest.raises(SystemExit):
        main(["--out", str(out)])
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "pet"}, "kind must be one of"),
        ({"n_cases": 5}, "n_cases must be >= 10"),
        ({"file_axes": (0, 0, 1)}, "file_axes must permute"),
        ({"bit_depth": 12}, "bit_depth must be 8 or 16"),
    ],
)
def test_bad_site_specs(kwargs: dict, message: str) -> None:
    args = {"name": "x", "kind": "ct3d", "n_cases": 20, "slices": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        PhantomSite(**args)


def test_bad_presets() -> None:
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="use preset 'many'"):
        preset("default", n_sites=7)
    with pytest.raises(ValueError, match="alpha"):
        HospitalSpec(SMALL.sites, alpha=0.0)


def test_lesion_masks_mark_the_lesion_in_the_image_geometry(tmp_path):
    """Each case has a mask with its image's geometry; lesion-free cases have empty masks, and
    inside a lesion's mask the image is darker (CT, hypodense) or brighter (MR, X-ray) than in
    a ring around it: the mask is where the generator put the lesion."""
    import nibabel as nib
    from PIL import Image
    from scipy import ndimage

    paths = generate_hospitals(tmp_path, "default", seed=5)
    for path in paths:
        document = json.loads(path.read_text())
        kind = document["phantom"]["kind"]
        contrasts = []
        for entry in document["training"]:
            image_path, mask_path = path.parent / entry["image"], path.parent / entry["mask"]
            if kind == "xr2d":
                image = np.asarray(Image.open(image_path), dtype=np.float64)
                mask = np.asarray(Image.open(mask_path)) > 0
            else:
                image_nii, mask_nii = nib.load(image_path), nib.load(mask_path)
                assert np.allclose(image_nii.affine, mask_nii.affine)
                image = np.asarray(image_nii.dataobj, dtype=np.float64)
                mask = np.asarray(mask_nii.dataobj) > 0
            assert mask.shape == image.shape
            if entry["label"] == 0:
                assert not mask.any()
                continue
            if not mask.any():  # a small lesion averaged away in a thick slice
                continue
            ring = ndimage.binary_dilation(mask, iterations=3) & ~mask
            contrasts.append(image[mask].mean() - image[ring].mean())
        assert contrasts, f"{path.parent.name}: no lesion mask at all"
        sign = -1 if kind == "ct3d" else 1
        assert sum(sign * c > 0 for c in contrasts) >= 0.8 * len(contrasts), (kind, contrasts)
