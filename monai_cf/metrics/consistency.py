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
"""Counterfactual consistency: the bounds that the graph and the observational data put on counterfactual queries.

Image counterfactuals are not identifiable from images and labels (Pan & Bareinboim, 2024), but the
counterfactual distribution of the *attributes* is bounded by the causal graph and the observational
distribution. A model's counterfactuals are *consistent* when the attribute distribution read from them lies
inside those bounds. The query here is the probability that an attribute's (discretised) value changes under
the evaluator's interventions,

    ``q(X, A | x, a) = P(L(A_{do(X = x')}) != a | L(X) = x, L(A) = a)``,

averaged over the intervention values ``x'`` that were drawn, where ``L`` maps an attribute to its level (the class
of a discrete attribute, a quantile bin of a continuous one). Its bounds:

- ``A`` not a descendant of ``X``: the point 0 (its mechanism never sees the intervention; a change is
  amplification or leakage);
- ``A = X``: the point ``P(L(x') != x)``, known from the drawn values;
- ``A`` a descendant: an interval, from a linear program over the *response functions* of the mechanisms on the
  paths from ``X`` to ``A`` (:func:`counterfactual_bounds`, solved with ``scipy.optimize.linprog``). The graph is
  taken as Markovian (independent exogenous noise per attribute), so the factual record constrains each
  mechanism separately. With one mechanism on the path the program is sharp; for a single unit, or units whose
  parent changes form a star, it equals the (mean of the) Fréchet bounds of :func:`frechet_bounds`, and where one
  response-function distribution must serve changes that form a cycle it is tighter. With several mechanisms on
  the path it relaxes their independence and stays valid, possibly wider.

Reading the query from images: the evaluation predictor's level probabilities on the counterfactuals are
corrected for its confusion on real images (:func:`adjusted_reading`, adjusted classify-and-count solved with
``scipy.optimize.nnls``), since even a perfect counterfactual is read with the predictor's real-image errors.
The correction's own error on real images, whose query is known (no change), is the reading's calibration
error (:func:`reading_calibration_error`), part of the tolerance of the check (:func:`counterfactual_consistency`).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import linprog, nnls

from monai_cf.graph import AttributeKind, CausalGraph

__all__ = [
    "AttributeLevels",
    "frechet_bounds",
    "conditional_tables",
    "counterfactual_bounds",
    "adjusted_reading",
    "reading_context",
    "reading_calibration_error",
    "counterfactual_consistency",
]

logger = logging.getLogger("monai_cf.metrics")

_MIN_CONFUSION_ROWS = 10  # real images a confusion row needs before it is conditioned on the intervened level


class AttributeLevels:
    """Discrete levels of every attribute: class indices of discrete ones, quantile bins of continuous ones.

    Args:
        graph: the causal graph.
        observational: canonical values ``{name: (N,)}`` the continuous bins are fitted on (their quantiles).
        num_bins: bins per continuous attribute.

    Example::

        levels = AttributeLevels("mimic_cxr", {"age": ages}, num_bins=3)
        levels("age", [30.0, 62.0, 90.0])  # array([0, 1, 2])
        levels.count("race")                # 3
    """

    def __init__(self, graph: CausalGraph | Mapping | str, observational: Mapping[str, Any], num_bins: int = 3) -> None:
        self.graph = CausalGraph.build(graph)
        if int(num_bins) < 2:
            raise ValueError(f"num_bins must be at least 2, got {num_bins}.")
        self.num_bins = int(num_bins)
        self.edges: dict[str, np.ndarray] = {}
        for name in self.graph.attributes:
            if self.graph[name].is_discrete:
                continue
            if name not in observational:
                raise ValueError(f"No observational values of continuous attribute '{name}' to fit its bins on.")
            values = _as_array(observational[name]).astype(np.float64)
            values = values[np.isfinite(values)]
            if values.size == 0:
                raise ValueError(f"Attribute '{name}' has no finite observational value to fit its bins on.")
            inner = np.quantile(values, np.linspace(0.0, 1.0, self.num_bins + 1)[1:-1])
            self.edges[name] = np.unique(inner)

    def count(self, name: str) -> int:
        """Number of levels of an attribute."""
        var = self.graph[name]
        return var.num_classes if var.is_discrete else len(self.edges[name]) + 1

    def __call__(self, name: str, values: Any) -> np.ndarray:
        """Canonical values ``(N,)`` -> level indices ``(N,)``."""
        values = _as_array(values)
        if self.graph[name].is_discrete:
            levels = values.astype(np.int64)
            outside = levels[(levels < 0) | (levels >= self.count(name))]
            if outside.size:
                raise ValueError(
                    f"Attribute '{name}' has class index {int(outside[0])}, outside 0..{self.count(name) - 1} "
                    f"({list(self.graph[name].class_names)})."
                )
            return levels
        return np.searchsorted(self.edges[name], values.astype(np.float64), side="right").astype(np.int64)

    def probabilities(self, name: str, output: torch.Tensor) -> np.ndarray:
        """Predictor head outputs -> ``(N, levels)`` probabilities of each level.

        Binary heads give a logit, categorical ones logits, continuous ones ``(mean, ...)`` in the encoded ``[-1, 1]``
        units: the level of the predicted mean, as a one-hot row. (A Gaussian head's spread is trained for the
        likelihood, not calibrated per bin: the evaluation predictor of the main job spreads 84 years. The
        confusion correction of :func:`adjusted_reading` then accounts for the mean's errors.)
        """
        var = self.graph[name]
        out = torch.as_tensor(output).detach().cpu().double()
        out = out.reshape(out.shape[0], -1)
        if var.kind == AttributeKind.BINARY:
            p = torch.sigmoid(out[:, 0]).numpy()
            return np.stack([1.0 - p, p], axis=1)
        if var.kind == AttributeKind.CATEGORICAL:
            return torch.softmax(out, dim=1).numpy()
        low, high = var.value_range  # type: ignore[misc]
        mean = ((out[:, 0] + 1.0) / 2.0 * (high - low) + low).numpy()
        return np.eye(self.count(name))[self(name, mean)]


def frechet_bounds(p_factual: float, p_counterfactual: float) -> tuple[float, float]:
    """Bounds on ``P(Y_{x'} = y' | X = x, Y = y)`` for an exogenous ``X`` (no confounding of ``X`` and ``Y``).

    Without confounding ``P(Y_x = y) = P(Y = y | x)``, and the joint of the two potential outcomes can be any
    coupling of its marginals: ``max(0, p + p' - 1) <= P(Y_x = y, Y_{x'} = y') <= min(p, p')`` (Fréchet), divided by
    ``p = P(Y = y | x)``.

    Args:
        p_factual: ``P(Y = y | X = x)``, the factual outcome's probability (positive).
        p_counterfactual: ``P(Y = y' | X = x')``.

    Example::

        frechet_bounds(0.4, 0.7)  # (0.25, 1.0): P(Y_{x'} = 1 | X = x, Y = 1) with P(Y=1|x) = 0.4, P(Y=1|x') = 0.7
    """
    p, q = float(p_factual), float(p_counterfactual)
    if not (0.0 < p <= 1.0 and 0.0 <= q <= 1.0):
        raise ValueError(f"frechet_bounds needs 0 < p_factual <= 1 and 0 <= p_counterfactual <= 1, got {p}, {q}.")
    return max(0.0, p + q - 1.0) / p, min(p, q) / p


def conditional_tables(
    graph: CausalGraph | Mapping | str,
    levels: AttributeLevels,
    observational: Mapping[str, Any],
    names: Sequence[str] | None = None,
    smoothing: float = 0.5,
) -> dict[str, np.ndarray]:
    """Observational ``P(L(V) | L(pa_V))`` of each attribute as an array ``(configs, levels of V)``.

    Parent configurations are numbered by ``numpy.ravel_multi_index`` over the parents' levels, in the order of
    ``graph.parents(V)``. Counts get ``smoothing`` pseudo-counts per cell, so a configuration never seen has
    uniform probabilities (and then wide bounds).

    Example::

        tables = conditional_tables("mimic_cxr", levels, train_attributes, ["disease"])
        tables["disease"].shape  # (3, 2): three age bins, two classes
    """
    graph = CausalGraph.build(graph)
    tables = {}
    for name in graph.attributes if names is None else names:
        for n in (name, *graph.parents(name)):
            if n not in observational:
                raise ValueError(f"The observational data lack attribute '{n}' (needed for P({name} | parents)).")
        parents = graph.parents(name)
        shape = [levels.count(p) for p in parents]
        config = _config_index(
            [levels(p, observational[p]) for p in parents], shape, len(_as_array(observational[name]))
        )
        value = levels(name, observational[name])
        counts = np.full((int(np.prod(shape)) if shape else 1, levels.count(name)), float(smoothing))
        np.add.at(counts, (config, value), 1.0)
        tables[name] = counts / counts.sum(axis=1, keepdims=True)
    return tables


def counterfactual_bounds(
    graph: CausalGraph | Mapping | str,
    level_counts: Mapping[str, int],
    tables: Mapping[str, np.ndarray],
    intervened: str,
    target: str,
    factual: Mapping[str, Any],
    intervention: Any,
    weights: Any = None,
    max_columns: int = 200_000,
) -> tuple[float, float]:
    """Bounds on the mean over units ``i`` of ``P(L(A_{do(X = x_i')}) != a_i | record i)``, by linear programming.

    The unknown is the joint distribution ``q`` of the response functions of the mechanisms that can change
    (descendants of ``X`` that are ancestors of ``A`` or ``A`` itself): maps from a mechanism's parent levels to its
    levels. ``q`` must reproduce every observational table ``P(V | pa_V)``, and the probability of each factual
    record under the Markovian model. Each unit's query is the share of response functions consistent with its
    record whose counterfactual changes ``A``, over the record's probability, which is linear in ``q``.

    Args:
        graph: the causal graph.
        level_counts: ``{attribute: number of levels}`` (:meth:`AttributeLevels.count`).
        tables: observational tables ``{V: (configs, levels)}`` of every mechanism that can change
            (:func:`conditional_tables`).
        intervened: ``X``.
        target: ``A``.
        factual: factual levels ``{attribute: (N,)}`` of the units (every attribute on the paths and their parents).
        intervention: the units' intervention levels ``x'_i`` ``(N,)``.
        weights: per-unit weights (default: equal).
        max_columns: the largest joint response-function space solved; beyond it ``ValueError``.

    Returns:
        ``(lower, upper)``.

    Example::

        lower, upper = counterfactual_bounds(graph, counts, tables, "age", "disease", factual_levels, age_levels)
    """
    graph = CausalGraph.build(graph)
    x_new = _as_array(intervention).astype(np.int64).reshape(-1)
    n = x_new.size
    w = np.ones(n) if weights is None else _as_array(weights).astype(np.float64).reshape(-1)
    if w.size != n or n == 0 or w.sum() <= 0:
        raise ValueError(f"counterfactual_bounds needs positive weights for {n} units, got {w.size} weights.")
    fact = {k: _as_array(v).astype(np.int64).reshape(-1) for k, v in factual.items()}
    if intervened == target:
        value = float(np.sum(w * (x_new != fact[target])) / w.sum())
        return value, value
    if target not in graph.descendants([intervened]):
        return 0.0, 0.0
    upstream = _ancestors(graph, target) | {target}
    changing = [v for v in graph.topological_order() if v in upstream and v in graph.descendants([intervened])]
    spaces = []
    for v in changing:
        configs = int(np.prod([level_counts[p] for p in graph.parents(v)] or [1]))
        if tables[v].shape != (configs, level_counts[v]):
            raise ValueError(f"tables['{v}'] has shape {tables[v].shape}, expected ({configs}, {level_counts[v]}).")
        spaces.append((v, configs, level_counts[v]))
    columns = math.prod(levels**configs for _, configs, levels in spaces)
    if columns > max_columns:
        raise ValueError(
            f"The response functions of {changing} span {columns} joint columns (> max_columns={max_columns}); "
            "bin continuous attributes more coarsely (num_bins) to bound do("
            f"{intervened}) -> {target}."
        )
    response = {}  # response[v]: (columns, configs) level of v under each parent configuration
    index = np.unravel_index(np.arange(columns), [levels**configs for _, configs, levels in spaces])
    for (v, configs, levels), idx in zip(spaces, index):
        table = np.array(list(itertools.product(range(levels), repeat=configs)), dtype=np.int64)
        response[v] = table[idx]

    needed = set(changing) | {p for v in changing for p in graph.parents(v)} | {target}
    keys = sorted(needed - {intervened})
    records = np.stack([fact[k] for k in keys] + [fact[intervened], x_new], axis=1)
    unique, inverse = np.unique(records, axis=0, return_inverse=True)
    unit_weight = np.bincount(inverse.reshape(-1), weights=w, minlength=len(unique))

    objective = np.zeros(columns)
    consistency_rows, consistency_values = [], []
    for row, weight in zip(unique, unit_weight):
        values = {k: int(v) for k, v in zip(keys, row[: len(keys)])}
        values[intervened] = int(row[len(keys)])
        consistent = np.ones(columns, dtype=bool)
        probability = 1.0
        for v in changing:
            config = _record_config(graph, level_counts, v, values)
            consistent &= response[v][:, config] == values[v]
            probability *= tables[v][config, values[v]]
        if probability <= 0.0:
            continue
        world: dict[str, Any] = dict(values)
        world[intervened] = int(row[len(keys) + 1])
        for v in changing:
            world[v] = response[v][np.arange(columns), _record_config(graph, level_counts, v, world)]
        objective += weight / probability * (consistent & (world[target] != values[target]))
        if len(changing) > 1:
            consistency_rows.append(consistent.astype(np.float64))
            consistency_values.append(probability)

    rows, values_eq = [np.ones(columns)], [1.0]
    for v, configs, levels in spaces:
        for config in range(configs):
            for level in range(levels - 1):
                rows.append((response[v][:, config] == level).astype(np.float64))
                values_eq.append(float(tables[v][config, level]))
    rows += consistency_rows
    values_eq += consistency_values
    a_eq, b_eq = np.stack(rows), np.asarray(values_eq)
    total = float(w.sum())
    bounds = []
    for sign in (1.0, -1.0):
        solution = linprog(sign * objective, A_eq=a_eq, b_eq=b_eq, bounds=(0.0, None), method="highs")
        if not solution.success:
            raise ValueError(f"The bounds of do({intervened}) -> {target} found no solution: {solution.message}")
        bounds.append(sign * solution.fun / total)
    lower, upper = (float(np.clip(b, 0.0, 1.0)) for b in bounds)
    return lower, max(lower, upper)


def adjusted_reading(mean_probabilities: Any, confusion: Any) -> np.ndarray:
    """The level distribution behind a group's mean predicted probabilities, corrected for the predictor's confusion.

    With ``confusion[c]`` the mean predicted probabilities of real images of level ``c``, a group whose true
    level distribution is ``pi`` is read on average as ``pi @ confusion``; ``pi`` is recovered by non-negative least
    squares on the simplex (adjusted classify-and-count).

    Args:
        mean_probabilities: ``(L,)`` mean predicted level probabilities of the group.
        confusion: ``(L, L)`` rows: true level, columns: predicted level.

    Example::

        confusion = np.array([[0.8, 0.2], [0.3, 0.7]])
        adjusted_reading(np.array([0.8, 0.2]) * 0.5 + np.array([0.3, 0.7]) * 0.5, confusion)  # [0.5, 0.5]
    """
    r = _as_array(mean_probabilities).astype(np.float64).reshape(-1)
    m = _as_array(confusion).astype(np.float64)
    if m.shape != (r.size, r.size):
        raise ValueError(f"adjusted_reading needs a ({r.size}, {r.size}) confusion, got {m.shape}.")
    penalty = 1e3  # makes the sum-to-one row all but exact
    a = np.vstack([m.T, penalty * np.ones((1, r.size))])
    b = np.concatenate([r, [penalty]])
    pi, _ = nnls(a, b)
    total = pi.sum()
    return pi / total if total > 0 else np.full(r.size, 1.0 / r.size)


def _confusion(probabilities: np.ndarray, levels_a: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.full((count, count), 1.0 / count)
    sizes = np.zeros(count, dtype=np.int64)
    for c in range(count):
        chosen = levels_a == c
        sizes[c] = int(chosen.sum())
        if sizes[c]:
            rows[c] = probabilities[chosen].mean(axis=0)
    return rows, sizes


class _Reader:
    """Adjusted readings of one attribute, with confusion rows conditioned on a context of other attributes' levels.

    A predictor may read an attribute partly through attributes correlated with it in real images (disease through
    age); counterfactuals break such correlations, so the confusion is taken among real images of the same context.
    """

    def __init__(self, probabilities: np.ndarray, levels_a: np.ndarray, context: np.ndarray | None, count: int) -> None:
        self.count = count
        self.overall, _ = _confusion(probabilities, levels_a, count)
        self.by_context: dict[tuple, np.ndarray] = {}
        if context is not None and context.shape[1]:
            keys = _keys(context)
            for key in set(keys):
                chosen = np.asarray([k == key for k in keys])
                rows, sizes = _confusion(probabilities[chosen], levels_a[chosen], count)
                thin = sizes < _MIN_CONFUSION_ROWS
                rows[thin] = self.overall[thin]
                self.by_context[key] = rows

    def change(self, probabilities: np.ndarray, factual_a: np.ndarray, context: np.ndarray | None) -> float:
        """Mean adjusted probability that the level differs from ``factual_a``, over groups of equal (a, context)."""
        keys = _keys(context) if context is not None and context.shape[1] else [()] * factual_a.size
        groups: dict[tuple, list[int]] = {}
        for i, (a, key) in enumerate(zip(factual_a.tolist(), keys)):
            groups.setdefault((a, key), []).append(i)
        total = 0.0
        for (a, key), rows in groups.items():
            pi = adjusted_reading(probabilities[rows].mean(axis=0), self.by_context.get(key, self.overall))
            total += len(rows) * (1.0 - pi[a])
        return total / factual_a.size if factual_a.size else float("nan")


def _keys(context: np.ndarray) -> list[tuple]:
    return [tuple(row) for row in np.asarray(context, dtype=np.int64).tolist()]


def reading_context(graph: CausalGraph, intervened: str, attribute: str) -> list[str]:
    """The attributes whose levels condition the confusion when ``attribute`` is read on counterfactuals of
    ``do(intervened)``: the intervened attribute and the causal neighbours (parents, children) of the read one.

    On a counterfactual the context takes the intervention's value, the counterfactual's own value for
    descendants of the intervention (the model's, or the truth's) and the factual value for the rest.

    Example::

        reading_context(CausalGraph.from_name("mimic_cxr"), "disease", "disease")  # ['age']
    """
    graph = CausalGraph.build(graph)
    near = {intervened, *graph.parents(attribute), *graph.children(attribute)} - {attribute}
    return [n for n in graph.attributes if n in near]


def reading_calibration_error(
    probabilities: Any, levels_a: Any, context: Any = None, count: int | None = None, subset: Any = None
) -> float:
    """Error of the adjusted change reading on real images, whose true change is 0, by split halves.

    The confusion is estimated on one half of the real images (even rows) and the change of the other half is
    read with it, in groups of equal level and context as counterfactuals are read; the error is ``|reading - 0|``
    over the read half, averaged over both directions. With ``subset`` only those rows of the read half are read
    (the real images of one cell of factual levels), so the error has the noise of a group of that size.

    Args:
        probabilities: ``(N, L)`` predicted level probabilities of real images.
        levels_a: ``(N,)`` their levels of the read attribute.
        context: ``(N, k)`` their levels of the context attributes (:func:`reading_context`; ``None``: none).
        count: ``L`` (default: ``probabilities.shape[1]``).
        subset: ``(N,)`` boolean mask of the rows to read (default: all).

    Example::

        reading_calibration_error(levels.probabilities("disease", outputs["disease"]), disease, age_levels[:, None])
    """
    p = _as_array(probabilities).astype(np.float64)
    a = _as_array(levels_a).astype(np.int64).reshape(-1)
    ctx = None if context is None else np.asarray(context, dtype=np.int64).reshape(a.size, -1)
    count = p.shape[1] if count is None else int(count)
    halves = [np.arange(a.size) % 2 == 0, np.arange(a.size) % 2 == 1]
    wanted = np.ones(a.size, dtype=bool) if subset is None else np.asarray(subset, dtype=bool).reshape(-1)
    errors = []
    for fit, read in (halves, halves[::-1]):
        read = read & wanted
        if not fit.any() or not read.any():
            continue
        reader = _Reader(p[fit], a[fit], None if ctx is None else ctx[fit], count)
        errors.append(abs(reader.change(p[read], a[read], None if ctx is None else ctx[read])))
    return float(np.mean(errors)) if errors else float("nan")


def counterfactual_consistency(
    graph: CausalGraph | Mapping | str,
    observational: Mapping[str, Any],
    factual: Mapping[str, Any],
    interventions: Mapping[str, Any],
    real_outputs: Mapping[str, torch.Tensor],
    cf_outputs: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]],
    cf_attributes: Mapping[str, Mapping[str, Mapping[str, Any]]],
    truth: Mapping[str, Mapping[str, Any]] | None = None,
    truth_outputs: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    num_bins: int = 3,
    z: float = 3.0,
    bootstrap: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """The consistency table: per intervention ``X`` and attribute ``A``, bounds, truth and each CF type's estimates.

    For every pair, the query ``q(X, A | x, a)`` (module docstring) is bounded from ``observational``, estimated from
    the counterfactual images (adjusted predictor reading), from the model's own attribute counterfactuals and,
    given ``truth``, from the true counterfactual attributes; per cell of factual levels ``(x, a)`` and over all
    units. An estimate ``e`` is *inside* when ``lower - tol <= e <= upper + tol`` with
    ``tol = z * sqrt(e (1 - e) / n + se_bounds^2)`` (sampling error of the estimate on ``n`` units and the bootstrap
    standard error of the bounds over ``bootstrap`` resamples of ``observational``), plus the reading's calibration
    error for estimates read from images.

    Args:
        graph: the causal graph.
        observational: canonical attribute values ``{name: (M,)}`` the bounds are computed from.
        factual: canonical factual values ``{name: (N,)}`` of the test units.
        interventions: ``{X: (N,) canonical intervention values}``.
        real_outputs: predictor head outputs on the real test images ``{A: (N, ...)}``.
        cf_outputs: ``{cf type: {X: {A: (N, ...)}}}`` head outputs on the counterfactual images.
        cf_attributes: ``{cf type: {X: {A: (N,)}}}`` the model's canonical counterfactual attributes.
        truth: ``{X: {A: (N,)}}`` true counterfactual attributes (the phantom), or ``None``.
        truth_outputs: ``{X: {A: (N, ...)}}`` head outputs on the true counterfactual images: their reading tests the
            reading itself (a true counterfactual read outside the bounds is the predictor's fault, not the model's).
        num_bins: bins per continuous attribute.
        z: width of the tolerance in standard errors.
        bootstrap: resamples of the observational data for the bounds' standard error (0: none).
        seed: seeds the resampling.

    Returns:
        ``{"config", "calibration_error": {X: {A}}, "summary": {X: {A: {...}}}, "outside": {cf type: {"images",
        "scm"}}, "cells": [...]}``; ``summary`` holds the all-units rows (numbers only, for MLflow), ``cells`` every
        row with its verdicts.

    Example::

        table = counterfactual_consistency(graph, train_attributes, test_attributes, {"age": new_ages},
                                           real_outputs, cf_outputs, cf_attributes, truth=true_cf_attributes)
        table["summary"]["age"]["disease"]["lower"], table["outside"]["soft"]["images"]
    """
    graph = CausalGraph.build(graph)
    levels = AttributeLevels(graph, observational, num_bins)
    counts = {n: levels.count(n) for n in graph.attributes}
    fact = {n: levels(n, factual[n]) for n in graph.attributes}
    size = fact[graph.attributes[0]].size
    observed = {n: _as_array(observational[n]) for n in graph.attributes}
    rows_observed = observed[graph.attributes[0]].size
    rng = np.random.default_rng(seed)
    resamples = [rng.integers(0, rows_observed, rows_observed) for _ in range(int(bootstrap))]
    tables = conditional_tables(graph, levels, observed)
    resampled_tables = [conditional_tables(graph, levels, {n: v[i] for n, v in observed.items()}) for i in resamples]
    readable = [n for n in graph.attributes if n in real_outputs]
    real_probabilities = {n: levels.probabilities(n, real_outputs[n]) for n in readable}
    cf_types = list(cf_outputs)

    calibration: dict[str, dict[str, float]] = {}
    summary: dict[str, dict[str, Any]] = {}
    cells: list[dict[str, Any]] = []
    outside = {c: {"images": 0, "scm": 0} for c in cf_types}
    if truth is not None:
        outside["truth"] = {"scm": 0, "images": 0}
    for x_name, x_values in interventions.items():
        x_new = levels(x_name, x_values)
        if x_new.size != size:
            raise ValueError(f"interventions['{x_name}'] has {x_new.size} values for {size} units.")
        calibration[x_name], summary[x_name] = {}, {}
        for a_name in graph.attributes:
            reader = None
            context = reading_context(graph, x_name, a_name)
            real_context = np.stack([fact[n] for n in context], axis=1) if context else None
            descendants = graph.descendants([x_name])

            def cf_context(attributes: Mapping[str, Any]) -> np.ndarray | None:
                if not context:
                    return None
                columns = [
                    x_new if n == x_name else levels(n, attributes[n]) if n in descendants else fact[n] for n in context
                ]
                return np.stack(columns, axis=1)

            if a_name in readable:
                calibration[x_name][a_name] = reading_calibration_error(
                    real_probabilities[a_name], fact[a_name], real_context, counts[a_name]
                )
                reader = _Reader(real_probabilities[a_name], fact[a_name], real_context, counts[a_name])
            groups = [("all", np.ones(size, dtype=bool))]
            x_cells = sorted(set(fact[x_name].tolist()))
            a_cells = [None] if a_name == x_name else sorted(set(fact[a_name].tolist()))
            for x_level, a_level in itertools.product(x_cells, a_cells):
                chosen = fact[x_name] == x_level
                if a_level is not None:
                    chosen &= fact[a_name] == a_level
                groups.append(({"x": x_level, "a": a_level}, chosen))
            for cell, chosen in groups:
                n = int(chosen.sum())
                if n == 0:
                    continue
                chosen_fact = {k: v[chosen] for k, v in fact.items()}
                note = None
                try:
                    lower, upper = counterfactual_bounds(
                        graph, counts, tables, x_name, a_name, chosen_fact, x_new[chosen]
                    )
                    spread = [
                        counterfactual_bounds(graph, counts, t, x_name, a_name, chosen_fact, x_new[chosen])
                        for t in resampled_tables
                    ]
                except ValueError as error:  # a response-function space too large to solve: the trivial bounds
                    if cell == "all":
                        logger.warning("Consistency bounds of do(%s) -> %s: %s", x_name, a_name, error)
                    (lower, upper), spread, note = (0.0, 1.0), [], str(error)
                se_bounds = float(np.max(np.std(np.asarray(spread), axis=0))) if len(spread) > 1 else 0.0
                row: dict[str, Any] = {
                    "intervention": x_name,
                    "attribute": a_name,
                    "cell": cell,
                    "n": n,
                    "lower": lower,
                    "upper": upper,
                    "bounds_se": se_bounds,
                    "calibration_error": calibration[x_name].get(a_name),
                    "estimates": {},
                }
                if note is not None:
                    row["note"] = note
                if a_name in readable and cell != "all":
                    row["calibration_error"] = reading_calibration_error(
                        real_probabilities[a_name], fact[a_name], real_context, counts[a_name], chosen
                    )

                def verdict(value: float, extra: float = 0.0) -> bool:
                    tolerance = z * math.sqrt(max(value * (1.0 - value), 0.0) / n + se_bounds**2) + extra
                    return bool(lower - tolerance <= value <= upper + tolerance)

                if truth is not None and x_name in truth and a_name in truth[x_name]:
                    value = float(np.mean(levels(a_name, truth[x_name][a_name])[chosen] != chosen_fact[a_name]))
                    row["truth"], row["truth_inside"] = value, verdict(value)
                    if cell == "all" and not row["truth_inside"]:
                        outside["truth"]["scm"] += 1
                true_outputs = (truth_outputs or {}).get(x_name, {})
                if reader is not None and a_name in true_outputs:
                    true_context = cf_context(truth[x_name]) if truth is not None and x_name in truth else None
                    value = _read(levels, reader, a_name, true_outputs[a_name], chosen, chosen_fact, true_context)
                    row["truth_images"] = value
                    row["truth_images_inside"] = verdict(value, row["calibration_error"])
                    if cell == "all" and not row["truth_images_inside"]:
                        outside["truth"]["images"] += 1
                for cf_type in cf_types:
                    entry: dict[str, Any] = {}
                    attrs = cf_attributes.get(cf_type, {}).get(x_name, {})
                    if a_name in attrs:
                        value = float(np.mean(levels(a_name, attrs[a_name])[chosen] != chosen_fact[a_name]))
                        entry["scm"], entry["scm_inside"] = value, verdict(value)
                    outputs = cf_outputs[cf_type].get(x_name, {})
                    if reader is not None and a_name in outputs:
                        model_context = (
                            cf_context(attrs) if all(n in attrs for n in descendants & set(context)) else None
                        )
                        value = _read(levels, reader, a_name, outputs[a_name], chosen, chosen_fact, model_context)
                        entry["images"] = value
                        entry["images_inside"] = verdict(value, row["calibration_error"])
                    row["estimates"][cf_type] = entry
                    if cell == "all":
                        for source in ("images", "scm"):
                            if f"{source}_inside" in entry and not entry[f"{source}_inside"]:
                                outside[cf_type][source] += 1
                cells.append(row)
                if cell == "all":
                    summary[x_name][a_name] = _summary_row(row)
    return {
        "config": {
            "num_bins": levels.num_bins,
            "z": float(z),
            "bootstrap": int(bootstrap),
            "bins": {k: v.tolist() for k, v in levels.edges.items()},
        },
        "calibration_error": calibration,
        "summary": summary,
        "outside": outside,
        "cells": cells,
    }


def _read(
    levels: AttributeLevels,
    reader: _Reader,
    name: str,
    outputs: torch.Tensor,
    chosen: np.ndarray,
    factual: Mapping[str, np.ndarray],
    context: np.ndarray | None,
) -> float:
    probabilities = levels.probabilities(name, outputs)[chosen]
    value = reader.change(probabilities, factual[name], None if context is None else context[chosen])
    return float(np.clip(value, 0.0, 1.0))


def _summary_row(row: Mapping[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {k: row[k] for k in ("lower", "upper", "bounds_se", "n", "note") if k in row}
    for key in ("truth", "truth_images"):
        if key in row:
            result[key] = row[key]
            result[f"{key}_inside"] = float(row[f"{key}_inside"])
    for cf_type, entry in row["estimates"].items():
        result[cf_type] = {k: (float(v) if isinstance(v, bool) else v) for k, v in entry.items()}
    return result


def _ancestors(graph: CausalGraph, name: str) -> set[str]:
    found: set[str] = set()
    stack = list(graph.parents(name))
    while stack:
        parent = stack.pop()
        if parent not in found:
            found.add(parent)
            stack.extend(graph.parents(parent))
    return found


def _config_index(parent_levels: Sequence[np.ndarray], shape: Sequence[int], size: int) -> np.ndarray:
    if not shape:
        return np.zeros(size, dtype=np.int64)
    return np.ravel_multi_index(tuple(parent_levels), tuple(shape)).astype(np.int64)


def _record_config(graph: CausalGraph, counts: Mapping[str, int], name: str, values: Mapping[str, Any]) -> Any:
    parents = graph.parents(name)
    if not parents:
        return 0
    return np.ravel_multi_index(tuple(values[p] for p in parents), tuple(counts[p] for p in parents))


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy().reshape(-1) if values.ndim <= 1 else values.detach().cpu().numpy()
    return np.asarray(values)
