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
"""The result sections of :class:`~monai_cf.engines.CounterfactualEvaluator`, as plain functions.

Each function computes one section of ``evaluator.results`` from an
:class:`~monai_cf.engines.evaluation_runner.EvaluationAccumulator` (the per-batch results of one evaluation
epoch) and the settings it needs, given explicitly:

- :func:`effectiveness_results`: the baseline, effectiveness, amplification (discrete and continuous),
  effectiveness excess and log-odds shifts (Table 1);
- :func:`composition_results`, :func:`reversibility_results`;
- :func:`ground_truth_results` and :func:`faithfulness_results` (phantom data only);
- :func:`consistency_results`: counterfactual consistency;
- :func:`embedding_results`: the embedding shift (Fig. 2) and the data of its figures;
- :func:`realism_results`: FID;
- :func:`utility_results`: predictors trained on counterfactuals only (Table 2);
- :func:`example_figure_data`: the counterfactual grids' images and captions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.networks.utils import eval_mode
from torch import nn

from monai_cf.engines.evaluation_runner import (
    CounterfactualRunner,
    EvaluationAccumulator,
    append_nested,
    cat_values,
    finite_mean,
    mean_of,
)
from monai_cf.graph import CausalGraph
from monai_cf.metrics import (
    EmbeddingPCA,
    amplification,
    attribute_performance,
    continuous_amplification,
    counterfactual_consistency,
    draw_intervention_values,
    effectiveness_excess,
    frechet_distance,
    logit_shift,
    separating_mode,
    subgroup_shift,
    truth_gain,
)

__all__ = [
    "FIGURE_MODES",
    "composition_results",
    "consistency_results",
    "effectiveness_results",
    "embedding_results",
    "example_figure_data",
    "faithfulness_results",
    "ground_truth_results",
    "realism_results",
    "reversibility_results",
    "utility_results",
]

FIGURE_MODES = 10  # the embedding figures show the most separating of this many leading PCA modes


def effectiveness_results(
    graph: CausalGraph,
    acc: EvaluationAccumulator,
    intervened: Sequence[str],
    cf_types: Sequence[str],
    labels: Mapping[str, torch.Tensor],
    real_outputs: Mapping[str, torch.Tensor],
) -> dict[str, Any]:
    """The predictor on real images and on counterfactuals, and what the difference says (Table 1).

    Args:
        graph: the causal graph.
        acc: the accumulated counterfactual outputs and labels.
        intervened: the attributes intervened on.
        cf_types: the counterfactual types, in the order of the results.
        labels: the test labels ``{name: (N,)}``.
        real_outputs: the predictor's outputs on the real test images ``{name: (N, ...)}``.

    Returns:
        The sections ``baseline``, ``effectiveness``, ``amplification``, ``amplification_detail``,
        ``amplification_continuous``, ``amplification_continuous_detail``, ``effectiveness_excess``,
        ``logit_shift``, ``logit_shift_detail``, ``label_logit_shift`` and ``label_logit_shift_detail``, in
        that order (see :class:`~monai_cf.engines.CounterfactualEvaluator`).

    Example::

        sections = effectiveness_results(graph, acc, ["sex", "age"], ["soft"], labels, real_outputs)
        sections["amplification"]  # {"soft": 0.004}
    """
    baseline = attribute_performance(graph, real_outputs, labels)
    effectiveness: dict[str, dict[str, dict[str, float]]] = {}
    logit_detail: dict[str, dict[str, dict[str, float]]] = {}
    signed_detail: dict[str, dict[str, dict[str, float]]] = {}
    for k in intervened:
        effectiveness[k], logit_detail[k], signed_detail[k] = {}, {}, {}
        for cf_type in cf_types:
            cf_outputs = cat_values(acc.cf_outputs[cf_type][k])
            cf_labels = cat_values(acc.cf_labels[cf_type][k])
            effectiveness[k][cf_type] = attribute_performance(graph, cf_outputs, cf_labels)
            logit_detail[k][cf_type] = logit_shift(graph, k, real_outputs, cf_outputs, labels)
            signed_detail[k][cf_type] = logit_shift(graph, k, real_outputs, cf_outputs, labels, True)
    amp, amp_detail = amplification(graph, baseline, effectiveness)
    amp_continuous, amp_continuous_detail = continuous_amplification(graph, baseline, effectiveness)
    excess = effectiveness_excess(graph, baseline, effectiveness)
    logit_summary, signed_summary = (
        {cf_type: finite_mean(v for k in intervened for v in detail[k][cf_type].values()) for cf_type in cf_types}
        for detail in (logit_detail, signed_detail)
    )
    return {
        "baseline": baseline,
        "effectiveness": effectiveness,
        "amplification": amp,
        "amplification_detail": amp_detail,
        "amplification_continuous": amp_continuous,
        "amplification_continuous_detail": amp_continuous_detail,
        "effectiveness_excess": excess,
        "logit_shift": logit_summary,
        "logit_shift_detail": logit_detail,
        "label_logit_shift": signed_summary,
        "label_logit_shift_detail": signed_detail,
    }


def composition_results(acc: EvaluationAccumulator, cf_types: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean L1 (0-255) after each number of null interventions: ``{cf type: {cycles: l1}}``.

    Example::

        composition_results(acc, ["soft"])  # {"soft": {"1": 0.4, "10": 1.9}}
    """
    return {cf_type: {m: mean_of(v) for m, v in acc.composition.get(cf_type, {}).items()} for cf_type in cf_types}


