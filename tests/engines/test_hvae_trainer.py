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
import os

import pytest
import torch
from ignite.engine import Events
from monai.handlers import from_engine

from monai_cf.engines import HVAEEvaluator, HVAETrainer, create_data_loader, create_hvae_trainer, derive_seed
from monai_cf.networks import DeepSCM
from tests.engines.helpers import image_records, interrupted_and_resumed, parameters_vector, tiny_hvae


def _loaders(n_train: int = 32, n_val: int = 8, batch_size: int = 8):
    records = image_records(n_train + n_val, seed=0)
    train = create_data_loader(records[:n_train], batch_size=batch_size, seed=0)
    val = create_data_loader(records[n_train:], batch_size=batch_size, shuffle=False)
    return train, val


def _factory(output_dir, model_seed: int = 0, **kwargs):
    train, val = _loaders()
    options = {
        "max_epochs": 3,
        "warmup_steps": 5,
        "ema_rate": 0.9,
        "ema_warmup_steps": 2,
        "device": "cpu",
        "stats": False,
    }
    options.update(kwargs)
    return create_hvae_trainer(tiny_hvae(model_seed), train, val, output_dir, **options)


def test_nan_batch_is_skipped_and_leaves_weights_unchanged():
    records = image_records(24, seed=1)
    records[11]["image"] = torch.full((1, 16, 16), float("nan"))  # in the second batch of 8
    loader = create_data_loader(records, batch_size=8, shuffle=False)
    model = tiny_hvae()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.9))
    trainer = HVAETrainer("cpu", 1, loader, model, optimizer, warmup_steps=3, ema_rate=0.9, ema_warmup_steps=0, seed=0)
    before, after, lrs = {}, {}, {}

    @trainer.on(Events.ITERATION_STARTED)
    def _before(engine):
        before[engine.state.iteration] = (parameters_vector(model), parameters_vector(engine.ema.module))
        lrs[engine.state.iteration] = optimizer.param_groups[0]["lr"]

    @trainer.on(Events.ITERATION_COMPLETED)
    def _after(engine):
        after[engine.state.iteration] = (parameters_vector(model), parameters_vector(engine.ema.module))

    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output[0])))
    trainer.run()

    assert [o["skipped"] for o in outputs] == [0, 1, 0]
    assert math.isnan(outputs[1]["loss"]) and math.isfinite(outputs[0]["loss"]) and math.isfinite(outputs[2]["loss"])
    assert torch.equal(before[2][0], after[2][0]) and torch.equal(before[2][1], after[2][1])
    assert not torch.equal(before[1][0], after[1][0]) and not torch.equal(before[3][0], after[3][0])
    assert torch.isfinite(after[3][0]).all() and torch.isfinite(after[3][1]).all()
    assert trainer.state.skipped_updates == 1
    assert trainer.ema.num_updates == 2 and trainer.lr_scheduler.last_epoch == 2
    assert all(float(s["step"]) == 2 for s in optimizer.state.values())
    assert lrs[1] == pytest.approx(1e-3 / 3) and lrs[2] == pytest.approx(2e-3 / 3) and lrs[3] == pytest.approx(2e-3 / 3)


