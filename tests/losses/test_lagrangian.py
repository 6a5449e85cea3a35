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
from __future__ import annotations

import pytest
import torch

from monai_cf.losses import DampedLagrangian


def test_damped_lagrangian():
    lagrangian = DampedLagrangian(epsilon=2.0, damping=10.0)
    optimizer = torch.optim.SGD(lagrangian.parameters(), lr=0.5, maximize=True)
    nelbo = torch.tensor(2.5, requires_grad=True)
    loss = lagrangian(torch.tensor(1.0), nelbo)
    # lambda = 0: loss = 1 - (0 - 10 * (-0.5)) * (-0.5) = 3.5; the constraint is violated, so d loss / d nelbo > 0
    assert torch.isclose(loss, torch.tensor(3.5))
    loss.backward()
    assert float(nelbo.grad) == pytest.approx(5.0)
    optimizer.step()
    lagrangian.clamp_()
    assert float(lagrangian.multiplier.detach()) == pytest.approx(0.25)  # ascent: d loss / d lambda = nelbo - eps = 0.5
    # a satisfied constraint pushes the multiplier down, and it never goes below zero
    for _ in range(5):
        optimizer.zero_grad()
        lagrangian(torch.tensor(1.0), torch.tensor(1.0)).backward()
        optimizer.step()
        lagrangian.clamp_()
        assert float(lagrangian.multiplier.detach()) >= 0.0
    assert float(lagrangian.multiplier.detach()) == 0.0
    with pytest.raises(ValueError):
        DampedLagrangian(epsilon=1.0, damping=-1.0)
