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

import numpy as np
import pytest
import torch

from monai_cf.graph import CausalGraph
from monai_cf.metrics import (
    amplification,
    attribute_performance,
    auc_standard_error,
    label_log_odds,
    logit_shift,
    roc_auc,
)

GRAPH = CausalGraph.from_name("mimic_cxr")


def test_roc_auc_perfect_inverted_random_and_by_hand():
    labels = torch.tensor([0, 0, 1, 1])
    assert roc_auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert roc_auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    # one of the four positive/negative pairs is ordered wrongly: 3/4
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), labels) == pytest.approx(0.75)
    # logits give the same AUC as probabilities; (N, 1) and (N, 2) layouts are accepted
    logits = torch.tensor([-2.0, 0.5, 0.3, 2.0])
    assert roc_auc(logits[:, None], labels) == pytest.approx(0.75)
    assert roc_auc(torch.stack([1 - torch.sigmoid(logits), torch.sigmoid(logits)], 1), labels) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    random_labels = rng.integers(0, 2, 4000)
    assert roc_auc(rng.random(4000), random_labels) == pytest.approx(0.5, abs=0.03)
    assert math.isnan(roc_auc(torch.tensor([0.2, 0.3]), torch.tensor([1, 1])))


def test_roc_auc_categorical_is_one_vs_rest_macro():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    perfect = torch.nn.functional.one_hot(labels, 3).float() * 0.8 + 0.1
    assert roc_auc(perfect, labels, 3) == 1.0
    scores = torch.tensor(
        [[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6], [0.3, 0.4, 0.3], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]
    )
    # one-vs-rest pair counts by hand (a tie counts 1/2):
    auc0 = (4 + 3) / 8  # positives .6, .3 vs negatives .5, .2, .1, .1: .6 beats all four, .3 beats three
    auc1 = (4 + 3.5) / 8  # positives .4, .8 vs negatives .3, .2, .4, .1: .8 beats all, .4 beats three and ties one
    auc2 = 1.0  # positives .6, .8 vs negatives .1, .1, .3, .1
    assert roc_auc(scores, labels, 3) == pytest.approx((auc0 + auc1 + auc2) / 3)
    # a class missing from the labels is left out of the average
    two = torch.tensor([0, 1, 0, 1])
    assert roc_auc(perfect[[0, 1, 3, 4]], two, 3) == 1.0
    with pytest.raises(ValueError, match="class scores"):
        roc_auc(torch.rand(4, 2), two, 3)


def test_auc_standard_error_matches_hanley_mcneil():
    # A = 0.9, 50 + 50 cases: Q1 = 0.9 / 1.1, Q2 = 1.62 / 1.9
    q1, q2 = 0.9 / 1.1, 1.62 / 1.9
    expected = math.sqrt((0.9 * 0.1 + 49 * (q1 - 0.81) + 49 * (q2 - 0.81)) / 2500)
    assert auc_standard_error(0.9, 50, 50) == pytest.approx(expected)
    assert expected == pytest.approx(0.0321, abs=1e-4)
    assert auc_standard_error(0.9, 500, 500) < auc_standard_error(0.9, 50, 50)
    assert math.isnan(auc_standard_error(0.9, 0, 10))


def _outputs(n: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "sex": torch.tensor([[-3.0], [-1.0], [2.0], [0.5], [4.0], [-0.5]]),
        "race": torch.randn(n, 3, generator=gen),
        "age": torch.tensor([[0.0, -1.0], [0.2, -1.0], [-0.4, -1.0], [1.0, 0.0], [-1.0, 0.0], [0.5, 0.0]]),
        "disease": torch.tensor([[1.0], [-1.0], [1.0], [-1.0], [1.0], [-1.0]]),
    }