def test_ema_is_what_the_evaluator_evaluates():
    trainer = _factory(None, max_epochs=3)
    trainer.run()
    # the output is what MONAI handlers and bundle tracking read: from_engine(["loss"], first=True)
    assert from_engine(["loss"], first=True)(trainer.state.output) == trainer.state.output[0]["loss"]
    assert set(trainer.state.output[0]) == {"loss", "nll", "kl", "grad_norm", "skipped"}
    raw, ema = parameters_vector(trainer.image_model), parameters_vector(trainer.ema.module)
    assert float((raw - ema).abs().max()) > 1e-4
    evaluator = trainer.evaluator
    assert isinstance(evaluator, HVAEEvaluator) and evaluator.image_model is trainer.ema.module

    # the key metric is the sample-weighted validation nELBO of the EMA weights, posterior noise seeded per batch
    total, count = 0.0, 0
    for iteration, batch in enumerate(evaluator.data_loader, start=1):
        torch.manual_seed(derive_seed(0, 0, iteration))
        with torch.no_grad():
            nelbo = trainer.ema.module.elbo(batch["image"] * 2 - 1, batch["pa"])["nelbo"]
        total += float(nelbo) * batch["image"].shape[0]
        count += batch["image"].shape[0]
    assert evaluator.state.metrics["val_nelbo"] == pytest.approx(total / count, rel=1e-6)
    assert evaluator.state.metrics["val_nelbo"] == pytest.approx(
        evaluator.state.metrics["val_nll"] + evaluator.state.metrics["val_kl"], rel=1e-6
    )
    raw_evaluator = trainer.create_evaluator(evaluator.data_loader, use_ema=False)
    raw_evaluator.run()
    assert raw_evaluator.state.metrics["val_nelbo"] != pytest.approx(evaluator.state.metrics["val_nelbo"], rel=1e-6)
    assert evaluator.state.best_metric <= evaluator.state.metrics["val_nelbo"]


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    reference, interrupted, resumed = interrupted_and_resumed(_factory, tmp_path)
    assert interrupted.state.iteration == 6  # mid-epoch 2 (4 iterations per epoch)
    assert resumed.state.iteration == 12 and resumed.state.epoch == 3
    assert torch.allclose(parameters_vector(resumed.image_model), parameters_vector(reference.image_model), atol=1e-6)
    assert torch.allclose(parameters_vector(resumed.ema.module), parameters_vector(reference.ema.module), atol=1e-6)
    assert resumed.ema.num_updates == reference.ema.num_updates == 12
    assert resumed.lr_scheduler.last_epoch == 12
    ref_state = reference.optimizer.state_dict()["state"]
    for key, state in resumed.optimizer.state_dict()["state"].items():
        assert torch.allclose(state["exp_avg_sq"], ref_state[key]["exp_avg_sq"], atol=1e-8)
    assert resumed.evaluator.state.metrics["val_nelbo"] == pytest.approx(
        reference.evaluator.state.metrics["val_nelbo"], rel=1e-5
    )
    # the resumed run took over the interrupted run's files: n_saved=2 periodic + final + best
    assert sorted(os.listdir(tmp_path / "resumed")) == sorted(os.listdir(tmp_path / "reference"))
    best = torch.load(tmp_path / "resumed" / "best.pt", weights_only=True)
    assert set(best) >= {"trainer", "network", "ema", "optimizer", "lr_scheduler"}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy deprecations inside MLflow's store
def test_mlflow_run_records_metrics_params_and_artifacts(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow/mlruns.db"
    trainer = _factory(
        tmp_path / "run",
        max_epochs=2,
        tracking_uri=uri,
        experiment_name="monai_cf_test",
        run_name="hvae_test",
        log_every=1,
    )
    trainer.run()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("monai_cf_test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "hvae_test" and run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.001" and run.data.params["stage"] == "hvae"
    assert int(run.data.params["num_parameters"]) == sum(p.numel() for p in trainer.image_model.parameters())
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == list(range(1, 9))
    assert losses[-1].value == pytest.approx(trainer.state.output[0]["loss"], rel=1e-6)
    assert len(client.get_metric_history(run.info.run_id, "kl")) == 8
    val = client.get_metric_history(run.info.run_id, "val_nelbo")
    assert [m.step for m in val] == [1, 2]
    assert val[-1].value == pytest.approx(trainer.evaluator.state.metrics["val_nelbo"], rel=1e-6)
    assert "best.pt" in [artifact.path for artifact in client.list_artifacts(run.info.run_id)]


def test_deep_scm_network_trains_its_image_model():
    from monai_cf.data import SyntheticCXR

    scm = DeepSCM("mimic_cxr", image_model={"spatial_dims": 2, "in_channels": 1, "spatial_size": 16, "z_dim": 4})
    records = [dict(r) for r in SyntheticCXR.to_list(SyntheticCXR(16, seed=4).sample_batch(16))]
    for r in records:
        r["image"] = torch.as_tensor(r["image"], dtype=torch.float32)
        r.pop("noise", None)
    loader = create_data_loader(records, batch_size=8, seed=0)  # no "pa": computed from the attributes
    trainer = create_hvae_trainer(scm, loader, None, None, max_epochs=1, device="cpu", stats=False, warmup_steps=1)
    before = parameters_vector(scm.image_model)
    trainer.run()
    assert trainer.image_model is scm.image_model and trainer.state.skipped_updates == 0
    assert not torch.equal(before, parameters_vector(scm.image_model))
    assert math.isfinite(trainer.state.output[0]["loss"])
