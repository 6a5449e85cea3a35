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
"""The whole counterfactual pipeline as stages with reusable checkpoints, for bundles and scripts.

data -> guidance predictor -> evaluation predictor -> mechanisms -> HVAE -> fine-tuning (none / hard / soft from
the same pretrained HVAE) -> evaluation and report. Each finished stage leaves one self-describing file in
``models_dir`` (weights plus the settings that produced them), which later runs reuse; an interrupted stage
resumes from its last checkpoint under ``models_dir/runs/<stage>``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import multiprocessing
import os
import resource
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import cloudpickle
import torch
import torch.distributed as dist
from monai.data import DataLoader

from monai_cf.data import csv_dataset, load_csv_datalist
from monai_cf.engines import (
    CFT_MODES,
    CounterfactualEvaluator,
    create_cft_trainer,
    create_data_loader,
    create_hvae_trainer,
    create_mechanism_trainer,
    create_predictor_trainer,
    measure_nelbo,
)
from monai_cf.engines.optimizers import check_factory, describe_factory
from monai_cf.engines.part_trainers import AttributeTable
from monai_cf.engines.utils import ResumableDistributedSampler, process_rank
from monai_cf.graph import CausalGraph
from monai_cf.handlers.checkpoint import BEST_CHECKPOINT
from monai_cf.handlers.tracking import check_tracking_uri
from monai_cf.networks import DeepSCM
from monai_cf.networks.nets import AttributePredictor

__all__ = [
    "CounterfactualPipeline",
    "STAGES",
    "PRETRAINED_STAGES",
    "CFT_FILE",
    "STAGE_PARTS",
    "check_stage_parts",
    "recorded_options",
    "load_checkpoint",
    "locate_bundle_root",
    "state_checksum",
]

logger = logging.getLogger("monai_cf.pipeline")

#: stage names in execution order
STAGES = ("data", "guidance", "evaluation_predictor", "mechanisms", "hvae", "cft", "evaluate")
#: the stages a shipped pretrained base provides (``pretrained_dir``); fine-tuning and evaluation always run
PRETRAINED_STAGES = ("guidance", "evaluation_predictor", "mechanisms", "hvae")
#: file name of a fine-tuned image model in ``models_dir``
CFT_FILE = "hvae_cft_{mode}.pt"
_PREDICTOR_FILES = {"guidance": "guidance_predictor.pt", "evaluation_predictor": "evaluation_predictor.pt"}
_STAGE_FILES = {**_PREDICTOR_FILES, "mechanisms": "mechanisms.pt", "hvae": "hvae.pt"}
CHECKPOINT_VERSION = 1
PHANTOM_GRAPH = "mimic_cxr"
#: the batch key of the image for every trainer and the evaluator, whatever the graph calls its image
ENGINE_IMAGE_KEY = "image"

DEFAULT_DATA = {"train_csv": "train.csv", "val_csv": "val.csv", "test_csv": "test.csv"}
DEFAULT_PHANTOM = {"n_train": 4000, "n_val": 300, "n_test": 500, "seed": 0}
DEFAULT_PREDICTOR = {"backbone": "small_cnn", "max_epochs": 10, "lr": 1e-3, "batch_size": 64}
_PREDICTOR_TRAINING_KEYS = ("max_epochs", "lr", "batch_size", "optimizer", "handlers")
#: what every training section (predictor, mechanisms, hvae_training, cft) takes beside its own settings: an optimiser
#: factory in place of AdamW, and more handlers for its trainer
STAGE_PARTS = ("optimizer", "handlers")
DEFAULT_MECHANISMS = {"max_epochs": 30, "lr": 3e-3, "batch_size": 256}
DEFAULT_HVAE_TRAINING = {"max_epochs": 8, "lr": 1e-3}
DEFAULT_CFT = {
    "modes": list(CFT_MODES),
    "fine_tune_none": False,
    "max_epochs": 7,
    "lr": 1.5e-3,
    "warmup_steps": 100,
    "force_change": True,
    "ema_rate": None,
}
DEFAULT_EVALUATION = {"batch_size": 100}


def locate_bundle_root(name: str) -> str:
    """The bundle's directory, whether the user runs from inside it or from the repository root.

    ``python -m monai.bundle run`` has no notion of the config file's location in the config itself; model-zoo
    bundles assume the working directory is the bundle. This returns the working directory when it holds
    ``configs/`` of a bundle called ``name``, else ``bundles/<name>`` below it when that exists, else the working
    directory.
    """
    cwd = Path.cwd()
    if cwd.name == name and (cwd / "configs").is_dir():
        return str(cwd)
    candidate = cwd / "bundles" / name
    if (candidate / "configs").is_dir():
        return str(candidate)
    return str(cwd)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a stage file written by :class:`CounterfactualPipeline`, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"No checkpoint '{path}': run the training bundle first (or point models_dir elsewhere).")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION or "state_dict" not in ckpt:
        raise ValueError(f"'{path}' is not a monai_cf pipeline checkpoint (version {CHECKPOINT_VERSION}).")
    return ckpt


def state_checksum(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and values: what a stage file's ``checksum`` records.

    Example::

        state_checksum(model.state_dict())  # '9f2c...'
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = torch.as_tensor(state_dict[key]).detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Torch's global generator seeded inside, restored after: model weights that do not depend on what ran before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _run_together(trainer: Any) -> None:
    """Run a stage's trainer once every process has built its own: a trainer picks the checkpoint it resumes from
    when it is built, and a process that saw the first checkpoint of a faster one would skip training (and the
    collective calls in it) and hang the launch."""
    _barrier()
    trainer.run()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class _EngineImageKey:
    """Moves a sample's image to the key the trainers read (``"image"``) from the key a user's graph gives it."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, item: Mapping[str, Any]) -> dict[str, Any]:
        item = dict(item)
        item[ENGINE_IMAGE_KEY] = item.pop(self.key)
        return item


