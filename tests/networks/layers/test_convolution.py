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
from __future__ import annotations

import pytest
import torch

from monai_cf.networks.layers import has_forward_hooks, pointwise_conv, spatial_conv


@pytest.mark.parametrize("spatial_dims, size", [(2, 32), (3, 12)])
def test_fast_cpu_kernels_match_convolution(spatial_dims, size):
    torch.manual_seed(9)
    conv_type = torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d
    for conv, fast in [(conv_type(4, 3, 3, padding=1), spatial_conv), (conv_type(6, 5, 1), pointwise_conv)]:
        conv = conv.double()
        x = torch.randn((2, conv.in_channels) + (size,) * spatial_dims, dtype=torch.double, requires_grad=True)
        grad = torch.randn((2, conv.out_channels) + (size,) * spatial_dims, dtype=torch.double)
        params = (x, conv.weight, conv.bias)
        expected = conv(x)
        got = fast(conv, x)
        assert torch.allclose(got, expected, atol=1e-10)
        for a, b in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(expected, params, grad)):
            assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("fast, kernel", [(pointwise_conv, 1), (spatial_conv, 3)])
def test_forward_hooks_fire_and_act_on_the_cpu_paths(fast, kernel):
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(4, 6, kernel, padding=kernel // 2)
    x = torch.randn(2, 4, 32, 32, requires_grad=True)
    plain = fast(conv, x)
    seen = []
    handle = conv.register_forward_hook(lambda module, inputs, output: seen.append(output.shape) or output * 2)
    hooked = fast(conv, x)
    handle.remove()
    assert seen == [torch.Size([2, 6, 32, 32])]
    assert torch.allclose(hooked, 2 * plain, atol=1e-5)  # what the hook returns is what the layer returns
    if fast is pointwise_conv:  # a slice of the output channels is the slice of the hooked output
        handle = conv.register_forward_hook(lambda module, inputs, output: seen.append(output.shape[1]))
        assert torch.allclose(fast(conv, x, slice(1, 3)), plain[:, 1:3], atol=1e-5)
        handle.remove()
        assert seen[-1] == 6


def test_global_forward_hooks_count_as_hooks():
    conv = torch.nn.Conv2d(2, 2, 1)
    assert not has_forward_hooks(conv)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, output: None)
    try:
        assert has_forward_hooks(conv)
    finally:
        handle.remove()
    assert not has_forward_hooks(conv)
