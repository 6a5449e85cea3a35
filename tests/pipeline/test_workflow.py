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
"""The cxr_soft_cft bundle end to end through MONAI's bundle entry point, with a few iterations per stage."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from monai_cf.pipeline import STAGES, CounterfactualPipeline, load_checkpoint
from monai_cf.pipeline.workflow import state_checksum
from tests.pipeline.helpers import (
    INFERENCE,
    OWN_COLUMNS,
    OWN_GRAPH,
    OWN_VALUE_MAPS,
    STAGE_FILES,
    TINY,
    TRAIN,
    cli,
    is_png,
    messages,
    read_csv,
    run_bundle,
    write_own_dataset,
)

CF_TYPES = ["none", "hard", "soft"]
PHANTOM_ATTRIBUTES = ["sex", "race", "age", "disease"]


def _stage_files(models_dir: Path) -> dict[str, tuple[str, int]]:
    return {
        name: (load_checkpoint(models_dir / name)["uid"], (models_dir / name).stat().st_mtime_ns)
        for name in STAGE_FILES
    }


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    """The whole pipeline on a tiny phantom; ``progress_bar`` as the command line delivers ``false``."""
    root = tmp_path_factory.mktemp("phantom_bundle")
    start = time.time()
    run_bundle(TRAIN, bundle_root=str(root), **{**TINY, "progress_bar": "false"})
    timing = json.loads((root / "eval" / "timing.json").read_text())["seconds"]
    return {"root": root, "seconds": time.time() - start, "timing": timing}


@pytest.fixture
def models_copy(phantom_run, tmp_path):
    """A private copy of the phantom run's models directory (the tests that change it must not share it)."""
    models = tmp_path / "models"
    shutil.copytree(phantom_run["root"] / "models", models)
    return models


def _rerun_on_copy(phantom_run: dict, models: Path, out: Path, run_id: str, **overrides: Any) -> None:
    """A stage of the phantom run again, on a copy of its models directory."""
    paths = {"bundle_root": str(phantom_run["root"]), "models_dir": str(models), "output_dir": str(out)}
    run_bundle(TRAIN, run_id=run_id, **paths, **{**TINY, **overrides})


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """The pipeline on a generated CSV data set with its own graph, run from the command line as a user would."""
    data = write_own_dataset(tmp_path_factory.mktemp("own_data"))
    root = tmp_path_factory.mktemp("own_bundle")
    result = cli(
        "--config_file",
        str(TRAIN),
        "--bundle_root",
        str(root),
        "--dataset_dir",
        str(data),
        "--phantom",
        "null",
        "--graph",
        repr(OWN_GRAPH),
        "--data",
        repr({"columns": OWN_COLUMNS, "value_maps": OWN_VALUE_MAPS}),
        "--batch_size",
        "16",
        "--predictor#max_epochs",
        "1",
        "--mechanisms#max_epochs",
        "1",
        "--hvae_training#max_epochs",
        "1",
        "--cft#max_epochs",
        "1",
        "--evaluation",
        repr(TINY["evaluation"]),
        "--progress_bar",
        "false",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"root": root, "data": data, "result": result}


