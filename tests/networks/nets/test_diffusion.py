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

from monai_cf.data import SyntheticCXR
from monai_cf.networks import DeepSCM
from monai_cf.networks.nets import AttributeSplitEmbedding, DiffusionGuidance, DiffusionImageMechanism

PARENTS = {"sex": 1, "race": 3, "age": 1, "disease": 1}
TINY = {"channels": (8, 16), "attention_levels": (False, True), "num_head_channels": 8, "norm_num_groups": 8}


def _mechanism(spatial_dims: int = 2, size: int = 8, seed: int = 0, **kwargs) -> DiffusionImageMechanism:
    torch.manual_seed(seed)
    model = DiffusionImageMechanism(spatial_dims, 1, size, PARENTS, embed_dim=16, **{**TINY, **kwargs})
    # MONAI zero-initialises output and attention projections, so an untrained model ignores its condition;
    # random weights there make the guidance algebra observable.
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return model.eval()


def _scm_image_model(size: int, **kwargs) -> dict:
    """A DeepSCM ``image_model`` config of a small 2D diffusion mechanism."""
    return {
        "mechanism": "diffusion",
        "spatial_dims": 2,
        "in_channels": 1,
        "spatial_size": size,
        "embed_dim": 16,
        **kwargs,
    }


def _parents(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 6, generator=g) * 2 - 1


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shapes(spatial_dims):
    model = _mechanism(spatial_dims)
    x = torch.rand(3, 1, *([8] * spatial_dims)) * 2 - 1
    pa, pa_cf = _parents(3), _parents(6, seed=1).reshape(2, 3, 6)
    terms = model(x, pa)
    assert terms["loss"].shape == () and torch.isfinite(terms["loss"])
    assert model.abduct(x, pa, num_steps=3).shape == x.shape
    assert model.counterfactual(x, pa, pa_cf[0], num_steps=3).shape == x.shape
    assert model.counterfactual(x, pa, pa_cf, num_steps=3).shape == (2, *x.shape)
    sample = model.sample(pa, num_steps=3)
    assert sample.shape == x.shape and sample.abs().max() <= 1.0


def test_loss_gradients_reach_every_attribute_embedding():
    model = _mechanism().train()
    model(torch.rand(4, 1, 8, 8), _parents(4), null_mask=torch.zeros(4, 4, dtype=torch.bool))["loss"].backward()
    for mlp in model.embedding.mlps:
        assert mlp[0].weight.grad is not None and mlp[0].weight.grad.abs().sum() > 0


def test_stacked_counterfactuals_share_one_inversion():
    model = _mechanism()
    x, pa, pa_cf = torch.rand(2, 1, 8, 8), _parents(2), _parents(4, seed=3).reshape(2, 2, 6)
    stacked = model.counterfactual(x, pa, pa_cf, num_steps=4, guidance="cfg")
    for k in range(2):
        single = model.counterfactual(x, pa, pa_cf[k], num_steps=4, guidance="cfg")
        torch.testing.assert_close(stacked[k], single, atol=1e-5, rtol=1e-4)


def test_dcfg_with_equal_weights_is_cfg():
    model = _mechanism()
    x_t, pa = torch.randn(4, 1, 8, 8), _parents(4)
    intervened = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    for w in (0.0, 1.0, 2.5):
        cfg = model.guided_noise(x_t, 500, pa, intervened, {"mode": "cfg", "weight": w})
        dcfg = model.guided_noise(
            x_t, 500, pa, intervened, {"mode": "dcfg", "intervened_weight": w, "invariant_weight": w}
        )
        torch.testing.assert_close(dcfg, cfg, atol=1e-5, rtol=1e-4)
    conditional = model.guided_noise(x_t, 500, pa, intervened, "none")
    torch.testing.assert_close(model.guided_noise(x_t, 500, pa, intervened, {"mode": "cfg"}), conditional)
    # the guidance is not vacuous: a larger weight changes the estimate
    assert (
        model.guided_noise(x_t, 500, pa, intervened, {"mode": "cfg", "weight": 3.0}) - conditional
    ).abs().max() > 1e-4


