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
"""The attribute mechanisms' maximum-likelihood loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["MechanismNLLLoss"]


class MechanismNLLLoss(nn.Module):
    """``-sum_a log p(a | pa(a))`` averaged over the batch: the mechanisms' maximum-likelihood objective.

    Takes the output of :class:`MechanismLikelihood`; the second argument (the engine's targets) is ignored.
    """

    def forward(self, log_probs: Mapping[str, torch.Tensor], target: Any = None) -> torch.Tensor:
        return -torch.stack([lp.reshape(-1) for lp in log_probs.values()]).sum(0).mean()