# ------------------------------------------------------------------------------------------------ phantom
def test_whole_pipeline_writes_every_output(phantom_run):
    root = phantom_run["root"]
    eval_dir, models_dir = root / "eval", root / "models"

    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert {"config", "baseline", "effectiveness", "amplification", "amplification_detail", "composition"} <= set(
        metrics
    )
    assert {"ground_truth", "embedding_shift", "realism", "timing"} <= set(metrics)
    assert metrics["config"]["num_samples"] == 16
    assert metrics["config"]["cf_types"] == CF_TYPES
    assert metrics["config"]["interventions"] == PHANTOM_ATTRIBUTES
    baseline = metrics["baseline"]
    assert set(baseline) == set(PHANTOM_ATTRIBUTES)
    assert all(0.0 <= baseline[a] <= 1.0 for a in ("sex", "race", "disease")) and baseline["age"] >= 0.0
    for attribute in PHANTOM_ATTRIBUTES:
        assert set(metrics["effectiveness"][attribute]) == set(CF_TYPES)
        for cf_type in CF_TYPES:
            scores = metrics["effectiveness"][attribute][cf_type]
            assert set(scores) == set(PHANTOM_ATTRIBUTES)
            assert all(math.isfinite(v) for v in scores.values())
            truth = metrics["ground_truth"][attribute][cf_type]
            assert truth["l1"] >= 0.0 and 0.0 < truth["ssim"] <= 1.0 and truth["psnr"] > 0.0
    # the amplification terms: AUC change on the unintervened, non-descendant discrete attributes
    detail = metrics["amplification_detail"]
    assert {k: sorted(detail[k]["hard"]) for k in PHANTOM_ATTRIBUTES} == {
        "sex": ["disease", "race"],
        "race": ["disease", "sex"],
        "age": ["race", "sex"],  # disease descends from age
        "disease": ["race", "sex"],
    }
    for cf_type in CF_TYPES:
        terms = []
        for k in PHANTOM_ATTRIBUTES:
            for a, term in detail[k][cf_type].items():
                assert term == pytest.approx(metrics["effectiveness"][k][cf_type][a] - baseline[a], abs=1e-9)
                terms.append(term)
        assert metrics["amplification"][cf_type] == pytest.approx(sum(terms) / len(terms), abs=1e-9)
    assert 0.0 <= metrics["ground_truth"]["age"]["soft"]["descendants"]["disease"] <= 1.0
    assert set(metrics["composition"]) == set(CF_TYPES) and metrics["timing"]["total_s"] > 0.0

    report = (eval_dir / "report.md").read_text()
    table = report.split("## Table 1")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert sum("Real images" in r for r in rows) == 1
    for label in ("No CFT", "Hard-CFT", "Soft-CFT"):
        assert sum(f"| {label} |" in r for r in rows) == 4, label
    for k in PHANTOM_ATTRIBUTES:
        assert any(r.startswith(f"| do({k}) |") for r in rows), k
    sex_row = next(r for r in rows if r.startswith("| do(sex) | No CFT"))
    assert f"**{100 * metrics['effectiveness']['sex']['none']['sex']:.1f} " in sex_row

    figures = {p.name for p in eval_dir.glob("*.png")}
    assert {f"counterfactuals_{t}.png" for t in CF_TYPES + ["ground_truth"]} <= figures
    assert {f"embedding_{a}.png" for a in ("sex", "race", "disease")} <= figures
    assert all(is_png(eval_dir / name) for name in figures)

    timing = json.loads((eval_dir / "timing.json").read_text())
    assert set(timing["seconds"]) == set(STAGES) | {"total"}
    assert set(timing["peak_memory_mb"]) == set(STAGES)
    assert all(v >= 0.0 for v in timing["seconds"].values())
    assert timing["seconds"]["total"] >= timing["seconds"]["hvae"] + timing["seconds"]["cft"]

    checkpoints = {name: load_checkpoint(models_dir / name) for name in STAGE_FILES}
    assert not (models_dir / "hvae_cft_none.pt").exists()  # "none" is the pretrained HVAE
    for name, ckpt in checkpoints.items():
        assert len(ckpt["uid"]) == 32 and ckpt["settings"] and ckpt["state_dict"], name
        assert all(torch.is_tensor(v) for v in ckpt["state_dict"].values()), name
    assert checkpoints["hvae.pt"]["settings"]["training"]["max_epochs"] == 1
    assert checkpoints["hvae.pt"]["settings"]["phantom"] == TINY["phantom"]
    assert checkpoints["hvae.pt"]["image_model"]["preset"] == "small32"
    for mode in ("hard", "soft"):
        settings = checkpoints[f"hvae_cft_{mode}.pt"]["settings"]
        assert settings["mode"] == mode
        assert settings["hvae"] == checkpoints["hvae.pt"]["uid"]
        assert settings["guidance"] == checkpoints["guidance_predictor.pt"]["uid"]
    assert checkpoints["guidance_predictor.pt"]["settings"]["role"] == "guidance"
    assert "metrics" in checkpoints["evaluation_predictor.pt"]
    assert json.loads((root / "data" / "phantom" / "phantom.json").read_text())["seed"] == 0


