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
"""Building blocks of monai_cf's networks (the HVAE's encoder, decoder and bottleneck blocks)."""

from __future__ import annotations

from .hvae_blocks import (
    HVAEBottleneckBlock,
    HVAEDecoderBlock,
    HVAEEncoder,
    kernel_size_at,
    parse_decoder_arch,
    parse_encoder_arch,
)
