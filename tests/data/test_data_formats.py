"""Readers: real files round-trip with the right spacing, orientation and values; damaged files
fail at open with a DatasetError that names them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from core.data import DatasetError, GridConfig, open_site
from core.data.readers import (
    DEFAULT_SPACING_MM,
    FORMATS,
    TWO_D_DEPTH_SPACING_MM,
    image_format,
    read_image,
)

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    z: float = 0.0,
    series: str = "1.2.3",
    pixel_spacing: tuple[float, float] = (0.5, 0.6),
    with_pixels: bool = True,
    geometry: bool = True,
) -> None:
    """A CT slice written from scratch with pydicom (int16, HU = stored - 1024)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series
    ds.InstanceNumber = int(z * 10)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = list(pixel_spacing)
    ds.SliceThickness = 2.5
    if geometry:
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    if with_pixels:
        ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_datalist(folder: Path, items: list[dict], **fields: object) -> Path:
    doc = {"modality": "CT", "num_classes": 2, "training": items, **fields}
    path = folder / "dataset.json"
    path.write_text(json.dumps(doc))
    return path


# ------------------------------------------------------------------------------------- NIfTI


@pytest.fixture
def canonical_volume() -> np.ndarray:
    """(S, R, A) = (D, H, W) values the loader must give back whatever the file layout."""
    return np.random.default_rng(0).normal(size=(6, 10, 12)).astype(np.float32)


def test_nifti_layouts_all_come_back_depth_first(tmp_path: Path, canonical_volume) -> None:
    vol = canonical_volume
    # 1. stored (R, A, S), the usual order
    nib.save(
        nib.Nifti1Image(vol.transpose(1, 2, 0), np.diag([0.7, 0.8, 5.0, 1.0])), tmp_path / "ras.nii"
    )
    # 2. thick axis first in the file: (S, R, A)
    affine = np.zeros((4, 4))
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = 5.0, 0.7, 0.8, 1.0
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "sra.nii.gz")
    # 3. (L, A, S): x reversed, as DICOM converters often store it
    flipped = np.ascontiguousarray(vol.transpose(1, 2, 0)[::-1])
    nib.save(nib.Nifti1Image(flipped, np.diag([-0.7, 0.8, 5.0, 1.0])), tmp_path / "las.nii.gz")
    for name in ("ras.nii", "sra.nii.gz", "las.nii.gz"):
        volume = read_image(tmp_path / name)
        assert volume.array.shape == (1, 6, 10, 12), name
        np.testing.assert_array_equal(volume.array[0], vol, err_msg=name)
        assert volume.array.flags.c_contiguous, name  # the depth-first copy, however stored
        np.testing.assert_allclose(volume.spacing, (5.0, 0.7, 0.8), rtol=1e-6)
        assert volume.calibrated


def test_nifti_scaling_is_applied(tmp_path: Path) -> None:
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_slope_inter(2.0, -1024.0)
    nib.save(image, tmp_path / "scaled.nii")
    volume = read_image(tmp_path / "scaled.nii")
    assert volume.array.min() == -1024.0
    assert volume.array.max() == 23 * 2.0 - 1024.0


def test_real_nibabel_header_anatomical() -> None:
    path = NIBABEL_DATA / "anatomical.nii"
    raw = np.asarray(nib.load(path).get_fdata(), dtype=np.float32)  # (33, 41, 25), LAS
    volume = read_image(path)
    assert volume.array.shape == (1, 25, 33, 41)  # isotropic 2 mm: axial slices are depth
    assert volume.spacing == (2.0, 2.0, 2.0)
    # x was stored right-to-left (affine -2): the canonical R axis reverses it.
    np.testing.assert_array_equal(volume.array[0], raw[::-1].transpose(2, 0, 1))


def test_real_nibabel_header_anatomical_on_grid(tmp_path: Path) -> None:
    items = [{"image": str(NIBABEL_DATA / "anatomical.nii"), "label": 1}]
    path = write_datalist(tmp_path, items, modality="MR")
    site = open_site(path, grid=GridConfig(in_plane=(64, 64)))
    item = site[0]
    # in-plane resized 33x41 -> 64x64: spacing scales by old / new size; depth kept
    assert item["spacing"].tolist() == [2.0, 2.0 * 33 / 64, 2.0 * 41 / 64]
    assert site.das == (0,)  # 2 / 1.03125 < 2
    assert item["image"].shape == (1, 32, 64, 64)  # 25 slices padded to the DA-0 patch, 16
    assert item["image"].dtype == torch.float32 and item["spacing"].dtype == torch.float64


def test_real_nibabel_4d_file_reads_channels() -> None:
    path = NIBABEL_DATA / "example4d.nii.gz"
    raw = np.asarray(nib.load(path).get_fdata(), dtype=np.float32)  # (128, 96, 24, 2)
    volume = read_image(path)
    assert volume.array.shape == (2, 24, 128, 96)  # 4th axis = channels; 2.2 mm axis = depth
    np.testing.assert_allclose(volume.spacing, (2.2, 2.0, 2.0), rtol=1e-6)
    np.testing.assert_array_equal(volume.array[1], raw[::-1, :, :, 1].transpose(2, 0, 1))