def test_second_run_retrains_nothing(phantom_run, capfd):
    root = phantom_run["root"]
    before = _stage_files(root / "models")
    amplification = json.loads((root / "eval" / "metrics.json").read_text())["amplification"]
    capfd.readouterr()
    run_bundle(TRAIN, bundle_root=str(root), **TINY)
    log = "".join(capfd.readouterr())
    assert _stage_files(root / "models") == before
    for name in STAGE_FILES:
        assert f"{root / 'models' / name})" in log, name  # "Reusing <stage> (<file>)"
    assert "Engine run resuming" not in log.split("Stage evaluate")[0]  # no trainer ran before the evaluation
    # the same models and the seeded evaluation give the same numbers
    again = json.loads((root / "eval" / "metrics.json").read_text())["amplification"]
    assert again == pytest.approx(amplification, abs=1e-9)


def test_changed_setting_without_retrain_names_the_difference(phantom_run, tmp_path):
    root = phantom_run["root"]
    before = _stage_files(root / "models")
    settings = {**TINY, "hvae_training#max_epochs": 2}
    with pytest.raises(Exception) as error:
        run_bundle(TRAIN, run_id="run_hvae", bundle_root=str(root), output_dir=str(tmp_path), **settings)
    text = messages(error.value)
    assert "hvae.pt" in text and "training.max_epochs: 1 -> 2" in text and "--retrain" in text
    assert _stage_files(root / "models") == before


def test_counterfactual_noise_keeps_the_hvae_and_asks_to_fine_tune_again(phantom_run, models_copy, tmp_path):
    before = _stage_files(models_copy)
    with pytest.raises(Exception) as error:
        _rerun_on_copy(phantom_run, models_copy, tmp_path, "run_cft", **{"image_model#counterfactual_noise": "shifted"})
    text = messages(error.value)
    assert "hvae_cft_" in text and "counterfactual_noise: 'scaled' -> 'shifted'" in text
    assert "hvae.pt" not in text  # what the HVAE learnt does not depend on it
    assert _stage_files(models_copy) == before


def test_retrain_hvae_fine_tunes_again_and_keeps_the_predictors(phantom_run, models_copy, tmp_path):
    models = models_copy
    before = _stage_files(models)
    _rerun_on_copy(phantom_run, models, tmp_path, "run_cft", retrain=["hvae"])
    after = _stage_files(models)
    for name in ("guidance_predictor.pt", "evaluation_predictor.pt", "mechanisms.pt"):
        assert after[name] == before[name], name
    for name in ("hvae.pt", "hvae_cft_hard.pt", "hvae_cft_soft.pt"):
        assert after[name][0] != before[name][0], name
    hvae_uid = after["hvae.pt"][0]
    assert all(load_checkpoint(models / f"hvae_cft_{m}.pt")["settings"]["hvae"] == hvae_uid for m in ("hard", "soft"))


BASE_FILES = ("guidance_predictor.pt", "evaluation_predictor.pt", "mechanisms.pt", "hvae.pt")


def _shipped_base(phantom_run, tmp_path) -> Path:
    """The phantom run's predictors, mechanisms and HVAE as a shipped pretrained base."""
    shipped = tmp_path / "pretrained"
    shipped.mkdir()
    for name in BASE_FILES:
        shutil.copy(phantom_run["root"] / "models" / name, shipped / name)
    return shipped


