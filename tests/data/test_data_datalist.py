"""Datalist schema (dataset.json, CSV, npz), labels, and the raise/skip policy for bad items."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from core.data import DatasetError, GridConfig, SiteDataset, open_site
from core.data.readers import DEFAULT_SPACING_MM, TWO_D_DEPTH_SPACING_MM

GRID = GridConfig(in_plane=(16, 16))


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A folder with four good PNGs and two NIfTI volumes."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        pixels = rng.integers(0, 255, (20, 24), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"x{i}.png")
    for i in range(2):
        volume = rng.normal(size=(16, 16, 8)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 3.0, 1.0])), images / f"v{i}.nii.gz")
    return tmp_path


def write(folder: Path, doc: dict) -> Path:
    path = folder / "dataset.json"
    path.write_text(json.dumps(doc))
    return path


def png_items(n: int = 4) -> list[dict]:
    return [{"image": f"images/x{i}.png", "label": i % 2, "spacing": [0.5, 0.4]} for i in range(n)]


def test_dataset_json_full_schema(site: Path) -> None:
    doc = {
        "name": "demo",
        "modality": {"0": "X-ray"},  # Decathlon's per-channel form and an alias
        "num_classes": 2,
        "class_names": ["absent", "present"],
        "training": png_items(),
        "validation": [{"image": "images/v0.nii.gz", "label": 1, "modality": "MR"}],
        "numTraining": 4,  # Decathlon extras are ignored
    }
    path = write(site, doc)
    train = open_site(site, "train", grid=GRID)  # a folder and a split alias both work
    assert (train.info.name, train.info.modality, train.info.class_names) == (
        "demo",
        "XR",
        ("absent", "present"),
    )
    assert len(train) == 4 and train.split == "training"
    assert train.labels.tolist() == [0, 1, 0, 1] and train.labels.dtype == torch.int64
    assert train[1]["label"].shape == () and int(train[1]["label"]) == 1
    assert train[0]["spacing"].tolist() == [TWO_D_DEPTH_SPACING_MM, 0.5 * 20 / 16, 0.4 * 24 / 16]
    val = open_site(path, "val", grid=GRID)
    assert val.items[0].modality == "MR"
    assert val.das == (1,)  # 3 mm slices over 1 mm pixels: ratio 3 -> DA 1
    assert val[0]["image"].shape == (1, 8, 16, 16)  # 8 slices: already a multiple of 16 >> 1


def test_dataset_level_default_spacing_and_stated_default(site: Path) -> None:
    items = [{"image": f"images/x{i}.png", "label": 0} for i in range(2)]
    with_default = write(
        site, {"modality": "XR", "num_classes": 2, "spacing": [0.2, 0.2], "training": items}
    )
    assert open_site(with_default, grid=GRID).spacings[0, 1].item() == pytest.approx(0.2 * 20 / 16)
    bare = write(site, {"modality": "XR", "num_classes": 2, "training": items})
    assert open_site(bare, grid=GRID).spacings[0, 1].item() == DEFAULT_SPACING_MM * 20 / 16


def test_multi_label_json(site: Path) -> None:
    items = [{"image": f"images/x{i}.png", "label": [1, 0, i % 2]} for i in range(3)]
    path = write(site, {"modality": "XR", "num_classes": 3, "multi_label": True, "training": items})
    ds = open_site(path, grid=GRID)
    assert ds.labels.dtype == torch.float32
    assert ds[2]["label"].tolist() == [1.0, 0.0, 0.0]
    assert ds.batch([0, 1, 2])["label"].shape == (3, 3)


def test_csv_datalist(site: Path) -> None:
    (site / "site.csv").write_text(
        "image,label,split,spacing\n"
        "images/x0.png,0,train,0.5;0.5\n"
        "images/x1.png,2,training,0.5;0.5\n"
        "images/x2.png,1,val,0.25 0.25\n"
        "images/v0.nii.gz,1,test,\n"
    )
    train = open_site(site / "site.csv", grid=GRID, modality="XR")
    assert len(train) == 2 and train.info.num_classes == 3  # inferred: largest label + 1
    assert train.labels.tolist() == [0, 2]
    val = open_site(site / "site.csv", "validation", grid=GRID, modality="XR", num_classes=3)
    assert val.spacings[0].tolist() == [TWO_D_DEPTH_SPACING_MM, 0.25 * 20 / 16, 0.25 * 24 / 16]
    (site / "ml.csv").write_text("image,label\nimages/x0.png,0;1\nimages/x1.png,1;1\n")
    multi = open_site(site / "ml.csv", grid=GRID, modality="XR")
    assert multi.info.multi_label and multi.labels.tolist() == [[0.0, 1.0], [1.0, 1.0]]


def test_npz_medmnist_2d_3d_and_multilabel(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "two_d.npz",
        train_images=rng.integers(0, 255, (5, 28, 28), dtype=np.uint8),
        train_labels=np.array([[0], [1], [2], [1], [0]]),
        val_images=rng.integers(0, 255, (2, 28, 28), dtype=np.uint8),
        val_labels=np.array([[3], [0]]),
    )
    flat = open_site(tmp_path / "two_d.npz", grid=GridConfig(in_plane=(32, 32)), modality="XR")
    assert flat.info.num_classes == 4  # largest label over all splits + 1
    assert flat[0]["image"].shape == (1, 1, 32, 32)
    assert flat[0]["spacing"].tolist() == [TWO_D_DEPTH_SPACING_MM, 28 / 32, 28 / 32]
    np.savez(
        tmp_path / "three_d.npz",
        test_images=rng.random((3, 28, 28, 28)).astype(np.float32),
        test_labels=np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1]]),
    )
    vols = open_site(
        tmp_path / "three_d.npz",
        "test",
        grid=GridConfig(in_plane=(32, 32)),
        modality="CT",
        spacing=(2.0, 1.0, 1.0),
        cache=False,
    )
    assert vols.info.multi_label and vols.info.num_classes == 3
    assert vols[0]["spacing"].tolist() == [2.0, 28 / 32, 28 / 32]
    assert vols.das == (1, 1, 1)
    assert vols[2]["image"].shape == (1, 32, 32, 32)  # 28 slices padded to a multiple of 8
    assert vols[2]["label"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(
        DatasetError, match=r"three_d.npz: arrays train_images and train_labels missing"
    ):
        open_site(tmp_path / "three_d.npz", "training", modality="CT")


# ------------------------------------------------------------------------------ bad datalists


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"modality": "CT", "training": []}, "field 'num_classes' is missing"),
        ({"modality": "CT", "num_classes": 1, "training": []}, "'num_classes' is 1"),
        ({"modality": "PET", "num_classes": 2, "training": [{}]}, "unknown modality 'PET'"),
        ({"modality": "CT", "num_classes": 2, "multi_label": "yes"}, "'multi_label' is 'yes'"),
        ({"modality": "CT", "num_classes": 2, "validation": []}, "field 'training' is missing"),
        ({"modality": "CT", "num_classes": 2, "training": {"a": 1}}, "is a dict, not a list"),
        ({"modality": "CT", "num_classes": 2, "training": []}, "split 'training' is empty"),
        ({"modality": "CT", "num_classes": 2, "class_names": ["a"], "training": []}, "class_names"),
    ],
)
def test_bad_datalist_names_the_datalist(site: Path, doc: dict, message: str) -> None:
    path = write(site, doc)
    with pytest.raises(DatasetError, match=message) as info:
        open_site(path, grid=GRID)
    assert info.value.path == path
    assert str(path) in str(info.value) and "Fix:" in str(info.value)


def test_unreadable_or_missing_datalist(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"dataset.json: not readable JSON"):
        open_site(tmp_path)
    with pytest.raises(DatasetError, match=r"absent.json: datalist not found"):
        open_site(tmp_path / "absent.json")
    (tmp_path / "bad.csv").write_text("path,target\na.png,1\n")
    with pytest.raises(DatasetError, match=r"bad.csv: column\(s\) \['image', 'label'\] missing"):
        open_site(tmp_path / "bad.csv")


def test_caller_may_not_contradict_datalist(site: Path) -> None:
    path = write(site, {"modality": "CT", "num_classes": 2, "training": png_items()})
    with pytest.raises(DatasetError, match="'num_classes' is 2 in the datalist but 3 was passed"):
        open_site(path, num_classes=3)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (
            {"image": "images/x0.png", "label": 2},
            r"training\[0\] \(image images/x0.png\) has label 2, out of range for num_classes=2",
        ),
        ({"image": "images/x0.png", "label": -1}, "has label -1, out of range"),
        ({"image": "images/x0.png", "label": 1.5}, "not an integer class index"),
        ({"image": "images/x0.png", "label": True}, "not an integer class index"),
        ({"image": "images/x0.png"}, "has no 'label'"),
        ({"label": 0}, r"training\[0\] has no 'image' path"),
        ({"image": "images/x0.png", "label": 0, "spacing": [0, 1]}, "not 2 or 3 positive spacings"),
        (
            {"image": "images/x0.png", "label": 0, "spacing": [1, 1, 1]},
            "x0.png: datalist field 'spacing' has 3 values but the image has 2",
        ),
        ({"image": "images/gone.png", "label": 0}, "gone.png: image file not found"),
    ],
)
def test_bad_item_fails_at_open_naming_the_file(site: Path, item: dict, message: str) -> None:
    path = write(site, {"modality": "XR", "num_classes": 2, "training": [item]})
    with pytest.raises(DatasetError, match=message):
        open_site(path, grid=GRID)


def test_multi_label_of_wrong_length(site: Path) -> None:
    items = [{"image": "images/x0.png", "label": [1, 0]}]
    path = write(site, {"modality": "XR", "num_classes": 3, "multi_label": True, "training": items})
    with pytest.raises(DatasetError, match=r"x0.png\) has label \[1, 0\], not 3 multi-hot"):
        open_site(path, grid=GRID)


def test_several_bad_items_are_all_listed(site: Path) -> None:
    items = [
        *png_items(2),
        {"image": "images/a.png", "label": 0},
        {"image": "images/b.png", "label": 0},
    ]
    path = write(site, {"modality": "XR", "num_classes": 2, "training": items})
    with pytest.raises(DatasetError, match="2 of 4 training items are unusable") as info:
        open_site(path, grid=GRID)
    assert "a.png" in str(info.value) and "b.png" in str(info.value)
    assert "on_error='skip'" in str(info.value)


def test_skip_option_reports_what_it_skipped(site: Path, caplog: pytest.LogCaptureFixture) -> None:
    (site / "images" / "broken.png").write_bytes(b"garbage")
    items = [
        *png_items(3),
        {"image": "images/broken.png", "label": 0},
        {"image": "images/x3.png", "label": 7},
    ]
    path = write(site, {"modality": "XR", "num_classes": 2, "training": items})
    with caplog.at_level(logging.WARNING, logger="core.data"):
        ds = open_site(path, grid=GRID, on_error="skip")
    assert isinstance(ds, SiteDataset)
    assert len(ds) == 3 and ds.labels.tolist() == [0, 1, 0]
    assert [(s.position, s.path.name) for s in ds.skipped] == [
        (3, "broken.png"),
        (4, "dataset.json"),
    ]
    assert "cannot be decoded" in ds.skipped[0].reason
    assert "label 7, out of range" in ds.skipped[1].reason
    assert "skipped 2 of 5 training items" in caplog.text


def test_skip_with_nothing_left_still_raises(site: Path) -> None:
    path = write(
        site, {"modality": "XR", "num_classes": 2, "training": [{"image": "nope.png", "label": 0}]}
    )
    with pytest.raises(DatasetError, match="has no usable item"):
        open_site(path, grid=GRID, on_error="skip")


def test_uncached_items_equal_cached(site: Path) -> None:
    items = [*png_items(), {"image": "images/v0.nii.gz", "label": 1, "modality": "CT"}]
    path = write(site, {"modality": "XR", "num_classes": 2, "training": items})
    cached, lazy = open_site(path, grid=GRID), open_site(path, grid=GRID, cache=False)
    for i in range(len(cached)):
        torch.testing.assert_close(cached[i]["image"], lazy[i]["image"], rtol=0, atol=0)
    assert cached.image_shape(cached.das[-1]) == tuple(cached[len(cached) - 1]["image"].shape)
