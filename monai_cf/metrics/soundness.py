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
"""Axiomatic soundness of counterfactuals (Monteiro et al., ICLR 2023) and ground-truth image error.

A *counterfactual function* ``cf_fn(x, pa, do) -> (x_cf, pa_cf)`` follows the calling convention of
:meth:`monai_cf.networks.DeepSCM.counterfactual`: images ``(B, C, *spatial)`` in ``[0, 1]``, ``pa`` a dict of
canonical ``(B,)`` values, ``do`` a dict ``{attribute: (B,) values}``.

- **composition**: the null intervention ``do={}`` applied ``m`` times, each output fed back in, should give
  back ``x``: ``d(x, f^m(x))``;
- **reversibility**: ``do(a')`` then ``do(a)`` back to the factual value should give back ``x``;
- **ground truth** (phantom data only): L1, PSNR and SSIM between a counterfactual and the true one.

Distances are per-image mean absolute errors on the ``[0, 255]`` scale.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.metrics import PSNRMetric, SSIMMetric

__all__ = [
    "CounterfactualFn",
    "l1_255",
    "composition_distances",
    "reversibility_distances",
    "image_similarity",
    "MAX_PSNR",
]

#: ``cf_fn(x, pa, do) -> (x_cf, pa_cf)``, see the module docstring.
CounterfactualFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, Any]], tuple[torch.Tensor, Any]]

#: PSNR of identical images is infinite; it is reported as this many dB so that means stay finite.
MAX_PSNR = 100.0


def l1_255(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image mean absolute difference ``(B,)`` on the ``[0, 255]`` scale of images in ``[0, data_range]``.

    Example::

        l1_255(torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5))  # tensor([127.5, 127.5])
    """
    if x.shape != y.shape:
        raise ValueError(f"Image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}.")
    diff = (x.detach().double() - y.detach().double()).abs() * (255.0 / data_range)
    return diff.flatten(1).mean(dim=1)


def composition_distances(
    cf_fn: CounterfactualFn,
    x: torch.Tensor,
    pa: Mapping[str, torch.Tensor],
    cycles: Sequence[int] = (1, 10),
    data_range: float = 1.0,
) -> dict[int, torch.Tensor]:
    """Per-image L1 (0-255) between ``x`` and the null intervention applied ``m`` times, for ``m`` in ``cycles``.

    Each cycle feeds the previous output and its returned attributes back in, so ``max(cycles)`` calls are
    made in all.

    Example::

        composition_distances(lambda x, pa, do: (x, pa), x, pa)  # {1: zeros(B), 10: zeros(B)}
    """
    cycles = sorted({int(m) for m in cycles})
    if not cycles or cycles[0] < 1:
        raise ValueError(f"composition cycles must be positive integers, got {list(cycles)}.")
    result: dict[int, torch.Tensor] = {}
    current, current_pa = x, dict(pa)
    for m in range(1, cycles[-1] + 1):
        current, returned_pa = cf_fn(current, current_pa, {})
        current_pa = dict(returned_pa) if returned_pa is not None else current_pa
        if m in cycles:
            result[m] = l1_255(x, current, data_range)
    return result


def reversibility_distances(
    cf_fn: CounterfactualFn,
    x: torch.Tensor,
    pa: Mapping[str, torch.Tensor],
    do: Mapping[str, Any],
    forward: tuple[torch.Tensor, Mapping[str, torch.Tensor]] | None = None,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Per-image L1 (0-255) between ``x`` and ``f(f(x, pa, do), pa', do_back)``, ``do_back`` the factual values.

    Args:
        cf_fn: the counterfactual function.
        x: factual images.
        pa: factual canonical attributes.
        do: the forward intervention ``{attribute: (B,) values}``.
        forward: the forward counterfactual ``(x_cf, pa_cf)`` if already computed.
        data_range: the image range.
    """
    x_cf, pa_cf = forward if forward is not None else cf_fn(x, pa, do)
    back = {name: pa[name] for name in do}
    x_back, _ = cf_fn(x_cf, pa_cf, back)
    return l1_255(x, x_back, data_range)


def image_similarity(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-image L1 (0-255), PSNR (dB, capped at ``MAX_PSNR``) and SSIM between two image batches.

    Uses MONAI's ``PSNRMetric`` and ``SSIMMetric`` (Gaussian window of 11 pixels; 7 for images of 32 pixels a
    side or less, where an 11-pixel window would leave few valid positions).

    Example::

        image_similarity(x, x)  # {"l1": zeros, "psnr": 100s, "ssim": ones}
    """
    if x.shape != y.shape:
        raise ValueError(f"Image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}.")
    spatial_dims = x.ndim - 2
    x64, y64 = x.detach().double(), y.detach().double()
    psnr = PSNRMetric(max_val=data_range, reduction="none")(x64, y64).reshape(-1)
    psnr = torch.nan_to_num(psnr, posinf=MAX_PSNR).clamp(max=MAX_PSNR)
    win = 11 if min(x.shape[2:]) > 32 else 7
    ssim = SSIMMetric(spatial_dims=spatial_dims, data_range=data_range, win_size=win, reduction="none")(x64, y64)
    return {"l1": l1_255(x, y, data_range), "psnr": psnr, "ssim": ssim.reshape(-1)}
