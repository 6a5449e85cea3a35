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
"""The damped Lagrangian of counterfactual fine-tuning: the predictor loss under an nELBO constraint."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DampedLagrangian"]


class DampedLagrangian(nn.Module):
    """A damped Lagrange multiplier for ``min L_pred`` subject to ``nELBO <= epsilon``.

    ``loss = L_pred - (lambda - damping * sg(epsilon - nELBO)) * (epsilon - nELBO)``, with ``lambda >= 0``
    learned by gradient *ascent* (use an optimizer with ``maximize=True`` on :attr:`multiplier`, then call
    :meth:`clamp_`). The damping term makes the saddle point stable: it adds a restoring force proportional
    to the violation without waiting for the multiplier to grow.

    Args:
        epsilon: the nELBO the fine-tuned model must stay at or below (its value before fine-tuning).
        damping: the damping coefficient.
        initial: the multiplier's starting value.

    Example::

        lagrangian = DampedLagrangian(epsilon=pre_cft_nelbo, damping=10.0)
        lagrange_opt = torch.optim.AdamW(lagrangian.parameters(), lr=0.1, maximize=True)
        loss = lagrangian(predictor_loss, nelbo)
        loss.backward(); optimizer.step(); lagrange_opt.step(); lagrangian.clamp_()
    """

    def __init__(self, epsilon: float, damping: float = 10.0, initial: float = 0.0) -> None:
        super().__init__()
        if damping < 0 or initial < 0:
            raise ValueError(f"damping and initial must be >= 0, got {damping} and {initial}.")
        self.register_buffer("epsilon", torch.tensor(float(epsilon)))
        self.damping = float(damping)
        self.multiplier = nn.Parameter(torch.tensor(float(initial)))

    def forward(self, predictor_loss: torch.Tensor, nelbo: torch.Tensor) -> torch.Tensor:
        slack = self.epsilon - nelbo
        return predictor_loss - (self.multiplier - self.damping * slack.detach()) * slack

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project the multiplier back onto ``lambda >= 0`` after its optimizer step."""
        self.multiplier.clamp_(min=0.0)
