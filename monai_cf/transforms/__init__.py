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
"""Counterfactual data augmentation for MONAI pipelines: dictionary transforms, a batched path and a disk cache."""

from __future__ import annotations

from .array import (
    BatchCounterfactual,
    CounterfactualResult,
    InterventionSampler,
    affected_attributes,
    canonical_intervention,
)
from .batch import CounterfactualBatchAugmenter
from .cache import CounterfactualCache, model_fingerprint, tensor_digest
from .dictionary import (
    CounterfactualD,
    Counterfactuald,
    CounterfactualDict,
    CounterfactualPairD,
    CounterfactualPaird,
    CounterfactualPairDict,
    RandCounterfactualD,
    RandCounterfactuald,
    RandCounterfactualDict,
)

__all__ = [
    "Counterfactuald",
    "RandCounterfactuald",
    "CounterfactualPaird",
    "CounterfactualD",
    "CounterfactualDict",
    "RandCounterfactualD",
    "RandCounterfactualDict",
    "CounterfactualPairD",
    "CounterfactualPairDict",
    "CounterfactualBatchAugmenter",
    "BatchCounterfactual",
    "CounterfactualResult",
    "InterventionSampler",
    "CounterfactualCache",
    "model_fingerprint",
    "tensor_digest",
    "affected_attributes",
    "canonical_intervention",
]
