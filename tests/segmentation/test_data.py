"""Segmentation datalists: masks read with their image's geometry, nearest-neighbour onto the
same grid, and clear errors (file, what differs, fix) when the two grids disagree."""

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from core.data import DatasetError, GridConfig
from core.data.segmentation import open_segmentation_site


def write_site(root, pairs, *, num_classes=2, extra=None):
    """pairs: list of (image name, mask name, item extras); writes dataset.json."""
    items = [{"image": img, "label": mask, **(more or {})} for img, mask, more in pairs]
    doc = {"num_classes": num_classes, "modality": "CT", "training": items, **(extra or {})}
    (root / "dataset.json").write_text(json.dumps(doc))
    return root / "dataset.json"


def nifti(path, array, affine):
    nib.save(nib.Nifti1Image(array, affine), str(path))


def blob(shape):
    mask = np.zeros(shape, dtype=np.int16)
    mask[1:3, 2:5, 3:7] = 1
    return mask


def test_mask_follows_its_image_through_reorientation_and_resampling(tmp_path):
    # stored with the thick axis first and flipped: the reader reorients both the same way
    mask = blob((4, 16, 16))
    affine = np.diag([-5.0, 0.8, 0.8, 1.0])
    nifti(tmp_path / "img.nii.gz", (mask * 200 - 100).astype(np.int16), affine)
    nifti(tmp_path / "msk.nii.gz", mask, affine)
    site = write_site(tmp_path, [("img.nii.gz", "msk.nii.gz", None)])
    ds = open_segmentation_site(site, grid=GridConfig(in_plane=(32, 32)))
    item = ds[0]
    assert item["label"].shape == (1, *item["image"].shape[1:]) == (1, 4, 32, 32)
    assert item["label"].dtype.is_floating_point is False
    assert set(item["label"].unique().tolist()) == {0, 1}
    image, label = item["image"], item["label"].bool()
    bright = image > (image.min() + image.max()) / 2  # the lesion as the image shows it
    overlap = (bright & label).sum() / (bright | label).sum()
    assert overlap > 0.8  # the same voxels, not shifted or flipped ones


def test_2d_png_mask_with_a_datalist_label_path(tmp_path):
    image = np.zeros((20, 24), dtype=np.uint8)
    image[5:10, 6:12] = 200
    mask = (image > 0).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    Image.fromarray(mask).save(tmp_path / "x_mask.png")
    site = write_site(
        tmp_path, [("x.png", "x_mask.png", {"spacing": [0.5, 0.5]})], extra={"modality": "XR"}
    )
    item = open_segmentation_site(site, grid=GridConfig(in_plane=(32, 32)))[0]
    assert item["label"].shape == (1, 1, 32, 32)
    assert set(item["label"].unique().tolist()) == {0, 1}
    assert float(item["image"][item["label"].bool()].mean()) > 0.9


def test_phantom_item_with_class_label_and_mask_field(tmp_path):
    from core.data.phantoms import generate_hospitals

    paths = generate_hospitals(tmp_path, "segmentation", n_sites=1, alpha=None)
    ds = open_segmentation_site(paths[0], "validation", grid=GridConfig(in_plane=(32, 32)))
    assert len(ds) > 0
    assert any(ds[i]["label"].any() for i in range(len(ds)))


@pytest.mark.parametrize(
    ("mask_shape", "mask_affine", "match"),
    [
        ((4, 16, 12), np.diag([5.0, 0.8, 0.8, 1.0]), "grid"),
        ((4, 16, 16), np.diag([5.0, 0.7, 0.7, 1.0]), "spacing"),
        (
            (4, 16, 16),
            np.array([[5.0, 0, 0, 10], [0, 0.8, 0, 0], [0, 0, 0.8, 0], [0, 0, 0, 1]]),
            "another region",
        ),
    ],
    ids=["shape", "spacing", "shifted"],
)
def test_geometry_mismatch_names_the_mask_and_the_fix(tmp_path, mask_shape, mask_affine, match):
    nifti(tmp_path / "img.nii", blob((4, 16, 16)), np.diag([5.0, 0.8, 0.8, 1.0]))
    nifti(tmp_path / "msk.nii", blob(mask_shape), mask_affine)
    site = write_site(tmp_path, [("img.nii", "msk.nii", None)])
    with pytest.raises(DatasetError, match=match) as err:
        open_segmentation_site(site)
    assert err.value.path.name == "msk.nii"
    assert "nearest neighbour" in err.value.fix


@pytest.mark.parametrize(
    ("values", "match"),
    [(np.float32(0.5), "fractional"), (np.float32(255.0), "0/255"), (np.float32(3.0), "0..1")],
)
def test_mask_values_must_be_class_indices(tmp_path, values, match):
    mask = blob((4, 16, 16)).astype(np.float32) * values
    nifti(tmp_path / "img.nii", blob((4, 16, 16)), np.eye(4))
    nifti(tmp_path / "msk.nii", mask, np.eye(4))
    site = write_site(tmp_path, [("img.nii", "msk.nii", None)])
    with pytest.raises(DatasetError, match=match):
        open_segmentation_site(site)


def test_item_without_a_mask_is_refused(tmp_path):
    nifti(tmp_path / "img.nii", blob((4, 16, 16)), np.eye(4))
    (tmp_path / "dataset.json").write_text(
        json.dumps({"num_classes": 2, "modality": "CT", "training": [{"image": "img.nii"}]})
    )
    with pytest.raises(DatasetError, match="no mask file"):
        open_segmentation_site(tmp_path / "dataset.json")