def test_nifti_with_one_slice_is_2d(tmp_path: Path) -> None:
    nib.save(
        nib.Nifti1Image(np.ones((8, 16, 1), np.float32), np.diag([0.5, 0.5, 3, 1])),
        tmp_path / "a.nii",
    )
    volume = read_image(tmp_path / "a.nii")
    assert volume.array.shape == (1, 1, 8, 16)
    assert volume.spacing == (TWO_D_DEPTH_SPACING_MM, 0.5, 0.5)


# ------------------------------------------------------------------------------------- DICOM


def test_real_pydicom_ct_slice() -> None:
    path = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(path)
    volume = read_image(path)
    assert volume.array.shape == (1, 1, 128, 128)
    assert volume.spacing == (TWO_D_DEPTH_SPACING_MM, 0.661468, 0.661468)
    # HU through the modality LUT: slope 1, intercept -1024; an axial LPS slice turned to RAS
    # like a series slice: both in-plane axes reverse, R (from the columns) becomes H.
    expected = (ds.pixel_array.astype(np.float32) - 1024)[::-1, ::-1].T
    np.testing.assert_array_equal(volume.array[0, 0], expected)


def test_real_pydicom_mr_slice_on_grid(tmp_path: Path) -> None:
    path = write_datalist(
        tmp_path, [{"image": get_testdata_file("MR_small.dcm"), "label": 0}], modality="MR"
    )
    site = open_site(path, grid=GridConfig(in_plane=(32, 32)))
    assert site[0]["spacing"].tolist() == [TWO_D_DEPTH_SPACING_MM, 0.625, 0.625]  # 0.3125*64/32
    assert site.das == (5,)
    assert site[0]["image"].shape == (1, 1, 32, 32)


def test_dicom_series_folder_sorted_by_position(tmp_path: Path) -> None:
    series = tmp_path / "series"
    series.mkdir()
    rows, cols = 6, 5
    base = np.arange(rows * cols).reshape(rows, cols)
    # file names deliberately not in slice order
    for name, k in (("b.dcm", 2), ("a.dcm", 0), ("c.dcm", 3), ("d.dcm", 1)):
        write_dicom(series / name, base + 1000 * k, z=10.0 + 2.5 * k)
    volume = read_image(series)
    assert volume.spacing == pytest.approx((2.5, 0.6, 0.5))  # (slice gap, col, row spacing)
    assert volume.array.shape == (1, 4, cols, rows)
    for k in range(4):
        # LPS rows/cols -> RAS: both in-plane axes reverse; R follows columns, A follows rows.
        expected = (base + 1000 * k - 1024)[::-1, ::-1].T
        np.testing.assert_array_equal(volume.array[0, k], expected)


def test_dicom_series_without_geometry_uses_instance_number(tmp_path: Path) -> None:
    series = tmp_path / "series"
    series.mkdir()
    for k in range(3):
        write_dicom(series / f"{k}.dcm", np.full((4, 4), k), z=k, geometry=False)
    volume = read_image(series)
    assert volume.spacing == (2.5, 0.5, 0.6)  # SliceThickness, PixelSpacing
    assert volume.array[0, :, 0, 0].tolist() == [-1024.0, -1023.0, -1022.0]


def test_dicom_without_pixel_data_fails_at_open(tmp_path: Path) -> None:
    write_dicom(tmp_path / "nopixels.dcm", np.zeros((4, 4)), with_pixels=False)
    path = write_datalist(tmp_path, [{"image": "nopixels.dcm", "label": 0}])
    with pytest.raises(DatasetError, match=r"nopixels.dcm.*no pixel data"):
        open_site(path)


def test_dicom_with_short_pixel_data_fails_at_open(tmp_path: Path) -> None:
    write_dicom(tmp_path / "short.dcm", np.zeros((4, 4)))
    ds = pydicom.dcmread(tmp_path / "short.dcm")
    ds.PixelData = ds.PixelData[:10]
    ds.save_as(tmp_path / "short.dcm")
    path = write_datalist(tmp_path, [{"image": "short.dcm", "label": 0}])
    with pytest.raises(DatasetError, match=r"short.dcm.*cannot be decoded"):
        open_site(path)


def test_dicom_folder_mixing_series_fails(tmp_path: Path) -> None:
    series = tmp_path / "mixed"
    series.mkdir()
    write_dicom(series / "a.dcm", np.zeros((4, 4)), series="1.1")
    write_dicom(series / "b.dcm", np.zeros((4, 4)), z=1.0, series="1.2")
    with pytest.raises(DatasetError, match=r"mixed.*2 DICOM series"):
        read_image(series)


def test_not_a_dicom_file(tmp_path: Path) -> None:
    (tmp_path / "fake.dcm").write_bytes(b"\x00" * 300)
    with pytest.raises(DatasetError, match=r"fake.dcm.*not a DICOM file"):
        read_image(tmp_path / "fake.dcm")


# ---------------------------------------------------------------------------------- PNG / JPEG


