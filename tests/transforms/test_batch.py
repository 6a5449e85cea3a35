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

import pytest
import torch
from monai.data import MetaTensor, list_data_collate
from monai.engines import SupervisedEvaluator
from monai.engines.utils import PrepareBatch

from monai_cf.transforms import CounterfactualBatchAugmenter, Counterfactuald, CounterfactualPaird, RandCounterfactuald
from tests.transforms import ATTRIBUTES, make_items, make_scm


@pytest.fixture(scope="module")
def scm():
    return make_scm()


def _assert_batch_matches_samples(batch_out, sample_outs, keys):
    for i, sample in enumerate(sample_outs):
        for key in keys:
            if key.startswith(("image", "flipped")):
                assert torch.allclose(batch_out[key][i].as_tensor(), sample[key].as_tensor(), atol=1e-5), (key, i)
            elif key.startswith("pa"):
                assert torch.equal(batch_out[key][i], sample[key]), (key, i)
            else:
                assert batch_out[key][i].item() == pytest.approx(sample[key], rel=1e-6, abs=0), (key, i)


def test_batched_random_augmentation_equals_the_per_sample_transform(scm):
    items = make_items(12)
    kwargs = {"attributes": ["sex", "race", "age"], "prob": 0.75}
    transform = RandCounterfactuald("image", scm, **kwargs).set_random_state(7)
    per_sample, interventions = [], []
    for item in items:
        per_sample.append(transform(item))
        interventions.append(transform.last_intervention)
    augmenter = CounterfactualBatchAugmenter(scm, **kwargs).set_random_state(7)
    batch = list_data_collate(items)
    out = augmenter.augment(batch)
    assert augmenter.last_interventions == interventions
    kinds = {next(iter(do)) for do in interventions if do}
    assert None in interventions and kinds == {"sex", "race", "age"}  # per-sample, mixed interventions
    _assert_batch_matches_samples(out, per_sample, ["image", *ATTRIBUTES, "pa"])
    assert isinstance(out["image"], MetaTensor) and out["image"].dtype == batch["image"].dtype
    assert [m for m in out["image"].meta["filename_or_obj"]] == [f"phantom_{i:03d}.png" for i in range(12)]
    for i, do in enumerate(interventions):
        if do is None:  # untouched samples are copied bit for bit
            assert torch.equal(out["image"][i], batch["image"][i])
    assert out["age"].dtype == batch["age"].dtype and out["sex"].dtype == batch["sex"].dtype
    assert torch.equal(batch["sex"], list_data_collate(items)["sex"])  # the input batch is not modified


def test_batched_fixed_intervention_equals_counterfactuald(scm):
    items = make_items(10)
    transform = Counterfactuald("image", scm, do={"age": 90.0}, seed=3)
    per_sample = [transform(item) for item in items]
    out = CounterfactualBatchAugmenter(scm, do={"age": 90.0}, seed=3).augment(list_data_collate(items))
    _assert_batch_matches_samples(out, per_sample, ["image", *ATTRIBUTES, "pa"])
    assert any(out["disease"][i].item() != items[i]["disease"] for i in range(10))


def test_batched_pairs_equal_counterfactual_paird(scm):
    items = make_items(8)
    kwargs = {"attributes": ["race", "age"], "prob": 0.6}
    pair = CounterfactualPaird("image", scm, **kwargs).set_random_state(2)
    per_sample = [pair(item) for item in items]
    augmenter = CounterfactualBatchAugmenter(scm, mode="pair", **kwargs).set_random_state(2)
    batch = list_data_collate(items)
    out = augmenter.augment(batch)
    cf_keys = ["image_cf", *(f"{n}_cf" for n in ATTRIBUTES), "pa_cf"]
    _assert_batch_matches_samples(out, per_sample, cf_keys)
    for key in ("image", *ATTRIBUTES, "pa"):
        assert out[key] is batch[key]


def test_prob_zero_leaves_the_batch_unchanged(scm):
    batch = list_data_collate(make_items(4))
    out = CounterfactualBatchAugmenter(scm, attributes=["sex"], prob=0.0).augment(batch)
    assert all(out[key] is batch[key] or torch.equal(out[key], batch[key]) for key in ("image", *ATTRIBUTES, "pa"))
    assert torch.equal(out["image"], batch["image"])


def test_as_prepare_batch_in_a_monai_engine(scm):
    items = make_items(8)
    seen = []

    def inner(batchdata, device=None, non_blocking=False, **kwargs):
        seen.append(batchdata)
        return batchdata["image"].to(device), batchdata["sex"].to(device)

    augmenter = CounterfactualBatchAugmenter(scm, do={"sex": "female"}, prepare_batch=inner)
    assert isinstance(augmenter, PrepareBatch)
    image, sex = augmenter(list_data_collate(items), device="cpu")
    assert torch.equal(sex, torch.ones(8, dtype=sex.dtype))
    assert image.shape == (8, 1, 16, 16)

    default = CounterfactualBatchAugmenter(scm, attributes=["race"])  # MONAI's default_prepare_batch: (image, None)
    image, label = default(list_data_collate(items), device="cpu")
    assert label is None and image.shape == (8, 1, 16, 16)

    loader = [list_data_collate(items[:4]), list_data_collate(items[4:])]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        epoch_length=2,
        network=torch.nn.Identity(),
        prepare_batch=augmenter,
    )
    seen.clear()
    evaluator.run()
    assert len(seen) == 2 and all(torch.equal(b["sex"], torch.ones(4, dtype=b["sex"].dtype)) for b in seen)


def test_batch_arguments_are_validated(scm):
    with pytest.raises(ValueError, match="bmi"):
        CounterfactualBatchAugmenter(scm, attributes=["sex", "bmi"])
    with pytest.raises(ValueError, match="either"):
        CounterfactualBatchAugmenter(scm, attributes=["sex"], do={"sex": 1})
    with pytest.raises(ValueError, match="mode"):
        CounterfactualBatchAugmenter(scm, attributes=["sex"], mode="swap")
    with pytest.raises(ValueError, match="race"):
        CounterfactualBatchAugmenter(scm, do={"race": "Martian"})
    augmenter = CounterfactualBatchAugmenter(scm, attributes=["sex"])
    batch = list_data_collate(make_items(2))
    del batch["age"]
    with pytest.raises(ValueError, match="age"):
        augmenter.augment(batch)


def test_several_image_keys_match_the_per_sample_transform(scm):
    items = [{**item, "flipped": item["image"].flip(-1)} for item in make_items(6)]
    kwargs = {"attributes": ["age", "sex"], "prob": 1.0}
    transform = RandCounterfactuald(["image", "flipped"], scm, **kwargs).set_random_state(4)
    per_sample = [transform(item) for item in items]
    out = CounterfactualBatchAugmenter(scm, image_keys=["image", "flipped"], **kwargs).set_random_state(4)
    out = out.augment(list_data_collate(items))
    _assert_batch_matches_samples(out, per_sample, ["image", "flipped", *ATTRIBUTES, "pa"])
