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

from monai_cf.data import SyntheticCXR, csv_dataset
from monai_cf.engines import (
    attribute_auc,
    create_data_loader,
    create_predictor_trainer,
)
from monai_cf.graph import CausalGraph
from monai_cf.networks import AttributePredictor

ATTRIBUTES = ("sex", "race", "age", "disease")


def test_attribute_auc_values():
    assert attribute_auc("binary", [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    scores = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    # classes 0 and 1 (class 2 has a perfect score); one-vs-rest per class, macro average
    assert attribute_auc("categorical", [0, 1, 2, 0], scores) == pytest.approx(np.mean([1.0, 1.0, 1.0]))
    assert math.isnan(attribute_auc("binary", [1, 1], [0.2, 0.9]))


def test_predictor_trainer_learns_sex_on_the_phantom(tmp_path):
    SyntheticCXR(spatial_size=32, seed=1).write(tmp_path / "data", n_train=400, n_val=200, n_test=1)
    train_ds = csv_dataset(tmp_path / "data" / "train.csv", "mimic_cxr", spatial_size=32, cache=True)
    val_ds = csv_dataset(tmp_path / "data" / "val.csv", "mimic_cxr", spatial_size=32, cache=True)
    train = create_data_loader(train_ds, batch_size=32, seed=0)
    val = create_data_loader(val_ds, batch_size=100, shuffle=False)
    torch.manual_seed(0)
    predictor = AttributePredictor(2, 1, "mimic_cxr", channels=(8, 16, 32))
    trainer = create_predictor_trainer(predictor, train, val, tmp_path / "guidance", max_epochs=4, lr=3e-3, stats=False)
    trainer.run()
    metrics = trainer.evaluator.state.metrics
    assert set(metrics) == {
        "val_auc_sex",
        "val_auc_race",
        "val_mae_age",
        "val_auc_disease",
        "val_mean_auc",
        "val_mean_mae",
    }
    assert metrics["val_auc_sex"] > 0.8, metrics
    assert metrics["val_mean_auc"] == pytest.approx(
        np.mean([metrics["val_auc_sex"], metrics["val_auc_race"], metrics["val_auc_disease"]])
    )
    assert 1.0 < metrics["val_mae_age"] < 60.0  # in years (an encoded-unit MAE would be below 2)
    assert trainer.evaluator.state.best_metric >= metrics["val_mean_auc"]
    best = torch.load(tmp_path / "guidance" / "best.pt", weights_only=True)
    assert set(best["network"]) == set(predictor.state_dict())
    assert isinstance(trainer.state.output[0]["loss"], float)


def test_validation_metrics_stay_defined_when_a_split_has_one_class():
    from monai_cf.engines.predictor_trainer import AttributeMetrics

    graph = CausalGraph.from_dict(
        {
            "sex": {"kind": "binary"},
            "grade": {"kind": "categorical", "class_names": ["low", "mid", "high"]},
            "image": {"kind": "image", "parents": ["sex", "grade"]},
        }
    )
    outputs = {
        "sex": torch.tensor([[2.0], [-1.0], [3.0], [1.0]]),
        "grade": torch.tensor([[3.0, 0, 0]] * 3 + [[0, 3.0, 0]]),
    }
    metric = AttributeMetrics(graph)
    # two attributes, one class each: neither AUC is defined
    metric.update((outputs, {"sex": torch.ones(4), "grade": torch.zeros(4, dtype=torch.long)}))
    with pytest.warns(UserWarning, match="no AUC is defined"):
        results = metric.compute()
    assert math.isnan(results["val_auc_sex"]) and math.isnan(results["val_auc_grade"])
    # accuracy: sex 3 of 4 (logit > 0), grade 3 of 4
    assert results["val_mean_auc"] == pytest.approx(0.75)
    metric.reset()
    metric.update((outputs, {"sex": torch.tensor([1.0, 0.0, 1.0, 1.0]), "grade": torch.zeros(4, dtype=torch.long)}))
    results = metric.compute()
    assert results["val_mean_auc"] == results["val_auc_sex"] == 1.0  # the defined AUC alone
