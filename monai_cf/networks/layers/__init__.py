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
"""Layers and functions below the blocks: the ELBO's Gaussian terms, CPU-fast convolutions, precision detection."""

from __future__ import annotations

from .convolution import FewChannelConvFunction, has_forward_hooks, pointwise_conv, spatial_conv, uniform_init_
from .distributions import PosteriorSampleKL, discretized_gaussian_log_likelihood, gaussian_kl
from .precision import autocast_off, bf16_is_native, compute_dtype
