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

from monai_cf.graph import DEFAULT_GRAPHS, CausalGraph, mimic_cxr_graph


@pytest.fixture
def graph() -> CausalGraph:
    return CausalGraph.from_name("mimic_cxr")


def test_default_graph_structure(graph):
    assert graph.image_key == "image"
    assert graph.image_parents == ("sex", "race", "age", "disease")
    assert graph.parents("disease") == ("age",)
    assert graph.parents("image") == ("sex", "race", "age", "disease")
    assert graph["race"].class_names == ("White", "Asian", "Black")
    assert graph["age"].value_range == (0.0, 100.0)
    assert graph.parents_dim == 1 + 3 + 1 + 1
    assert mimic_cxr_graph().to_dict() == graph.to_dict()


def test_topological_order_puts_parents_first(graph):
    order = graph.topological_order()
    assert sorted(order) == ["age", "disease", "race", "sex"]
    assert order.index("age") < order.index("disease")
    chain = CausalGraph.from_dict(
        {
            "c": {"kind": "binary", "parents": ["b"]},
            "b": {"kind": "binary", "parents": ["a"]},
            "a": {"kind": "continuous", "range": [0, 1]},
        }
    )
    assert chain.topological_order() == ["a", "b", "c"]
    assert chain.image_parents == ("c", "b", "a")


def test_descendants(graph):
    assert graph.descendants("age") == {"disease"}
    assert graph.descendants(["sex"]) == set()
    assert graph.descendants(["age", "disease"]) == set()
    chain = CausalGraph.from_dict(
        {
            "a": {"kind": "binary"},
            "b": {"kind": "binary", "parents": ["a"]},
            "c": {"kind": "binary", "parents": ["b"]},
            "d": {"kind": "binary"},
        }
    )
    assert chain.descendants("a") == {"b", "c"}
    assert chain.descendants("d") == set()


@pytest.mark.parametrize(
    "intervened, expected",
    [
        (["sex"], {"race", "age", "disease"}),
        (["age"], {"sex", "race"}),
        (["race"], {"sex", "age", "disease"}),
        (["disease"], {"sex", "race", "age"}),
        (["sex", "race"], {"age", "disease"}),
        ([], {"sex", "race", "age", "disease"}),
    ],
)
def test_soft_target_set(graph, intervened, expected):
    assert graph.soft_target_set(intervened) == expected


def test_soft_target_set_only_holds_image_parents():
    graph = CausalGraph.from_dict(
        {
            "a": {"kind": "binary"},
            "hidden": {"kind": "binary"},
            "b": {"kind": "binary", "parents": ["a", "hidden"]},
            "img": {"kind": "image", "parents": ["a", "b"]},
        }
    )
    assert graph.image_key == "img"
    assert graph.soft_target_set("hidden") == {"a"}


def test_round_trip_through_dict(graph):
    again = CausalGraph.from_dict(graph.to_dict())
    assert again.to_dict() == graph.to_dict()
    assert CausalGraph.build("mimic_cxr").to_dict() == graph.to_dict()
    assert CausalGraph.build(graph) is graph
    assert CausalGraph.build(DEFAULT_GRAPHS["mimic_cxr"]).to_dict() == graph.to_dict()


def test_categorical_from_num_classes():
    graph = CausalGraph.from_dict({"grade": {"kind": "categorical", "num_classes": 4}})
    assert graph["grade"].class_names == ("0", "1", "2", "3")
    assert graph["grade"].dim == 4
    assert graph.image_parents == ("grade",)


@pytest.mark.parametrize(
    "spec, culprit",
    [
        ({"a": {"kind": "binary", "parents": ["b"]}, "b": {"kind": "binary", "parents": ["a"]}}, "'a'"),
        ({"a": {"kind": "binary", "parents": ["a"]}}, "'a'"),
        ({"a": {"kind": "binary", "parents": ["ghost"]}}, "'ghost'"),
        ({"a": {"kind": "ordinal"}}, "'ordinal'"),
        ({"a": {"kind": "binary"}, "image": {"kind": "image", "parents": ["ghost"]}}, "'ghost'"),
        ({"a": {"kind": "categorical"}}, "'a'"),
        ({"a": {"kind": "categorical", "class_names": ["x"]}}, "'a'"),
        ({"a": {"kind": "binary", "class_names": ["x", "y", "z"]}}, "'a'"),
        ({"a": {"kind": "continuous"}}, "'a'"),
        ({"a": {"kind": "continuous", "range": [5, 1]}}, "'a'"),
        ({"a": {"kind": "continuous", "range": "wide"}}, "'a'"),
    ],
)
def test_invalid_graphs_name_the_culprit(spec, culprit):
    with pytest.raises(ValueError, match=culprit):
        CausalGraph.from_dict(spec)


def test_cycle_message_shows_the_path():
    spec = {
        "a": {"kind": "binary", "parents": ["c"]},
        "b": {"kind": "binary", "parents": ["a"]},
        "c": {"kind": "binary", "parents": ["b"]},
    }
    with pytest.raises(ValueError, match="cycle") as err:
        CausalGraph.from_dict(spec)
    assert "->" in str(err.value)


def test_unknown_variable_in_queries(graph):
    with pytest.raises(ValueError, match="'height'"):
        graph.descendants(["height"])
    with pytest.raises(ValueError, match="'height'"):
        graph.soft_target_set("height")
    with pytest.raises(ValueError, match="'height'"):
        graph.check_intervention({"sex": 1, "height": 180})
    with pytest.raises(ValueError, match="mapping"):
        graph.check_intervention(["sex"])
    with pytest.raises(ValueError, match="'mnist'"):
        CausalGraph.from_name("mnist")