def test_main_job_adopts_a_verified_pretrained_base(phantom_run, tmp_path, capfd):
    shipped = _shipped_base(phantom_run, tmp_path)
    models = tmp_path / "models"
    capfd.readouterr()
    _rerun_on_copy(phantom_run, models, tmp_path / "eval", "run", pretrained_dir=str(shipped))
    log = "".join(capfd.readouterr())
    for stage in ("guidance", "evaluation_predictor", "mechanisms", "hvae"):
        assert f"Using the shipped pretrained {stage} ({shipped}" in log, stage
    assert "[hvae]" not in log and "HVAETrainer" not in log  # no base stage trained
    for name in BASE_FILES:
        assert load_checkpoint(models / name)["uid"] == load_checkpoint(shipped / name)["uid"], name
    hvae_uid = load_checkpoint(shipped / "hvae.pt")["uid"]
    assert load_checkpoint(models / "hvae_cft_soft.pt")["settings"]["hvae"] == hvae_uid  # fine-tuned from it
    assert (tmp_path / "eval" / "metrics.json").is_file()


def test_tampered_or_mismatched_pretrained_files_retrain(phantom_run, tmp_path, capfd):
    shipped = _shipped_base(phantom_run, tmp_path)
    hvae = torch.load(shipped / "hvae.pt", weights_only=True)
    hvae["state_dict"]["encoder.stem.bias"] += 1.0  # weights changed, checksum not
    torch.save(hvae, shipped / "hvae.pt")
    models = tmp_path / "models"
    capfd.readouterr()
    # the mechanisms were trained for 1 epoch: a config asking for 2 must not take them
    _rerun_on_copy(
        phantom_run, models, tmp_path / "eval", "run_hvae", pretrained_dir=str(shipped), **{"mechanisms#max_epochs": 2}
    )
    log = "".join(capfd.readouterr())
    assert f"Not using the shipped {shipped / 'hvae.pt'} (checksum mismatch" in log
    assert (
        f"Not using the shipped {shipped / 'mechanisms.pt'} (trained with other settings: mechanisms.max_epochs: 1 -> 2"
        in log
    )
    assert "Using the shipped pretrained guidance" in log
    assert load_checkpoint(models / "hvae.pt")["uid"] != hvae["uid"]  # trained here instead
    assert not (models / "mechanisms.pt").exists()  # not taken; run_hvae does not need it


