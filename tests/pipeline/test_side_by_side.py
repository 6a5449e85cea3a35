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
"""How many trainings run side by side: only on the CPU, outside a distributed run, as many as asked."""

from __future__ import annotations

import torch

from monai_cf.pipeline.side_by_side import parallel_workers


def test_side_by_side_only_on_the_cpu_and_as_asked():
    cpu = torch.device("cpu")
    assert parallel_workers(False, cpu) == 1
    assert parallel_workers("auto", cpu) == torch.get_num_threads()
    assert parallel_workers(True, cpu) >= 2
    assert parallel_workers(True, torch.device("cuda")) == 1
