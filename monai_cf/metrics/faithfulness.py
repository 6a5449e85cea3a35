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
"""Faithfulness: how close counterfactuals come to the truth, and how much they exaggerate.

Predictor-based scores reward an edit the predictor reads, however exaggerated it is. Three measures here
judge the edit instead:

- :func:`truth_gain` (needs ground truth, e.g. the phantom): ``1 - L1(x*, x_true) / L1(x, x_true)``, the
  share of the distance from the unchanged image to the true counterfactual that the edit covers. 0: no
  better than doing nothing; 1: exact; negative: the edit moves away from the truth.
- :func:`effectiveness_excess`: how much more confidently counterfactuals are read than real images on the
  intervened attribute (``AUC_cf - AUC_real`` for discrete attributes; for continuous ones the error change
  in units of the real-image error, negative when the counterfactual is read *more* precisely than reality).
- :func:`continuous_amplification`: the error change of the unintervened continuous attributes on
  counterfactuals, in units of their real-image error, the counterpart of the AUC-based amplification of
  discrete attributes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from monai_cf.graph import CausalGraph

__all__ = ["truth_gain", "effectiveness_excess", "continuous_amplification", "relative_error_change"]


def truth_gain(cf_distance: float, unchanged_distance: float) -> float:
    """``1 - cf_distance / unchanged_distance``: the share of the way from ``x`` to the true counterfactual covered.

    Both distances are means over the same test images (a ratio of means, so images whose true
    counterfactual equals the factual image add nothing to either side).

    Args:
        cf_distance: mean distance of the counterfactuals to the true counterfactuals.
        unchanged_distance: mean distance of the unchanged images to the true counterfactuals.

    Returns:
        The truth gain, or ``nan`` when the truth equals the unchanged image (nothing to gain).

    Example::

        truth_gain(2.0, 8.0)  # 0.75: the edit covers three quarters of the way
        truth_gain(9.0, 6.0)  # -0.5: further from the truth than doing nothing
    """
    cf_distance, unchanged_distance = float(cf_distance), float(unchanged_distance)
    if not (math.isfinite(cf_distance) and math.isfinite(unchanged_distance)) or unchanged_distance <= 0.0:
        return float("nan")
    return 1.0 - cf_distance / unchanged_distance


def relative_error_change(cf_error: float, real_error: float) -> float:
    """``(cf_error - real_error) / real_error``: an error change in units of the real-image error.

    Example::

        relative_error_change(9.0, 6.0)  # 0.5: the error grew by half of what it is on real images
    """
    cf_error, real_error = float(cf_error), float(real_error)
    if not (math.isfinite(cf_error) and math.isfinite(real_error)) or real_error <= 0.0:
        return float("nan")
    return (cf_error - real_error) / real_error


def effectiveness_excess(
    graph: CausalGraph,
    baseline: Mapping[str, float],
    effectiveness: Mapping[str, Mapping[str, Mapping[str, float]]],
) -> dict[str, dict[str, float]]:
    """Per intervention ``do(k)`` and CF type, how much more confidently ``k`` is read on CFs than on real images.

    Discrete ``k``: ``AUC_cf(k) - AUC_real(k)`` (positive: exaggerated edits; negative: edits too weak).
    Continuous ``k``: :func:`relative_error_change` of its MAE (negative: read more precisely than real images,
    which exaggerates; positive: the intervention is not obeyed).

    Args:
        graph: the causal graph (attribute kinds).
        baseline: ``{attribute: AUC or MAE on real images}``.
        effectiveness: ``{k: {cf_type: {attribute: AUC or MAE on counterfactuals under do(k)}}}``.

    Example::

        effectiveness_excess(graph, {"race": 0.78}, {"race": {"soft": {"race": 0.98}}})  # {"race": {"soft": 0.20}}
    """
    result: dict[str, dict[str, float]] = {}
    for k, by_type in effectiveness.items():
        result[k] = {}
        for cf_type, scores in by_type.items():
            if k not in scores or k not in baseline:
                continue
            if graph[k].is_discrete:
                result[k][cf_type] = float(scores[k]) - float(baseline[k])
            else:
                result[k][cf_type] = relative_error_change(scores[k], baseline[k])
    return result


def continuous_amplification(
    graph: CausalGraph,
    baseline: Mapping[str, float],
    effectiveness: Mapping[str, Mapping[str, Mapping[str, float]]],
) -> tuple[dict[str, float], dict[str, dict[str, dict[str, float]]]]:
    """Amplification of continuous attributes: their error change on counterfactuals, in real-image errors.

    For every intervention ``do(k)`` and continuous attribute ``j`` of ``graph.soft_target_set([k])`` (an
    attribute the intervention must leave as it is), the :func:`relative_error_change` of ``j``'s MAE
    against its factual value. 0: read as on real images; 0.5: the error grew by half.

    Returns:
        ``(summary, detail)`` like :func:`~monai_cf.metrics.amplification`: ``summary[cf_type]`` the mean over
        every ``(k, j)`` term (``nan`` when the graph has no such term), ``detail[k][cf_type][j]`` the terms.

    Example::

        summary, detail = continuous_amplification(graph, {"age": 6.0}, {"sex": {"soft": {"age": 7.5}}})
        summary  # {"soft": 0.25}
    """
    detail: dict[str, dict[str, dict[str, float]]] = {}
    terms: dict[str, list[float]] = {}
    for k, by_type in effectiveness.items():
        targets = [j for j in graph.image_parents if j in graph.soft_target_set([k]) and not graph[j].is_discrete]
        detail[k] = {}
        for cf_type, scores in by_type.items():
            terms.setdefault(cf_type, [])
            detail[k][cf_type] = {}
            for j in targets:
                if j in scores and j in baseline:
                    change = relative_error_change(scores[j], baseline[j])
                    detail[k][cf_type][j] = change
                    if math.isfinite(change):
                        terms[cf_type].append(change)
    summary = {cf_type: (float(np.mean(v)) if v else float("nan")) for cf_type, v in terms.items()}
    return summary, detail
