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
from ignite.engine import Engine
from torch import nn

from monai_cf.engines.trainer_factory import (
    attach_stage_handlers,
    build_supervised_trainer,
    create_optimizer,
    finish_supervised_trainer,
    training_device,
    world_size,
    wrap_distributed,
)


def test_default_optimizer_is_adamw_with_the_given_settings():
    model = nn.Linear(3, 2)
    optimizer = create_optimizer(None, model.parameters(), lr=0.01, weight_decay=0.2, betas=(0.8, 0.85))
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["lr"] == 0.01 and optimizer.defaults["weight_decay"] == 0.2
    assert optimizer.defaults["betas"] == (0.8, 0.85)
    assert optimizer.defaults["fused"] is None  # no device given: the default kernels
    torch_default = create_optimizer(None, model.parameters(), lr=0.01, weight_decay=0.0)
    assert torch_default.defaults["betas"] == (0.9, 0.999)


def test_a_factory_replaces_adamw_and_misspelt_arguments_fail():
    model = nn.Linear(3, 2)
    optimizer = create_optimizer(functools.partial(torch.optim.SGD, lr=0.5), model.parameters(), 1e-3, 0.0)
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["lr"] == 0.5
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == 8
    with pytest.raises(TypeError, match="lrr"):
        create_optimizer(functools.partial(torch.optim.SGD, lrr=0.5), model.parameters(), 1e-3, 0.0)


def test_device_and_process_defaults_without_a_process_group():
    assert training_device("cpu") == torch.device("cpu")
    assert training_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = nn.Linear(2, 2)
    assert wrap_distributed(model, torch.device("cpu"), None) is model
    assert world_size() == 1


def test_tracked_parameters_merge_stage_optimizer_and_caller(monkeypatch):
    captured = {}

    def fake_setup(trainer, objects, output_dir, tracking_params=None, **kwargs):
        captured.update(objects=objects, output_dir=output_dir, tracking=tracking_params, kwargs=kwargs)
        return ["handler"]

    monkeypatch.setattr("monai_cf.engines.trainer_factory.setup_training_handlers", fake_setup)
    model = nn.Linear(3, 2)
    factory = functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9)
    optimizer = create_optimizer(factory, model.parameters(), 1e-3, 0.0)
    trainer = Engine(lambda engine, batch: None)
    handler_kwargs = {"tracking_params": {"seed": 7, "extra": "x"}, "progress_bar": False}
    returned = attach_stage_handlers(
        trainer,
        {"network": model},
        "out",
        {"stage": "demo", "lr": 1e-3, "seed": 0},
        optimizer,
        factory,
        handler_kwargs,
        key_metric_negative_sign=True,
    )
    assert returned is trainer and trainer.attached_handlers == ["handler"]
    tracked = captured["tracking"]
    assert tracked["stage"] == "demo" and tracked["optimizer"] == "torch.optim.sgd.SGD"
    assert tracked["lr"] == 0.5  # the learning rate the optimiser uses, not the unused default
    assert tracked["optimizer.momentum"] == 0.9
    assert tracked["seed"] == 7 and tracked["extra"] == "x"  # the caller's parameters win
    assert captured["kwargs"] == {"key_metric_negative_sign": True, "progress_bar": False}
    assert "tracking_params" not in handler_kwargs


def test_supervised_core_trains_and_tracks_the_stage(monkeypatch, tmp_path):
    captured = {}

    def fake_setup(trainer, objects, output_dir, tracking_params=None, **kwargs):
        captured.update(objects=objects, tracking=tracking_params, kwargs=kwargs)
        return []

    monkeypatch.setattr("monai_cf.engines.trainer_factory.setup_training_handlers", fake_setup)
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    x = torch.randn(16, 2)
    loader = torch.utils.data.DataLoader(list(zip(x, x @ torch.tensor([[1.0], [-2.0]]))), batch_size=8)
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    trainer = build_supervised_trainer(
        model,
        loader,
        nn.MSELoss(),
        lambda batch, device, non_blocking, **kw: (batch[0].to(device), batch[1].to(device)),
        max_epochs=40,
        optimizer=sgd,
        lr=1e-3,
        weight_decay=0.0,
        device=torch.device("cpu"),
        seed=3,
        distributed=None,
    )
    evaluator = object()
    finish_supervised_trainer(
        trainer, evaluator, "demo", model, str(tmp_path), sgd, {}, key_metric_negative_sign=True, attributes="a,b"
    )
    assert trainer.evaluator is evaluator and captured["objects"]["network"] is model
    assert captured["objects"]["optimizer"] is trainer.optimizer
    tracked = captured["tracking"]
    assert tracked["stage"] == "demo" and tracked["attributes"] == "a,b" and tracked["seed"] == 3
    assert tracked["batch_size"] == 8 and tracked["num_parameters"] == 3 and tracked["lr"] == 0.1
    assert captured["kwargs"] == {"evaluator": evaluator, "key_metric_negative_sign": True}
    first_loss = nn.functional.mse_loss(model(x), x @ torch.tensor([[1.0], [-2.0]])).item()
    trainer.run()
    assert nn.functional.mse_loss(model(x), x @ torch.tensor([[1.0], [-2.0]])).item() < 0.01 * first_loss
