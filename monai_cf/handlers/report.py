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
"""The evaluation report: ``metrics.json``, ``report.md`` with tables laid out like the Soft-CFT paper's, PNG
figures, and their logging to MLflow as artifacts.

:class:`CounterfactualReportWriter` is an Ignite handler for :class:`~monai_cf.engines.CounterfactualEvaluator`
(it runs when the evaluation completes); the functions below do the same from a results dictionary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_cf.handlers.tracking import check_tracking_uri

__all__ = [
    "CounterfactualReportWriter",
    "format_report",
    "write_metrics_json",
    "save_evaluation_figures",
    "write_evaluation_outputs",
    "log_evaluation_to_mlflow",
    "json_ready",
    "flatten_results",
]

logger = logging.getLogger("monai_cf.handlers")

_CF_TYPE_NAMES = {"none": "No CFT", "hard": "Hard-CFT", "soft": "Soft-CFT"}
_MLFLOW_BATCH = 1000


def _cf_name(cf_type: str) -> str:
    return _CF_TYPE_NAMES.get(cf_type, cf_type)


def json_ready(value: Any) -> Any:
    """A copy of ``value`` that ``json.dump(..., allow_nan=False)`` accepts: non-finite floats become ``None``,
    tensors and arrays lists, tuples lists, keys strings.

    Example::

        json_ready({"auc": float("nan"), 1: np.float32(0.5)})  # {"auc": None, "1": 0.5}
    """
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return json_ready(np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value).tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def write_metrics_json(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the results as strict JSON (``NaN`` -> ``null``), atomically.

    Example::

        write_metrics_json(evaluator.results, "eval/metrics.json")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(json_ready(results), handle, indent=2, allow_nan=False)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------- report.md
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _change(value: Any, base: Any, scale: float) -> str:
    if not _finite(value):
        return "n/a"
    text = f"{scale * value:.1f}"
    if not _finite(base):
        return text
    delta = round(scale * (value - base), 1)
    arrow = "·" if delta == 0 else ("↑" if delta > 0 else "↓")
    return f"{text} ({arrow} {abs(delta):.1f})"


def _plain(value: Any, digits: int = 2, scale: float = 1.0) -> str:
    if not _finite(value):
        return "n/a"
    text = f"{scale * value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.0"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _attribute_columns(config: Mapping[str, Any], baseline: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    names = [n for n in config.get("image_parents", baseline) if n in baseline]
    kinds = config.get("attribute_kinds", {})
    header = [f"{n} (MAE)" if kinds.get(n) == "continuous" else n for n in names]
    return names, header


def _effect_rows(
    baseline: Mapping[str, Any],
    by_do: Mapping[str, Mapping[str, Mapping[str, Any]]],
    names: Sequence[str],
    kinds: Mapping[str, str],
    first_column: str,
    bold_intervened: bool,
) -> list[list[str]]:
    def scale(n: str) -> float:
        return 1.0 if kinds.get(n) == "continuous" else 100.0

    rows = [["None" if first_column == "Intervention" else "Original", "Real images"]]
    rows[0] += [_plain(baseline.get(n), 1, scale(n)) for n in names]
    for k, by_type in by_do.items():
        for i, (cf_type, scores) in enumerate(by_type.items()):
            label = (f"do({k})" if first_column == "Intervention" else f"{k} CFs") if i == 0 else ""
            cells = []
            for n in names:
                cell = _change(scores.get(n), baseline.get(n), scale(n))
                cells.append(f"**{cell}**" if bold_intervened and n == k else cell)
            rows.append([label, _cf_name(cf_type), *cells])
    return rows


def format_report(results: Mapping[str, Any], figures: Sequence[str | os.PathLike] = ()) -> str:
    """The Markdown report of an evaluation's results (see :class:`~monai_cf.engines.CounterfactualEvaluator`).

    Table 1 (effectiveness and amplification) and Table 2 (utility) follow the paper's layout: one row per
    intervention and CF type, one column per attribute, AUC in % (MAE in original units for continuous
    attributes) with the change from the real-image baseline in brackets; the intervened attribute is in
    bold. Further tables give amplification, composition, reversibility, ground truth, embedding shift,
    realism and timing; ``figures`` (file names next to the report) are embedded at the end.

    Example::

        text = format_report(evaluator.results, ["counterfactuals_soft.png"])
    """
    config = results.get("config", {})
    kinds = config.get("attribute_kinds", {})
    baseline = results.get("baseline", {})
    names, header = _attribute_columns(config, baseline)
    cf_types = list(config.get("cf_types", results.get("amplification", {})))
    lines = ["# Counterfactual evaluation report", ""]
    lines.append(
        f"{config.get('num_samples', '?')} test samples; CF types: {', '.join(_cf_name(c) for c in cf_types)}; "
        f"interventions: {', '.join(f'do({k})' for k in config.get('interventions', []))}; "
        f"seed {config.get('seed', '?')}. AUC in %, MAE in original units; in brackets the change from the "
        "real-image baseline. Evaluation predictor trained on real images."
    )
    lines += ["", "## Table 1: effectiveness and amplification (evaluation predictor tested on counterfactuals)", ""]
    lines += _table(
        ["Intervention", "CF type", *header],
        _effect_rows(baseline, results.get("effectiveness", {}), names, kinds, "Intervention", True),
    )
    lines += ["", "Bold: the intervened attribute (effectiveness). Other columns of attributes that do not descend "]
    lines[-1] += "from the intervention should stay at the baseline; an increase is attribute amplification."

    lines += _faithfulness_lines(results, cf_types)
    lines += _consistency_lines(results, cf_types)

    amp = results.get("amplification", {})
    amp_continuous = results.get("amplification_continuous", {})
    shift = results.get("logit_shift", {})
    signed = results.get("label_logit_shift", {})
    has_continuous = any(_finite(v) for v in amp_continuous.values())
    lines += ["", "## Amplification", ""]
    header = ["CF type", "Amplification (mean AUC change, % points)"]
    header += ["Continuous: mean MAE change (× real MAE)"] if has_continuous else []
    header += ["Mean |log-odds| shift", "Log-odds shift to label"]
    rows = []
    for c in cf_types:
        row = [_cf_name(c), _plain(amp.get(c), 2, 100.0)]
        row += [_plain(amp_continuous.get(c), 3)] if has_continuous else []
        rows.append(row + [_plain(shift.get(c), 3), _plain(signed.get(c), 3)])
    lines += _table(header, rows)
    lines += [
        "",
        "Means over every intervention and unintervened discrete attribute; log-odds shifts are paired "
        "(counterfactual minus its real image) from the evaluation predictor."
        + (
            " Continuous unintervened attributes: the change of their MAE on counterfactuals in units of the "
            "real-image MAE (0: read as on real images)."
            if has_continuous
            else ""
        ),
    ]
    detail = results.get("amplification_detail", {})
    rows = []
    for k, by_type in detail.items():
        for c, deltas in by_type.items():
            cells = ", ".join(f"{j} {_plain(v, 1, 100.0)}" for j, v in deltas.items())
            rows.append([f"do({k})", _cf_name(c), cells or "-"])
    if rows:
        lines += ["", "Terms (AUC change in % points on the unintervened attributes):", ""]
        lines += _table(["Intervention", "CF type", "AUC_cf - AUC_real"], rows)

    utility = results.get("utility")
    if utility:
        lines += ["", "## Table 2: utility (predictors trained on counterfactuals only, tested on real images)", ""]
        lines += _table(
            ["Training set", "CF type", *header],
            _effect_rows(utility["baseline"], utility["by_training_set"], names, kinds, "Training set", False),
        )

    composition = results.get("composition", {})
    if composition:
        cycles = [str(m) for m in config.get("composition_cycles", [])] or sorted(
            {m for v in composition.values() for m in v}, key=int
        )
        lines += ["", "## Composition (null intervention applied m times; L1 on [0, 255])", ""]
        lines += _table(
            ["CF type", *[f"m = {m}" for m in cycles]],
            [[_cf_name(c), *[_plain(composition[c].get(m), 2) for m in cycles]] for c in composition],
        )
    reversibility = results.get("reversibility", {})
    if reversibility:
        lines += ["", "## Reversibility (do(a') then do(a) back; L1 on [0, 255])", ""]
        lines += _table(
            ["Intervention", *[_cf_name(c) for c in cf_types]],
            [[f"do({k})", *[_plain(v.get(c), 2) for c in cf_types]] for k, v in reversibility.items()],
        )
    truth = results.get("ground_truth", {})
    if truth:
        lines += ["", "## Ground truth (phantom: distance to the true counterfactual)", ""]
        rows = []
        for k, by_type in truth.items():
            for i, (c, entry) in enumerate(by_type.items()):
                descendants = ", ".join(f"{d} {_plain(v, 3)}" for d, v in entry.get("descendants", {}).items())
                rows.append(
                    [
                        f"do({k})" if i == 0 else "",
                        _cf_name(c),
                        _plain(entry.get("l1"), 2),
                        _plain(entry.get("psnr"), 1),
                        _plain(entry.get("ssim"), 3),
                        descendants or "-",
                    ]
                )
        lines += _table(
            ["Intervention", "CF type", "L1 [0, 255]", "PSNR (dB)", "SSIM", "descendants (agreement / MAE)"], rows
        )
    embedding = results.get("embedding_shift", {})
    if embedding:
        ratio = ", ".join(f"{100 * v:.1f}%" for v in embedding.get("explained_variance_ratio", []))
        lines += ["", "## Embedding shift (W1 along whitened PCA modes of the evaluation predictor's features)", ""]
        lines.append(
            f"{embedding.get('num_samples')} samples; modes explain {ratio} of the variance. W1 in units of the "
            "mode's standard deviation on real images, averaged over the modes; 0 = no shift."
        )
        lines.append("")
        lines += _table(
            ["CF type", "Mean W1"], [[_cf_name(c), _plain(v, 3)] for c, v in embedding.get("mean", {}).items()]
        )
        rows = []
        for k, by_type in embedding.get("shifts", {}).items():
            for i, (c, by_attr) in enumerate(by_type.items()):
                cells = "; ".join(
                    f"{j}: " + ", ".join(f"{g} {_plain(e['mean'], 2)}" for g, e in groups.items())
                    for j, groups in by_attr.items()
                )
                rows.append([f"do({k})" if i == 0 else "", _cf_name(c), cells or "-"])
        lines += ["", "Per subgroup of each unintervened attribute:", ""]
        lines += _table(["Intervention", "CF type", "W1 per subgroup"], rows)
    realism = results.get("realism", {})
    if realism:
        lines += ["", "## Realism (FID on evaluation-predictor features)", ""]
        by_do = realism.get("fid_by_intervention", {})
        lines += _table(
            ["CF type", "FID (all interventions)", *[f"do({k})" for k in by_do]],
            [
                [_cf_name(c), _plain(v, 2), *[_plain(by_do[k].get(c), 2) for k in by_do]]
                for c, v in realism.get("fid", {}).items()
            ],
        )
        lines += [
            "",
            f"Reference: FID between two halves of the real test set = {_plain(realism.get('fid_real_halves'))}.",
        ]
    timing = results.get("timing", {})
    if timing:
        lines += ["", "## Timing", ""]
        stages = [[stage, _plain(seconds, 2)] for stage, seconds in timing.get("stages", {}).items()]
        lines += _table(["Stage", "Seconds"], [*stages, ["total", _plain(timing.get("total_s"), 2)]])
        if _finite(timing.get("images_per_s")):
            lines += ["", f"Counterfactual generation: {timing['images_per_s']:.1f} images/s."]
    if figures:
        lines += ["", "## Figures", ""]
        for figure in figures:
            name = Path(figure).name
            lines += [f"![{Path(name).stem}]({name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _faithfulness_lines(results: Mapping[str, Any], cf_types: Sequence[str]) -> list[str]:
    """The truth-gain table (ground truth only) and the effectiveness excess of every intervention."""
    lines: list[str] = []
    faithfulness = results.get("faithfulness") or {}
    truth = results.get("ground_truth", {})
    gains = faithfulness.get("truth_gain", {})
    if gains:
        unchanged = faithfulness.get("unchanged_l1", {})
        lines += ["", "## Faithfulness (phantom: the edit against the true counterfactual)", ""]
        header = ["Intervention", "Unchanged image L1"]
        header += [f"{_cf_name(c)} L1 / truth gain" for c in cf_types]
        rows = []
        for k, by_type in gains.items():
            cells = [
                f"{_plain(truth.get(k, {}).get(c, {}).get('l1'), 2)} / {_plain(by_type.get(c), 2)}" for c in cf_types
            ]
            rows.append([f"do({k})", _plain(unchanged.get(k), 2), *cells])
        means = faithfulness.get("truth_gain_mean", {})
        rows.append(["mean truth gain", "", *[_plain(means.get(c), 2) for c in cf_types]])
        lines += _table(header, rows)
        lines += [
            "",
            "L1 on [0, 255] to the phantom's true counterfactual. Truth gain = 1 - L1(x*, x_true) / L1(x, x_true): "
            "0 is no better than leaving the image unchanged, 1 is exact, negative moves away from the truth.",
        ]
    excess = results.get("effectiveness_excess", {})
    if excess:
        kinds = results.get("config", {}).get("attribute_kinds", {})
        lines += ["", "Effectiveness excess on the intervened attribute (counterfactuals minus real images):", ""]
        rows = []
        for k, by_type in excess.items():
            continuous = kinds.get(k) == "continuous"
            unit = "× real MAE" if continuous else "AUC % points"
            cells = [_plain(by_type.get(c), 2 if continuous else 1, 1.0 if continuous else 100.0) for c in cf_types]
            rows.append([f"do({k})", unit, *cells])
        lines += _table(["Intervention", "Unit", *[_cf_name(c) for c in cf_types]], rows)
        lines += [
            "",
            "Discrete: a positive AUC excess means counterfactuals are read more confidently than real images (an "
            "exaggerated edit). Continuous: the MAE change in units of the real-image MAE (negative: exaggerated).",
        ]
    return lines


def _consistency_lines(results: Mapping[str, Any], cf_types: Sequence[str]) -> list[str]:
    """The counterfactual-consistency table: bounds, truth and each CF type's estimates of P(attribute changes)."""
    table = results.get("consistency") or {}
    summary = table.get("summary", {})
    if not summary:
        return []

    def mark(value: Any, inside: Any) -> str:
        if not _finite(value):
            return "n/a"
        return f"{value:.3f} {'✓' if inside else '✗'}"

    has_truth = any("truth" in row for by_a in summary.values() for row in by_a.values())
    truth_images = any("truth_images" in row for by_a in summary.values() for row in by_a.values())
    truth_header = "Truth: images / attributes" if truth_images else "Truth"
    header = ["Intervention", "Attribute", "Bounds", *([truth_header] if has_truth else []), "Reading cal. error"]
    header += [f"{_cf_name(c)}: images / model" for c in cf_types]
    rows = []
    calibration = table.get("calibration_error", {})
    for k, by_a in summary.items():
        for i, (a, row) in enumerate(by_a.items()):
            lower, upper = row.get("lower"), row.get("upper")
            bounds = (
                _plain(lower, 3) if _finite(lower) and lower == upper else f"[{_plain(lower, 3)}, {_plain(upper, 3)}]"
            )
            cells = [f"do({k})" if i == 0 else "", a, bounds]
            if has_truth:
                truth = mark(row.get("truth"), row.get("truth_inside"))
                if truth_images:
                    truth = f"{mark(row.get('truth_images'), row.get('truth_images_inside'))} / {truth}"
                cells.append(truth)
            cells.append(_plain(calibration.get(k, {}).get(a), 3))
            for c in cf_types:
                entry = row.get(c, {})
                cells.append(
                    f"{mark(entry.get('images'), entry.get('images_inside'))} / "
                    f"{mark(entry.get('scm'), entry.get('scm_inside'))}"
                )
            rows.append(cells)
    config = table.get("config", {})
    lines = ["", "## Counterfactual consistency (bounds from the graph and the observational data)", ""]
    lines += _table(header, rows)
    outside = table.get("outside", {})
    verdicts = [
        f"{_cf_name(c)}: images {outside[c].get('images', 0)}, model {outside[c].get('scm', 0)}"
        for c in cf_types
        if c in outside
    ]
    if "truth" in outside:
        verdicts.append(
            f"truth: images {outside['truth'].get('images', 0)}, attributes {outside['truth'].get('scm', 0)}"
        )
    cells = table.get("cells", [])
    detail = {}
    for row in cells:
        if row.get("cell") == "all":
            continue
        if row.get("truth_images_inside") is False:
            detail.setdefault("truth (images)", set()).add(f"do({row['intervention']}) → {row['attribute']}")
        for c, entry in row.get("estimates", {}).items():
            for source in ("images", "scm"):
                if entry.get(f"{source}_inside") is False:
                    detail.setdefault(c, set()).add(f"do({row['intervention']}) → {row['attribute']}")
    lines += [
        "",
        "P(the attribute's level changes) under the evaluator's interventions, over all test units (continuous "
        f"attributes in {config.get('num_bins', '?')} quantile bins). Bounds: a point for the intervened attribute "
        "and its non-descendants, an interval from linear programming over response functions for descendants. "
        "Images: the evaluation predictor's reading of the counterfactuals, adjusted for its confusion on real "
        "images of the same context (the intervened attribute, and the read attribute's causal neighbours); model: "
        "the DSCM's own counterfactual attributes; truth (phantom): the true counterfactual images read the same way "
        "(a test of the reading), and the true counterfactual attributes. ✓ inside, ✗ outside the bounds, with a "
        f"tolerance of {config.get('z', '?')} standard errors (estimate and bounds) plus, for images, the reading's "
        "calibration error (its error on real images, which do not change).",
        "",
        f"Rows outside their bounds: {'; '.join(verdicts)}.",
    ]
    if detail:
        lines += [
            "Cells (factual levels of the intervened attribute and of the attribute) outside: "
            + "; ".join(f"{_cf_name(c)}: {', '.join(sorted(v))}" for c, v in detail.items())
            + " (every cell in `metrics.json`, `consistency.cells`)."
        ]
    return lines


