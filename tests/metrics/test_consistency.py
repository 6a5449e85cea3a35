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
"""Counterfactual-consistency bounds on small SCMs with known answers, and on the phantom."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_cf.data import SyntheticCXR
from monai_cf.graph import CausalGraph
from monai_cf.metrics import (
    AttributeLevels,
    adjusted_reading,
    conditional_tables,
    counterfactual_bounds,
    counterfactual_consistency,
    draw_intervention_values,
    frechet_bounds,
    reading_calibration_error,
    reading_context,
)

BINARY_PAIR = CausalGraph.from_dict(
    {
        "x": {"kind": "binary"},
        "y": {"kind": "binary", "parents": ["x"]},
        "z": {"kind": "binary"},
        "image": {"kind": "image", "parents": ["x", "y", "z"]},
    }
)
CHAIN = CausalGraph.from_dict(
    {
        "x": {"kind": "binary"},
        "m": {"kind": "binary", "parents": ["x"]},
        "y": {"kind": "binary", "parents": ["m"]},
        "image": {"kind": "image", "parents": ["x", "m", "y"]},
    }
)


def _bounds(graph, p_y, intervened, target, factual, intervention):
    counts = {n: 2 for n in graph.attributes}
    tables = {n: np.asarray(p_y[n]) for n in p_y}
    return counterfactual_bounds(graph, counts, tables, intervened, target, factual, intervention)


def test_frechet_bounds_values():
    # P(Y=1|x) = 0.4, P(Y=1|x') = 0.7: the joint lies in [0.1, 0.4], divided by 0.4
    assert frechet_bounds(0.4, 0.7) == pytest.approx((0.25, 1.0))
    assert frechet_bounds(0.6, 0.3) == pytest.approx((0.0, 0.5))
    assert frechet_bounds(1.0, 0.2) == pytest.approx((0.2, 0.2))  # a certain factual outcome: identified
    with pytest.raises(ValueError, match="p_factual"):
        frechet_bounds(0.0, 0.5)


@pytest.mark.parametrize("seed", range(5))
def test_lp_equals_the_frechet_bounds_of_a_binary_on_binary_query(seed):
    rng = np.random.default_rng(seed)
    p1 = rng.uniform(0.05, 0.95, size=2)  # P(y = 1 | x = 0), P(y = 1 | x = 1)
    table = np.stack([1.0 - p1, p1], axis=1)
    for x in (0, 1):
        for y in (0, 1):
            lower, upper = _bounds(BINARY_PAIR, {"y": table}, "x", "y", {"x": [x], "y": [y], "z": [0]}, [1 - x])
            # a change of y: P(Y_{x'} = 1 - y | X = x, Y = y)
            expected = frechet_bounds(table[x, y], table[1 - x, 1 - y])
            assert (lower, upper) == pytest.approx(expected, abs=1e-9)


def test_lp_of_a_mixture_against_the_closed_forms():
    graph = CausalGraph.from_dict(
        {
            "x": {"kind": "categorical", "class_names": ["a", "b", "c"]},
            "y": {"kind": "binary", "parents": ["x"]},
            "image": {"kind": "image", "parents": ["x", "y"]},
        }
    )
    counts, table = {"x": 3, "y": 2}, np.array([[0.8, 0.2], [0.5, 0.5], [0.1, 0.9]])
    weights = np.array([1.0, 2.0, 1.0, 1.0, 3.0])

    def closed_mean(factual, intervention):
        closed = [frechet_bounds(table[x, y], table[xn, 1 - y]) for x, y, xn in zip(*factual.values(), intervention)]
        return tuple(float(np.dot(weights / weights.sum(), [c[i] for c in closed])) for i in (0, 1))

    # every unit moves away from x = a: the pairs (a, b), (a, c) form a star, whose couplings are free apart
    star = {"x": [0, 0, 0, 0, 0], "y": [0, 1, 1, 0, 1]}
    bounds = counterfactual_bounds(graph, counts, {"y": table}, "x", "y", star, [1, 2, 1, 2, 2], weights=weights)
    assert bounds == pytest.approx(closed_mean(star, [1, 2, 1, 2, 2]), abs=1e-9)
    # pairs (a, b), (a, c), (b, c) form a cycle: one response-function distribution must serve them all, so the
    # program is sharper than the mean of the separate closed forms, and inside them
    cycle, moves = {"x": [0, 0, 1, 2, 2], "y": [0, 1, 1, 0, 1]}, [1, 2, 0, 0, 1]
    lower, upper = counterfactual_bounds(graph, counts, {"y": table}, "x", "y", cycle, moves, weights=weights)
    closed_lower, closed_upper = closed_mean(cycle, moves)
    assert closed_lower - 1e-9 <= lower <= upper <= closed_upper + 1e-9
    assert upper < closed_upper - 0.01


def test_non_descendants_are_points_and_the_intervened_attribute_changes_as_drawn():
    table = np.array([[0.7, 0.3], [0.2, 0.8]])
    factual = {"x": [0, 1, 1, 0], "y": [0, 1, 0, 1], "z": [1, 0, 1, 0]}
    # z does not descend from x; y does not cause x
    assert _bounds(BINARY_PAIR, {"y": table}, "x", "z", factual, [1, 0, 0, 1]) == (0.0, 0.0)
    assert _bounds(BINARY_PAIR, {"y": table}, "y", "x", factual, [1, 0, 1, 0]) == (0.0, 0.0)
    # do(x) with two of the four units drawn to their own value
    assert _bounds(BINARY_PAIR, {"y": table}, "x", "x", factual, [1, 1, 0, 0]) == (0.5, 0.5)


def test_deterministic_mechanisms_identify_the_counterfactual():
    identity = np.array([[1.0, 0.0], [0.0, 1.0]])
    factual = {"x": [0, 1], "m": [0, 1], "y": [0, 1]}
    # m = x and y = m: flipping x flips y for sure, through two mechanisms (the relaxed program is still exact)
    assert _bounds(CHAIN, {"m": identity, "y": identity}, "x", "y", factual, [1, 0]) == pytest.approx((1.0, 1.0))


def test_chain_bounds_contain_the_truth_of_independent_noise_models():
    rng = np.random.default_rng(0)
    for _ in range(5):
        pm, py = rng.uniform(0.1, 0.9, size=2), rng.uniform(0.1, 0.9, size=2)  # P(=1 | parent = 0 / 1)
        n = 20000
        x = rng.integers(0, 2, n)
        um, uy = rng.uniform(size=n), rng.uniform(size=n)
        # monotone (threshold) mechanisms with independent noise: one of the models the data allow
        m = (um < pm[x]).astype(int)
        y = (uy < py[m]).astype(int)
        m_cf = (um < pm[1 - x]).astype(int)
        y_cf = (uy < py[m_cf]).astype(int)
        levels = AttributeLevels(CHAIN, {})
        tables = conditional_tables(CHAIN, levels, {"x": x, "m": m, "y": y})
        factual = {"x": x, "m": m, "y": y}
        lower, upper = counterfactual_bounds(CHAIN, {"x": 2, "m": 2, "y": 2}, tables, "x", "y", factual, 1 - x)
        truth = float(np.mean(y_cf != y))
        assert 0.0 <= lower <= upper <= 1.0
        assert lower - 0.01 <= truth <= upper + 0.01, (lower, truth, upper)


def test_too_many_response_functions_name_the_attributes():
    graph = CausalGraph.from_dict(
        {
            "x": {"kind": "categorical", "class_names": [str(i) for i in range(8)]},
            "y": {"kind": "categorical", "class_names": [str(i) for i in range(8)], "parents": ["x"]},
            "image": {"kind": "image", "parents": ["x", "y"]},
        }
    )
    table = np.full((8, 8), 1 / 8)
    with pytest.raises(ValueError, match=r"\['y'\].*num_bins"):
        counterfactual_bounds(graph, {"x": 8, "y": 8}, {"y": table}, "x", "y", {"x": [0], "y": [0]}, [1])
    # the consistency table does not fail on it: that pair gets the trivial bounds and says why
    rng = np.random.default_rng(0)
    values = {"x": rng.integers(0, 8, 50), "y": rng.integers(0, 8, 50)}
    table = counterfactual_consistency(graph, values, values, {"x": (values["x"] + 1) % 8}, {}, {}, {}, bootstrap=0)
    row = table["summary"]["x"]["y"]
    assert (row["lower"], row["upper"]) == (0.0, 1.0) and "num_bins" in row["note"]


def test_levels_bin_continuous_attributes_and_read_heads():
    graph = CausalGraph.from_name("mimic_cxr")
    ages = np.linspace(20.0, 90.0, 300)
    levels = AttributeLevels(graph, {"age": ages}, num_bins=3)
    assert levels.count("age") == 3 and levels.count("race") == 3 and levels.count("sex") == 2
    np.testing.assert_array_equal(levels("age", [20.0, 55.0, 90.0]), [0, 1, 2])
    encoded = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])  # means at both ends of the range, any spread
    np.testing.assert_array_equal(levels.probabilities("age", encoded), [[1, 0, 0], [0, 0, 1]])
    np.testing.assert_allclose(levels.probabilities("sex", torch.tensor([[0.0]])), [[0.5, 0.5]])
    np.testing.assert_allclose(levels.probabilities("race", torch.zeros(1, 3)).sum(axis=1), [1.0])
    with pytest.raises(ValueError, match="'age'"):
        AttributeLevels(graph, {})
    with pytest.raises(ValueError, match=r"'race' has class index 3, outside 0..2"):
        levels("race", [0, 3])


def test_adjusted_reading_inverts_the_confusion():
    confusion = np.array([[0.7, 0.2, 0.1], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6]])
    truth = np.array([0.5, 0.1, 0.4])
    np.testing.assert_allclose(adjusted_reading(truth @ confusion, confusion), truth, atol=1e-4)
    np.testing.assert_allclose(adjusted_reading(np.array([1.0, 0.0]), np.eye(2)), [1.0, 0.0], atol=1e-6)


def test_a_perfect_reader_has_no_calibration_error_and_a_coin_a_large_one():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    assert reading_calibration_error(np.eye(2)[labels], labels) == pytest.approx(0.0, abs=1e-6)
    coin = np.full((400, 2), 0.5) + rng.normal(0.0, 0.01, (400, 2))
    assert reading_calibration_error(coin / coin.sum(axis=1, keepdims=True), labels) > 0.1


def test_reading_context_takes_neighbours_and_the_intervention():
    graph = CausalGraph.from_name("mimic_cxr")
    assert reading_context(graph, "disease", "disease") == ["age"]
    assert reading_context(graph, "sex", "age") == ["sex", "disease"]
    assert reading_context(graph, "sex", "race") == ["sex"]


def _phantom_units(seed, n_observed=4000, n_test=500):
    graph = CausalGraph.from_name("mimic_cxr")
    phantom = SyntheticCXR(spatial_size=32, seed=seed)
    observed = phantom.sample_batch(n_observed, render=False)
    test = phantom.sample_batch(n_test, render=False)
    rng = np.random.default_rng(seed)
    interventions, truth = {}, {}
    for k in graph.image_parents:
        pool = test["age"] if k == "age" else None
        interventions[k] = draw_intervention_values(graph, k, test[k], rng, pool, 0.1)
        cf = phantom.counterfactual_batch(test, {k: interventions[k]})
        truth[k] = {n: cf[n] for n in graph.attributes}
    return graph, observed, test, interventions, truth


def _perfect_outputs(graph, values):
    """Head outputs of a predictor that reads every attribute exactly."""
    outputs = {}
    for name in graph.attributes:
        v = torch.as_tensor(np.asarray(values[name]))
        var = graph[name]
        if var.kind == "binary":
            outputs[name] = (20.0 * v.double() - 10.0).reshape(-1, 1)
        elif var.kind == "categorical":
            outputs[name] = 20.0 * torch.nn.functional.one_hot(v.long(), var.num_classes).double()
        else:
            low, high = var.value_range
            mean = (v.double() - low) / (high - low) * 2.0 - 1.0
            outputs[name] = torch.stack([mean, torch.zeros_like(mean)], dim=1)
    return outputs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounds_contain_the_phantom_truth_and_flag_a_model_that_ignores_descendants(seed):
    graph, observed, test, interventions, truth = _phantom_units(seed)
    real = _perfect_outputs(graph, test)
    read_truth = {k: _perfect_outputs(graph, truth[k]) for k in truth}
    # "frozen": attributes follow the intervention but descendants keep their factual value (do(age) never
    # re-decides disease), images read as the truth
    frozen = {k: {n: (interventions[k] if n == k else np.asarray(test[n])) for n in graph.attributes} for k in truth}
    table = counterfactual_consistency(
        graph,
        observed,
        test,
        interventions,
        real,
        {"true": read_truth, "frozen": read_truth},
        {"true": truth, "frozen": frozen},
        truth=truth,
        truth_outputs=read_truth,
        bootstrap=10,
        seed=seed,
    )
    assert table["outside"]["truth"] == {"scm": 0, "images": 0}
    assert all(row["truth_inside"] and row["truth_images_inside"] for row in table["cells"])
    assert table["outside"]["true"] == {"images": 0, "scm": 0}
    assert table["outside"]["frozen"] == {"images": 0, "scm": 1}
    disease = table["summary"]["age"]["disease"]
    assert 0.0 < disease["lower"] < disease["truth"] < disease["upper"] < 1.0
    assert disease["frozen"]["scm"] == 0.0 and disease["frozen"]["scm_inside"] == 0.0
    assert table["summary"]["sex"]["race"]["lower"] == table["summary"]["sex"]["race"]["upper"] == 0.0
    assert table["summary"]["sex"]["sex"]["truth"] == 1.0
    # a perfect reader: the image reading is the attribute truth itself
    for k, by_a in table["summary"].items():
        for a, row in by_a.items():
            assert row["true"]["images"] == pytest.approx(row["truth"], abs=1e-3), (k, a)
            assert table["calibration_error"][k][a] == pytest.approx(0.0, abs=1e-3)