@pytest.mark.parametrize("decomposition", ["nested", "independent"])
def test_invariant_attributes_leave_the_guidance_at_neutral_weight(decomposition):
    model = _mechanism()
    x_t, pa = torch.randn(4, 1, 8, 8), _parents(4)
    intervened = torch.zeros(4, 4, dtype=torch.bool)
    intervened[:, 0] = True  # do(sex): race, age and disease are invariant
    other = pa.clone()
    other[:, 1:] = _parents(4, seed=9)[:, 1:]
    neutral = {"mode": "dcfg", "intervened_weight": 3.0, "invariant_weight": 0.0, "decomposition": decomposition}
    torch.testing.assert_close(
        model.guided_noise(x_t, 300, pa, intervened, neutral), model.guided_noise(x_t, 300, other, intervened, neutral)
    )
    active = {**neutral, "invariant_weight": 1.0}
    delta = model.guided_noise(x_t, 300, pa, intervened, active) - model.guided_noise(
        x_t, 300, other, intervened, active
    )
    assert delta.abs().max() > 1e-4
    # the intervened attribute still acts
    flipped = pa.clone()
    flipped[:, 0] = -pa[:, 0]
    delta = model.guided_noise(x_t, 300, pa, intervened, neutral) - model.guided_noise(
        x_t, 300, flipped, intervened, neutral
    )
    assert delta.abs().max() > 1e-4


