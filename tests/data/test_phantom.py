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

import csv
import json

import numpy as np
import pytest
from PIL import Image

from monai_cf.data import NOISE_KEYS, SyntheticCXR, disease_probability
from monai_cf.data.phantom import main


@pytest.fixture(scope="module")
def phantom_samples():
    phantom = SyntheticCXR(spatial_size=32, seed=7)
    return phantom, phantom.sample(24)


def _first(samples, **conditions):
    for s in samples:
        if all(s[k] == v for k, v in conditions.items()):
            return s
    raise AssertionError(f"no sample with {conditions}")


def _subset(batch, index):
    subset = {k: v[index] for k, v in batch.items() if k != "noise"}
    subset["noise"] = {k: v[index] for k, v in batch["noise"].items()}
    return subset


def test_same_seed_same_samples_and_other_seed_differs():
    a = SyntheticCXR(spatial_size=32, seed=3).sample_batch(6)
    b = SyntheticCXR(spatial_size=32, seed=3).sample_batch(6)
    c = SyntheticCXR(spatial_size=32, seed=4).sample_batch(6)
    np.testing.assert_array_equal(a["image"], b["image"])
    for key in ("sex", "race", "age", "disease"):
        np.testing.assert_array_equal(a[key], b[key])
    for key in NOISE_KEYS:
        np.testing.assert_array_equal(a["noise"][key], b["noise"][key])
    assert not np.array_equal(a["age"], c["age"])
    assert np.abs(a["image"] - c["image"]).mean() > 0.01


def test_stream_continues_and_does_not_depend_on_call_sizes():
    split = SyntheticCXR(spatial_size=32, seed=5)
    first, second = split.sample(3), split.sample(2)
    whole = SyntheticCXR(spatial_size=32, seed=5).sample(5)
    for got, expected in zip(first + second, whole):
        np.testing.assert_array_equal(got["image"], expected["image"])
        assert got["noise"] == expected["noise"] and got["age"] == expected["age"]
    assert first[0]["noise"] != second[0]["noise"]


def test_sample_layout_and_8bit_values(phantom_samples):
    _, samples = phantom_samples
    s = samples[0]
    assert set(s) == {"image", "sex", "race", "age", "disease", "noise"}
    assert s["image"].shape == (1, 32, 32) and s["image"].dtype == np.float32
    assert isinstance(s["sex"], int) and isinstance(s["race"], int) and isinstance(s["disease"], int)
    assert isinstance(s["age"], float) and 18.0 <= s["age"] <= 95.0
    assert set(s["noise"]) == set(NOISE_KEYS) and isinstance(s["noise"]["texture_seed"], int)
    levels = s["image"] * 255.0
    np.testing.assert_array_equal(levels, np.round(levels))
    assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
    # dark lungs beside a bright mediastinum: the centre column is brighter than the mid-lung fields
    image = s["image"][0]
    assert image[8:18, 15:17].mean() > image[8:18, 7:10].mean() + 0.15


def test_attribute_distributions():
    batch = SyntheticCXR(seed=1).sample_batch(4000, render=False)
    assert "image" not in batch
    assert abs(batch["sex"].mean() - 0.5) < 0.03
    np.testing.assert_allclose(np.bincount(batch["race"], minlength=3) / 4000, [0.6, 0.2, 0.2], atol=0.03)
    assert abs(batch["age"].mean() - 62.0) < 1.5 and batch["age"].min() >= 18.0 and batch["age"].max() <= 95.0
    assert 0.35 <= batch["disease"].mean() <= 0.5
    old, young = batch["age"] >= 70, batch["age"] < 50
    assert batch["disease"][old].mean() > batch["disease"][young].mean() + 0.3
    severity = batch["noise"]["effusion_severity"]
    assert 0.0 <= severity.min() and severity.max() <= 1.0 and (severity < 0.1).mean() > 0.2  # many mild cases


def test_null_intervention_is_identity(phantom_samples):
    phantom, samples = phantom_samples
    for s in samples[:4]:
        cf = phantom.counterfactual(s, do={})
        np.testing.assert_array_equal(cf["image"], s["image"])
        assert cf["noise"] == s["noise"]
        assert (cf["sex"], cf["race"], cf["age"], cf["disease"]) == (s["sex"], s["race"], s["age"], s["disease"])


