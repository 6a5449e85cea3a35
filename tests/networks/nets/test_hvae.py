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

import math

import pytest
import torch

from monai_cf.networks import HVAE
from monai_cf.networks.nets import (
    parse_decoder_arch,
    parse_encoder_arch,
)
from monai_cf.networks.nets.hvae import PRECISIONS, bf16_is_native
from tests.engines.helpers import TINY_HVAE as TINY_2D

TINY_3D = {
    "spatial_dims": 3,
    "in_channels": 2,
    "spatial_size": 8,
    "parents_dim": 2,
    "encoder_arch": "8b1d2,4b1d4,1b1",
    "decoder_arch": "1b1,4b1,8b1",
    "widths": (8, 16, 16),
    "z_dim": 3,
}


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def _data(config: dict, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    size = (batch, config["in_channels"]) + (config["spatial_size"],) * config["spatial_dims"]
    x = _quantise(torch.rand(size, generator=gen) * 2 - 1)
    pa = torch.randn(batch, config["parents_dim"], generator=gen)
    return x, pa


def _fp32_model_and_data(batch: int) -> tuple[HVAE, torch.Tensor, torch.Tensor]:
    """The tiny 2D model in exact float32 (seed 0) and a batch of its data."""
    torch.manual_seed(0)
    model = HVAE(**TINY_2D, precision="fp32")
    return (model, *_data(TINY_2D, batch=batch))


def _pattern_batch(n: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright discs of two radii on a dark background; the parent is the radius."""
    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    radius = torch.tensor([0.35 if i % 2 else 0.7 for i in range(n)])
    shift = torch.linspace(-0.2, 0.2, n)
    dist = ((yy[None] - shift[:, None, None]) ** 2 + xx[None] ** 2).sqrt()
    x = torch.where(dist < radius[:, None, None], 0.8, -0.8)[:, None]
    pa = torch.stack([radius * 2 - 1, shift * 5, torch.ones(n)], dim=1)
    return _quantise(x), pa


@pytest.mark.parametrize("config", [TINY_2D, TINY_3D], ids=["2d", "3d"])
def test_shapes_and_finite_elbo(config):
    torch.manual_seed(0)
    model = HVAE(**config)
    x, pa = _data(config, batch=2)
    losses = model.elbo(x, pa)
    assert set(losses) == {"nelbo", "nll", "kl"}
    for value in losses.values():
        assert value.ndim == 0 and torch.isfinite(value)
    assert losses["kl"] > 0
    # nelbo = nll + beta * kl, also with a per-call beta
    assert torch.allclose(losses["nelbo"], losses["nll"] + losses["kl"])
    beta9 = model.elbo(x, pa, beta=9.0)
    assert beta9["nelbo"] > losses["nelbo"]

    latents = model.abduct(x, pa)
    assert [tuple(z.shape[1:]) for z in latents] == model.latent_shapes
    assert len(latents) == model.num_latents == len(parse_decoder_arch(config["decoder_arch"]))
    loc, scale = model.decode(latents, pa)
    assert loc.shape == x.shape and scale.shape == x.shape
    assert (scale >= math.exp(-9.0) - 1e-12).all()
    sample = model.sample(pa, t=0.5)
    assert sample.shape == x.shape and sample.abs().max() <= 1
    x_cf = model.counterfactual(x, pa, torch.randn_like(pa))
    assert x_cf.shape == x.shape and x_cf.abs().max() <= 1
    x_cfs = model.counterfactual(x, pa, torch.randn(3, *pa.shape))
    assert x_cfs.shape == (3,) + tuple(x.shape)


@pytest.mark.parametrize("config", [TINY_2D, TINY_3D], ids=["2d", "3d"])
def test_null_intervention_is_identity(config):
    torch.manual_seed(1)
    model = HVAE(**config)
    x, pa = _data(config, batch=3, seed=1)
    # random abduction: the pixel noise absorbs whatever the latents miss
    latents = model.abduct(x, pa)
    loc, scale = model.decode(latents, pa)
    u = (x - loc) / scale
    assert (loc + scale * u - x).abs().max() < 1e-4
    assert (model.counterfactual(x, pa, pa) - x).abs().max() < 1e-4
    assert (model.counterfactual(x, pa, pa, latents=latents) - x).abs().max() < 1e-4
    # deterministic abduction is exactly reproducible
    first = model.abduct(x, pa, posterior_mean=True)
    second = model.abduct(x, pa, posterior_mean=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    cf1 = model.counterfactual(x, pa, pa.flip(0), posterior_mean=True)
    cf2 = model.counterfactual(x, pa, pa.flip(0), posterior_mean=True)
    assert torch.equal(cf1, cf2)
    # the shared factual/counterfactual pass agrees with separate decodes
    loc_f, scale_f = model.decode(first, pa)
    loc_c, scale_c = model.decode(first, pa.flip(0))
    expected = (loc_c + scale_c * (x - loc_f) / scale_f).clamp(-1, 1)
    assert torch.allclose(cf1, expected, atol=1e-4)
    # several interventions at once equal one at a time
    stacked = model.counterfactual(x, pa, torch.stack([pa, pa.flip(0)]), posterior_mean=True)
    assert (stacked[0] - x).abs().max() < 1e-4
    assert torch.allclose(stacked[1], cf1, atol=1e-5)


def test_shifted_counterfactual_noise_keeps_the_residual_in_pixel_units():
    model, x, pa = _fp32_model_and_data(batch=3)
    latents = model.abduct(x, pa, posterior_mean=True)
    loc_f, _ = model.decode(latents, pa)
    loc_c, _ = model.decode(latents, pa.flip(0))
    scaled = model.counterfactual(x, pa, pa.flip(0), latents=latents)
    model.counterfactual_noise = "shifted"
    shifted = model.counterfactual(x, pa, pa.flip(0), latents=latents)
    assert torch.allclose(shifted, (x + loc_c - loc_f).clamp(-1, 1), atol=1e-5)
    assert not torch.allclose(shifted, scaled, atol=1e-3)
    assert (model.counterfactual(x, pa, pa, latents=latents) - x).abs().max() < 1e-5
    same = HVAE(**TINY_2D, precision="fp32", counterfactual_noise="shifted")
    assert same.counterfactual_noise == "shifted"
    assert set(same.state_dict()) == set(model.state_dict())  # an inference setting: no weights of its own
    with pytest.raises(ValueError, match="counterfactual_noise"):
        model.counterfactual_noise = "additive"


def test_prior_is_exogenous_and_parents_change_decode():
    torch.manual_seed(2)
    model = HVAE(**TINY_2D)
    x, pa = _data(TINY_2D, batch=4, seed=2)
    pa_other = pa + 1.5
    # latents sampled from the prior do not depend on the parents
    torch.manual_seed(5)
    _, _, z_a = model._decoder_pass(pa, batch=4, want_latents=True)
    torch.manual_seed(5)
    _, _, z_b = model._decoder_pass(pa_other, batch=4, want_latents=True)
    assert all(torch.equal(a, b) for a, b in zip(z_a, z_b))
    # but the image does, through the deterministic path
    latents = model.abduct(x, pa, posterior_mean=True)
    loc_a, _ = model.decode(latents, pa)
    loc_b, _ = model.decode(latents, pa_other)
    assert (loc_a - loc_b).abs().mean() > 1e-3
    x_cf = model.counterfactual(x, pa, pa_other, posterior_mean=True)
    assert (x_cf - x).abs().mean() > 1e-3
    # the posterior does see the parents
    latents_other = model.abduct(x, pa_other, posterior_mean=True)
    assert (latents[0] - latents_other[0]).abs().mean() > 1e-4


def test_overfits_one_batch():
    torch.manual_seed(3)
    x, pa = _pattern_batch(8, 16)
    model = HVAE(**TINY_2D)
    # the reference's optimiser settings; clipping because the discretised likelihood gives gradient spikes
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.9))
    history = []
    for _ in range(200):
        optimizer.zero_grad()
        losses = model.elbo(x, pa)
        losses["nelbo"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 20.0)
        optimizer.step()
        history.append(losses["nelbo"].item())
    start, end = history[0], sum(history[-20:]) / 20
    assert end < start - 0.3 * abs(start), (start, end)
    # after training, the radius parent visibly changes the decoded image
    with torch.no_grad():
        latents = model.abduct(x, pa, posterior_mean=True)
        pa_swapped = pa.clone()
        pa_swapped[:, 0] = -pa[:, 0]
        x_cf = model.counterfactual(x, pa, pa_swapped, latents=latents)
        assert (model.counterfactual(x, pa, pa, latents=latents) - x).abs().max() < 1e-4
        assert (x_cf - x).abs().mean() > 0.01


def test_channels_last_matches():
    torch.manual_seed(4)
    model = HVAE(**TINY_2D)
    x, pa = _data(TINY_2D, batch=2, seed=4)
    expected = model.elbo(x, pa, beta=1.0)
    # posterior means make the comparison deterministic
    z = model.abduct(x, pa, posterior_mean=True)
    loc, _ = model.decode(z, pa)
    model = model.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    z_cl = model.abduct(x_cl, pa, posterior_mean=True)
    loc_cl, _ = model.decode(z_cl, pa)
    assert torch.allclose(loc, loc_cl, atol=1e-5)
    torch.manual_seed(0)
    assert torch.isfinite(model.elbo(x_cl, pa)["nelbo"])
    assert torch.isfinite(expected["nelbo"])


def test_free_bits():
    torch.manual_seed(6)
    model = HVAE(**TINY_2D)
    x, pa = _data(TINY_2D, batch=2, seed=6)
    torch.manual_seed(0)
    plain = model.elbo(x, pa)
    torch.manual_seed(0)
    big = model.elbo(x, pa, free_bits=1e4)
    # every channel of every layer is lifted to the free-bits floor
    channels = model.num_latents * model.z_dim
    assert torch.allclose(big["kl"], torch.tensor(1e4 * channels / x[0].numel()))
    assert torch.allclose(big["nll"], plain["nll"])


def test_presets_and_architecture_parsing():
    assert parse_encoder_arch("32b3d2,16b3d2,1b4") == [(32, 3, 2), (16, 3, 2), (1, 4, 1)]
    assert parse_decoder_arch([(1, 2), (4, 3)]) == [(1, 2), (4, 3)]
    mimic = HVAE.from_preset("mimic192")
    params = sum(p.numel() for p in mimic.parameters())
    assert abs(params - 7.98e6) / 7.98e6 < 0.2, params
    # 38 stochastic layers of 16 channels: 1,016,096 latent dimensions as in the reference
    assert mimic.num_latents == 38
    assert sum(math.prod(s) for s in mimic.latent_shapes) == 1_016_096
    mnist = HVAE.from_preset("morphomnist")
    assert abs(sum(p.numel() for p in mnist.parameters()) - 2.04e6) / 2.04e6 < 0.2
    assert sum(math.prod(s) for s in mnist.latent_shapes) == 87_104
    for name, size in [("small32", 32), ("small64", 64)]:
        model = HVAE.from_preset(name)
        assert model.spatial_size == (size, size)
        assert 2e5 < sum(p.numel() for p in model.parameters()) < 2e6
    assert HVAE.from_preset("small32", parents_dim=4).parents_dim == 4


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(2, 16, 16), r"must have 4 dims \(B, 1, 16, 16\), got shape \(2, 16, 16\)"),
        (torch.zeros(2, 3, 16, 16), r"must have 1 channel\(s\) \(B, 1, 16, 16\), got shape \(2, 3, 16, 16\)"),
        (torch.zeros(2, 1, 32, 32), r"spatial size \(16, 16\) \(B, 1, 16, 16\), got shape \(2, 1, 32, 32\)"),
    ],
)
def test_bad_image_raises(bad, match):
    model = HVAE(**TINY_2D)
    with pytest.raises(ValueError, match=match):
        model.elbo(bad, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=match):
        model.abduct(bad, torch.zeros(2, 3))


def test_bad_parents_and_config_raise():
    model = HVAE(**TINY_2D)
    x, pa = _data(TINY_2D, batch=2)
    with pytest.raises(ValueError, match=r"pa must have shape \(2, 3\), got \(2, 5\)"):
        model.elbo(x, torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"pa must have shape \(2, 3\), got \(4, 3\)"):
        model.elbo(x, torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"pa_cf must have shape"):
        model.counterfactual(x, pa, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"latent 0 must have shape"):
        model.decode([torch.zeros(2, 1, 1, 1)] + [None] * (model.num_latents - 1), pa)
    with pytest.raises(ValueError, match="spatial_size is 32"):
        HVAE(**{**TINY_2D, "spatial_size": 32})
    with pytest.raises(ValueError, match="one width per encoder stage"):
        HVAE(**{**TINY_2D, "widths": (8, 16)})
    with pytest.raises(ValueError, match="not of the form"):
        HVAE(**{**TINY_2D, "encoder_arch": "16x1"})
    with pytest.raises(ValueError, match="unknown HVAE preset"):
        HVAE.from_preset("nope")


def test_unconditional_model():
    torch.manual_seed(8)
    model = HVAE(**{**TINY_2D, "parents_dim": 0})
    x, _ = _data({**TINY_2D, "parents_dim": 0}, batch=2)
    assert torch.isfinite(model.elbo(x)["nelbo"])
    assert model.sample(batch_size=3).shape == (3, 1, 16, 16)


def test_precision_switch():
    assert HVAE(**TINY_2D).precision == "auto"
    model = HVAE(**TINY_2D, precision="fp32")
    assert model.precision == "fp32"
    model.precision = "bf16"
    assert model.precision == "bf16"
    assert HVAE.from_preset("small32", precision="bf16").precision == "bf16"
    assert set(PRECISIONS) == {"auto", "bf16", "fp32"}
    with pytest.raises(ValueError, match=r"precision must be one of .*got 'fp16'"):
        model.precision = "fp16"
    with pytest.raises(ValueError, match="precision must be one of"):
        HVAE(**TINY_2D, precision="half")
    assert isinstance(bf16_is_native("cpu"), bool)
    assert bf16_is_native("meta") is False


def test_fp32_reproduces_the_float32_numbers():
    # values of the plain float32 model before the precision switch existed (same seeds)
    model, x, pa = _fp32_model_and_data(batch=4)
    torch.manual_seed(1)
    terms = model.elbo(x, pa)
    assert terms["nelbo"].item() == pytest.approx(6.74328899, abs=1e-5)
    assert terms["nll"].item() == pytest.approx(6.13985157, abs=1e-5)
    assert terms["kl"].item() == pytest.approx(0.60343736, abs=1e-5)
    torch.manual_seed(2)
    assert model.counterfactual(x, pa, pa.flip(0)).sum().item() == pytest.approx(-2.103277, abs=1e-3)
    # an fp32 model ignores a caller's autocast
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = model.elbo(x, pa)
    assert torch.equal(again["nelbo"], terms["nelbo"])


def test_forward_shares_the_encoder_pass_without_changing_numbers():
    model, x, pa = _fp32_model_and_data(batch=4)
    torch.manual_seed(3)
    separate = model.elbo(x, pa)
    separate_cf = model.counterfactual(x, pa, pa.flip(0))
    calls = []
    handle = model.encoder.register_forward_hook(lambda *args: calls.append(1))
    torch.manual_seed(3)
    joint = model(x, pa, pa_cf=pa.flip(0))
    handle.remove()
    assert len(calls) == 1
    assert torch.equal(joint["nelbo"], separate["nelbo"])
    assert torch.equal(joint["x_cf"], separate_cf)


def test_forward_hooks_on_every_convolution_fire_without_changing_numbers():
    model, x, pa = _fp32_model_and_data(batch=4)
    torch.manual_seed(3)
    plain = model.elbo(x, pa)["nelbo"]
    convolutions = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    fired = set()
    handles = [m.register_forward_hook(lambda m, i, o, n=name: fired.add(n)) for name, m in convolutions.items()]
    torch.manual_seed(3)
    hooked = model.elbo(x, pa)["nelbo"]
    for handle in handles:
        handle.remove()
    assert fired == set(convolutions)  # feature extraction sees every layer on the CPU too
    assert hooked.item() == pytest.approx(plain.item(), abs=1e-5)


def test_bf16_elbo_close_to_fp32_and_nothing_leaks():
    model, x, pa = _fp32_model_and_data(batch=8)
    torch.manual_seed(1)
    reference = model.elbo(x, pa)
    model.precision = "bf16"
    torch.manual_seed(1)
    terms = model.elbo(x, pa)
    for key in ("nelbo", "nll", "kl"):
        assert terms[key].dtype == torch.float32
        assert abs(terms[key].item() / reference[key].item() - 1) < 0.01, key
    terms["nelbo"].backward()
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32, name
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all(), name
    with torch.no_grad():
        latents = model.abduct(x, pa, posterior_mean=True)
        loc, scale = model.decode(latents, pa)
        x_null = model.counterfactual(x, pa, pa)
        sample = model.sample(pa)
    assert all(z.dtype == torch.float32 for z in latents)
    assert loc.dtype == scale.dtype == x_null.dtype == sample.dtype == torch.float32
    # the likelihood stays float32, so the null intervention still returns the input closely
    assert (x_null - x).abs().max().item() < 1e-4
    # "auto" on a CPU: fp32 for a model this small, bf16 for a large one where the CPU computes bf16 natively
    model.precision = "auto"
    assert model.macs_per_image < HVAE.AUTO_BF16_MIN_MACS
    torch.manual_seed(1)
    assert torch.equal(model.elbo(x, pa)["nelbo"], reference["nelbo"])
    model.AUTO_BF16_MIN_MACS = model.macs_per_image
    torch.manual_seed(1)
    auto = model.elbo(x, pa)["nelbo"]
    expected = terms["nelbo"] if bf16_is_native("cpu") else reference["nelbo"]
    assert torch.equal(auto, expected)


def test_macs_per_image_counts_every_convolution():
    from torch.utils.flop_counter import FlopCounterMode

    model = HVAE(**TINY_2D).requires_grad_(False)
    x = torch.zeros((2, TINY_2D["in_channels"]) + (TINY_2D["spatial_size"],) * 2)
    pa = torch.zeros(2, TINY_2D["parents_dim"])
    with FlopCounterMode(display=False) as counter:
        model.elbo(x, pa)
    parents_macs = sum(m.weight.numel() for m in (model.posterior_parents_proj, model.state_parents_proj))
    assert model.macs_per_image + parents_macs == counter.get_total_flops() // 2 // 2
    assert HVAE.from_preset("mimic192").macs_per_image >= HVAE.AUTO_BF16_MIN_MACS
    assert HVAE.from_preset("morphomnist").macs_per_image < HVAE.AUTO_BF16_MIN_MACS


def test_prior_statistics_are_skipped_without_changing_the_decoder():
    model, x, pa = _fp32_model_and_data(batch=3)
    block = model.decoder_blocks[-1]
    inputs = torch.randn(3, block.width, block.resolution, block.resolution)
    skip = 2 * model.z_dim
    assert torch.allclose(block.prior(inputs, out_slice=slice(skip, None)), block.prior(inputs)[:, skip:])
    with pytest.raises(ValueError, match="out_slice"):
        block.conv(inputs, out_slice=slice(0, 2))
    # the posterior-only pass (abduction, counterfactuals) equals the ELBO pass that also needs the prior's stats
    features = model.encoder(x)
    torch.manual_seed(5)
    h_elbo, _, z_elbo = model._decoder_pass(pa, 3, features=features, want_kl=True, want_latents=True)
    torch.manual_seed(5)
    h_abduct, kls, z_abduct = model._decoder_pass(pa, 3, features=features, want_latents=True)
    assert kls == []
    assert torch.allclose(h_elbo, h_abduct, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(z_elbo, z_abduct))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_upsample_is_nearest_neighbour_interpolation(spatial_dims):
    t = torch.randn((2, 3) + (2,) * spatial_dims, requires_grad=True)
    bias = torch.randn((1, 3) + (6,) * spatial_dims)
    ours = HVAE._upsample(t, 3, bias)
    assert torch.equal(ours, torch.nn.functional.interpolate(t, scale_factor=3, mode="nearest") + bias)
    (grad,) = torch.autograd.grad(ours.sum(), t)
    assert torch.equal(grad, torch.full_like(t, 3.0**spatial_dims))


def test_parent_maps_start_at_zero_and_stay_out_of_the_prior():
    torch.manual_seed(4)
    model = HVAE(**TINY_2D, parent_maps_max_res=8, precision="fp32")
    assert set(model.parent_maps) == {"1", "4", "8"}  # the decoder resolutions up to 8
    x, pa = _data(TINY_2D, batch=4, seed=4)
    latents = model.abduct(x, pa, posterior_mean=True)
    with torch.no_grad():
        before, _ = model.decode(latents, pa)
        saved = {k: m.weight.clone() for k, m in model.parent_maps.items()}
        for linear in model.parent_maps.values():
            linear.weight.normal_(0.0, 0.5)
        shifted, _ = model.decode(latents, pa)
        for k, w in saved.items():
            model.parent_maps[k].weight.copy_(w)
        again, _ = model.decode(latents, pa)
    torch.testing.assert_close(again, before)  # zero maps: the model without them
    assert (shifted - before).abs().mean() > 1e-3  # non-zero maps move the decode
    # the prior stream never sees them: prior latents are the same under any parents
    with torch.no_grad():
        for linear in model.parent_maps.values():
            linear.weight.normal_(0.0, 0.5)
    torch.manual_seed(5)
    _, _, z_a = model._decoder_pass(pa, batch=4, want_latents=True)
    torch.manual_seed(5)
    _, _, z_b = model._decoder_pass(pa + 2.0, batch=4, want_latents=True)
    assert all(torch.equal(a, b) for a, b in zip(z_a, z_b))
    # and the null intervention is still the identity
    torch.testing.assert_close(model.counterfactual(x, pa, pa, posterior_mean=True), x, atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        HVAE(**{**TINY_2D, "parents_dim": 0}, parent_maps_max_res=8).counterfactual(x, None, pa)


def test_without_state_parents_the_parent_maps_are_the_only_decoder_pathway():
    torch.manual_seed(6)
    model = HVAE(**TINY_2D, parent_maps_max_res=8, state_parents=False, precision="fp32")
    assert model.state_parents_proj is None and model.posterior_parents_proj is not None
    assert model.state_parents_proj not in model.parents_pathway_parameters()
    x, pa = _data(TINY_2D, batch=4, seed=6)
    latents = model.abduct(x, pa, posterior_mean=True)
    with torch.no_grad():
        zero_maps, _ = model.decode(latents, pa)
        other_parents, _ = model.decode(latents, pa + 1.0)
        torch.testing.assert_close(other_parents, zero_maps)  # zero maps and no state pathway: parents unseen
        for linear in model.parent_maps.values():
            linear.weight.normal_(0.0, 0.5)
        moved, _ = model.decode(latents, pa + 1.0)
        same, _ = model.decode(latents, pa)
    assert (moved - same).abs().mean() > 1e-3
    torch.testing.assert_close(model.counterfactual(x, pa, pa, posterior_mean=True), x, atol=1e-5, rtol=0)
    model.elbo(x, pa)["nelbo"].backward()  # trains
    with pytest.raises(ValueError, match="state_parents=False needs parent maps"):
        HVAE(**TINY_2D, state_parents=False)
