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

import functools

import pytest
import torch
from monai.handlers import StatsHandler

from monai_cf.engines import create_mechanism_trainer, create_predictor_trainer, setup_training_handlers
from monai_cf.engines.optimizers import build_optimizer, describe_factory, optimizer_params
from monai_cf.graph import CausalGraph
from monai_cf.networks import AttributePredictor, build_mechanisms


def test_describe_factory_unfolds_partials_and_names_the_class():
    factory = functools.partial(functools.partial(torch.optim.SGD, lr=0.1), momentum=0.9)
    assert describe_factory(factory) == {"_target_": "torch.optim.sgd.SGD", "lr": 0.1, "momentum": 0.9}
    assert describe_factory(torch.optim.Adam) == {"_target_": "torch.optim.adam.Adam"}
    with pytest.raises(ValueError, match="by name"):
        describe_factory(functools.partial(torch.optim.SGD, [torch.nn.Parameter(torch.zeros(1))]))
    with pytest.raises(ValueError, match="not importable"):
        describe_factory(lambda params: torch.optim.SGD(params, lr=0.1))


def test_build_optimizer_uses_the_factory_or_the_default():
    params = [torch.nn.Parameter(torch.zeros(2))]
    default = functools.partial(torch.optim.AdamW, lr=1e-3)
    assert isinstance(build_optimizer(None, params, default), torch.optim.AdamW)
    sgd = build_optimizer(functools.partial(torch.optim.SGD, lr=0.5), params, default)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["lr"] == 0.5
    assert optimizer_params(sgd, functools.partial(torch.optim.SGD, lr=0.5)) == {
        "optimizer": "torch.optim.sgd.SGD",
        "optimizer.lr": 0.5,
        "lr": 0.5,
    }
    with pytest.raises(TypeError, match="_mode_: callable"):
        build_optimizer(torch.optim.SGD(params, lr=0.1), params, default)
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        build_optimizer(lambda p: "adam", params, default)


def test_predictor_and_mechanism_trainers_take_an_optimizer_factory_and_handlers():
    graph = CausalGraph.from_name("mimic_cxr")
    sgd = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.5)
    stats = StatsHandler(name="extra_stats", iteration_log=False)
    data = [{"image": torch.rand(1, 32, 32), "sex": 0, "race": 1, "age": 50.0, "disease": 1}] * 4
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    trainer = create_predictor_trainer(AttributePredictor(2, 1, graph), loader, optimizer=sgd, handlers=[stats])
    assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.optimizer.param_groups[0]["momentum"] == 0.5
    assert trainer.attached_handlers["extra"] == [stats] and trainer.has_event_handler(stats.epoch_completed)
    mechanisms = create_mechanism_trainer(build_mechanisms(graph), data, graph=graph, optimizer=sgd)
    assert isinstance(mechanisms.optimizer, torch.optim.SGD)


def test_a_non_handler_is_refused_by_position():
    graph = CausalGraph.from_name("mimic_cxr")
    data = [{"sex": 0, "race": 1, "age": 50.0, "disease": 1}] * 4
    trainer = create_mechanism_trainer(build_mechanisms(graph), data, graph=graph)
    with pytest.raises(TypeError, match=r"handlers\[1\] is a str"):
        setup_training_handlers(trainer, {"trainer": trainer}, handlers=[StatsHandler(), "stats"])
