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

from monai_cf.graph import CausalGraph
from monai_cf.metrics import continuous_amplification, effectiveness_excess, relative_error_change, truth_gain

GRAPH = CausalGraph.from_name("mimic_cxr")


def test_truth_gain_values():
    assert truth_gain(0.0, 6.0) == 1.0
    assert truth_gain(6.0, 6.0) == 0.0
    assert truth_gain(2.0, 8.0) == 0.75
    assert truth_gain(9.0, 6.0) == -0.5
    assert math.isnan(truth_gain(1.0, 0.0))  # nothing to gain when the truth is the unchanged image
    assert math.isnan(truth_gain(float("nan"), 1.0))


def test_relative_error_change():
    assert relative_error_change(9.0, 6.0) == 0.5
    assert relative_error_change(3.0, 6.0) == -0.5
    assert math.isnan(relative_error_change(1.0, 0.0))


def test_effectiveness_excess_discrete_and_continuous():
    baseline = {"sex": 0.98, "race": 0.78, "age": 6.0, "disease": 0.88}
    effectiveness = {
        "race": {"soft": {"race": 0.98, "sex": 0.9}, "none": {"race": 0.43}},
        "age": {"soft": {"age": 9.0}},
    }
    excess = effectiveness_excess(GRAPH, baseline, effectiveness)
    assert excess["race"]["soft"] == pytest.approx(0.20)
    assert excess["race"]["none"] == pytest.approx(-0.35)
    assert excess["age"]["soft"] == pytest.approx(0.5)


def test_continuous_amplification_only_counts_unintervened_continuous_attributes():
    baseline = {"sex": 0.98, "race": 0.78, "age": 6.0, "disease": 0.88}
    effectiveness = {
        "sex": {"soft": {"sex": 0.97, "age": 7.5, "race": 0.9}, "hard": {"age": 12.0}},
        "disease": {"soft": {"age": 6.0}, "hard": {"age": 9.0}},
        "age": {"soft": {"age": 20.0}, "hard": {"age": 30.0}},  # age intervened on: not amplification
    }
    summary, detail = continuous_amplification(GRAPH, baseline, effectiveness)
    assert detail["sex"]["soft"] == {"age": pytest.approx(0.25)}
    assert detail["age"] == {"soft": {}, "hard": {}}
    assert summary["soft"] == pytest.approx((0.25 + 0.0) / 2)
    assert summary["hard"] == pytest.approx((1.0 + 0.5) / 2)


def test_continuous_amplification_without_continuous_attributes_is_nan():
    graph = CausalGraph.from_dict(
        {"a": {"kind": "binary"}, "b": {"kind": "binary"}, "image": {"kind": "image", "parents": ["a", "b"]}}
    )
    summary, detail = continuous_amplification(graph, {"a": 0.9, "b": 0.8}, {"a": {"soft": {"a": 0.9, "b": 0.8}}})
    assert math.isnan(summary["soft"]) and detail == {"a": {"soft": {}}}
