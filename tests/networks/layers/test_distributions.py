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

from monai_cf.networks.layers import PosteriorSampleKL, discretized_gaussian_log_likelihood, gaussian_kl


def test_discretized_likelihood_normalises():
    bins = torch.linspace(-1, 1, 256)
    for loc, logscale in [(0.0, -1.0), (0.9, -3.0), (-0.99, -6.0), (0.3, 1.0), (2.0, -2.0)]:
        logp = discretized_gaussian_log_likelihood(bins, torch.tensor(loc), torch.tensor(logscale))
        assert abs(logp.exp().sum().item() - 1.0) < 1e-4, (loc, logscale)
    # a sharp Gaussian on a bin centre puts all its mass there
    logp = discretized_gaussian_log_likelihood(bins[100], bins[100], torch.tensor(-9.0))
    assert abs(logp.item()) < 1e-5
    # far tail bins stay finite (no cancellation to log(0))
    logp = discretized_gaussian_log_likelihood(torch.tensor(0.5), torch.tensor(-0.5), torch.tensor(-2.0))
    assert torch.isfinite(logp) and logp > -60


def test_gaussian_kl_matches_torch():
    gen = torch.Generator().manual_seed(7)
    q_loc, q_ls, p_loc, p_ls = (torch.randn(50, generator=gen) for _ in range(4))
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(q_loc, q_ls.exp()), torch.distributions.Normal(p_loc, p_ls.exp())
    )
    assert torch.allclose(gaussian_kl(q_loc, q_ls, p_loc, p_ls), expected, atol=1e-5)


@pytest.mark.parametrize("sampled", [True, False])
def test_fused_posterior_sample_and_kl_match_autograd(sampled):
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    noise = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64) if sampled else None
    grad_z = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64)
    grad_kl = torch.randn(3, 4, generator=gen, dtype=torch.float64)

    z, kl_sums = PosteriorSampleKL.apply(*inputs, noise)
    fused_grads = torch.autograd.grad((z * grad_z).sum() + (kl_sums * grad_kl).sum(), inputs)

    q_loc, q_logscale = inputs[:2]
    z_ref = q_loc + torch.exp(q_logscale) * noise if sampled else q_loc
    kl_ref = gaussian_kl(*inputs).sum(dim=(2, 3))
    ref_grads = torch.autograd.grad((z_ref * grad_z).sum() + (kl_ref * grad_kl).sum(), inputs)
    assert torch.allclose(z, z_ref) and torch.allclose(kl_sums, kl_ref)
    for fused, ref in zip(fused_grads, ref_grads):
        assert torch.allclose(fused, ref)
