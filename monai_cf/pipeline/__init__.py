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
"""Whole-pipeline workflows behind the bundles: training stages with reusable checkpoints, and inference."""

from __future__ import annotations

from .augmentation import AugmentationStudy, biased_subset, run_augmentation_study, subgroup_auc
from .diffusion import DEFAULT_GUIDANCE_TYPES, DIFFUSION_FILE, DIFFUSION_STAGES, DiffusionPipeline
from .errors import install_bundle_excepthook, root_cause, running_monai_bundle
from .inference import CF_TYPES, IMAGE_SUFFIXES, CounterfactualInference, load_scm, parse_intervention
from .workflow import CFT_FILE, STAGES, CounterfactualPipeline, load_checkpoint, locate_bundle_root

__all__ = [
    "CFT_FILE",
    "CF_TYPES",
    "DEFAULT_GUIDANCE_TYPES",
    "DIFFUSION_FILE",
    "DIFFUSION_STAGES",
    "DiffusionPipeline",
    "IMAGE_SUFFIXES",
    "STAGES",
    "AugmentationStudy",
    "CounterfactualInference",
    "CounterfactualPipeline",
    "biased_subset",
    "load_checkpoint",
    "load_scm",
    "locate_bundle_root",
    "parse_intervention",
    "run_augmentation_study",
    "subgroup_auc",
    "install_bundle_excepthook",
    "root_cause",
]

if running_monai_bundle():  # a bundle run's last line then names the culprit, not MONAI's wrapper
    install_bundle_excepthook()
