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
"""Drawing random interventions: which values an intervention may set, and the draws themselves.

The one place where the package draws interventions, for its three users:

- evaluation (:func:`draw_intervention_values`): every sample's value changes, as in published counterfactual
  benchmarks (binary values flip, categorical ones move to another class uniformly, continuous ones take a
  value of the test marginal at least ``min_gap`` of the range away);
- counterfactual fine-tuning (:func:`sample_interventions`): one image parent per sample, set to the value of
  another sample of the batch (the data's marginal), or changed like the evaluation's with ``force_change``;
- augmentation transforms (:class:`~monai_cf.transforms.InterventionSampler`, which also needs the SCM for
  raw values and mechanism sampling): one attribute per sample, a value from :func:`allowed_values` or
  :func:`draw_other_in_range`.

A discrete value that must change always goes through :func:`other_classes`, whichever random source drives
it (a ``numpy.random.Generator`` in the evaluation, a ``torch.Generator`` in fine-tuning).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_cf.graph import AttributeKind, CausalGraph, Variable

__all__ = [
    "InterventionBatch",
    "allowed_values",
    "draw_intervention_values",
    "draw_other_in_range",
    "other_classes",
    "sample_interventions",
]

_MAX_REDRAWS = 64


def other_classes(
    current: Any, num_classes: int, rng: np.random.Generator | torch.Generator | None = None, binary: bool = False
) -> Any:
    """A different class for every sample: ``1 - current`` if binary, else uniformly one of the other classes.

    Args:
        current: ``(B,)`` class indices, a ``numpy`` array or a tensor; for a binary attribute also its 0/1
            code of any shape (a flip needs no draw).
        num_classes: the attribute's number of classes.
        rng: ``numpy.random.Generator`` for arrays; ``torch.Generator`` (CPU) or ``None`` for tensors.
        binary: the attribute is binary: flip, drawing nothing from ``rng``.

    Returns:
        the new classes, the type, device and dtype of ``current``.

    Example::

        other_classes(np.array([0, 1, 2]), 3, np.random.default_rng(0))  # e.g. array([2, 0, 1])
    """
    if binary:
        return 1 - current
    if isinstance(current, torch.Tensor):
        offset = torch.randint(1, num_classes, (current.shape[0],), generator=rng).to(current.device)
        return (current + offset) % num_classes
    offset = rng.integers(1, num_classes, size=current.shape[0])  # type: ignore[union-attr]
    return ((current.astype(np.int64) + offset) % num_classes).astype(np.int64)


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
    if var.kind != AttributeKind.CONTINUOUS:
        return other_classes(current.astype(np.int64), var.num_classes, rng, binary=var.kind == AttributeKind.BINARY)
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


@dataclass
class InterventionBatch:
    """Per-sample single-attribute interventions of a batch, in encoded space.

    Attributes:
        chosen: ``(B,)`` index into ``attributes`` of the attribute intervened on in each sample.
        attributes: the candidate attributes (the image parents), in graph order.
        do: encoded intervention value per attribute, ``(B, dim)``.
        do_mask: ``(B,)`` booleans per attribute: the samples intervened on that attribute.
    """

    chosen: torch.Tensor
    attributes: tuple[str, ...]
    do: dict[str, torch.Tensor]
    do_mask: dict[str, torch.Tensor]


def sample_interventions(
    graph: CausalGraph,
    encoded: Mapping[str, torch.Tensor],
    generator: torch.Generator | None = None,
    attributes: tuple[str, ...] | None = None,
    force_change: bool = False,
) -> InterventionBatch:
    """Draw one intervention per sample, as in counterfactual fine-tuning.

    Each sample intervenes on one attribute chosen uniformly among ``attributes`` (default: the image
    parents); the value is that attribute's value in another sample of the batch (a random permutation), so
    interventions follow the data's marginal distribution. A permutation often hands a sample its own value
    (about half the time for a balanced binary attribute), a null intervention that teaches the counterfactual
    nothing; ``force_change=True`` replaces discrete values by a different class instead
    (:func:`other_classes`), as the evaluation's interventions do. Continuous values stay permuted.

    Args:
        graph: the causal graph.
        encoded: encoded factual attributes, ``(B, dim)`` each.
        generator: random generator (on the CPU) for reproducible draws.
        attributes: the attributes that may be intervened on.
        force_change: discrete interventions always change the value.

    Example::

        interventions = sample_interventions(graph, encoded, torch.Generator().manual_seed(0))
        cf = counterfactual_all(mechanisms, graph, encoded, interventions.do, interventions.do_mask)
    """
    attributes = tuple(graph.check_names(attributes if attributes is not None else graph.image_parents))
    if not attributes:
        raise ValueError("No attribute to intervene on.")
    batch = next(iter(encoded.values())).shape[0]
    device = next(iter(encoded.values())).device
    chosen = torch.randint(len(attributes), (batch,), generator=generator).to(device)
    do, do_mask = {}, {}
    for index, name in enumerate(attributes):
        permutation = torch.randperm(batch, generator=generator).to(device)
        var = graph[name]
        if force_change and var.is_discrete:
            do[name] = _changed_code(encoded[name], var.num_classes, generator)
        else:
            do[name] = encoded[name][permutation]
        do_mask[name] = chosen == index
    return InterventionBatch(chosen=chosen, attributes=attributes, do=do, do_mask=do_mask)


def _changed_code(encoded: torch.Tensor, num_classes: int, generator: torch.Generator | None) -> torch.Tensor:
    """Another class per sample in encoded space: a binary ``(B, 1)`` code, or a one-hot code otherwise."""
    if encoded.shape[-1] == 1:
        return other_classes(encoded, 2, binary=True)
    other = other_classes(encoded.argmax(-1), num_classes, generator)
    return nn.functional.one_hot(other, num_classes).to(encoded.dtype)


def allowed_values(var: Variable, current: Any, values: Sequence[int | float] | None = None) -> list | None:
    """The values other than ``current`` that an intervention on ``var`` may set.

    Args:
        var: the graph's variable.
        current: the sample's canonical value.
        values: the values a user allowed (canonical), if any.

    Returns:
        the allowed values in order (the listed ones, or the other classes of a discrete variable); ``None`` for a
        continuous variable without a list, meaning "any other value of its range" (:func:`draw_other_in_range`).
    """
    if values is not None:
        return [v for v in values if v != current]
    if var.is_discrete:
        return [k for k in range(var.num_classes) if k != current]
    return None


def draw_other_in_range(var: Variable, current: float, rng: np.random.RandomState) -> float:
    """A uniform value of a continuous variable's range, other than ``current``, in float32 precision.

    Float32 is the precision of canonical values, so the value written back into a sample is the value drawn.
    """
    low, high = var.value_range  # type: ignore[misc]
    while True:
        value = float(np.float32(low + (high - low) * rng.rand()))
        if value != current and low <= value <= high:
            return value
