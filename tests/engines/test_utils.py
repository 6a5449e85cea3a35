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
from ignite.engine import Engine
from monai.data import DataLoader, MetaTensor
from torch import nn

from monai_cf.data import SyntheticCXR, csv_dataset
from monai_cf.engines import (
    AttributePrepareBatch,
    CounterfactualPrepareBatch,
    LinearWarmup,
    MeanMetric,
    OutputSummary,
    ResumableDistributedSampler,
    create_data_loader,
    create_warmup_scheduler,
    guarded_optimizer_step,
)


@pytest.fixture(scope="module")
def phantom_batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    SyntheticCXR(spatial_size=16, seed=3).write(root, n_train=8, n_val=1, n_test=1)
    loader = DataLoader(csv_dataset(root / "train.csv", "mimic_cxr", spatial_size=16), batch_size=8)
    return next(iter(loader))


def test_counterfactual_prepare_batch_reads_csv_batches(phantom_batch):
    image, attributes, pa = CounterfactualPrepareBatch("mimic_cxr")(phantom_batch, torch.device("cpu"))
    assert type(image) is torch.Tensor and not isinstance(image, MetaTensor)
    assert image.shape == (8, 1, 16, 16) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert sorted(attributes) == ["age", "disease", "race", "sex"]
    assert attributes["sex"].dtype == torch.long and attributes["age"].dtype == torch.float32
    assert torch.equal(attributes["race"], phantom_batch["race"])
    assert torch.equal(pa, phantom_batch["pa"])
    # without "pa" in the batch the vector is computed from the attributes, identically
    no_pa = {k: v for k, v in phantom_batch.items() if k != "pa"}
    _, _, computed = CounterfactualPrepareBatch("mimic_cxr")(no_pa)
    assert torch.allclose(computed, phantom_batch["pa"])
    # a plain HVAE needs no graph: image and pa only
    image2, attributes2, pa2 = CounterfactualPrepareBatch()(phantom_batch)
    assert attributes2 == {} and torch.equal(pa2, phantom_batch["pa"]) and torch.equal(image2, image)
    with pytest.raises(ValueError, match="Image key 'img'"):
        CounterfactualPrepareBatch(image_key="img")(phantom_batch)
    with pytest.raises(ValueError, match="dictionary"):
        CounterfactualPrepareBatch()((image, pa))


def test_attribute_prepare_batch_encodes_targets(phantom_batch):
    image, targets = AttributePrepareBatch("mimic_cxr")(phantom_batch)
    assert image.shape == (8, 1, 16, 16)
    assert torch.equal(targets["sex"][:, 0], phantom_batch["sex"].float())
    assert torch.equal(targets["race"].argmax(-1), phantom_batch["race"])
    assert targets["race"].shape == (8, 3)
    # age in years over the mimic_cxr range (0, 100) -> [-1, 1]
    assert torch.allclose(targets["age"][:, 0], (phantom_batch["age"].float() / 100) * 2 - 1, atol=1e-6)
    encoded, nothing = AttributePrepareBatch("mimic_cxr", image_key=None)(phantom_batch)
    assert nothing is None and sorted(encoded) == ["age", "disease", "race", "sex"]


def test_warmup_schedule_values():
    assert [LinearWarmup(4)(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert LinearWarmup(0)(0) == 1.0
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
    assert scheduler.state_dict()["lr_lambdas"] == [{"warmup_steps": 100}]


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


def test_resumable_sampler_skips_into_the_epoch():
    data = list(range(20))
    full = ResumableDistributedSampler(data, seed=5)
    full.set_epoch(3)
    order = list(full)
    assert sorted(order) == data and order != data
    resumed = ResumableDistributedSampler(data, seed=5)
    resumed.set_epoch(3)
    resumed.skip(8)
    assert list(resumed) == order[8:]
    assert list(resumed) == order  # the skip applies to one pass only
    shard = ResumableDistributedSampler(data, num_replicas=2, rank=1, seed=5)
    shard.set_epoch(3)
    assert list(shard) == order[1::2]
    loader = create_data_loader(data, batch_size=4, seed=5)
    loader.sampler.set_epoch(3)
    assert torch.cat(list(loader)).tolist() == order


def test_mean_metric_and_output_summary():
    metric = MeanMetric()
    metric.reset()
    metric.update((torch.tensor(2.0), 3))
    metric.update(torch.tensor([4.0, 6.0]))
    assert metric.compute() == pytest.approx((2 * 3 + 4 + 6) / 5)

    engine = Engine(lambda e, b: None)
    engine.state.output = {"loss": torch.tensor(1.5), "nll": torch.tensor(1.0), "skipped": 1, "image": torch.ones(2)}
    OutputSummary(("loss", "nll", "skipped", "absent"))(engine)
    assert engine.state.output == [{"loss": 1.5, "nll": 1.0, "skipped": 1.0}]
