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
"""CounterfactualEvaluator on the phantom, with counterfactual functions whose right answers are known.

- ``soft``: the phantom's true counterfactual (the same patient's noise rendered under the intervention);
- ``none``: returns its input unchanged (only the attributes follow the intervention);
- ``hard``: the true counterfactual with every patient's effusion made much more severe (amplifies disease).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from monai.data import DataLoader
from PIL import Image

from monai_cf.data import SyntheticCXR, csv_dataset
from monai_cf.engines.evaluator import CounterfactualEvaluator
from monai_cf.engines.predictor_trainer import train_attribute_predictor
from monai_cf.graph import CausalGraph
from monai_cf.handlers.report import format_report, log_evaluation_to_mlflow
from monai_cf.metrics import auc_standard_error
from monai_cf.networks import DeepSCM

GRAPH = CausalGraph.from_name("mimic_cxr")
ATTRIBUTES = ("sex", "race", "age", "disease")
CF_TYPES = ("soft", "none", "hard")
SIZE = 32
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _fingerprint(image: torch.Tensor) -> str:
    pixels = (image.detach().cpu().float() * 255).round().to(torch.uint8).numpy()
    return hashlib.sha1(pixels.tobytes()).hexdigest()


class PhantomCounterfactuals:
    """A counterfactual function on phantom images: finds each input's patient by its pixels and renders it anew.

    Every image it returns is remembered, so its own outputs can be fed back in (composition, reversibility).
    """

    def __init__(self, phantom: SyntheticCXR, batch: dict, severity_boost: float = 0.0, identity: bool = False):
        self.phantom = phantom
        self.noise = {k: np.asarray(v) for k, v in batch["noise"].items()}
        self.severity_boost = severity_boost
        self.identity = identity
        images = torch.as_tensor(batch["image"])
        self.rows = {_fingerprint(images[i]): i for i in range(images.shape[0])}
        self.calls = 0

    def __call__(self, x, pa, do):
        self.calls += 1
        if self.identity:
            return x, {**pa, **{k: torch.as_tensor(v).reshape(-1) for k, v in do.items()}}
        rows = np.asarray([self.rows[_fingerprint(x[i])] for i in range(x.shape[0])])
        noise = {k: v[rows] for k, v in self.noise.items()}
        if self.severity_boost:
            noise["effusion_severity"] = 1.0 - (1.0 - noise["effusion_severity"]) * (1.0 - self.severity_boost)
        factual = {n: pa[n].detach().cpu().numpy() for n in ATTRIBUTES}
        factual["noise"] = noise
        cf = self.phantom.counterfactual_batch(factual, {k: torch.as_tensor(v).cpu().numpy() for k, v in do.items()})
        images = torch.from_numpy(cf["image"]).to(x)
        for i, row in enumerate(rows):
            self.rows.setdefault(_fingerprint(images[i]), int(row))
        return images, {n: torch.as_tensor(cf[n]) for n in ATTRIBUTES}


@pytest.fixture(scope="module")
def phantom_data():
    with one_thread():
        phantom = SyntheticCXR(SIZE, seed=0)
        train = phantom.sample_batch(2000)
        test = phantom.sample_batch(400)
        predictor = train_attribute_predictor(
            torch.from_numpy(train["image"]),
            {n: torch.as_tensor(train[n]) for n in ATTRIBUTES},
            GRAPH,
            epochs=6,
            channels=(8, 16, 32),
            seed=0,
        )
    return phantom, test, predictor


@pytest.fixture(scope="module")
def evaluation(phantom_data, tmp_path_factory):
    phantom, test, predictor = phantom_data
    functions = {
        "soft": PhantomCounterfactuals(phantom, test),
        "none": PhantomCounterfactuals(phantom, test, identity=True),
        "hard": PhantomCounterfactuals(phantom, test, severity_boost=0.7),
    }
    out = tmp_path_factory.mktemp("evaluation")
    with one_thread():
        evaluator = CounterfactualEvaluator(
            GRAPH, test, predictor, functions, phantom=phantom, batch_size=100, output_dir=str(out), num_examples=3
        )
        evaluator.run()
    return evaluator, out, functions


def test_true_counterfactuals_score_the_baseline(evaluation):
    evaluator, _, _ = evaluation
    r = evaluator.results
    baseline = r["baseline"]
    labels = torch.as_tensor(evaluator.data_loader.data["sex"])
    positives = int(labels.sum())
    tolerance = 3 * auc_standard_error(baseline["sex"], positives, len(labels) - positives)
    assert baseline["sex"] > 0.9
    assert abs(r["effectiveness"]["sex"]["soft"]["sex"] - baseline["sex"]) < tolerance
    # unintervened attributes stay where they were: no amplification beyond sampling error
    assert abs(r["amplification"]["soft"]) < 0.015
    for k, by_type in r["amplification_detail"].items():
        for j, delta in by_type["soft"].items():
            assert abs(delta) < 0.05, (k, j, delta)
    # and they are the true counterfactuals
    for k in ATTRIBUTES:
        truth = r["ground_truth"][k]["soft"]
        assert truth["l1"] == 0.0 and truth["psnr"] == 100.0 and truth["ssim"] == pytest.approx(1.0)
        assert r["reversibility"][k]["soft"] == 0.0
    assert r["ground_truth"]["age"]["soft"]["descendants"] == {"disease": 1.0}
    assert r["composition"]["soft"] == {"1": 0.0, "10": 0.0}


def test_identity_fails_effectiveness_and_changes_nothing_else(evaluation):
    evaluator, _, functions = evaluation
    r = evaluator.results
    baseline = r["baseline"]
    # flipped labels on unchanged images: exactly the inverted AUC
    assert r["effectiveness"]["sex"]["none"]["sex"] == pytest.approx(1.0 - baseline["sex"])
    assert r["effectiveness"]["disease"]["none"]["disease"] == pytest.approx(1.0 - baseline["disease"])
    assert r["effectiveness"]["race"]["none"]["race"] < baseline["race"] - 0.05
    assert r["effectiveness"]["age"]["none"]["age"] > baseline["age"] + 5.0  # years
    assert r["amplification"]["none"] == 0.0
    assert r["logit_shift"]["none"] == 0.0
    assert r["composition"]["none"] == {"1": 0.0, "10": 0.0}
    assert all(r["reversibility"][k]["none"] == 0.0 for k in ATTRIBUTES)
    assert all(r["ground_truth"][k]["none"]["l1"] > 0.1 for k in ATTRIBUTES)
    assert r["ground_truth"]["age"]["none"]["descendants"]["disease"] < 1.0  # it never flips disease
    assert r["embedding_shift"]["mean"]["none"] == 0.0
    assert r["realism"]["fid"]["none"] == pytest.approx(0.0, abs=1e-4)
    # batched: one call per intervention and cycle per batch of 100, never per sample
    batches = 4
    assert functions["none"].calls == batches * (4 + 10 + 4)


def test_exaggerated_severity_amplifies_disease(evaluation):
    evaluator, _, _ = evaluation
    r = evaluator.results
    detail = r["amplification_detail"]
    for k in ("sex", "race"):  # disease is unintervened and does not descend from sex or race
        assert detail[k]["hard"]["disease"] > 0.03
        assert detail[k]["hard"]["disease"] > detail[k]["soft"]["disease"] + 0.03
        signed = r["label_logit_shift_detail"][k]
        assert signed["hard"]["disease"] > signed["soft"]["disease"] + 0.03
    assert r["amplification"]["hard"] > r["amplification"]["soft"]  # a mean over 8 terms, 2 of them disease
    assert r["composition"]["hard"]["1"] > 0.0 and r["reversibility"]["sex"]["hard"] > 0.0
    truth = r["ground_truth"]["sex"]
    assert 0.0 < truth["hard"]["l1"] < truth["none"]["l1"]
    # the diseased subgroup moves in the embedding more than with the true counterfactuals
    shifts = r["embedding_shift"]["shifts"]["sex"]
    assert shifts["hard"]["disease"]["pleural_effusion"]["mean"] > shifts["soft"]["disease"]["pleural_effusion"]["mean"]


def test_truth_gain_grades_the_edit_against_doing_nothing(evaluation):
    evaluator, out, _ = evaluation
    r = evaluator.results
    faithfulness = r["faithfulness"]
    for k in ATTRIBUTES:
        unchanged = faithfulness["unchanged_l1"][k]
        # the identity's distance to the truth is the do-nothing baseline itself
        assert unchanged == pytest.approx(r["ground_truth"][k]["none"]["l1"]) and unchanged > 0.1
        assert faithfulness["truth_gain"][k]["soft"] == 1.0  # the true counterfactual
        assert faithfulness["truth_gain"][k]["none"] == pytest.approx(0.0, abs=1e-12)
        hard = faithfulness["truth_gain"][k]["hard"]
        assert hard == pytest.approx(1.0 - r["ground_truth"][k]["hard"]["l1"] / unchanged)
    assert faithfulness["truth_gain"]["sex"]["hard"] < 1.0
    assert faithfulness["truth_gain_mean"]["soft"] == 1.0
    assert faithfulness["truth_gain_mean"]["none"] == pytest.approx(0.0, abs=1e-12)
    assert evaluator.state.metrics["faithfulness/truth_gain/sex/hard"] == pytest.approx(
        faithfulness["truth_gain"]["sex"]["hard"]
    )
    report = (out / "report.md").read_text()
    assert "## Faithfulness" in report
    assert f"| do(sex) | {faithfulness['unchanged_l1']['sex']:.2f} | 0.00 / 1.00 |" in report


def test_excess_and_continuous_amplification(evaluation):
    evaluator, out, _ = evaluation
    r = evaluator.results
    baseline, excess = r["baseline"], r["effectiveness_excess"]
    assert excess["sex"]["none"] == pytest.approx(1.0 - 2.0 * baseline["sex"])  # the flipped-label AUC
    assert excess["sex"]["soft"] == pytest.approx(r["effectiveness"]["sex"]["soft"]["sex"] - baseline["sex"])
    assert excess["age"]["none"] == pytest.approx(r["effectiveness"]["age"]["none"]["age"] / baseline["age"] - 1.0)
    # age is in the soft-target set of do(sex), do(race) and do(disease); the identity keeps the real images
    detail = r["amplification_continuous_detail"]
    assert set(detail["sex"]["none"]) == {"age"} and detail["age"]["none"] == {}
    assert r["amplification_continuous"]["none"] == pytest.approx(0.0, abs=1e-12)
    assert abs(r["amplification_continuous"]["soft"]) < 0.2
    report = (out / "report.md").read_text()
    assert "Continuous: mean MAE change" in report and "Effectiveness excess" in report


def test_metrics_json_shape(evaluation):
    evaluator, out, _ = evaluation
    with open(out / "metrics.json") as handle:
        metrics = json.load(handle)  # strict JSON: NaN would have been written as null
    required = {"baseline", "effectiveness", "amplification", "composition", "reversibility", "ground_truth"}
    required |= {"embedding_shift", "timing", "logit_shift", "realism", "utility", "faithfulness"}
    required |= {"effectiveness_excess", "amplification_continuous"}
    assert required <= set(metrics)
    assert set(metrics["baseline"]) == set(ATTRIBUTES)
    assert set(metrics["effectiveness"]) == set(GRAPH.image_parents)
    for by_type in metrics["effectiveness"].values():
        assert set(by_type) == set(CF_TYPES)
        assert all(set(scores) == set(ATTRIBUTES) for scores in by_type.values())
        assert all(0.0 <= scores["sex"] <= 1.0 and scores["age"] > 0.0 for scores in by_type.values())
    assert set(metrics["amplification"]) == set(CF_TYPES)
    assert metrics["utility"] is None
    assert metrics["embedding_shift"]["num_samples"] == 400
    assert len(metrics["embedding_shift"]["explained_variance_ratio"]) == 3
    timing = metrics["timing"]
    assert timing["total_s"] > 0 and timing["total_s"] >= sum(timing["stages"].values()) - 1e-6
    assert {"predict_real", "counterfactuals", "composition", "ground_truth", "figures"} <= set(timing["stages"])
    assert metrics["effectiveness"]["sex"]["hard"]["sex"] == evaluator.results["effectiveness"]["sex"]["hard"]["sex"]
    assert evaluator.state.metrics["amplification/hard"] == pytest.approx(metrics["amplification"]["hard"])


def test_report_has_table_rows(evaluation):
    evaluator, out, _ = evaluation
    report = (out / "report.md").read_text()
    base = evaluator.results["baseline"]
    row = f"| None | Real images | {100 * base['sex']:.1f} | {100 * base['race']:.1f} | {base['age']:.1f} | "
    assert row + f"{100 * base['disease']:.1f} |" in report
    effective = evaluator.results["effectiveness"]["sex"]["soft"]["sex"]
    assert f"| do(sex) | Soft-CFT | **{100 * effective:.1f} (" in report
    for k in ("race", "age", "disease"):
        assert f"| do({k}) | Soft-CFT |" in report
    table1 = report.split("## Table 1")[1].split("## Amplification")[0]
    assert table1.count("|  | No CFT |") == 4 and table1.count("|  | Hard-CFT |") == 4
    identity = 100 * evaluator.results["effectiveness"]["sex"]["none"]["sex"]
    assert f"**{identity:.1f} (↓ {100 * base['sex'] - identity:.1f})**" in report
    for section in ("## Table 1", "## Amplification", "## Composition", "## Reversibility", "## Ground truth"):
        assert section in report
    assert (
        "## Embedding shift" in report and "## Realism" in report and "![embedding_race](embedding_race.png)" in report
    )


def test_figures_are_valid_pngs(evaluation):
    _, out, _ = evaluation
    names = [f"counterfactuals_{c}.png" for c in (*CF_TYPES, "ground_truth")]
    names += [f"embedding_{a}.png" for a in ("sex", "race", "disease")]
    for name in names:
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        with Image.open(path) as image:
            assert min(image.size) > 300, name
    # the true counterfactuals' grid shows the same images as the "soft" one
    evaluator = evaluation[0]
    examples = evaluator.figure_data["examples"]
    for label, images in examples["truth"].items():
        assert torch.equal(images, examples["counterfactuals"]["soft"][label])


def test_seeded_draws_are_shared_and_reproducible(phantom_data):
    phantom, test, predictor = phantom_data
    subset = {k: (v[:100] if k != "noise" else {n: a[:100] for n, a in v.items()}) for k, v in test.items()}

    def run(seed):
        fns = {"a": PhantomCounterfactuals(phantom, subset, identity=True)}
        fns["b"] = PhantomCounterfactuals(phantom, subset, identity=True)
        evaluator = CounterfactualEvaluator(
            GRAPH, subset, predictor, fns, seed=seed, composition_cycles=(), reversibility=False, num_examples=0
        )
        evaluator.run()
        return evaluator.results

    first, again, other = run(3), run(3), run(4)
    assert first["effectiveness"] == again["effectiveness"]
    # the two CF types saw the same interventions: identical functions, identical results
    assert first["effectiveness"]["age"]["a"] == first["effectiveness"]["age"]["b"]
    assert first["effectiveness"]["age"]["a"]["age"] != other["effectiveness"]["age"]["a"]["age"]
    assert first["composition"] == {"a": {}, "b": {}} and first["reversibility"] == {}


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")  # inside MLflow's store
def test_deep_scm_with_a_csv_loader_utility_and_mlflow(tmp_path):
    phantom = SyntheticCXR(SIZE, seed=1)
    phantom.write(tmp_path / "data", n_train=48, n_val=0, n_test=32)
    test_loader = DataLoader(csv_dataset(tmp_path / "data" / "test.csv", GRAPH), batch_size=16)
    train_set = csv_dataset(tmp_path / "data" / "train.csv", GRAPH)
    torch.manual_seed(0)
    scm = DeepSCM(GRAPH, image_model={"spatial_dims": 2, "in_channels": 1, "spatial_size": SIZE})
    images = torch.stack([torch.as_tensor(train_set[i]["image"]) for i in range(48)])
    attributes = {n: torch.tensor([train_set[i][n] for i in range(48)]) for n in ATTRIBUTES}
    predictor = train_attribute_predictor(images, attributes, GRAPH, epochs=1, channels=(4, 8))
    trained = []

    def tiny_trainer(x, a):
        trained.append(x.shape[0])
        return train_attribute_predictor(x, a, GRAPH, epochs=1, channels=(4, 8))

    import mlflow  # noqa: F401  (imported here: the other tests must not need it)
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("evaluation", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    evaluator = CounterfactualEvaluator(
        GRAPH,
        test_loader,
        predictor,
        {"none": scm},
        phantom=phantom,
        phantom_noise=SyntheticCXR.read_noise(tmp_path / "data", "test"),
        composition_cycles=(1, 2),
        utility_data=DataLoader(train_set, batch_size=16),
        train_predictor_fn=tiny_trainer,
        output_dir=str(tmp_path / "out"),
        tracking_uri=uri,
        run_id=run.info.run_id,
    )
    evaluator.run()
    r = evaluator.results
    assert r["config"]["num_samples"] == 32
    # HVAE null interventions give x back up to float error; a round trip through do(a') does not quite
    assert r["composition"]["none"]["2"] < 0.05
    assert all(math.isfinite(r["reversibility"][k]["none"]) for k in ATTRIBUTES)
    assert r["ground_truth"]["sex"]["none"]["l1"] > 0.0 and "disease" in r["ground_truth"]["age"]["none"]["descendants"]
    # utility: one predictor on real images plus one per intervention, each on all 48 training images
    assert trained == [48] * 5
    assert set(r["utility"]["by_training_set"]) == set(GRAPH.image_parents)
    assert set(r["utility"]["baseline"]) == set(ATTRIBUTES)
    assert "## Table 2" in (tmp_path / "out" / "report.md").read_text()
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/report.md", "evaluation/counterfactuals_none.png"} <= logged
    history = client.get_metric_history(run.info.run_id, "amplification/none")
    assert history and history[0].value == pytest.approx(r["amplification"]["none"])


def test_errors_name_the_problem(phantom_data, tmp_path):
    phantom, test, predictor = phantom_data
    with pytest.raises(ValueError, match="empty"):
        CounterfactualEvaluator(GRAPH, test, predictor, {})
    with pytest.raises(ValueError, match="not callable"):
        CounterfactualEvaluator(GRAPH, test, predictor, {"soft": 3})
    with pytest.raises(ValueError, match="phantom_noise"):
        CounterfactualEvaluator(GRAPH, test, predictor, {"a": lambda x, pa, do: (x, pa)}, phantom_noise=test["noise"])
    with pytest.raises(ValueError, match="Unknown variable"):
        CounterfactualEvaluator(GRAPH, test, predictor, {"a": lambda x, pa, do: (x, pa)}, intervened=["height"])
    with pytest.raises(ValueError, match="rows"):
        CounterfactualEvaluator(GRAPH, {**test, "sex": test["sex"][:5]}, predictor, {"a": lambda x, pa, do: (x, pa)})
    no_age = {k: v for k, v in test.items() if k != "age"}
    evaluator = CounterfactualEvaluator(GRAPH, no_age, predictor, {"a": lambda x, pa, do: (x, pa)})
    with pytest.raises(ValueError, match="lacks attribute 'age'"):
        evaluator.run()
    with pytest.raises(ValueError, match="not supported"):
        CounterfactualEvaluator(
            GRAPH,
            test,
            predictor,
            {"a": lambda x, pa, do: (x, pa)},
            output_dir=str(tmp_path),
            tracking_uri=str(tmp_path),
        )
    assert log_evaluation_to_mlflow([]) is False  # no run active, none named: nothing to log


def test_format_report_reproduces_the_paper_layout():
    results = {
        "config": {"image_parents": ["race", "sex", "disease"], "cf_types": ["none", "hard", "soft"]},
        "baseline": {"race": 0.938, "sex": 0.996, "disease": 0.942},
        "effectiveness": {
            "race": {
                "none": {"race": 0.689, "sex": 0.996, "disease": 0.942},
                "hard": {"race": 0.990, "sex": 0.997, "disease": 0.964},
                "soft": {"race": 0.987, "sex": 0.995, "disease": 0.943},
            }
        },
        "amplification": {"none": 0.0, "hard": 0.0115, "soft": 0.0},
    }
    report = format_report(results)
    assert "| Intervention | CF type | race | sex | disease |" in report
    assert "| None | Real images | 93.8 | 99.6 | 94.2 |" in report
    assert "| do(race) | No CFT | **68.9 (↓ 24.9)** | 99.6 (· 0.0) | 94.2 (· 0.0) |" in report
    assert "|  | Hard-CFT | **99.0 (↑ 5.2)** | 99.7 (↑ 0.1) | 96.4 (↑ 2.2) |" in report
    assert "|  | Soft-CFT | **98.7 (↑ 4.9)** | 99.5 (↓ 0.1) | 94.3 (↑ 0.1) |" in report
    assert "| Hard-CFT | 1.15 |" in report


def test_consistency_table_on_the_phantom(evaluation):
    evaluator, out, _ = evaluation
    table = evaluator.results["consistency"]
    summary = table["summary"]
    assert set(summary) == set(GRAPH.image_parents) and all(set(by_a) == set(ATTRIBUTES) for by_a in summary.values())
    # the true counterfactual attributes lie inside every bound, in every cell
    assert table["outside"]["truth"]["scm"] == 0 and all(row["truth_inside"] for row in table["cells"])
    disease = summary["age"]["disease"]
    assert 0.0 < disease["lower"] <= disease["truth"] <= disease["upper"] < 1.0
    assert summary["sex"]["race"]["lower"] == summary["sex"]["race"]["upper"] == 0.0
    # "soft" returns the true counterfactual attributes; the identity keeps disease under do(age) and its
    # unchanged images are read as unchanged under do(sex), where the bound says sex always changes
    assert table["outside"]["soft"]["scm"] == 0
    assert summary["age"]["disease"]["none"]["scm"] == 0.0 and summary["age"]["disease"]["none"]["scm_inside"] == 0.0
    assert summary["sex"]["sex"]["none"]["images"] < 0.1 and summary["sex"]["sex"]["none"]["images_inside"] == 0.0
    assert summary["sex"]["sex"]["soft"]["images"] > 0.9 and summary["sex"]["sex"]["soft"]["images_inside"] == 1.0
    assert summary["sex"]["sex"]["truth_images"] == summary["sex"]["sex"]["soft"]["images"]  # the same images
    assert 0.0 <= table["calibration_error"]["sex"]["sex"] < 0.1
    assert evaluator.state.metrics["consistency/summary/age/disease/lower"] == pytest.approx(disease["lower"])
    assert "consistency" in evaluator.results["timing"]["stages"]
    with open(out / "metrics.json") as handle:
        cells = json.load(handle)["consistency"]["cells"]
    assert len(cells) == len(table["cells"]) and {"lower", "upper", "estimates", "cell"} <= set(cells[0])
    report = (out / "report.md").read_text()
    assert "## Counterfactual consistency" in report
    assert "| do(age) | sex | 0.000 |" in report and f"| disease | [{disease['lower']:.3f}, " in report


def test_consistency_on_a_user_graph_without_ground_truth(tmp_path):
    """The bundle README's own-data graph: scanner, thickness -> lesion; no phantom, no truth."""
    graph = CausalGraph.from_dict(
        {
            "scanner": {"kind": "categorical", "class_names": ["A", "B", "C"]},
            "thickness": {"kind": "continuous", "range": [0, 10]},
            "lesion": {"kind": "binary", "parents": ["scanner", "thickness"]},
            "image": {"kind": "image", "parents": ["scanner", "thickness", "lesion"]},
        }
    )
    rng = np.random.default_rng(0)
    n = 48
    scanner, thickness = rng.integers(0, 3, n), rng.uniform(0, 10, n)
    lesion = (rng.uniform(size=n) < 0.2 + 0.06 * thickness).astype(np.int64)
    data = {"image": rng.uniform(size=(n, 1, SIZE, SIZE)).astype(np.float32), "scanner": scanner}
    data |= {"thickness": thickness, "lesion": lesion}
    attributes = {k: torch.as_tensor(data[k]) for k in graph.attributes}
    with one_thread():
        torch.manual_seed(0)
        scm = DeepSCM(graph, image_model={"spatial_dims": 2, "in_channels": 1, "spatial_size": SIZE})
        predictor = train_attribute_predictor(
            torch.from_numpy(data["image"]), attributes, graph, epochs=1, channels=(4, 8)
        )
        evaluator = CounterfactualEvaluator(
            graph,
            data,
            predictor,
            {"none": scm},
            batch_size=24,
            composition_cycles=(),
            reversibility=False,
            num_examples=0,
            output_dir=str(tmp_path),
        )
        evaluator.run()
    table = evaluator.results["consistency"]
    lesion_row = table["summary"]["thickness"]["lesion"]
    assert 0.0 <= lesion_row["lower"] <= lesion_row["upper"] <= 1.0 and lesion_row["lower"] < lesion_row["upper"]
    assert "truth" not in lesion_row and "truth" not in table["outside"]
    assert table["summary"]["lesion"]["scanner"]["upper"] == 0.0
    assert set(table["summary"]["scanner"]["lesion"]["none"]) == {"images", "images_inside", "scm", "scm_inside"}
    report = (tmp_path / "report.md").read_text()
    assert "## Counterfactual consistency" in report and "| do(thickness) | scanner | 0.000 |" in report