def recorded_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A training section as stage settings record and compare it: an optimiser factory by its description
    (another optimiser trains the stage again), handlers left out (they watch training; one that changes it, such as
    early stopping, needs ``--retrain`` of its stage). Without them the record is that of the options alone."""
    recorded = {k: v for k, v in options.items() if k not in STAGE_PARTS}
    if options.get("optimizer") is not None:
        recorded["optimizer"] = describe_factory(options["optimizer"])
    return recorded


def check_stage_parts(section: str, options: Mapping[str, Any]) -> None:
    """Fail now, naming ``section``, when its optimiser factory or handlers cannot serve: the optimiser is built once
    on a stand-in parameter, so that a misspelt or out-of-range setting stops the run before anything trains."""
    factory = options.get("optimizer")
    if factory is not None:
        check_factory(factory, f"{section}.optimizer", "a torch optimiser from the parameters")
        try:
            describe_factory(factory)
            built = factory([torch.nn.Parameter(torch.zeros(1))])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{section}.optimizer: {error}") from None
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(f"{section}.optimizer built a {type(built).__name__}, not a torch.optim.Optimizer.")
    handlers = options.get("handlers")
    if handlers is None:
        return
    if isinstance(handlers, (str, Mapping)) or not isinstance(handlers, Sequence):
        raise TypeError(f"{section}.handlers must be a list of handlers, got a {type(handlers).__name__}.")
    for index, handler in enumerate(handlers):
        if not callable(getattr(handler, "attach", None)):
            raise TypeError(
                f"{section}.handlers[{index}] is a {type(handler).__name__}, not a handler (no attach(engine) method)."
            )


def _cli_value(value: Any) -> Any:
    """``true`` / ``false`` / ``null`` typed on the bundle command line arrive as strings (Fire parses only the
    Python spellings ``True`` / ``False`` / ``None``): map them to the values they name."""
    if isinstance(value, str):
        return {"true": True, "false": False, "null": None, "none": None}.get(value.strip().lower(), value)
    return value


def _differences(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


class CounterfactualPipeline:
    """Train and evaluate deep structural causal models with and without counterfactual fine-tuning.

    Everything is validated when the pipeline is built (the graph, the image model, the data location and CSV
    columns, the tracking URI), so a mistake fails in seconds rather than after hours of training.

    Stage files in ``models_dir`` (``guidance_predictor.pt``, ``evaluation_predictor.pt``, ``mechanisms.pt``,
    ``hvae.pt``, ``hvae_cft_<mode>.pt``) hold the weights and the settings that produced them. A stage whose file
    exists is reused; a file made with other settings is an error naming the differences (pass ``retrain``).
    Retraining a stage retrains the stages that depend on it. Interrupted stages resume from
    ``models_dir/runs/<stage>``.

    Args:
        dataset_dir: the data: the phantom is written here once when ``phantom`` is given and the directory lacks
            it; for real data it must exist and hold the CSVs.
        output_dir: evaluation outputs (``metrics.json``, ``report.md``, figures, ``timing.json``).
        models_dir: stage files (default ``<output_dir>/../models``).
        pretrained_dir: a shipped pretrained base: stage files of the predictors, mechanisms and HVAE (see
            :meth:`pretrain`). A stage whose file is missing from ``models_dir`` takes the file from here when its
            checksum verifies and it was trained with this pipeline's settings (the data folder's location aside
            for phantom data); otherwise the stage trains, and the log says why. ``None``: train everything.
        graph: the causal graph (name or dict, see :class:`~monai_cf.graph.CausalGraph`).
        phantom: ``{"n_train", "n_val", "n_test", "seed"}`` of the synthetic chest X-ray phantom, or ``None`` for
            real data.
        data: ``train_csv`` / ``val_csv`` / ``test_csv`` (relative to ``dataset_dir``), ``columns``,
            ``value_maps``, ``image_root``, ``skip_bad_rows``: see :func:`monai_cf.data.load_csv_datalist`.
        spatial_size: images are resized to this (square) size.
        spatial_dims: 2 or 3.
        in_channels: image channels.
        batch_size: HVAE and fine-tuning batch size.
        image_model: HVAE keyword arguments, or ``{"preset": name, ...}``; size, channels and parents default to
            the pipeline's. Or a user's image network: a class or ``functools.partial`` building it (a bundle's
            ``network_def`` with ``_mode_: callable``), or its ``{"_target_": ..., ...}`` config; any ``nn.Module``
            with the HVAE-like interface of :func:`~monai_cf.networks.nets.check_image_mechanism`, its arguments
            plain values (the stage files record them to rebuild it), ``parents_dim`` filled in when it takes one.
        predictor: ``backbone``, ``max_epochs``, ``lr``, ``batch_size`` of both attribute predictors.
        mechanisms: ``max_epochs``, ``lr``, ``batch_size`` of the attribute mechanisms.
            Each training section (``predictor``, ``mechanisms``, ``hvae_training``, ``cft``) also takes
            ``optimizer``, a factory building the optimiser from the parameters in place of AdamW (a bundle
            component with ``_mode_: callable``; recorded in the stage settings), and ``handlers``, MONAI handlers
            attached to that stage's trainer (not recorded).
        hvae_training: :func:`~monai_cf.engines.create_hvae_trainer` arguments (``max_epochs``, ``lr``, ``beta``...).
        cft: ``modes`` (subset of none / hard / soft), ``fine_tune_none`` (``False``: ``none`` is the pretrained
            HVAE), and :func:`~monai_cf.engines.create_cft_trainer` arguments (``max_epochs``, ``lr``...).
        evaluation: :class:`~monai_cf.engines.CounterfactualEvaluator` arguments (``batch_size``, ``seed``...) and
            ``num_test``: evaluate the first this many test images (``None``: all).
        retrain: ``True`` for every stage, or stage names to retrain although their files exist.
        device: torch device (default: CUDA when available).
        seed: seed of every stage.
        num_workers: data loader workers.
        tracking_uri: MLflow tracking URI (``sqlite:///...``); every stage is a run of ``experiment_name``.
        experiment_name: MLflow experiment.
        handlers: handlers from the bundle config; an MLflow handler there (``--tracking mlflow``) provides
            ``tracking_uri`` and ``experiment_name`` when those are not given.
        progress_bar: show progress bars.
        parallel: train independent models (the two predictors; the hard and soft fine-tuning) side by side in
            separate processes, splitting the CPU threads between them. Small models use several threads poorly,
            so on a 2-core CPU two one-thread trainings finish about 1.4x sooner than one after the other with two
            threads each. ``"auto"``: on the CPU, outside a multi-process launch, with at least 2 threads; ``True``:
            on the CPU outside a multi-process launch, even with one thread.
            Results are those of the sequential run up to floating-point summation order.

    Example::

        pipeline = CounterfactualPipeline("data/phantom", "eval", phantom={"n_train": 4000, "n_val": 300,
                                          "n_test": 500, "seed": 0})
        pipeline.run()  # or pipeline.run("hvae") for one stage and what it needs
        pipeline.results["amplification"]
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        output_dir: str | os.PathLike,
        models_dir: str | os.PathLike | None = None,
        pretrained_dir: str | os.PathLike | None = None,
        graph: CausalGraph | Mapping | str = PHANTOM_GRAPH,
        phantom: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        spatial_size: int = 32,
        spatial_dims: int = 2,
        in_channels: int = 1,
        batch_size: int = 32,
        image_model: Mapping[str, Any] | None = None,
        predictor: Mapping[str, Any] | None = None,
        mechanisms: Mapping[str, Any] | None = None,
        hvae_training: Mapping[str, Any] | None = None,
        cft: Mapping[str, Any] | None = None,
        evaluation: Mapping[str, Any] | None = None,
        retrain: bool | str | Sequence[str] = False,
        device: str | torch.device | None = None,
        seed: int = 0,
        num_workers: int = 0,
        tracking_uri: str | None = None,
        experiment_name: str = "cxr_soft_cft",
        handlers: Sequence[Any] | None = None,
        progress_bar: bool = True,
        parallel: bool | str = "auto",
    ) -> None:
        # what a side-by-side training process needs to rebuild this pipeline (handlers are resolved below)
        self._init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "handlers")}
        self.dataset_dir = Path(dataset_dir)
        self.output_dir = Path(output_dir)
        self.models_dir = Path(models_dir) if models_dir is not None else self.output_dir.parent / "models"
        self.pretrained_dir = None if _cli_value(pretrained_dir) is None else Path(pretrained_dir)
        self._pretrained_checked = False
        self.graph = CausalGraph.build(graph)
        phantom = _cli_value(phantom)
        self.phantom = None if phantom is None else {**DEFAULT_PHANTOM, **dict(phantom)}
        self.data = {**DEFAULT_DATA, **dict(data or {})}
        self.spatial_size = int(spatial_size)
        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(in_channels)
        self.batch_size = int(batch_size)
        self.image_model_config = self._image_model_config(image_model or {"preset": "small32"})
        self.predictor = {**DEFAULT_PREDICTOR, **dict(predictor or {})}
        self.mechanisms = {**DEFAULT_MECHANISMS, **dict(mechanisms or {})}
        self.hvae_training = {**DEFAULT_HVAE_TRAINING, **dict(hvae_training or {})}
        self.cft = {**DEFAULT_CFT, **dict(cft or {})}
        self.cft["fine_tune_none"] = bool(_cli_value(self.cft["fine_tune_none"]))
        self.evaluation = {**DEFAULT_EVALUATION, **dict(evaluation or {})}
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.progress_bar = bool(_cli_value(progress_bar))
        self.experiment_name = experiment_name
        self.tracking_uri = tracking_uri
        for handler in handlers or ():
            client = getattr(handler, "client", None)
            if tracking_uri is None and client is not None and hasattr(client, "tracking_uri"):
                self.tracking_uri = client.tracking_uri
                self.experiment_name = getattr(handler, "experiment_name", None) or experiment_name
        if self.tracking_uri is not None:
            self.tracking_uri = check_tracking_uri(self.tracking_uri)
        self._init_kwargs.update(tracking_uri=self.tracking_uri, experiment_name=self.experiment_name)
        parallel = _cli_value(parallel)
        if parallel not in (True, False, "auto"):
            raise ValueError(f"parallel must be true, false or 'auto', got {parallel!r}.")
        self.parallel = parallel
        self.retrain = self._retrain_set(retrain)
        self.timing: dict[str, float] = {}
        self.peak_memory_mb: dict[str, float] = {}
        self.side_by_side_peak_memory_mb: dict[str, float] = {}
        self.results: dict[str, Any] | None = None
        self._datasets: dict[str, Any] = {}
        self._validate()

    # ------------------------------------------------------------------------------------------------ checks
    #: this pipeline's stages in execution order
    stages: tuple[str, ...] = STAGES

    def _retrain_set(self, retrain: bool | str | Sequence[str]) -> set[str]:
        retrain = _cli_value(retrain)
        if retrain is True:
            return set(self.stages) - {"data"}
        if not retrain:
            return set()
        names = {retrain} if isinstance(retrain, str) else set(retrain)
        unknown = names - set(self.stages) - {"predictors"}
        if unknown:
            raise ValueError(f"retrain names unknown stages {sorted(unknown)}; stages: {list(self.stages[1:])}.")
        if "predictors" in names:
            names |= {"guidance", "evaluation_predictor"}
        return names - {"predictors"}

    def _image_model_config(self, config: Mapping[str, Any] | Any) -> dict[str, Any]:
        if not isinstance(config, Mapping):
            # a user's network, from a bundle config with `_mode_: callable`: recorded as the config that rebuilds it
            check_factory(config, "image_model", "the image network")
            try:
                config = describe_factory(config)
                json.dumps(config)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"image_model: {error} (its arguments must be plain values: numbers, text, lists)"
                ) from None
        config = dict(config)
        if "_target_" in config:
            return config
        config.setdefault("parents_dim", self.graph.parents_dim)
        if "preset" not in config:
            config.setdefault("spatial_dims", self.spatial_dims)
            config.setdefault("in_channels", self.in_channels)
            config.setdefault("spatial_size", self.spatial_size)
        return config

    def _validate(self) -> None:
        num_test = _cli_value(self.evaluation.get("num_test"))
        if "num_test" in self.evaluation:
            self.evaluation["num_test"] = num_test
        if num_test is not None and (isinstance(num_test, bool) or not isinstance(num_test, int) or num_test < 1):
            raise ValueError(f"evaluation.num_test must be a positive number of test images or null, got {num_test!r}.")
        if ENGINE_IMAGE_KEY in self.graph.attributes:
            raise ValueError(
                f"The graph names an attribute '{ENGINE_IMAGE_KEY}', the key the trainers give the image; rename it."
            )
        unknown_cft = set(self.cft["modes"]) - set(CFT_MODES)
        if unknown_cft or not self.cft["modes"]:
            raise ValueError(
                f"cft modes must be a non-empty subset of {', '.join(CFT_MODES)}; got {self.cft['modes']}."
            )
        self._check_stage_options()
        if self.phantom is not None:
            phantom_graph = CausalGraph.from_name(PHANTOM_GRAPH)
            if self.graph.to_dict() != phantom_graph.to_dict():
                raise ValueError(
                    "The phantom generates the 'mimic_cxr' graph (sex, race, age, disease -> image); a different graph "
                    "needs real data: set phantom to null and dataset_dir / data to your CSVs."
                )
        else:
            if not self.dataset_dir.is_dir():
                raise ValueError(f"dataset_dir '{self.dataset_dir}' does not exist (real data: phantom is null).")
            for split in ("train", "val", "test"):
                csv = self._csv(split)
                if not csv.is_file():
                    raise ValueError(f"data.{split}_csv: no file '{csv}'.")
            # columns, values and image paths now, not when the first stage loads the data (after files are written)
            for split in ("train", "val", "test"):
                load_csv_datalist(self._csv(split), self.graph, check_images=False, **self._datalist_kwargs())
        scm = self.build_scm()
        model = scm.image_model
        if (
            tuple(model.spatial_size) != (self.spatial_size,) * self.spatial_dims
            or model.in_channels != self.in_channels
        ):
            raise ValueError(
                f"image_model takes {model.in_channels}-channel images of size {model.spatial_size}, but the pipeline "
                f"has in_channels={self.in_channels}, spatial_size={self.spatial_size}."
            )

    def _datalist_kwargs(self) -> dict[str, Any]:
        return {k: self.data[k] for k in ("columns", "value_maps", "image_root", "skip_bad_rows") if k in self.data}

    def _csv(self, split: str) -> Path:
        return self.dataset_dir / str(self.data[f"{split}_csv"])

    # ------------------------------------------------------------------------------------------------ models
    def build_scm(self) -> DeepSCM:
        """A fresh DeepSCM with this pipeline's graph and image model (untrained)."""
        return DeepSCM.from_config({"graph": self.graph.to_dict(), "image_model": self.image_model_config})

    def build_predictor(self) -> AttributePredictor:
        """A fresh predictor: ``predictor`` keys other than the training settings are AttributePredictor arguments."""
        network = {k: v for k, v in self.predictor.items() if k not in _PREDICTOR_TRAINING_KEYS}
        return AttributePredictor(self.spatial_dims, self.in_channels, self.graph, **network)

    def _stage_settings(self, stage: str) -> dict[str, Any]:
        common = {"graph": self.graph.to_dict(), "spatial_size": self.spatial_size, "seed": self.seed}
        data = {"phantom": self.phantom, "data": self.data, "dataset_dir": str(self.dataset_dir)}
        if self.phantom is not None:
            from monai_cf.data import PHANTOM_VERSION

            data["phantom_version"] = PHANTOM_VERSION
        if stage in ("guidance", "evaluation_predictor"):
            return {**common, **data, "predictor": recorded_options(self.predictor)}
        if stage == "mechanisms":
            return {**common, **data, "mechanisms": recorded_options(self.mechanisms)}
        if stage == "hvae":
            training = {k: v for k, v in recorded_options(self.hvae_training).items() if k != "progress_bar"}
            return {
                **common,
                **data,
                # how counterfactuals carry the pixel noise does not change what the HVAE learns
                "image_model": {k: v for k, v in self.image_model_config.items() if k != "counterfactual_noise"},
                "training": training,
                "batch_size": self.batch_size,
            }
        raise KeyError(stage)

    # ------------------------------------------------------------------------------------------------ stages
    def run(self, *stages: str) -> dict[str, Any] | None:
        """Run the given stages (default: all) and what they need; returns the evaluation results, if run."""
        wanted = list(stages) or list(self.stages)
        unknown = set(wanted) - set(self.stages) - {"predictors"}
        if unknown:
            raise ValueError(f"Unknown stages {sorted(unknown)}; stages: {list(self.stages)}.")
        if "predictors" in wanted:
            wanted = [s for s in wanted if s != "predictors"] + ["guidance", "evaluation_predictor"]
        start = time.time()
        self._adopt_pretrained()
        if "data" in wanted:
            self.stage_data()
        predictors = [(s, None) for s in ("guidance", "evaluation_predictor") if s in wanted]
        if len(predictors) > 1 and self._parallel_workers() > 1 and all(self._needs_training(*j) for j in predictors):
            self._timed("predictors", lambda: self._train_side_by_side(predictors))
        for stage in self.stages[1:]:
            if stage in wanted:
                getattr(self, f"stage_{stage}")()
        self.timing["total"] = time.time() - start
        if process_rank() == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "timing.json", "w") as handle:
                memory = {"peak_memory_mb": self.peak_memory_mb}
                if self.side_by_side_peak_memory_mb:
                    # per group, the largest of the processes that trained side by side (next to this one)
                    memory["side_by_side_peak_memory_mb"] = self.side_by_side_peak_memory_mb
                json.dump({"seconds": self.timing, **memory}, handle, indent=2)
            logger.info("Stage times (s): %s", {k: round(v, 1) for k, v in self.timing.items()})
        return self.results

    def _timed(self, stage: str, fn: Any) -> Any:
        logger.info("Stage %s ...", stage)
        start = time.time()
        out = fn()
        self.timing[stage] = self.timing.get(stage, 0.0) + time.time() - start
        self.peak_memory_mb[stage] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        logger.info("Stage %s done in %.1f s", stage, self.timing[stage])
        return out

    def stage_data(self) -> None:
        """Write the phantom once (rank 0) and load the splits."""
        self._timed("data", self._prepare_data)

    def _prepare_data(self) -> None:
        if self.phantom is not None and process_rank() == 0:
            self._write_phantom()
        _barrier()
        if not self._datasets:
            for split in ("train", "val", "test"):
                self._datasets[split] = csv_dataset(
                    self._csv(split),
                    self.graph,
                    spatial_size=self.spatial_size,
                    cache=True,
                    transforms=[_EngineImageKey(self.graph.image_key)],
                    **self._datalist_kwargs(),
                )
            logger.info("Data: %s", {k: len(v) for k, v in self._datasets.items()})
            for split in ("val", "test"):
                _warn_missing_classes(self.graph, split, getattr(self._datasets[split], "data", []))

    def _write_phantom(self) -> None:
        from monai_cf.data import SyntheticCXR

        settings_file = self.dataset_dir / "phantom.json"
        wanted = {"n_train": self.phantom["n_train"], "n_val": self.phantom["n_val"], "n_test": self.phantom["n_test"]}
        if settings_file.is_file():
            with open(settings_file) as handle:
                written = json.load(handle)
            counts = written.get("counts", {})
            have = {f"n_{split}": counts.get(split) for split in ("train", "val", "test")} | {
                "seed": written.get("seed")
            }
            want = wanted | {"seed": self.phantom["seed"]}
            if have != want:
                raise ValueError(
                    f"dataset_dir '{self.dataset_dir}' holds a phantom written with {have}, but the config asks for "
                    f"{want}: choose another dataset_dir or delete that one."
                )
            return
        if self.dataset_dir.exists() and any(self.dataset_dir.iterdir()):
            raise ValueError(
                f"dataset_dir '{self.dataset_dir}' is not empty and holds no phantom; the phantom is only written to a "
                "new or empty directory (for your own data set phantom to null)."
            )
        logger.info("Writing the phantom to %s", self.dataset_dir)
        SyntheticCXR(spatial_size=self.spatial_size, seed=self.phantom["seed"]).write(self.dataset_dir, **wanted)

    def _loader(self, split: str | Any, batch_size: int, shuffle: bool, across_ranks: bool = True) -> Any:
        """A resumable loader over a split (or a dataset); ``across_ranks=False`` gives every process the whole
        split (stages that run the same computation on every rank of a multi-process launch, so that all ranks
        hold identical models)."""
        dataset = self._datasets[split] if isinstance(split, str) else split
        if across_ranks or not (dist.is_available() and dist.is_initialized()):
            return create_data_loader(
                dataset, batch_size=batch_size, shuffle=shuffle, seed=self.seed, num_workers=self.num_workers
            )
        sampler = ResumableDistributedSampler(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=self.seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers)

    def _check_stage_options(self) -> None:
        """Stage settings may not name what the pipeline sets itself (handlers, device, seed, output folders)."""
        owned = {key: "use the top-level progress_bar or --tracking" for key in self._handler_kwargs("check")}
        owned |= {
            "device": "use the top-level device",
            "seed": "use the top-level seed",
            "output_dir": "use models_dir",
        }
        stages = {
            "hvae_training": (self.hvae_training, owned),
            "cft": (self.cft, {**owned, "mode": "use cft.modes", "elbo_constraint": "the pretrained nELBO, measured"}),
        }
        for section, (options, reserved) in stages.items():
            for key in options:
                if key in reserved:
                    raise ValueError(
                        f"{section}.{key} is set by the pipeline ({reserved[key]}); remove it from {section}."
                    )
        allowed = set(inspect.signature(AttributePredictor.__init__).parameters) - {
            "self",
            "spatial_dims",
            "in_channels",
            "graph",
        }
        unknown = sorted(set(self.predictor) - allowed - set(_PREDICTOR_TRAINING_KEYS))
        if unknown:
            raise ValueError(
                f"predictor.{unknown[0]} is neither a training setting ({', '.join(_PREDICTOR_TRAINING_KEYS)}) nor an "
                f"AttributePredictor argument ({', '.join(sorted(allowed))})."
            )
        unknown = sorted(set(self.mechanisms) - set(DEFAULT_MECHANISMS) - set(STAGE_PARTS))
        if unknown:
            raise ValueError(
                f"mechanisms.{unknown[0]} is not a setting; mechanisms takes "
                f"{', '.join((*DEFAULT_MECHANISMS, *STAGE_PARTS))}."
            )
        for section in ("predictor", "mechanisms", "hvae_training", "cft"):
            check_stage_parts(section, getattr(self, section))

    def _handler_kwargs(self, stage: str) -> dict[str, Any]:
        return {
            "progress_bar": self.progress_bar and process_rank() == 0,
            "stats": False,
            "tracking_uri": self.tracking_uri,
            "experiment_name": self.experiment_name,
            "run_name": stage,
        }

    # a stage file: weights + the settings that made them + an id later stages record as their input
    def _save(self, name: str, state_dict: Mapping[str, Any], settings: Mapping, extra: Mapping | None = None) -> str:
        """Write a stage file on rank 0; every rank returns the id rank 0 wrote."""
        uid = uuid.uuid4().hex
        if process_rank() == 0:
            self.models_dir.mkdir(parents=True, exist_ok=True)
            path = self.models_dir / name
            tmp = path.with_suffix(".tmp")
            payload = {
                "version": CHECKPOINT_VERSION,
                "uid": uid,
                "settings": _jsonable(settings),
                "state_dict": dict(state_dict),
                "checksum": state_checksum(state_dict),
                **dict(extra or {}),
            }
            torch.save(payload, tmp)
            os.replace(tmp, path)
        _barrier()
        return uid if process_rank() == 0 else load_checkpoint(self.models_dir / name)["uid"]

    def _reusable(self, stage: str, name: str, settings: Mapping) -> dict[str, Any] | None:
        """The stage file when it can be reused, ``None`` when the stage must (re)train."""
        path = self.models_dir / name
        run_dir = self.models_dir / "runs" / name.removesuffix(".pt")
        if stage in self.retrain:
            if process_rank() == 0:
                if path.exists():
                    logger.info("Retraining %s: replacing %s", stage, path)
                    path.unlink()
                shutil.rmtree(run_dir, ignore_errors=True)
            _barrier()
            return None
        self._adopt_pretrained()
        if not path.is_file():
            self._check_run_dir(run_dir, settings)
            return None
        ckpt = load_checkpoint(path)
        diff = _differences(self._comparable(ckpt["settings"]), self._comparable(_jsonable(settings)))
        if diff:
            raise ValueError(
                f"'{path}' was trained with other settings ({'; '.join(diff[:6])}). Pass --retrain \"['{stage}']\" "
                f"(or true for all stages) to replace it, or use another models_dir."
            )
        logger.info("Reusing %s (%s)", stage, path)
        return ckpt

    def _comparable(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """Settings as compared for reuse: the phantom is defined by its own settings, not by where it lies."""
        settings = dict(settings)
        if self.phantom is not None:
            settings.pop("dataset_dir", None)
        return settings

    def _expected_settings(self, stage: str) -> dict[str, Any]:
        settings = self._stage_settings(stage)
        return settings | {"role": stage} if stage in _PREDICTOR_FILES else settings

    def _adopt_pretrained(self) -> None:
        """Copy the shipped pretrained stage files that verify and fit this pipeline into ``models_dir``, once."""
        if self._pretrained_checked or self.pretrained_dir is None:
            return
        self._pretrained_checked = True
        for stage in PRETRAINED_STAGES:
            name = _STAGE_FILES[stage]
            target, source = self.models_dir / name, self.pretrained_dir / name
            if stage in self.retrain or target.exists() or not source.is_file():
                continue
            problem = self._pretrained_problem(stage, source)
            if problem:
                logger.warning("Not using the shipped %s (%s): it trains from scratch.", source, problem)
                continue
            if process_rank() == 0:
                self.models_dir.mkdir(parents=True, exist_ok=True)
                partial = target.with_suffix(".tmp")
                shutil.copyfile(source, partial)
                os.replace(partial, target)
            logger.info("Using the shipped pretrained %s (%s)", stage, source)
        _barrier()

    def _pretrained_problem(self, stage: str, path: Path) -> str | None:
        """Why a shipped stage file cannot stand in for training the stage, or ``None`` when it can."""
        try:
            ckpt = load_checkpoint(path)
        except Exception as error:  # a damaged or foreign file is a reason to train, not to stop
            return f"unreadable: {error}"
        if ckpt.get("checksum") is None:
            return "it carries no checksum"
        actual = state_checksum(ckpt["state_dict"])
        if actual != ckpt["checksum"]:
            return f"checksum mismatch: the file says {ckpt['checksum'][:12]}..., its weights give {actual[:12]}..."
        diff = _differences(
            self._comparable(ckpt["settings"]), self._comparable(_jsonable(self._expected_settings(stage)))
        )
        if diff:
            return f"trained with other settings: {'; '.join(diff[:6])}"
        return None

    def pretrain(self) -> dict[str, Any]:
        """Train the pretrained base from scratch into ``pretrained_dir``: both predictors, mechanisms and HVAE.

        This is how the bundle's shipped base is made (``--run_id run_pretrain``). Files already in
        ``pretrained_dir`` are reused if their settings match, and an interrupted run resumes; pass ``retrain`` to
        replace them. Writes ``pretrained_dir/manifest.json`` with each file's checksum and the stage times.

        Returns:
            the manifest.
        """
        if self.pretrained_dir is None:
            raise ValueError("pretrain() needs pretrained_dir: the folder the base is written to.")
        kwargs = {**self._init_kwargs, "models_dir": self.pretrained_dir, "pretrained_dir": None}
        base = CounterfactualPipeline(**kwargs)
        base.run("data", "guidance", "evaluation_predictor", "mechanisms", "hvae")
        manifest = {
            "stages": {
                stage: {
                    "file": _STAGE_FILES[stage],
                    "checksum": load_checkpoint(self.pretrained_dir / _STAGE_FILES[stage])["checksum"],
                }
                for stage in PRETRAINED_STAGES
            },
            "seconds": {k: round(v, 1) for k, v in base.timing.items()},
            "threads": torch.get_num_threads(),
        }
        if process_rank() == 0:
            with open(self.pretrained_dir / "manifest.json", "w") as handle:
                json.dump(manifest, handle, indent=2)
        return manifest

    def _check_run_dir(self, run_dir: Path, settings: Mapping) -> None:
        """An interrupted stage resumes only with the settings it started with."""
        settings_file = run_dir / "settings.json"
        if settings_file.is_file():
            with open(settings_file) as handle:
                old = json.load(handle)
            diff = _differences(self._comparable(old), self._comparable(_jsonable(settings)))
            if diff:
                raise ValueError(
                    f"'{run_dir}' holds an interrupted run with other settings ({'; '.join(diff[:6])}); pass --retrain "
                    "for this stage to start it afresh."
                )
        elif process_rank() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            # written whole, then renamed: the other ranks check the same file and must never read half of it
            partial = settings_file.with_suffix(".tmp")
            with open(partial, "w") as handle:
                json.dump(_jsonable(settings), handle, indent=1)
            os.replace(partial, settings_file)

    def _predictor_stage(self, stage: str, seed_offset: int) -> AttributePredictor:
        name = _PREDICTOR_FILES[stage]
        settings = self._stage_settings(stage) | {"role": stage}
        with _seeded(self.seed + seed_offset):  # the same weights whichever process trains it
            predictor = self.build_predictor()
        ckpt = self._reusable(stage, name, settings)
        if ckpt is None:
            self._prepare_data()
            batch = int(self.predictor["batch_size"])
            trainer = create_predictor_trainer(
                predictor,
                self._loader("train", batch, True, across_ranks=False),
                self._loader("val", batch, False, across_ranks=False),
                self.models_dir / "runs" / name.removesuffix(".pt"),
                max_epochs=int(self.predictor["max_epochs"]),
                lr=float(self.predictor["lr"]),
                optimizer=self.predictor.get("optimizer"),
                handlers=self.predictor.get("handlers"),
                device=self.device,
                seed=self.seed + seed_offset,
                distributed=False,
                **self._handler_kwargs(stage),
            )
            _run_together(trainer)
            best = self.models_dir / "runs" / name.removesuffix(".pt") / BEST_CHECKPOINT
            if best.is_file():
                predictor.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["network"])
            metrics = dict(trainer.evaluator.state.metrics) if trainer.evaluator is not None else {}
            uid = self._save(name, predictor.state_dict(), settings, {"metrics": metrics})
            logger.info("%s: %s", stage, {k: round(float(v), 3) for k, v in metrics.items()})
        else:
            predictor.load_state_dict(ckpt["state_dict"])
            uid = ckpt["uid"]
        if stage == "guidance":
            self.guidance_uid = uid
        return predictor.to(self.device).eval()

    def stage_guidance(self) -> AttributePredictor:
        """Train (or reuse) the guidance predictor that steers fine-tuning."""
        self.guidance = self._timed("guidance", lambda: self._predictor_stage("guidance", 1))
        return self.guidance

    def stage_evaluation_predictor(self) -> AttributePredictor:
        """Train (or reuse) the independent evaluation predictor that scores counterfactuals."""
        self.evaluation_predictor = self._timed(
            "evaluation_predictor", lambda: self._predictor_stage("evaluation_predictor", 2)
        )
        return self.evaluation_predictor

    def stage_mechanisms(self) -> dict[str, Any]:
        """Fit (or reuse) the attribute mechanisms by maximum likelihood."""
        return self._timed("mechanisms", self._mechanisms_stage)

    def _fresh_scm_and_checkpoint(self, stage: str, name: str) -> tuple[dict[str, Any], DeepSCM, dict | None]:
        """A stage's settings, an untrained DeepSCM initialised from the seed, and its reusable file (or None)."""
        settings = self._stage_settings(stage)
        with _seeded(self.seed):
            scm = self.build_scm()
        return settings, scm, self._reusable(stage, name, settings)

    def _mechanisms_stage(self) -> dict[str, Any]:
        settings, scm, ckpt = self._fresh_scm_and_checkpoint("mechanisms", _STAGE_FILES["mechanisms"])
        if ckpt is None:
            self._prepare_data()
            batch = int(self.mechanisms["batch_size"])
            trainer = create_mechanism_trainer(
                scm,
                self._loader(AttributeTable(self._datasets["train"], self.graph), batch, True, across_ranks=False),
                self._loader(AttributeTable(self._datasets["val"], self.graph), batch, False, across_ranks=False),
                self.models_dir / "runs" / "mechanisms",
                max_epochs=int(self.mechanisms["max_epochs"]),
                lr=float(self.mechanisms["lr"]),
                optimizer=self.mechanisms.get("optimizer"),
                handlers=self.mechanisms.get("handlers"),
                device=self.device,
                seed=self.seed,
                distributed=False,
                **self._handler_kwargs("mechanisms"),
            )
            _run_together(trainer)
            state = {k: v.cpu() for k, v in scm.mechanisms.state_dict().items()}
            uid = self._save(_STAGE_FILES["mechanisms"], state, settings)
            ckpt = {"uid": uid, "state_dict": state}
        self.mechanisms_state = ckpt["state_dict"]
        self.mechanisms_uid = ckpt["uid"]
        return self.mechanisms_state

    def stage_hvae(self) -> DeepSCM:
        """Train (or reuse) the HVAE image mechanism; ``self.pretrained`` holds the (EMA) weights."""
        return self._timed("hvae", self._hvae_stage)

    def _hvae_stage(self) -> DeepSCM:
        settings, scm, ckpt = self._fresh_scm_and_checkpoint("hvae", _STAGE_FILES["hvae"])
        if ckpt is None:
            _, state = self._train_image_model(create_hvae_trainer, scm, "hvae", self.batch_size, self.hvae_training)
            uid = self._save(_STAGE_FILES["hvae"], state, settings, {"image_model": _jsonable(self.image_model_config)})
            _barrier()
            ckpt = {"uid": uid, "state_dict": state}
        self.pretrained_state = ckpt["state_dict"]
        self.hvae_uid = ckpt["uid"]
        scm.image_model.load_state_dict(self.pretrained_state)
        return scm

    def _train_image_model(
        self, factory: Any, scm: DeepSCM, stage: str, batch_size: int, training: Mapping[str, Any]
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        """Train ``scm``'s image model with ``factory`` (a ``create_*_trainer``) in ``models_dir/runs/<stage>``.

        ``training`` holds ``max_epochs`` and the factory's other settings. Returns the trainer and the weights to
        keep (the EMA's when there is one), on the CPU.
        """
        self._prepare_data()
        training = dict(training)
        trainer = factory(
            scm,
            self._loader("train", batch_size, True),
            self._loader("val", batch_size, False),
            self.models_dir / "runs" / stage,
            max_epochs=int(training.pop("max_epochs")),
            device=self.device,
            seed=self.seed,
            **training,
            **self._handler_kwargs(stage),
        )
        _run_together(trainer)
        model = trainer.ema.module if trainer.ema is not None else scm.image_model
        return trainer, {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def _scm_with(self, image_state: Mapping[str, Any]) -> DeepSCM:
        scm = self.build_scm()
        scm.mechanisms.load_state_dict(self.mechanisms_state)
        scm.image_model.load_state_dict(image_state)
        return scm.to(self.device)

    def stage_cft(self) -> dict[str, DeepSCM]:
        """Fine-tune the pretrained HVAE once per mode (none / hard / soft); returns ``{mode: DeepSCM}``."""
        return self._timed("cft", self._cft_stage)

    def _cft_stage(self) -> dict[str, DeepSCM]:
        if not hasattr(self, "pretrained_state"):
            self.stage_hvae()
        if not hasattr(self, "mechanisms_state"):
            self.stage_mechanisms()
        if any(m != "none" or self.cft["fine_tune_none"] for m in self.cft["modes"]) and not hasattr(self, "guidance"):
            self.stage_guidance()
        tuned_modes = [m for m in self.cft["modes"] if m != "none" or self.cft["fine_tune_none"]]
        epsilon = self._cft_epsilon
        jobs = [("cft", m) for m in tuned_modes if self._needs_training("cft", m)]
        if len(jobs) > 1 and self._parallel_workers() > 1:
            epsilon = self._measure_cft_epsilon()
            self._train_side_by_side(jobs, epsilon=epsilon)
        self.tuned: dict[str, DeepSCM] = {}
        for mode in self.cft["modes"]:
            if mode not in tuned_modes:
                self.tuned[mode] = self._scm_with(self.pretrained_state).eval()
                continue
            name = CFT_FILE.format(mode=mode)
            stage_key = f"cft_{mode}"
            settings = self._cft_settings(mode)
            ckpt = self._reusable_upstream("cft", name, settings)
            if ckpt is None:
                self._prepare_data()
                if epsilon is None:
                    epsilon = self._measure_cft_epsilon()
                scm = self._scm_with(self.pretrained_state)
                train = self._loader("train", self.batch_size, True)
                opts = self._cft_options()
                tuner = create_cft_trainer(
                    scm,
                    self.guidance,
                    train,
                    mode=mode,
                    output_dir=self.models_dir / "runs" / name.removesuffix(".pt"),
                    max_epochs=int(opts.pop("max_epochs")),
                    elbo_constraint=epsilon,
                    device=self.device,
                    seed=self.seed,
                    **opts,
                    **self._handler_kwargs(stage_key),
                )
                _run_together(tuner)
                model = tuner.ema.module if tuner.ema is not None else scm.image_model
                state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                self._save(
                    name,
                    state,
                    settings,
                    {"image_model": _jsonable(self.image_model_config), "elbo_constraint": epsilon},
                )
                _barrier()
                ckpt = {"state_dict": state}
            self.tuned[mode] = self._scm_with(ckpt["state_dict"]).eval()
        return self.tuned

    _cft_epsilon: float | None = None

    def _cft_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.cft.items() if k not in ("modes", "fine_tune_none")}

    def _cft_settings(self, mode: str) -> dict[str, Any]:
        return {
            "mode": mode,
            "cft": recorded_options(self._cft_options()),
            "counterfactual_noise": self.image_model_config.get("counterfactual_noise", "scaled"),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "hvae": self.hvae_uid,
            "guidance": getattr(self, "guidance_uid", None),
        }

    def _measure_cft_epsilon(self) -> float:
        """The nELBO bound of fine-tuning: the pretrained nELBO on training batches, one value for all modes."""
        self._prepare_data()
        scm = self._scm_with(self.pretrained_state)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.seed)  # the latents drawn for the bound: the same whichever way modes train
            train = self._loader("train", self.batch_size, True)
            self._cft_epsilon = measure_nelbo(scm, train, 20, self.device)
        return self._cft_epsilon

    def _needs_training(self, stage: str, mode: str | None = None) -> bool:
        """Whether a predictor stage or fine-tuning ``mode`` would train rather than reuse its file (a file made
        with other settings is left to the sequential path, which reports it)."""
        name = CFT_FILE.format(mode=mode) if stage == "cft" else _PREDICTOR_FILES[stage]
        path = self.models_dir / name
        if stage in self.retrain or not path.is_file():
            return True
        if stage != "cft":
            return False
        old = load_checkpoint(path)["settings"]
        return any(old.get(k) != v for k, v in self._cft_settings(mode).items() if k in ("hvae", "guidance"))

    def _parallel_workers(self) -> int:
        """How many trainings may run side by side (1: one after the other)."""
        if self.parallel is False or self.device.type != "cpu" or (dist.is_available() and dist.is_initialized()):
            return 1
        return 2**16 if self.parallel is True else torch.get_num_threads()  # True: as many as there are jobs

    def _train_side_by_side(self, jobs: Sequence[tuple[str, str | None]], epsilon: float | None = None) -> None:
        """Train ``(stage, mode)`` jobs in separate processes, each writing its stage file; the sequential path
        that follows then reuses those files. Nothing happens when fewer than two can run at once."""
        workers = min(len(jobs), self._parallel_workers())
        if workers < 2:
            return
        self._prepare_data()  # the phantom is written once, before the processes start
        threads = max(1, torch.get_num_threads() // workers)
        logger.info(
            "Training %s side by side: %d processes with %d thread(s) each",
            ", ".join(stage if mode is None else f"{stage} {mode}" for stage, mode in jobs),
            workers,
            threads,
        )
        kwargs = dict(self._init_kwargs)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {
                pool.submit(
                    _train_job,
                    # the job's own stage may be retrained as asked; its upstream files were made by this run. By
                    # value (cloudpickle): a config's handlers hold lambdas, which pickle cannot send
                    cloudpickle.dumps(
                        dict(kwargs, retrain=sorted(self.retrain & {stage}), progress_bar=self.progress_bar and i == 0)
                    ),
                    stage,
                    mode,
                    threads,
                    epsilon,
                ): (stage, mode)
                for i, (stage, mode) in enumerate(jobs)
            }
            peak_mb = 0.0
            for future, (stage, mode) in futures.items():
                try:
                    peak_mb = max(peak_mb, future.result())
                except Exception as error:
                    label = stage if mode is None else f"{stage} ({mode})"
                    raise RuntimeError(f"Training {label} in its own process failed: {error}") from error
        self.side_by_side_peak_memory_mb["cft" if jobs[0][0] == "cft" else "predictors"] = peak_mb
        # the files are fresh: the sequential path must reuse them, not retrain again
        self.retrain -= {stage for stage, _ in jobs}

    def _reusable_upstream(self, stage: str, name: str, settings: Mapping) -> dict[str, Any] | None:
        """Like :meth:`_reusable`, but a file made from an earlier upstream model is retrained, not an error."""
        path = self.models_dir / name
        if stage not in self.retrain and path.is_file():
            old = load_checkpoint(path)["settings"]
            upstream = {k: old.get(k) for k in ("hvae", "guidance")}
            if upstream != {k: settings[k] for k in ("hvae", "guidance")}:
                logger.info("%s was fine-tuned from earlier models; fine-tuning again.", path)
                if process_rank() == 0:
                    path.unlink()
                    shutil.rmtree(self.models_dir / "runs" / name.removesuffix(".pt"), ignore_errors=True)
                _barrier()
                self._check_run_dir(self.models_dir / "runs" / name.removesuffix(".pt"), settings)
                return None
        return self._reusable(stage, name, settings)

    def stage_evaluate(self) -> dict[str, Any] | None:
        """Evaluate every fine-tuning mode on the test split; writes metrics.json, report.md and figures."""
        return self._timed("evaluate", self._evaluate_stage)

    def counterfactual_models(self) -> dict[str, DeepSCM]:
        """``{cf type: DeepSCM}`` the evaluation compares: here one per fine-tuning mode (trained if needed)."""
        if not hasattr(self, "tuned"):
            self.stage_cft()
        return self.tuned

    def _evaluate_stage(self) -> dict[str, Any] | None:
        models = self.counterfactual_models()
        if not hasattr(self, "evaluation_predictor"):
            self.stage_evaluation_predictor()
        self._prepare_data()  # holds a barrier: every rank must pass it before the others return
        if process_rank() != 0:
            return None
        options = dict(self.evaluation)
        batch = int(options.pop("batch_size"))
        num_test = options.pop("num_test", None)
        split: Any = "test"
        if num_test is not None:
            # the first rows, so that every model of a comparison sees the same images
            split = torch.utils.data.Subset(
                self._datasets["test"], range(min(int(num_test), len(self._datasets["test"])))
            )
        # rank 0 alone evaluates: on the whole test split, not its shard of a multi-process launch
        test = self._loader(split, batch, False, across_ranks=False)
        phantom_kwargs: dict[str, Any] = {}
        if self.phantom is not None:
            from monai_cf.data import SyntheticCXR

            phantom_kwargs = {
                "phantom": SyntheticCXR.from_directory(self.dataset_dir),
                "phantom_noise": SyntheticCXR.read_noise(self.dataset_dir, "test"),
            }
        if options.get("consistency", True) and "observational_data" not in options:
            # the consistency bounds come from the training split's labels: more rows than the test split
            records = load_csv_datalist(self._csv("train"), self.graph, check_images=False, **self._datalist_kwargs())
            options["observational_data"] = {n: [r[n] for r in records] for n in self.graph.attributes}
        run_id = None
        if self.tracking_uri is not None:
            run_id = self._mlflow_run("evaluate")
        evaluator = CounterfactualEvaluator(
            self.graph,
            test,
            self.evaluation_predictor,
            models,
            device=self.device,
            output_dir=str(self.output_dir),
            tracking_uri=self.tracking_uri,
            run_id=run_id,
            image_key=ENGINE_IMAGE_KEY,
            seed=options.pop("seed", self.seed),
            **phantom_kwargs,
            **options,
        )
        try:
            evaluator.run()
        except BaseException:
            if run_id is not None:
                from mlflow import MlflowClient

                MlflowClient(self.tracking_uri).set_terminated(run_id, "FAILED")
            raise
        self.results = evaluator.results
        if run_id is not None:
            self._finish_mlflow_run(run_id, self.results.get("config", {}))
        logger.info("Amplification: %s", {k: round(v, 4) for k, v in self.results["amplification"].items()})
        return self.results

    def _mlflow_run(self, name: str) -> str:
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment_name)
        experiment_id = (
            experiment.experiment_id if experiment is not None else client.create_experiment(self.experiment_name)
        )
        run = client.create_run(experiment_id, run_name=name)
        return run.info.run_id

    def _finish_mlflow_run(self, run_id: str, config: Mapping[str, Any]) -> None:
        """The evaluation's settings as the run's parameters, and its end when the evaluation ended."""
        from mlflow import MlflowClient
        from mlflow.entities import Param

        client = MlflowClient(self.tracking_uri)
        params = [
            Param(key, json.dumps(value) if not isinstance(value, str) else value) for key, value in config.items()
        ]
        client.log_batch(run_id, params=[p for p in params if len(p.value) <= 6000])
        client.set_terminated(run_id)


