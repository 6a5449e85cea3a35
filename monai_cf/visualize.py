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
"""Figures of counterfactual evaluations.

- :func:`plot_counterfactual_grid`: factual images and their counterfactuals with the direct effects
  ``x* - x`` underneath on a diverging colour map (Fig. 1 of the Soft-CFT paper);
- :func:`plot_embedding_modes`: distributions of real and counterfactual images along a PCA mode of the
  evaluation predictor's embedding, one ridge per subgroup (Fig. 2 of the paper).

Figures are drawn on ``matplotlib.figure.Figure`` objects, never through ``pyplot``, so the caller's backend
and open figures are left alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.stats import gaussian_kde

__all__ = ["plot_counterfactual_grid", "plot_embedding_modes", "REAL_COLOUR", "COUNTERFACTUAL_COLOUR"]

#: Colours of real and counterfactual distributions, as in the paper's Fig. 2.
REAL_COLOUR, COUNTERFACTUAL_COLOUR = "tab:blue", "tab:red"


def _as_2d_images(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(N, C, *spatial)`` -> ``(N, H, W)``: the first channel, the middle slice of a volume."""
    array = images.detach().cpu().float().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.ndim < 4:
        raise ValueError(f"Images must be (N, C, H, W) or (N, C, D, H, W), got shape {array.shape}.")
    array = array[:, 0]
    while array.ndim > 3:
        array = array[:, array.shape[1] // 2]
    return array.astype(np.float32)


def _save(fig, path: str | os.PathLike, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def plot_counterfactual_grid(
    path: str | os.PathLike,
    images: torch.Tensor | np.ndarray,
    counterfactuals: Mapping[str, torch.Tensor | np.ndarray],
    panel_titles: Mapping[str, Sequence[str]] | None = None,
    row_labels: Sequence[str] | None = None,
    diff_limit: float | Mapping[str, float] | None = None,
    title: str | None = None,
    image_range: tuple[float, float] = (0.0, 1.0),
    dpi: int = 110,
    differences: bool = True,
) -> Path:
    """Save a PNG grid: per patient, a row of ``x`` and its counterfactuals, then a row of ``x* - x``.

    Args:
        path: the PNG to write (parent folders are created).
        images: factual images ``(N, C, H, W)`` (or volumes: the middle slice is shown).
        counterfactuals: ``{column label: (N, C, H, W)}``, e.g. ``{"do(sex)": ..., "do(age)": ...}``.
        panel_titles: optional per-column titles of each patient's panel, e.g. ``{"do(sex)": ["do(sex=F)", ...]}``.
        row_labels: optional description of each patient, shown above its factual image.
        diff_limit: the colour-map limit ``L`` of the difference maps, ``[-L, L]``; default: the largest
            absolute difference in the figure. Give the same value to figures that are to be compared, or
            ``{column label: L}`` for a limit per column (a subtle effect beside a strong one).
        title: figure title.
        image_range: display range of the images.
        dpi: resolution.
        differences: draw the rows of difference maps.

    Returns:
        The written path.

    Example::

        plot_counterfactual_grid("grid_soft.png", x[:4], {"do(sex)": x_sex, "do(disease)": x_dis}, diff_limit=0.3)
    """
    from matplotlib.figure import Figure

    factual = _as_2d_images(images)
    columns = {label: _as_2d_images(value) for label, value in counterfactuals.items()}
    for label, value in columns.items():
        if value.shape != factual.shape:
            raise ValueError(f"Counterfactuals '{label}' have shape {value.shape}, the images {factual.shape}.")
    n, names = factual.shape[0], list(columns)
    diffs = {label: value - factual for label, value in columns.items()}
    if diff_limit is None:
        diff_limit = max([float(np.abs(d).max()) for d in diffs.values()] + [1e-3])
    if isinstance(diff_limit, Mapping):
        missing = [label for label in names if label not in diff_limit]
        if missing:
            raise ValueError(f"diff_limit has no limit for the columns {missing}.")
        limits = {label: float(diff_limit[label]) for label in names}
    else:
        limits = dict.fromkeys(names, float(diff_limit))
    rows = 2 if differences else 1
    fig = Figure(figsize=(1.7 * (1 + len(names)) + 0.6, 1.8 * rows * n + (0.5 if title else 0.1)))
    axes = fig.subplots(rows * n, 1 + len(names), squeeze=False)
    low, high = image_range
    mappable = None
    shared_limit = len(set(limits.values())) == 1
    for i in range(n):
        top = axes[rows * i]
        top[0].imshow(factual[i], cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        top[0].set_title(row_labels[i] if row_labels is not None else "x", fontsize=7)
        for col, label in enumerate(names, start=1):
            top[col].imshow(columns[label][i], cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            titles = (panel_titles or {}).get(label)
            top[col].set_title(titles[i] if titles is not None else label, fontsize=7)
        for ax in top:
            ax.set_xticks([])
            ax.set_yticks([])
        if not differences:
            continue
        bottom = axes[rows * i + 1]
        bottom[0].text(0.5, 0.5, "x* - x", ha="center", va="center", fontsize=8, transform=bottom[0].transAxes)
        for col, label in enumerate(names, start=1):
            limit = limits[label]
            mappable = bottom[col].imshow(
                diffs[label][i], cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest"
            )
            if not shared_limit:
                bottom[col].set_title(f"±{limit:.2f}", fontsize=6)
        for ax in bottom:
            ax.set_xticks([])
            ax.set_yticks([])
        bottom[0].axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0.0, 0.0, 0.93, 1.0))
    if mappable is not None and shared_limit:
        bar = fig.add_axes((0.94, 0.3, 0.015, 0.4))
        fig.colorbar(mappable, cax=bar).ax.tick_params(labelsize=6)
    return _save(fig, path, dpi)


def _density(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    if values.size < 2 or float(np.std(values)) == 0.0:
        hist = np.zeros_like(grid)
        if values.size:
            hist[np.argmin(np.abs(grid - values.mean()))] = 1.0
        return hist
    return gaussian_kde(values)(grid)


def plot_embedding_modes(
    path: str | os.PathLike,
    real: np.ndarray,
    real_groups: np.ndarray,
    counterfactuals: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    group_names: Sequence[str],
    mode_label: str = "PCA mode",
    distances: Mapping[str, Mapping[str, Mapping[int, float]]] | None = None,
    title: str | None = None,
    dpi: int = 110,
) -> Path:
    """Save a PNG of real vs counterfactual distributions along one embedding mode, per subgroup.

    One column per counterfactual type, one row per intervention; in each panel one ridge per subgroup with
    the real images' density filled in blue and the counterfactuals' density as a red line.

    Args:
        path: the PNG to write.
        real: the real images' projections on the mode ``(N,)``.
        real_groups: their subgroup indices ``(N,)``.
        counterfactuals: ``{cf type: {intervention label: (projections (N',), subgroup indices (N',))}}``.
        group_names: the subgroup names, index ``g`` naming group ``g``.
        mode_label: x-axis label.
        distances: optional ``{cf type: {intervention label: {group: W1}}}`` written next to each ridge.
        title: figure title.
        dpi: resolution.

    Example::

        plot_embedding_modes("modes_race.png", z_real[:, 2], race, {"hard": {"do(sex)": (z_cf[:, 2], race)}},
                             ["White", "Asian", "Black"], mode_label="PCA mode 3")
    """
    from matplotlib.figure import Figure

    real = np.asarray(real, dtype=np.float64).reshape(-1)
    real_groups = np.asarray(real_groups).reshape(-1).astype(np.int64)
    cf_types = list(counterfactuals)
    interventions: list[str] = []
    for by_do in counterfactuals.values():
        interventions += [k for k in by_do if k not in interventions]
    if not cf_types or not interventions:
        raise ValueError("plot_embedding_modes needs at least one counterfactual type and intervention.")
    everything = [real] + [np.asarray(v[0]).reshape(-1) for by in counterfactuals.values() for v in by.values()]
    pooled = np.concatenate(everything)
    low, high = np.percentile(pooled, [0.5, 99.5])
    pad = 0.15 * (high - low + 1e-9)
    grid = np.linspace(low - pad, high + pad, 256)
    groups = [g for g in range(len(group_names)) if (real_groups == g).any()]
    fig = Figure(figsize=(3.4 * len(cf_types), 0.6 + 0.75 * len(groups) * len(interventions) + 0.6))
    axes = fig.subplots(len(interventions), len(cf_types), squeeze=False, sharex=True)
    for col, cf_type in enumerate(cf_types):
        for row, do_label in enumerate(interventions):
            ax = axes[row, col]
            entry = counterfactuals[cf_type].get(do_label)
            if entry is None:
                ax.axis("off")
                continue
            cf_values = np.asarray(entry[0], dtype=np.float64).reshape(-1)
            cf_groups = np.asarray(entry[1]).reshape(-1).astype(np.int64)
            for offset, g in enumerate(reversed(groups)):
                real_d = _density(real[real_groups == g], grid)
                cf_d = _density(cf_values[cf_groups == g], grid)
                top = max(real_d.max(), cf_d.max(), 1e-9)
                base = 1.1 * offset
                ax.fill_between(grid, base, base + real_d / top, color=REAL_COLOUR, alpha=0.35, linewidth=0)
                ax.plot(grid, base + real_d / top, color=REAL_COLOUR, linewidth=0.8)
                ax.plot(grid, base + cf_d / top, color=COUNTERFACTUAL_COLOUR, linewidth=1.2)
                label = group_names[g]
                w1 = ((distances or {}).get(cf_type, {}).get(do_label, {})).get(g)
                if w1 is not None and np.isfinite(w1):
                    label += f"\nW1={w1:.2f}"
                ax.text(grid[0], base + 0.55, label, fontsize=6, va="center")
            ax.set_yticks([])
            ax.set_title(f"{cf_type}: {do_label}", fontsize=8)
            if row == len(interventions) - 1:
                ax.set_xlabel(mode_label, fontsize=7)
            ax.tick_params(labelsize=6)
    handles = [
        _legend_patch(REAL_COLOUR, "real"),
        _legend_line(COUNTERFACTUAL_COLOUR, "counterfactual"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0.0, 0.05, 1.0, 1.0))
    return _save(fig, path, dpi)


def _legend_patch(colour: str, label: str):
    from matplotlib.patches import Patch

    return Patch(facecolor=colour, alpha=0.35, edgecolor=colour, label=label)


def _legend_line(colour: str, label: str):
    from matplotlib.lines import Line2D

    return Line2D([0], [0], color=colour, linewidth=1.2, label=label)
