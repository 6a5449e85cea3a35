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
"""Former home of the engines' shared pieces, kept so that existing imports work; each lives in a module of its own:

- :mod:`monai_cf.engines.prepare_batch`: :class:`CounterfactualPrepareBatch`, :class:`AttributePrepareBatch`;
- :mod:`monai_cf.engines.optimizers`: :func:`guarded_optimizer_step`, :func:`create_warmup_scheduler`
  (``torch.optim.lr_scheduler.LinearLR``), :func:`fused_optimizer_kwargs`;
- :mod:`monai_cf.engines.distributed`: :func:`process_rank`, :func:`is_distributed`;
- :mod:`monai_cf.engines.reproducibility`: :class:`IterationSeeder`, :class:`ResumableDistributedSampler`,
  :func:`create_data_loader`, :class:`SkipSeenBatches`, :func:`derive_seed`;
- :mod:`monai_cf.engines.training_handlers`: :func:`setup_training_handlers`, :class:`OutputSummary`,
  :class:`MeanMetric`, :func:`lower_is_better`.
"""

from __future__ import annotations

from monai_cf.engines.distributed import is_distributed, process_rank
from monai_cf.engines.optimizers import create_warmup_scheduler, fused_optimizer_kwargs, guarded_optimizer_step
from monai_cf.engines.prepare_batch import AttributePrepareBatch, CounterfactualBatch, CounterfactualPrepareBatch
from monai_cf.engines.reproducibility import (
    IterationSeeder,
    ResumableDistributedSampler,
    SkipSeenBatches,
    create_data_loader,
    derive_seed,
)
from monai_cf.engines.training_handlers import MeanMetric, OutputSummary, lower_is_better, setup_training_handlers

__all__ = [
    "CounterfactualBatch",
    "CounterfactualPrepareBatch",
    "AttributePrepareBatch",
    "create_warmup_scheduler",
    "guarded_optimizer_step",
    "fused_optimizer_kwargs",
    "derive_seed",
    "IterationSeeder",
    "ResumableDistributedSampler",
    "create_data_loader",
    "SkipSeenBatches",
    "MeanMetric",
    "OutputSummary",
    "is_distributed",
    "process_rank",
    "lower_is_better",
    "setup_training_handlers",
]
