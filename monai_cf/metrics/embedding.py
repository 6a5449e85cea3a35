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
"""Distribution shift of counterfactuals in a predictor's embedding (Fig. 2 of the Soft-CFT paper), and FID.

The evaluation predictor's penultimate features of the *real* test images are reduced by PCA; real and
counterfactual images are projected onto the first few modes, and within each subgroup of an unintervened
attribute the two distributions along a mode are compared by the Wasserstein-1 distance. Faithful
counterfactuals leave the unintervened subgroups where they were: distance near zero.

Projections are whitened (each mode divided by its standard deviation on the real images), so a distance
of 0.1 means a tenth of that mode's real spread whatever the mode's scale.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import FIDMetric
from scipy.linalg import LinAlgWarning
from scipy.stats import wasserstein_distance
from sklearn.decomposition import PCA

__all__ = ["EmbeddingPCA", "wasserstein_shift", "subgroup_shift", "separating_mode", "frechet_distance"]


def _numpy(values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def wasserstein_shift(real: torch.Tensor | np.ndarray, counterfactual: torch.Tensor | np.ndarray) -> float:
    """Wasserstein-1 distance between two 1-D samples (``nan`` if either is empty).

    Example::

        wasserstein_shift(np.zeros(100), np.full(100, 0.5))  # 0.5
    """
    a, b = _numpy(real).reshape(-1), _numpy(counterfactual).reshape(-1)
    if not a.size or not b.size:
        return float("nan")
    return float(wasserstein_distance(a, b))


class EmbeddingPCA:
    """PCA of real-image embeddings with whitened projections.

    Args:
        num_modes: the number of leading modes kept.
        seed: the PCA solver's random state.

    Example::

        pca = EmbeddingPCA(num_modes=3).fit(real_features)
        z_real, z_cf = pca.transform(real_features), pca.transform(cf_features)  # (N, 3) each
    """

    def __init__(self, num_modes: int = 3, seed: int = 0) -> None:
        if num_modes < 1:
            raise ValueError(f"num_modes must be >= 1, got {num_modes}.")
        self.num_modes = int(num_modes)
        self.seed = int(seed)
        self._pca: PCA | None = None
        self._scale: np.ndarray | None = None

    def fit(self, features: torch.Tensor | np.ndarray) -> EmbeddingPCA:
        features = _numpy(features)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"PCA needs (N >= 2, D) features, got shape {features.shape}.")
        modes = min(self.num_modes, features.shape[0], features.shape[1])
        self._pca = PCA(n_components=modes, random_state=self.seed).fit(features)
        scale = np.sqrt(self._pca.explained_variance_)
        self._scale = np.where(scale > 0, scale, 1.0)
        return self

    @property
    def explained_variance_ratio(self) -> list[float]:
        self._check_fitted()
        return [float(v) for v in self._pca.explained_variance_ratio_]  # type: ignore[union-attr]

    def transform(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """Whitened projections ``(N, num_modes)`` onto the leading modes."""
        self._check_fitted()
        return self._pca.transform(_numpy(features)) / self._scale  # type: ignore[union-attr,operator]

    def _check_fitted(self) -> None:
        if self._pca is None:
            raise RuntimeError("EmbeddingPCA is not fitted; call fit(real_features) first.")


def subgroup_shift(
    real: np.ndarray,
    counterfactual: np.ndarray,
    real_groups: np.ndarray,
    cf_groups: np.ndarray,
    num_groups: int,
) -> dict[int, list[float]]:
    """Per subgroup and mode, the W1 distance between real and counterfactual projections.

    Args:
        real: projections of real images ``(N, M)``.
        counterfactual: projections of counterfactual images ``(N', M)``.
        real_groups: subgroup (class index) of each real image ``(N,)``.
        cf_groups: subgroup of each counterfactual ``(N',)``.
        num_groups: number of subgroups (classes).

    Returns:
        ``{group: [W1 along mode 1, ..., mode M]}``, for the groups present in both sets.

    Example::

        subgroup_shift(z_real, z_cf, race_real, race_cf, num_groups=3)  # {0: [0.02, 0.1, 0.05], 1: [...], 2: [...]}
    """
    real, counterfactual = np.atleast_2d(_numpy(real)), np.atleast_2d(_numpy(counterfactual))
    real_groups, cf_groups = _numpy(real_groups).astype(np.int64), _numpy(cf_groups).astype(np.int64)
    result = {}
    for group in range(num_groups):
        a, b = real[real_groups == group], counterfactual[cf_groups == group]
        if len(a) and len(b):
            result[group] = [wasserstein_shift(a[:, m], b[:, m]) for m in range(real.shape[1])]
    return result


def separating_mode(projections: np.ndarray, groups: np.ndarray) -> tuple[int, float]:
    """The mode along which the subgroups differ most: the largest share of variance between group means.

    Returns:
        ``(mode index, eta squared)``: between-group variance over total variance along that mode.

    Example::

        separating_mode(z_real, race)  # (2, 0.18): the third mode separates race best
    """
    projections = np.atleast_2d(_numpy(projections))
    groups = _numpy(groups).astype(np.int64)
    total = projections.var(axis=0)
    between = np.zeros(projections.shape[1])
    for group in np.unique(groups):
        member = groups == group
        between += member.mean() * (projections[member].mean(axis=0) - projections.mean(axis=0)) ** 2
    eta2 = between / np.where(total > 0, total, 1.0)
    best = int(np.argmax(eta2))
    return best, float(eta2[best])


def frechet_distance(real_features: torch.Tensor | np.ndarray, fake_features: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between two feature sets ``(N, D)``, with MONAI's ``FIDMetric``.

    Needs at least two samples per set; with fewer samples than feature dimensions the covariances are
    singular and the value is noisier.

    Example::

        frechet_distance(features_real, features_real)  # 0.0
    """
    real = torch.as_tensor(_numpy(real_features))
    fake = torch.as_tensor(_numpy(fake_features))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"FID needs two (N, D) feature sets, got {tuple(real.shape)} and {tuple(fake.shape)}.")
    if real.shape[0] < 2 or fake.shape[0] < 2:
        return float("nan")
    with warnings.catch_warnings():
        # with fewer samples than dimensions the covariances are singular; the docstring says the value is noisier
        warnings.simplefilter("ignore", LinAlgWarning)
        return max(float(FIDMetric()(fake, real)), 0.0)  # the matrix square root can leave a tiny negative
