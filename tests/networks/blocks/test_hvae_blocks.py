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
"""One top-down step of the HVAE decoder: where its latent comes from, and several parent sets on one prior stream."""

from __future__ import annotations

import torch

from monai_cf.networks.blocks import HVAEDecoderBlock


def _block(stochastic: bool = True, last: bool = False) -> HVAEDecoderBlock:
    torch.manual_seed(0)
    return HVAEDecoderBlock(2, width=8, out_width=6, resolution=4, z_dim=3, stochastic=stochastic, last=last).eval()


def test_posterior_mean_latent_given_back_reproduces_the_step():
    block = _block()
    h, z_stream, extra = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4), torch.randn(2, block.mid_channels, 4, 4)
    with torch.no_grad():
        h_post, next_post, z, kl = block(h, z_stream, posterior_extra=extra, posterior_mean=True)
        h_given, next_given, z_given, _ = block(h, z_stream, latent=z)
    assert z.shape == (2, 3, 4, 4) and kl is None and next_post.shape == (2, 6, 4, 4) and h_post.shape == (2, 6, 4, 4)
    assert torch.equal(z_given, z)
    # the posterior path computes only the prior's feature channels: the same numbers up to float summation order
    torch.testing.assert_close(h_given, h_post)
    torch.testing.assert_close(next_given, next_post)
    with torch.no_grad():
        _, _, z_kl, kl_sums = block(h, z_stream, posterior_extra=extra, posterior_mean=True, want_kl=True)
    assert torch.equal(z_kl, z) and kl_sums.shape == (2, 3) and (kl_sums >= 0).all()


def test_prior_draws_scale_with_temperature_and_a_deterministic_block_has_no_latent():
    block = _block()
    h, z_stream = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        p_loc = block.prior(z_stream)[:, :3]
        torch.manual_seed(1)
        _, _, z_cold, _ = block(h, z_stream, temperature=0.0)
        _, _, z_warm, _ = block(h, z_stream, temperature=1.0)
        h_det, next_det, z_det, kl = _block(stochastic=False, last=True)(h, z_stream)
    torch.testing.assert_close(z_cold, p_loc)  # temperature 0: the prior mean
    assert (z_warm - p_loc).abs().mean() > 1e-2
    assert z_det is None and kl is None and next_det is None and h_det.shape == (2, 6, 4, 4)


def test_several_parent_sets_share_one_prior_stream():
    block = _block()
    z_stream, latent = torch.randn(2, 8, 4, 4), torch.randn(2, 3, 4, 4)
    h_a, h_b = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    offsets = torch.randn(4, 8, 1, 1)
    with torch.no_grad():
        both, _, _, _ = block(torch.cat([h_a, h_b]), z_stream, latent=latent, state_parents=offsets)
        only_a, _, _, _ = block(h_a, z_stream, latent=latent, state_parents=offsets[:2])
        only_b, _, _, _ = block(h_b, z_stream, latent=latent, state_parents=offsets[2:])
    torch.testing.assert_close(both, torch.cat([only_a, only_b]))
