"""The grid: spacing follows resizing, DA comes from the final spacing, and every shape the
grid produces is one the SAC patch embedding cuts without remainder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.data import GridConfig, IntensityConfig
from core.data.preprocess import match_channels, normalize_intensity, pad_depth, resample_to_grid
from core.data.readers import TWO_D_DEPTH_SPACING_MM
from core.model.sac import SpatialState, adaptive_conv3d, degree_of_anisotropy


def test_spacing_scales_with_size() -> None:
    image = torch.rand(1, 20, 100, 50)
    out, spacing = resample_to_grid(image, (5.0, 0.5, 0.8), GridConfig(in_plane=(64, 32)))
    assert out.shape == (1, 20, 64, 32)
    assert spacing == (5.0, 0.5 * 100 / 64, 0.8 * 50 / 32)
    out, spacing = resample_to_grid(image, (5.0, 0.5, 0.8), GridConfig(in_plane=(64, 32), depth=32))
    assert out.shape == (1, 32, 64, 32)
    assert spacing == (5.0 * 20 / 32, 0.5 * 100 / 64, 0.8 * 50 / 32)


def test_2d_depth_is_never_resampled() -> None:
    out, spacing = resample_to_grid(
        torch.rand(1, 1, 30, 30), (TWO_D_DEPTH_SPACING_MM, 1.0, 1.0), GridConfig(depth=32)
    )
    assert out.shape == (1, 1, 64, 64)
    assert spacing[0] == TWO_D_DEPTH_SPACING_MM
    assert degree_of_anisotropy(spacing) == 5


def test_resize_preserves_constant_and_mean() -> None:
    image = torch.full((1, 12, 40, 40), 0.25)
    out, _ = resample_to_grid(image, (1.0, 1.0, 1.0), GridConfig(in_plane=(16, 16), depth=16))
    torch.testing.assert_close(out, torch.full((1, 16, 16, 16), 0.25))
    ramp = torch.linspace(0, 1, 64).expand(1, 2, 64, 64).contiguous()
    shrunk, _ = resample_to_grid(ramp, (1.0, 1.0, 1.0), GridConfig(in_plane=(16, 16)))
    assert abs(shrunk.mean().item() - ramp.mean().item()) < 1e-3


def test_grid_config_rejects_shapes_the_model_cannot_cut() -> None:
    with pytest.raises(ValueError, match="multiples of patch=16"):
        GridConfig(in_plane=(60, 64))
    with pytest.raises(ValueError, match="depth must be None or a positive multiple"):
        GridConfig(depth=24)
    with pytest.raises(ValueError, match="power of two"):
        GridConfig(patch=12)
    assert [GridConfig().depth_patch(da) for da in range(6)] == [16, 8, 4, 2, 1, 1]
    assert GridConfig().padded_depth(12, 2) == 12 and GridConfig().padded_depth(13, 2) == 16


@settings(max_examples=60, deadline=None)
@given(
    depth=st.integers(2, 40),
    height=st.integers(8, 80),
    width=st.integers(8, 80),
    s_d=st.floats(0.3, 8.0),
    s_h=st.floats(0.2, 2.0),
    s_w=st.floats(0.2, 2.0),
    grid_depth=st.sampled_from([None, 16, 32]),
)
def test_every_grid_shape_patchifies_exactly(
    depth: int, height: int, width: int, s_d: float, s_h: float, s_w: float, grid_depth: int | None
) -> None:
    grid = GridConfig(in_plane=(32, 48), depth=grid_depth)
    image = torch.rand(1, depth, height, width)
    out, spacing = resample_to_grid(image, (s_d, s_h, s_w), grid)
    da = degree_of_anisotropy(spacing)
    padded = pad_depth(out, grid.padded_depth(out.shape[1], da))
    # The real SAC patch embedding (kernel = stride = 16) must consume every voxel.
    weight = torch.ones(1, 1, 16, 16, 16)
    tokens, _ = adaptive_conv3d(
        padded[None], weight, None, stride=16, padding=0, state=SpatialState(da)
    )
    depth_stride = max(16 >> da, 1)
    assert tokens.shape[2] * depth_stride == padded.shape[1]
    assert tokens.shape[3:] == (2, 3)
    # a ones kernel sums its input: nothing was cropped away
    torch.testing.assert_close(
        tokens.sum(), padded.sum() * (16 // depth_stride), rtol=1e-4, atol=1e-2
    )


def test_pad_depth_centres_with_background() -> None:
    image = torch.arange(3.0).view(1, 3, 1, 1) + 1.0
    padded = pad_depth(image, 6)
    assert padded.flatten().tolist() == [1.0, 1.0, 2.0, 3.0, 1.0, 1.0]


def test_intensity_per_modality() -> None:
    # default soft-tissue window (-175, 250) HU: air and bone saturate, 37.5 HU is mid-grey
    hu = np.array([-1000.0, -175.0, 37.5, 250.0, 1000.0], dtype=np.float32).reshape(1, 1, 1, 5)
    config = IntensityConfig()
    assert normalize_intensity(hu, "CT", True, config).ravel().tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    values = np.arange(1001, dtype=np.float32).reshape(1, 1, 1, -1)
    scaled = normalize_intensity(values, "MR", True, config)  # 0.5 / 99.5 percentiles -> 0 / 1
    assert scaled.min() == 0.0 and scaled.max() == 1.0
    assert scaled[0, 0, 0, 500] == pytest.approx(0.5)
    # uncalibrated CT (a PNG) cannot be windowed in HU: percentiles instead
    assert normalize_intensity(values, "CT", False, config).max() == 1.0
    z = normalize_intensity(values, "XR", False, IntensityConfig(xr="zscore"))
    assert abs(float(z.mean())) < 1e-5 and float(z.std()) == pytest.approx(1.0, rel=1e-5)
    assert not normalize_intensity(np.ones((1, 1, 2, 2), np.float32), "XR", False, config).any()


def test_match_channels() -> None:
    grey = torch.rand(1, 1, 4, 4)
    assert match_channels(grey, 3).shape == (3, 1, 4, 4)
    rgb = torch.stack([torch.full((1, 4, 4), v) for v in (1.0, 0.0, 0.0)])
    assert match_channels(rgb, 1).flatten()[0].item() == pytest.approx(0.299)
    assert match_channels(rgb, 2) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
@pytest.mark.parametrize(
    ("modality", "calibrated", "method"),
    [("CT", True, "percentile"), ("CT", False, "percentile"), ("MR", False, "percentile"),
     ("MR", False, "zscore"), ("XR", False, "percentile"), ("XR", False, "zscore")],
)  # fmt: skip
def test_normalisation_in_place_equals_the_expression(dtype, modality, calibrated, method):
    """normalize_intensity works in place on one new array (issue 18: the temporaries cost
    1.5-3 s per real-size CT); its values are the written-out expression's, bit for bit, and
    the caller's array is untouched."""
    rng = np.random.default_rng(0)
    array = (np.abs(rng.standard_normal((1, 6, 32, 32))) * 300 - 50).clip(0).astype(dtype)
    kept = array.copy()
    config = IntensityConfig(mr=method, xr=method, ct_window=(-160, 240))  # integer bounds too
    if modality == "CT" and calibrated:
        low, high = config.ct_window
        expected = (np.clip(array, low, high) - low) / (high - low)
    elif method == "zscore":
        std = float(array.std())
        expected = (array - array.mean()) / std
    else:
        low, high = np.percentile(array, config.percentiles)
        expected = (np.clip(array, low, high) - low) / (high - low)
    out = normalize_intensity(array, modality, calibrated, config)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected.astype(np.float32))
    np.testing.assert_array_equal(array, kept)
