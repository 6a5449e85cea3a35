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
"""A user's own image network for the bundle-override tests: no monai_cf class, only the HVAE-like interface."""

from __future__ import annotations

import math

import torch
from torch import nn


class ConditionalAutoencoder(nn.Module):
    """A one-level conditional VAE: a Gaussian latent map at a quarter of the size, the parents as constant maps into
    the decoder, a learned pixel scale; counterfactuals keep the factual residual (``x + loc* - loc``)."""

    def __init__(
        self, spatial_dims: int, in_channels: int, spatial_size: int, parents_dim: int, width: int = 8, latent: int = 2
    ) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError("ConditionalAutoencoder is 2D.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.spatial_size = (spatial_size, spatial_size)
        self.parents_dim = parents_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * latent, 3, stride=2, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(latent + parents_dim, width, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(width, in_channels, 4, stride=2, padding=1),
        )
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.latent = latent

    def _posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, log_var = self.encoder(x).chunk(2, dim=1)
        return loc, log_var.clamp(-8.0, 4.0)

    def _decode(self, z: torch.Tensor, pa: torch.Tensor) -> torch.Tensor:
        maps = pa[:, :, None, None].expand(-1, -1, *z.shape[2:])
        return torch.tanh(self.decoder(torch.cat([z, maps], dim=1)))

    def forward(
        self,
        x: torch.Tensor,
        pa: torch.Tensor,
        beta: float | None = None,
        free_bits: float | None = None,
        pa_cf: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        terms = self.elbo(x, pa, beta, free_bits)
        if pa_cf is not None:
            terms["x_cf"] = self.counterfactual(x, pa, pa_cf)
        return terms

    def elbo(self, x: torch.Tensor, pa: torch.Tensor, beta: float | None = None, free_bits: float | None = None):
        loc, log_var = self._posterior(x)
        z = loc + torch.exp(0.5 * log_var) * torch.randn_like(loc)
        mean = self._decode(z, pa)
        nll = (0.5 * ((x - mean) / self.log_scale.exp()) ** 2 + self.log_scale + 0.5 * math.log(2 * math.pi)).mean()
        kl = 0.5 * (loc**2 + log_var.exp() - 1.0 - log_var).sum() / x.numel()
        return {"nelbo": nll + (1.0 if beta is None else beta) * kl, "nll": nll, "kl": kl}

    def counterfactual(
        self, x: torch.Tensor, pa: torch.Tensor, pa_cf: torch.Tensor, posterior_mean: bool = False
    ) -> torch.Tensor:
        loc, log_var = self._posterior(x)
        z = loc if posterior_mean else loc + torch.exp(0.5 * log_var) * torch.randn_like(loc)
        factual = self._decode(z, pa)
        stack = pa_cf if pa_cf.ndim == 3 else pa_cf[None]
        out = torch.stack([(x + self._decode(z, p) - factual).clamp(-1.0, 1.0) for p in stack])
        return out if pa_cf.ndim == 3 else out[0]

    def sample(self, pa: torch.Tensor, t: float = 1.0) -> torch.Tensor:
        size = [s // 4 for s in self.spatial_size]
        z = t * torch.randn(pa.shape[0], self.latent, *size, device=pa.device)
        return self._decode(z, pa)
