"""Spatially Adaptive Convolution (SAC), as in PUMIT.

A volume is ``(N, C, D, H, W)`` with D the through-plane axis (largest spacing); a 2D image is
``D == 1`` with a huge depth spacing. Thick-slice volumes must not be downsampled in depth as
fast as in-plane, so each convolution adapts its depth kernel to the input's *degree of
anisotropy* (DA) and to how many 2x in-plane downsamplings have already happened.

The adaptation never introduces new weights: summing ``g`` consecutive depth taps of a kernel is
exactly running the unadapted kernel on the input with every slice repeated ``g`` times. That is
what lets one set of weights serve 2D images, thin-slice CT and 5 mm MR alike.

The feature map stays a plain tensor; the (DA, downsamples) pair travels beside it as an
immutable :class:`SpatialState`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_ANISOTROPY_RATIO = 32.0


def degree_of_anisotropy(spacing: Sequence[float], max_ratio: float = MAX_ANISOTROPY_RATIO) -> int:
    """``floor(log2(clip(s_d / min(s_h, s_w), 1, max_ratio)))`` for spacing ``(d, h, w)``."""
    if len(spacing) != 3:
        raise ValueError(f"spacing must be (depth, height, width), got {tuple(spacing)!r}")
    s_d, s_h, s_w = (float(s) for s in spacing)
    if not all(math.isfinite(s) and s > 0 for s in (s_d, s_h, s_w)):
        raise ValueError(f"spacing must be finite and positive, got {tuple(spacing)!r}")
    ratio = min(max(s_d / min(s_h, s_w), 1.0), max_ratio)
    # A tiny epsilon keeps exact powers of two (e.g. 4.0 -> 2) from flooring one step down.
    return math.floor(math.log2(ratio) + 1e-9)


@dataclass(frozen=True)
class SpatialState:
    """What a feature map knows about its geometry: input DA and in-plane downsamplings so far."""

    da: int
    downsamples: int = 0

    def __post_init__(self) -> None:
        if self.da < 0 or self.downsamples < 0:
            raise ValueError(f"da and downsamples must be >= 0, got {self}")

    def detach(self) -> SpatialState:
        """Itself: Opacus detaches every positional input of a layer it records, and the state
        must reach the SAC grad sampler (:mod:`core.model.sac_grad_sample`) with the input."""
        return self

    @property
    def pending(self) -> int:
        """In-plane 2x downsamplings still to come before depth starts being downsampled."""
        return max(self.da - self.downsamples, 0)

    @property
    def remained(self) -> int:
        """How many times depth has been downsampled by 2 (and may be upsampled back)."""
        return max(self.downsamples - self.da, 0)


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    if len(value) != 3:
        raise ValueError(f"{name} must be an int or a (d, h, w) tuple, got {value!r}")
    return (int(value[0]), int(value[1]), int(value[2]))


def _log2_exact(value: int, name: str) -> int:
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    return value.bit_length() - 1


def sum_depth_taps(weight: Tensor, depth: int) -> Tensor:
    """Sum the depth taps of a conv kernel in consecutive groups down to ``depth`` taps.

    weight: (O, I, K_d, K_h, K_w) -> (O, I, depth, K_h, K_w); ``K_d`` must be a multiple of depth.
    """
    k_d = weight.shape[2]
    if depth == k_d:
        return weight
    if depth < 1 or k_d % depth:
        raise ValueError(f"cannot sum {k_d} depth taps into {depth} equal groups")
    o, i, _, k_h, k_w = weight.shape
    return weight.reshape(o, i, depth, k_d // depth, k_h, k_w).sum(dim=3)


@dataclass(frozen=True)
class ConvPlan:
    """How a SAC conv runs for one input state: the depth taps its kernel is summed down to,
    the stride and padding of the resulting ordinary 3D conv, and the state after it."""

    depth_taps: int
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]
    state: SpatialState


def conv_plan(
    kernel: Sequence[int],
    stride: int,
    padding: int | Sequence[int],
    state: SpatialState,
) -> ConvPlan:
    """The adapted conv of :func:`adaptive_conv3d` for a kernel ``(K_d, K_h, K_w)``.

    Raises ValueError for a stride that is not a power of two, or a strided kernel that is
    neither ``stride`` in every dimension nor a cubic 3x3x3 with stride 2.
    """
    pad_d, pad_h, pad_w = _triple(padding, "padding")
    kernel = _triple(tuple(kernel), "kernel")
    if stride == 1:
        if state.pending == 0:
            return ConvPlan(kernel[0], (1, 1, 1), (pad_d, pad_h, pad_w), state)
        return ConvPlan(1, (1, 1, 1), (0, pad_h, pad_w), state)
    k = _log2_exact(stride, "stride")
    if stride == 2 and kernel == (3, 3, 3):
        # PUMIT's 3x3x3 stride-2 conv: a per-slice 2D conv while in-plane downsampling is
        # pending (depth taps summed to one, depth stride 1, no depth padding), else plain 3D.
        after = SpatialState(state.da, state.downsamples + 1)
        if state.pending > 0:
            return ConvPlan(1, (1, 2, 2), (0, pad_h, pad_w), after)
        return ConvPlan(3, (2, 2, 2), (pad_d, pad_h, pad_w), after)
    if kernel != (stride, stride, stride):
        raise ValueError(
            f"a strided SAC conv needs kernel == stride in every dimension, or a 3x3x3 kernel "
            f"with stride 2 (kernel {kernel}, stride {stride}); use stride 1 or a cubic kernel "
            f"of size {stride}"
        )
    depth_stride = max(stride >> state.pending, 1)
    if depth_stride < stride:
        pad_d = 0
    return ConvPlan(
        depth_stride,
        (depth_stride, stride, stride),
        (pad_d, pad_h, pad_w),
        SpatialState(state.da, state.downsamples + k),
    )


def adaptive_conv3d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    stride: int,
    padding: int | Sequence[int],
    state: SpatialState,
) -> tuple[Tensor, SpatialState]:
    """A 3D convolution that adapts its depth kernel to the input's anisotropy.

    ``stride == 1``: ordinary conv when nothing is pending, else a per-slice 2D conv (depth taps
    summed to one, depth padding 0). ``stride == S == 2**k`` with kernel == stride in every
    dimension: depth stride ``max(S >> pending, 1)``, taps summed down to it, then ``n += k``.
    A 3x3x3 kernel with stride 2 (PUMIT's downsampling conv): a per-slice 2D conv of in-plane
    stride 2 while downsampling is pending, else an ordinary stride-2 3D conv; then ``n += 1``.

    x: (N, C_in, D, H, W); weight: (C_out, C_in, K_d, K_h, K_w) -> (N, C_out, D', H', W').
    """
    if x.dim() != 5 or weight.dim() != 5:
        raise ValueError(
            f"expected 5D input and weight, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    plan = conv_plan(weight.shape[2:], stride, padding, state)
    adapted = sum_depth_taps(weight, plan.depth_taps)
    return F.conv3d(x, adapted, bias, stride=plan.stride, padding=plan.padding), plan.state


def transposed_depth_stride(depth_stride: int, state: SpatialState) -> int:
    """The depth stride a SAC transposed conv with depth kernel = stride ``depth_stride`` uses:
    depth is upsampled only as far as it was downsampled, ``min(2**remained, S_d)``."""
    return min(2**state.remained, depth_stride)


def adaptive_conv_transpose3d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    stride: int | Sequence[int],
    state: SpatialState,
) -> tuple[Tensor, SpatialState]:
    """A transposed 3D convolution (kernel == stride) that upsamples depth only as far as it was
    downsampled: depth stride ``min(2**remained, S_d)``, taps summed to match, then ``n -= log2 S``.

    x: (N, C_in, D, H, W); weight: (C_in, C_out, S_d, S, S) -> (N, C_out, D * s_d, H * S, W * S).
    """
    if x.dim() != 5 or weight.dim() != 5:
        raise ValueError(
            f"expected 5D input and weight, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    s_d, s_h, s_w = _triple(stride, "stride")
    if s_h != s_w:
        raise ValueError(f"in-plane strides must be equal, got (h, w) = ({s_h}, {s_w})")
    if tuple(weight.shape[2:]) != (s_d, s_h, s_w):
        raise ValueError(
            f"a SAC transposed conv needs kernel == stride, got kernel {tuple(weight.shape[2:])} "
            f"and stride {(s_d, s_h, s_w)}"
        )
    k = _log2_exact(s_h, "in-plane stride")
    _log2_exact(s_d, "depth stride")
    if k > state.downsamples:
        raise ValueError(
            f"cannot upsample by 2**{k}: the feature map was only downsampled "
            f"{state.downsamples} times"
        )
    depth_stride = transposed_depth_stride(s_d, state)
    if depth_stride < s_d:
        # Transposed-conv weights are (C_in, C_out, ...): the same depth-tap grouping applies.
        weight = sum_depth_taps(weight, depth_stride)
    out = F.conv_transpose3d(x, weight, bias, stride=(depth_stride, s_h, s_w))
    return out, SpatialState(state.da, state.downsamples - k)


def _note_batch(module: nn.Module, x: Tensor) -> None:
    """Tell Opacus the batch size: it reads it from a layer's last positional input, which for
    a SAC layer is the state, unless the layer's forward sets ``max_batch_len`` (Opacus's
    mechanism for such layers; it deletes the attribute after each backward)."""
    module.max_batch_len = x.shape[0]  # type: ignore[assignment]


class SACConv3d(nn.Module):
    """Module form of :func:`adaptive_conv3d`; ``forward(x, state) -> (y, state)``.

    Deliberately not a subclass of ``nn.Conv3d``: the adapted forward uses summed kernels, so
    Opacus's Conv3d per-sample-gradient rule would be wrong for it. Trained under DP, its
    per-sample gradients come from the grad sampler :mod:`core.model.sac_grad_sample`
    registers with Opacus (import it before wrapping the model).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int | tuple[int, int, int] = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        conv_plan((kernel_size,) * 3, stride, padding, SpatialState(0))  # refuses what SAC cannot
        self.stride = stride
        self.padding = padding
        proto = nn.Conv3d(in_channels, out_channels, kernel_size, bias=bias)  # PyTorch's init
        self.weight = nn.Parameter(proto.weight.detach().clone())
        self.bias = nn.Parameter(proto.bias.detach().clone()) if proto.bias is not None else None

    def forward(self, x: Tensor, state: SpatialState) -> tuple[Tensor, SpatialState]:
        _note_batch(self, x)
        return adaptive_conv3d(
            x, self.weight, self.bias, stride=self.stride, padding=self.padding, state=state
        )


class SACConvTranspose3d(nn.Module):
    """Module form of :func:`adaptive_conv_transpose3d` (kernel == stride)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int | tuple[int, int, int],
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.stride = _triple(stride, "stride")
        proto = nn.ConvTranspose3d(
            in_channels, out_channels, self.stride, stride=self.stride, bias=bias
        )
        self.weight = nn.Parameter(proto.weight.detach().clone())
        self.bias = nn.Parameter(proto.bias.detach().clone()) if proto.bias is not None else None

    def forward(self, x: Tensor, state: SpatialState) -> tuple[Tensor, SpatialState]:
        _note_batch(self, x)
        return adaptive_conv_transpose3d(x, self.weight, self.bias, stride=self.stride, state=state)


def batch_degree_of_anisotropy(spacing: Tensor | Sequence[float]) -> int:
    """The one DA of a batch; spacing (3,) or (N, 3). Mixed DAs in one batch are an error."""
    t = torch.as_tensor(spacing, dtype=torch.float64)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[1] != 3:
        raise ValueError(f"spacing must have shape (3,) or (N, 3), got {tuple(t.shape)}")
    das = {degree_of_anisotropy(row.tolist()) for row in t}
    if len(das) != 1:
        raise ValueError(
            f"a batch must share one degree of anisotropy, got DAs {sorted(das)}; "
            "bucket batches by DA (core.data does this)"
        )
    return das.pop()
