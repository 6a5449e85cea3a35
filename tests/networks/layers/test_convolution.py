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

from monai_cf.networks.layers import pointwise_conv, spatial_conv


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