def test_png_8_and_16_bit_and_rgb(tmp_path: Path) -> None:
    grey = np.arange(50 * 70, dtype=np.uint16).reshape(50, 70)
    Image.fromarray((grey % 256).astype(np.uint8)).save(tmp_path / "g8.png")
    Image.fromarray(grey).save(tmp_path / "g16.png")
    rgb = np.stack([np.full((50, 70), v, np.uint8) for v in (10, 20, 30)], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    g16 = read_image(tmp_path / "g16.png", (0.5, 0.6))
    assert g16.array.shape == (1, 1, 50, 70)
    assert g16.array.max() == 50 * 70 - 1  # 16 bits kept, not squashed to 8
    assert g16.spacing == (TWO_D_DEPTH_SPACING_MM, 0.5, 0.6)
    assert not g16.calibrated
    assert read_image(tmp_path / "g8.png").spacing == (
        TWO_D_DEPTH_SPACING_MM,
        DEFAULT_SPACING_MM,
        1.0,
    )
    colour = read_image(tmp_path / "rgb.png")
    assert colour.array.shape == (3, 1, 50, 70)
    assert colour.array[:, 0, 0, 0].tolist() == [10.0, 20.0, 30.0]


def test_rgb_png_becomes_grey_or_keeps_channels_on_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    path = write_datalist(
        tmp_path, [{"image": "rgb.png", "label": 1, "spacing": [0.5, 0.5]}], modality="XR"
    )
    assert open_site(path, grid=GridConfig(in_plane=(32, 32)))[0]["image"].shape == (1, 1, 32, 32)
    three = open_site(path, grid=GridConfig(in_plane=(32, 32), channels=3))
    assert three[0]["image"].shape == (3, 1, 32, 32)
    assert three[0]["spacing"].tolist() == [TWO_D_DEPTH_SPACING_MM, 0.625, 0.625]
    with pytest.raises(DatasetError, match=r"rgb.png.*3 channels.*GridConfig\(channels=3\)"):
        open_site(path, grid=GridConfig(in_plane=(32, 32), channels=2))


def test_jpeg_reads(tmp_path: Path) -> None:
    Image.fromarray(np.full((16, 32), 77, np.uint8)).save(tmp_path / "x.jpg")
    volume = read_image(tmp_path / "x.jpg", (0.2, 0.2))
    assert volume.array.shape == (1, 1, 16, 32)
    assert abs(float(volume.array.mean()) - 77.0) < 1.0


# ----------------------------------------------------------------------------- damaged files


def _nifti_bytes(tmp_path: Path, name: str) -> bytes:
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), tmp_path / name)
    return (tmp_path / name).read_bytes()


@pytest.mark.parametrize("name", ["bad.nii", "bad.nii.gz"])
def test_truncated_nifti_fails_at_open_naming_the_file(tmp_path: Path, name: str) -> None:
    data = _nifti_bytes(tmp_path, name)
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    path = write_datalist(tmp_path, [{"image": name, "label": 0}])
    with pytest.raises(DatasetError, match=f"{name}: NIfTI file is truncated or corrupt") as info:
        open_site(path)
    assert info.value.path == tmp_path / name
    assert "Fix:" in str(info.value)


def test_corrupt_nifti_fails(tmp_path: Path) -> None:
    (tmp_path / "junk.nii").write_bytes(os.urandom(400))
    with pytest.raises(DatasetError, match=r"junk.nii: NIfTI file is truncated or corrupt"):
        read_image(tmp_path / "junk.nii")


def test_nifti_with_nan_fails(tmp_path: Path) -> None:
    data = np.ones((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii")
    with pytest.raises(DatasetError, match=r"nan.nii.*NaN"):
        read_image(tmp_path / "nan.nii")


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_unreadable_png_fails_at_open(tmp_path: Path, kind: str) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(
        tmp_path / "x.png"
    )
    data = (tmp_path / "x.png").read_bytes()
    (tmp_path / "x.png").write_bytes(
        data[: len(data) // 2] if kind == "truncated" else b"not a png"
    )
    path = write_datalist(tmp_path, [{"image": "x.png", "label": 0}], modality="XR")
    with pytest.raises(DatasetError, match=r"x.png: image cannot be decoded"):
        open_site(path)


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nowhere.nii.gz: image file not found"):
        read_image(tmp_path / "nowhere.nii.gz")
    (tmp_path / "x.bmp").write_bytes(b"BM")
    with pytest.raises(DatasetError, match=r"x.bmp: unsupported image format"):
        read_image(tmp_path / "x.bmp")


def test_the_format_table_dispatches_every_suffix_to_its_reader(tmp_path: Path) -> None:
    """One table: each format's suffixes name it, and only NIfTI is recognised inside gzip."""
    assert list(FORMATS) == ["dicom", "nifti", "pillow"]
    for fmt in FORMATS.values():
        for suffix in fmt.suffixes:
            path = tmp_path / f"image{suffix.upper()}"
            path.write_bytes(b"")
            assert image_format(path) == fmt.name
    assert [f.name for f in FORMATS.values() if f.gzipped] == ["nifti"]
