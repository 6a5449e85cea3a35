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

import copy

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader

from monai_cf.data import SyntheticCXR
from monai_cf.engines.cft import CounterfactualFineTuner, create_cft_trainer, measure_nelbo
from monai_cf.networks import DeepSCM
from monai_cf.networks.nets import AttributePredictor

SIZE = 16


@pytest.fixture(scope="module")
def loader() -> DataLoader:
    batch = SyntheticCXR(spatial_size=SIZE, seed=0).sample_batch(48)
    items = [
        {"image": torch.as_tensor(batch["image"][i]), **{k: batch[k][i] for k in ("sex", "race", "age", "disease")}}
        for i in range(48)
    ]
    return DataLoader(items, batch_size=16, shuffle=False)


def _models(seed: int = 0) -> tuple[DeepSCM, AttributePredictor]:
    torch.manual_seed(seed)
    scm = DeepSCM("mimic_cxr", image_model={"spatial_dims": 2, "in_channels": 1, "spatial_size": SIZE})
    predictor = AttributePredictor(2, 1, scm.graph, channels=(8, 16))
    return scm, predictor


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_fine_tuning_changes_only_the_hvae(loader, mode):
    scm, predictor = _models()
    before_hvae, before_mech, before_pred = _state(scm.image_model), _state(scm.mechanisms), _state(predictor)
    epsilon = measure_nelbo(scm, loader)
    assert epsilon > 0
    tuner = create_cft_trainer(scm, predictor, loader, mode=mode, max_epochs=2, elbo_constraint=epsilon, stats=False)
    multipliers = []
    tuner.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: multipliers.append(float(e.state.output[0]["lagrange_multiplier"]))
    )
    tuner.run()
    assert tuner.state.iteration == 6
    assert all(m >= 0.0 for m in multipliers)
    for name, value in _state(scm.mechanisms).items():
        assert torch.equal(value, before_mech[name]), name
    for name, value in _state(predictor).items():
        assert torch.equal(value, before_pred[name]), name
    assert any(not torch.equal(v, before_hvae[k]) for k, v in _state(scm.image_model).items())
    output = tuner.state.output[0]
    assert set(output) >= {"loss", "nelbo", "predictor_loss", "lagrange_multiplier", "cf_accuracy"}
    assert 0.0 <= output["cf_accuracy"] <= 1.0


def test_none_mode_makes_no_update(loader):
    scm, predictor = _models()
    before = _state(scm.image_model)
    tuner = create_cft_trainer(scm, predictor, loader, mode="none", max_epochs=1, stats=False)
    tuner.run()
    for name, value in _state(scm.image_model).items():
        assert torch.equal(value, before[name]), name
    assert torch.isfinite(torch.tensor(tuner.state.output[0]["predictor_loss"]))


def test_soft_and_hard_runs_differ_from_the_same_start(loader):
    results = {}
    for mode in ("soft", "hard"):
        scm, predictor = _models()
        tuner = create_cft_trainer(scm, predictor, loader, mode=mode, max_epochs=1, elbo_constraint=2.0, stats=False)
        tuner.run()
        results[mode] = _state(scm.image_model)
    assert any(not torch.equal(results["soft"][k], results["hard"][k]) for k in results["soft"])


def test_errors(loader):
    scm, predictor = _models()
    optimizer = torch.optim.AdamW(scm.image_model.parameters(), lr=1e-4)
    with pytest.raises(ValueError, match="mode"):
        CounterfactualFineTuner("cpu", 1, loader, scm, optimizer, predictor, mode="medium", elbo_constraint=1.0)
    with pytest.raises(ValueError, match="elbo_constraint"):
        CounterfactualFineTuner("cpu", 1, loader, scm, optimizer, predictor, mode="soft")
    with pytest.raises(ValueError, match="DeepSCM"):
        CounterfactualFineTuner("cpu", 1, loader, scm.image_model, optimizer, predictor, elbo_constraint=1.0)
    everything = torch.optim.AdamW(list(scm.parameters()) + list(predictor.parameters()), lr=1e-4)
    with pytest.raises(ValueError, match="HVAE only"):
        CounterfactualFineTuner("cpu", 1, loader, scm, everything, predictor, elbo_constraint=1.0)


