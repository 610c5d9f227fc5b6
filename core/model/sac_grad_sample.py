"""Opacus per-sample gradients for the SAC convolutions, so a SAC decoder trains under DP-SGD.

Importing this module registers one grad sampler per SAC module type with Opacus (its
``register_grad_sampler``). A SAC conv runs an ordinary conv whose depth taps are sums of
consecutive groups of the parameter's taps (:func:`core.model.sac.sum_depth_taps`); the sum is
linear, so the gradient of each parameter tap is the gradient of the summed tap it went into.
Each sampler therefore computes the per-sample gradient of the adapted (summed) kernel and
repeats it over its group.

* :class:`SACConv3d`: the adapted conv's per-sample weight gradient is a grouped
  ``conv3d_weight`` with the batch as the groups (one call for the whole batch).
* :class:`SACConvTranspose3d` (kernel == stride, non-overlapping blocks): output block
  ``(d, h, w)`` is ``x[:, :, d, h, w]`` times the kernel, so the weight gradient is one einsum.

Opacus records every positional input of a layer (``SpatialState.detach`` returns the state
itself), so the sampler sees the state the forward adapted to. Checked against a brute-force
per-sample loop in float64 in ``tests/model/test_sac_grad_sample.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.grad
from opacus.grad_sample import register_grad_sampler
from torch import Tensor, nn

from core.model.sac import (
    SACConv3d,
    SACConvTranspose3d,
    SpatialState,
    conv_plan,
    transposed_depth_stride,
)


def _state(layer: nn.Module, activations: Sequence[object]) -> SpatialState:
    if len(activations) < 2 or not isinstance(activations[1], SpatialState):
        raise TypeError(
            f"{type(layer).__name__} must be called as layer(x, state) for per-sample gradients"
        )
    return activations[1]


def _expand_taps(grad: Tensor, groups: int, dim: int) -> Tensor:
    """The gradient of each of the ``groups`` taps summed into one: the summed tap's gradient."""
    return grad if groups == 1 else grad.repeat_interleave(groups, dim=dim)


@register_grad_sampler(SACConv3d)
def sac_conv3d_grad_sample(
    layer: SACConv3d, activations: Sequence[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of a :class:`SACConv3d`: weight (N, O, I, K_d, K_h, K_w), bias
    (N, O)."""
    x = activations[0]
    state = _state(layer, activations)
    out_ch, in_ch, k_d, k_h, k_w = layer.weight.shape
    plan = conv_plan((k_d, k_h, k_w), layer.stride, layer.padding, state)
    n = x.shape[0]
    grads: dict[nn.Parameter, Tensor] = {}
    if layer.weight.requires_grad:
        summed = torch.nn.grad.conv3d_weight(
            x.reshape(1, n * in_ch, *x.shape[2:]),
            (n * out_ch, in_ch, plan.depth_taps, k_h, k_w),
            backprops.reshape(1, n * out_ch, *backprops.shape[2:]),
            stride=plan.stride,
            padding=plan.padding,
            groups=n,
        ).reshape(n, out_ch, in_ch, plan.depth_taps, k_h, k_w)
        grads[layer.weight] = _expand_taps(summed, k_d // plan.depth_taps, dim=3)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = backprops.sum(dim=(2, 3, 4))
    return grads


@register_grad_sampler(SACConvTranspose3d)
def sac_conv_transpose3d_grad_sample(
    layer: SACConvTranspose3d, activations: Sequence[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of a :class:`SACConvTranspose3d`: weight (N, I, O, S_d, S, S)."""
    x = activations[0]
    state = _state(layer, activations)
    s_d, s_h, s_w = layer.stride
    used = transposed_depth_stride(s_d, state)
    grads: dict[nn.Parameter, Tensor] = {}
    if layer.weight.requires_grad:
        n, out_ch = backprops.shape[:2]
        d, h, w = x.shape[2:]
        blocks = backprops.reshape(n, out_ch, d, used, h, s_h, w, s_w)
        summed = torch.einsum("nidhw,nodahbwc->nioabc", x, blocks)
        grads[layer.weight] = _expand_taps(summed, s_d // used, dim=3)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = backprops.sum(dim=(2, 3, 4))
    return grads
