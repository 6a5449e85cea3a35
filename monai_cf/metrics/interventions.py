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
"""Force-change interventions for evaluation: every sample gets a value different from its own.

As in published counterfactual benchmarks, an evaluation intervention never leaves a sample's value as it
was, so effectiveness measures an actual change: binary values flip, categorical ones move to one of the
other classes uniformly, continuous ones take a value of the test marginal at least ``min_gap`` (a fraction
of the attribute's range) away from the current value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from monai_cf.graph import AttributeKind, CausalGraph

__all__ = ["draw_intervention_values"]

_MAX_REDRAWS = 64


def draw_intervention_values(
    graph: CausalGraph,
    name: str,
    current: Sequence[float] | np.ndarray,
    rng: np.random.Generator,
    pool: Sequence[float] | np.ndarray | None = None,
    min_gap: float = 0.1,
) -> np.ndarray:
    """Intervention values for attribute ``name``, each different from the sample's current value.

    Args:
        graph: the causal graph (kind, classes and range of ``name``).
        current: the samples' canonical values ``(B,)``.
        rng: the random generator (seed it: the draws decide the evaluation).
        pool: continuous attributes: values to draw from (the test marginal); default: ``current`` itself.
        min_gap: continuous attributes: the smallest accepted ``|new - current|``, as a fraction of the range.
            A sample for which the pool holds no value far enough away after repeated draws gets a uniform
            value from the part of the range that is.

    Returns:
        ``(B,)`` canonical values: ``int64`` class indices, or ``float64`` in original units.

    Example::

        rng = np.random.default_rng(0)
        draw_intervention_values(graph, "sex", [0, 1, 1], rng)   # array([1, 0, 0])
        draw_intervention_values(graph, "age", [30.0, 70.0], rng, pool=test_ages, min_gap=0.1)
    """
    var = graph[name]
    current = np.asarray(current).reshape(-1)
    if var.kind == AttributeKind.BINARY:
        return (1 - current.astype(np.int64)).astype(np.int64)
    if var.kind == AttributeKind.CATEGORICAL:
        offset = rng.integers(1, var.num_classes, size=current.shape[0])
        return ((current.astype(np.int64) + offset) % var.num_classes).astype(np.int64)
    low, high = var.value_range  # type: ignore[misc]
    if not 0.0 <= min_gap < 0.5:
        # below half the range, every value has an admissible part of the range on at least one side
        raise ValueError(f"min_gap must be a fraction of the range in [0, 0.5), got {min_gap}.")
    gap = min_gap * (high - low)
    values = np.asarray(current if pool is None else pool, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values) & (values >= low) & (values <= high)]
    current = current.astype(np.float64)
    drawn = np.full(current.shape, np.nan)
    pending = np.arange(current.shape[0])
    for _ in range(_MAX_REDRAWS if values.size else 0):
        if not pending.size:
            break
        candidates = values[rng.integers(0, values.size, size=pending.size)]
        accepted = np.abs(candidates - current[pending]) > gap
        drawn[pending[accepted]] = candidates[accepted]
        pending = pending[~accepted]
    for i in pending:  # the pool holds nothing far enough away: draw uniformly from the allowed part of the range
        below = max(current[i] - gap - low, 0.0)
        above = max(high - (current[i] + gap), 0.0)
        u = rng.random() * (below + above)
        drawn[i] = low + u if u < below else current[i] + gap + (u - below)
    return drawn
