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
"""The HVAE's building blocks: its architecture strings, the bottleneck residual block, the bottom-up encoder and
one top-down decoder block."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_act_layer

from monai_cf.networks.layers.convolution import pointwise_conv, spatial_conv
from monai_cf.networks.layers.distributions import PosteriorSampleKL

__all__ = [
    "HVAEBottleneckBlock",
    "HVAEDecoderBlock",
    "HVAEEncoder",
    "kernel_size_at",
    "parse_decoder_arch",
    "parse_encoder_arch",
]

_ENCODER_STAGE = re.compile(r"^(\d+)b(\d+)(?:d(\d+))?$")
_DECODER_STAGE = re.compile(r"^(\d+)b(\d+)$")


def parse_encoder_arch(arch: str | Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    """Parse an encoder architecture into ``(resolution, num_blocks, down_rate)`` stages.

    ``"32b3d2,16b3d2,1b4"`` means three blocks at resolution 32 followed by a block that downsamples by 2,
    then three blocks at 16 and a downsampling block, and four blocks at resolution 1. A stage without
    ``d`` does not downsample (``down_rate`` 1). The resolution is the edge length of the square (2D) or
    cubic (3D) feature map. A sequence of ``(resolution, num_blocks, down_rate)`` triples is accepted as is.

    Raises:
        ValueError: when a stage is malformed.
    """
    stages: list[tuple[int, int, int]] = []
    items = arch.split(",") if isinstance(arch, str) else list(arch)
    for item in items:
        if isinstance(item, str):
            match = _ENCODER_STAGE.match(item.strip())
            if match is None:
                raise ValueError(f"encoder stage {item!r} is not of the form '<res>b<blocks>[d<rate>]', e.g. '32b3d2'.")
            res, blocks, down = int(match[1]), int(match[2]), int(match[3] or 1)
        else:
            values = tuple(int(v) for v in item)
            if len(values) not in (2, 3):
                raise ValueError(f"encoder stage {item!r} must be (resolution, num_blocks[, down_rate]).")
            res, blocks, down = values[0], values[1], values[2] if len(values) == 3 else 1
        if res < 1 or blocks < 0 or down < 1:
            raise ValueError(f"encoder stage {item!r} needs resolution >= 1, blocks >= 0 and down rate >= 1.")
        stages.append((res, blocks, down))
    if not stages:
        raise ValueError("encoder architecture is empty.")
    return stages


def parse_decoder_arch(arch: str | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Parse a decoder architecture into ``(resolution, num_blocks)`` stages.

    ``"1b4,4b4,8b4"`` means four decoder blocks at resolution 1, four at 4 and four at 8; the decoder
    upsamples (nearest neighbour) whenever the resolution grows. A sequence of ``(resolution, num_blocks)``
    pairs is accepted as is.

    Raises:
        ValueError: when a stage is malformed.
    """
    stages: list[tuple[int, int]] = []
    items = arch.split(",") if isinstance(arch, str) else list(arch)
    for item in items:
        if isinstance(item, str):
            match = _DECODER_STAGE.match(item.strip())
            if match is None:
                raise ValueError(f"decoder stage {item!r} is not of the form '<res>b<blocks>', e.g. '16b4'.")
            res, blocks = int(match[1]), int(match[2])
        else:
            values = tuple(int(v) for v in item)
            if len(values) != 2:
                raise ValueError(f"decoder stage {item!r} must be (resolution, num_blocks).")
            res, blocks = values
        if res < 1 or blocks < 1:
            raise ValueError(f"decoder stage {item!r} needs resolution >= 1 and at least one block.")
        stages.append((res, blocks))
    if not stages:
        raise ValueError("decoder architecture is empty.")
    return stages


def kernel_size_at(resolution: int) -> int:
    # a 3x3 kernel on a map of edge <= 2 sees (almost) the whole map; a 1x1 kernel does the same job
    return 3 if resolution > 2 else 1


