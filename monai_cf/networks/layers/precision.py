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
"""Where bfloat16 pays (native bf16 matrix products) and the dtype autocast computes in."""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["autocast_off", "bf16_is_native", "compute_dtype"]


@functools.cache
def _cpu_has_native_bf16() -> bool:
    is_supported = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if not torch.backends.mkldnn.is_available() or is_supported is None:
        return False
    return bool(is_supported() or (amx is not None and amx()))


def bf16_is_native(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively (so bf16 autocast pays).

    True for a CPU with AVX-512 BF16 or AMX (through oneDNN) and for a CUDA GPU with bf16 hardware
    support (Ampere or newer); False otherwise, including for CPUs that would only emulate bf16.

    Example::

        bf16_is_native("cpu")  # True on e.g. AMD Zen 4 or Intel Sapphire Rapids
    """
    device = torch.device(device)
    if device.type == "cpu":
        return _cpu_has_native_bf16()
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch without the keyword
            return bool(torch.cuda.is_bf16_supported())
    return False


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast runs matrix products in on ``x``'s device (``x``'s own dtype outside autocast)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
