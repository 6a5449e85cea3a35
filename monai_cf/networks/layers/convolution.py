# Copyright (c) monai_cf contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""CPU-fast convolutions of the HVAE's few-channel blocks: 1x1 convolutions as matrix products, kxk ones by a
custom autograd function, and PyTorch's default initialisation for both."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_cf.networks.layers.precision import compute_dtype

__all__ = ["FewChannelConvFunction", "has_forward_hooks", "pointwise_conv", "spatial_conv", "uniform_init_"]


def uniform_init_(tensor: torch.Tensor, fan_in: int, gain: float = 1.0) -> None:
    """PyTorch's default conv/linear initialisation, ``U(-b, b)`` with ``b = gain / sqrt(fan_in)``."""
    bound = gain / math.sqrt(max(fan_in, 1))
    with torch.no_grad():
        tensor.uniform_(-bound, bound)


def pointwise_conv(conv: nn.Module, x: torch.Tensor, out_slice: slice | None = None) -> torch.Tensor:
    """Apply a 1x1 conv as a matrix product where that is faster.

    On CPU, for channels-first maps, a batched matrix product is 2-4x faster than oneDNN's 1x1 convolution
    forward plus backward at the few-channel widths used here; on 1x1(x1) maps a plain linear layer also
    skips the convolution's per-call overhead. Elsewhere (GPU, channels-last) the convolution is used.
    ``out_slice`` computes only those output channels.

    A convolution with forward hooks (its own or global ones, e.g. feature extraction or Grad-CAM) is called as
    a module, so that its hooks see its whole input and output, whatever the device.
    """
    if has_forward_hooks(conv):
        out = conv(x)
        return out if out_slice is None else out[:, out_slice]
    weight, bias = conv.weight, conv.bias
    if out_slice is not None:
        weight, bias = weight[out_slice], None if bias is None else bias[out_slice]
    spatial = x.shape[2:]
    if spatial.numel() == 1:
        out = F.linear(x.flatten(1), weight.flatten(1), bias)
        return out.view(out.shape + spatial)
    if x.device.type != "cpu" or x.stride(-1) != 1 or not x[0, 0].is_contiguous():
        return conv(x) if out_slice is None else conv._conv_forward(x, weight, bias)
    batch = x.shape[0]
    dtype = compute_dtype(x)
    flat = x.flatten(2).to(dtype)
    # cast before expanding: autocast would otherwise materialise one weight copy per sample
    weight = weight.to(dtype).flatten(1).expand(batch, -1, -1)
    if bias is None:
        out = torch.bmm(weight, flat)
    else:
        bias = bias.to(dtype)[None, :, None].expand(batch, -1, flat.shape[-1])
        out = torch.baddbmm(bias, weight, flat)
    return out.view((batch, out.shape[1]) + spatial)


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run forward (pre-)hooks: its own, or global ones registered for all modules."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
    )


_CONV_FUNCTIONS = {2: F.conv2d, 3: F.conv3d}


class FewChannelConvFunction(torch.autograd.Function):
    """Stride-1 "same" convolution whose input gradient is computed as a forward convolution.

    The input gradient of such a convolution is the convolution of the output gradient with the flipped,
    transposed kernel. On CPU, oneDNN's backward-data pass for convolutions with very few channels on large
    maps is several times slower than its forward pass (23 ms vs 8 ms for 4 -> 4 channels, 3x3, 32 maps of
    64x64, one thread), so this computes the same gradients faster. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return _CONV_FUNCTIONS[x.ndim - 2](x, weight, bias, padding=padding)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dims = x.ndim - 2
        spatial = tuple(range(2, 2 + dims))
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            flipped = weight.transpose(0, 1).flip(spatial)
            grad_x = _CONV_FUNCTIONS[dims](grad, flipped, None, padding=ctx.padding)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.ops.aten.convolution_backward(
                grad,
                x,
                weight,
                None,
                [1] * dims,
                [ctx.padding] * dims,
                [1] * dims,
                False,
                [0] * dims,
                1,
                [False, True, False],
            )[1]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=(0,) + spatial)
        return grad_x, grad_weight, grad_bias, None


def spatial_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a kxk "same" conv, through :class:`FewChannelConvFunction` where that is faster (see there).

    As in :func:`pointwise_conv`, a convolution with forward hooks is called as a module.
    """
    if (
        not has_forward_hooks(conv)
        and torch.is_grad_enabled()
        and x.device.type == "cpu"
        and conv.in_channels <= 8
        and conv.out_channels <= 8
        and x.shape[2:].numel() >= 1024
    ):
        # autocast does not reach into a custom Function: cast here, autograd casts the gradients back
        dtype = compute_dtype(x)
        bias = None if conv.bias is None else conv.bias.to(dtype)
        return FewChannelConvFunction.apply(x.to(dtype), conv.weight.to(dtype), bias, conv.padding[0])
    return conv(x)