def test_checkpoint_holds_the_multiplier(loader, tmp_path):
    scm, predictor = _models()
    tuner = create_cft_trainer(
        scm, predictor, loader, mode="soft", max_epochs=1, elbo_constraint=2.0, output_dir=tmp_path, stats=False
    )
    tuner.run()
    saved = sorted(tmp_path.glob("*.pt"))
    assert saved
    state = torch.load(saved[-1], map_location="cpu", weights_only=True)
    assert {"lagrangian", "lagrange_optimizer", "network", "ema"} <= set(state)
    copy.deepcopy(state["lagrangian"])
    assert float(state["lagrangian"]["multiplier"]) >= 0.0


class _RecordingLoss(torch.nn.Module):
    """The default predictor loss, keeping the targets it was given."""

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss
        self.targets: list[dict[str, torch.Tensor]] = []

    def forward(self, outputs, targets):
        self.targets.append({k: v.detach().clone() for k, v in targets.items()})
        return self.loss(outputs, targets)


def _first_targets_under_do_sex(loader, **kwargs):
    """One epoch of do(sex) fine-tuning: the models, the targets of its first batch, the real images' readings."""
    scm, predictor = _models()
    optimizer = torch.optim.AdamW(scm.image_model.parameters(), lr=1e-4)
    tuner = CounterfactualFineTuner(
        "cpu", 1, loader, scm, optimizer, predictor, elbo_constraint=2.0, intervene_on=["sex"], seed=0, **kwargs
    )
    recorder = _RecordingLoss(tuner.predictor_loss)
    tuner.predictor_loss = recorder
    tuner.run()
    with torch.no_grad():
        real = predictor.probabilities(next(iter(loader))["image"])
    return scm, predictor, recorder.targets[0], real


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_engine_targets_under_do_sex(loader, mode):
    scm, predictor, first, real = _first_targets_under_do_sex(loader, mode=mode)
    batch = next(iter(loader))
    encoded_age = scm.encoder.encode_attribute("age", batch["age"])
    if mode == "soft":  # A* = {race, age, disease}: the guidance predictor's readings of the real images
        assert torch.allclose(first["race"], real["race"], atol=1e-6)
        assert torch.allclose(first["disease"], real["disease"].reshape(-1, 1), atol=1e-6)
        assert torch.allclose(first["age"], real["age"], atol=1e-6)  # continuous: its predicted mean
        assert not torch.allclose(first["age"], encoded_age, atol=1e-3)
    else:  # hard: the factual labels
        assert torch.equal(first["race"], torch.nn.functional.one_hot(batch["race"].long(), 3).float())
        assert torch.equal(first["disease"][:, 0], batch["disease"].float())
        assert torch.allclose(first["age"], encoded_age, atol=1e-6)
    assert set(first["sex"][:, 0].tolist()) <= {0.0, 1.0}  # intervened: a hard counterfactual label


def test_transported_targets_carry_the_real_reading_to_the_counterfactual(loader):
    scm, predictor, first, real = _first_targets_under_do_sex(
        loader, mode="soft", force_change=True, intervened_targets="transported"
    )
    optimizer = torch.optim.AdamW(scm.image_model.parameters(), lr=1e-4)
    # do(sex) always flips it (force_change): the target is the real image's reading of the other sex
    assert torch.allclose(first["sex"], 1.0 - real["sex"].reshape(-1, 1), atol=1e-6)
    with pytest.raises(ValueError, match="intervened_targets"):
        CounterfactualFineTuner(
            "cpu", 1, loader, scm, optimizer, predictor, elbo_constraint=1.0, intervened_targets="soft"
        )


