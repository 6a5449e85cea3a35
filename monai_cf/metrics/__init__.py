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
"""Counterfactual metrics: effectiveness and amplification, faithfulness, consistency bounds, soundness, ground
truth, embedding shift, realism.

Every function here measures; none trains. :class:`monai_cf.engines.CounterfactualEvaluator` runs them over
a test set and writes ``metrics.json`` and ``report.md``.
"""

from __future__ import annotations

from monai_cf.interventions import draw_intervention_values

from .consistency import (
    AttributeLevels,
    adjusted_reading,
    conditional_tables,
    counterfactual_bounds,
    counterfactual_consistency,
    frechet_bounds,
    reading_calibration_error,
    reading_context,
)
from .effectiveness import (
    amplification,
    attribute_performance,
    auc_standard_error,
    label_log_odds,
    logit_shift,
    roc_auc,
)
from .embedding import EmbeddingPCA, frechet_distance, separating_mode, subgroup_shift, wasserstein_shift
from .faithfulness import continuous_amplification, effectiveness_excess, relative_error_change, truth_gain
from .soundness import (
    MAX_PSNR,
    CounterfactualFn,
    composition_distances,
    image_similarity,
    l1_255,
    reversibility_distances,
)

__all__ = [
    "roc_auc",
    "auc_standard_error",
    "attribute_performance",
    "label_log_odds",
    "amplification",
    "logit_shift",
    "truth_gain",
    "relative_error_change",
    "effectiveness_excess",
    "continuous_amplification",
    "draw_intervention_values",
    "AttributeLevels",
    "frechet_bounds",
    "conditional_tables",
    "counterfactual_bounds",
    "adjusted_reading",
    "reading_calibration_error",
    "reading_context",
    "counterfactual_consistency",
    "CounterfactualFn",
    "l1_255",
    "composition_distances",
    "reversibility_distances",
    "image_similarity",
    "MAX_PSNR",
    "EmbeddingPCA",
    "wasserstein_shift",
    "subgroup_shift",
    "separating_mode",
    "frechet_distance",
]
