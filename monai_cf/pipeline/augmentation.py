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
"""Does counterfactual augmentation help a downstream classifier? A disease classifier trained with and without it.

The worked example of the transforms: a classifier of one target attribute (disease) is trained in a MONAI
``SupervisedTrainer`` on a deliberately biased subset of the training split, once on the real images and once with
counterfactual augmentation over other attributes (sex, race), with the same seed, data order and number of steps,
and both are scored on the untouched test split, overall and per subgroup (MONAI's ROC AUC).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.data import Dataset
from monai.metrics import compute_roc_auc
from monai.networks import eval_mode
from monai.utils import convert_to_tensor, set_determinism
from torch.utils.data import Subset

from monai_cf.data import AttributeEncoder, csv_dataset
from monai_cf.engines import create_data_loader, create_predictor_trainer
from monai_cf.graph import CausalGraph
from monai_cf.networks.nets import AttributePredictor
from monai_cf.transforms import CounterfactualBatchAugmenter, RandCounterfactuald

__all__ = [
    "AugmentationStudy",
    "run_augmentation_study",
    "biased_subset",
    "subgroup_auc",
    "ARMS",
    "AUGMENTATION_PATHS",
    "DEFAULT_SELECTION",
]

logger = logging.getLogger("monai_cf.pipeline")

#: the two arms of the study: the classifier on real images, and with counterfactual augmentation
ARMS = ("no_augmentation", "counterfactual_augmentation")
#: ``"batched"``: :class:`~monai_cf.transforms.CounterfactualBatchAugmenter` as the trainer's ``prepare_batch`` (one
#: image-model call per batch); ``"transform"``: :class:`~monai_cf.transforms.RandCounterfactuald` in the dataset's
#: transform chain (one call per sample)
AUGMENTATION_PATHS = ("batched", "transform")

#: The default biased training subset. Disease is tied to sex (nine in ten diseased patients kept are male, nine in
#: ten healthy ones female) and Black patients are under-represented (one in four kept), while the test split keeps
#: the phantom's own distribution, in which disease depends on age alone. A classifier can then lean on the
#: sex cue instead of the effusion; counterfactuals under do(sex) keep the disease label (disease is no descendant of
#: sex) and so break that shortcut, and do(race) shows it more Black patients.
DEFAULT_SELECTION: tuple[dict[str, Any], ...] = (
    {"where": {"sex": "female", "disease": "pleural_effusion"}, "keep": 0.1},
    {"where": {"sex": "male", "disease": "no_finding"}, "keep": 0.1},
    {"where": {"race": "Black"}, "keep": 0.25},
)


def _canonical_rules(graph: CausalGraph, selection: Sequence[Mapping[str, Any]]) -> list[tuple[dict[str, int], float]]:
    encoder = AttributeEncoder(graph)
    rules = []
    for position, rule in enumerate(selection):
        if not isinstance(rule, Mapping) or set(rule) != {"where", "keep"} or not isinstance(rule["where"], Mapping):
            raise ValueError(
                f"selection[{position}] must be {{'where': {{attribute: value}}, 'keep': probability}}; got {rule!r}."
            )
        keep = float(rule["keep"])
        if not 0.0 <= keep <= 1.0:
            raise ValueError(f"selection[{position}]: keep must lie in [0, 1]; got {keep}.")
        where = {}
        for name, value in rule["where"].items():
            if name not in graph.attributes or not graph[name].is_discrete:
                discrete = [n for n in graph.attributes if graph[n].is_discrete]
                raise ValueError(
                    f"selection[{position}]: '{name}' is not a discrete attribute; choose from {discrete}."
                )
            where[name] = int(encoder.canonical(name, value))
        rules.append((where, keep))
    return rules


def _records(dataset: Any) -> list[Mapping[str, Any]]:
    """The attribute records of a dataset, without loading images when it exposes its datalist."""
    if isinstance(dataset, Subset):
        records = _records(dataset.dataset)
        return [records[i] for i in dataset.indices]
    data = getattr(dataset, "data", None)
    if isinstance(data, Sequence) and len(data) == len(dataset) and all(isinstance(d, Mapping) for d in data[:1]):
        return list(data)
    return [dataset[i] for i in range(len(dataset))]


def biased_subset(
    dataset: Any, graph: CausalGraph | Mapping | str, selection: Sequence[Mapping[str, Any]] | None, seed: int = 0
) -> Subset | Any:
    """A random subset of ``dataset`` in which each sample is kept with a probability set by its attributes.

    Each rule ``{"where": {attribute: value, ...}, "keep": p}`` applies to the samples matching all its
    conditions (values in original units or class names); a sample matching several rules is kept with the
    product of their probabilities, one that matches none always. The draw depends on ``seed`` only.

    Args:
        dataset: a dataset of dictionaries with canonical attribute values (e.g. :func:`monai_cf.data.csv_dataset`).
        graph: the causal graph.
        selection: the rules (see :data:`DEFAULT_SELECTION`); ``None`` or empty: the whole dataset.
        seed: seed of the draw.

    Raises:
        ValueError: for a malformed rule, an unknown or continuous attribute, an unknown value, or an empty result.

    Example::

        train = biased_subset(csv_dataset("phantom/train.csv"), "mimic_cxr",
                              [{"where": {"race": "Black"}, "keep": 0.25}])
    """
    graph = CausalGraph.build(graph)
    if not selection:
        return dataset
    rules = _canonical_rules(graph, selection)
    draws = np.random.RandomState(seed).rand(len(dataset))
    keep = []
    for index, record in enumerate(_records(dataset)):
        probability = 1.0
        for where, p in rules:
            if all(int(record[name]) == value for name, value in where.items()):
                probability *= p
        if draws[index] < probability:
            keep.append(index)
    if not keep:
        raise ValueError(f"The selection {list(selection)} keeps none of the {len(dataset)} samples.")
    return Subset(dataset, keep)


def subgroup_auc(
    scores: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    attributes: Mapping[str, torch.Tensor | np.ndarray],
    graph: CausalGraph | Mapping | str,
) -> dict[str, float | None]:
    """ROC AUC (``monai.metrics.compute_roc_auc``) overall and per class of each attribute in ``attributes``.

    Keys are ``"overall"`` and ``"<attribute>=<class name>"``; a group holding a single label class gets ``None``.

    Example::

        subgroup_auc(probabilities, disease, {"sex": sex, "race": race}, "mimic_cxr")
        # {'overall': 0.93, 'sex=male': 0.94, 'sex=female': 0.91, 'race=White': 0.93, ...}
    """
    graph = CausalGraph.build(graph)
    scores = torch.as_tensor(np.asarray(scores, dtype=np.float64)).flatten()
    labels = torch.as_tensor(np.asarray(labels)).flatten().long()

    def auc(mask: torch.Tensor) -> float | None:
        y = labels[mask]
        if y.numel() == 0 or y.min() == y.max():
            return None
        return float(compute_roc_auc(scores[mask], y))

    result = {"overall": auc(torch.ones_like(labels, dtype=torch.bool))}
    for name, values in attributes.items():
        values = torch.as_tensor(np.asarray(values)).flatten().long()
        for index, class_name in enumerate(graph[name].class_names):
            result[f"{name}={class_name}"] = auc(values == index)
    return result


def _composition(dataset: Any, graph: CausalGraph, target: str, subgroups: Sequence[str]) -> dict[str, int]:
    """Counts per class of the target and of each subgroup attribute, and of the target within each subgroup."""
    counts: dict[str, int] = {}
    for record in _records(dataset):
        label = f"{target}={graph[target].class_names[int(record[target])]}"
        keys = [label]
        for name in subgroups:
            group = f"{name}={graph[name].class_names[int(record[name])]}"
            keys += [group, f"{group},{label}"]
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


class AugmentationStudy:
    """Train a classifier of ``target`` with and without counterfactual augmentation, and score both per subgroup.

    For every seed, two classifiers (a :class:`~monai_cf.networks.nets.AttributePredictor` with the ``target`` head
    alone) are trained in a MONAI ``SupervisedTrainer`` (see :func:`~monai_cf.engines.create_predictor_trainer`)
    from the same initial weights, on the same batches in the same order, for the same number of steps: one on the
    real images, one whose batches are augmented by counterfactuals under random interventions on ``attributes``
    (each sample with probability ``prob``). The target labels are read from the batch after augmentation, so they
    are the counterfactual's own: unchanged under interventions on non-ancestors of the target (do(sex), do(race)
    for disease), recomputed by the SCM when an ancestor is intervened on (do(age) also changes disease).

    The training data are a biased subset of the training split (``selection``, see :func:`biased_subset`), the test
    data are untouched, so that what the classifier can learn from the biased data alone differs from what the test
    rewards: the setting where augmentation can matter (:data:`DEFAULT_SELECTION` explains the default).

    Outputs in ``output_dir``: ``results.json`` (settings, the training subset's and test set's composition, AUC per
    seed and arm, mean and standard deviation over seeds, training times) and ``results.md`` (the table of arms by
    subgroups).

    Args:
        scm: the fitted :class:`~monai_cf.networks.DeepSCM`, e.g. :func:`monai_cf.pipeline.load_scm`.
        train_data: the training split: a dataset of dictionaries (image, canonical attributes, ``"pa"``) or a CSV
            read with :func:`monai_cf.data.csv_dataset` at the image model's size.
        test_data: the test split, in the same forms.
        output_dir: where to write the results (``None``: nowhere).
        target: the attribute to classify.
        attributes: the attributes intervened on by the augmentation.
        subgroups: the attributes whose classes the AUC is broken down by.
        selection: the biased-subset rules (:func:`biased_subset`); ``None`` or ``[]``: the whole training split.
        prob: per-sample probability of a counterfactual.
        seeds: one run per seed (network initialisation, data order, augmentation draws, subset draw).
        max_epochs: training epochs of each classifier.
        batch_size: training batch size.
        lr: AdamW learning rate.
        classifier: further :class:`~monai_cf.networks.nets.AttributePredictor` arguments (``backbone``,
            ``channels``, ``dropout``...).
        augmentation_path: ``"batched"`` (default, one network call per batch) or ``"transform"``
            (:class:`~monai_cf.transforms.RandCounterfactuald` per sample in the dataset's transforms).
        data: further :func:`monai_cf.data.csv_dataset` arguments for CSV inputs (``columns``, ``value_maps``,
            ``image_root``...).
        device: torch device of the classifier (default: the SCM's).
        progress_bar: show the trainers' progress bars.

    Example::

        scm = load_scm("bundles/cxr_soft_cft/models", cf_type="soft")
        study = AugmentationStudy(scm, "phantom/train.csv", "phantom/test.csv", "eval/augmentation", seeds=[0, 1])
        results = study.run()
        results["summary"]["counterfactual_augmentation"]["sex=female"]  # {'mean': ..., 'sd': ...}
    """

    def __init__(
        self,
        scm: Any,
        train_data: Any,
        test_data: Any,
        output_dir: str | os.PathLike | None = None,
        target: str = "disease",
        attributes: Sequence[str] = ("sex", "race"),
        subgroups: Sequence[str] = ("sex", "race"),
        selection: Sequence[Mapping[str, Any]] | None = DEFAULT_SELECTION,
        prob: float = 0.5,
        seeds: Sequence[int] | int = (0,),
        max_epochs: int = 4,
        batch_size: int = 64,
        lr: float = 1e-3,
        classifier: Mapping[str, Any] | None = None,
        augmentation_path: str = "batched",
        data: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        progress_bar: bool = False,
    ) -> None:
        self.scm = scm.eval()
        self.graph: CausalGraph = scm.graph
        self.target = self.graph.check_names([target])[0]
        if not self.graph[self.target].is_discrete or self.graph[self.target].num_classes != 2:
            raise ValueError(f"target '{target}' must be a binary attribute (the study reports a binary ROC AUC).")
        self.attributes = self.graph.check_names(list(attributes))
        if self.target in self.attributes:
            raise ValueError(f"target '{target}' cannot also be intervened on (attributes={list(attributes)}).")
        self.subgroups = self.graph.check_names(list(subgroups))
        continuous = [n for n in self.subgroups if not self.graph[n].is_discrete]
        if continuous:
            raise ValueError(f"subgroups must be discrete attributes; {continuous} are continuous.")
        if augmentation_path not in AUGMENTATION_PATHS:
            raise ValueError(f"augmentation_path must be one of {AUGMENTATION_PATHS}, got {augmentation_path!r}.")
        self.selection = [dict(rule) for rule in (selection or ())]
        _canonical_rules(self.graph, self.selection)  # fail now, not after loading data
        self.prob = float(prob)
        self.seeds = [int(seeds)] if isinstance(seeds, int) else [int(s) for s in seeds]
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed.")
        self.max_epochs = int(max_epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.classifier = dict(classifier or {})
        self.augmentation_path = augmentation_path
        self.data = dict(data or {})
        self.device = torch.device(device) if device is not None else next(scm.parameters()).device
        self.progress_bar = bool(progress_bar)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.train_data = self._dataset(train_data, "train_data")
        self.test_data = self._dataset(test_data, "test_data")
        self.results: dict[str, Any] | None = None

    def _dataset(self, data: Any, name: str) -> Any:
        if isinstance(data, str | os.PathLike):
            if not Path(data).is_file():
                raise ValueError(f"{name}: no CSV file '{data}'.")
            size = int(self.scm.image_model.spatial_size[0])
            return csv_dataset(data, self.graph, spatial_size=size, cache=True, **self.data)
        if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
            raise ValueError(f"{name} must be a CSV path or a dataset of dictionaries; got {type(data).__name__}.")
        return data

    # ------------------------------------------------------------------------------------------------ pieces
    def build_classifier(self) -> AttributePredictor:
        """A fresh classifier of the target (initialised from torch's global random state)."""
        image = self.scm.image_model
        return AttributePredictor(
            image.spatial_dims, image.in_channels, self.graph, attributes=[self.target], **self.classifier
        )

    def augmenter(self, seed: int) -> CounterfactualBatchAugmenter:
        """The batched augmentation of the ``"batched"`` path, seeded."""
        augmenter = CounterfactualBatchAugmenter(
            self.scm, attributes=self.attributes, prob=self.prob, image_keys=self.graph.image_key
        )
        return augmenter.set_random_state(seed=seed)

    def train_classifier(self, train: Any, seed: int, augment: bool) -> tuple[AttributePredictor, dict[str, Any]]:
        """Train one arm; returns the classifier and its training record (seconds, steps, images/s)."""
        set_determinism(seed=seed)  # the same initial weights in both arms
        classifier = self.build_classifier()
        dataset = train
        if augment and self.augmentation_path == "transform":
            transform = RandCounterfactuald(self.graph.image_key, self.scm, attributes=self.attributes, prob=self.prob)
            transform.set_random_state(seed=seed)
            dataset = Dataset(train, transform=transform)
        loader = create_data_loader(dataset, batch_size=self.batch_size, shuffle=True, seed=seed)
        trainer = create_predictor_trainer(
            classifier,
            loader,
            max_epochs=self.max_epochs,
            lr=self.lr,
            device=self.device,
            seed=seed,
            distributed=False,
            progress_bar=self.progress_bar,
            stats=False,
        )
        counted = {"counterfactuals": 0}
        if augment and self.augmentation_path == "batched":
            augmenter = self.augmenter(seed)
            augmenter.prepare_batch = trainer.prepare_batch
            trainer.prepare_batch = augmenter

            def count(_engine: Any) -> None:
                counted["counterfactuals"] += sum(do is not None for do in augmenter.last_interventions)

            trainer.add_event_handler(Events.ITERATION_COMPLETED, count)
        start = time.time()
        trainer.run()
        seconds = time.time() - start
        steps = int(trainer.state.iteration)
        images = len(train) * self.max_epochs
        record: dict[str, Any] = {
            "train_seconds": round(seconds, 2),
            "steps": steps,
            "images_per_second": round(images / max(seconds, 1e-9), 1),
            "final_loss": float(trainer.state.output[0]["loss"])
            if isinstance(trainer.state.output, list)
            else float(trainer.state.output["loss"]),
        }
        if augment:
            record["augmentation_path"] = self.augmentation_path
            if self.augmentation_path == "batched":
                record["counterfactual_images"] = counted["counterfactuals"]
        return classifier.eval(), record

    @torch.no_grad()
    def evaluate(self, classifier: AttributePredictor) -> dict[str, float | None]:
        """Overall and per-subgroup AUC of the target on the test data (real images)."""
        loader = create_data_loader(self.test_data, batch_size=max(self.batch_size, 100), shuffle=False)
        scores, labels = [], []
        groups: dict[str, list[torch.Tensor]] = {name: [] for name in self.subgroups}
        with eval_mode(classifier):
            for batch in loader:
                image = batch[self.graph.image_key]
                image = convert_to_tensor(image, track_meta=False).to(self.device).float()
                scores.append(classifier.probabilities(image)[self.target][:, -1].cpu())
                labels.append(torch.as_tensor(batch[self.target]).flatten())
                for name in self.subgroups:
                    groups[name].append(torch.as_tensor(batch[name]).flatten())
        return subgroup_auc(
            torch.cat(scores), torch.cat(labels), {n: torch.cat(v) for n, v in groups.items()}, self.graph
        )

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """Train and score both arms for every seed; writes and returns the results."""
        runs = []
        subsets = {}
        start = time.time()
        for seed in self.seeds:
            train = biased_subset(self.train_data, self.graph, self.selection, seed=seed)
            subsets[seed] = _composition(train, self.graph, self.target, self.subgroups)
            logger.info("Augmentation study, seed %d: %d training images %s", seed, len(train), subsets[seed])
            for arm in ARMS:
                classifier, record = self.train_classifier(train, seed, augment=arm == ARMS[1])
                auc = self.evaluate(classifier)
                runs.append({"seed": seed, "arm": arm, "auc": auc, **record, "n_train": len(train)})
                logger.info(
                    "seed %d %s: %s (%.1f s)",
                    seed,
                    arm,
                    {k: None if v is None else round(v, 3) for k, v in auc.items()},
                    record["train_seconds"],
                )
        self.results = {
            "settings": self.settings(),
            "training_subset": {str(seed): counts for seed, counts in subsets.items()},
            "test_set": _composition(self.test_data, self.graph, self.target, self.subgroups),
            "runs": runs,
            "summary": _summary(runs),
            "seconds": round(time.time() - start, 1),
        }
        if self.output_dir is not None:
            self.write(self.output_dir)
        return self.results

    def settings(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "attributes": list(self.attributes),
            "subgroups": list(self.subgroups),
            "selection": self.selection,
            "prob": self.prob,
            "seeds": list(self.seeds),
            "max_epochs": self.max_epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "classifier": self.classifier,
            "augmentation_path": self.augmentation_path,
            "device": str(self.device),
        }

    def columns(self) -> list[str]:
        """The table's columns: ``overall`` then every subgroup."""
        return ["overall"] + [f"{n}={c}" for n in self.subgroups for c in self.graph[n].class_names]

    def write(self, output_dir: str | os.PathLike) -> None:
        """Write ``results.json`` and ``results.md``."""
        if self.results is None:
            raise ValueError("Nothing to write: call run() first.")
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(output_dir / "results.json", "w") as handle:
            json.dump(self.results, handle, indent=2)
        with open(output_dir / "results.md", "w") as handle:
            handle.write(self.markdown())
        logger.info("Augmentation study results in %s", output_dir)

    def markdown(self) -> str:
        """The results as a markdown report: the AUC table, the data and the settings."""
        if self.results is None:
            raise ValueError("No results: call run() first.")
        columns = self.columns()
        summary = self.results["summary"]
        seeds = self.results["settings"]["seeds"]
        spread = " (mean ± sd over seeds)" if len(seeds) > 1 else ""
        lines = [
            "# Counterfactual augmentation of a disease classifier",
            "",
            f"Test AUC of `{self.target}` on real test images{spread}; seeds {seeds}. Classifiers trained on a biased "
            f"subset of the training split, with counterfactual augmentation over {list(self.attributes)} "
            f"(probability {self.prob}) or without.",
            "",
            "| arm | " + " | ".join(columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for arm in ARMS:
            lines.append(f"| {arm} | " + " | ".join(_cell(summary[arm].get(c)) for c in columns) + " |")
        lines.append(
            "| difference | " + " | ".join(_cell(summary["difference"].get(c), signed=True) for c in columns) + " |"
        )
        runs = self.results["runs"]
        times = [f"{arm} {np.mean([r['train_seconds'] for r in runs if r['arm'] == arm]):.1f}" for arm in ARMS]
        lines += [
            "",
            f"Training: {runs[0]['steps']} steps of batch {self.batch_size} per classifier; seconds per classifier: "
            f"{', '.join(times)} ({self.augmentation_path} augmentation).",
            "",
            f"Training subset (seed {seeds[0]}, {runs[0]['n_train']} images): "
            f"{self.results['training_subset'][str(seeds[0])]}",
            "",
            f"Test set: {self.results['test_set']}",
            "",
            f"Selection rules: {self.selection or 'none (whole training split)'}",
            "",
        ]
        return "\n".join(lines)


def _summary(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    summary: dict[str, dict[str, dict[str, float | None]]] = {}
    for arm in ARMS:
        per_key: dict[str, list[float]] = {}
        for run in runs:
            if run["arm"] == arm:
                for key, value in run["auc"].items():
                    per_key.setdefault(key, [])
                    if value is not None:
                        per_key[key].append(value)
        summary[arm] = {key: _mean_sd(values) for key, values in per_key.items()}
    # paired per seed: the arms share initial weights, data order and test set
    differences: dict[str, list[float]] = {}
    by_seed = {(r["seed"], r["arm"]): r["auc"] for r in runs}
    for seed in sorted({r["seed"] for r in runs}):
        base, augmented = by_seed.get((seed, ARMS[0])), by_seed.get((seed, ARMS[1]))
        if base is None or augmented is None:
            continue
        for key in base:
            differences.setdefault(key, [])
            if base[key] is not None and augmented.get(key) is not None:
                differences[key].append(augmented[key] - base[key])
    summary["difference"] = {key: _mean_sd(values) for key, values in differences.items()}
    return summary


def _mean_sd(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "sd": sd, "n": len(values)}


def _cell(stats: Mapping[str, Any] | None, signed: bool = False) -> str:
    if not stats or stats.get("mean") is None or not math.isfinite(stats["mean"]):
        return "n/a"
    text = f"{stats['mean']:+.3f}" if signed else f"{stats['mean']:.3f}"
    if stats.get("sd") is not None:
        text += f" ± {stats['sd']:.3f}"
    return text


def run_augmentation_study(scm: Any, train_data: Any, test_data: Any, **kwargs: Any) -> dict[str, Any]:
    """Build an :class:`AugmentationStudy` and run it; returns the results.

    Example::

        results = run_augmentation_study(load_scm("models"), "phantom/train.csv", "phantom/test.csv",
                                         output_dir="eval/augmentation", seeds=[0, 1, 2])
    """
    return AugmentationStudy(scm, train_data, test_data, **kwargs).run()
