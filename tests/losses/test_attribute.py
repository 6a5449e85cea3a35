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

import math

import pytest
import torch
import torch.nn.functional as F

from monai_cf.losses import AttributeLoss

#: the head widths of the mimic_cxr graph's predictor outputs
HEADS = {"sex": 1, "race": 3, "age": 2, "disease": 1}


def _outputs(batch=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(batch, d, generator=gen, dtype=torch.float64) for k, d in HEADS.items()}


def test_loss_hard_targets_by_hand():
    out = _outputs()
    targets = {
        "sex": torch.tensor([0, 1, 1, 0, 1]),
        "race": torch.tensor([2, 0, 1, 1, 0]),
        "age": torch.tensor([0.1, -0.5, 0.9, 0.0, -1.0], dtype=torch.float64),
        "disease": torch.tensor([[1.0], [0.0], [0.0], [1.0], [1.0]], dtype=torch.float64),
    }
    total, parts = AttributeLoss("mimic_cxr", weights={"age": 2.0})(out, targets, return_parts=True)

    def bce(logit, y):
        p = 1 / (1 + math.exp(-logit))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    sex = sum(bce(out["sex"][i, 0].item(), targets["sex"][i].item()) for i in range(5)) / 5
    disease = sum(bce(out["disease"][i, 0].item(), targets["disease"][i, 0].item()) for i in range(5)) / 5
    race = 0.0
    for i in range(5):
        row = out["race"][i].tolist()
        race += -(row[targets["race"][i]] - math.log(sum(math.exp(v) for v in row))) / 5
    age = sum((out["age"][i, 0].item() - targets["age"][i].item()) ** 2 for i in range(5)) / 5
    assert parts["sex"].item() == pytest.approx(sex, rel=1e-10)
    assert parts["disease"].item() == pytest.approx(disease, rel=1e-10)
    assert parts["race"].item() == pytest.approx(race, rel=1e-10)
    assert parts["age"].item() == pytest.approx(age, rel=1e-10)
    assert total.item() == pytest.approx(sex + race + 2 * age + disease, rel=1e-10)

    nll = AttributeLoss("mimic_cxr", attributes=["age"], continuous="gaussian_nll")(out, targets)
    mean, log_scale = out["age"][:, 0], out["age"][:, 1]
    expected = torch.distributions.Normal(mean, log_scale.exp()).log_prob(targets["age"]).neg().mean()
    assert nll.item() == pytest.approx(expected.item(), rel=1e-10)

    per_sample = AttributeLoss("mimic_cxr", weights={"age": 2.0}, reduction="none")(out, targets)
    assert per_sample.shape == (5,) and per_sample.mean().item() == pytest.approx(total.item(), rel=1e-10)


def test_soft_one_hot_equals_hard():
    out = _outputs(seed=1)
    hard = {"sex": torch.tensor([0, 1, 1, 0, 1]), "race": torch.tensor([2, 0, 1, 1, 0]), "disease": torch.zeros(5)}
    hard["age"] = torch.zeros(5)
    soft = dict(hard, sex=hard["sex"].double().unsqueeze(-1), race=F.one_hot(hard["race"], 3).double())
    loss = AttributeLoss("mimic_cxr")
    total_hard, parts_hard = loss(out, hard, return_parts=True)
    total_soft, parts_soft = loss(out, soft, return_parts=True)
    assert torch.allclose(total_hard, total_soft, rtol=1e-12)
    assert all(torch.allclose(parts_hard[k], parts_soft[k], rtol=1e-12) for k in parts_hard)


def test_soft_target_equal_to_own_probability_is_the_minimum():
    out = {k: v.clone().requires_grad_(True) for k, v in _outputs(seed=2).items()}
    loss = AttributeLoss("mimic_cxr", attributes=["sex", "race", "disease"])
    targets = {
        "sex": torch.sigmoid(out["sex"]).detach(),
        "race": torch.softmax(out["race"], -1).detach(),
        "disease": torch.sigmoid(out["disease"]).detach(),
    }
    value = loss(out, targets)
    value.backward()
    for name in ("sex", "race", "disease"):
        assert out[name].grad.abs().max() < 1e-12
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        moved = {k: v.detach() + 0.3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in out.items()}
        assert loss(moved, targets) > value.detach()


def test_target_validation():
    out = _outputs()
    loss = AttributeLoss("mimic_cxr", attributes=["race", "sex"])
    good = {"race": torch.tensor([0, 1, 2, 0, 1]), "sex": torch.zeros(5)}
    with pytest.raises(ValueError, match="rows sum to 1"):
        loss(out, dict(good, race=torch.full((5, 3), 0.5, dtype=torch.float64)))
    with pytest.raises(ValueError, match="out of range"):
        loss(out, dict(good, race=torch.tensor([0, 1, 3, 0, 1])))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        loss(out, dict(good, sex=torch.full((5,), 1.5)))
    with pytest.raises(ValueError, match="Target for 'sex' is missing"):
        loss(out, {"race": good["race"]})
    with pytest.raises(ValueError, match="Output for 'race'"):
        loss(dict(out, race=out["race"][:, :2]), good)