def _warn_missing_classes(graph: CausalGraph, split: str, records: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Warn, naming the split and attribute, when a split lacks classes of a discrete attribute (AUCs undefined)."""
    missing = {}
    for name in graph.attributes:
        var = graph[name]
        if not var.is_discrete or not records:
            continue
        present = {int(r[name]) for r in records if name in r}
        absent = [var.class_names[c] for c in range(var.num_classes) if c not in present]
        if absent:
            missing[name] = absent
            logger.warning(
                "The %s split (%d rows) has no '%s' of attribute '%s': its AUC is undefined there and %s",
                split,
                len(records),
                "', '".join(absent),
                name,
                "the key metric averages the attributes whose AUC is defined."
                if split == "val"
                else "its effectiveness and amplification terms are left out of the means.",
            )
    return missing


def _train_job(kwargs: bytes, stage: str, mode: str | None, threads: int, epsilon: float | None) -> float:
    """One side-by-side training (runs in a spawned process): rebuild the pipeline from its cloudpickled arguments,
    train, write the stage file.

    Returns the process's peak resident memory in MB.
    """
    kwargs = cloudpickle.loads(kwargs)
    torch.set_num_threads(threads)
    if not logging.getLogger().handlers:
        label = stage if mode is None else f"{stage} {mode}"
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{label}] %(message)s")
    pipeline = CounterfactualPipeline(**{**kwargs, "parallel": False})
    if stage in ("guidance", "evaluation_predictor"):
        getattr(pipeline, f"stage_{stage}")()
    elif stage == "cft":
        pipeline.cft["modes"] = [mode]
        pipeline._cft_epsilon = epsilon
        pipeline.stage_cft()
    else:
        raise ValueError(f"stage {stage!r} does not train side by side.")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
