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

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Compose

from monai_cf.data import EncodeAttributesd
from monai_cf.transforms import (
    CounterfactualD,
    Counterfactuald,
    CounterfactualDict,
    CounterfactualPairD,
    CounterfactualPaird,
    RandCounterfactualD,
    RandCounterfactuald,
    RandCounterfactualDict,
)
from tests.transforms import ATTRIBUTES, attributes_of, make_items, make_scm


@pytest.fixture(scope="module")
def scm():
    return make_scm()


def _reference(scm, item, do, seed):
    """What DeepSCM.counterfactual gives for one item under ``do``, with the transform's noise seed."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x_cf, pa_cf = scm.counterfactual(item["image"].as_tensor()[None], attributes_of(item), do, generator=generator)
    return x_cf[0], {name: value.item() for name, value in pa_cf.items()}


def _check_attributes(out, item, reference, intervention, suffix=""):
    """Attributes the intervention reaches equal DeepSCM's values exactly; the others are the input's objects."""
    reached = set(intervention) | ({"disease"} if "age" in intervention else set())
    for name in ATTRIBUTES:
        if name in reached:
            assert out[name + suffix] == reference[name], name
        else:
            assert out[name + suffix] is item[name] or out[name + suffix] == item[name], name


def test_prob_zero_is_the_identity(scm):
    items = make_items(4)
    for transform in (
        RandCounterfactuald("image", scm, attributes=["sex", "race", "age"], prob=0.0),
        Compose([RandCounterfactuald("image", scm, attributes=["age"], prob=0.0)]),
    ):
        for item in items:
            out = transform(item)
            assert set(out) == set(item)
            for key in item:
                assert out[key] is item[key], key


def test_same_seed_same_outputs_different_seeds_differ(scm):
    items = make_items(8)

    def run(seed):
        transform = RandCounterfactuald("image", scm, attributes=["sex", "race", "age"], prob=0.7)
        assert transform.set_random_state(seed) is transform
        outs, interventions = [], []
        for item in items:
            outs.append(transform(item))
            interventions.append(transform.last_intervention)
        return outs, interventions

    first, do_first = run(5)
    second, do_second = run(5)
    other, do_other = run(6)
    assert do_first == do_second
    assert any(do is not None for do in do_first) and any(do is None for do in do_first)
    for a, b in zip(first, second):
        assert torch.equal(a["image"], b["image"])
        assert all(a[name] == b[name] for name in ATTRIBUTES)
        assert torch.equal(a["pa"], b["pa"])
    assert do_first != do_other
    assert any(not torch.equal(a["image"], c["image"]) for a, c in zip(first, other))


def test_do_age_updates_disease_as_the_scm_does(scm):
    items = make_items(24)
    transform = Counterfactuald("image", scm, do={"age": 95.0})
    flips = 0
    for item in items:
        out = transform(item)
        assert transform.last_intervention == {"age": 95.0}
        assert transform.last_seed is not None  # disease is a discrete descendant: its noise is seeded
        x_ref, pa_ref = _reference(scm, item, {"age": 95.0}, transform.last_seed)
        _check_attributes(out, item, pa_ref, {"age": 95.0})
        assert torch.allclose(out["image"].as_tensor(), x_ref, atol=1e-6)
        expected_pa = EncodeAttributesd("mimic_cxr")({name: out[name] for name in ATTRIBUTES})["pa"]
        assert torch.equal(out["pa"], expected_pa)
        assert (out["sex"], out["race"]) == (item["sex"], item["race"])
        flips += out["disease"] != item["disease"]
    assert 0 < flips < len(items)  # the strong disease mechanism flips some diagnoses, not all
    # deterministic: the same sample gives the same result, including the disease draw
    again = transform(items[0])
    assert torch.equal(again["image"], transform(items[0])["image"])


def test_random_interventions_match_the_scm_and_always_change_the_value(scm):
    items = make_items(16)
    transform = RandCounterfactuald(
        "image", scm, attributes=["sex", "race", "age", "disease"], prob=1.0, values={"race": ["White", "Black"]}
    ).set_random_state(0)
    seen = set()
    for _ in range(3):
        for item in items:
            out = transform(item)
            ((name, value),) = transform.last_intervention.items()
            seen.add(name)
            assert value != item[name]
            assert out[name] == value
            if name == "race":
                assert value in (0, 2)  # White or Black only
            x_ref, pa_ref = _reference(scm, item, transform.last_intervention, transform.last_seed)
            _check_attributes(out, item, pa_ref, transform.last_intervention)
            assert torch.allclose(out["image"].as_tensor(), x_ref, atol=1e-6)
            assert not torch.equal(out["image"], item["image"])
    assert seen == {"sex", "race", "age", "disease"}


def test_mechanism_sampling_draws_other_values_in_range(scm):
    items = make_items(8)
    transform = RandCounterfactuald("image", scm, attributes=["race", "age"], prob=1.0, sampling="mechanism")
    transform.set_random_state(3)
    for item in items * 2:
        out = transform(item)
        ((name, value),) = transform.last_intervention.items()
        assert value != item[name] and out[name] == value
        if name == "age":
            assert 0.0 <= value <= 100.0


def test_types_dtypes_shapes_and_metadata_are_preserved(scm):
    item = make_items(1)[0]
    out = Counterfactuald("image", scm, do={"age": 20.0, "sex": "female"})(item)
    assert isinstance(out["image"], MetaTensor)
    assert out["image"].shape == item["image"].shape and out["image"].dtype == torch.float32
    assert out["image"].meta["filename_or_obj"] == "phantom_000.png"
    assert isinstance(out["sex"], int) and isinstance(out["age"], float) and isinstance(out["disease"], int)
    assert out["pa"].dtype == torch.float32 and out["pa"].shape == item["pa"].shape
    assert out["row"] == item["row"]

    plain = {
        "image": item["image"].as_tensor().numpy().astype(np.float64),
        "sex": np.int64(item["sex"]),
        "race": torch.tensor(item["race"], dtype=torch.int32),
        "age": torch.tensor([item["age"]], dtype=torch.float64),
        "disease": str(item["disease"]),
    }
    out = Counterfactuald("image", scm, do={"age": 20.0, "sex": "female"}, pa_key=None)(plain)
    assert isinstance(out["image"], np.ndarray) and out["image"].dtype == np.float64
    assert out["image"].shape == (1, 16, 16)
    assert isinstance(out["sex"], np.int64) and out["sex"] == 1
    assert out["race"] is plain["race"]  # not reached by the intervention: untouched
    assert out["age"].dtype == torch.float64 and out["age"].shape == (1,) and out["age"].item() == 20.0
    assert out["disease"] in ("no_finding", "pleural_effusion")  # a raw value comes back as a class name
    assert "pa" not in out


def test_model_state_is_restored_and_no_gradients_flow():
    scm = make_scm().train()
    out = Counterfactuald("image", scm, do={"sex": 1})(make_items(1)[0])
    assert scm.training
    assert not out["image"].requires_grad


def test_pair_adds_a_counterfactual_view_and_keeps_the_real_one(scm):
    items = make_items(6)
    pair = CounterfactualPaird("image", scm, attributes=["sex", "age"], prob=1.0).set_random_state(1)
    for item in items:
        out = pair(item)
        for key in item:
            assert out[key] is item[key], key
        ((name, value),) = pair.last_intervention.items()
        assert out[f"{name}_cf"] == value != item[name]
        assert isinstance(out["image_cf"], MetaTensor) and out["image_cf"].shape == item["image"].shape
        x_ref, pa_ref = _reference(scm, item, pair.last_intervention, pair.last_seed)
        _check_attributes(out, item, pa_ref, pair.last_intervention, suffix="_cf")
        assert torch.allclose(out["image_cf"].as_tensor(), x_ref, atol=1e-6)
        expected_pa = EncodeAttributesd("mimic_cxr")({n: out[f"{n}_cf"] for n in ATTRIBUTES})["pa"]
        assert torch.equal(out["pa_cf"], expected_pa)

    copies = CounterfactualPaird("image", scm, attributes=["sex"], prob=0.0, cf_suffix="_view2")(items[0])
    assert torch.equal(copies["image_view2"], items[0]["image"]) and copies["image_view2"] is not items[0]["image"]
    assert all(copies[f"{n}_view2"] == items[0][n] for n in ATTRIBUTES)


def test_compose_dataset_and_dataloader(scm):
    raw = [{k: v for k, v in item.items() if k != "pa"} for item in make_items(8)]
    pipeline = Compose(
        [EncodeAttributesd("mimic_cxr"), RandCounterfactuald("image", scm, attributes=["sex", "race"], prob=0.5)]
    )

    def epoch(seed):
        torch.manual_seed(seed)  # with num_workers=0, MONAI's DataLoader reseeds the transforms from torch's RNG
        loader = DataLoader(Dataset(raw, transform=pipeline), batch_size=4, num_workers=0, shuffle=False)
        return list(loader)

    batches = epoch(0)
    assert len(batches) == 2
    batch = batches[0]
    assert batch["image"].shape == (4, 1, 16, 16) and isinstance(batch["image"], MetaTensor)
    assert batch["pa"].shape == (4, 6)
    for b in batches:
        for i in range(4):  # every sample's pa encodes its (possibly counterfactual) attributes
            values = {n: b[n][i].item() for n in ATTRIBUTES}
            assert torch.equal(b["pa"][i], EncodeAttributesd("mimic_cxr")(values)["pa"])
    changed = sum(
        int(b["sex"][i] != raw[4 * k + i]["sex"] or b["race"][i] != raw[4 * k + i]["race"])
        for k, b in enumerate(batches)
        for i in range(4)
    )
    assert 0 < changed < 8
    again = epoch(0)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, again))


def test_invalid_arguments_raise_value_errors_naming_them(scm):
    with pytest.raises(ValueError, match="height"):
        RandCounterfactuald("image", scm, attributes=["sex", "height"])
    with pytest.raises(ValueError, match="height"):
        CounterfactualPaird("image", scm, attributes=["height"])
    with pytest.raises(ValueError, match="height"):
        Counterfactuald("image", scm, do={"height": 1.8})
    with pytest.raises(ValueError, match="sex"):
        Counterfactuald("image", scm, do={"sex": "unknown"})
    with pytest.raises(ValueError, match="age"):
        Counterfactuald("image", scm, do={"age": 150.0})
    with pytest.raises(ValueError, match="race"):
        RandCounterfactuald("image", scm, attributes=["race"], values={"race": ["Martian"]})
    with pytest.raises(ValueError, match="sex"):
        RandCounterfactuald("image", scm, attributes=["race"], values={"sex": [0]})
    with pytest.raises(ValueError, match="sampling"):
        RandCounterfactuald("image", scm, attributes=["race"], sampling="magic")
    with pytest.raises(ValueError, match="bmi"):
        Counterfactuald("image", scm, do={"sex": 1}, attribute_keys={"bmi": "BMI"})
    with pytest.raises(ValueError, match="DeepSCM"):
        Counterfactuald("image", torch.nn.Linear(2, 2), do={"sex": 1})
    item = make_items(1)[0]
    del item["age"]
    with pytest.raises(ValueError, match="age"):
        Counterfactuald("image", scm, do={"sex": 1})(item)


def test_aliases():
    assert CounterfactualD is CounterfactualDict is Counterfactuald
    assert RandCounterfactualD is RandCounterfactualDict is RandCounterfactuald
    assert CounterfactualPairD is CounterfactualPaird


def test_several_image_keys_share_one_intervention(scm):
    items = make_items(6)
    transform = Counterfactuald(["image", "flipped"], scm, do={"age": 95.0})
    for item in items:
        item = {**item, "flipped": item["image"].flip(-1)}
        out = transform(item)
        joint = {"age": 95.0, "disease": out["disease"]}
        x_ref, _ = _reference(scm, {**item, "image": item["flipped"]}, joint, None)
        assert torch.allclose(out["flipped"].as_tensor(), x_ref, atol=1e-6)
        single = Counterfactuald("image", scm, do={"age": 95.0})(item)
        assert torch.equal(out["image"], single["image"]) and out["disease"] == single["disease"]
