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
"""Effectiveness and attribute amplification (Table 1 of the Soft-CFT paper).

An evaluation predictor trained on real images scores counterfactuals against their counterfactual labels:

- discrete attributes: ROC-AUC (binary) or one-vs-rest macro ROC-AUC (categorical), as fractions;
- continuous attributes: mean absolute error of the predicted mean, in original units.

On the intervened attribute this is *effectiveness*. On the attributes of the soft-target set A* (neither
intervened on nor descending from the intervention) the counterfactual should score exactly like the real
image; an AUC above the real-image baseline is *amplification*, and so is a larger ``|log-odds|`` of the
predictor (the attribute became more extreme than it was).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_roc_auc

from monai_cf.graph import AttributeKind, CausalGraph

__all__ = [
    "roc_auc",
    "auc_standard_error",
    "attribute_performance",
    "label_log_odds",
    "amplification",
    "logit_shift",
]


def roc_auc(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, num_classes: int = 2) -> float:
    """ROC-AUC of scores against class labels; one-vs-rest macro average for more than two classes.

    Args:
        scores: binary: ``(N,)`` or ``(N, 1)`` scores of class 1 (probabilities or logits: AUC only uses the
            order); categorical: ``(N, K)`` class probabilities.
        labels: ``(N,)`` class indices.
        num_classes: ``K``; 2 for a binary attribute.

    Returns:
        The AUC as a fraction, or ``nan`` when the labels hold a single class (AUC undefined). For a
        categorical attribute, classes absent from ``labels`` are left out of the macro average.

    Example::

        roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))  # 0.75
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    labels = torch.as_tensor(labels).detach().cpu().reshape(-1).long()
    if scores.shape[0] != labels.shape[0]:
        raise ValueError(f"roc_auc got {scores.shape[0]} scores but {labels.shape[0]} labels.")
    if labels.numel() == 0:
        return float("nan")
    if num_classes <= 2:
        scores = scores.reshape(scores.shape[0], -1)
        if scores.shape[1] == 2:
            scores = scores[:, 1]
        if torch.unique(labels).numel() < 2:
            return float("nan")
        return float(compute_roc_auc(scores.reshape(-1), labels))
    if scores.ndim != 2 or scores.shape[1] != num_classes:
        raise ValueError(f"roc_auc needs (N, {num_classes}) class scores, got shape {tuple(scores.shape)}.")
    present = [c for c in range(num_classes) if bool((labels == c).any()) and bool((labels != c).any())]
    if not present:
        return float("nan")
    onehot = torch.nn.functional.one_hot(labels, num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an absent class is reported as nan and dropped below
        per_class = compute_roc_auc(scores[:, present], onehot[:, present], average="none")
    return float(np.nanmean(np.asarray(per_class, dtype=np.float64)))


def auc_standard_error(auc: float, num_positive: int, num_negative: int) -> float:
    """Standard error of an ROC-AUC estimate (Hanley and McNeil, 1982).

    Useful to judge whether an AUC on counterfactuals differs from the real-image baseline by more than
    sampling error. For two AUCs of the same patients (paired) it overstates the error of their difference.

    Example::

        auc_standard_error(0.9, 250, 250)  # about 0.014
    """
    if num_positive < 1 or num_negative < 1 or not math.isfinite(auc):
        return float("nan")
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    variance = auc * (1.0 - auc) + (num_positive - 1) * (q1 - auc * auc) + (num_negative - 1) * (q2 - auc * auc)
    return math.sqrt(max(variance, 0.0) / (num_positive * num_negative))


def _continuous_mean(graph: CausalGraph, name: str, output: torch.Tensor) -> torch.Tensor:
    low, high = graph[name].value_range  # type: ignore[misc]
    mean = output.reshape(output.shape[0], -1)[:, 0].double()
    return (mean + 1.0) / 2.0 * (high - low) + low


def attribute_performance(
    graph: CausalGraph,
    outputs: Mapping[str, torch.Tensor],
    labels: Mapping[str, torch.Tensor],
    attributes: Sequence[str] | None = None,
) -> dict[str, float]:
    """Per attribute: AUC (discrete) or MAE in original units (continuous) of predictor outputs.

    Args:
        graph: the causal graph (kinds, classes, ranges).
        outputs: raw head outputs of an :class:`~monai_cf.networks.AttributePredictor`: logits ``(N, 1)`` or
            ``(N, K)``, or ``(N, 2)`` (mean, log std) in encoded ``[-1, 1]`` units for continuous attributes.
        labels: canonical labels ``(N,)``: class indices, or values in original units.
        attributes: which attributes (default: every attribute present in both ``outputs`` and ``labels``).

    Example::

        attribute_performance(graph, predictor(x), {"sex": sex, "age": age})  # {"sex": 0.98, "age": 6.1}
    """
    names = [n for n in graph.attributes if n in outputs and n in labels] if attributes is None else list(attributes)
    result = {}
    for name in names:
        var = graph[name]
        out = torch.as_tensor(outputs[name]).detach().cpu()
        lab = torch.as_tensor(labels[name]).detach().cpu().reshape(-1)
        if var.kind == AttributeKind.CONTINUOUS:
            result[name] = float((_continuous_mean(graph, name, out) - lab.double()).abs().mean())
        elif var.kind == AttributeKind.BINARY:
            result[name] = roc_auc(out.reshape(out.shape[0], -1)[:, 0], lab, 2)
        else:
            result[name] = roc_auc(torch.softmax(out.double(), dim=-1), lab, var.num_classes)
    return result


def label_log_odds(graph: CausalGraph, name: str, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample log-odds ``log p(y) - log(1 - p(y))`` the predictor gives the labelled class ``y``.

    For a binary head this is the logit signed towards the label; its magnitude measures how extreme
    (confident) the prediction is. Continuous attributes have no log-odds (``ValueError``).

    Example::

        label_log_odds(graph, "sex", torch.tensor([[2.0], [-1.0]]), torch.tensor([1, 0]))  # tensor([2., 1.])
    """
    var = graph[name]
    out = torch.as_tensor(output).detach().cpu().double()
    lab = torch.as_tensor(labels).detach().cpu().reshape(-1).long()
    if var.kind == AttributeKind.CONTINUOUS:
        raise ValueError(f"Attribute '{name}' is continuous; log-odds are defined for discrete attributes only.")
    if var.kind == AttributeKind.BINARY:
        logit = out.reshape(out.shape[0], -1)[:, 0]
        return torch.where(lab == 1, logit, -logit)
    log_p = torch.log_softmax(out, dim=-1)
    log_py = log_p.gather(1, lab.unsqueeze(1))[:, 0]
    others = log_p.masked_fill(torch.nn.functional.one_hot(lab, var.num_classes).bool(), -math.inf)
    return log_py - torch.logsumexp(others, dim=-1)


def amplification(
    graph: CausalGraph,
    baseline: Mapping[str, float],
    effectiveness: Mapping[str, Mapping[str, Mapping[str, float]]],
) -> tuple[dict[str, float], dict[str, dict[str, dict[str, float]]]]:
    """Attribute amplification per counterfactual type, from AUCs on real images and on counterfactuals.

    Args:
        graph: the causal graph; for each intervention ``do(k)`` the attributes compared are the discrete
            members of ``graph.soft_target_set([k])``.
        baseline: ``{attribute: AUC on real images}``.
        effectiveness: ``{k: {cf_type: {attribute: AUC on counterfactuals under do(k)}}}``.

    Returns:
        ``(summary, detail)``: ``summary[cf_type]`` is the mean of ``AUC_cf(j) - AUC_real(j)`` over every
        intervention ``k`` and unintervened discrete attribute ``j``; ``detail[k][cf_type][j]`` the terms.
        Undefined AUCs (``nan``) are left out of the mean.

    Example::

        summary, detail = amplification(graph, {"sex": 0.99, "disease": 0.90},
                                        {"sex": {"hard": {"sex": 0.99, "disease": 0.95}}})
        summary  # {"hard": 0.05}
    """
    detail: dict[str, dict[str, dict[str, float]]] = {}
    terms: dict[str, list[float]] = {}
    for k, by_type in effectiveness.items():
        targets = [j for j in graph.image_parents if j in graph.soft_target_set([k]) and graph[j].is_discrete]
        detail[k] = {}
        for cf_type, scores in by_type.items():
            detail[k][cf_type] = {}
            for j in targets:
                if j not in scores or j not in baseline:
                    continue
                delta = float(scores[j]) - float(baseline[j])
                detail[k][cf_type][j] = delta
                if math.isfinite(delta):
                    terms.setdefault(cf_type, []).append(delta)
            terms.setdefault(cf_type, [])
    summary = {cf_type: (float(np.mean(values)) if values else float("nan")) for cf_type, values in terms.items()}
    return summary, detail


def logit_shift(
    graph: CausalGraph,
    intervened: str,
    real_outputs: Mapping[str, torch.Tensor],
    cf_outputs: Mapping[str, torch.Tensor],
    labels: Mapping[str, torch.Tensor],
    signed: bool = False,
) -> dict[str, float]:
    """Mean paired change of ``|log-odds|`` (counterfactual minus real) on the unintervened discrete attributes.

    Positive values mean the counterfactuals are predicted more confidently than their real images: the
    attribute was made more extreme. ``labels`` are the factual labels, which the unintervened attributes keep.
    With ``signed=True`` the change of the log-odds of the labelled class itself is averaged instead: positive
    when predictions moved towards the label. The two differ for samples the predictor gets wrong on the
    real image, whose ``|log-odds|`` shrinks as the prediction moves towards the label.

    Returns:
        ``{j: mean shift}`` for ``j`` in the discrete members of ``graph.soft_target_set([intervened])``.

    Example::

        logit_shift(graph, "sex", predictor(x), predictor(x_cf), factual_labels)  # {"race": 0.01, "disease": 0.4}
    """
    result = {}
    for j in graph.image_parents:
        if j not in graph.soft_target_set([intervened]) or not graph[j].is_discrete:
            continue
        if j not in real_outputs or j not in cf_outputs or j not in labels:
            continue
        real = label_log_odds(graph, j, real_outputs[j], labels[j])
        cf = label_log_odds(graph, j, cf_outputs[j], labels[j])
        result[j] = float((cf - real).mean() if signed else (cf.abs() - real.abs()).mean())
    return result
