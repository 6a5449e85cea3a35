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

import os

import pytest
import torch

from monai_cf.engines import DiffusionEvaluator, DiffusionTrainer, create_data_loader, create_diffusion_trainer
from monai_cf.networks import DiffusionImageMechanism
from tests.engines.helpers import image_records, interrupted_and_resumed, parameters_vector, tiny_hvae

TINY = {"channels": (8, 16), "attention_levels": (False, True), "num_head_channels": 8, "norm_num_groups": 8}


def _mechanism(seed: int = 0) -> DiffusionImageMechanism:
    torch.manual_seed(seed)
    return DiffusionImageMechanism(2, 1, 16, parent_dims=[3], embed_dim=8, **TINY)


def _factory(output_dir, model_seed: int = 0, **kwargs):
    records = image_records(40, seed=0)
    train = create_data_loader(records[:32], batch_size=8, seed=0)
    val = create_data_loader(records[32:], batch_size=8, shuffle=False)
    options = {"max_epochs": 3, "warmup_steps": 5, "ema_rate": 0.9, "ema_warmup_steps": 2, "device": "cpu"}
    options.update({"stats": False, **kwargs})
    return create_diffusion_trainer(_mechanism(model_seed), train, val, output_dir, **options)


def test_training_lowers_the_validation_loss_of_the_ema(tmp_path):
    trainer = _factory(tmp_path, max_epochs=1, ema_rate=None)
    trainer.evaluator.run()
    before = trainer.evaluator.state.metrics["val_loss"]
    trainer = _factory(tmp_path / "long", max_epochs=8, lr=3e-3)
    trainer.run()
    assert trainer.evaluator.state.metrics["val_loss"] < before
    assert set(trainer.state.output[0]) == {"loss", "grad_norm", "skipped"}
    assert isinstance(trainer.evaluator, DiffusionEvaluator) and trainer.evaluator.image_model is trainer.ema.module


def test_validation_repeats_for_the_same_weights(tmp_path):
    trainer = _factory(tmp_path, max_epochs=1)
    trainer.evaluator.run()
    first = trainer.evaluator.state.metrics["val_loss"]
    trainer.evaluator.run()
    assert trainer.evaluator.state.metrics["val_loss"] == first


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    reference, interrupted, resumed = interrupted_and_resumed(_factory, tmp_path)
    assert interrupted.state.iteration == 6 and resumed.state.iteration == 12
    assert torch.allclose(parameters_vector(resumed.image_model), parameters_vector(reference.image_model), atol=1e-6)
    assert torch.allclose(parameters_vector(resumed.ema.module), parameters_vector(reference.ema.module), atol=1e-6)
    assert resumed.evaluator.state.metrics["val_loss"] == pytest.approx(
        reference.evaluator.state.metrics["val_loss"], rel=1e-5
    )
    assert sorted(os.listdir(tmp_path / "resumed")) == sorted(os.listdir(tmp_path / "reference"))


def test_bad_networks_and_settings_are_named():
    loader = create_data_loader(image_records(8), batch_size=4)
    optimizer = torch.optim.SGD(tiny_hvae().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="DiffusionImageMechanism.*got HVAE"):
        DiffusionTrainer("cpu", 1, loader, tiny_hvae(), optimizer)
    model = _mechanism()
    with pytest.raises(ValueError, match="'beta' is an ELBO setting"):
        DiffusionTrainer("cpu", 1, loader, model, torch.optim.SGD(model.parameters(), lr=0.1), beta=2.0)
