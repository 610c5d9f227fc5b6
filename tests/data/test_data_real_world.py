"""Inputs as hospitals and tools produce them (issue 15): legal files that used to crash the
readers or, worse, come back with wrong grey values or spacings without a word.

Every file is real and written to disk: DICOM with pydicom (or pydicom's bundled test files),
NIfTI with nibabel, 2D images with Pillow.

Over 500 lines: one test per real-world file quirk, sharing the file writers defined here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from core.data import DatasetError, GridConfig, open_site
from core.data.readers import TWO_D_DEPTH_SPACING_MM, image_format, read_image

GRID = GridConfig(in_plane=(16, 16))


def dicom(path: Path, pixels: np.ndarray, **attributes: object) -> Path:
    """Write a minimal single-frame image (uint16, MONOCHROME2, 12 bits stored) and return
    its path; ``attributes`` override or add elements (``None`` writes an empty element,
    ``...`` leaves the element out)."""
    meta = FileMetaDataset()
    sop_class = attributes.pop("SOPClassUID", CTImageStorage)
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    for keyword, value in attributes.items():
        if value is ...:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def axial(z: float, **attributes: object) -> dict[str, object]:
    return {
        "ImagePositionPatient": [0.0, 0.0, z],
        "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
        "PixelSpacing": [0.5, 0.5],
        **attributes,
    }


def datalist(folder: Path, items: list[dict], **fields: object) -> Path:
    doc = {"modality": "CT", "num_classes": 2, "training": items, **fields}
    path = folder / "dataset.json"
    path.write_text(json.dumps(doc))
    return path


# ------------------------------------------------ DICOM attributes: absent, empty, multi-valued


def test_dx_pixel_spacing_with_one_value_is_isotropic_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = dicom(
        tmp_path / "dx.dcm",
        np.zeros((8, 10), np.uint16),
        SOPClassUID=DigitalXRayImageStorageForPresentation,
        Modality="DX",
        PixelSpacing=0.2,  # VM 1 where the standard says 2
    )
    with caplog.at_level(logging.WARNING, logger="core.data.readers"):
        volume = read_image(path)
    assert volume.spacing == (TWO_D_DEPTH_SPACING_MM, 0.2, 0.2)
    assert "PixelSpacing" in caplog.text and "dx.dcm" in caplog.text
    site = open_site(datalist(tmp_path, [{"image": "dx.dcm", "label": 0}]), grid=GRID)
    assert site.spacings[0].tolist() == [TWO_D_DEPTH_SPACING_MM, 0.1, 0.125]


def test_pixel_spacing_that_is_not_a_number_names_file_and_attribute(tmp_path: Path) -> None:
    path = dicom(
        tmp_path / "bad.dcm", np.zeros((4, 4), np.uint16), PixelSpacing=["0.5", "0.5", "1"]
    )
    with pytest.raises(DatasetError, match=r"bad.dcm: .*PixelSpacing.*3 values"):
        read_image(path)
    items = [{"image": "bad.dcm", "label": 0}, {"image": "ok.dcm", "label": 1}]
    dicom(tmp_path / "ok.dcm", np.zeros((4, 4), np.uint16), PixelSpacing=[0.5, 0.5])
    site = open_site(datalist(tmp_path, items), grid=GRID, on_error="skip")  # no TypeError
    assert [s.path.name for s in site.skipped] == ["bad.dcm"]


def test_orientation_that_is_not_numeric_is_a_dataset_error(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    for k in range(2):
        text = ["1", "0", "0", "0", "1", "0"]  # encoded as 1\\0\\0\\0\\1\\0
        dicom(
            folder / f"{k}.dcm",
            np.zeros((4, 4), np.uint16),
            **axial(k, ImageOrientationPatient=text),
        )
    raw = (folder / "1.dcm").read_bytes()
    assert raw.count(b"1\\0\\0\\0\\1\\0") == 1  # the encoded orientation, patched in place
    (folder / "1.dcm").write_bytes(raw.replace(b"1\\0\\0\\0\\1\\0", b"a\\b\\c\\d\\e\\f"))
    with pytest.raises(DatasetError, match=r"1.dcm: .*ImageOrientationPatient"):
        read_image(folder)


def test_series_without_positions_and_empty_instance_number(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    for k in range(3):  # Type 2 InstanceNumber present but empty; no ImagePositionPatient
        dicom(
            folder / f"{k:03d}.dcm",
            np.full((4, 4), k, np.uint16),
            InstanceNumber=None,
            PixelSpacing=[0.5, 0.5],
            SliceThickness=2.0,
        )
    with caplog.at_level(logging.WARNING, logger="core.data.readers"):
        volume = read_image(folder)
    assert volume.array[0, :, 0, 0].tolist() == [0.0, 1.0, 2.0]  # file-name order, reported
    assert volume.spacing == (2.0, 0.5, 0.5)
    assert "InstanceNumber" in caplog.text


def test_series_without_positions_sorts_by_slice_location_when_numbers_are_missing(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    for name, k in (("a.dcm", 2), ("b.dcm", 0), ("c.dcm", 1)):
        dicom(
            folder / name,
            np.full((4, 4), k, np.uint16),
            InstanceNumber=None if k == 1 else k + 1,
            SliceLocation=-10.0 + 3 * k,
            SliceThickness=3.0,
        )
    volume = read_image(folder)
    assert volume.array[0, :, 0, 0].tolist() == [0.0, 1.0, 2.0]


# ------------------------------------------------------------------------ where spacing lives


def test_imager_pixel_spacing_is_used_and_pixel_spacing_wins_when_both(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pixels = np.zeros((4, 4), np.uint16)
    only_imager = dicom(tmp_path / "a.dcm", pixels, ImagerPixelSpacing=[0.15, 0.15])
    assert read_image(only_imager).spacing[1:] == (0.15, 0.15)
    both = dicom(
        tmp_path / "b.dcm", pixels, ImagerPixelSpacing=[0.15, 0.15], PixelSpacing=[0.1, 0.1]
    )
    with caplog.at_level(logging.WARNING, logger="core.data.readers"):
        assert read_image(both).spacing[1:] == (0.1, 0.1)
    assert "ImagerPixelSpacing" in caplog.text and "b.dcm" in caplog.text


def test_positions_win_over_spacing_between_slices_and_say_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    for k in range(3):  # thick overlapping slices (5 mm every 2.5 mm) are legal: no warning
        where = axial(2.5 * k, SliceThickness=5.0, SpacingBetweenSlices=2.5 if k else 4.0)
        dicom(folder / f"{k}.dcm", np.zeros((4, 4), np.uint16), **where)
    with caplog.at_level(logging.WARNING, logger="core.data.readers"):
        assert read_image(folder).spacing[0] == pytest.approx(2.5)
    assert caplog.text.count("SpacingBetweenSlices says 4 mm") == 1
    assert "SliceThickness" not in caplog.text


def _enhanced_ct(path: Path, frames: np.ndarray, positions: list[list[float]] | None) -> Path:
    """An Enhanced CT file: spacing and orientation shared, positions and rescale per frame."""
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [0.4, 0.7]
    measures.SliceThickness = 1.0
    shared.PixelMeasuresSequence = DicomSequence([measures])
    plane = Dataset()
    plane.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = DicomSequence([plane])
    transform = Dataset()
    transform.RescaleSlope = 1
    transform.RescaleIntercept = -1024
    transform.RescaleType = "HU"
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    per_frame = []
    for position in positions or []:
        item = Dataset()
        where = Dataset()
        where.ImagePositionPatient = position
        item.PlanePositionSequence = DicomSequence([where])
        per_frame.append(item)
    attributes: dict[str, object] = {
        "SOPClassUID": EnhancedCTImageStorage,
        "NumberOfFrames": len(frames),
        "SharedFunctionalGroupsSequence": DicomSequence([shared]),
        "Rows": frames.shape[1],
        "Columns": frames.shape[2],
    }
    if positions is not None:
        attributes["PerFrameFunctionalGroupsSequence"] = DicomSequence(per_frame)
    return dicom(path, frames, **attributes)


def test_enhanced_multiframe_spacing_from_functional_groups(tmp_path: Path) -> None:
    frames = np.stack([np.full((6, 5), 1000 + k, np.uint16) for k in range(4)])
    # frames stored out of order; 2.5 mm apart along z
    zs = [5.0, 0.0, 7.5, 2.5]
    path = _enhanced_ct(tmp_path / "enhanced.dcm", frames, [[0.0, 0.0, z] for z in zs])
    volume = read_image(path)
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.4))  # (gap, col, row spacing) in RAS
    assert volume.array.shape == (1, 4, 5, 6)
    order = np.argsort(zs)
    assert volume.array[0, :, 0, 0].tolist() == [float(1000 + k - 1024) for k in order]


def test_multiframe_without_frame_positions_is_refused_by_name(tmp_path: Path) -> None:
    frames = np.zeros((3, 4, 4), np.uint16)
    path = _enhanced_ct(tmp_path / "cine.dcm", frames, positions=None)
    with pytest.raises(DatasetError, match=r"cine.dcm: .*3 frames.*ImagePositionPatient"):
        read_image(path)


def _patch_nifti_pixdim(path: Path, pixdim: tuple[float, float, float]) -> None:
    raw = bytearray(path.read_bytes())
    raw[80:92] = np.asarray(pixdim, "<f4").tobytes()  # pixdim[1:4], NIfTI-1 header offset 76
    path.write_bytes(bytes(raw))


def test_nifti_spacing_follows_the_sform_not_pixdim(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = np.random.default_rng(0).normal(size=(16, 16, 4)).astype(np.float32)
    path = tmp_path / "sform.nii"
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 3.0, 1.0])), path)
    _patch_nifti_pixdim(path, (1.0, 1.0, 1.0))
    assert nib.load(path).header.get_zooms()[:3] == (1.0, 1.0, 1.0)
    with caplog.at_level(logging.WARNING, logger="core.data.readers"):
        volume = read_image(path)
    assert volume.spacing == (3.0, 0.5, 0.5)
    assert "pixdim" in caplog.text and "sform" in caplog.text
    site = open_site(
        datalist(tmp_path, [{"image": "sform.nii", "label": 0}], modality="MR"), grid=GRID
    )
    assert site.das == (2,)  # 3 mm / 0.5 mm = 6: DA 2 (pixdim's 1 / 1 would give DA 0)


def test_nifti_qform_used_when_sform_is_unset_and_disagreement_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = np.zeros((6, 6, 3), np.float32)
    image = nib.Nifti1Image(data, None)
    image.set_qform(np.diag([0.8, 0.8, 4.0, 1.0]), code=1)
    image.set_sform(None, code=0)
    nib.save(image, tmp_path / "q.nii")
    assert read_image(tmp_path / "q.nii").spacing == pytest.approx((4.0, 0.8, 0.8))
    both = nib.Nifti1Image(data, None)
    both.set_qform(np.diag([0.8, 0.8, 4.0, 1.0]), code=1)
    both.set_sform(np.diag([0.8, 0.8, 2.0, 1.0]), code=2)
    nib.save(both, tmp_path / "both.nii")
    with caplog.at_level(logging.WARNING, logger="core.data.readers"):
        assert read_image(tmp_path / "both.nii").spacing == pytest.approx((2.0, 0.8, 0.8))
    assert "qform" in caplog.text and "both.nii" in caplog.text


def test_nifti_without_sform_or_qform_keeps_voxel_order_and_pixdim(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(size=(5, 6, 3)).astype(np.float32)
    image = nib.Nifti1Image(data, None)
    image.header.set_zooms((0.9, 0.8, 4.0))
    image.set_sform(None, code=0)
    image.set_qform(None, code=0)
    nib.save(image, tmp_path / "bare.nii")
    volume = read_image(tmp_path / "bare.nii")  # NIfTI method 1: no orientation, no flips
    np.testing.assert_array_equal(volume.array[0], data.transpose(2, 0, 1))
    assert volume.spacing == pytest.approx((4.0, 0.9, 0.8))


# ---------------------------------------------------------------- photometric interpretations


def test_palette_color_is_mapped_through_the_lut() -> None:
    path = Path(get_testdata_file("examples_palette.dcm"))
    ds = pydicom.dcmread(path)
    expected = apply_color_lut(ds.pixel_array, ds).astype(np.float32)  # (H, W, 3)
    volume = read_image(path)
    assert volume.array.shape == (3, 1, ds.Rows, ds.Columns)
    np.testing.assert_array_equal(volume.array[:, 0], np.moveaxis(expected, -1, 0))
    assert not np.array_equal(volume.array[0, 0], ds.pixel_array)  # not the indices


def test_palette_color_site_on_a_grey_grid_is_the_luma_of_the_colours(tmp_path: Path) -> None:
    path = datalist(
        tmp_path, [{"image": get_testdata_file("examples_palette.dcm"), "label": 0}], modality="XR"
    )
    grey = open_site(path, grid=GRID)[0]["image"]
    assert grey.shape == (1, 1, 16, 16)
    colour = open_site(path, grid=GridConfig(in_plane=(16, 16), channels=3))[0]["image"]
    assert colour.shape == (3, 1, 16, 16)
    assert not torch.equal(colour[0], colour[2])  # real colours, not grey repeated
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1, 1)  # ITU-R BT.601
    torch.testing.assert_close(grey, (colour * luma).sum(dim=0, keepdim=True))


def test_palette_without_its_lookup_table_is_a_dataset_error(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    del ds.RedPaletteColorLookupTableData  # pydicom's ValueError must leave as a DatasetError
    ds.save_as(tmp_path / "nolut.dcm")
    with pytest.raises(DatasetError, match=r"nolut.dcm: .*Palette Color Lookup Table"):
        read_image(tmp_path / "nolut.dcm")
    items = [{"image": "nolut.dcm", "label": 0}, {"image": "ok.dcm", "label": 1}]
    dicom(tmp_path / "ok.dcm", np.zeros((4, 4), np.uint16))
    site = open_site(datalist(tmp_path, items, modality="XR"), grid=GRID, on_error="skip")
    assert [s.path.name for s in site.skipped] == ["nolut.dcm"]


def test_monochrome1_series_is_inverted_once_with_one_range(tmp_path: Path) -> None:
    folder = tmp_path / "m1"
    folder.mkdir()
    ranges = [(100, 200), (100, 3000), (150, 151)]
    for k, (low, high) in enumerate(ranges):
        pixels = np.full((4, 4), 150, np.uint16)
        pixels[0, 0], pixels[0, 1] = low, high
        dicom(folder / f"{k}.dcm", pixels, PhotometricInterpretation="MONOCHROME1", **axial(k))
    volume = read_image(folder)
    # stored value 150 is the same tissue in every slice: one inversion over the 12-bit range
    values = volume.array[0, :, 2, 2]
    assert values.tolist() == [4095.0 - 150.0] * 3


def test_monochrome1_single_files_of_one_site_agree(tmp_path: Path) -> None:
    for name, high in (("a.dcm", 300), ("b.dcm", 4000)):
        pixels = np.full((4, 4), 200, np.uint16)
        pixels[0, 0] = high
        dicom(
            tmp_path / name,
            pixels,
            PhotometricInterpretation="MONOCHROME1",
            RescaleSlope=2,
            RescaleIntercept=-100,
        )
    a, b = read_image(tmp_path / "a.dcm"), read_image(tmp_path / "b.dcm")
    assert a.array[0, 0, 2, 2] == b.array[0, 0, 2, 2]
    # modality range -100 .. 4095 * 2 - 100; inverted: low + high - value
    assert a.array[0, 0, 2, 2] == -100 + (4095 * 2 - 100) - (200 * 2 - 100)


@pytest.mark.parametrize("interpretation", ["HSV", "ARGB", "CMYK", "YBR_PARTIAL_420"])
def test_unsupported_photometric_interpretation_is_refused_by_name(
    tmp_path: Path, interpretation: str
) -> None:
    path = dicom(
        tmp_path / "x.dcm",
        np.zeros((4, 4, 3), np.uint8),
        PhotometricInterpretation=interpretation,
        SamplesPerPixel=3,
        PlanarConfiguration=0,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
    )
    with pytest.raises(
        DatasetError, match=rf"x.dcm: .*PhotometricInterpretation '{interpretation}'"
    ):
        read_image(path)


def test_missing_photometric_interpretation_names_the_attribute(tmp_path: Path) -> None:
    path = dicom(tmp_path / "x.dcm", np.zeros((4, 4), np.uint16), PhotometricInterpretation=...)
    with pytest.raises(DatasetError, match=r"x.dcm: .*PhotometricInterpretation"):
        read_image(path)


# ---------------------------------------------------------------------- geometry not represented


def test_tilted_stack_is_refused_naming_the_series(tmp_path: Path) -> None:
    folder = tmp_path / "tilted"
    folder.mkdir()
    for k in range(4):  # gantry tilt: each slice also moves 0.9 mm in y
        dicom(folder / f"{k}.dcm", np.zeros((4, 4), np.uint16), **axial(2.0 * k))
        ds = pydicom.dcmread(folder / f"{k}.dcm")
        ds.ImagePositionPatient = [0.0, 0.9 * k, 2.0 * k]
        ds.save_as(folder / f"{k}.dcm")
    with pytest.raises(DatasetError, match=r"tilted: .*sheared.*tilt"):
        read_image(folder)


def test_slices_with_different_orientations_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    dicom(folder / "0.dcm", np.zeros((4, 4), np.uint16), **axial(0.0))
    dicom(
        folder / "1.dcm",
        np.zeros((4, 4), np.uint16),
        **axial(2.0, ImageOrientationPatient=[0, 1, 0, 0, 0, -1]),
    )
    with pytest.raises(DatasetError, match=r"mixed: .*ImageOrientationPatient differs"):
        read_image(folder)


def test_uneven_slice_gaps_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "gaps"
    folder.mkdir()
    for k, z in enumerate((0.0, 2.0, 4.0, 9.0)):
        dicom(folder / f"{k}.dcm", np.zeros((4, 4), np.uint16), **axial(z))
    with pytest.raises(DatasetError, match=r"gaps: slice gaps are uneven"):
        read_image(folder)


def test_sheared_nifti_affine_is_refused(tmp_path: Path) -> None:
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    affine[1, 2] = 0.8  # the slice axis leans along y: voxels are parallelepipeds
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), affine), tmp_path / "shear.nii")
    with pytest.raises(DatasetError, match=r"shear.nii: .*sheared"):
        read_image(tmp_path / "shear.nii")


# -------------------------------------------------------------------------- colour in NIfTI


def _rgb_nifti(path: Path, shape: tuple[int, ...], with_alpha: bool = False) -> np.ndarray:
    fields = [("R", "u1"), ("G", "u1"), ("B", "u1")] + ([("A", "u1")] if with_alpha else [])
    data = np.zeros(shape, dtype=fields)
    rng = np.random.default_rng(0)
    for name, _ in fields:
        data[name] = rng.integers(0, 255, shape)
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 2.0, 1.0])), path)
    return data


def test_rgb24_nifti_reads_as_colour(tmp_path: Path) -> None:
    data = _rgb_nifti(tmp_path / "rgb.nii.gz", (6, 5, 3))
    volume = read_image(tmp_path / "rgb.nii.gz")
    assert volume.array.shape == (3, 3, 6, 5)
    assert volume.spacing == (2.0, 0.5, 0.5)
    for channel, name in enumerate("RGB"):
        np.testing.assert_array_equal(volume.array[channel], data[name].transpose(2, 0, 1))
    assert not volume.calibrated  # colours are display values, not physical units


def test_rgba_nifti_drops_alpha_and_rgb_time_series_is_refused(tmp_path: Path) -> None:
    data = _rgb_nifti(tmp_path / "rgba.nii", (4, 4, 2), with_alpha=True)
    volume = read_image(tmp_path / "rgba.nii")
    assert volume.array.shape == (3, 2, 4, 4)
    np.testing.assert_array_equal(volume.array[2], data["B"].transpose(2, 0, 1))
    _rgb_nifti(tmp_path / "rgb4d.nii", (4, 4, 2, 3))
    with pytest.raises(DatasetError, match=r"rgb4d.nii: .*RGB24.*4 dimensions"):
        read_image(tmp_path / "rgb4d.nii")


# ---------------------------------------------------------------------- file type by content


def test_dicom_named_by_its_uid_is_read(tmp_path: Path) -> None:
    name = "1.3.6.1.4.1.9590.100.1.2.12345"
    path = dicom(tmp_path / name, np.full((4, 4), 7, np.uint16), PixelSpacing=[0.5, 0.5])
    assert image_format(path) == "dicom"
    assert read_image(path).array[0, 0, 0, 0] == 7.0
    site = open_site(datalist(tmp_path, [{"image": name, "label": 0}]), grid=GRID)
    assert len(site) == 1


def test_a_lone_slice_is_oriented_like_the_same_slice_in_its_series(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    rng = np.random.default_rng(0)
    coronal = [1, 0, 0, 0, 0, -1]  # rows run left-right, columns head to foot
    for k in range(3):
        pixels = rng.integers(0, 4000, (6, 4)).astype(np.uint16)
        where = axial(0.0, ImagePositionPatient=[0.0, 3.0 * k, 0.0], PixelSpacing=[0.5, 0.7])
        dicom(folder / f"{k}.dcm", pixels, **{**where, "ImageOrientationPatient": coronal})
    series = read_image(folder)  # coronal stack: A is depth
    lone = read_image(folder / "1.dcm")
    assert lone.array.shape == (1, 1, *series.array.shape[2:])
    np.testing.assert_array_equal(lone.array[0, 0], series.array[0, 1])
    assert lone.spacing[1:] == series.spacing[1:]


def test_files_with_misleading_or_no_suffix_are_sniffed(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 6), 9, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "xray.1.2.840").write_bytes((tmp_path / "a.png").read_bytes())
    Image.fromarray(np.full((4, 6), 9, np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "photo.v2").write_bytes((tmp_path / "a.jpg").read_bytes())
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), tmp_path / "v.nii")
    (tmp_path / "volume.1").write_bytes((tmp_path / "v.nii").read_bytes())
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    (tmp_path / "volume.2").write_bytes((tmp_path / "v.nii.gz").read_bytes())
    assert [
        image_format(tmp_path / n) for n in ("xray.1.2.840", "photo.v2", "volume.1", "volume.2")
    ] == ["pillow", "pillow", "nifti", "nifti"]
    assert read_image(tmp_path / "volume.2").array.shape == (1, 2, 4, 4)
    (tmp_path / "notes.1.2").write_bytes(b"hello" * 100)
    with pytest.raises(DatasetError, match=r"notes.1.2: unsupported image format.*content"):
        read_image(tmp_path / "notes.1.2")


def test_every_bundled_pydicom_file_reads_or_fails_as_a_dataset_error() -> None:
    """pydicom's own collection of odd real files (compressed, big-endian, RGB, YBR, palette,
    RT dose, SR, no preamble, truncated...): a Volume or a DatasetError, nothing else."""
    read = []
    bundled = Path(pydicom.data.__file__).parent / "test_files"  # the wheel's own files only:
    for path in sorted(bundled.iterdir()):  # get_testdata_files("*") would try to download
        if path.is_dir():
            continue
        try:
            volume = read_image(path)
        except DatasetError as err:
            assert err.path == path and "Fix:" in str(err)
            continue
        assert volume.array.ndim == 4 and volume.array.dtype == np.float32
        read.append(path.name)
    expected = {"CT_small.dcm", "MR_small_RLE.dcm", "examples_palette.dcm", "SC_rgb_rle.dcm"}
    assert expected <= set(read)


# ----------------------------------------------------------------- orientation in 2D formats


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied(tmp_path: Path, suffix: str) -> None:
    pixels = np.zeros((8, 16), np.uint8)
    pixels[0, :8] = 255  # a bright bar at the top left
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / f"x{suffix}", exif=exif, quality=100)
    volume = read_image(tmp_path / f"x{suffix}", (0.1, 0.2))
    assert volume.array.shape == (1, 1, 16, 8)
    assert volume.spacing[1:] == (0.2, 0.1)  # spacings follow the rotated axes
    assert volume.array[0, 0, :8, -1].mean() > 200  # the bar is now down the right edge


# --------------------------------------------------------------------------- CSV class names


def _pngs(folder: Path, n: int) -> None:
    (folder / "images").mkdir()
    for i in range(n):
        Image.fromarray(np.full((8, 8), i * 20, np.uint8)).save(folder / "images" / f"{i}.png")


def test_csv_labels_that_are_class_names_with_spaces(tmp_path: Path) -> None:
    _pngs(tmp_path, 3)
    (tmp_path / "site.csv").write_text(
        "image,label\nimages/0.png,No Finding\nimages/1.png,Pleural Effusion\n"
        "images/2.png,No Finding\n"
    )
    site = open_site(tmp_path / "site.csv", grid=GRID, modality="XR")
    assert not site.info.multi_label
    assert site.info.class_names == ("No Finding", "Pleural Effusion")  # sorted: stated order
    assert site.labels.tolist() == [0, 1, 0]


def test_csv_multi_label_class_names_with_a_bar(tmp_path: Path) -> None:
    _pngs(tmp_path, 3)
    (tmp_path / "nih.csv").write_text(  # NIH ChestX-ray14's "Finding Labels" style
        "image,label\nimages/0.png,Cardiomegaly|Pleural Effusion\nimages/1.png,No Finding\n"
        "images/2.png,Pleural Effusion\n"
    )
    site = open_site(tmp_path / "nih.csv", grid=GRID, modality="XR")
    assert site.info.multi_label
    assert site.info.class_names == ("Cardiomegaly", "No Finding", "Pleural Effusion")
    assert site.labels.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 1]]


def test_csv_mixing_names_and_indices_is_a_clear_error(tmp_path: Path) -> None:
    _pngs(tmp_path, 2)
    (tmp_path / "mixed.csv").write_text("image,label\nimages/0.png,1\nimages/1.png,Effusion\n")
    with pytest.raises(DatasetError, match=r"mixed.csv: column 'label' mixes class indices"):
        open_site(tmp_path / "mixed.csv", grid=GRID, modality="XR")


def test_json_label_by_class_name_and_unknown_name(tmp_path: Path) -> None:
    _pngs(tmp_path, 2)
    items = [{"image": "images/0.png", "label": "present"}]
    path = datalist(tmp_path, items, modality="XR", class_names=["absent", "present"])
    assert open_site(path, grid=GRID).labels.tolist() == [1]
    items = [{"image": "images/1.png", "label": "Pleural Effusion"}]
    path = datalist(tmp_path, items, modality="XR")
    with pytest.raises(DatasetError, match=r"label 'Pleural Effusion'.*class_names"):
        open_site(path, grid=GRID)


# ---------------------------------------------------------------------- paths resolved at open


def test_relative_datalist_uncached_survives_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    _pngs(site_dir, 2)
    datalist(site_dir, [{"image": "images/0.png", "label": 0}], modality="XR")
    (site_dir / "site.csv").write_text("image,label\nimages/1.png,1\n")
    monkeypatch.chdir(tmp_path)
    from_json = open_site(Path("site/dataset.json"), grid=GRID, cache=False)
    from_csv = open_site("site/site.csv", grid=GRID, cache=False, modality="XR")
    assert all(item.image.is_absolute() for item in (*from_json.items, *from_csv.items))
    assert from_json.info.source.is_absolute()
    monkeypatch.chdir(site_dir / "images")
    assert from_json[0]["image"].shape == (1, 1, 16, 16)
    assert from_csv[0]["image"].shape == (1, 1, 16, 16)


def test_relative_npz_uncached_survives_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "m.npz",
        train_images=rng.integers(0, 255, (3, 8, 8), dtype=np.uint8),
        train_labels=np.array([[0], [1], [0]]),
    )
    monkeypatch.chdir(tmp_path)
    site = open_site("m.npz", grid=GRID, cache=False, modality="XR")
    monkeypatch.chdir(tmp_path.parent)
    assert site[2]["image"].shape == (1, 1, 16, 16)


# ------------------------------------------------------------- MONAI's readers, same inputs


@pytest.mark.slow  # importing monai.data takes 6-20 s
def test_monai_readers_get_these_inputs_wrong(tmp_path: Path) -> None:
    """Why the readers stay hand-written (core/data/README.md): MONAI's PydicomReader and
    NibabelReader, default arguments, on four of the inputs above. If this starts failing,
    MONAI has caught up and the table (and the choice) should be revisited."""
    monai_data = pytest.importorskip("monai.data")

    def monai(path: Path, reader: object) -> tuple[np.ndarray, dict]:
        array, meta = reader.get_data(reader.read(str(path)))  # type: ignore[attr-defined]
        return np.asarray(array), meta

    dx = dicom(tmp_path / "dx.dcm", np.zeros((8, 10), np.uint16), Modality="DX", PixelSpacing=0.2)
    assert monai(dx, monai_data.PydicomReader())[1]["spacing"].tolist() == [1.0, 1.0]
    assert read_image(dx).spacing[1:] == (0.2, 0.2)

    palette = Path(get_testdata_file("examples_palette.dcm"))
    indices = pydicom.dcmread(palette).pixel_array
    array, _ = monai(palette, monai_data.PydicomReader())
    np.testing.assert_array_equal(array.T, indices)  # indices, not colours
    assert read_image(palette).array.shape[0] == 3

    nib.save(
        nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.diag([0.5, 0.5, 3, 1])),
        tmp_path / "s.nii",
    )
    _patch_nifti_pixdim(tmp_path / "s.nii", (1.0, 1.0, 1.0))
    _, meta = monai(tmp_path / "s.nii", monai_data.NibabelReader())
    assert np.linalg.norm(np.asarray(meta["affine"])[:3, :3], axis=0).tolist() == [1.0, 1.0, 1.0]
    assert read_image(tmp_path / "s.nii").spacing == (3.0, 0.5, 0.5)

    frames = np.stack([np.full((6, 5), 1000 + k, np.uint16) for k in range(4)])
    zs = [[0.0, 0.0, z] for z in (5.0, 0.0, 7.5, 2.5)]
    enhanced = _enhanced_ct(tmp_path / "enhanced.dcm", frames, zs)
    assert monai(enhanced, monai_data.PydicomReader())[1]["spacing"].tolist() == [1.0, 1.0, 1.0]
    assert read_image(enhanced).spacing == pytest.approx((2.5, 0.7, 0.4))