def test_run_pretrain_writes_the_base_with_checksums(tmp_path):
    root = tmp_path / "bundle"
    run_bundle(TRAIN, run_id="run_pretrain", bundle_root=str(root), **TINY)
    shipped = root / "pretrained"
    manifest = json.loads((shipped / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"guidance", "evaluation_predictor", "mechanisms", "hvae"}
    for entry in manifest["stages"].values():
        ckpt = load_checkpoint(shipped / entry["file"])
        assert ckpt["checksum"] == entry["checksum"] == state_checksum(ckpt["state_dict"])
    assert manifest["seconds"]["hvae"] > 0.0
    assert not (root / "models").exists()  # nothing fine-tuned, nothing evaluated


def test_side_by_side_training_matches_one_after_the_other(phantom_run, tmp_path, capfd):
    """Predictors and fine-tuning modes trained in separate processes give the models of a sequential run."""
    side_by_side = ("guidance_predictor.pt", "evaluation_predictor.pt", "hvae_cft_hard.pt", "hvae_cft_soft.pt")
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the processes get one thread each: the sequential run too, for equal summation order
    try:
        for parallel in (False, True):
            models = tmp_path / f"models_{parallel}"
            shutil.copytree(phantom_run["root"] / "models", models)
            for name in side_by_side:
                (models / name).unlink()
                shutil.rmtree(models / "runs" / name.removesuffix(".pt"))
            capfd.readouterr()
            _rerun_on_copy(phantom_run, models, tmp_path / f"eval_{parallel}", "run", parallel=parallel)
            runs[parallel] = (models, "".join(capfd.readouterr()))
    finally:
        torch.set_num_threads(threads)
    log = runs[True][1]
    assert "Training guidance, evaluation_predictor side by side: 2 processes with 1 thread(s) each" in log
    assert "Training cft hard, cft soft side by side: 2 processes" in log
    assert "[cft soft] Stage cft done" in log  # the processes' own logs reach the console
    assert "side by side" not in runs[False][1]
    for name in side_by_side:
        made, reference = load_checkpoint(runs[True][0] / name), load_checkpoint(runs[False][0] / name)
        assert made["settings"].keys() == reference["settings"].keys(), name
        for key, value in reference["state_dict"].items():
            torch.testing.assert_close(made["state_dict"][key], value, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")
    timing = json.loads((tmp_path / "eval_True" / "timing.json").read_text())
    assert {"predictors", "cft", "evaluate"} <= timing["seconds"].keys()
    assert set(timing["side_by_side_peak_memory_mb"]) == {"predictors", "cft"}
    assert all(mb > 50 for mb in timing["side_by_side_peak_memory_mb"].values())


def test_interrupted_stage_resumes_from_its_checkpoint(phantom_run, models_copy, tmp_path):
    root, models = phantom_run["root"], models_copy
    for name in ("hvae.pt", "hvae_cft_hard.pt", "hvae_cft_soft.pt"):
        (models / name).unlink()  # as if the run stopped before the HVAE stage wrote its file
    # mark the last checkpoint: the resumed stage must carry the mark, a stage trained afresh could not
    checkpoints = sorted((models / "runs" / "hvae").glob("checkpoint_*iteration=*.pt"))
    assert checkpoints
    for path in checkpoints:
        ckpt = torch.load(path, weights_only=True)
        for part in ("network", "ema"):
            for key, value in ckpt.get(part, {}).items():
                if key.endswith("encoder.stem.bias"):
                    value.add_(100.0)
        torch.save(ckpt, path)
    old = load_checkpoint(root / "models" / "hvae.pt")["state_dict"]["encoder.stem.bias"]
    _rerun_on_copy(phantom_run, models, tmp_path, "run_hvae")
    resumed = load_checkpoint(models / "hvae.pt")["state_dict"]["encoder.stem.bias"]
    torch.testing.assert_close(resumed, old + 100.0)


def test_interrupted_stage_with_other_settings_is_refused(phantom_run, models_copy, tmp_path):
    models = models_copy
    (models / "hvae.pt").unlink()
    with pytest.raises(Exception) as error:
        _rerun_on_copy(phantom_run, models, tmp_path, "run_hvae", **{"hvae_training#lr": 0.002})
    text = messages(error.value)
    assert "interrupted run with other settings" in text and "training.lr: 0.001 -> 0.002" in text
    assert not (models / "hvae.pt").exists()


# ------------------------------------------------------------------------------------------------ own data
def test_own_data_with_another_graph(own_run):
    root, result = own_run["root"], own_run["result"]
    assert "%|" not in result.stderr  # --progress_bar false arrives as the string 'false'
    assert "Data: {'train': 64, 'val': 32, 'test': 32}" in result.stdout + result.stderr
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["config"]["interventions"] == ["scanner", "thickness", "lesion"]
    assert metrics["config"]["attribute_kinds"] == {
        "scanner": "categorical",
        "thickness": "continuous",
        "lesion": "binary",
    }
    assert metrics["config"]["num_samples"] == 32
    assert not metrics.get("ground_truth")  # real data: no true counterfactuals
    assert set(metrics["baseline"]) == {"scanner", "thickness", "lesion"}
    assert set(metrics["amplification"]) == set(CF_TYPES)
    # lesion descends from both roots and thickness is continuous: scanner is the only attribute amplification can
    # touch, under do(thickness) and do(lesion)
    detail = metrics["amplification_detail"]
    assert {k: sorted(v["soft"]) for k, v in detail.items() if v.get("soft")} == {
        "thickness": ["scanner"],
        "lesion": ["scanner"],
    }
    assert all(math.isfinite(metrics["amplification"][t]) for t in CF_TYPES)
    report = (root / "eval" / "report.md").read_text()
    assert "do(thickness)" in report and "Soft-CFT" in report
    hvae = load_checkpoint(root / "models" / "hvae.pt")
    assert hvae["settings"]["graph"]["scan"]["parents"] == ["scanner", "thickness", "lesion"]
    assert hvae["settings"]["phantom"] is None
    assert all((root / "models" / name).is_file() for name in STAGE_FILES)
    assert not (own_run["data"] / "phantom.json").exists()


def test_own_data_inference(own_run):
    root, data = own_run["root"], own_run["data"]
    run_bundle(
        INFERENCE,
        bundle_root=str(root),
        dataset_dir=str(data),
        do="{'thickness': 4.5}",
        columns=OWN_COLUMNS,
        value_maps=OWN_VALUE_MAPS,
    )
    out = root / "eval" / "counterfactuals"
    rows = read_csv(out / "counterfactuals.csv")
    assert len(rows) == 32 and len(list((out / "images").glob("*.png"))) == 32
    sources = read_csv(data / "test.csv")
    for row, source in zip(rows, sources):
        assert float(row["cf_thickness"]) == pytest.approx(4.5)
        assert float(row["thickness"]) == pytest.approx(float(source["slice_mm"]), abs=1e-3)
        assert row["scanner"] == row["cf_scanner"] == source["Scanner Model"].lower()
        assert row["lesion"] == OWN_VALUE_MAPS["lesion"][source["lesion_flag"]]
        assert row["cf_lesion"] in ("absent", "present")


def test_own_data_unknown_do_attribute_fails_fast_from_the_cli(own_run):
    result = cli(
        "--config_file", str(INFERENCE), "--bundle_root", str(own_run["root"]), "--dataset_dir", str(own_run["data"]),
        "--do", "{'age': 50}", timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "unknown attributes ['age']" in result.stderr and "'scanner', 'thickness', 'lesion'" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: ") and "unknown attributes ['age']" in last  # not MONAI's wrapper


def test_a_bad_training_setting_is_the_last_line_from_the_cli(tmp_path):
    result = cli(
        "--config_file", str(TRAIN), "--bundle_root", str(tmp_path), "--hvae_training", "{'progress_bar': False}",
        timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "Failed to instantiate" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "ValueError: hvae_training.progress_bar is set by the pipeline (use the top-level progress_bar or --tracking); "
        "remove it from hvae_training."
    )
    assert not (tmp_path / "models").exists()


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def small_own_data(tmp_path_factory):
    return write_own_dataset(tmp_path_factory.mktemp("small_own"), counts=(8, 4, 4))


CYCLE = {
    "a": {"kind": "binary", "parents": ["b"]},
    "b": {"kind": "binary", "parents": ["a"]},
    "image": {"kind": "image", "parents": ["a", "b"]},
}


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_column", "missing column 'thickness_mm' for 'thickness'"),
        ("cycle", "cycle through variable"),
        ("missing_dataset_dir", "does not exist"),
        ("phantom_with_own_graph", "The phantom generates the 'mimic_cxr' graph"),
        ("handler_key_in_hvae_training", "hvae_training.progress_bar is set by the pipeline"),
        ("seed_in_cft", "cft.seed is set by the pipeline (use the top-level seed)"),
        ("unknown_predictor_key", "predictor.chanels is neither a training setting"),
        ("unknown_mechanisms_key", "mechanisms.epochs is not a setting"),
    ],
)
def test_bad_training_input_fails_before_training(case, expected, small_own_data, tmp_path):
    own = {"graph": OWN_GRAPH, "phantom": "null", "dataset_dir": str(small_own_data)}
    overrides = {
        "missing_column": {
            **own,
            "data": {"columns": {**OWN_COLUMNS, "thickness": "thickness_mm"}, "value_maps": OWN_VALUE_MAPS},
        },
        "cycle": {**own, "graph": CYCLE},
        "missing_dataset_dir": {**own, "dataset_dir": str(tmp_path / "nowhere")},
        "phantom_with_own_graph": {"graph": OWN_GRAPH, "dataset_dir": str(tmp_path / "phantom")},
        "handler_key_in_hvae_training": {"hvae_training": {"max_epochs": 1, "progress_bar": False}},
        "seed_in_cft": {"cft#seed": 3},
        "unknown_predictor_key": {"predictor#chanels": [4, 8]},
        "unknown_mechanisms_key": {"mechanisms#epochs": 2},
    }[case]
    start = time.time()
    with pytest.raises(Exception) as error:
        run_bundle(TRAIN, bundle_root=str(tmp_path), **{**TINY, **overrides})
    assert time.time() - start < 15
    assert expected in messages(error.value)
    assert not (tmp_path / "models").exists() and not (tmp_path / "eval").exists()
    assert not (tmp_path / "phantom").exists()


def test_unknown_do_attribute_fails_fast(phantom_run, tmp_path):
    start = time.time()
    with pytest.raises(Exception) as error:
        run_bundle(INFERENCE, bundle_root=str(phantom_run["root"]), output_dir=str(tmp_path / "cf"), do="{'height': 3}")
    assert time.time() - start < 15
    assert "unknown attributes ['height']" in messages(error.value)
    assert not (tmp_path / "cf").exists()


# ------------------------------------------------------------------------------------------------ CLI values
def test_command_line_strings_for_booleans_and_null(small_own_data, tmp_path):
    common = {"graph": OWN_GRAPH, "data": {"columns": OWN_COLUMNS, "value_maps": OWN_VALUE_MAPS}}
    pipeline = CounterfactualPipeline(
        small_own_data, tmp_path, phantom="null", progress_bar="false", retrain="true",
        cft={"fine_tune_none": "false"}, **common,
    )  # fmt: skip
    assert pipeline.phantom is None and pipeline.progress_bar is False and pipeline.cft["fine_tune_none"] is False
    assert pipeline.retrain == set(STAGES) - {"data"}
    pipeline = CounterfactualPipeline(
        small_own_data, tmp_path, phantom=None, progress_bar="True", retrain="False", **common
    )
    assert pipeline.progress_bar is True and pipeline.retrain == set()
    assert CounterfactualPipeline(small_own_data, tmp_path, phantom=None, retrain="hvae", **common).retrain == {"hvae"}
    predictors = CounterfactualPipeline(small_own_data, tmp_path, phantom=None, retrain=["predictors"], **common)
    assert predictors.retrain == {"guidance", "evaluation_predictor"}
    with pytest.raises(ValueError, match="retrain names unknown stages"):
        CounterfactualPipeline(small_own_data, tmp_path, phantom=None, retrain="yes", **common)


def test_predictor_settings_reach_the_network(small_own_data, tmp_path):
    common = {"graph": OWN_GRAPH, "data": {"columns": OWN_COLUMNS, "value_maps": OWN_VALUE_MAPS}, "phantom": None}
    default = CounterfactualPipeline(small_own_data, tmp_path, **common).build_predictor()
    narrow = CounterfactualPipeline(
        small_own_data, tmp_path, predictor={"channels": [4, 8], "dropout": 0.2}, **common
    ).build_predictor()
    assert default.num_features == 128 and narrow.num_features == 8
    assert isinstance(narrow.dropout, torch.nn.Dropout) and narrow.dropout.p == 0.2
