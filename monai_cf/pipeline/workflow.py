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
import json
import logging
import os
import resource
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_cf.data import load_csv_datalist
from monai_cf.engines import (
    AttributeTable,
    CounterfactualEvaluator,
    create_cft_trainer,
    create_hvae_trainer,
    create_mechanism_trainer,
    create_predictor_trainer,
    measure_nelbo,
)
from monai_cf.engines.distributed import process_rank
from monai_cf.graph import CausalGraph
from monai_cf.handlers import BEST_CHECKPOINT
from monai_cf.networks import DeepSCM
from monai_cf.networks.nets import AttributePredictor

from .mlflow_tracking import (
    fail_mlflow_run,
    finish_mlflow_run,
    stage_handler_kwargs,
    start_mlflow_run,
    tracking_from_handlers,
)
from .side_by_side import parallel_workers, train_side_by_side
from .stage_data import (
    ENGINE_IMAGE_KEY,
    csv_path,
    datalist_kwargs,
    load_splits,
    stage_loader,
    write_phantom,
)
from .stage_files import (
    _PREDICTOR_FILES,
    _STAGE_FILES,
    CFT_FILE,
    _barrier,
    _jsonable,
    check_run_dir,
    checked_stage_file,
    comparable_settings,
    copy_stage_file,
    discard_stage_file,
    load_checkpoint,
    pretrained_problem,
    save_stage_file,
    state_checksum,
    upstream_changed,
)
from .stage_options import (
    _PREDICTOR_TRAINING_KEYS,
    DEFAULT_CFT,
    DEFAULT_DATA,
    DEFAULT_EVALUATION,
    DEFAULT_HVAE_TRAINING,
    DEFAULT_MECHANISMS,
    DEFAULT_PHANTOM,
    DEFAULT_PREDICTOR,
    STAGE_PARTS,
    _cli_value,
    check_cft_modes,
    check_num_test,
    check_parallel,
    check_stage_options,
    check_stage_parts,
    image_model_config,
    recorded_options,
    retrain_set,
)

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
PHANTOM_GRAPH = "mimic_cxr"


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


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Torch's global generator seeded inside, restored after: model weights that do not depend on what ran before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _run_together(trainer: Any) -> None:
    """Run a stage's trainer once every process has built its own: a trainer picks the checkpoint it resumes from
    when it is built, and a process that saw the first checkpoint of a faster one would skip training (and the
    collective calls in it) and hang the launch."""
    _barrier()
    trainer.run()


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
        self.image_model_config = image_model_config(
            image_model or {"preset": "small32"},
            self.graph.parents_dim,
            self.spatial_dims,
            self.in_channels,
            self.spatial_size,
        )
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
        self.tracking_uri, self.experiment_name = tracking_from_handlers(handlers, tracking_uri, experiment_name)
        self._init_kwargs.update(tracking_uri=self.tracking_uri, experiment_name=self.experiment_name)
        self.parallel = check_parallel(parallel)
        self.retrain = retrain_set(retrain, self.stages)
        self.timing: dict[str, float] = {}
        self.peak_memory_mb: dict[str, float] = {}
        self.side_by_side_peak_memory_mb: dict[str, float] = {}
        self.results: dict[str, Any] | None = None
        self._datasets: dict[str, Any] = {}
        self._validate()

    # ------------------------------------------------------------------------------------------------ checks
    #: this pipeline's stages in execution order
    stages: tuple[str, ...] = STAGES

    def _validate(self) -> None:
        check_num_test(self.evaluation)
        if ENGINE_IMAGE_KEY in self.graph.attributes:
            raise ValueError(
                f"The graph names an attribute '{ENGINE_IMAGE_KEY}', the key the trainers give the image; rename it."
            )
        check_cft_modes(self.cft["modes"])
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
        return datalist_kwargs(self.data)

    def _csv(self, split: str) -> Path:
        return csv_path(self.dataset_dir, self.data, split)

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
            self._datasets = load_splits(self.dataset_dir, self.data, self.graph, self.spatial_size)

    def _write_phantom(self) -> None:
        write_phantom(self.dataset_dir, self.phantom, self.spatial_size)

    def _loader(self, split: str | Any, batch_size: int, shuffle: bool, across_ranks: bool = True) -> Any:
        """A resumable loader over a split (or a dataset); ``across_ranks=False`` gives every process the whole
        split (stages that run the same computation on every rank of a multi-process launch, so that all ranks
        hold identical models)."""
        dataset = self._datasets[split] if isinstance(split, str) else split
        return stage_loader(dataset, batch_size, shuffle, self.seed, self.num_workers, across_ranks)

    def _check_stage_options(self) -> None:
        """Stage settings may not name what the pipeline sets itself (handlers, device, seed, output folders)."""
        handler_keys = self._handler_kwargs("check")
        check_stage_options(self.predictor, self.mechanisms, self.hvae_training, self.cft, handler_keys)

    def _handler_kwargs(self, stage: str) -> dict[str, Any]:
        return stage_handler_kwargs(stage, self.progress_bar, self.tracking_uri, self.experiment_name)

    # a stage file: weights + the settings that made them + an id later stages record as their input
    def _save(self, name: str, state_dict: Mapping[str, Any], settings: Mapping, extra: Mapping | None = None) -> str:
        """Write a stage file on rank 0; every rank returns the id rank 0 wrote."""
        return save_stage_file(self.models_dir, name, state_dict, settings, extra)

    def _reusable(self, stage: str, name: str, settings: Mapping) -> dict[str, Any] | None:
        """The stage file when it can be reused, ``None`` when the stage must (re)train."""
        path = self.models_dir / name
        run_dir = self.models_dir / "runs" / name.removesuffix(".pt")
        if stage in self.retrain:
            discard_stage_file(stage, path, run_dir)
            return None
        self._adopt_pretrained()
        if not path.is_file():
            self._check_run_dir(run_dir, settings)
            return None
        return checked_stage_file(stage, path, settings, self.phantom is not None)

    def _comparable(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """Settings as compared for reuse: the phantom is defined by its own settings, not by where it lies."""
        return comparable_settings(settings, self.phantom is not None)

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
            copy_stage_file(source, target)
            logger.info("Using the shipped pretrained %s (%s)", stage, source)
        _barrier()

    def _pretrained_problem(self, stage: str, path: Path) -> str | None:
        """Why a shipped stage file cannot stand in for training the stage, or ``None`` when it can."""
        return pretrained_problem(path, self._expected_settings(stage), self.phantom is not None)

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
        check_run_dir(run_dir, settings, self.phantom is not None)

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
        return upstream_changed(load_checkpoint(path)["settings"], self._cft_settings(mode))

    def _parallel_workers(self) -> int:
        """How many trainings may run side by side (1: one after the other)."""
        return parallel_workers(self.parallel, self.device)

    def _train_side_by_side(self, jobs: Sequence[tuple[str, str | None]], epsilon: float | None = None) -> None:
        """Train ``(stage, mode)`` jobs in separate processes, each writing its stage file; the sequential path
        that follows then reuses those files. Nothing happens when fewer than two can run at once."""
        workers = min(len(jobs), self._parallel_workers())
        if workers < 2:
            return
        self._prepare_data()  # the phantom is written once, before the processes start
        peak_mb = train_side_by_side(jobs, self._init_kwargs, self.retrain, self.progress_bar, workers, epsilon)
        self.side_by_side_peak_memory_mb["cft" if jobs[0][0] == "cft" else "predictors"] = peak_mb
        # the files are fresh: the sequential path must reuse them, not retrain again
        self.retrain -= {stage for stage, _ in jobs}

    def _reusable_upstream(self, stage: str, name: str, settings: Mapping) -> dict[str, Any] | None:
        """Like :meth:`_reusable`, but a file made from an earlier upstream model is retrained, not an error."""
        path = self.models_dir / name
        if stage not in self.retrain and path.is_file():
            if upstream_changed(load_checkpoint(path)["settings"], settings):
                logger.info("%s was fine-tuned from earlier models; fine-tuning again.", path)
                discard_stage_file(stage, path, self.models_dir / "runs" / name.removesuffix(".pt"))
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
            run_id = start_mlflow_run(self.tracking_uri, self.experiment_name, "evaluate")
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
                fail_mlflow_run(self.tracking_uri, run_id)
            raise
        self.results = evaluator.results
        if run_id is not None:
            finish_mlflow_run(self.tracking_uri, run_id, self.results.get("config", {}))
        logger.info("Amplification: %s", {k: round(v, 4) for k, v in self.results["amplification"].items()})
        return self.results