def test_condition_dropout_is_per_attribute():
    model = _mechanism(condition_dropout=0.5, null_dropout=0.0)
    torch.manual_seed(0)
    mask = model.draw_null_mask(20000).float()
    rates = mask.mean(0)
    assert torch.allclose(rates, torch.full_like(rates, 0.5), atol=0.02)
    correlation = torch.corrcoef(mask.T)
    off_diagonal = correlation[~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.03  # independent draws, not one switch for all
    model = _mechanism(condition_dropout=0.0, null_dropout=0.2)
    mask = model.draw_null_mask(20000)
    assert bool((mask.all(1) | ~mask.any(1)).all())  # all-or-nothing
    assert abs(mask.all(1).float().mean().item() - 0.2) < 0.02


def test_null_tokens_replace_embeddings():
    embed = AttributeSplitEmbedding([1, 3], dim=4)
    pa = torch.randn(2, 4)
    tokens = embed(pa, torch.tensor([[True, False], [False, False]]))
    torch.testing.assert_close(tokens[0, 0], embed.null[0])
    torch.testing.assert_close(tokens[1], embed(pa)[1])


def test_views_share_weights():
    model = _mechanism()
    view = model.with_guidance({"mode": "cfg", "weight": 2.0})
    assert view.guidance.weight == 2.0 and model.guidance.mode == "none"
    assert view.unet is model.unet and view.embedding is model.embedding


def test_bad_input_is_named():
    model = _mechanism()
    x, pa = torch.rand(2, 1, 8, 8), _parents(2)
    with pytest.raises(ValueError, match="Unknown attribute 'weight'"):
        model.counterfactual(x, pa, pa, intervened=[["sex"], ["weight"]], num_steps=2)
    for bad in (-1.0, float("nan"), "3"):
        with pytest.raises(ValueError, match="intervened_weight"):
            DiffusionGuidance("dcfg", intervened_weight=bad)
    with pytest.raises(ValueError, match="Unknown guidance mode 'cfg\\+\\+'"):
        DiffusionGuidance.build("cfg++")
    with pytest.raises(ValueError, match="Unknown guidance keys \\['scale'\\]"):
        DiffusionGuidance.build({"mode": "cfg", "scale": 2})
    for steps in (-5, 0, 2.5, 5000):
        with pytest.raises(ValueError, match="DDIM steps"):
            model.abduct(x, pa, num_steps=steps)
    with pytest.raises(ValueError, match="Parents of shape"):
        model.abduct(x, pa[:, :4], num_steps=2)


def test_deepscm_passes_each_samples_intervened_group():
    torch.manual_seed(0)
    scm = DeepSCM("mimic_cxr", image_model=_scm_image_model(8, **TINY))
    assert scm.image_model.parent_names == tuple(scm.graph.image_parents)
    parents = list(scm.graph.image_parents)
    groups = scm.intervened_groups({"age": 30.0}, 3)
    assert groups[:, parents.index("age")].all() and groups[:, parents.index("disease")].all()
    assert not groups[:, parents.index("sex")].any() and not groups[:, parents.index("race")].any()
    masked = scm.intervened_groups({"sex": 1}, 3, do_mask={"sex": torch.tensor([True, False, True])})
    assert masked[:, parents.index("sex")].tolist() == [True, False, True]
    x = torch.rand(3, 1, 8, 8)
    pa = {"sex": [0, 1, 0], "race": [0, 1, 2], "age": [40.0, 50.0, 60.0], "disease": [0, 1, 0]}
    scm.image_model.num_inference_steps = 2
    x_cf, pa_cf = scm.counterfactual(x, pa, do={"sex": 1})
    assert x_cf.shape == x.shape and pa_cf["sex"].tolist() == [1, 1, 1]


def test_deepscm_rejects_a_model_of_another_graph():
    model = DiffusionImageMechanism(2, 1, 8, {"sex": 1, "ethnicity": 3, "age": 1, "disease": 1}, embed_dim=16, **TINY)
    with pytest.raises(ValueError, match="another graph"):
        DeepSCM("mimic_cxr", image_model=model)


@pytest.fixture(scope="module")
def trained_tiny():
    """A tiny mechanism fitted to 64 phantom images at 16x16 for a few hundred steps (about 20 s)."""
    phantom = SyntheticCXR(spatial_size=16, seed=0)
    data = phantom.sample_batch(64)
    scm = DeepSCM(
        "mimic_cxr",
        image_model=_scm_image_model(
            16, channels=(16, 32), attention_levels=(False, True), num_head_channels=16, norm_num_groups=8
        ),
    )
    x = torch.as_tensor(data["image"]) * 2 - 1
    pa = scm.parents_vector(scm.encode_attributes({n: data[n] for n in scm.graph.attributes}))
    model = scm.image_model
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(400):
        index = torch.randint(0, 64, (32,))
        optimizer.zero_grad()
        model(x[index], pa[index])["loss"].backward()
        optimizer.step()
    return model.eval(), x, pa


def test_inversion_then_generation_reconstructs(trained_tiny):
    model, x, pa = trained_tiny
    x, pa = x[:16], pa[:16]
    errors = {}
    for steps in (10, 50):
        recon = model.generate(model.abduct(x, pa, steps), pa, num_steps=steps)
        errors[steps] = (recon - x).abs().mean().item()
    other = (x - x.roll(1, 0)).abs().mean().item()  # L1 between two different patients
    # measured (scaled-linear schedule, epsilon): 0.068 (10 steps) and 0.013 (50 steps) on [-1, 1], 0.18 between
    # patients; a cosine schedule's alpha_bar(T) = 2e-9 made it 0.79 (the top step divides by sqrt(alpha_bar))
    assert errors[50] < 0.03 and errors[10] < 0.12
    assert errors[50] < 0.2 * other and errors[50] < errors[10]


def test_inference_in_chunks_equals_one_call():
    model = _mechanism()
    x_t, pa = torch.randn(5, 1, 8, 8), _parents(5)
    mask = torch.tensor([[True, False, False, True]] * 5)
    whole = model.predict_noise(x_t, 100, pa, mask)
    model.max_batch = 2
    torch.testing.assert_close(model.predict_noise(x_t, 100, pa, mask), whole, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.predict_noise(x_t, 100, pa), model.with_guidance(None).predict_noise(x_t, 100, pa))
    with pytest.raises(ValueError, match="max_batch"):
        _mechanism(max_batch=0)
