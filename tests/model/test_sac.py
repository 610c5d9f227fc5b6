"""SAC against brute-force references in float64: slice repetition, per-slice 2D, sum-pooling."""

import pytest
import torch
import torch.nn.functional as F

from core.model.sac import (
    SACConv3d,
    SACConvTranspose3d,
    SpatialState,
    adaptive_conv3d,
    adaptive_conv_transpose3d,
    batch_degree_of_anisotropy,
    degree_of_anisotropy,
)

torch.manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize(
    ("spacing", "expected"),
    [
        ((1.0, 1.0, 1.0), 0),
        ((0.5, 1.0, 1.0), 0),  # ratio below 1 is clipped to 1
        ((1.99, 1.0, 1.0), 0),
        ((2.0, 1.0, 1.0), 1),
        ((4.0, 1.0, 1.0), 2),  # an exact power of two does not floor one step down
        ((5.0, 0.7, 0.7), 2),  # 7.14 -> 2
        ((5.0, 0.6, 0.7), 3),  # min of the in-plane spacings: 8.33 -> 3
        ((16.0, 1.0, 1.0), 4),
        ((1e4, 1.0, 1.0), 5),  # 2D: clipped to 32
    ],
)
def test_degree_of_anisotropy(spacing, expected):
    assert degree_of_anisotropy(spacing) == expected


@pytest.mark.parametrize("bad", [(1.0, 1.0), (0.0, 1.0, 1.0), (1.0, float("nan"), 1.0)])
def test_degree_of_anisotropy_rejects_bad_spacing(bad):
    with pytest.raises(ValueError, match="spacing"):
        degree_of_anisotropy(bad)


def test_spatial_state_pending_and_remained():
    assert (SpatialState(3, 1).pending, SpatialState(3, 1).remained) == (2, 0)
    assert (SpatialState(1, 4).pending, SpatialState(1, 4).remained) == (0, 3)
    with pytest.raises(ValueError):
        SpatialState(-1)


@pytest.mark.parametrize("stride", [2, 4, 16])
@pytest.mark.parametrize("da", range(6))
@pytest.mark.parametrize("downsamples", [0, 1, 3])
def test_downsampling_equals_unadapted_conv_on_slice_repeated_input(stride, da, downsamples):
    state = SpatialState(da, downsamples)
    depth_stride = max(stride >> state.pending, 1)
    group = stride // depth_stride
    x = randn(2, 3, depth_stride * 2, stride * 2, stride * 3)
    weight, bias = randn(4, 3, stride, stride, stride), randn(4)
    out, new_state = adaptive_conv3d(x, weight, bias, stride=stride, padding=0, state=state)
    reference = F.conv3d(x.repeat_interleave(group, dim=2), weight, bias, stride=stride)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    assert new_state == SpatialState(da, downsamples + stride.bit_length() - 1)


@pytest.mark.parametrize("da", [1, 2, 5])
def test_3x3x3_with_pending_is_a_per_slice_2d_conv(da):
    x, weight, bias = randn(2, 3, 4, 9, 7), randn(5, 3, 3, 3, 3), randn(5)
    out, state = adaptive_conv3d(x, weight, bias, stride=1, padding=1, state=SpatialState(da))
    assert state == SpatialState(da)
    flat = weight.sum(dim=2)  # (O, I, 3, 3)
    reference = torch.stack(
        [F.conv2d(x[:, :, i], flat, bias, padding=1) for i in range(x.shape[2])], dim=2
    )
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)


