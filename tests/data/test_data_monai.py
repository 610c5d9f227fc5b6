"""Cross-checks against MONAI: our numpy/torch preprocessing equals MONAI's transforms, and our
datalists are ones MONAI's ``load_decathlon_datalist`` reads. (MONAI is imported only here: it
takes seconds to import, which is why ``core.data`` does not use it at run time.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.data import GridConfig, IntensityConfig, open_site
from core.data.phantoms import HospitalSpec, PhantomSite, generate_hospitals
from core.data.preprocess import normalize_intensity, resample_to_grid

monai_transforms = pytest.importorskip("monai.transforms")
monai_data = pytest.importorskip("monai.data")


def as_array(x: object) -> np.ndarray:
    return np.asarray(torch.as_tensor(x).detach().cpu())


@pytest.fixture
def volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.normal(size=(1, 6, 20, 24)) * 400.0).astype(np.float32)


def test_ct_window_equals_scale_intensity_range(volume: np.ndarray) -> None:
    config = IntensityConfig(ct_window=(-160.0, 240.0))
    ours = normalize_intensity(volume, "CT", True, config)
    theirs = monai_transforms.ScaleIntensityRange(-160.0, 240.0, 0.0, 1.0, clip=True)(volume)
    np.testing.assert_allclose(ours, as_array(theirs), atol=1e-6)


def test_percentiles_equal_scale_intensity_range_percentiles(volume: np.ndarray) -> None:
    ours = normalize_intensity(volume, "MR", True, IntensityConfig(percentiles=(1.0, 99.0)))
    transform = monai_transforms.ScaleIntensityRangePercentiles(1.0, 99.0, 0.0, 1.0, clip=True)
    np.testing.assert_allclose(ours, as_array(transform(volume)), atol=1e-5)


def test_zscore_equals_normalize_intensity(volume: np.ndarray) -> None:
    ours = normalize_intensity(volume, "MR", True, IntensityConfig(mr="zscore"))
    np.testing.assert_allclose(
        ours, as_array(monai_transforms.NormalizeIntensity()(volume)), atol=1e-5
    )


def test_upsampling_equals_monai_resize(volume: np.ndarray) -> None:
    image = torch.from_numpy(volume)
    ours, _ = resample_to_grid(image, (1.0, 1.0, 1.0), GridConfig(in_plane=(32, 48)))
    resize = monai_transforms.Resize((6, 32, 48), mode="trilinear", align_corners=False)
    np.testing.assert_allclose(as_array(ours), as_array(resize(image)), atol=1e-4)


def test_phantom_datalist_reads_with_monai(tmp_path: Path) -> None:
    site = PhantomSite("tiny", "xr2d", 12, (16, 16), spacing=(1.0, 0.5, 0.5))
    [path] = generate_hospitals(tmp_path, HospitalSpec((site,), alpha=None), seed=0)
    theirs = monai_data.load_decathlon_datalist(
        path, is_segmentation=False, data_list_key="training"
    )
    ours = open_site(path, grid=GridConfig(in_plane=(16, 16)))
    assert [Path(item["image"]) for item in theirs] == [item.image for item in ours.items]
    assert [item["label"] for item in theirs] == ours.labels.tolist()
    assert json.loads(path.read_text())["modality"] == "XR"
