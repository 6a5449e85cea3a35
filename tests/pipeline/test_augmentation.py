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

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from monai_cf.engines import AttributePrepareBatch, create_data_loader
from monai_cf.pipeline import (
    AugmentationStudy,
    CounterfactualPipeline,
    biased_subset,
    load_scm,
    subgroup_auc,
)
from monai_cf.pipeline.augmentation import ARMS
from monai_cf.transforms import CounterfactualBatchAugmenter
from tests.pipeline.helpers import CONFIGS, read_csv, run_bundle

AUGMENTATION = CONFIGS / "augmentation.yaml"
COLUMNS = ["overall", "sex=male", "sex=female", "race=White", "race=Asian", "race=Black"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny training run: phantom 64/32/32, mechanisms and HVAE one epoch each (the pretrained HVAE is the
    counterfactual model, cf_type "none": the study does not depend on how the image model was fine-tuned)."""
    root = tmp_path_factory.mktemp("augmentation_bundle")
    torch.set_num_threads(1)
    pipeline = CounterfactualPipeline(
        root / "data",
        root / "eval",
        root / "models",
        phantom={"n_train": 64, "n_val": 32, "n_test": 32, "seed": 0},
        batch_size=16,
        mechanisms={"max_epochs": 1},
        hvae_training={"max_epochs": 1},
        cft={"modes": ["none"]},
        progress_bar=False,
        device="cpu",
    )
    pipeline.run("mechanisms", "hvae")
    return {"root": root, "data": root / "data", "models": root / "models", "scm": load_scm(root / "models", "none")}


class RecordingAugmenter(CounterfactualBatchAugmenter):
    """Keeps, per training step, the raw batch, the augmented batch and what reached the classifier."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[dict[str, Any]] = []

    def augment(self, batch: Any) -> dict:
        out = super().augment(batch)
        self.seen.append({"raw": batch, "augmented": out, "interventions": list(self.last_interventions)})
        return out

    def __call__(self, batchdata: Any, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        image, targets = super().__call__(batchdata, device, non_blocking, **kwargs)
        self.seen[-1].update(image=image.detach().clone(), targets={k: v.clone() for k, v in targets.items()})
        return image, targets


class RecordingStudy(AugmentationStudy):
    def augmenter(self, seed: int) -> RecordingAugmenter:
        self.recorder = RecordingAugmenter(self.scm, attributes=self.attributes, prob=self.prob).set_random_state(seed)
        return self.recorder


def test_bundle_config_runs_both_arms_and_writes_the_table(trained, tmp_path):
    out = tmp_path / "augmentation"
    run_bundle(
        AUGMENTATION,
        dataset_dir=str(trained["data"]),
        models_dir=str(trained["models"]),
        output_dir=str(out),
        cf_type="none",
        max_epochs=1,
        batch_size=16,
    )
    results = json.loads((out / "results.json").read_text())
    assert [(r["seed"], r["arm"]) for r in results["runs"]] == [(0, ARMS[0]), (0, ARMS[1])]
    test_counts = results["test_set"]
    assert sum(v for k, v in test_counts.items() if k.startswith("disease=")) == 32
    assert sum(v for k, v in test_counts.items() if k.startswith("race=") and "," not in k) == 32
    for run in results["runs"]:
        assert list(run["auc"]) == COLUMNS
        for key, value in run["auc"].items():
            if value is None:  # only a subgroup holding a single disease class has no AUC
                assert key != "overall"
            else:
                assert 0.0 <= value <= 1.0
        assert run["steps"] == math.ceil(run["n_train"] / 16)
    # the default selection: diseased women, healthy men and Black patients under-represented in training
    subset = results["training_subset"]["0"]
    assert results["settings"]["selection"][2] == {"where": {"race": "Black"}, "keep": 0.25}
    full = read_csv(trained["data"] / "train.csv")
    assert subset.get("race=Black", 0) < sum(row["race"] == "Black" for row in full)
    diseased_women = sum(row["sex"] == "female" and row["disease"] == "pleural_effusion" for row in full)
    assert subset.get("sex=female,disease=pleural_effusion", 0) < 0.5 * diseased_women
    assert (
        subset["sex=male,disease=pleural_effusion"] + subset.get("sex=female,disease=pleural_effusion", 0)
        == (subset["disease=pleural_effusion"])
    )
    marginals = {k: v for k, v in subset.items() if "," not in k}
    assert sum(v for k, v in marginals.items() if k.startswith("sex=")) == results["runs"][0]["n_train"] < 64
    augmented = results["runs"][1]
    assert augmented["augmentation_path"] == "batched" and augmented["counterfactual_images"] > 0
    table = (out / "results.md").read_text()
    assert "| arm | " + " | ".join(COLUMNS) + " |" in table
    for row in (*ARMS, "difference"):
        assert f"| {row} |" in table
    baseline = results["runs"][0]["auc"]["overall"]
    assert f"| {ARMS[0]} | {baseline:.3f} |" in table


def test_augmentation_changes_images_and_keeps_the_disease_label(trained):
    """do(sex) / do(race): disease is no descendant, so the classifier's target stays the real disease."""
    data = trained["data"]
    study = RecordingStudy(
        trained["scm"], data / "train.csv", data / "test.csv", selection=[], prob=1.0, max_epochs=1, batch_size=16
    )
    classifier, record = study.train_classifier(study.train_data, seed=0, augment=True)
    seen = study.recorder.seen
    assert len(seen) == record["steps"] == 4 and record["counterfactual_images"] == 64
    for step in seen:
        raw, augmented = step["raw"], step["augmented"]
        assert all(do is not None and set(do) <= {"sex", "race"} and len(do) == 1 for do in step["interventions"])
        raw_image = torch.as_tensor(raw["image"]).float()
        assert step["image"].shape == raw_image.shape
        change = (step["image"] - raw_image).abs().flatten(1).mean(1)
        assert bool((change > 1e-3).all()), change
        torch.testing.assert_close(step["targets"]["disease"].flatten(), torch.as_tensor(raw["disease"]).float())
        for i, do in enumerate(step["interventions"]):
            (name, value), other = next(iter(do.items())), ({"sex", "race"} - set(do)).pop()
            assert int(augmented[name][i]) == value != int(raw[name][i])
            assert int(augmented[other][i]) == int(raw[other][i])
            assert int(augmented["disease"][i]) == int(raw["disease"][i])
    # the arm without augmentation never builds an augmenter
    study.recorder = None
    _, plain = study.train_classifier(study.train_data, seed=0, augment=False)
    assert plain["steps"] == 4 and "counterfactual_images" not in plain and study.recorder is None
    assert not classifier.training


def test_disease_follows_the_counterfactual_under_do_age(trained):
    """do(age) reaches disease (age -> disease): the target is the counterfactual's disease."""
    data = trained["data"]
    study = AugmentationStudy(
        trained["scm"], data / "train.csv", data / "test.csv", attributes=["age"], selection=[], prob=1.0
    )
    augmenter = study.augmenter(seed=0)
    augmenter.prepare_batch = AttributePrepareBatch(study.graph, attributes=["disease"])
    batch = next(iter(create_data_loader(study.train_data, batch_size=64, shuffle=False)))
    augmented = augmenter.augment(batch)
    augmenter.set_random_state(seed=0)
    _, targets = augmenter(batch)
    torch.testing.assert_close(targets["disease"].flatten(), torch.as_tensor(augmented["disease"]).float())
    assert all(set(do) == {"age"} for do in augmenter.last_interventions)
    assert not torch.equal(torch.as_tensor(augmented["age"]).float(), torch.as_tensor(batch["age"]).float())


def test_transform_path_runs_both_arms(trained, tmp_path):
    data = trained["data"]
    quarter = [{"where": {}, "keep": 0.25}]
    study = AugmentationStudy(
        trained["scm"],
        data / "train.csv",
        data / "test.csv",
        tmp_path,
        selection=quarter,
        max_epochs=1,
        batch_size=32,
        augmentation_path="transform",
    )
    results = study.run()
    assert [r["arm"] for r in results["runs"]] == list(ARMS)
    assert results["runs"][1]["augmentation_path"] == "transform"
    assert results["runs"][0]["n_train"] == results["runs"][1]["n_train"] < 32
    assert (tmp_path / "results.json").is_file() and (tmp_path / "results.md").is_file()


def test_biased_subset_keeps_by_rule_and_seed():
    records = [
        {"sex": sex, "race": race, "age": 60.0, "disease": disease}
        for sex in (0, 1)
        for race in (0, 1, 2)
        for disease in (0, 1)
        for _ in range(500)
    ]
    rules = [
        {"where": {"sex": "female", "disease": "pleural_effusion"}, "keep": 0.1},
        {"where": {"race": 2}, "keep": 0.5},
    ]
    subset = biased_subset(records, "mimic_cxr", rules, seed=3)
    kept = [records[i] for i in subset.indices]
    count = {}
    for r in kept:
        key = (r["sex"], r["race"], r["disease"])
        count[key] = count.get(key, 0) + 1
    assert count[(0, 0, 0)] == count[(0, 1, 1)] == 500  # untouched cells are kept whole
    assert 30 <= count[(1, 0, 1)] <= 75  # 0.1 of 500
    assert 200 <= count[(0, 2, 1)] <= 300  # 0.5 of 500
    assert 5 <= count[(1, 2, 1)] <= 50  # both rules: 0.05 of 500
    assert biased_subset(records, "mimic_cxr", rules, seed=3).indices == subset.indices
    assert biased_subset(records, "mimic_cxr", rules, seed=4).indices != subset.indices
    assert biased_subset(records, "mimic_cxr", []) is records


@pytest.mark.parametrize(
    "rule, message",
    [
        ({"where": {"colour": "red"}, "keep": 0.5}, "'colour' is not a discrete attribute"),
        ({"where": {"age": 50}, "keep": 0.5}, "'age' is not a discrete attribute"),
        ({"where": {"sex": "female"}, "keep": 1.5}, "keep must lie in"),
        ({"where": {"sex": "female"}}, "must be {'where'"),
        ({"where": {"race": "Purple"}, "keep": 0.5}, "Purple"),
    ],
)
def test_biased_subset_rejects_bad_rules(rule, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("{", r"\{")):
        biased_subset([{"sex": 0, "race": 0, "age": 50.0, "disease": 0}], "mimic_cxr", [rule])


def test_biased_subset_that_keeps_nothing_is_an_error():
    with pytest.raises(ValueError, match="keeps none"):
        biased_subset(
            [{"sex": 1, "race": 0, "age": 50.0, "disease": 0}], "mimic_cxr", [{"where": {"sex": 1}, "keep": 0}]
        )


def test_subgroup_auc_values():
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    labels = np.array([0, 0, 1, 1, 0, 0])
    sex = np.array([0, 0, 0, 0, 1, 1])
    race = np.array([0, 0, 1, 1, 2, 2])
    auc = subgroup_auc(scores, labels, {"sex": sex, "race": race}, "mimic_cxr")
    assert list(auc) == COLUMNS
    assert auc["sex=male"] == pytest.approx(0.75)  # positives 0.35, 0.8 against negatives 0.1, 0.4
    assert auc["overall"] == pytest.approx(5 / 8)  # 0.9 outranks both positives
    assert auc["sex=female"] is None and auc["race=White"] is None and auc["race=Black"] is None
    assert auc["race=Asian"] is None


def test_study_rejects_bad_settings(trained):
    data = trained["data"]
    scm = trained["scm"]
    with pytest.raises(ValueError, match="cannot also be intervened"):
        AugmentationStudy(scm, data / "train.csv", data / "test.csv", attributes=["sex", "disease"])
    with pytest.raises(ValueError, match="augmentation_path"):
        AugmentationStudy(scm, data / "train.csv", data / "test.csv", augmentation_path="gpu")
    with pytest.raises(ValueError, match="binary attribute"):
        AugmentationStudy(scm, data / "train.csv", data / "test.csv", target="race", attributes=["sex"])
    with pytest.raises(ValueError, match="no CSV file"):
        AugmentationStudy(scm, Path(data) / "missing.csv", data / "test.csv")
