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
import math

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import StatsHandler
from torch import nn

from monai_cf.engines import create_mechanism_trainer, create_predictor_trainer, setup_training_handlers
from monai_cf.engines.optimizers import (
    build_optimizer,
    create_warmup_scheduler,
    describe_factory,
    guarded_optimizer_step,
    optimizer_params,
)
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


def test_warmup_schedule_values():
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = create_warmup_scheduler(optimizer, warmup_steps=100)
    lrs = []
    for _ in range(101):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[49] == pytest.approx(5e-4)
    assert lrs[99] == pytest.approx(1e-3) and lrs[100] == pytest.approx(1e-3)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LinearLR)


@pytest.mark.parametrize(
    "warmup_steps, factors", [(4, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]), (1, [1.0] * 3), (0, [1.0] * 3)]
)
def test_warmup_factor_reaches_one_after_warmup_steps_updates(warmup_steps, factors):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = create_warmup_scheduler(optimizer, warmup_steps=warmup_steps)
    seen = []
    for _ in factors:
        seen.append(optimizer.param_groups[0]["lr"] / 2.0)
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(factors, abs=1e-12)


def test_a_resumed_warmup_continues_where_it_stopped():
    def run(interrupt_at=None, steps=7):
        param = nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=1.0)
        scheduler = create_warmup_scheduler(optimizer, warmup_steps=5)
        lrs = []
        for n in range(steps):
            if n == interrupt_at:
                state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                param = nn.Parameter(torch.zeros(1))
                optimizer = torch.optim.SGD([param], lr=1.0)
                scheduler = create_warmup_scheduler(optimizer, warmup_steps=5)
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return lrs

    assert run(interrupt_at=3) == run()
    with pytest.raises(ValueError, match="warmup_steps must be >= 0, got -1"):
        create_warmup_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), warmup_steps=-1)


def _step(model, optimizer, x, engine=None, **kwargs):
    loss = model(x).pow(2).mean()
    loss.backward()
    return loss, guarded_optimizer_step(engine, optimizer, loss, **kwargs)


def test_guarded_step_clips_and_skips():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = Engine(lambda e, b: None)
    before = [p.detach().clone() for p in model.parameters()]

    loss, (norm, skipped) = _step(model, optimizer, torch.full((2, 4), float("nan")), engine)
    assert skipped and not math.isfinite(float(norm)) and not math.isfinite(float(loss.detach()))
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert engine.state.skipped_updates == 1 and engine.state.step_skipped

    _, (norm, skipped) = _step(model, optimizer, torch.full((2, 4), 1e3), engine, grad_skip=10.0)
    assert skipped and float(norm) > 10.0
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert engine.state.skipped_updates == 2

    # clipped: the applied SGD step has norm lr * grad_clip although the gradient is much larger
    _, (norm, skipped) = _step(model, optimizer, torch.full((2, 4), 30.0), engine, grad_clip=1.0, grad_skip=None)
    assert not skipped and float(norm) > 1.0
    moved = torch.cat([(p - b).reshape(-1) for b, p in zip(before, model.parameters())])
    assert float(moved.detach().norm()) == pytest.approx(0.1, rel=1e-4)
    assert engine.state.skipped_updates == 2 and not engine.state.step_skipped
