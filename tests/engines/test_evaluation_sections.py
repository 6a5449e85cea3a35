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
"""The counterfactual evaluator's result sections on hand-filled accumulators (the full run: test_evaluator.py)."""

from __future__ import annotations

import math

import pytest
import torch

from monai_cf.engines.evaluation_runner import EvaluationAccumulator, append_nested
from monai_cf.engines.evaluation_sections import (
    composition_results,
    embedding_results,
    example_figure_data,
    faithfulness_results,
    ground_truth_results,
    realism_results,
    reversibility_results,
)
from monai_cf.graph import CausalGraph

GRAPH = CausalGraph.from_name("mimic_cxr")


def test_distances_and_ground_truth():
    acc = EvaluationAccumulator()
    append_nested(acc.composition, ["soft", "1"], torch.tensor([1.0, 3.0]))
    append_nested(acc.reversibility, ["sex", "soft"], torch.tensor([2.0]))
    append_nested(acc.ground_truth, ["sex", "soft", "l1"], torch.tensor([1.0, 2.0]))
    append_nested(acc.ground_truth, ["sex", "none", "l1"], torch.tensor([4.0, 4.0]))
    append_nested(acc.descendants, ["sex", "soft", "disease"], torch.tensor([1.0, 0.0]))
    append_nested(acc.unchanged_l1, ["sex"], torch.tensor([3.0, 5.0]))
    assert composition_results(acc, ["soft", "none"]) == {"soft": {"1": 2.0}, "none": {}}
    assert reversibility_results(acc) == {"sex": {"soft": 2.0}}
    truth = ground_truth_results(acc)
    assert truth == {"sex": {"soft": {"l1": 1.5, "descendants": {"disease": 0.5}}, "none": {"l1": 4.0}}}
    faithfulness = faithfulness_results(acc, truth, ["soft", "none", "hard"])
    assert faithfulness["unchanged_l1"] == {"sex": 4.0}
    assert faithfulness["truth_gain"]["sex"] == {"soft": pytest.approx(1 - 1.5 / 4.0), "none": 0.0}
    assert faithfulness["truth_gain_mean"]["soft"] == pytest.approx(0.625)
    assert math.isnan(faithfulness["truth_gain_mean"]["hard"])
    assert faithfulness_results(acc, {}, ["soft"]) == {}


def test_sections_without_features_or_examples():
    acc = EvaluationAccumulator()
    assert embedding_results(GRAPH, acc, ["sex"], ["soft"], {}, num_modes=3, seed=0) == ({}, None)
    assert realism_results(acc, ["sex"], ["soft"]) == {}
    assert example_figure_data(GRAPH, {}) == {}


def test_example_captions_name_the_changed_descendants():
    factual = {"sex": torch.tensor([0]), "race": torch.tensor([1]), "age": torch.tensor([40.0])}
    factual["disease"] = torch.tensor([0])
    after = {**factual, "age": torch.tensor([70.0]), "disease": torch.tensor([1])}
    examples = {
        "images": torch.zeros(1, 1, 4, 4),
        "factual": factual,
        "counterfactuals": {"soft": {"age": torch.ones(1, 1, 4, 4)}},
        "labels": {"soft": {"age": after}},
    }
    grid = example_figure_data(GRAPH, examples)
    assert grid["panel_titles"]["soft"]["do(age)"] == ["do(age=70)\ndisease changed"]
    assert set(grid["counterfactuals"]["soft"]) == {"do(age)"} and grid["truth"] == {}
    assert grid["row_labels"][0].count("\n") == 1
