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

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from monai_cf.visualize import plot_counterfactual_grid, plot_embedding_modes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_png(path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_counterfactual_grid_draws_images_and_signed_differences(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 16, 16, generator=gen) * 0.5
    brighter = x.clone()
    brighter[:, :, :8] += 0.4  # top half brighter: red in the difference map
    darker = x - 0.3  # everywhere darker: blue
    path = plot_counterfactual_grid(
        tmp_path / "sub" / "grid.png",
        x,
        {"do(a)": brighter, "do(b)": darker},
        panel_titles={"do(a)": ["do(a=1)", "do(a=0)"]},
        row_labels=["patient 1", "patient 2"],
        diff_limit=0.4,
        title="test grid",
    )
    pixels = _read_png(path).astype(int)
    height, width, _ = pixels.shape
    assert height > width  # two rows per patient, three columns
    red = (pixels[..., 0] > 150) & (pixels[..., 2] < 100)
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 100)
    assert red.sum() > 500 and blue.sum() > 500  # both signs of x* - x are drawn in the diverging map


def test_counterfactual_grid_accepts_volumes_and_checks_shapes(tmp_path):
    volume = torch.rand(1, 1, 6, 12, 12)
    path = plot_counterfactual_grid(tmp_path / "vol.png", volume, {"do(a)": volume.flip(-1)})
    assert _read_png(path).shape[2] == 3
    with pytest.raises(ValueError, match="shape"):
        plot_counterfactual_grid(tmp_path / "bad.png", volume, {"do(a)": volume[..., :6]})
    with pytest.raises(ValueError, match="Images must be"):
        plot_counterfactual_grid(tmp_path / "bad.png", torch.rand(12, 12), {})


def test_counterfactual_grid_limits_per_column_and_without_differences(tmp_path):
    x = torch.full((1, 1, 16, 16), 0.5)
    faint, strong = x + 0.02, x + 0.4
    path = plot_counterfactual_grid(
        tmp_path / "per_column.png", x, {"faint": faint, "strong": strong}, diff_limit={"faint": 0.02, "strong": 0.4}
    )

    def red_per_column(png: Path) -> tuple[int, int]:
        pixels = _read_png(png).astype(int)
        red = pixels[..., 0] - pixels[..., 2] > 60
        third = int(pixels.shape[1] * 0.93) // 3  # the figure keeps its right 7% for a colour bar
        return int(red[:, third : 2 * third].sum()), int(red[:, 2 * third : 3 * third].sum())

    # each difference map saturates on its own scale: the faint edit shows as strongly as the strong one, where
    # one shared scale leaves it nearly white
    faint_red, strong_red = red_per_column(path)
    assert faint_red > 0.7 * strong_red > 0
    shared = plot_counterfactual_grid(tmp_path / "shared.png", x, {"faint": faint, "strong": strong}, diff_limit=0.4)
    faint_shared, strong_shared = red_per_column(shared)
    assert faint_shared < 0.1 * strong_shared
    with pytest.raises(ValueError, match=r"no limit for the columns \['strong'\]"):
        plot_counterfactual_grid(tmp_path / "bad.png", x, {"faint": faint, "strong": strong}, diff_limit={"faint": 1.0})
    images_only = _read_png(plot_counterfactual_grid(tmp_path / "plain.png", x, {"a": faint}, differences=False))
    assert images_only.shape[0] < images_only.shape[1]  # one row of images, no difference row


def test_embedding_modes_plot(tmp_path):
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 3, 300)
    real = rng.normal(size=300) + groups
    shifted = real + 1.5
    path = plot_embedding_modes(
        tmp_path / "modes.png",
        real,
        groups,
        {
            "Hard-CFT": {"do(sex)": (shifted, groups), "do(disease)": (shifted, groups)},
            "Soft-CFT": {"do(sex)": (real, groups)},
        },
        ["White", "Asian", "Black"],
        mode_label="PCA mode 3",
        distances={"Hard-CFT": {"do(sex)": {0: 1.5, 1: 1.5, 2: 1.5}}},
        title="race",
    )
    pixels = _read_png(path).astype(int)
    # real densities are filled in light blue, counterfactuals drawn in red
    assert ((pixels[..., 2] > 180) & (pixels[..., 0] < 200) & (pixels[..., 0] > 120)).sum() > 1000
    assert ((pixels[..., 0] > 180) & (pixels[..., 1] < 80)).sum() > 200
    with pytest.raises(ValueError, match="at least one"):
        plot_embedding_modes(tmp_path / "empty.png", real, groups, {}, ["a"])