def test_3x3x3_without_pending_is_an_ordinary_3d_conv():
    x, weight, bias = randn(2, 3, 4, 9, 7), randn(5, 3, 3, 3, 3), randn(5)
    state = SpatialState(da=2, downsamples=2)
    out, _ = adaptive_conv3d(x, weight, bias, stride=1, padding=1, state=state)
    torch.testing.assert_close(out, F.conv3d(x, weight, bias, padding=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("depth_stride", [1, 2, 4])
@pytest.mark.parametrize(("da", "downsamples"), [(0, 2), (1, 2), (2, 2), (0, 1), (3, 5), (5, 4)])
def test_transposed_conv_equals_depth_sum_pool_of_unadapted(depth_stride, da, downsamples):
    state = SpatialState(da, downsamples)
    s = 2
    x = randn(2, 3, 3, 4, 5)
    weight, bias = randn(3, 4, depth_stride, s, s), randn(4)
    out, new_state = adaptive_conv_transpose3d(
        x, weight, bias, stride=(depth_stride, s, s), state=state
    )
    used = min(2**state.remained, depth_stride)
    unadapted = F.conv_transpose3d(x, weight, None, stride=(depth_stride, s, s))
    group = depth_stride // used
    n, c, d, h, w = unadapted.shape
    pooled = unadapted.reshape(n, c, d // group, group, h, w).sum(dim=3)
    torch.testing.assert_close(out, pooled + bias.view(1, -1, 1, 1, 1), rtol=1e-12, atol=1e-12)
    assert out.shape[2] == x.shape[2] * used
    assert new_state == SpatialState(da, downsamples - 1)


@pytest.mark.parametrize("da", range(6))
def test_patch16_output_shapes(da):
    conv = SACConv3d(1, 8, 16, stride=16).double()
    depth_patch = max(16 >> da, 1)
    x = randn(1, 1, depth_patch * 3, 32, 48)
    out, state = conv(x, SpatialState(da))
    assert out.shape == (1, 8, 3, 2, 3)
    assert state.downsamples == 4
    assert state.remained == max(4 - da, 0)


def test_2d_input_stays_2d_through_down_and_up():
    down = SACConv3d(1, 8, 4, stride=4).double()
    up = SACConvTranspose3d(8, 2, stride=4).double()
    x = randn(2, 1, 1, 32, 32)  # a 2D image: D == 1, DA 5
    y, state = down(x, SpatialState(degree_of_anisotropy((1e4, 1.0, 1.0))))
    assert y.shape == (2, 8, 1, 8, 8)
    z, state = up(y, state)
    assert z.shape == (2, 2, 1, 32, 32)
    assert state == SpatialState(5, 0)


def test_unsupported_combinations_raise():
    x = randn(1, 1, 4, 8, 8)
    with pytest.raises(ValueError, match="power of two"):
        adaptive_conv3d(x, randn(1, 1, 3, 3, 3), None, stride=3, padding=0, state=SpatialState(0))
    with pytest.raises(ValueError, match="kernel == stride"):
        adaptive_conv3d(x, randn(1, 1, 4, 4, 4), None, stride=2, padding=0, state=SpatialState(0))
    with pytest.raises(ValueError, match="kernel == stride"):
        adaptive_conv3d(x, randn(1, 1, 3, 3, 3), None, stride=4, padding=0, state=SpatialState(0))
    with pytest.raises(ValueError, match="kernel == stride"):
        SACConv3d(1, 1, 5, stride=2)
    with pytest.raises(ValueError, match="kernel == stride"):
        adaptive_conv_transpose3d(x, randn(1, 1, 3, 2, 2), None, stride=2, state=SpatialState(0, 2))
    with pytest.raises(ValueError, match="only downsampled"):
        adaptive_conv_transpose3d(x, randn(1, 1, 2, 2, 2), None, stride=2, state=SpatialState(0))
    with pytest.raises(ValueError, match="in-plane strides"):
        adaptive_conv_transpose3d(
            x, randn(1, 1, 2, 2, 4), None, stride=(2, 2, 4), state=SpatialState(0, 2)
        )


def test_batch_must_share_one_da():
    assert batch_degree_of_anisotropy(torch.tensor([[5.0, 0.7, 0.7], [4.5, 0.8, 0.8]])) == 2
    with pytest.raises(ValueError, match="bucket"):
        batch_degree_of_anisotropy(torch.tensor([[1.0, 1.0, 1.0], [5.0, 1.0, 1.0]]))


@pytest.mark.parametrize(("da", "downsamples"), [(1, 0), (2, 0), (2, 1), (5, 0), (5, 4)])
def test_3x3x3_stride2_with_pending_is_a_per_slice_strided_2d_conv(da, downsamples):
    state = SpatialState(da, downsamples)
    assert state.pending > 0
    x, weight, bias = randn(2, 3, 3, 9, 8), randn(5, 3, 3, 3, 3), randn(5)
    out, new_state = adaptive_conv3d(x, weight, bias, stride=2, padding=1, state=state)
    flat = weight.sum(dim=2)  # (O, I, 3, 3)
    reference = torch.stack(
        [F.conv2d(x[:, :, i], flat, bias, stride=2, padding=1) for i in range(x.shape[2])], dim=2
    )
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    assert new_state == SpatialState(da, downsamples + 1)


@pytest.mark.parametrize(("da", "downsamples"), [(0, 0), (1, 1), (2, 3)])
def test_3x3x3_stride2_without_pending_is_an_ordinary_strided_3d_conv(da, downsamples):
    state = SpatialState(da, downsamples)
    x, weight, bias = randn(2, 3, 6, 9, 8), randn(5, 3, 3, 3, 3), randn(5)
    conv = SACConv3d(3, 5, 3, stride=2, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    out, new_state = conv(x, state)
    reference = F.conv3d(x, weight, bias, stride=2, padding=1)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    assert new_state == SpatialState(da, downsamples + 1)


def test_thick_slice_volume_keeps_depth_until_isotropic_through_3x3x3_downsampling():
    # DA 2 (e.g. 4 mm slices, 1 mm pixels): two stride-2 convs keep the slices, the third halves
    conv = SACConv3d(1, 1, 3, stride=2, padding=1).double()
    x, state = randn(1, 1, 8, 64, 64), SpatialState(2)
    shapes = []
    for _ in range(3):
        x, state = conv(x, state)
        shapes.append(tuple(x.shape[2:]))
    assert shapes == [(8, 32, 32), (8, 16, 16), (4, 8, 8)]