class HVAEBottleneckBlock(nn.Module):
    """Pre-activation bottleneck block: act, 1x1 conv, act, kxk conv, act, kxk conv, act, 1x1 conv.

    With ``residual=True`` the input is added back (through a 1x1 projection when the widths differ); an
    optional average pooling by ``down_rate`` follows. ``forward`` accepts an ``extra`` tensor added after
    the first 1x1 conv, which is how :class:`HVAE` feeds the posterior the encoder features and the parents
    without concatenating them (a 1x1 conv of a concatenation is the sum of 1x1 convs of its parts).

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: input width.
        mid_channels: bottleneck width.
        out_channels: output width.
        kernel_size: size of the two middle convolutions (3, or 1 at tiny resolutions).
        residual: add the (projected) input to the output.
        down_rate: average-pooling factor applied at the end (1 for none).
        act: activation, any name or ``(name, args)`` MONAI's ``Act`` factory accepts.

    Example::

        block = HVAEBottleneckBlock(2, 32, 8, 64, down_rate=2)
        y = block(torch.randn(4, 32, 16, 16))  # (4, 64, 8, 8)
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        residual: bool = True,
        down_rate: int = 1,
        act: str | tuple = "GELU",
    ) -> None:
        super().__init__()
        conv_type = Conv[Conv.CONV, spatial_dims]
        padding = kernel_size // 2
        self.kernel_size = kernel_size
        self.act = get_act_layer(act)
        self.conv1 = conv_type(in_channels, mid_channels, 1)
        self.conv2 = conv_type(mid_channels, mid_channels, kernel_size, padding=padding)
        self.conv3 = conv_type(mid_channels, mid_channels, kernel_size, padding=padding)
        self.conv4 = conv_type(mid_channels, out_channels, 1)
        self.residual = residual
        self.skip = conv_type(in_channels, out_channels, 1) if residual and in_channels != out_channels else None
        self.pool = Pool[Pool.AVG, spatial_dims](kernel_size=down_rate, stride=down_rate) if down_rate > 1 else None

    def forward(
        self, x: torch.Tensor, extra: torch.Tensor | None = None, out_slice: slice | None = None
    ) -> torch.Tensor:
        """Apply the block.

        Args:
            x: input map.
            extra: added after the first 1x1 conv (the shape of its output, or broadcastable to it).
            out_slice: compute only these output channels, for a block without ``residual``; saves the last
                conv's work when a caller needs part of the output.
        """
        if out_slice is not None and self.residual:
            raise ValueError("out_slice needs a block without residual connection.")
        out = pointwise_conv(self.conv1, self.act(x))
        if extra is not None:
            out = out + extra
        if self.kernel_size == 1:
            out = pointwise_conv(self.conv3, self.act(pointwise_conv(self.conv2, self.act(out))))
        else:
            out = spatial_conv(self.conv3, self.act(spatial_conv(self.conv2, self.act(out))))
        out = pointwise_conv(self.conv4, self.act(out), out_slice)
        if self.residual:
            out = out + (x if self.skip is None else pointwise_conv(self.skip, x))
        if self.pool is not None:
            out = self.pool(out)
        return out


class HVAEEncoder(nn.Module):
    """Bottom-up path of :class:`HVAE`: a stem convolution and bottleneck blocks with average-pool downsampling.

    Stage ``i`` runs its blocks at width ``widths[i]``; its downsampling block changes the width to
    ``widths[i + 1]``. The forward pass returns the last feature map at every resolution.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: image channels.
        stages: ``(resolution, num_blocks, down_rate)`` triples, see :func:`parse_encoder_arch`.
        widths: one width per stage.
        bottleneck: ratio of block width to bottleneck width.
        act: activation for MONAI's ``Act`` factory.
        stem_kernel_size: kernel size of the stem convolution.

    Example::

        encoder = HVAEEncoder(2, 1, parse_encoder_arch("16b1d2,8b1d8,1b1"), widths=(8, 16, 32), bottleneck=4)
        features = encoder(torch.randn(2, 1, 16, 16))  # {16: (2, 8, 16, 16), 8: (2, 16, 8, 8), 1: (2, 32, 1, 1)}
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        stages: Sequence[tuple[int, int, int]],
        widths: Sequence[int],
        bottleneck: int = 4,
        act: str | tuple = "GELU",
        stem_kernel_size: int = 7,
    ) -> None:
        super().__init__()
        conv_type = Conv[Conv.CONV, spatial_dims]
        self.stem = conv_type(in_channels, widths[0], stem_kernel_size, padding=stem_kernel_size // 2)
        blocks: list[HVAEBottleneckBlock] = []
        out_resolutions: list[int] = []
        self.input_resolution = stages[0][0]
        self.widths_at: dict[int, int] = {stages[0][0]: widths[0]}
        for i, (res, num_blocks, down) in enumerate(stages):
            width = widths[i]
            for _ in range(num_blocks):
                blocks.append(
                    HVAEBottleneckBlock(
                        spatial_dims, width, max(width // bottleneck, 1), width, kernel_size_at(res), act=act
                    )
                )
                out_resolutions.append(res)
            if down > 1:
                blocks.append(
                    HVAEBottleneckBlock(
                        spatial_dims,
                        width,
                        max(width // bottleneck, 1),
                        widths[i + 1],
                        kernel_size_at(res),
                        down_rate=down,
                        act=act,
                    )
                )
                out_resolutions.append(res // down)
                self.widths_at[res // down] = widths[i + 1]
        scale = math.sqrt(1.0 / max(len(blocks), 1))
        with torch.no_grad():
            for block in blocks:
                block.conv4.weight.mul_(scale)
        self.blocks = nn.ModuleList(blocks)
        self.out_resolutions = out_resolutions

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        h = self.stem(x)
        features = {self.input_resolution: h}
        for block, res in zip(self.blocks, self.out_resolutions):
            h = block(h)
            features[res] = h
        return features


class HVAEDecoderBlock(nn.Module):
    """One top-down block of :class:`HVAE`.

    The prior ``p(z | z_<i)`` reads the prior stream only (never the parents) and returns the latent's
    mean and log-scale plus features merged into the deterministic state ``h``; the posterior
    ``q(z | h, encoder features, pa)`` reads ``h`` through ``posterior.conv1`` and gets the encoder
    features and parents as an ``extra`` term (projected by :class:`HVAE`, shared across blocks). Then
    ``h += prior features + proj(z) + proj(pa)``, ``h = conv(h)``, and the next prior stream is
    ``proj(cat[z, prior features])``, independent of the parents. Blocks above ``z_max_res`` are
    deterministic: ``z`` is the prior mean and there is no posterior.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        width: width of the block's state.
        out_width: width handed to the next block.
        resolution: edge length of the block's feature maps.
        z_dim: latent channels.
        bottleneck: ratio of block width to bottleneck width.
        stochastic: whether the block has a posterior and a latent variable.
        last: the last decoder block (it has no next prior stream to produce).
        act: activation for MONAI's ``Act`` factory.

    Example::

        block = HVAEDecoderBlock(2, width=32, out_width=16, resolution=8, z_dim=4)
        p = block.prior(torch.randn(2, 32, 8, 8))  # (2, 2 * 4 + 32, 8, 8): loc, logscale, features
    """

    def __init__(
        self,
        spatial_dims: int,
        width: int,
        out_width: int,
        resolution: int,
        z_dim: int,
        bottleneck: int = 4,
        stochastic: bool = True,
        last: bool = False,
        act: str | tuple = "GELU",
    ) -> None:
        super().__init__()
        conv_type = Conv[Conv.CONV, spatial_dims]
        mid = max(width // bottleneck, 1)
        kernel_size = kernel_size_at(resolution)
        self.width, self.out_width, self.resolution, self.z_dim = width, out_width, resolution, z_dim
        self.mid_channels = mid
        self.stochastic, self.last = stochastic, last
        prior_stats = 2 * z_dim if stochastic else z_dim
        self.prior = HVAEBottleneckBlock(
            spatial_dims, width, mid, prior_stats + width, kernel_size, residual=False, act=act
        )
        self.posterior = (
            HVAEBottleneckBlock(spatial_dims, width, mid, 2 * z_dim, kernel_size, residual=False, act=act)
            if stochastic
            else None
        )
        # one conv of z feeds both the state update and (except in the last block) the next prior stream
        self.z_proj = conv_type(z_dim, width + (0 if last else out_width), 1)
        self.feature_proj = None if last else conv_type(width, out_width, 1, bias=False)
        self.conv = HVAEBottleneckBlock(spatial_dims, width, mid, out_width, kernel_size, residual=True, act=act)

    def forward(
        self,
        h: torch.Tensor,
        z_stream: torch.Tensor,
        posterior_extra: torch.Tensor | None = None,
        latent: torch.Tensor | None = None,
        temperature: float = 1.0,
        posterior_mean: bool = False,
        want_kl: bool = False,
        state_parents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """One top-down step: the latent, then the updated state and the next prior stream.

        The latent comes from the posterior when ``posterior_extra`` (the block's encoder-feature and parents term)
        is given, else it is ``latent``, else a prior draw at ``temperature``. ``h`` may hold several parent sets
        for one prior stream (branch-major, ``h.shape[0]`` a multiple of ``z_stream.shape[0]``); the posterior
        reads the first (the factual parents).

        Args:
            h: the deterministic state ``(branches * B, width, *spatial)``.
            z_stream: the prior stream ``(B, width, *spatial)``.
            posterior_extra: the posterior's extra input; ``None`` for no posterior.
            latent: a given latent ``(B, z_dim, *spatial)`` (no posterior).
            temperature: scales the prior's standard deviation of a drawn latent.
            posterior_mean: take the posterior mean instead of a posterior sample.
            want_kl: also return the KL sums of the posterior to the prior (posterior only).
            state_parents: the parents' per-channel offset of the state ``(branches * B, width, 1, ...)``.

        Returns:
            ``(h, next prior stream (None for the last block), z (None if deterministic), KL sums or None)``.

        Example::

            block = HVAEDecoderBlock(2, width=32, out_width=16, resolution=8, z_dim=4)
            h, z_stream, z, _ = block(torch.randn(2, 32, 8, 8), torch.randn(2, 32, 8, 8))  # z from the prior
        """
        zd, kl_sums = self.z_dim, None
        posterior = self.stochastic and posterior_extra is not None
        if posterior and not want_kl:
            # latents from the posterior and no KL: the prior's mean and scale are not needed
            p_features, p_loc, p_logscale = self.prior(z_stream, out_slice=slice(2 * zd, None)), None, None
        elif self.stochastic:
            # split (not slicing) so that autograd joins the gradients with one concatenation
            p_loc, p_logscale, p_features = self.prior(z_stream).split([zd, zd, self.width], dim=1)
        else:
            z, p_features = self.prior(z_stream).split([zd, self.width], dim=1)
        # latents and KL terms in float32 (a no-op cast unless the blocks ran under bf16 autocast)
        if posterior:
            batch = z_stream.shape[0]
            q_stats = self.posterior(h if h.shape[0] == batch else h[:batch], extra=posterior_extra).float()
            q_loc, q_logscale = q_stats.chunk(2, dim=1)
            if want_kl:
                noise = None if posterior_mean else torch.randn_like(q_loc)
                z, kl_sums = PosteriorSampleKL.apply(q_loc, q_logscale, p_loc.float(), p_logscale.float(), noise)
            else:
                z = q_loc if posterior_mean else q_loc + torch.exp(q_logscale) * torch.randn_like(q_loc)
        elif self.stochastic and latent is None:
            noise = torch.randn_like(p_loc, dtype=torch.float32)
            scale = torch.exp(p_logscale.float())
            z = p_loc.float() + scale * (noise if temperature == 1.0 else noise * temperature)
        elif self.stochastic:
            z = latent
        if self.last:
            z_state, z_next = pointwise_conv(self.z_proj, z), None
        else:
            z_state, z_next = pointwise_conv(self.z_proj, z).split([self.width, self.out_width], dim=1)
        shared = p_features + z_state
        if h.shape[0] == shared.shape[0]:
            h = h + shared
        else:
            h = (h.unflatten(0, (-1, shared.shape[0])) + shared.unsqueeze(0)).flatten(0, 1)
        if state_parents is not None:
            h = h + state_parents
        h = self.conv(h)
        if z_next is not None:
            z_next = z_next + pointwise_conv(self.feature_proj, p_features)
        return h, z_next, (z if self.stochastic else None), kl_sums
