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
"""A VDVAE-style hierarchical VAE used as the image mechanism of a deep structural causal model.

The image ``x`` is generated from its causal parents ``pa`` (a vector, tiled over space) and a hierarchy of
spatial latents ``z_1, ..., z_L`` whose prior ``p(z_i | z_<i)`` never sees the parents, so the latents are
exogenous noise: abducting them from an image and decoding them under new parents gives a counterfactual.
The per-pixel noise of the discretised Gaussian likelihood is abducted as well, which makes the null
intervention return the input image.

The blocks are in :mod:`monai_cf.networks.blocks.hvae_blocks`, the likelihood and KL terms, the CPU convolution
kernels and the bf16 detection in :mod:`monai_cf.networks.layers`; this module holds the model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_act_layer

from monai_cf.networks.blocks.hvae_blocks import (
    HVAEBottleneckBlock,
    HVAEDecoderBlock,
    HVAEEncoder,
    parse_decoder_arch,
    parse_encoder_arch,
)
from monai_cf.networks.layers.convolution import pointwise_conv, uniform_init_
from monai_cf.networks.layers.distributions import (
    discretized_gaussian_log_likelihood,
    gaussian_kl,
)
from monai_cf.networks.layers.precision import autocast_off, bf16_is_native

__all__ = [
    "HVAE",
    "HVAEBottleneckBlock",
    "HVAEDecoderBlock",
    "HVAEEncoder",
    "PRECISIONS",
    "bf16_is_native",
    "discretized_gaussian_log_likelihood",
    "gaussian_kl",
    "parse_decoder_arch",
    "parse_encoder_arch",
]

#: values of :attr:`HVAE.precision`.
PRECISIONS = ("auto", "bf16", "fp32")


class HVAE(nn.Module):
    """Hierarchical VAE image mechanism ``x = f(z, pa, u)`` with exogenous latents, for counterfactuals.

    A VDVAE-style ladder network. The encoder (bottom-up) runs bottleneck residual blocks with average-pool
    downsampling; the decoder (top-down) starts from a learned bias map, upsamples by nearest neighbour and
    adds learned bias maps at resolutions up to ``bias_max_res``. Each decoder block at a resolution up to
    ``z_max_res`` holds a spatial Gaussian latent ``z_i`` with ``z_dim`` channels:

    - prior ``p(z_i | z_<i)``: a separate prior stream that never sees the parents (``z`` is exogenous);
    - posterior ``q(z_i | x, pa, z_<i)``: decoder state, encoder features at that resolution and parents;
    - deterministic path ``h += proj(cat[z_i, pa])``.

    The parents ``pa`` (a ``(B, parents_dim)`` vector) are conceptually tiled over space and concatenated;
    since a 1x1 conv of a spatially constant input is a per-sample constant, they enter as a linear map
    broadcast-added, which is the same function at a fraction of the cost. The likelihood is a
    discretised Gaussian over 256 bins on data in ``[-1, 1]`` with per-pixel mean and log-scale (one 1x1
    conv, log-scale floored at ``min_logscale``); the KL terms are analytic. Losses are in nats per image
    element (pixel or voxel times channel), averaged over the batch.

    Architecture strings (see :func:`parse_encoder_arch`, :func:`parse_decoder_arch`) follow the reference
    causal-gen code: encoder ``"<res>b<blocks>d<down>"``, decoder ``"<res>b<blocks>"``, ``widths[i]`` the
    width of encoder stage ``i`` and of decoder stage ``len(widths) - 1 - i``, bottleneck width
    ``width // bottleneck``. For ``spatial_dims=3`` the same strings describe cubes (``"32b3d2"``: three blocks
    on 32^3 maps, then downsampling to 16^3). Convolutions at resolutions <= 2 use 1x1 kernels (the
    reference keeps 3x3 kernels there in the encoder, which on a 1x1 map only adds dead weights).
    With ``encoder_arch=None`` a small architecture is derived from ``spatial_size`` by
    :meth:`default_architecture` (about 0.4-0.5M parameters at 32-64 pixels).

    Presets (:meth:`from_preset`): ``"mimic192"`` and ``"morphomnist"`` (the reference architectures),
    ``"small32"`` and ``"small64"`` (the defaults at 32 and 64 pixels, 6 parent dims).

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: image channels (each modelled independently given the latents).
        spatial_size: edge length of the square/cubic input (an int, or a sequence of equal ints).
        parents_dim: width of the parents vector ``pa`` (0 for an unconditional model, then ``pa=None``).
        encoder_arch: encoder stages as a string or ``(res, blocks, down)`` triples; ``None`` for the default.
        decoder_arch: decoder stages as a string or ``(res, blocks)`` pairs; ``None`` for the default.
        widths: one width per encoder stage (the decoder uses them reversed); ``None`` for the default.
        z_dim: channels of each latent.
        bottleneck: ratio of block width to bottleneck width.
        z_max_res: decoder blocks at resolutions above this are deterministic; ``None``: half the input size
            with the default architecture (``encoder_arch=None``), every resolution otherwise.
        bias_max_res: learned decoder bias maps at resolutions up to this (always one at the first decoder
            resolution, the decoder's starting state).
        parent_maps_max_res: at decoder resolutions up to this, the parents also enter the deterministic state
            through a learned linear map to a full spatial map (a parent-dependent bias map, zero at
            initialisation; the prior stream never sees it). 0: parents enter only as the reference does,
            spatially constant.
        state_parents: the parents also enter each decoder block's state as a spatially constant per-channel
            offset (the reference's pathway). ``False`` leaves the parent maps as the decoder's only parent
            pathway (they must then be on, ``parent_maps_max_res > 0``): the two pathways can represent one effect
            twice, in large opposite parts whose imperfect cancellation changes the whole image under an
            intervention whose true effect is local.
        act: activation for MONAI's ``Act`` factory (GELU by default).
        stem_kernel_size: kernel size of the encoder's stem convolution.
        min_logscale: floor of the likelihood's log-scale.
        num_bins: quantisation levels of the data for the discretised likelihood.
        beta: default KL weight of :meth:`elbo`.
        free_bits: default free bits (nats per latent channel and layer, summed over space, batch-averaged).
        precision: arithmetic of the convolution stacks, see :attr:`precision`: ``"auto"`` (bfloat16 autocast
            where the device computes bf16 natively, else float32), ``"bf16"`` or ``"fp32"``. The likelihood,
            the KL terms, the latents and the losses are float32 in every mode; so are the parameters.
        counterfactual_noise: how :meth:`counterfactual` carries the abducted pixel noise, see
            :attr:`counterfactual_noise`. It does not change training or the weights.

    Example::

        model = HVAE(spatial_dims=2, in_channels=1, spatial_size=32, parents_dim=6)
        x = torch.rand(8, 1, 32, 32) * 2 - 1
        pa = torch.randn(8, 6)
        losses = model.elbo(x, pa)  # {"nelbo", "nll", "kl"}, nats per pixel
        losses["nelbo"].backward()
        z = model.abduct(x, pa, posterior_mean=True)
        loc, scale = model.decode(z, pa)
        x_cf = model.counterfactual(x, pa, pa_cf=torch.randn(8, 6))
        model.precision = "fp32"  # exact float32 arithmetic from now on (the default "auto" may use bf16)
        big = HVAE.from_preset("mimic192")  # the reference MIMIC-CXR 192x192 architecture
    """

    #: ``"auto"`` uses bf16 on a CPU only for models of at least this many multiply-accumulates per image in
    #: the forward pass. Below it the convolutions are too narrow for bf16 matrix products to pay for the casts:
    #: measured on a 2-core AVX-512 BF16 CPU, training the Morpho-MNIST architecture (41M MACs per image) runs
    #: 20-30% slower in bf16 than in fp32, while the MIMIC-192 one (4.5G) runs 1.6x faster.
    AUTO_BF16_MIN_MACS: int = 10**9

    PRESETS: dict[str, dict[str, Any]] = {
        "mimic192": {
            "in_channels": 1,
            "spatial_size": 192,
            "parents_dim": 6,
            "encoder_arch": "192b1d2,96b3d2,48b7d2,24b11d2,12b7d2,6b3d6,1b2",
            "decoder_arch": "1b2,6b4,12b8,24b12,48b8,96b4,192b2",
            "widths": (32, 64, 96, 128, 160, 192, 512),
            "z_dim": 16,
            "bottleneck": 4,
            "z_max_res": 96,
            "bias_max_res": 64,
            "beta": 9.0,
        },
        "morphomnist": {
            "in_channels": 1,
            "spatial_size": 32,
            "parents_dim": 12,
            "encoder_arch": "32b3d2,16b3d2,8b3d2,4b3d4,1b4",
            "decoder_arch": "1b4,4b4,8b4,16b4,32b4",
            "widths": (16, 32, 64, 128, 256),
            "z_dim": 16,
            "bottleneck": 4,
            "z_max_res": None,
            "bias_max_res": 64,
            "beta": 1.0,
        },
        "small32": {"in_channels": 1, "spatial_size": 32, "parents_dim": 6},
        "small64": {"in_channels": 1, "spatial_size": 64, "parents_dim": 6},
    }

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        spatial_size: int | Sequence[int],
        parents_dim: int,
        encoder_arch: str | Sequence[Sequence[int]] | None = None,
        decoder_arch: str | Sequence[Sequence[int]] | None = None,
        widths: Sequence[int] | None = None,
        z_dim: int = 16,
        bottleneck: int = 4,
        z_max_res: int | None = None,
        bias_max_res: int = 64,
        parent_maps_max_res: int = 0,
        state_parents: bool = True,
        act: str | tuple = "GELU",
        stem_kernel_size: int = 7,
        min_logscale: float = -9.0,
        num_bins: int = 256,
        beta: float = 1.0,
        free_bits: float = 0.0,
        precision: str = "auto",
        counterfactual_noise: str = "scaled",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        sizes = (spatial_size,) * spatial_dims if isinstance(spatial_size, int) else tuple(int(s) for s in spatial_size)
        if len(sizes) != spatial_dims or len(set(sizes)) != 1:
            raise ValueError(
                f"spatial_size must be an int or {spatial_dims} equal ints (square/cubic input), got {spatial_size}."
            )
        if in_channels < 1 or parents_dim < 0 or z_dim < 1 or bottleneck < 1:
            raise ValueError(
                f"need in_channels >= 1, parents_dim >= 0, z_dim >= 1, bottleneck >= 1; got {in_channels}, "
                f"{parents_dim}, {z_dim}, {bottleneck}."
            )
        size = sizes[0]
        if encoder_arch is None or decoder_arch is None or widths is None:
            default = self.default_architecture(size)
            if encoder_arch is None and z_max_res is None:
                z_max_res = default["z_max_res"]
            encoder_arch = default["encoder_arch"] if encoder_arch is None else encoder_arch
            decoder_arch = default["decoder_arch"] if decoder_arch is None else decoder_arch
            widths = default["widths"] if widths is None else widths
        enc_stages = parse_encoder_arch(encoder_arch)
        dec_stages = parse_decoder_arch(decoder_arch)
        widths = tuple(int(w) for w in widths)
        self._validate_architecture(size, enc_stages, dec_stages, widths)

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.spatial_size = sizes
        self.parents_dim = parents_dim
        self.z_dim = z_dim
        self.z_max_res = z_max_res
        self.min_logscale = float(min_logscale)
        self.num_bins = num_bins
        self.beta = float(beta)
        self.free_bits = float(free_bits)
        self.precision = precision
        self.counterfactual_noise = counterfactual_noise
        self.encoder_stages, self.decoder_stages, self.widths = enc_stages, dec_stages, widths
        self.act = get_act_layer(act)

        self.encoder = HVAEEncoder(spatial_dims, in_channels, enc_stages, widths, bottleneck, act, stem_kernel_size)

        dec_widths = widths[::-1]
        plan = [(res, dec_widths[i]) for i, (res, blocks) in enumerate(dec_stages) for _ in range(blocks)]
        blocks: list[HVAEDecoderBlock] = []
        for i, (res, width) in enumerate(plan):
            out_width = plan[min(i + 1, len(plan) - 1)][1]
            stochastic = z_max_res is None or res <= z_max_res
            blocks.append(
                HVAEDecoderBlock(
                    spatial_dims, width, out_width, res, z_dim, bottleneck, stochastic, i == len(plan) - 1, act
                )
            )
        self.decoder_blocks = nn.ModuleList(blocks)
        if not any(b.stochastic for b in blocks):
            raise ValueError(f"z_max_res={z_max_res} leaves no stochastic decoder block (resolutions {plan}).")

        first_res = dec_stages[0][0]
        self.bias_maps = nn.ParameterDict(
            {
                str(res): nn.Parameter(torch.zeros((1, dec_widths[i]) + (res,) * spatial_dims))
                for i, (res, _) in enumerate(dec_stages)
                if res <= bias_max_res or res == first_res
            }
        )
        self.parent_maps_max_res = int(parent_maps_max_res)
        if not isinstance(state_parents, bool):
            raise ValueError(f"state_parents must be True or False, got {state_parents!r}.")
        self.state_parents = state_parents
        if parents_dim > 0 and not self.state_parents and not any(r <= self.parent_maps_max_res for r, _ in dec_stages):
            raise ValueError(
                "state_parents=False needs parent maps (parent_maps_max_res of at least the first decoder resolution, "
                f"{dec_stages[0][0]}), else the decoder never sees the parents; got parent_maps_max_res="
                f"{parent_maps_max_res}."
            )
        # parent-dependent bias maps of the deterministic state (never of the prior stream): a linear path from
        # the parents to a spatial map at each resolution, zero at initialisation
        self.parent_maps = nn.ModuleDict(
            {
                str(res): nn.Linear(parents_dim, dec_widths[i] * res**spatial_dims, bias=False)
                for i, (res, _) in enumerate(dec_stages)
                if parents_dim > 0 and res <= self.parent_maps_max_res
            }
        )
        for linear in self.parent_maps.values():
            nn.init.zeros_(linear.weight)

        # encoder features enter each posterior through its first 1x1 conv: one fused conv per resolution
        mids_at: dict[int, list[int]] = {}
        for b in blocks:
            if b.stochastic:
                mids_at.setdefault(b.resolution, []).append(b.mid_channels)
        conv_type = Conv[Conv.CONV, spatial_dims]
        self.posterior_feature_proj = nn.ModuleDict(
            {
                str(res): conv_type(self.encoder.widths_at[res], sum(mids), 1, bias=False)
                for res, mids in mids_at.items()
            }
        )
        self._posterior_mid_splits = {res: mids for res, mids in mids_at.items()}
        if parents_dim > 0:
            self.posterior_parents_proj = nn.Linear(parents_dim, sum(sum(m) for m in mids_at.values()), bias=False)
            self.state_parents_proj = (
                nn.Linear(parents_dim, sum(b.width for b in blocks), bias=False) if state_parents else None
            )
        else:
            self.posterior_parents_proj = None
            self.state_parents_proj = None
        self.likelihood_head = conv_type(dec_widths[-1], 2 * in_channels, 1)
        self._init_weights()
        self.macs_per_image = self._count_macs_per_image()

    # ------------------------------------------------------------------------------------------------ setup
    @staticmethod
    def default_architecture(spatial_size: int) -> dict[str, Any]:
        """The small default architecture for an input of edge ``spatial_size``, tuned for CPU training.

        Resolutions halve down to 4 (or the first odd size) and then drop to 1. Widths: 8 at >= 64 pixels,
        16 at 32, 32 at 16, 64 at 8, 96 at the other resolutions > 1 and 128 at 1. The encoder has only
        its downsampling block above 16 pixels and one block per resolution from 16 down; the decoder has
        one block per resolution above 16 and two from 16 down. Latents live at every resolution but the
        input's (``z_max_res = spatial_size // 2``): the abducted pixel noise carries the finest detail.
        About 0.42M parameters at 32 pixels and 0.46M at 64.

        Returns:
            dict with ``encoder_arch``, ``decoder_arch``, ``widths`` and ``z_max_res``.
        """
        resolutions = [spatial_size]
        while resolutions[-1] > 4 and resolutions[-1] % 2 == 0:
            resolutions.append(resolutions[-1] // 2)
        if resolutions[-1] > 1:
            resolutions.append(1)
        encoder, decoder, widths = [], [], []
        for i, res in enumerate(resolutions):
            down = res // resolutions[i + 1] if i + 1 < len(resolutions) else 1
            encoder.append(f"{res}b{0 if res > 16 and down > 1 else 1}" + (f"d{down}" if down > 1 else ""))
            decoder.insert(0, f"{res}b{1 if res > 16 else 2}")
            thresholds = ((64, 8), (32, 16), (16, 32), (8, 64), (2, 96), (1, 128))
            widths.append(next(width for edge, width in thresholds if res >= edge))
        return {
            "encoder_arch": ",".join(encoder),
            "decoder_arch": ",".join(decoder),
            "widths": tuple(widths),
            "z_max_res": max(spatial_size // 2, 1),
        }

    @classmethod
    def from_preset(cls, name: str, spatial_dims: int = 2, **overrides: Any) -> HVAE:
        """Build a preset architecture (see :attr:`PRESETS`), any constructor argument overridable.

        Example::

            model = HVAE.from_preset("morphomnist")  # 32x32, 12 parent dims
            model = HVAE.from_preset("small64", parents_dim=4)
        """
        if name not in cls.PRESETS:
            raise ValueError(f"unknown HVAE preset {name!r}; available: {sorted(cls.PRESETS)}.")
        kwargs = {**cls.PRESETS[name], **overrides}
        return cls(spatial_dims=spatial_dims, **kwargs)

    @staticmethod
    def _validate_architecture(
        size: int, enc: list[tuple[int, int, int]], dec: list[tuple[int, int]], widths: tuple[int, ...]
    ) -> None:
        if enc[0][0] != size:
            raise ValueError(f"encoder architecture starts at resolution {enc[0][0]}, but spatial_size is {size}.")
        if not (len(widths) == len(enc) == len(dec)):
            raise ValueError(
                f"need one width per encoder stage and per decoder stage: got {len(widths)} widths, "
                f"{len(enc)} encoder stages, {len(dec)} decoder stages."
            )
        for i, (res, _, down) in enumerate(enc):
            if res % down:
                raise ValueError(f"encoder stage {i} ({res}b..d{down}): resolution {res} is not divisible by {down}.")
            if i + 1 < len(enc) and res // down != enc[i + 1][0]:
                raise ValueError(
                    f"encoder stage {i} downsamples {res} by {down} to {res // down}, but the next stage is at "
                    f"{enc[i + 1][0]}."
                )
            if i + 1 == len(enc) and down != 1:
                raise ValueError(f"the last encoder stage ({res}) cannot downsample.")
        enc_res = {s[0] for s in enc}
        for i, (res, _) in enumerate(dec):
            if res not in enc_res:
                raise ValueError(f"decoder stage {i} at resolution {res} has no encoder stage at that resolution.")
            if i > 0 and (res <= dec[i - 1][0] or res % dec[i - 1][0]):
                raise ValueError(
                    f"decoder resolutions must increase by integer factors, got {dec[i - 1][0]} then {res}."
                )
        if dec[-1][0] != size:
            raise ValueError(f"decoder architecture ends at resolution {dec[-1][0]}, but spatial_size is {size}.")

    def _init_weights(self) -> None:
        """Match the reference's initialisation of the (conceptually concatenated) inputs we split.

        Residual branches end with a conv scaled by ``sqrt(1 / #blocks)``; the prior's last conv starts at
        zero (a standard normal prior and no prior features at initialisation).
        """
        blocks = list(self.decoder_blocks)
        scale = math.sqrt(1.0 / len(blocks))
        pa_dim = self.parents_dim
        posterior_fan_in = {
            id(b): b.width + self.encoder.widths_at[b.resolution] + pa_dim for b in blocks if b.stochastic
        }
        with torch.no_grad():
            for block in blocks:
                block.conv.conv4.weight.mul_(scale)
                block.prior.conv4.weight.zero_()
                block.prior.conv4.bias.zero_()
                w = block.width
                # state update: a 1x1 conv of cat[z, pa]
                uniform_init_(block.z_proj.weight[:w], block.z_dim + pa_dim, scale)
                uniform_init_(block.z_proj.bias[:w], block.z_dim + pa_dim)
                if not block.last:
                    # next prior stream: a 1x1 conv of cat[z, prior features]
                    uniform_init_(block.z_proj.weight[w:], block.z_dim + w)
                    uniform_init_(block.z_proj.bias[w:], block.z_dim + w)
                    uniform_init_(block.feature_proj.weight, block.z_dim + w)
                if block.posterior is not None:
                    # posterior: a 1x1 conv of cat[h, encoder features, pa]
                    uniform_init_(block.posterior.conv1.weight, posterior_fan_in[id(block)])
                    uniform_init_(block.posterior.conv1.bias, posterior_fan_in[id(block)])
            # fused projections: rows laid out resolution by resolution, blocks in order within one
            parents_row = 0
            for res in self._posterior_mid_splits:
                feature_row = 0
                weight = self.posterior_feature_proj[str(res)].weight
                for block in blocks:
                    if block.posterior is None or block.resolution != res:
                        continue
                    rows = slice(feature_row, feature_row + block.mid_channels)
                    uniform_init_(weight[rows], posterior_fan_in[id(block)])
                    feature_row += block.mid_channels
                    if self.posterior_parents_proj is not None:
                        rows = slice(parents_row, parents_row + block.mid_channels)
                        uniform_init_(self.posterior_parents_proj.weight[rows], posterior_fan_in[id(block)])
                        parents_row += block.mid_channels
            if self.state_parents_proj is not None:
                row = 0
                for block in blocks:
                    uniform_init_(self.state_parents_proj.weight[row : row + block.width], block.z_dim + pa_dim, scale)
                    row += block.width

    def _count_macs_per_image(self) -> int:
        """Multiply-accumulates of the convolutions in one forward pass (ELBO) of one image."""
        dims = self.spatial_dims

        def macs(module: nn.Module, resolution: int) -> int:
            convs = (m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd))
            return sum(conv.weight.numel() * resolution**dims for conv in convs)

        size = self.spatial_size[0]
        total = macs(self.encoder.stem, size) + macs(self.likelihood_head, size)
        resolution = size
        for block, out_resolution in zip(self.encoder.blocks, self.encoder.out_resolutions):
            total += macs(block, resolution)  # downsampling blocks pool after their convolutions
            resolution = out_resolution
        total += sum(macs(block, block.resolution) for block in self.decoder_blocks)
        total += sum(macs(proj, int(res)) for res, proj in self.posterior_feature_proj.items())
        return total

    # ------------------------------------------------------------------------------------------- properties
    @property
    def precision(self) -> str:
        """Arithmetic of the convolution stacks in every public method: ``"auto"``, ``"bf16"`` or ``"fp32"``.

        ``"bf16"`` runs the encoder and decoder blocks under bfloat16 autocast (parameters, gradients and
        optimizer state stay float32); the likelihood head, the discretised likelihood, the KL terms, the
        sampled latents and the losses are computed in float32 from float32 casts. ``"fp32"`` disables any
        autocast, reproducing the plain float32 numbers. ``"auto"`` is ``"bf16"`` where it is faster: on GPUs
        that compute bf16 natively (Ampere+), and on CPUs that do (:func:`bf16_is_native`: AVX-512 BF16/AMX)
        for models of at least :attr:`AUTO_BF16_MIN_MACS` multiply-accumulates per image
        (:attr:`macs_per_image`; e.g. the MIMIC-192 preset, not the small ones); ``"fp32"`` elsewhere. It
        leaves an autocast the caller already opened for the device as it is. Settable at any time.

        Example::

            model = HVAE.from_preset("morphomnist", precision="fp32")
            model.precision = "auto"
        """
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        if value not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {value!r}.")
        self._precision = value

    def _precision_context(self, device: torch.device) -> contextlib.AbstractContextManager:
        device_type = device.type
        if device_type not in ("cpu", "cuda"):
            return contextlib.nullcontext()
        if self._precision == "fp32":
            return autocast_off(device)
        if self._precision == "bf16" or (
            not torch.is_autocast_enabled(device_type)
            and bf16_is_native(device)
            and (device_type != "cpu" or self.macs_per_image >= self.AUTO_BF16_MIN_MACS)
        ):
            return torch.autocast(device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def parents_pathway_parameters(self) -> list[nn.Parameter]:
        """The parameters through which the parents enter: their projections into the decoder state and the
        posterior, and the parent maps. Fine-tuning only these changes how the parents act on an image while the
        blocks that draw images stay as maximum likelihood trained them.

        Example::

            optimizer = torch.optim.AdamW(model.parents_pathway_parameters(), lr=1e-3)
        """
        modules = [self.state_parents_proj, self.posterior_parents_proj, self.parent_maps]
        return [p for module in modules if module is not None for p in module.parameters()]

    #: how :meth:`counterfactual` carries the pixel noise of the factual decode to the counterfactual one
    COUNTERFACTUAL_NOISE = ("scaled", "shifted")

    @property
    def counterfactual_noise(self) -> str:
        """How counterfactuals keep the pixel noise: ``"scaled"`` (the reference) abducts ``u = (x - loc) / scale``
        and returns ``loc* + scale* * u``; ``"shifted"`` keeps the residual ``x - loc`` in pixel units and returns
        ``x + (loc* - loc)``, so that pixels whose mean the parents do not move stay exactly as they were (with
        ``"scaled"`` a parent that changes the predicted uncertainty of a pixel rescales its residual, an edit
        spread over the whole image). Both are exact for the null intervention."""
        return self._counterfactual_noise

    @counterfactual_noise.setter
    def counterfactual_noise(self, value: str) -> None:
        if value not in self.COUNTERFACTUAL_NOISE:
            raise ValueError(f"counterfactual_noise must be one of {self.COUNTERFACTUAL_NOISE}, got {value!r}.")
        self._counterfactual_noise = value

    @property
    def num_latents(self) -> int:
        """Number of stochastic decoder blocks, i.e. the length of the latents list."""
        return sum(1 for b in self.decoder_blocks if b.stochastic)

    @property
    def latent_shapes(self) -> list[tuple[int, ...]]:
        """Shape (without batch) of each latent, in the order :meth:`abduct` returns them."""
        return [(self.z_dim,) + (b.resolution,) * self.spatial_dims for b in self.decoder_blocks if b.stochastic]

    # --------------------------------------------------------------------------------------- input checking
    def _image_shape_text(self) -> str:
        dims = ", ".join(str(s) for s in self.spatial_size)
        return f"(B, {self.in_channels}, {dims})"

    def _check_image(self, x: torch.Tensor, name: str = "x") -> None:
        expected = self._image_shape_text()
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"{name} must have {self.spatial_dims + 2} dims {expected}, got shape {tuple(x.shape)}.")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{name} must have {self.in_channels} channel(s) {expected}, got shape {tuple(x.shape)}.")
        if tuple(x.shape[2:]) != self.spatial_size:
            raise ValueError(
                f"{name} must have spatial size {self.spatial_size} {expected}, got shape {tuple(x.shape)}."
            )

    def _check_parents(self, pa: torch.Tensor | None, batch: int | None, name: str = "pa") -> torch.Tensor | None:
        if self.parents_dim == 0:
            if pa is not None and pa.numel() > 0:
                raise ValueError(f"this HVAE has parents_dim=0, but {name} of shape {tuple(pa.shape)} was given.")
            return None
        if pa is None:
            raise ValueError(f"{name} of shape (B, {self.parents_dim}) is required.")
        expected_batch = "B" if batch is None else batch
        if pa.ndim != 2 or pa.shape[1] != self.parents_dim or (batch is not None and pa.shape[0] != batch):
            raise ValueError(f"{name} must have shape ({expected_batch}, {self.parents_dim}), got {tuple(pa.shape)}.")
        return pa.to(self.likelihood_head.weight.dtype)

    # ----------------------------------------------------------------------------------------- core passes
    def _likelihood_params(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 whatever the precision: bf16 spacing near 1 (2^-7) equals the 8-bit bin width on [-1, 1]
        with autocast_off(h.device):
            out = self.likelihood_head(h.to(self.likelihood_head.weight.dtype))
        loc, logscale = out.chunk(2, dim=1)
        return loc, logscale.clamp_min(self.min_logscale)

    def _add_parent_map(self, h: torch.Tensor, pa: torch.Tensor | None, resolution: int) -> torch.Tensor:
        linear = self.parent_maps[str(resolution)] if str(resolution) in self.parent_maps else None
        if linear is None or pa is None:
            return h
        return h + linear(pa).view(h.shape)

    @staticmethod
    def _upsample(t: torch.Tensor, factor: int, bias: torch.Tensor | None) -> torch.Tensor:
        # nearest neighbour by broadcasting: its gradient is a sum over the copies instead of F.interpolate's
        # scatter, faster on a CPU (up to 2x at the top resolutions) and compilable by torch.compile's CPU code
        # generator, which fails on that scatter
        batch, channels, *spatial = t.shape
        view_shape, expanded_shape = [batch, channels], [batch, channels]
        for size in spatial:
            view_shape += [size, 1]
            expanded_shape += [size, factor]
        t = t.reshape(view_shape).expand(expanded_shape).reshape([batch, channels] + [s * factor for s in spatial])
        return t if bias is None else t + bias

    def _decoder_pass(
        self,
        pa: torch.Tensor | None,
        batch: int,
        branches: int = 1,
        features: dict[int, torch.Tensor] | None = None,
        latents: Sequence[torch.Tensor | None] | None = None,
        t: float = 1.0,
        posterior_mean: bool = False,
        want_kl: bool = False,
        want_latents: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Run the top-down path once for ``branches`` parent sets sharing one set of latents.

        The prior stream never depends on the parents, so with shared latents it is computed once; only
        the deterministic state ``h`` is carried per branch, stacked along the batch (``pa`` has
        ``branches * batch`` rows, branch-major). With encoder ``features`` the latents come from the
        posterior of branch 0 (the factual parents); otherwise from ``latents`` (``None`` entries, or no
        list, sample the prior at temperature ``t``).
        """
        blocks = self.decoder_blocks
        first = blocks[0].resolution
        start = self.bias_maps[str(first)]
        z_stream = start.expand((batch,) + start.shape[1:])
        h = start.expand((batch * branches,) + start.shape[1:])
        h = self._add_parent_map(h, pa, first)

        state_pa: list[torch.Tensor | None] = [None] * len(blocks)
        posterior_extra: dict[int, list[torch.Tensor]] = {}
        singleton = (1,) * self.spatial_dims
        if pa is not None and self.state_parents_proj is not None:
            sizes = [b.width for b in blocks]
            projected = self.state_parents_proj(pa).split(sizes, dim=1)
            state_pa = [p.reshape(p.shape + singleton) for p in projected]  # type: ignore[misc]
        if features is not None:
            pa_factual = None if pa is None else pa[:batch]
            pa_post = None if pa_factual is None else self.posterior_parents_proj(self.act(pa_factual))
            offset = 0
            for res, mids in self._posterior_mid_splits.items():
                parts = pointwise_conv(self.posterior_feature_proj[str(res)], self.act(features[res])).split(
                    mids, dim=1
                )
                parts = list(parts)
                if pa_post is not None:
                    pa_parts = pa_post[:, offset : offset + sum(mids)].split(mids, dim=1)
                    parts = [f + p.reshape(p.shape + singleton) for f, p in zip(parts, pa_parts)]
                    offset += sum(mids)
                posterior_extra[res] = parts[::-1]  # popped in block order

        kls: list[torch.Tensor] = []
        zs: list[torch.Tensor] = []
        stochastic_index = 0
        for block, state_offset in zip(blocks, state_pa):
            res = block.resolution
            if h.shape[-1] < res:
                factor = res // h.shape[-1]
                bias = self.bias_maps[str(res)] if str(res) in self.bias_maps else None
                h = self._add_parent_map(self._upsample(h, factor, bias), pa, res)
                z_stream = self._upsample(z_stream, factor, bias)
            extra = posterior_extra[res].pop() if block.stochastic and features is not None else None
            given = None if latents is None or not block.stochastic else latents[stochastic_index]
            h, z_stream, z, kl_sums = block(h, z_stream, extra, given, t, posterior_mean, want_kl, state_offset)
            if kl_sums is not None:
                kls.append(kl_sums)
            if z is not None and want_latents:
                zs.append(z)
            stochastic_index += int(block.stochastic)
        return h, kls, zs

    @staticmethod
    def _kl_per_element(kls: list[torch.Tensor], batch: int, num_elements: int, free_bits: float) -> torch.Tensor:
        """Total KL in nats per image element from per-layer ``(B, z_dim)`` KL sums over space."""
        if free_bits > 0:
            total = sum(kl.mean(dim=0).clamp_min(free_bits).sum() for kl in kls)
        else:
            total = sum(kl.sum() for kl in kls) / batch
        return total / num_elements  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------- public API
    def forward(
        self,
        x: torch.Tensor,
        pa: torch.Tensor | None = None,
        beta: float | None = None,
        free_bits: float | None = None,
        pa_cf: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """:meth:`elbo`, plus ``"x_cf"`` (:meth:`counterfactual` with sampled latents) when ``pa_cf`` is given.

        Engines call the module itself so that a ``DistributedDataParallel`` wrapper sees every pass whose
        gradients it must synchronise (counterfactual fine-tuning needs both terms in one step).
        """
        if pa_cf is None:
            return self.elbo(x, pa, beta=beta, free_bits=free_bits)
        self._check_image(x)
        with self._precision_context(x.device):
            # the ELBO and the abduction read the same encoder features: one encoder pass serves both
            features = self.encoder(x)
            terms = self._elbo(x, pa, beta, free_bits, features)
            terms["x_cf"] = self.counterfactual(x, pa, pa_cf, encoder_features=features)
        return terms

    def elbo(
        self, x: torch.Tensor, pa: torch.Tensor | None = None, beta: float | None = None, free_bits: float | None = None
    ) -> dict[str, torch.Tensor]:
        """Negative ELBO of ``x`` given its parents, in nats per image element, averaged over the batch.

        Args:
            x: images in ``[-1, 1]``, shape ``(B, in_channels, *spatial_size)``.
            pa: parents, shape ``(B, parents_dim)``.
            beta: KL weight; ``None`` uses the constructor's.
            free_bits: free bits per latent channel and layer; ``None`` uses the constructor's.

        Returns:
            ``{"nelbo": nll + beta * kl, "nll": ..., "kl": ...}``, scalar tensors (no host synchronisation).
        """
        self._check_image(x)
        with self._precision_context(x.device):
            return self._elbo(x, pa, beta, free_bits, self.encoder(x))

    def _elbo(
        self,
        x: torch.Tensor,
        pa: torch.Tensor | None,
        beta: float | None,
        free_bits: float | None,
        features: dict[int, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        batch = x.shape[0]
        pa = self._check_parents(pa, batch)
        beta = self.beta if beta is None else beta
        free_bits = self.free_bits if free_bits is None else free_bits
        h, kls, _ = self._decoder_pass(pa, batch, features=features, want_kl=True)
        loc, logscale = self._likelihood_params(h)
        nll = -discretized_gaussian_log_likelihood(x, loc, logscale, self.num_bins).mean()
        kl = self._kl_per_element(kls, batch, x[0].numel(), free_bits)
        return {"nelbo": nll + beta * kl, "nll": nll, "kl": kl}

    def abduct(
        self, x: torch.Tensor, pa: torch.Tensor | None = None, posterior_mean: bool = False
    ) -> list[torch.Tensor]:
        """Infer the exogenous latents of ``x``: one tensor ``(B, z_dim, res, ...)`` per stochastic block.

        Args:
            x: images in ``[-1, 1]``.
            pa: the images' (factual) parents.
            posterior_mean: return the posterior means instead of samples (deterministic abduction).
        """
        self._check_image(x)
        pa = self._check_parents(pa, x.shape[0])
        with self._precision_context(x.device):
            features = self.encoder(x)
            _, _, zs = self._decoder_pass(
                pa, x.shape[0], features=features, posterior_mean=posterior_mean, want_latents=True
            )
        return zs

    def decode(
        self,
        latents: Sequence[torch.Tensor | None] | None,
        pa: torch.Tensor | None = None,
        t: float = 1.0,
        batch_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode latents under parents ``pa`` into the likelihood's per-pixel ``(loc, scale)``.

        Args:
            latents: as returned by :meth:`abduct`; ``None`` entries (or ``None`` for the list) are sampled
                from the prior with its standard deviation multiplied by ``t``.
            pa: parents, shape ``(B, parents_dim)``.
            t: temperature: scales the prior's standard deviation for sampled latents and the returned
                ``scale`` (as the reference does).
            batch_size: only needed when neither ``latents`` nor ``pa`` tells the batch size.
        """
        batch = self._infer_batch(latents, pa, batch_size)
        pa = self._check_parents(pa, batch)
        self._check_latents(latents, batch)
        with self._precision_context(self.likelihood_head.weight.device):
            h, _, _ = self._decoder_pass(pa, batch, latents=latents, t=t)
            loc, logscale = self._likelihood_params(h)
        scale = torch.exp(logscale)
        return loc, (scale if t == 1.0 else scale * t)

    def sample(
        self, pa: torch.Tensor | None = None, t: float = 1.0, return_loc: bool = True, batch_size: int | None = None
    ) -> torch.Tensor:
        """Sample images from the model given parents: latents from the prior at temperature ``t``.

        Args:
            pa: parents, shape ``(B, parents_dim)``.
            t: temperature of the prior and (when ``return_loc=False``) of the pixel noise.
            return_loc: return the likelihood mean (clamped to ``[-1, 1]``) instead of a noisy sample.
            batch_size: number of samples when the model has no parents.
        """
        loc, scale = self.decode(None, pa, t=t, batch_size=batch_size)
        x = loc if return_loc else loc + scale * torch.randn_like(loc)
        return x.clamp(-1.0, 1.0)

    def counterfactual(
        self,
        x: torch.Tensor,
        pa: torch.Tensor | None,
        pa_cf: torch.Tensor | None,
        posterior_mean: bool = False,
        latents: Sequence[torch.Tensor] | None = None,
        noise_temperature: float = 1.0,
        *,
        encoder_features: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Counterfactual images ``x*`` of ``x`` under new parents ``pa_cf``.

        Abducts the latents ``z`` and the pixel noise ``u = (x - loc) / scale`` of the factual decode, then
        returns ``clamp(loc* + scale* * u, -1, 1)`` where ``(loc*, scale*)`` decode the same ``z`` under
        ``pa_cf`` (``clamp(x + loc* - loc, -1, 1)`` with :attr:`counterfactual_noise` ``"shifted"``). With
        ``pa_cf == pa`` this is ``x`` up to float error. The factual and counterfactual decodes share one pass
        (the prior stream does not depend on the parents). Gradients flow, for counterfactual fine-tuning; wrap
        in ``torch.no_grad()`` for inference.

        Args:
            x: images in ``[-1, 1]``, ``(B, C, *spatial)``.
            pa: factual parents ``(B, parents_dim)``.
            pa_cf: counterfactual parents ``(B, parents_dim)``, or ``(K, B, parents_dim)`` for ``K``
                interventions sharing one abduction (the result is then ``(K, B, C, *spatial)``).
            posterior_mean: abduct the latents by their posterior means (deterministic counterfactuals).
            latents: already abducted latents to use instead of abducting them again.
            noise_temperature: multiplies the abducted pixel noise (1 keeps the null intervention exact).
            encoder_features: ``self.encoder(x)`` computed already, e.g. for the ELBO of the same images (one
                encoder pass then serves both).
        """
        self._check_image(x)
        with self._precision_context(x.device):
            batch = x.shape[0]
            pa = self._check_parents(pa, batch)
            if self.parents_dim == 0:
                raise ValueError("counterfactuals need parents; this HVAE has parents_dim=0.")
            if pa_cf is None or pa_cf.ndim not in (2, 3) or pa_cf.shape[-2:] != (batch, self.parents_dim):
                raise ValueError(
                    f"pa_cf must have shape ({batch}, {self.parents_dim}) or (K, {batch}, {self.parents_dim}), "
                    f"got {None if pa_cf is None else tuple(pa_cf.shape)}."
                )
            stacked = pa_cf.ndim == 3
            pa_cf3 = pa_cf if stacked else pa_cf.unsqueeze(0)
            branches = pa_cf3.shape[0] + 1
            pa_all = torch.cat([pa.unsqueeze(0), pa_cf3.to(pa.dtype)], dim=0).flatten(0, 1)
            if latents is None:
                features = self.encoder(x) if encoder_features is None else encoder_features
                h, _, _ = self._decoder_pass(pa_all, batch, branches, features=features, posterior_mean=posterior_mean)
            else:
                self._check_latents(latents, batch)
                h, _, _ = self._decoder_pass(pa_all, batch, branches, latents=latents)
            loc, logscale = self._likelihood_params(h)
            loc = loc.unflatten(0, (branches, batch))
            logscale = logscale.unflatten(0, (branches, batch))
            residual = x - loc[0]
            if noise_temperature != 1.0:
                residual = residual * noise_temperature
            if self.counterfactual_noise == "shifted":
                x_cf = (loc[1:] + residual.unsqueeze(0)).clamp(-1.0, 1.0)
            else:
                noise = residual * torch.exp(-logscale[0])
                x_cf = (loc[1:] + torch.exp(logscale[1:]) * noise.unsqueeze(0)).clamp(-1.0, 1.0)
            return x_cf if stacked else x_cf[0]

    # -------------------------------------------------------------------------------------------- helpers
    def _infer_batch(
        self, latents: Sequence[torch.Tensor | None] | None, pa: torch.Tensor | None, batch_size: int | None
    ) -> int:
        if pa is not None and pa.ndim >= 1:
            return pa.shape[0]
        for z in latents or []:
            if z is not None:
                return z.shape[0]
        if batch_size is None:
            raise ValueError("cannot tell the batch size: pass pa, a latent, or batch_size.")
        return batch_size

    def _check_latents(self, latents: Sequence[torch.Tensor | None] | None, batch: int) -> None:
        if latents is None:
            return
        shapes = self.latent_shapes
        if len(latents) != len(shapes):
            raise ValueError(f"expected {len(shapes)} latents (one per stochastic block), got {len(latents)}.")
        for i, (z, shape) in enumerate(zip(latents, shapes)):
            if z is not None and tuple(z.shape) != (batch,) + shape:
                raise ValueError(f"latent {i} must have shape {(batch,) + shape}, got {tuple(z.shape)}.")