def reversibility_results(acc: EvaluationAccumulator) -> dict[str, dict[str, float]]:
    """Mean L1 (0-255) of the round trip through each intervention: ``{intervention: {cf type: l1}}``.

    Example::

        reversibility_results(acc)  # {"sex": {"soft": 0.7}, "age": {"soft": 0.5}}
    """
    return {k: {cf_type: mean_of(v) for cf_type, v in by_type.items()} for k, by_type in acc.reversibility.items()}


def ground_truth_results(acc: EvaluationAccumulator) -> dict[str, Any]:
    """Similarity to the phantom's true counterfactual and agreement of the recomputed descendants.

    Returns:
        ``{intervention: {cf type: {metric: mean, "descendants": {name: mean agreement}}}}`` (``{}`` off the
        phantom); discrete descendants agree as a fraction, continuous ones as a mean absolute difference.

    Example::

        ground_truth_results(acc)["age"]["soft"]  # {"l1": 0.0, "psnr": 100.0, "ssim": 1.0, "descendants": {...}}
    """
    result: dict[str, Any] = {}
    for k, by_type in acc.ground_truth.items():
        result[k] = {}
        for cf_type, metrics in by_type.items():
            entry: dict[str, Any] = {m: mean_of(v) for m, v in metrics.items()}
            descendants = acc.descendants.get(k, {}).get(cf_type, {})
            if descendants:
                entry["descendants"] = {d: mean_of(v) for d, v in descendants.items()}
            result[k][cf_type] = entry
    return result


def faithfulness_results(
    acc: EvaluationAccumulator, ground_truth: Mapping[str, Any], cf_types: Sequence[str]
) -> dict[str, Any]:
    """Truth gain per intervention and CF type against the unchanged image's distance to the truth.

    Args:
        acc: the accumulated L1 of the unchanged images to the true counterfactuals.
        ground_truth: the ``ground_truth`` section (:func:`ground_truth_results`).
        cf_types: the counterfactual types.

    Returns:
        ``{"unchanged_l1": ..., "truth_gain": ..., "truth_gain_mean": ...}``, or ``{}`` without ground truth.

    Example::

        faithfulness_results(acc, ground_truth, ["soft"])["truth_gain_mean"]  # {"soft": 0.8}
    """
    if not ground_truth:
        return {}
    unchanged = {k: mean_of(v) for k, v in acc.unchanged_l1.items()}
    gains = {
        k: {c: truth_gain(entry["l1"], unchanged.get(k, float("nan"))) for c, entry in by_type.items()}
        for k, by_type in ground_truth.items()
    }
    return {
        "unchanged_l1": unchanged,
        "truth_gain": gains,
        "truth_gain_mean": {c: finite_mean(gains[k].get(c, float("nan")) for k in gains) for c in cf_types},
    }


