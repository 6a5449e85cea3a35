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
"""The engines' prepare_batch callables read CSV batches into plain tensors, canonical attributes and encodings."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader, MetaTensor

from monai_cf.data import SyntheticCXR, csv_dataset
from monai_cf.engines.prepare_batch import AttributePrepareBatch, CounterfactualPrepareBatch


@pytest.fixture(scope="module")
def phantom_batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    SyntheticCXR(spatial_size=16, seed=3).write(root, n_train=8, n_val=1, n_test=1)
    loader = DataLoader(csv_dataset(root / "train.csv", "mimic_cxr", spatial_size=16), batch_size=8)
    return next(iter(loader))


def test_counterfactual_prepare_batch_reads_csv_batches(phantom_batch):
    image, attributes, pa = CounterfactualPrepareBatch("mimic_cxr")(phantom_batch, torch.device("cpu"))
    assert type(image) is torch.Tensor and not isinstance(image, MetaTensor)
    assert image.shape == (8, 1, 16, 16) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert sorted(attributes) == ["age", "disease", "race", "sex"]
    assert attributes["sex"].dtype == torch.long and attributes["age"].dtype == torch.float32
    assert torch.equal(attributes["race"], phantom_batch["race"])
    assert torch.equal(pa, phantom_batch["pa"])
    # without "pa" in the batch the vector is computed from the attributes, identically
    no_pa = {k: v for k, v in phantom_batch.items() if k != "pa"}
    _, _, computed = CounterfactualPrepareBatch("mimic_cxr")(no_pa)
    assert torch.allclose(computed, phantom_batch["pa"])
    # a plain HVAE needs no graph: image and pa only
    image2, attributes2, pa2 = CounterfactualPrepareBatch()(phantom_batch)
    assert attributes2 == {} and torch.equal(pa2, phantom_batch["pa"]) and torch.equal(image2, image)
    with pytest.raises(ValueError, match="Image key 'img'"):
        CounterfactualPrepareBatch(image_key="img")(phantom_batch)
    with pytest.raises(ValueError, match="dictionary"):
        CounterfactualPrepareBatch()((image, pa))


def test_attribute_prepare_batch_encodes_targets(phantom_batch):
    image, targets = AttributePrepareBatch("mimic_cxr")(phantom_batch)
    assert image.shape == (8, 1, 16, 16)
    assert torch.equal(targets["sex"][:, 0], phantom_batch["sex"].float())
    assert torch.equal(targets["race"].argmax(-1), phantom_batch["race"])
    assert targets["race"].shape == (8, 3)
    # age in years over the mimic_cxr range (0, 100) -> [-1, 1]
    assert torch.allclose(targets["age"][:, 0], (phantom_batch["age"].float() / 100) * 2 - 1, atol=1e-6)
    encoded, nothing = AttributePrepareBatch("mimic_cxr", image_key=None)(phantom_batch)
    assert nothing is None and sorted(encoded) == ["age", "disease", "race", "sex"]


def test_a_list_of_numbers_and_a_metatensor_become_plain_tensors():
    batch = {"image": MetaTensor(torch.ones(2, 1, 4, 4)), "pa": [[0.5, 1.0], [1.0, 0.0]]}
    image, attributes, pa = CounterfactualPrepareBatch()(batch)
    assert type(image) is torch.Tensor and type(pa) is torch.Tensor and attributes == {}
    assert pa.dtype == torch.float32 and pa.tolist() == [[0.5, 1.0], [1.0, 0.0]]