# ---------------------------------------------------------------------------------------------- figures
def save_evaluation_figures(figure_data: Mapping[str, Any], output_dir: str | os.PathLike) -> list[Path]:
    """Counterfactual grids (one per CF type, plus the true counterfactuals on the phantom) and embedding-mode
    plots (one per unintervened discrete attribute) from an evaluator's ``figure_data``.

    The grids share one difference-map colour scale, so CF types can be compared by eye.

    Example::

        save_evaluation_figures(evaluator.figure_data, "eval")  # [eval/counterfactuals_soft.png, ...]
    """
    from monai_cf.visualize import plot_counterfactual_grid, plot_embedding_modes

    output_dir = Path(output_dir)
    written: list[Path] = []
    examples = figure_data.get("examples") or {}
    if examples:
        images = examples["images"]
        panels = dict(examples["counterfactuals"])
        if examples.get("truth"):
            panels["ground_truth"] = examples["truth"]
        limit = max([float((v - images).abs().max()) for by_do in panels.values() for v in by_do.values()] + [1e-3])
        for cf_type, by_do in panels.items():
            is_truth = cf_type == "ground_truth"
            titles = examples["panel_titles"].get(next(iter(examples["counterfactuals"]))) if is_truth else None
            title = "True counterfactuals (phantom)" if is_truth else f"Counterfactuals: {_cf_name(cf_type)}"
            written.append(
                plot_counterfactual_grid(
                    output_dir / f"counterfactuals_{_slug(cf_type)}.png",
                    images,
                    by_do,
                    panel_titles=titles if is_truth else examples["panel_titles"].get(cf_type),
                    row_labels=examples.get("row_labels"),
                    diff_limit=limit,
                    title=f"{title}; second rows: x* - x (colour scale ±{limit:.2f})",
                )
            )
    for attribute, plot in (figure_data.get("embedding") or {}).items():
        counterfactuals = {_cf_name(c): v for c, v in plot["counterfactuals"].items()}
        distances = {_cf_name(c): v for c, v in plot["distances"].items()}
        written.append(
            plot_embedding_modes(
                output_dir / f"embedding_{_slug(attribute)}.png",
                plot["real"],
                plot["real_groups"],
                counterfactuals,
                plot["group_names"],
                mode_label=f"PCA mode {plot['mode']} (whitened)",
                distances=distances,
                title=f"Subgroups of {attribute} along PCA mode {plot['mode']} "
                f"(separates {attribute}: eta²={plot['eta2']:.2f}); blue real, red counterfactual",
            )
        )
    return written


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


