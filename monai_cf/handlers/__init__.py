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
"""Ignite handlers of monai_cf: EMA weights, atomic checkpoints, evaluation reports and MLflow tracking URIs."""

from __future__ import annotations

from .checkpoint import (
    BEST_CHECKPOINT,
    CHECKPOINT_PREFIX,
    AtomicCheckpointSaver,
    checkpoint_iteration,
    latest_checkpoint,
)
from .ema import EMA_WARMUPS, EMAUpdateHandler, ExponentialMovingAverage, unwrap_module
from .report import (
    CounterfactualReportWriter,
    flatten_results,
    format_report,
    json_ready,
    log_evaluation_to_mlflow,
    save_evaluation_figures,
    write_evaluation_outputs,
    write_metrics_json,
)
from .tracking import check_tracking_uri