def test_do_sex_changes_image_keeps_noise_and_other_attributes(phantom_samples):
    phantom, samples = phantom_samples
    s = _first(samples, sex=0)
    cf = phantom.counterfactual(s, do={"sex": 1})
    assert cf["sex"] == 1
    assert (cf["race"], cf["age"], cf["disease"]) == (s["race"], s["age"], s["disease"])
    assert cf["noise"] == s["noise"]
    assert np.abs(cf["image"] - s["image"]).mean() > 0.005
    back = phantom.counterfactual(cf, do={"sex": 0})
    np.testing.assert_array_equal(back["image"], s["image"])  # reversible: the noise is the same


def test_class_name_do_values(phantom_samples):
    phantom, samples = phantom_samples
    s = _first(samples, sex=0)
    by_name = phantom.counterfactual(s, do={"sex": "female", "race": "Black"})
    by_index = phantom.counterfactual(s, do={"sex": 1, "race": 2})
    assert by_name["sex"] == 1 and by_name["race"] == 2
    np.testing.assert_array_equal(by_name["image"], by_index["image"])
    with pytest.raises(ValueError, match="race"):
        phantom.counterfactual(s, do={"race": "Martian"})


def test_unknown_attribute_raises(phantom_samples):
    phantom, samples = phantom_samples
    with pytest.raises(ValueError, match="'bmi'"):
        phantom.counterfactual(samples[0], do={"bmi": 30})


def test_render_rejects_invalid_attribute_values(phantom_samples):
    phantom, samples = phantom_samples
    batch = phantom.collate(samples[:2])
    with pytest.raises(ValueError, match="'race'"):
        phantom.render({**batch, "race": np.array([0, 5])}, batch["noise"])
    with pytest.raises(ValueError, match="'age'"):
        phantom.render({**batch, "age": np.array([50.0, 130.0])}, batch["noise"])


def test_do_race_is_a_subtle_global_cue(phantom_samples):
    phantom, samples = phantom_samples
    s = _first(samples, race=0)
    diff = phantom.counterfactual(s, do={"race": "Black"})["image"] - s["image"]
    assert 0.003 < np.abs(diff).mean() < 0.05  # visible to a predictor, not to the eye
    assert (np.abs(diff) > 0).mean() > 0.3  # spread over the body, not a local feature


def test_do_age_recomputes_disease_from_stored_noise():
    phantom = SyntheticCXR(spatial_size=32, seed=11)
    samples = phantom.sample(200)
    # a young healthy patient whose u_disease is low enough that ageing to 95 flips the disease
    s = next(s for s in samples if s["disease"] == 0 and s["noise"]["u_disease"] < disease_probability(95.0))
    assert s["noise"]["u_disease"] >= disease_probability(s["age"])
    cf = phantom.counterfactual(s, do={"age": 95.0})
    assert cf["age"] == 95.0 and cf["disease"] == 1
    assert cf["noise"]["u_disease"] == s["noise"]["u_disease"]
    # the other way: an ill patient whose u_disease exceeds p(18) recovers when made 18
    ill = next(s for s in samples if s["disease"] == 1 and s["noise"]["u_disease"] >= disease_probability(18.0))
    assert phantom.counterfactual(ill, do={"age": 18.0})["disease"] == 0
    # intervening on disease too overrides the recomputation
    assert phantom.counterfactual(s, do={"age": 95.0, "disease": 0})["disease"] == 0
    # and do(disease) leaves age alone (disease is not a parent of age)
    assert phantom.counterfactual(s, do={"disease": 1})["age"] == s["age"]


def test_do_disease_changes_the_lower_lung_fields():
    phantom = SyntheticCXR(spatial_size=64, seed=2)
    batch = phantom.sample_batch(60)
    healthy = np.flatnonzero((batch["disease"] == 0) & (batch["noise"]["effusion_severity"] > 0.3))
    assert len(healthy) >= 3
    cf = phantom.counterfactual_batch(_subset(batch, healthy), do={"disease": "pleural_effusion"})
    assert (cf["disease"] == 1).all()
    diff = np.abs(cf["image"] - batch["image"][healthy])[:, 0]
    lower = diff[:, 32:, :].sum(axis=(1, 2))
    assert (lower / diff.sum(axis=(1, 2)) > 0.95).all()  # fluid collects at the lung bases
    assert (cf["image"] >= batch["image"][healthy] - 1e-6).all()  # an opacity only brightens


def test_batched_counterfactual_with_per_row_values(phantom_samples):
    phantom, samples = phantom_samples
    batch = phantom.collate(samples[:4])
    ages = [20.0, 40.0, 60.0, 80.0]
    cf = phantom.counterfactual_batch(batch, do={"age": ages, "race": "Asian"})
    np.testing.assert_array_equal(cf["age"], ages)
    np.testing.assert_array_equal(cf["race"], [1, 1, 1, 1])
    for i, s in enumerate(samples[:4]):
        single = phantom.counterfactual(s, do={"age": ages[i], "race": 1})
        np.testing.assert_array_equal(cf["image"][i], single["image"])
        assert cf["disease"][i] == single["disease"]
    with pytest.raises(ValueError, match="age"):
        phantom.counterfactual_batch(batch, do={"age": [50.0, 60.0]})