# ---------------------------------------------------------------------------------------------- MLflow
def flatten_results(results: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a results dictionary as ``{"amplification/hard": 0.03, ...}`` (``config`` and
    ``timing`` left out), with names MLflow accepts: for ``engine.state.metrics`` and MLflow metrics.

    Example::

        flatten_results({"amplification": {"hard": 0.03}, "timing": {"total_s": 9.0}})  # {"amplification/hard": 0.03}
    """
    flat: dict[str, float] = {}
    for key, value in results.items():
        if key in ("config", "timing") and not prefix:
            continue
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_results(value, path + "/"))
        elif _finite(value):
            # MLflow metric names allow letters, digits, "_", "-", ".", " ", ":" and "/"
            flat[re.sub(r"[^A-Za-z0-9_\-. :/]+", "_", path)] = float(value)
    return flat


def log_evaluation_to_mlflow(
    paths: Sequence[str | os.PathLike],
    results: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    artifact_path: str = "evaluation",
) -> bool:
    """Log files as MLflow artifacts (and the results' scalars as metrics) to a run.

    The run is ``run_id`` on ``tracking_uri`` when given, else the active MLflow run; with neither, nothing
    is logged. MLflow 3 refuses file stores, so ``tracking_uri`` must be a ``sqlite:///...`` URI (or a remote
    server, see :func:`~monai_cf.handlers.tracking.check_tracking_uri`).

    Returns:
        Whether anything was logged.

    Example::

        with mlflow.start_run():
            log_evaluation_to_mlflow(["eval/metrics.json", "eval/report.md"], results)
    """
    if tracking_uri is not None:
        tracking_uri = check_tracking_uri(tracking_uri)
    if tracking_uri is None and run_id is None:
        mlflow = sys.modules.get("mlflow")  # no import: without mlflow loaded no run can be active
        if mlflow is None or mlflow.active_run() is None:
            return False
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            logger.warning(
                "MLflow: tracking URI %s given without a run id and no run is active; not logged.", tracking_uri
            )
            return False
        run_id = active.info.run_id
        client = MlflowClient(tracking_uri or mlflow.get_tracking_uri())
    else:
        client = MlflowClient(tracking_uri)
    for path in paths:
        client.log_artifact(run_id, os.fspath(path), artifact_path)
    if results:
        stamp = int(time.time() * 1000)
        metrics = [Metric(key, value, stamp, 0) for key, value in flatten_results(results).items()]
        for start in range(0, len(metrics), _MLFLOW_BATCH):
            client.log_batch(run_id, metrics=metrics[start : start + _MLFLOW_BATCH])
    return True


# ---------------------------------------------------------------------------------------------- all outputs
def write_evaluation_outputs(
    results: dict[str, Any],
    output_dir: str | os.PathLike,
    figure_data: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    artifact_path: str = "evaluation",
) -> dict[str, Any]:
    """Write figures, ``report.md`` and ``metrics.json`` into ``output_dir``; log them to MLflow when a run is
    active or ``tracking_uri``/``run_id`` name one. The seconds spent on figures join ``results["timing"]``.

    Returns:
        ``{"metrics": path, "report": path, "figures": [paths], "mlflow": bool}``.

    Example::

        write_evaluation_outputs(evaluator.results, "eval", evaluator.figure_data)
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    figures = save_evaluation_figures(figure_data or {}, output_dir)
    seconds = time.perf_counter() - start
    timing = results.setdefault("timing", {"total_s": 0.0, "stages": {}})
    timing.setdefault("stages", {})["figures"] = seconds
    timing["total_s"] = float(timing.get("total_s") or 0.0) + seconds
    report = output_dir / "report.md"
    report.write_text(format_report(results, figures))
    metrics = write_metrics_json(results, output_dir / "metrics.json")
    logged = log_evaluation_to_mlflow([metrics, report, *figures], results, tracking_uri, run_id, artifact_path)
    logger.info("Wrote %s, %s and %d figures to %s.", metrics.name, report.name, len(figures), output_dir)
    return {"metrics": metrics, "report": report, "figures": figures, "mlflow": logged}


class CounterfactualReportWriter:
    """Ignite handler: when a :class:`~monai_cf.engines.CounterfactualEvaluator` completes, write its
    ``metrics.json``, ``report.md`` and figures into ``output_dir`` and log them to MLflow.

    Only rank 0 writes. The written paths are kept in ``self.outputs``.

    Args:
        output_dir: the folder to write into (created if missing).
        tracking_uri: MLflow tracking URI (``sqlite:///...``); with ``run_id``, the run to log to.
        run_id: MLflow run id; default: the active run, if any (nothing is logged without one).
        artifact_path: the artifact folder inside the run.

    Example::

        CounterfactualReportWriter("eval", tracking_uri="sqlite:///mlruns.db", run_id=run.info.run_id).attach(evaluator)
        evaluator.run()
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        tracking_uri: str | None = None,
        run_id: str | None = None,
        artifact_path: str = "evaluation",
    ) -> None:
        self.tracking_uri = None if tracking_uri is None else check_tracking_uri(tracking_uri)
        self.output_dir = Path(output_dir)
        self.run_id = run_id
        self.artifact_path = artifact_path
        self.outputs: dict[str, Any] = {}

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        if getattr(engine.state, "rank", 0) != 0:
            return
        self.outputs = write_evaluation_outputs(
            engine.results,
            self.output_dir,
            getattr(engine, "figure_data", None),
            self.tracking_uri,
            self.run_id,
            self.artifact_path,
        )
