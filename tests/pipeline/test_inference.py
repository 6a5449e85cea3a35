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
"""Counterfactuals for user images from the models a (tiny) training run left behind."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from monai_cf.data import AttributeEncoder
from monai_cf.graph import CausalGraph
from monai_cf.pipeline import CounterfactualInference, load_checkpoint, load_scm, parse_intervention
from tests.pipeline.helpers import INFERENCE, TINY, TRAIN, is_png, messages, read_csv, run_bundle

ATTRIBUTES = ["sex", "race", "age", "disease"]
COLUMNS = ["source", "counterfactual", "attributes_from", *ATTRIBUTES, *(f"cf_{a}" for a in ATTRIBUTES)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every model inference needs (predictors, mechanisms, HVAE, fine-tuned HVAEs), trained once."""
    root = tmp_path_factory.mktemp("bundle")
    run_bundle(TRAIN, run_id="run_cft", bundle_root=str(root), **TINY)
    data = root / "data" / "phantom"
    return {"root": root, "models": root / "models", "data": data, "test": read_csv(data / "test.csv")}


def _check_images(out, rows, count):
    assert len(rows) == count
    files = sorted((out / "images").glob("*.png"))
    assert len(files) == count and [str(f) for f in files] == sorted(r["counterfactual"] for r in rows)
    for path in files:
        assert is_png(path)
        with Image.open(path) as image:
            assert image.size == (32, 32) and image.mode == "L"
    assert read_csv(out / "counterfactuals.csv") == [{k: str(v) for k, v in r.items()} for r in rows]


def test_csv_input(trained, tmp_path):
    out = tmp_path / "cf"
    rows = CounterfactualInference(trained["models"], trained["data"] / "test.csv", "{'sex': 'female'}", out).run()
    _check_images(out, rows, 16)
    assert list(read_csv(out / "counterfactuals.csv")[0]) == COLUMNS
    for row, source in zip(rows, trained["test"]):
        assert row["attributes_from"] == "csv" and row["source"].endswith(source["path"])
        assert row["cf_sex"] == "female"
        assert (row["sex"], row["race"], row["disease"]) == (source["sex"], source["race"], source["disease"])
        assert row["age"] == pytest.approx(float(source["age"]), abs=1e-3)
        # nothing else descends from sex
        assert (row["cf_race"], row["cf_disease"]) == (row["race"], row["disease"])
        assert row["cf_age"] == pytest.approx(row["age"], abs=1e-4)
    assert {r["sex"] for r in rows} == {"male", "female"}  # both directions were exercised


def test_do_age_changes_disease_consistently(trained, tmp_path):
    rows = CounterfactualInference(trained["models"], trained["data"] / "test.csv", {"age": 90}, tmp_path, "hard").run()
    assert all(r["cf_age"] == pytest.approx(90.0) for r in rows)
    assert all((r["cf_sex"], r["cf_race"]) == (r["sex"], r["race"]) for r in rows)
    # Gumbel-max counterfactuals keep the observed class when the new parents make it likelier: a patient with the
    # disease keeps it when age raises its log-odds, one without stays healthy when age lowers them
    scm = load_scm(trained["models"], "hard")
    encoder = AttributeEncoder(scm.graph)

    def disease_log_odds(age: list[float]) -> torch.Tensor:
        n = len(rows)
        pa = {name: [encoder.canonical(name, r[name]) for r in rows] for name in ("sex", "race")}
        pa["age"] = age
        log_prob = [
            scm.attribute_log_prob({**{k: torch.tensor(v) for k, v in pa.items()}, "disease": torch.full((n,), c)})
            for c in (0, 1)
        ]
        return (log_prob[1]["disease"] - log_prob[0]["disease"]).detach()

    with torch.no_grad():
        shift = disease_log_odds([90.0] * len(rows)) - disease_log_odds([float(r["age"]) for r in rows])
    checked = 0
    for row, delta in zip(rows, shift.tolist()):
        assert row["cf_disease"] in ("no_finding", "pleural_effusion")
        if row["disease"] == "pleural_effusion" and delta > 0 or row["disease"] == "no_finding" and delta < 0:
            assert row["cf_disease"] == row["disease"], (row, delta)
            checked += 1
    assert checked > 0


def test_folder_input_takes_attributes_from_the_guidance_predictor(trained, tmp_path):
    out = tmp_path / "cf"
    rows = CounterfactualInference(trained["models"], trained["data"] / "images" / "test", {"race": "Asian"}, out).run()
    _check_images(out, rows, 16)
    assert [r["source"] for r in rows] == sorted(r["source"] for r in rows)
    assert all(r["counterfactual"].endswith(f"{i:05d}_test_{i:06d}_cf.png") for i, r in enumerate(rows))
    for row in rows:
        assert row["attributes_from"] == "guidance predictor"
        assert row["sex"] in ("male", "female") and row["disease"] in ("no_finding", "pleural_effusion")
        assert 0.0 <= row["age"] <= 100.0
        assert row["cf_race"] == "Asian"
        assert (row["cf_sex"], row["cf_disease"]) == (row["sex"], row["disease"])
        assert row["cf_age"] == pytest.approx(row["age"], abs=1e-4)


