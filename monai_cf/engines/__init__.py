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
"""Ignite engines of monai_cf: HVAE, attribute predictors and mechanisms (and the shared training pieces)."""

from __future__ import annotations

from monai_cf.losses import MechanismNLLLoss  # its former home; monai_cf.losses holds it

from .cft import CFT_OUTPUT_KEYS, CounterfactualFineTuner, create_cft_trainer, measure_nelbo
from .cft_targets import (
    CFT_MODES,
    DampedLagrangian,
    InterventionBatch,
    affected_mask,
    cft_targets,
    sample_interventions,
)
from .diffusion_trainer import DIFFUSION_OUTPUT_KEYS, DiffusionEvaluator, DiffusionTrainer, create_diffusion_trainer
from .distributed import is_distributed
from .evaluator import CounterfactualEvaluator
from .hvae_trainer import HVAE_OUTPUT_KEYS, HVAEEvaluator, HVAETrainer, build_image_trainer, create_hvae_trainer
from .mechanism_trainer import AttributeTable, MechanismLikelihood, attribute_loader, create_mechanism_trainer
from .optimizers import create_warmup_scheduler, fused_optimizer_kwargs, guarded_optimizer_step
from .predictor_trainer import AttributeMetrics, attribute_auc, create_predictor_trainer, train_attribute_predictor
from .prepare_batch import AttributePrepareBatch, CounterfactualBatch, CounterfactualPrepareBatch
from .reproducibility import (
    IterationSeeder,
    ResumableDistributedSampler,
    SkipSeenBatches,
    create_data_loader,
    derive_seed,
)
from .runtime import tune_cpu_allocator
from .training_handlers import MeanMetric, OutputSummary, lower_is_better, setup_training_handlers
