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

from monai_cf.data import AttributeEncoder


@pytest.fixture
def encoder() -> AttributeEncoder:
    return AttributeEncoder("mimic_cxr", value_maps={"sex": {"M": "male", "F": "female"}})


@pytest.mark.parametrize(
    "name, raw, expected",
    [
        ("sex", "female", 1),
        ("sex", "Male", 0),
        ("sex", "F", 1),
        ("sex", 1, 1),
        ("sex", "0", 0),
        ("sex", 1.0, 1),
        ("race", "Black", 2),
        ("race", "asian", 1),
        ("race", np.int64(2), 2),
        ("age", "63.5", 63.5),
        ("age", 0, 0.0),
        ("disease", "pleural_effusion", 1),
    ],
)
def test_canonical_parses_names_indices_and_numbers(encoder, name, raw, expected):
    assert encoder.canonical(name, raw) == expected


@pytest.mark.parametrize(
    "name, raw, words",
    [
        ("race", "Martian", ["'race'", "Martian", "White"]),
        ("race", 3, ["'race'", "3"]),
        ("race", 1.5, ["'race'", "1.5"]),
        ("age", 120, ["'age'", "120", "range"]),
        ("age", "old", ["'age'", "old"]),
        ("age", float("nan"), ["'age'", "missing"]),
        ("sex", "", ["'sex'", "missing"]),
        ("sex", None, ["'sex'", "missing"]),
    ],
)
def test_canonical_rejects_bad_values(encoder, name, raw, words):
    with pytest.raises(ValueError) as err:
        encoder.canonical(name, raw)
    for word in words:
        assert word in str(err.value)


def test_encode_values(encoder):
    enc = encoder.encode({"sex": [1, 0], "race": [2, 0], "age": [50.0, 75.0], "disease": [0, 1]})
    assert torch.equal(enc["sex"], torch.tensor([[1.0], [0.0]]))
    assert torch.equal(enc["race"], torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(enc["age"], torch.tensor([[0.0], [0.5]]))
    pa = encoder.parents_vector(enc)
    assert pa.shape == (2, encoder.parents_dim) == (2, 6)
    assert torch.equal(pa[1], torch.tensor([0.0, 1.0, 0.0, 0.0, 0.5, 1.0]))


def test_decode_inverts_encode(encoder):
    rng = np.random.default_rng(0)
    values = {
        "sex": rng.integers(0, 2, 64),
        "race": rng.integers(0, 3, 64),
        "age": rng.uniform(0, 100, 64),
        "disease": rng.integers(0, 2, 64),
    }
    decoded = encoder.decode(encoder.encode(values))
    for name in ("sex", "race", "disease"):
        assert decoded[name].tolist() == values[name].tolist()
    np.testing.assert_allclose(decoded["age"].numpy(), values["age"], atol=1e-4)
    split = encoder.split(encoder.parents_vector(encoder.encode(values)), encoder.graph.image_parents)
    assert torch.equal(split["race"], encoder.encode_attribute("race", values["race"]))


def test_decode_of_probabilities(encoder):
    assert encoder.decode_attribute("sex", torch.tensor([[0.2], [0.7]])).tolist() == [0, 1]
    assert encoder.decode_attribute("race", torch.tensor([[0.1, 0.3, 0.6]])).tolist() == [2]
    assert encoder.to_original("race", 2) == "Black"
    assert math.isclose(encoder.to_original("age", 42), 42.0)


def test_encoding_errors(encoder):
    with pytest.raises(ValueError, match="'race'"):
        encoder.encode_attribute("race", [3])
    with pytest.raises(ValueError, match="missing"):
        encoder.encode({"sex": [1]}, names=["sex", "age"])
    with pytest.raises(ValueError, match="width"):
        encoder.split(torch.zeros(1, 5), encoder.graph.image_parents)
    with pytest.raises(ValueError, match="'height'"):
        AttributeEncoder("mimic_cxr", value_maps={"height": {}})