def consistency_results(
    graph: CausalGraph,
    acc: EvaluationAccumulator,
    intervened: Sequence[str],
    cf_types: Sequence[str],
    labels: Mapping[str, torch.Tensor],
    real_outputs: Mapping[str, torch.Tensor],
    observational_data: Mapping[str, np.ndarray] | None,
    num_bins: int,
    seed: int,
) -> dict[str, Any]:
    """Counterfactual consistency (:func:`~monai_cf.metrics.counterfactual_consistency`) of the accumulated run.

    Args:
        graph: the causal graph.
        acc: the accumulated interventions, counterfactual outputs and labels (and the truth on the phantom).
        intervened: the attributes intervened on.
        cf_types: the counterfactual types.
        labels: the test labels ``{name: (N,)}``.
        real_outputs: the predictor's outputs on the real test images.
        observational_data: the values the bounds are computed from (default, when ``None`` or empty: the
            test labels).
        num_bins: quantile bins per continuous attribute.
        seed: seeds the metric's resampling.

    Returns:
        The ``consistency`` section.

    Example::

        table = consistency_results(graph, acc, ["sex"], ["soft"], labels, real_outputs, None, 3, 0)
        table["outside"]["soft"]["scm"]  # 0
    """
    observational = observational_data or {n: v.numpy() for n, v in labels.items()}
    truth = None
    if acc.true_attributes:
        truth = {k: {n: torch.cat(v).numpy() for n, v in by_name.items()} for k, by_name in acc.true_attributes.items()}
    return counterfactual_consistency(
        graph,
        observational,
        {n: v.numpy() for n, v in labels.items()},
        {k: torch.cat(v).numpy() for k, v in acc.interventions.items()},
        real_outputs,
        {c: {k: cat_values(acc.cf_outputs[c][k]) for k in intervened} for c in cf_types},
        {
            c: {k: {n: v.numpy() for n, v in cat_values(acc.cf_labels[c][k]).items()} for k in intervened}
            for c in cf_types
        },
        truth=truth,
        truth_outputs={k: cat_values(v) for k, v in acc.true_outputs.items()} or None,
        num_bins=num_bins,
        seed=seed,
    )