def test_proximity_weight_adds_the_edit_size_to_the_objective(loader):
    losses = {}
    for weight in (0.0, 5.0):
        scm, predictor = _models()
        tuner = create_cft_trainer(
            scm,
            predictor,
            loader,
            mode="soft",
            max_epochs=1,
            lr=0.0,
            elbo_constraint=2.0,
            stats=False,
            proximity_weight=weight,
            seed=0,
        )
        records = []
        tuner.add_event_handler(Events.ITERATION_COMPLETED, lambda e: records.append(dict(e.state.output[0])))
        tuner.run()
        losses[weight] = records[0]
    # same start and draws: the first losses differ by 5 * mean |x* - x| > 0, the other terms are equal
    assert float(losses[5.0]["predictor_loss"]) == pytest.approx(float(losses[0.0]["predictor_loss"]), rel=1e-6)
    assert float(losses[5.0]["nelbo"]) == pytest.approx(float(losses[0.0]["nelbo"]), rel=1e-6)
    assert float(losses[5.0]["loss"] - losses[0.0]["loss"]) > 1e-3
    with pytest.raises(ValueError, match="proximity_weight"):
        scm, predictor = _models()
        create_cft_trainer(scm, predictor, loader, elbo_constraint=1.0, proximity_weight=-1.0, stats=False)


def test_trainable_parents_updates_only_the_parents_pathway(loader):
    scm, predictor = _models()
    before = _state(scm.image_model)
    tuner = create_cft_trainer(
        scm, predictor, loader, mode="hard", max_epochs=1, elbo_constraint=2.0, trainable="parents", stats=False
    )
    tuner.run()
    pathway = {id(p) for p in scm.image_model.parents_pathway_parameters()}
    names = {name for name, p in scm.image_model.named_parameters() if id(p) in pathway}
    assert names and all(n.startswith(("state_parents_proj", "posterior_parents_proj", "parent_maps")) for n in names)
    after = _state(scm.image_model)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and changed <= names
    with pytest.raises(ValueError, match="trainable"):
        create_cft_trainer(scm, predictor, loader, elbo_constraint=1.0, trainable="decoder", stats=False)


class _RecordingScaler:
    """A gradient scaler with a scale of 4 that records its calls (AMP's scaler works on CUDA only)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def scale(self, loss):
        self.calls.append("scale")
        return loss * 4.0

    def unscale_(self, optimizer):
        self.calls.append("unscale")
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad /= 4.0

    def step(self, optimizer):
        self.calls.append("step")
        optimizer.step()

    def update(self):
        self.calls.append("update")

    def get_scale(self):
        return 4.0


def test_amp_runs_the_forward_pass_under_autocast_and_scales_the_loss(loader, monkeypatch):
    entered = []

    class _Autocast:  # torch.autocast("cuda") needs a GPU; record that the fine-tuner asks for it
        def __init__(self, device_type, **kwargs):
            entered.append((device_type, kwargs))

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

    multipliers = {}
    for amp in (False, True):
        scm, predictor = _models()
        optimizer = torch.optim.AdamW(scm.image_model.parameters(), lr=1e-3)
        tuner = CounterfactualFineTuner(
            "cpu",
            1,
            loader,
            scm,
            optimizer,
            predictor,
            mode="soft",
            elbo_constraint=2.0,
            epoch_length=1,
            seed=0,
            amp=amp,
            amp_kwargs={"dtype": torch.bfloat16},
        )
        if amp:
            scaler = _RecordingScaler()
            monkeypatch.setattr(torch.cuda.amp, "GradScaler", lambda: scaler)  # Trainer.run() makes its scaler
            monkeypatch.setattr(torch, "autocast", _Autocast)
        tuner.run()
        multipliers[amp] = float(tuner.lagrangian.multiplier.detach())
    assert ("cuda", {"dtype": torch.bfloat16}) in entered
    assert tuner.scaler is scaler and scaler.calls == ["scale", "unscale", "step", "update"]
    # the multiplier's gradient is unscaled too: both runs take the same Lagrangian step
    assert multipliers[True] == pytest.approx(multipliers[False], rel=1e-5)
