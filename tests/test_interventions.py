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

from monai_cf.graph import CausalGraph
from monai_cf.interventions import allowed_values, draw_intervention_values, draw_other_in_range, other_classes

GRAPH = CausalGraph.from_name("mimic_cxr")


def test_binary_flips_and_categorical_moves_uniformly_to_another_class():
    rng = np.random.default_rng(0)
    assert draw_intervention_values(GRAPH, "sex", [0, 1, 1, 0], rng).tolist() == [1, 0, 0, 1]
    current = np.zeros(6000, dtype=np.int64)
    drawn = draw_intervention_values(GRAPH, "race", current, rng)
    assert drawn.dtype == np.int64 and not (drawn == current).any()
    # from class 0 the other two classes are equally likely
    assert np.bincount(drawn, minlength=3)[1:] / len(drawn) == pytest.approx([0.5, 0.5], abs=0.03)
    mixed = rng.integers(0, 3, 500)
    assert not (draw_intervention_values(GRAPH, "race", mixed, rng) == mixed).any()


def test_continuous_values_come_from_the_pool_and_keep_the_gap():
    rng = np.random.default_rng(1)
    pool = rng.uniform(20, 90, 1000)
    current = rng.uniform(20, 90, 2000)
    drawn = draw_intervention_values(GRAPH, "age", current, rng, pool=pool, min_gap=0.1)
    assert drawn.dtype == np.float64
    assert (np.abs(drawn - current) > 10.0).all()  # 10% of the range [0, 100]
    assert np.isin(drawn, pool).all()
    # default pool: the current values themselves
    own = draw_intervention_values(GRAPH, "age", current, rng, min_gap=0.1)
    assert np.isin(own, current).all() and (np.abs(own - current) > 10.0).all()


def test_continuous_fallback_when_the_pool_has_nothing_far_enough():
    rng = np.random.default_rng(2)
    current = np.array([50.0, 5.0, 98.0])
    drawn = draw_intervention_values(GRAPH, "age", current, rng, pool=[50.0, 52.0], min_gap=0.2)
    assert (np.abs(drawn - current) > 20.0).all()
    assert ((drawn >= 0.0) & (drawn <= 100.0)).all()
    assert draw_intervention_values(GRAPH, "age", [40.0], rng, pool=[], min_gap=0.1)[0] != 40.0


def test_draws_are_seeded_and_the_gap_is_checked():
    first = draw_intervention_values(GRAPH, "age", np.linspace(20, 90, 50), np.random.default_rng(3))
    again = draw_intervention_values(GRAPH, "age", np.linspace(20, 90, 50), np.random.default_rng(3))
    other = draw_intervention_values(GRAPH, "age", np.linspace(20, 90, 50), np.random.default_rng(4))
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    with pytest.raises(ValueError, match="min_gap"):
        draw_intervention_values(GRAPH, "age", [50.0], np.random.default_rng(0), min_gap=0.5)
    with pytest.raises(ValueError, match="Unknown variable"):
        draw_intervention_values(GRAPH, "height", [50.0], np.random.default_rng(0))


def test_other_classes_from_numpy_and_torch_sources():
    current = np.array([0, 1, 2] * 2000)
    drawn = other_classes(current, 3, np.random.default_rng(0))
    assert drawn.dtype == np.int64 and not (drawn == current).any()
    for k in range(3):  # from each class the two others are equally likely
        others = np.bincount(drawn[current == k], minlength=3) / (current == k).sum()
        assert sorted(others)[1:] == pytest.approx([0.5, 0.5], abs=0.04)
    tensor = torch.tensor(current)
    moved = other_classes(tensor, 3, torch.Generator().manual_seed(0))
    assert moved.dtype == tensor.dtype and not torch.any(moved == tensor)
    assert torch.equal(moved, other_classes(tensor, 3, torch.Generator().manual_seed(0)))


def test_a_binary_flip_draws_nothing():
    rng = np.random.default_rng(1)
    state = rng.bit_generator.state
    code = torch.tensor([[0.0], [1.0]])
    assert torch.equal(other_classes(code, 2, binary=True), torch.tensor([[1.0], [0.0]]))
    assert other_classes(np.array([0, 1]), 2, rng, binary=True).tolist() == [1, 0]
    assert rng.bit_generator.state == state
    assert other_classes(np.array([0, 1]), 2, rng).tolist() == [1, 0]  # a two-class categorical moves too


def test_allowed_values_and_a_range_draw_other_than_the_current_value():
    race, age = GRAPH["race"], GRAPH["age"]
    assert allowed_values(race, 1) == [0, 2]
    assert allowed_values(race, 1, values=[1, 2]) == [2]
    assert allowed_values(age, 40.0) is None
    assert allowed_values(age, 40.0, values=[40.0, 60.0]) == [60.0]
    rng = np.random.RandomState(0)
    drawn = [draw_other_in_range(age, 50.0, rng) for _ in range(200)]
    assert all(0.0 <= v <= 100.0 and v != 50.0 and v == float(np.float32(v)) for v in drawn)
    assert drawn[0] == draw_other_in_range(age, 50.0, np.random.RandomState(0))  # seeded
