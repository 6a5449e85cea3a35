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

from monai_cf.networks import DeepSCM

SIZE = 16
IMAGE_MODEL = {"spatial_dims": 2, "in_channels": 1, "spatial_size": SIZE}


def _scm(seed: int = 0) -> DeepSCM:
    torch.manual_seed(seed)
    scm = DeepSCM("mimic_cxr", image_model=IMAGE_MODEL)
    # Give the disease mechanism a strong dependence on age, so do(age) flips some diagnoses.
    disease = scm.mechanisms["disease"]
    with torch.no_grad():
        for p in disease.parameters():
            p.normal_(0.0, 2.0)
    return scm.eval()


def _batch(n: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, SIZE, SIZE, generator=g)
    pa = {
        "sex": torch.randint(0, 2, (n,), generator=g),
        "race": torch.randint(0, 3, (n,), generator=g),
        "age": torch.rand(n, generator=g) * 80 + 10,
        "disease": torch.randint(0, 2, (n,), generator=g),
    }
    return x, pa


def test_do_sex_leaves_non_descendants_identical():
    scm = _scm()
    x, pa = _batch()
    with torch.no_grad():
        x_cf, pa_cf = scm.counterfactual(x, pa, do={"sex": "female"})
    assert x_cf.shape == x.shape
    assert torch.equal(pa_cf["sex"], torch.ones(32, dtype=torch.long))
    for name in ("race", "age", "disease"):
        assert torch.equal(pa_cf[name], pa[name]), name
    assert float(x_cf.min()) >= 0.0 and float(x_cf.max()) <= 1.0
    changed = pa["sex"] == 0
    diff = (x_cf - x).abs().flatten(1).amax(1)
    assert bool((diff[changed] > 1e-3).all())
    assert float(diff[~changed].max()) < 1e-4  # already female: the null intervention is the identity


def test_null_intervention_is_identity():
    scm = _scm()
    x, pa = _batch(8)
    with torch.no_grad():
        x_cf, pa_cf = scm.counterfactual(x, pa, do={})
    assert torch.allclose(x_cf, x, atol=1e-4)
    for name in pa:
        assert torch.equal(pa_cf[name], pa[name])


def test_do_age_updates_disease_through_its_mechanism_only():
    scm = _scm()
    x, pa = _batch(256)
    gen = torch.Generator().manual_seed(1)
    new_age = torch.full((256,), 95.0)
    with torch.no_grad():
        _, pa_cf = scm.counterfactual(x, pa, do={"age": new_age}, generator=gen)
        encoded = scm.encode_attributes(pa)
        noise = scm.mechanisms["disease"].abduct(
            encoded["disease"], encoded["age"], generator=torch.Generator().manual_seed(1)
        )
        expected = scm.mechanisms["disease"].predict(noise, scm.encoder.encode_attribute("age", new_age))
    assert torch.equal(pa_cf["age"], new_age)
    assert torch.equal(pa_cf["sex"], pa["sex"]) and torch.equal(pa_cf["race"], pa["race"])
    assert torch.equal(pa_cf["disease"], expected[:, 0].long())
    assert 0 < int((pa_cf["disease"] != pa["disease"]).sum()) < 256


def test_several_interventions_share_one_abduction():
    scm = _scm()
    x, pa = _batch(8)
    with torch.no_grad():
        xs, pas = scm.counterfactual(x, pa, do=[{"sex": 1}, {"race": "Black", "sex": 0}])
        x_single, _ = scm.counterfactual(x, pa, do={"race": "Black", "sex": 0})
    assert len(xs) == 2 and xs[0].shape == x.shape
    assert torch.allclose(xs[1], x_single, atol=1e-5)
    assert torch.equal(pas[1]["race"], torch.full((8,), 2)) and torch.equal(pas[1]["sex"], torch.zeros(8).long())


def test_per_sample_masks():
    scm = _scm()
    x, pa = _batch(8)
    mask = torch.tensor([True, False] * 4)
    with torch.no_grad():
        x_cf, pa_cf = scm.counterfactual(x, pa, do={"sex": 1 - pa["sex"]}, do_mask={"sex": mask})
    assert torch.equal(pa_cf["sex"][mask], 1 - pa["sex"][mask])
    assert torch.equal(pa_cf["sex"][~mask], pa["sex"][~mask])
    assert torch.allclose(x_cf[~mask], x[~mask], atol=1e-4)


def test_sample_and_elbo():
    scm = _scm()
    images, attrs = scm.sample(5, generator=torch.Generator().manual_seed(0))
    assert images.shape == (5, 1, SIZE, SIZE)
    assert set(attrs) == {"sex", "race", "age", "disease"}
    assert float(attrs["age"].min()) >= 0.0 and float(attrs["age"].max()) <= 100.0
    x, pa = _batch(4)
    losses = scm.elbo(x, pa)
    assert torch.isfinite(losses["nelbo"])
    log_probs = scm.attribute_log_prob(pa)
    assert set(log_probs) == set(pa) and all(v.shape == (4,) for v in log_probs.values())


def test_from_config_builds_the_same_model():
    config = {"graph": "mimic_cxr", "image_model": dict(IMAGE_MODEL), "image_range": [0, 1]}
    torch.manual_seed(0)
    a = DeepSCM.from_config(config)
    torch.manual_seed(0)
    b = DeepSCM.from_config(config)
    for (na, pa_), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa_, pb)
    with pytest.raises(ValueError, match="'widths_typo'"):
        DeepSCM.from_config({**config, "widths_typo": 1})


def test_errors():
    scm = _scm()
    x, pa = _batch(4)
    with pytest.raises(ValueError, match="'height'"):
        scm.counterfactual(x, pa, do={"height": 180})
    with pytest.raises(ValueError, match="'age'"):
        scm.counterfactual(x, pa, do={"age": 130})
    with pytest.raises(ValueError, match="'race'"):
        scm.counterfactual(x, pa, do={"race": "Martian"})
    with pytest.raises(ValueError, match="'age'"):
        scm.counterfactual(x, {**pa, "age": pa["age"] + 100}, do={"sex": 1})
    with pytest.raises(ValueError, match="missing"):
        scm.counterfactual(x, {"sex": pa["sex"]}, do={"sex": 1})
    with pytest.raises(ValueError, match=r"\(4, 1, 16, 16\)|16"):
        scm.counterfactual(torch.rand(4, 1, 8, 8), pa, do={"sex": 1})
    with pytest.raises(ValueError, match="channel|1"):
        scm.counterfactual(torch.rand(4, 3, SIZE, SIZE), pa, do={"sex": 1})
    with pytest.raises(ValueError, match="parents_dim"):
        from monai_cf.networks.nets import HVAE

        DeepSCM("mimic_cxr", image_model=HVAE(2, 1, SIZE, parents_dim=3))