def test_bundle_inference_and_overwrite_protection(trained):
    root = trained["root"]
    out = root / "eval" / "counterfactuals"
    settings = {"bundle_root": str(root), "do": "{'disease': 'pleural_effusion'}", "cf_type": "soft"}
    run_bundle(INFERENCE, **settings, overwrite="false")
    rows = read_csv(out / "counterfactuals.csv")
    assert len(rows) == 16 and {r["cf_disease"] for r in rows} == {"pleural_effusion"}
    stamp = (out / "counterfactuals.csv").stat().st_mtime_ns
    with pytest.raises(Exception) as error:
        run_bundle(INFERENCE, **settings)
    assert "exists; pass --overwrite true" in messages(error.value)
    assert (out / "counterfactuals.csv").stat().st_mtime_ns == stamp
    run_bundle(INFERENCE, **{**settings, "do": "{'sex': 'male'}"}, overwrite="true")  # as the command line gives it
    assert {r["cf_sex"] for r in read_csv(out / "counterfactuals.csv")} == {"male"}


def test_bad_input_fails_when_built(trained, tmp_path):
    models, test_csv = trained["models"], trained["data"] / "test.csv"
    cases = [
        (test_csv, {"sex": "robot"}, "'sex' has unknown category 'robot'"),
        (test_csv, {"age": 150}, "'age' value 150.0 is outside its range [0.0, 100.0]"),
        (test_csv, "{'height': 180}", "unknown attributes ['height']"),
        (tmp_path / "missing.csv", {"sex": "male"}, "does not exist"),
        (tmp_path, {"sex": "male"}, "holds no images"),
    ]
    for source, do, expected in cases:
        with pytest.raises(ValueError) as error:
            CounterfactualInference(models, source, do, tmp_path / "cf")
        assert expected in str(error.value), (do, str(error.value))
    with pytest.raises(ValueError, match="run the training bundle first"):
        CounterfactualInference(tmp_path, test_csv, {"sex": "male"}, tmp_path / "cf")
    assert not (tmp_path / "cf").exists()


def test_parse_intervention():
    graph = CausalGraph.from_name("mimic_cxr")
    assert parse_intervention("{'sex': 'female', 'age': 40}", graph) == {"sex": "female", "age": 40}
    assert parse_intervention({"race": "Black"}, graph) == {"race": "Black"}
    with pytest.raises(ValueError, match="is not a dictionary"):
        parse_intervention("sex=female", graph)
    with pytest.raises(ValueError, match="is not a dictionary"):
        parse_intervention("{'sex': 'female'", graph)
    with pytest.raises(ValueError, match="non-empty dictionary"):
        parse_intervention("{}", graph)
    with pytest.raises(ValueError, match="non-empty dictionary"):
        parse_intervention("['sex']", graph)
    with pytest.raises(ValueError, match=r"unknown attributes \['height'\]"):
        parse_intervention({"height": 1, "sex": "male"}, graph)


def test_load_scm(trained):
    models = trained["models"]
    for cf_type, name in (("none", "hvae.pt"), ("soft", "hvae_cft_soft.pt"), ("hard", "hvae_cft_hard.pt")):
        scm = load_scm(models, cf_type)
        assert not scm.training and scm.graph.attributes == ATTRIBUTES
        stored = load_checkpoint(models / name)["state_dict"]
        for key, value in scm.image_model.state_dict().items():
            torch.testing.assert_close(value, stored[key])
        mechanisms = load_checkpoint(models / "mechanisms.pt")["state_dict"]
        assert all(torch.equal(v, mechanisms[k]) for k, v in scm.mechanisms.state_dict().items())
    assert not torch.equal(
        load_checkpoint(models / "hvae.pt")["state_dict"]["encoder.stem.weight"],
        load_checkpoint(models / "hvae_cft_soft.pt")["state_dict"]["encoder.stem.weight"],
    )
    with pytest.raises(ValueError, match="cf_type must be"):
        load_scm(models, "medium")
    with pytest.raises(ValueError, match="No checkpoint"):
        load_scm(models / "nowhere")


def test_folder_scan_reads_every_format_the_csv_loader_reads(tmp_path):
    from monai_cf.data import IMAGE_SUFFIXES as FORMAT_SUFFIXES
    from monai_cf.pipeline.inference import _image_files

    names = [f"image{i}{suffix}" for i, suffixes in enumerate(FORMAT_SUFFIXES.values()) for suffix in suffixes]
    for name in [*names, "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert sorted(p.name for p in _image_files(tmp_path)) == sorted(names)
    assert any(name.endswith(".dicom") for name in names)
