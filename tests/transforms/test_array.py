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

import numpy as np
import pytest
import torch

from monai_cf.transforms import BatchCounterfactual, InterventionSampler, affected_attributes, canonical_intervention
from tests.transforms import ATTRIBUTES, make_scm


@pytest.fixture(scope="module")
def scm():
    return make_scm()


def _batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 16, 16, generator=g)
    attributes = {
        "sex": torch.randint(0, 2, (n,), generator=g),
        "race": torch.randint(0, 3, (n,), generator=g),
        "age": torch.rand(n, generator=g) * 80 + 10,
        "disease": torch.randint(0, 2, (n,), generator=g),
    }
    return images, attributes


def test_each_sample_matches_deep_scm_with_its_own_seed(scm):
    images, attributes = _batch(8)
    interventions = [{"age": 95.0}, None, {"sex": "female"}, {"age": 5.0}, {"race": 2, "age": 50.0}, None, {}, {}]
    seeds = [11, None, 12, 13, 14, None, None, None]
    result = BatchCounterfactual(scm)(images, attributes, interventions, seeds)
    assert result.images.shape == images.shape
    for i, do in enumerate(interventions):
        if not do:
            assert torch.equal(result.images[i], images[i])
            assert all(result.attributes[n][i] == attributes[n][i] for n in ATTRIBUTES)
            assert not any(bool(result.affected[n][i]) for n in ATTRIBUTES)
            continue
        one = {n: v[i : i + 1] for n, v in attributes.items()}
        with torch.no_grad():
            x_ref, pa_ref = scm.counterfactual(
                images[i : i + 1], one, do, generator=torch.Generator().manual_seed(seeds[i])
            )
        assert torch.allclose(result.images[i], x_ref[0], atol=1e-5)
        for name in ATTRIBUTES:
            assert torch.equal(result.attributes[name][i : i + 1], pa_ref[name].to(result.attributes[name])), name
        assert {n for n in ATTRIBUTES if result.affected[n][i]} == affected_attributes(scm.graph, do)
    assert result.seeds[1] is None and result.seeds[0] == 11


def test_a_sample_does_not_depend_on_its_batch(scm):
    images, attributes = _batch(6)
    interventions = [{"age": 90.0}] * 6
    run = BatchCounterfactual(scm)
    whole = run(images, attributes, interventions)  # content-derived seeds
    for i in range(6):
        one = run(images[i : i + 1], {n: v[i : i + 1] for n, v in attributes.items()}, interventions[i : i + 1])
        assert torch.allclose(one.images[0], whole.images[i], atol=1e-5)
        assert all(one.attributes[n][0] == whole.attributes[n][i] for n in ATTRIBUTES)


def test_posterior_sampling_is_seeded_and_leaves_the_global_rng_alone(scm):
    images, attributes = _batch(4)
    run = BatchCounterfactual(scm, posterior_mean=False)
    state = torch.get_rng_state()
    first = run(images, attributes, [{"sex": 1}] * 4, seeds=[1, 2, 3, 4])
    assert torch.equal(torch.get_rng_state(), state)
    second = run(images, attributes, [{"sex": 1}] * 4, seeds=[1, 2, 3, 4])
    other = run(images, attributes, [{"sex": 1}] * 4, seeds=[5, 6, 7, 8])
    assert torch.equal(first.images, second.images)
    assert not torch.equal(first.images, other.images)


def test_dtype_device_and_numpy_inputs_are_preserved(scm):
    images, attributes = _batch(3)
    result = BatchCounterfactual(scm)(images.double(), attributes, [{"sex": 1}, None, {"age": 30.0}])
    assert result.images.dtype == torch.float64
    assert torch.equal(result.images[1], images.double()[1])
    numpy_result = BatchCounterfactual(scm)(images.numpy(), attributes, [{"sex": 1}, None, {"age": 30.0}])
    assert isinstance(numpy_result.images, np.ndarray) and numpy_result.images.dtype == np.float32


def test_sampler_draws_other_values_from_self_r(scm):
    sampler = InterventionSampler(scm, ["sex", "race", "age"], values={"race": ["White", "Black"]})
    current = {"sex": 0, "race": 0, "age": 60.0, "disease": 1}
    draws = [sampler.draw(current, np.random.RandomState(seed)) for seed in range(200)]
    assert draws == [sampler.draw(current, np.random.RandomState(seed)) for seed in range(200)]
    for do, seed in draws:
        ((name, value),) = do.items()
        assert value != current[name] and isinstance(seed, int)
        if name == "race":
            assert value == 2
        if name == "age":
            assert 0.0 <= value <= 100.0 and value == float(np.float32(value))
    assert {next(iter(do)) for do, _ in draws} == {"sex", "race", "age"}
    only_white = InterventionSampler(scm, ["race"], values={"race": ["White"]})
    assert only_white.draw(current, np.random.RandomState(0)) == (None, None)


def test_mechanism_sampling_follows_the_mechanism(scm):
    sampler = InterventionSampler(scm, ["disease"], sampling="mechanism")
    assert sampler.draw({"sex": 0, "race": 0, "age": 60.0, "disease": 1}, np.random.RandomState(0))[0] == {"disease": 0}
    ages = [
        InterventionSampler(scm, ["age"], sampling="mechanism").draw(
            {"sex": 0, "race": 0, "age": 60.0, "disease": 1}, np.random.RandomState(s)
        )[0]["age"]
        for s in range(50)
    ]
    # the untrained age flow is N(0, 1/3^2) in [-1, 1] units: ages centred on 50 with sd ~ 16.7 years
    assert 40 < np.mean(ages) < 60 and 10 < np.std(ages) < 25


def test_canonical_intervention_validates(scm):
    assert canonical_intervention(scm, {"sex": "female", "race": "Black", "age": 40}) == {
        "sex": 1,
        "race": 2,
        "age": 40.0,
    }
    with pytest.raises(ValueError, match="weight"):
        canonical_intervention(scm, {"weight": 80})
    with pytest.raises(ValueError, match="one value"):
        canonical_intervention(scm, {"age": [40, 50]})
