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

from monai_cf.data import AttributeEncoder
from monai_cf.engines.cft_targets import (
    InterventionBatch,
    affected_mask,
    cft_targets,
    sample_interventions,
    transported_reading,
)
from monai_cf.graph import CausalGraph
from monai_cf.networks.nets import build_mechanisms, counterfactual_all

GRAPH = CausalGraph.from_name("mimic_cxr")
ENCODER = AttributeEncoder(GRAPH)


def _encoded(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ENCODER.encode(
        {
            "sex": torch.randint(0, 2, (n,), generator=g),
            "race": torch.randint(0, 3, (n,), generator=g),
            "age": torch.rand(n, generator=g) * 100,
            "disease": torch.randint(0, 2, (n,), generator=g),
        }
    )


def _single(name: str, encoded: dict[str, torch.Tensor], value: dict[str, torch.Tensor]) -> InterventionBatch:
    """Every sample intervenes on ``name``."""
    n = next(iter(encoded.values())).shape[0]
    attributes = GRAPH.image_parents
    chosen = torch.full((n,), attributes.index(name))
    return InterventionBatch(
        chosen=chosen,
        attributes=attributes,
        do={name: value[name]},
        do_mask={a: chosen == i for i, a in enumerate(attributes) if a == name},
    )


def test_sample_interventions_one_attribute_per_sample_values_from_the_batch():
    encoded = _encoded(64)
    draws = sample_interventions(GRAPH, encoded, torch.Generator().manual_seed(0))
    stacked = torch.stack([draws.do_mask[a] for a in draws.attributes])
    assert torch.equal(stacked.sum(0), torch.ones(64, dtype=torch.long))  # exactly one per sample
    assert set(draws.chosen.tolist()) == {0, 1, 2, 3}  # all parents get chosen in a batch of 64
    for name in draws.attributes:
        # a permutation of the batch's own values
        assert sorted(map(tuple, draws.do[name].tolist())) == sorted(map(tuple, encoded[name].tolist()))
    again = sample_interventions(GRAPH, encoded, torch.Generator().manual_seed(0))
    assert torch.equal(again.chosen, draws.chosen)


def test_sample_interventions_force_change_changes_every_discrete_value():
    encoded = _encoded(64)
    draws = sample_interventions(GRAPH, encoded, torch.Generator().manual_seed(0), force_change=True)
    assert torch.equal(draws.do["sex"], 1.0 - encoded["sex"])
    race, race_do = encoded["race"].argmax(-1), draws.do["race"]
    assert torch.equal(race_do.sum(-1), torch.ones(64))  # still one-hot
    assert not torch.any(race_do.argmax(-1) == race)
    assert set(race_do.argmax(-1).tolist()) == {0, 1, 2}
    # continuous values are still a permutation of the batch's
    assert sorted(draws.do["age"].flatten().tolist()) == sorted(encoded["age"].flatten().tolist())
    plain = sample_interventions(GRAPH, encoded, torch.Generator().manual_seed(0))
    assert torch.equal(plain.chosen, draws.chosen)  # the same attributes are chosen either way
    assert torch.any(plain.do["sex"] == encoded["sex"])  # a permutation leaves some values unchanged


def test_affected_mask_is_the_complement_of_the_soft_target_set():
    encoded = _encoded(64)
    draws = sample_interventions(GRAPH, encoded, torch.Generator().manual_seed(1))
    affected = affected_mask(GRAPH, draws)
    for i in range(64):
        name = draws.attributes[int(draws.chosen[i])]
        soft = GRAPH.soft_target_set([name])
        for parent in GRAPH.image_parents:
            assert bool(affected[parent][i]) == (parent not in soft)


def _probabilities(n: int, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sex": torch.rand(n, 1, generator=g),
        "race": torch.softmax(torch.randn(n, 3, generator=g), -1),
        "disease": torch.rand(n, 1, generator=g),
        "age": torch.rand(n, 1, generator=g) * 2 - 1,
    }


def test_soft_targets_under_do_sex_equal_the_predictor_probabilities():
    encoded = _encoded(16)
    flipped = {"sex": 1 - encoded["sex"]}
    draws = _single("sex", encoded, flipped)
    cf = counterfactual_all(build_mechanisms(GRAPH), GRAPH, encoded, draws.do, draws.do_mask)
    probs = _probabilities(16)
    targets = cft_targets(GRAPH, "soft", encoded, cf, affected_mask(GRAPH, draws), probs)
    assert torch.equal(targets["sex"], flipped["sex"])  # intervened: hard counterfactual value
    assert torch.equal(targets["race"], probs["race"])  # A*: the predictor's probability on the real image
    assert torch.equal(targets["disease"], probs["disease"])
    assert torch.equal(targets["age"], probs["age"])  # continuous in A*: the predicted mean on the real image


def _do_age_with_a_sensitive_disease(n: int = 256):
    """do(age := 0.9) on ``n`` samples, with disease mechanism weights large enough that some diagnoses flip."""
    encoded = _encoded(n)
    mechanisms = build_mechanisms(GRAPH)
    with torch.no_grad():
        for p in mechanisms["disease"].parameters():
            p.normal_(0.0, 3.0)
    draws = _single("age", encoded, {"age": torch.full((n, 1), 0.9)})
    cf = counterfactual_all(mechanisms, GRAPH, encoded, draws.do, draws.do_mask, torch.Generator().manual_seed(0))
    return encoded, draws, cf


def test_soft_targets_under_do_age_give_disease_its_hard_counterfactual():
    encoded, draws, cf = _do_age_with_a_sensitive_disease()
    assert bool((cf["disease"] != encoded["disease"]).any())  # some diagnoses flip with age
    probs = _probabilities(256)
    targets = cft_targets(GRAPH, "soft", encoded, cf, affected_mask(GRAPH, draws), probs)
    assert torch.equal(targets["disease"], cf["disease"])
    assert torch.equal(targets["age"], torch.full((256, 1), 0.9))  # intervened: the new value
    assert torch.equal(targets["sex"], probs["sex"]) and torch.equal(targets["race"], probs["race"])


def test_hard_targets_give_a_star_the_factual_labels():
    encoded = _encoded(16)
    draws = _single("disease", encoded, {"disease": 1 - encoded["disease"]})
    cf = counterfactual_all(build_mechanisms(GRAPH), GRAPH, encoded, draws.do, draws.do_mask)
    targets = cft_targets(GRAPH, "hard", encoded, cf, affected_mask(GRAPH, draws), _probabilities(16))
    assert torch.equal(targets["disease"], 1 - encoded["disease"])
    for name in ("sex", "race", "age"):
        assert torch.equal(targets[name], encoded[name])


def test_mixed_batch_targets_follow_each_samples_intervention():
    encoded = _encoded(128)
    draws = sample_interventions(GRAPH, encoded, torch.Generator().manual_seed(3))
    cf = counterfactual_all(build_mechanisms(GRAPH), GRAPH, encoded, draws.do, draws.do_mask)
    probs = _probabilities(128)
    soft = cft_targets(GRAPH, "soft", encoded, cf, affected_mask(GRAPH, draws), probs)
    for i in range(128):
        name = draws.attributes[int(draws.chosen[i])]
        a_star = GRAPH.soft_target_set([name])
        for parent in ("sex", "race", "age", "disease"):
            expected = probs[parent][i] if parent in a_star else cf[parent][i]
            assert torch.equal(soft[parent][i], expected)


def test_transported_reading_moves_the_real_reading_with_the_value():
    binary = transported_reading(
        GRAPH,
        "sex",
        torch.tensor([[0.0], [1.0], [0.0]]),
        torch.tensor([[1.0], [0.0], [0.0]]),
        torch.tensor([[0.2], [0.7], [0.3]]),
    )
    assert torch.allclose(binary, torch.tensor([[0.8], [0.3], [0.3]]))  # flipped, flipped, unchanged
    race = transported_reading(
        GRAPH, "race", torch.eye(3)[[0, 1]], torch.eye(3)[[2, 0]], torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    )
    assert torch.allclose(race, torch.tensor([[0.1, 0.3, 0.6], [0.5, 0.2, 0.3]]))  # factual and new class swap
    age = transported_reading(
        GRAPH, "age", torch.tensor([[0.1], [0.0]]), torch.tensor([[0.5], [0.9]]), torch.tensor([[0.2], [0.3]])
    )
    assert torch.allclose(age, torch.tensor([[0.6], [1.0]]))  # the predictor's error kept, clipped to the range


def test_transported_targets_for_the_intervened_attribute_and_its_descendants():
    encoded, draws, cf = _do_age_with_a_sensitive_disease()
    probs = _probabilities(256)
    targets = cft_targets(GRAPH, "soft", encoded, cf, affected_mask(GRAPH, draws), probs, intervened="transported")
    flipped = (cf["disease"] != encoded["disease"])[:, 0]
    assert flipped.any() and (~flipped).any()
    assert torch.allclose(targets["disease"][flipped], 1.0 - probs["disease"][flipped])  # the descendant flips
    assert torch.allclose(targets["disease"][~flipped], probs["disease"][~flipped])  # or keeps its reading
    assert torch.allclose(targets["age"], (probs["age"] + 0.9 - encoded["age"]).clamp(-1, 1))
    assert torch.equal(targets["sex"], probs["sex"]) and torch.equal(targets["race"], probs["race"])
    hard = cft_targets(GRAPH, "hard", encoded, cf, affected_mask(GRAPH, draws), probs, intervened="transported")
    assert torch.equal(hard["sex"], encoded["sex"]) and torch.allclose(hard["age"], targets["age"])
    with pytest.raises(ValueError, match="'race'"):
        cft_targets(GRAPH, "hard", encoded, cf, affected_mask(GRAPH, draws), {"sex": probs["sex"]}, "transported")
    with pytest.raises(ValueError, match="'sideways'"):
        cft_targets(GRAPH, "soft", encoded, cf, affected_mask(GRAPH, draws), probs, intervened="sideways")


def test_soft_mode_needs_probabilities_and_modes_are_checked():
    encoded = _encoded(4)
    draws = _single("sex", encoded, {"sex": 1 - encoded["sex"]})
    affected = affected_mask(GRAPH, draws)
    with pytest.raises(ValueError, match="'race'"):
        cft_targets(GRAPH, "soft", encoded, encoded, affected, {"sex": torch.rand(4, 1)})
    with pytest.raises(ValueError, match="'medium'"):
        cft_targets(GRAPH, "medium", encoded, encoded, affected)
