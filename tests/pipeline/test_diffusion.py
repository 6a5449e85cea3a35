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
"""The diffusion config layered over the main job's, end to end with a few iterations per stage."""

from __future__ import annotations

import json

import pytest
import torch

from monai_cf.pipeline import DIFFUSION_FILE, DiffusionPipeline, load_checkpoint, load_scm
from monai_cf.pipeline.workflow import state_checksum
from tests.pipeline.helpers import CONFIGS, INFERENCE, TINY, TRAIN, messages, read_csv, run_bundle

DIFFUSION = CONFIGS / "diffusion.yaml"
TINY_DIFFUSION = {
    **TINY,
    "diffusion_model": {
        "embed_dim": 8,
        "channels": [8, 16],
        "attention_levels": [False, True],
        "num_head_channels": 8,
        "norm_num_groups": 8,
        "num_inference_steps": 2,
    },
    "diffusion_training#max_epochs": 1,
    "diffusion_guidance": {"none": {"mode": "none"}, "dcfg": {"mode": "dcfg", "intervened_weight": 3.0}},
    "evaluation": {**TINY["evaluation"], "num_test": 8},
}


@pytest.fixture(scope="module")
def diffusion_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion_bundle")
    run_bundle([TRAIN, DIFFUSION], bundle_root=str(root), **TINY_DIFFUSION)
    return root


def test_one_report_compares_the_hvae_and_every_guidance(diffusion_run):
    metrics = json.loads((diffusion_run / "eval_diffusion" / "metrics.json").read_text())
    types = {"hvae_soft", "diffusion_none", "diffusion_dcfg"}
    assert set(metrics["amplification"]) == types
    assert set(metrics["faithfulness"]["truth_gain_mean"]) == types
    assert set(metrics["effectiveness"]["sex"]) == types
    assert metrics["config"]["num_samples"] == 8  # evaluation.num_test: the first 8 test images for every model
    report = (diffusion_run / "eval_diffusion" / "report.md").read_text()
    assert "diffusion_dcfg" in report and "hvae_soft" in report
    assert (diffusion_run / "eval_diffusion" / "counterfactuals_diffusion_dcfg.png").is_file()
    # the HVAE came from the main pipeline's stages, in the same models folder
    assert (diffusion_run / "models" / "hvae_cft_soft.pt").is_file()


def test_the_diffusion_file_carries_its_settings_and_checksum(diffusion_run):
    ckpt = load_checkpoint(diffusion_run / "models" / DIFFUSION_FILE)
    assert ckpt["checksum"] == state_checksum(ckpt["state_dict"])
    assert ckpt["settings"]["diffusion_model"]["channels"] == [8, 16]
    assert ckpt["settings"]["training"]["max_epochs"] == 1
    assert ckpt["image_model"]["parent_dims"] == {"sex": 1, "race": 3, "age": 1, "disease": 1}
    scm = load_scm(diffusion_run / "models", "diffusion", guidance={"mode": "cfg", "weight": 2.0})
    assert scm.image_model.guidance.weight == 2.0
    torch.testing.assert_close(scm.image_model.state_dict(), ckpt["state_dict"])


def test_second_run_reuses_the_diffusion_model(diffusion_run, capfd):
    uid = load_checkpoint(diffusion_run / "models" / DIFFUSION_FILE)["uid"]
    capfd.readouterr()
    run_bundle([TRAIN, DIFFUSION], run_id="run_diffusion", bundle_root=str(diffusion_run), **TINY_DIFFUSION)
    log = "".join(capfd.readouterr())
    assert load_checkpoint(diffusion_run / "models" / DIFFUSION_FILE)["uid"] == uid
    assert "Reusing diffusion" in log and "DiffusionTrainer" not in log


def test_changed_diffusion_setting_names_the_difference(diffusion_run, tmp_path):
    settings = {**TINY_DIFFUSION, "diffusion_training#max_epochs": 2}
    with pytest.raises(Exception) as error:
        run_bundle([TRAIN, DIFFUSION], run_id="run_diffusion", bundle_root=str(diffusion_run), **settings)
    text = messages(error.value)
    assert DIFFUSION_FILE in text and "training.max_epochs: 1 -> 2" in text and "--retrain" in text


def test_diffusion_inference_with_the_same_do_syntax(diffusion_run):
    out = diffusion_run / "inference"
    run_bundle(
        INFERENCE,
        bundle_root=str(diffusion_run),
        output_dir=str(out),
        cf_type="diffusion",
        guidance="{'mode': 'dcfg', 'intervened_weight': 2.0}",
        do="{'sex': 'male'}",
    )
    rows = read_csv(out / "counterfactuals.csv")
    assert len(rows) == 16 and all(row["cf_sex"] == "male" for row in rows)
    assert all(float(row["cf_age"]) == pytest.approx(float(row["age"]), abs=1e-3) for row in rows)  # not a descendant
    with pytest.raises(Exception) as error:
        run_bundle(INFERENCE, bundle_root=str(diffusion_run), output_dir=str(out.parent / "hvae"), guidance="cfg")
    assert "guidance is a setting of diffusion counterfactuals" in messages(error.value)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"guidance_types": {"dcfg": {"mode": "dcfg", "intervened_weight": -1}}}, "guidance_types.dcfg: Guidance"),
        ({"guidance_types": {"x": {"mode": "cfg++"}}}, "Unknown guidance mode 'cfg\\+\\+'"),
        ({"diffusion_training": {"device": "cpu"}}, "diffusion_training.device is set by the pipeline"),
        ({"diffusion_model": {"num_inference_steps": -2}}, "DDIM steps must be a positive integer"),
        ({"diffusion_model": {"spatial_size": 64}}, "diffusion_model.spatial_size=64"),
        ({"compare_hvae": ["soft", "softer"]}, "unknown fine-tuning modes \\['softer'\\]"),
        ({"evaluation": {"num_test": 0}}, "evaluation.num_test must be a positive number"),
    ],
)
def test_bad_diffusion_settings_fail_before_training(overrides, expected, tmp_path):
    with pytest.raises(ValueError, match=expected):
        DiffusionPipeline(tmp_path / "data", tmp_path / "eval", phantom=TINY["phantom"], **overrides)
    assert not (tmp_path / "data").exists()
