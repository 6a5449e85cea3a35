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
"""Process settings that make CPU training and inference faster.

:func:`tune_cpu_allocator` keeps freed memory in the process instead of handing it back to the operating
system. With glibc's defaults, every tensor above 128 KiB to 32 MiB is mapped fresh from the kernel and
unmapped when freed, so each training step page-faults (and zero-fills) its activations again, which costs
a small HVAE 8-13% of its step time on a CPU. The engines call it when they run on a CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

import torch

__all__ = ["ALLOCATOR_ENV", "tune_cpu_allocator"]

logger = logging.getLogger(__name__)

#: environment variable that switches the tuning off when set to ``0`` (also in processes the engines spawn).
ALLOCATOR_ENV = "MONAI_CF_TUNE_ALLOCATOR"

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

#: requests up to this size come from the heap (glibc's largest allowed mmap threshold on 64-bit systems).
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
#: free memory at the top of the heap kept up to this size instead of being returned.
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024
#: extra memory requested whenever the heap grows, so that it grows less often.
TOP_PAD_BYTES = 64 * 1024 * 1024


def tune_cpu_allocator(device: str | torch.device | None = None) -> bool:
    """Serve tensors up to 32 MiB from the heap and keep freed memory, on glibc systems; once per process.

    The process's resident memory then stays near its peak instead of shrinking between steps; the peak itself
    does not grow. Measured on a 2-core CPU at the Morpho-MNIST HVAE architecture: training 96 -> 104 images/s,
    counterfactuals 270 -> 304 (medians of 6 interleaved runs), 1.6-2.8x fewer minor page faults.

    Args:
        device: the device the caller computes on; nothing is done unless it is a CPU (``None``: a CPU).

    Returns:
        Whether the settings are applied: ``False`` for a non-CPU device, when ``MONAI_CF_TUNE_ALLOCATOR=0``
        is set, or when the C library is not glibc (macOS, Windows, musl), where nothing is changed.

    Example::

        from monai_cf.engines.runtime import tune_cpu_allocator

        tune_cpu_allocator()  # before a CPU training loop of your own; the monai_cf engines call it already
    """
    if device is not None and torch.device(device).type != "cpu":
        return False
    return _apply_allocator_settings()


@functools.cache
def _apply_allocator_settings() -> bool:
    if os.environ.get(ALLOCATOR_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        logger.info(f"{ALLOCATOR_ENV}=0: the C allocator keeps its defaults.")
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = all(
        mallopt(parameter, value) == 1
        for parameter, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            (_M_TOP_PAD, TOP_PAD_BYTES),
        )
    )
    if applied:
        logger.debug("C allocator tuned: heap up to 32 MiB requests, freed memory kept.")
    return applied
