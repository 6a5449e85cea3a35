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
"""The trainers' mean metric and output summary: what MONAI's stats and MLflow handlers read."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from monai_cf.engines.training_handlers import MeanMetric, OutputSummary


def test_mean_metric_and_output_summary():
    metric = MeanMetric()
    metric.reset()
    metric.update((torch.tensor(2.0), 3))
    metric.update(torch.tensor([4.0, 6.0]))
    assert metric.compute() == pytest.approx((2 * 3 + 4 + 6) / 5)

    engine = Engine(lambda e, b: None)
    engine.state.output = {"loss": torch.tensor(1.5), "nll": torch.tensor(1.0), "skipped": 1, "image": torch.ones(2)}
    OutputSummary(("loss", "nll", "skipped", "absent"))(engine)
    assert engine.state.output == [{"loss": 1.5, "nll": 1.0, "skipped": 1.0}]