def test_batch_rendering_equals_per_sample_rendering():
    phantom = SyntheticCXR(spatial_size=48, seed=9, chunk_size=5)
    batch = phantom.sample_batch(12)
    for i in range(12):
        single = phantom.render(
            {k: batch[k][i : i + 1] for k in ("sex", "race", "age", "disease")},
            {k: v[i : i + 1] for k, v in batch["noise"].items()},
        )
        np.testing.assert_array_equal(single[0], batch["image"][i])
    other_chunks = SyntheticCXR(spatial_size=48, seed=9, chunk_size=64).render(batch, batch["noise"])
    np.testing.assert_array_equal(other_chunks, batch["image"])


@pytest.mark.parametrize("size", [32, 64, 128, 192])
def test_sizes_render_the_same_patient(size):
    phantom = SyntheticCXR(spatial_size=size, seed=4)
    batch = phantom.sample_batch(2)
    assert batch["image"].shape == (2, 1, size, size)
    reference = SyntheticCXR(spatial_size=32, seed=4).sample_batch(2)["image"]
    factor = size // 32
    pooled = batch["image"].reshape(2, 1, 32, factor, 32, factor).mean(axis=(3, 5))
    assert np.abs(pooled - reference).mean() < 0.03


def test_write_round_trip_and_refuses_overwrite(tmp_path):
    phantom = SyntheticCXR(spatial_size=32, seed=6)
    written = phantom.write(tmp_path, n_train=5, n_val=2, n_test=3)
    assert set(written) == {"train", "val", "test"}
    settings = json.loads((tmp_path / "phantom.json").read_text())
    assert settings["spatial_size"] == 32 and settings["seed"] == 6 and "version" in settings
    enc = phantom.encoder
    seen_ages = set()
    for split, count in (("train", 5), ("val", 2), ("test", 3)):
        with open(tmp_path / f"{split}.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == count and list(rows[0]) == ["patient_id", "path", "sex", "race", "age", "disease"]
        noise = SyntheticCXR.read_noise(tmp_path, split)
        assert list(noise["patient_id"]) == [r["patient_id"] for r in rows]
        attributes = {
            "sex": [enc.canonical("sex", r["sex"]) for r in rows],
            "race": [enc.canonical("race", r["race"]) for r in rows],
            "age": [float(r["age"]) for r in rows],
            "disease": [enc.canonical("disease", r["disease"]) for r in rows],
        }
        # the CSV attributes are the SCM's attributes of the stored noise, age exactly
        expected = SyntheticCXR.attributes_from_noise(noise)
        for key, values in attributes.items():
            np.testing.assert_array_equal(values, expected[key])
        images = phantom.render(attributes, noise)
        for row, image in zip(rows, images):
            assert row["path"] == f"images/{split}/{row['patient_id']}.png"
            pixels = np.asarray(Image.open(tmp_path / row["path"]), dtype=np.float32) / 255.0
            np.testing.assert_array_equal(pixels, image[0])
        seen_ages.update(float(a) for a in attributes["age"])
    assert len(seen_ages) == 10  # splits are disjoint draws
    regenerated = SyntheticCXR.from_directory(tmp_path)
    assert (regenerated.spatial_size, regenerated.seed) == (32, 6)
    with pytest.raises(FileExistsError, match="overwrite"):
        phantom.write(tmp_path, n_train=1, n_val=1, n_test=1)
    phantom.write(tmp_path, n_train=2, n_val=1, n_test=1, overwrite=True)
    assert len(list((tmp_path / "images" / "train").glob("*.png"))) == 2
    # a split does not depend on the size of the others
    with open(tmp_path / "test.csv", newline="") as handle:
        assert next(csv.DictReader(handle))["age"] == repr(float(attributes["age"][0]))


def test_command_line(tmp_path):
    main(f"write --out_dir {tmp_path / 'data'} --n_train 2 --n_val 1 --n_test 1 --spatial_size 32 --seed 1".split())
    assert (tmp_path / "data" / "train.csv").is_file() and (tmp_path / "data" / "test_noise.npz").is_file()
    main(["grid", "--out", str(tmp_path / "grid.png"), "--n", "2", "--spatial_size", "32"])
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size[0] > 400 and grid.size[1] > 150
