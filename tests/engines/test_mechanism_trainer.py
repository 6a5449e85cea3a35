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

from monai_cf.data import SyntheticCXR
from monai_cf.engines import AttributeTable, MechanismLikelihood, create_data_loader, create_mechanism_trainer
from monai_cf.graph import CausalGraph
from monai_cf.losses import MechanismNLLLoss
from monai_cf.networks import build_mechanisms
from monai_cf.networks.nets import log_prob_all

ATTRIBUTES = ("sex", "race", "age", "disease")


def test_mechanism_trainer_lowers_the_nll():
    phantom = SyntheticCXR(spatial_size=16, seed=2)
    train = {k: v for k, v in phantom.sample_batch(2000, render=False).items() if k in ATTRIBUTES}
    val = {k: v for k, v in phantom.sample_batch(500, render=False).items() if k in ATTRIBUTES}
    torch.manual_seed(0)
    mechanisms = build_mechanisms("mimic_cxr")
    trainer = create_mechanism_trainer(
        mechanisms, train, val, graph="mimic_cxr", max_epochs=6, batch_size=200, lr=1e-2, stats=False
    )
    trainer.evaluator.run()
    before = dict(trainer.evaluator.state.metrics)
    trainer.run()
    after = trainer.evaluator.state.metrics
    assert after["val_nll"] < before["val_nll"] - 0.3, (before, after)
    assert after["val_nll"] == pytest.approx(sum(after[f"val_nll_{n}"] for n in ATTRIBUTES), rel=1e-5)
    # the root discrete mechanisms approach the entropies of the phantom's distributions
    assert after["val_nll_sex"] == pytest.approx(math.log(2), abs=0.03)
    race_entropy = -sum(p * math.log(p) for p in (0.6, 0.2, 0.2))
    assert after["val_nll_race"] == pytest.approx(race_entropy, abs=0.05)

    # the trained mechanisms are the ones passed in: their own log-likelihood matches the evaluator's
    graph = CausalGraph.build("mimic_cxr")
    table = AttributeTable(val, graph)
    encoded = trainer.prepare_batch(next(iter(create_data_loader(table, batch_size=500, shuffle=False))))[0]
    with torch.no_grad():
        nll = float(MechanismNLLLoss()(log_prob_all(mechanisms, graph, encoded)))
        wrapped = float(MechanismNLLLoss()(MechanismLikelihood(mechanisms, graph)(encoded)))
    assert nll == pytest.approx(after["val_nll"], rel=1e-5) and wrapped == nll
