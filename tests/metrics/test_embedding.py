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

import math

import numpy as np
import pytest
import torch

from monai_cf.metrics import EmbeddingPCA, frechet_distance, separating_mode, subgroup_shift, wasserstein_shift


def test_wasserstein_of_identical_and_shifted_samples():
    rng = np.random.default_rng(0)
    a = rng.normal(size=500)
    assert wasserstein_shift(a, a) == 0.0
    assert wasserstein_shift(a, a + 0.7) == pytest.approx(0.7)
    assert wasserstein_shift(torch.zeros(10), torch.full((10,), 0.5)) == pytest.approx(0.5)
    # grows with the shift
    shifts = [wasserstein_shift(a, a + s) for s in (0.1, 0.5, 2.0)]
    assert shifts == sorted(shifts)
    assert math.isnan(wasserstein_shift([], a))


def test_embedding_pca_whitens_the_leading_modes():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(400, 8)) * np.array([5.0, 3.0, 1.0, 0.5, 0.1, 0.1, 0.1, 0.1])
    pca = EmbeddingPCA(num_modes=3).fit(features)
    z = pca.transform(features)
    assert z.shape == (400, 3)
    assert z.std(axis=0, ddof=1) == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    ratio = pca.explained_variance_ratio
    assert len(ratio) == 3 and ratio[0] > ratio[1] > ratio[2] > 0
    with pytest.raises(RuntimeError, match="not fitted"):
        EmbeddingPCA(2).transform(features)
    with pytest.raises(ValueError, match="num_modes"):
        EmbeddingPCA(0)


def test_subgroup_shift_and_separating_mode():
    rng = np.random.default_rng(2)
    groups = np.repeat([0, 1], 300)
    real = rng.normal(size=(600, 2))
    real[:, 1] += 3.0 * groups  # mode 2 separates the groups
    counterfactual = real.copy()
    counterfactual[groups == 1, 1] += 0.5  # only group 1 moves, only along mode 2
    shift = subgroup_shift(real, counterfactual, groups, groups, num_groups=3)
    assert set(shift) == {0, 1}  # group 2 is absent
    assert shift[0] == pytest.approx([0.0, 0.0])
    assert shift[1] == pytest.approx([0.0, 0.5])
    mode, eta2 = separating_mode(real, groups)
    assert mode == 1 and 0.6 < eta2 < 0.8  # between-group variance 2.25 of 3.25 in total


def test_frechet_distance_zero_for_identical_and_growing_with_a_shift():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(2000, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # same covariance, means 0.5 apart in each of 4 dimensions: 4 * 0.25 = 1 (plus sampling noise)
    b = rng.normal(size=(2000, 4)) + 0.5
    assert frechet_distance(a, b) == pytest.approx(1.0, abs=0.1)
    assert frechet_distance(a, b + 0.5) > frechet_distance(a, b)
    assert math.isnan(frechet_distance(a[:1], b))
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(a, b[:, :3])