def embedding_results(
    graph: CausalGraph,
    acc: EvaluationAccumulator,
    intervened: Sequence[str],
    cf_types: Sequence[str],
    labels: Mapping[str, torch.Tensor],
    num_modes: int,
    seed: int,
    figure_modes: int = FIGURE_MODES,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The embedding shift (Fig. 2): W1 distances of real and counterfactual embeddings along PCA modes.

    The PCA is fitted on the real features; the metric uses the leading ``num_modes`` modes, the figures the
    most separating of the leading ``max(num_modes, figure_modes)`` modes per unintervened discrete attribute.

    Args:
        graph: the causal graph.
        acc: the accumulated real and counterfactual features and counterfactual labels.
        intervened: the attributes intervened on.
        cf_types: the counterfactual types.
        labels: the test labels ``{name: (N,)}``.
        num_modes: leading PCA modes of the metric.
        seed: seeds the PCA.
        figure_modes: leading PCA modes the figures choose from.

    Returns:
        ``(section, figure)``: the ``embedding_shift`` section and the embedding figures' data
        (``{attribute: {...}}``); ``({}, None)`` with fewer than three feature rows.

    Example::

        section, figure = embedding_results(graph, acc, ["sex"], ["soft"], labels, num_modes=3, seed=0)
        section["mean"]  # {"soft": 0.02}
    """
    if not acc.real_features:
        return {}, None
    real_features = torch.cat(acc.real_features)
    n = real_features.shape[0]
    if n < 3:
        return {}, None
    # the metric uses the leading num_modes; the figures may show a later mode that separates an attribute
    pca = EmbeddingPCA(max(num_modes, figure_modes), seed=seed).fit(real_features)
    real_all = pca.transform(real_features)
    real = real_all[:, :num_modes]
    projections_all = {
        cf_type: {k: pca.transform(torch.cat(acc.cf_features[cf_type][k])) for k in intervened} for cf_type in cf_types
    }
    projections = {c: {k: v[:, :num_modes] for k, v in by_do.items()} for c, by_do in projections_all.items()}
    shifts: dict[str, Any] = {}
    collected: dict[str, list[float]] = {cf_type: [] for cf_type in cf_types}
    cf_groups: dict[str, dict[str, dict[str, np.ndarray]]] = {}  # attribute -> cf type -> k -> subgroups
    for k in intervened:
        shifts[k] = {}
        targets = [j for j in graph.image_parents if j in graph.soft_target_set([k])]
        targets = [j for j in targets if graph[j].is_discrete]
        for cf_type in cf_types:
            shifts[k][cf_type] = {}
            cf_labels = cat_values(acc.cf_labels[cf_type][k])
            for j in targets:
                names = graph[j].class_names
                groups = cf_labels[j][:n].numpy()
                by_group = subgroup_shift(real, projections[cf_type][k], labels[j][:n].numpy(), groups, len(names))
                shifts[k][cf_type][j] = {
                    names[g]: {"modes": values, "mean": float(np.mean(values))} for g, values in by_group.items()
                }
                collected[cf_type] += [float(np.mean(v)) for v in by_group.values()]
                cf_groups.setdefault(j, {}).setdefault(cf_type, {})[k] = groups
    modes, figure = {}, {}
    for j, by_type in cf_groups.items():
        names = list(graph[j].class_names)
        real_groups = labels[j][:n].numpy()
        mode, eta2 = separating_mode(real_all, real_groups)
        modes[j] = {"mode": mode + 1, "eta2": eta2}
        figure[j] = {
            "real": real_all[:, mode],
            "real_groups": real_groups,
            "group_names": names,
            "mode": mode + 1,
            "eta2": eta2,
            "counterfactuals": {},
            "distances": {},
        }
        for cf_type, by_do in by_type.items():
            for k, groups in by_do.items():
                values = projections_all[cf_type][k][:, mode]
                figure[j]["counterfactuals"].setdefault(cf_type, {})[f"do({k})"] = (values, groups)
                by_group = subgroup_shift(
                    real_all[:, mode : mode + 1], values[:, None], real_groups, groups, len(names)
                )
                figure[j]["distances"].setdefault(cf_type, {})[f"do({k})"] = {g: v[0] for g, v in by_group.items()}
    section = {
        "num_samples": n,
        "explained_variance_ratio": pca.explained_variance_ratio[:num_modes],
        "mean": {cf_type: finite_mean(v) for cf_type, v in collected.items()},
        "figure_modes": modes,
        "shifts": shifts,
    }
    return section, figure


def realism_results(acc: EvaluationAccumulator, intervened: Sequence[str], cf_types: Sequence[str]) -> dict[str, Any]:
    """FID of the counterfactuals against the real images, on the predictor's features.

    Returns:
        ``{"num_samples", "fid": {cf type: pooled FID}, "fid_by_intervention": {k: {cf type: FID}},
        "fid_real_halves"}`` (the last: two halves of the real set, the value sampling noise alone gives), or
        ``{}`` without features.

    Example::

        realism_results(acc, ["sex", "age"], ["soft"])["fid"]  # {"soft": 3.1}
    """
    if not acc.real_features:
        return {}
    real = torch.cat(acc.real_features)
    half = real.shape[0] // 2
    by_do = {
        k: {cf_type: frechet_distance(real, torch.cat(acc.cf_features[cf_type][k])) for cf_type in cf_types}
        for k in intervened
    }
    pooled = {
        cf_type: frechet_distance(real, torch.cat([torch.cat(acc.cf_features[cf_type][k]) for k in intervened]))
        for cf_type in cf_types
    }
    return {
        "num_samples": int(real.shape[0]),
        "fid": pooled,
        "fid_by_intervention": by_do,
        # two halves of the real set: the value sampling noise alone gives at this size
        "fid_real_halves": frechet_distance(real[:half], real[half:]),
    }


def utility_results(
    graph: CausalGraph,
    images: torch.Tensor,
    attributes: Mapping[str, torch.Tensor],
    runners: Mapping[str, CounterfactualRunner],
    test_batches: Iterable[tuple[torch.Tensor, Mapping[str, torch.Tensor]]],
    train_predictor_fn: Callable[[torch.Tensor, Mapping[str, torch.Tensor]], nn.Module],
    intervened: Sequence[str],
    intervention_pool: Mapping[str, np.ndarray],
    min_gap: float,
    seed: int,
    batch_size: int,
    device: torch.device | str | None,
) -> dict[str, Any]:
    """The utility of counterfactuals as training data (Table 2).

    One predictor is trained on the real training images, and one per intervention and CF type on their
    counterfactuals only (one forced-change draw per image, seeded by ``seed + 1``); all are scored on the test
    batches.

    Args:
        graph: the causal graph.
        images: the training images ``(N, C, *spatial)``, on the CPU.
        attributes: their canonical attributes ``{name: (N,)}``.
        runners: ``{cf type: runner}``, in the order of the results.
        test_batches: ``(x, pa)`` test batches, iterated once after every predictor is trained (a generator
            defers loading until then).
        train_predictor_fn: ``(images, attributes) -> predictor``.
        intervened: the attributes intervened on.
        intervention_pool: ``{attribute: values}`` continuous interventions draw from (default: the training
            values).
        min_gap: smallest change of a continuous intervention, as a fraction of the range.
        seed: the evaluation seed (the draws use ``seed + 1``).
        batch_size: images per counterfactual call.
        device: where the counterfactuals are computed.

    Returns:
        ``{"num_train_samples", "baseline": performance, "by_training_set": {k: {cf type: performance}}}``.

    Example::

        section = utility_results(graph, images, attributes, runners, batches, train_fn, ["sex"], {}, 0.1, 0, 64, "cpu")
        section["by_training_set"]["sex"]["soft"]  # {"sex": 0.93, ...}
    """
    rng = np.random.default_rng(seed + 1)
    predictors: dict[tuple[str, str], nn.Module] = {("real", "real"): train_predictor_fn(images, attributes)}
    for k in intervened:
        pool = intervention_pool.get(k, attributes[k].numpy())
        values = torch.as_tensor(draw_intervention_values(graph, k, attributes[k].numpy(), rng, pool, min_gap)).to(
            attributes[k].dtype
        )
        for cf_type, runner in runners.items():
            cf_images, cf_attributes = [], {n: [] for n in graph.attributes}
            with eval_mode(*runner.modules):
                for start in range(0, images.shape[0], batch_size):
                    rows = slice(start, start + batch_size)
                    x = images[rows].to(device)
                    pa = {n: v[rows].to(device) for n, v in attributes.items()}
                    x_cf, pa_cf = runner(x, pa, {k: values[rows].to(device)})
                    cf_images.append(x_cf.cpu())
                    for n in graph.attributes:
                        cf_attributes[n].append(pa_cf[n].cpu())
            predictors[(k, cf_type)] = train_predictor_fn(
                torch.cat(cf_images), {n: torch.cat(v) for n, v in cf_attributes.items()}
            )
    outputs: dict[tuple[str, str], dict[str, list[torch.Tensor]]] = {key: {} for key in predictors}
    labels: dict[str, list[torch.Tensor]] = {}
    with eval_mode(*predictors.values()):
        for x, pa in test_batches:
            for name in graph.attributes:
                append_nested(labels, [name], pa[name])
            for key, predictor in predictors.items():
                for name, value in predictor(x).items():
                    append_nested(outputs[key], [name], value)
    labels_cat = cat_values(labels)
    performance = {key: attribute_performance(graph, cat_values(out), labels_cat) for key, out in outputs.items()}
    return {
        "num_train_samples": int(images.shape[0]),
        "baseline": performance[("real", "real")],
        "by_training_set": {k: {cf_type: performance[(k, cf_type)] for cf_type in runners} for k in intervened},
    }


def example_figure_data(graph: CausalGraph, examples: Mapping[str, Any]) -> dict[str, Any]:
    """The counterfactual grids' data: the first test images, their counterfactuals, the truth and captions.

    Args:
        graph: the causal graph.
        examples: what the evaluator kept of its first batch: ``images``, ``factual`` attributes,
            ``counterfactuals`` and their ``labels`` per CF type and intervention, and the phantom's ``truth``.

    Returns:
        ``{"images", "row_labels", "counterfactuals", "panel_titles", "truth"}`` keyed by ``"do(k)"`` (see
        :func:`~monai_cf.handlers.report.save_evaluation_figures`), or ``{}`` without examples.

    Example::

        grid = example_figure_data(graph, evaluator_examples)
        grid["panel_titles"]["soft"]["do(sex)"][0]  # "do(sex=female)"
    """
    ex = examples
    if "images" not in ex:
        return {}
    n = ex["images"].shape[0]

    def describe(values: Mapping[str, torch.Tensor], i: int) -> str:
        parts = []
        for name in graph.attributes:
            value = values[name][i]
            parts.append(graph[name].class_names[int(value)] if graph[name].is_discrete else f"{float(value):.0f}")
        half = (len(parts) + 1) // 2  # two lines, so the label fits above a small panel
        return ", ".join(parts[:half]) + "\n" + ", ".join(parts[half:])

    titles: dict[str, dict[str, list[str]]] = {}
    for cf_type, by_do in ex["labels"].items():
        titles[cf_type] = {}
        for k, values in by_do.items():
            row = []
            for i in range(n):
                value = values[k][i]
                shown = graph[k].class_names[int(value)] if graph[k].is_discrete else f"{float(value):.0f}"
                changed = [
                    d for d in sorted(graph.descendants([k])) if float(values[d][i]) != float(ex["factual"][d][i])
                ]
                row.append(f"do({k}={shown})" + (f"\n{', '.join(changed)} changed" if changed else ""))
            titles[cf_type][f"do({k})"] = row
    return {
        "images": ex["images"],
        "row_labels": [describe(ex["factual"], i) for i in range(n)],
        "counterfactuals": {
            cf_type: {f"do({k})": v for k, v in by_do.items()} for cf_type, by_do in ex["counterfactuals"].items()
        },
        "panel_titles": titles,
        "truth": {f"do({k})": v for k, v in ex.get("truth", {}).items()},
    }