def test_attribute_performance_auc_and_mae_in_original_units():
    labels = {
        "sex": torch.tensor([0, 0, 1, 1, 1, 0]),
        "race": torch.tensor([0, 1, 2, 0, 1, 2]),
        "age": torch.tensor([50.0, 60.0, 30.0, 100.0, 0.0, 75.0]),
        "disease": torch.tensor([1, 0, 0, 1, 1, 0]),
    }
    result = attribute_performance(GRAPH, _outputs(), labels)
    assert result["sex"] == 1.0
    # age means in [-1, 1] over the range [0, 100]: 50, 60, 30, 100, 0, 75 -> exact
    assert result["age"] == pytest.approx(0.0, abs=1e-5)
    shifted = dict(labels, age=labels["age"] + 5.0)
    assert attribute_performance(GRAPH, _outputs(), shifted)["age"] == pytest.approx(5.0)
    # disease: positives score {1, -1, 1}, negatives {-1, 1, -1}
    pos, neg = [1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]
    by_hand = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / 9
    assert result["disease"] == pytest.approx(by_hand)
    assert set(attribute_performance(GRAPH, _outputs(), labels, ["sex"])) == {"sex"}


def test_label_log_odds_binary_and_categorical():
    out = torch.tensor([[2.0], [-1.0]])
    assert torch.allclose(label_log_odds(GRAPH, "sex", out, torch.tensor([1, 1])), torch.tensor([2.0, -1.0]).double())
    assert torch.allclose(label_log_odds(GRAPH, "sex", out, torch.tensor([0, 0])), torch.tensor([-2.0, 1.0]).double())
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    value = label_log_odds(GRAPH, "race", logits, torch.tensor([0]))
    assert float(value) == pytest.approx(math.log(0.7 / 0.3))
    with pytest.raises(ValueError, match="continuous"):
        label_log_odds(GRAPH, "age", torch.zeros(1, 2), torch.tensor([50.0]))


def test_amplification_uses_the_soft_target_set():
    baseline = {"sex": 0.95, "race": 0.90, "age": 5.0, "disease": 0.80}
    effectiveness = {
        # do(sex): A* = {race, disease} (age is not an image-parent descendant of sex) -> +0.04, +0.10
        "sex": {"hard": {"sex": 0.99, "race": 0.94, "age": 9.0, "disease": 0.90}, "none": dict(baseline, sex=0.2)},
        # do(age): disease descends from age and is not compared; A* = {sex, race} -> 0, -0.02
        "age": {"hard": {"sex": 0.95, "race": 0.88, "age": 7.0, "disease": 0.99}, "none": dict(baseline)},
    }
    summary, detail = amplification(GRAPH, baseline, effectiveness)
    assert detail["sex"]["hard"] == pytest.approx({"race": 0.04, "disease": 0.10})
    assert detail["age"]["hard"] == pytest.approx({"sex": 0.0, "race": -0.02})
    assert summary["hard"] == pytest.approx((0.04 + 0.10 + 0.0 - 0.02) / 4)
    assert summary["none"] == 0.0
    # an undefined AUC is left out of the mean
    effectiveness["sex"]["hard"]["race"] = float("nan")
    summary, _ = amplification(GRAPH, baseline, effectiveness)
    assert summary["hard"] == pytest.approx((0.10 + 0.0 - 0.02) / 3)


def test_logit_shift_abs_and_signed():
    labels = {"sex": torch.tensor([1, 1, 0]), "race": torch.tensor([0, 1, 2]), "disease": torch.tensor([1, 0, 1])}
    real = {"sex": torch.zeros(3, 1), "race": torch.zeros(3, 3), "disease": torch.tensor([[-1.0], [-2.0], [0.5]])}
    # every disease logit moves +1: label log-odds -1 -> 0, +2 -> +1, 0.5 -> 1.5, so |z| changes by -1, -1, +1
    # (the first sample was wrong: moving towards its label made it less extreme) and z by +1, -1, +1
    cf = {"sex": torch.zeros(3, 1), "race": torch.zeros(3, 3), "disease": real["disease"] + 1.0}
    shift = logit_shift(GRAPH, "sex", real, cf, labels)
    assert set(shift) == {"race", "disease"}
    assert shift["disease"] == pytest.approx(-1.0 / 3)
    assert shift["race"] == 0.0
    signed = logit_shift(GRAPH, "sex", real, cf, labels, signed=True)
    assert signed["disease"] == pytest.approx((1.0 - 1.0 + 1.0) / 3)
    # do(age): disease descends from age, so only sex and race are compared
    assert set(logit_shift(GRAPH, "age", real, cf, labels)) == {"sex", "race"}
