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
"""The counterfactual evaluator's running helpers: runner, batches, reductions, chunked prediction, collection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_cf.engines.evaluation_runner import (
    CounterfactualRunner,
    EvaluationAccumulator,
    TensorBatches,
    append_nested,
    cat_values,
    collect_dataset,
    finite_mean,
    mean_of,
    predict_in_chunks,
    to_numpy,
)
from monai_cf.graph import CausalGraph

GRAPH = CausalGraph.from_name("mimic_cxr")


def _data(n: int = 10) -> dict:
    rng = np.random.default_rng(0)
    return {
        "image": rng.uniform(size=(n, 1, 8, 8)).astype(np.float32),
        "sex": rng.integers(0, 2, n),
        "race": rng.integers(0, 3, n),
        "age": rng.uniform(20, 80, n),
        "disease": rng.integers(0, 2, n),
        "noise": {"u_sex": rng.uniform(size=n), "patient_id": np.arange(n)},
    }


def test_tensor_batches_slice_every_entry():
    data = _data(10)
    loader = TensorBatches(data, batch_size=4, image_key="image")
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [b["image"].shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b["image"] for b in batches]), torch.from_numpy(data["image"]))
    assert np.array_equal(batches[2]["_row"], [8, 9])
    assert np.array_equal(batches[1]["noise"]["u_sex"], data["noise"]["u_sex"][4:8])
    assert list(loader)[0].keys() == batches[0].keys()  # re-iterable
    with pytest.raises(ValueError, match="no 'x' entry"):
        TensorBatches(data, 4, "x")
    with pytest.raises(ValueError, match="rows"):
        TensorBatches({**data, "sex": data["sex"][:3]}, 4, "image")
    with pytest.raises(ValueError, match="noise arrays"):
        TensorBatches({**data, "noise": {"u_sex": np.zeros(3)}}, 4, "image")


def test_runner_tidies_what_the_function_returns():
    x = torch.rand(3, 1, 4, 4)
    pa = {"sex": torch.tensor([0, 1, 0]), "age": torch.tensor([30.0, 40.0, 50.0])}
    calls = []

    def fn(images, parents, do):
        calls.append(dict(do))
        return images.double().numpy() * 0.5, {"age": [1, 2, 3], "other": torch.zeros(3)}

    runner = CounterfactualRunner(fn, None)
    assert not runner.is_scm and runner.modules == []
    x_cf, pa_cf = runner(x, pa, {"sex": torch.tensor([[1], [0], [1]])})
    assert x_cf.dtype == x.dtype and torch.allclose(x_cf, x * 0.5)
    assert set(pa_cf) == {"sex", "age"}  # attributes outside pa are dropped
    assert pa_cf["sex"].tolist() == [1, 0, 1] and pa_cf["sex"].dtype == torch.long
    assert pa_cf["age"].tolist() == [1.0, 2.0, 3.0] and pa_cf["age"].dtype == torch.float32
    results = runner.many(x, pa, [{"sex": 1 - pa["sex"]}, {"age": pa["age"] + 1}])
    assert len(results) == 2 and len(calls) == 3
    with pytest.raises(ValueError, match="shape"):
        CounterfactualRunner(lambda images, parents, do: (images[:, :, :2], None), None)(x, pa, {})
    with pytest.raises(ValueError, match="callable"):
        CounterfactualRunner(3, None)


def test_reductions():
    store: dict = {}
    append_nested(store, ["a", "b"], torch.ones(2, requires_grad=True))
    append_nested(store, ["a", "b"], torch.zeros(1))
    assert not store["a"]["b"][0].requires_grad
    assert cat_values(store["a"])["b"].tolist() == [1.0, 1.0, 0.0]
    assert mean_of(store["a"]["b"]) == pytest.approx(2 / 3)
    assert math.isnan(mean_of([]))
    assert finite_mean([1.0, None, float("nan"), float("inf"), 3.0]) == 2.0
    assert math.isnan(finite_mean([float("nan")]))
    assert to_numpy(torch.arange(3)).tolist() == [0, 1, 2] and to_numpy([1, 2]).tolist() == [1, 2]
    acc = EvaluationAccumulator()
    assert acc.count == acc.feature_rows == 0 and acc.cf_outputs == {}


class _Predictor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def features(self, x):
        self.calls += 1
        return x.flatten(1)[:, :3]

    def heads_from_features(self, feat):
        return {"sex": feat.sum(1, keepdim=True)}


def test_predict_in_chunks_matches_one_pass():
    predictor = _Predictor()
    x = torch.rand(7, 1, 4, 4)
    features, outputs = predict_in_chunks(predictor, x, chunk=3)
    assert predictor.calls == 3
    assert torch.equal(features, x.flatten(1)[:, :3])
    assert torch.equal(outputs["sex"], predictor.heads_from_features(x.flatten(1)[:, :3])["sex"])


def test_collect_dataset_unwraps_meta_tensors():
    data = _data(6)
    images, attributes = collect_dataset(data, "image", GRAPH, batch_size=4)
    assert images.shape == (6, 1, 8, 8) and torch.equal(images, torch.from_numpy(data["image"]))
    assert attributes["sex"].dtype == torch.long and attributes["age"].dtype == torch.float32
    batches = [{**b, "image": MetaTensor(b["image"])} for b in TensorBatches(data, 4, "image")]
    meta_images, _ = collect_dataset(batches, "image", GRAPH, batch_size=4)
    assert type(meta_images) is torch.Tensor and torch.equal(meta_images, images)
    with pytest.raises(ValueError, match="no batch"):
        collect_dataset([], "image", GRAPH, 4)
