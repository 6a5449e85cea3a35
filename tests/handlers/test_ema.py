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

import io

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from monai_cf.handlers import EMAUpdateHandler, ExponentialMovingAverage


def _linear(value: float) -> nn.Module:
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(value)
    return layer


def test_inverse_schedule_copies_then_averages():
    ema = ExponentialMovingAverage(_linear(0.0), rate=0.999, warmup="inverse", warmup_steps=3)
    assert [ema.decay(n) for n in range(3)] == [0.0, 0.0, 0.0]
    assert ema.decay(3) == 0.0  # first update after the copy phase still copies (t = 0)
    assert ema.decay(4) == pytest.approx(0.5)
    assert ema.decay(13) == pytest.approx(1 - 1 / 11)
    assert ema.decay(10_000) == 0.999


def test_tf_and_constant_schedules():
    tf = ExponentialMovingAverage(_linear(0.0), rate=0.99, warmup="tf")
    assert tf.decay(0) == pytest.approx(0.1)
    assert tf.decay(90) == pytest.approx(91 / 100)
    assert tf.decay(10_000) == 0.99
    const = ExponentialMovingAverage(_linear(0.0), rate=0.9, warmup="none")
    assert const.decay(0) == 0.9


def test_update_follows_the_formula_and_roundtrips():
    model = _linear(1.0)
    ema = ExponentialMovingAverage(model, rate=0.9, warmup="none")
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.9 * 1.0 + 0.1 * 2.0))
    ema.update(model)
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.9 * 1.1 + 0.1 * 2.0))
    assert not ema.module.weight.requires_grad
    assert torch.equal(ema(torch.ones(1, 2)), ema.module(torch.ones(1, 2)))

    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    restored = ExponentialMovingAverage(_linear(5.0), rate=0.9, warmup="none")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.num_updates == 2
    assert torch.equal(restored.module.weight, ema.module.weight)


def test_wrong_model_and_arguments_raise():
    ema = ExponentialMovingAverage(_linear(0.0))
    with pytest.raises(ValueError, match="parameters"):
        ema.update(nn.Sequential(_linear(0.0), _linear(0.0)))
    with pytest.raises(ValueError, match="rate"):
        ExponentialMovingAverage(_linear(0.0), rate=1.0)
    with pytest.raises(ValueError, match="warmup"):
        ExponentialMovingAverage(_linear(0.0), warmup="cosine")


def test_handler_skips_flagged_iterations():
    model = _linear(0.0)
    ema = ExponentialMovingAverage(model, rate=0.5, warmup="none")

    def step(engine, batch):
        engine.state.step_skipped = batch == "skip"
        if batch != "skip":
            with torch.no_grad():
                model.weight.add_(1.0)

    engine = Engine(step)
    EMAUpdateHandler(ema, model, event=Events.ITERATION_COMPLETED).attach(engine)
    engine.run(["go", "skip", "go"], max_epochs=1)
    # updates after weights 1 and 2: 0.5 * 0 + 0.5 * 1 = 0.5, then 0.5 * 0.5 + 0.5 * 2 = 1.25; the skip did nothing
    assert ema.num_updates == 2
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 1.25))
