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
"""The handlers every monai_cf trainer gets: :func:`setup_training_handlers` wires MONAI's checkpoints, resume,
validation, stats, progress bar and MLflow onto a trainer; :class:`OutputSummary` makes the engine output what
those handlers read; :class:`MeanMetric` averages a per-batch value across processes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader, MLFlowHandler, StatsHandler, ValidationHandler
from monai.utils import IgniteInfo, min_version, optional_import

from monai_cf.engines.reproducibility import SkipSeenBatches
from monai_cf.handlers.checkpoint import BEST_CHECKPOINT, AtomicCheckpointSaver, latest_checkpoint
from monai_cf.handlers.tracking import check_tracking_uri

if TYPE_CHECKING:
    from ignite.engine import Engine
    from ignite.metrics import Metric
    from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric", as_type="base")
    reinit__is_reduced, _ = optional_import(
        "ignite.metrics.metric", IgniteInfo.OPT_IMPORT_VERSION, min_version, "reinit__is_reduced", as_type="decorator"
    )
    sync_all_reduce, _ = optional_import(
        "ignite.metrics.metric", IgniteInfo.OPT_IMPORT_VERSION, min_version, "sync_all_reduce", as_type="decorator"
    )

__all__ = ["MeanMetric", "OutputSummary", "lower_is_better", "setup_training_handlers"]

logger = logging.getLogger("monai_cf.engines")


class MeanMetric(Metric):
    """Sample-weighted mean of a per-batch value, reduced across processes.

    ``output_transform`` maps the engine output to either a ``(B,)`` tensor of per-sample values or a pair
    ``(batch_mean, batch_size)``.

    Example::

        metric = MeanMetric(output_transform=lambda out: (out["nelbo"], out["batch_size"]))
        metric.attach(evaluator, "val_nelbo")
    """

    def __init__(self, output_transform: Callable = lambda x: x, device: str | torch.device = "cpu") -> None:
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.zeros((), dtype=torch.float64, device=self._device)
        self._count = torch.zeros((), dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output: Any) -> None:
        if isinstance(output, (tuple, list)) and len(output) == 2:
            value, count = output
            value = torch.as_tensor(value).detach().to(self._device, torch.float64)
            self._sum += value * float(count)
            self._count += float(count)
        else:
            values = torch.as_tensor(output).detach().reshape(-1).to(self._device, torch.float64)
            self._sum += values.sum()
            self._count += values.numel()

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        if float(self._count) == 0:
            raise RuntimeError("MeanMetric must have at least one update before it can be computed.")
        return float(self._sum / self._count)


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` for MONAI workflows whose key metric is a loss (``current < best``)."""
    return current < best


class OutputSummary:
    """Replace ``engine.state.output`` by ``[{key: float}]`` at ``IterationEvents.MODEL_COMPLETED``.

    A one-item "decollated" list of Python numbers: what MONAI's ``StatsHandler``, ``MLFlowHandler`` (default
    ``output_transform=lambda x: x[0]``) and bundle tracking (``from_engine(["loss"], first=True)``) read, without
    decollating whole batches. All values come to the host in one copy.

    Args:
        keys: the scalar entries of the output to keep (missing ones are left out).
    """

    def __init__(self, keys: Sequence[str] = ("loss",)) -> None:
        self.keys = tuple(keys)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        if not isinstance(output, Mapping):
            return
        tensors, plain = {}, {}
        for key in self.keys:
            if key not in output:
                continue
            value = output[key]
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().reshape(()).to(torch.float64)
            else:
                plain[key] = float(value)
        if tensors:
            values = torch.stack(list(tensors.values())).tolist()
            plain.update(zip(tensors, values))
        engine.state.output = [{key: plain[key] for key in self.keys if key in plain}]


def _every(n: int) -> Callable[[Any, int], bool]:
    n = max(int(n), 1)

    def event_filter(_engine: Any, event: int) -> bool:
        return event % n == 0

    return event_filter


def _first_record(output: Any) -> Any:
    return output[0] if isinstance(output, list) and output else output


def setup_training_handlers(
    trainer: Any,
    save_dict: Mapping[str, Any],
    output_dir: str | os.PathLike | None = None,
    evaluator: Any = None,
    key_metric_negative_sign: bool = False,
    val_interval: int = 1,
    checkpoint_every: int | None = None,
    n_saved: int = 2,
    resume: bool | str | os.PathLike = True,
    progress_bar: bool = False,
    stats: bool = True,
    log_every: int = 10,
    tracking_uri: str | None = None,
    experiment_name: str = "monai_cf",
    run_name: str | None = None,
    tracking_params: Mapping[str, Any] | None = None,
    artifacts: Sequence[str | os.PathLike] | None = None,
    handlers: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Attach the usual MONAI handlers to a monai_cf (or any MONAI) trainer and its evaluator.

    On every process: resume (MONAI ``CheckpointLoader`` with the whole ``save_dict``, trainer included, from the
    latest ``checkpoint_*iteration=N.pt`` in ``output_dir`` or the given path), :class:`SkipSeenBatches`, and
    validation every ``val_interval`` epochs (MONAI ``ValidationHandler``). On rank 0 only (MONAI's pattern for
    multi-process runs): atomic checkpoints (:class:`~monai_cf.handlers.AtomicCheckpointSaver`) every
    ``checkpoint_every`` iterations (default: every epoch), the final / on-exception checkpoint, the best
    checkpoint by the evaluator's key metric (``best.pt``), MONAI ``StatsHandler`` s, an Ignite ``ProgressBar``
    and MONAI ``MLFlowHandler`` s (per-iteration output scalars every ``log_every`` iterations, validation metrics
    per epoch, ``tracking_params``, ``artifacts`` at the end).

    The trainer's output must be a one-item list of scalars (see :class:`OutputSummary`), as the monai_cf
    engines produce.

    Args:
        trainer: the MONAI trainer.
        save_dict: objects to checkpoint and resume (``{"trainer": trainer, "network": ..., "optimizer": ...}``).
        output_dir: checkpoint directory; ``None`` for no checkpoints and no resume.
        evaluator: a MONAI evaluator with a key metric, run every ``val_interval`` epochs.
        key_metric_negative_sign: ``True`` when a lower key metric is better (a loss).
        val_interval: epochs between validations.
        checkpoint_every: iterations between checkpoints; ``None`` for one at the end of every epoch.
        n_saved: periodic checkpoints kept.
        resume: ``True`` to resume from the latest checkpoint in ``output_dir`` if any, ``False`` to start afresh,
            or the path of a checkpoint.
        progress_bar: show an Ignite progress bar.
        stats: attach MONAI ``StatsHandler`` s (log through the engines' loggers).
        log_every: iterations between logged training outputs (stats and MLflow).
        tracking_uri: MLflow tracking URI (``sqlite:///<path>`` or a server), ``None`` for no MLflow.
        experiment_name: MLflow experiment.
        run_name: MLflow run (default: the name of ``output_dir``); a resumed run continues an unfinished run
            of that name.
        tracking_params: parameters to log to MLflow.
        artifacts: files or directories logged to MLflow at the end (default: the best checkpoint).
        handlers: more handlers for the trainer (MONAI handlers, or anything with ``attach(engine)``), attached on
            every process after resume and validation, as MONAI attaches ``train_handlers``; they are returned
            under ``"extra"``.

    Returns:
        The attached handlers by role (``"loader"``, ``"saver"``, ``"best_saver"``, ``"mlflow"``...).
    """
    extra = list(handlers or ())
    for index, handler in enumerate(extra):
        if not callable(getattr(handler, "attach", None)):
            raise TypeError(
                f"handlers[{index}] is a {type(handler).__name__}, not a handler: it has no attach(engine) method."
            )
    handlers: dict[str, Any] = {}
    rank0 = getattr(trainer.state, "rank", 0) == 0
    if dist.is_available() and dist.is_initialized():
        # ignite's first rank query (e.g. in DiskSaver, created on rank 0 only) creates a process group, a collective
        # call: make it here, on every process, or rank 0 would wait for the others forever
        from ignite import distributed as idist

        idist.get_rank()
    output_path = None if output_dir is None else Path(output_dir)
    if output_path is not None and rank0:
        output_path.mkdir(parents=True, exist_ok=True)

    resume_path = None
    if isinstance(resume, (str, os.PathLike)):
        resume_path = Path(resume)
        if not resume_path.is_file():
            raise ValueError(f"Checkpoint to resume from '{resume_path}' does not exist.")
    elif resume and output_path is not None:
        resume_path = latest_checkpoint(output_path)
    if resume_path is not None:
        device = trainer.state.device
        handlers["loader"] = CheckpointLoader(str(resume_path), load_dict=dict(save_dict), map_location=device)
        handlers["loader"].attach(trainer)
        logger.info(f"Resuming from {resume_path}")
    handlers["skip_seen_batches"] = SkipSeenBatches(trainer.data_loader)
    handlers["skip_seen_batches"].attach(trainer)

    if evaluator is not None:
        handlers["validation"] = ValidationHandler(interval=val_interval, validator=evaluator, epoch_level=True)
        handlers["validation"].attach(trainer)
    for handler in extra:
        handler.attach(trainer)
    if extra:
        handlers["extra"] = extra

    if not rank0:
        return handlers

    if output_path is not None:
        epoch_length = trainer.state.epoch_length
        interval = checkpoint_every or epoch_length
        if not interval:
            raise ValueError("The trainer's epoch length is unknown: pass checkpoint_every (iterations).")
        # the saver comes before StatsHandler: on an exception only the first handlers run (see CheckpointSaver)
        saver = AtomicCheckpointSaver(
            str(output_path),
            dict(save_dict),
            save_final=True,
            save_interval=int(interval),
            epoch_level=False,
            n_saved=n_saved,
        )
        saver.adopt_existing()
        saver.attach(trainer)
        handlers["saver"] = saver
        if evaluator is not None:
            best_saver = AtomicCheckpointSaver(
                str(output_path),
                dict(save_dict),
                save_key_metric=True,
                key_metric_filename=BEST_CHECKPOINT,
                key_metric_negative_sign=key_metric_negative_sign,
                key_metric_save_state=True,
            )
            best_path = output_path / BEST_CHECKPOINT
            if resume_path is not None and best_path.is_file():
                best_state = torch.load(best_path, map_location="cpu", weights_only=True)
                if "checkpointer" in best_state:
                    best_saver.load_state_dict(best_state["checkpointer"])
            best_saver.attach(evaluator)
            handlers["best_saver"] = best_saver

    if stats:
        handlers["stats"] = StatsHandler(
            iteration_log=_every(log_every), epoch_log=True, tag_name="train_loss", output_transform=_first_record
        )
        handlers["stats"].attach(trainer)
        if evaluator is not None:
            handlers["val_stats"] = StatsHandler(iteration_log=False, epoch_log=True, output_transform=lambda x: None)
            handlers["val_stats"].attach(evaluator)

    if progress_bar:
        from ignite.handlers import ProgressBar

        handlers["progress_bar"] = ProgressBar(persist=True)
        handlers["progress_bar"].attach(trainer, output_transform=_progress_values)

    if tracking_uri is not None:
        uri = check_tracking_uri(tracking_uri)
        name = run_name or (output_path.name if output_path is not None else "train")
        if artifacts is None:
            artifacts = [] if output_path is None or evaluator is None else [output_path / BEST_CHECKPOINT]
        handlers["mlflow"] = MLFlowHandler(
            tracking_uri=uri,
            iteration_log=_every(log_every),
            epoch_log=True,
            output_transform=_first_record,
            tag_name="train_loss",
            experiment_name=experiment_name,
            run_name=name,
            experiment_param=dict(tracking_params or {}),
            artifacts=[str(a) for a in artifacts],
            close_on_complete=True,
        )
        handlers["mlflow"].attach(trainer)
        if evaluator is not None:
            handlers["val_mlflow"] = MLFlowHandler(
                tracking_uri=uri,
                iteration_log=False,
                epoch_log=True,
                output_transform=lambda x: None,
                experiment_name=experiment_name,
                run_name=name,
            )
            handlers["val_mlflow"].attach(evaluator)
    return handlers


def _progress_values(output: Any) -> dict[str, float]:
    record = _first_record(output)
    if isinstance(record, Mapping):
        return {k: v for k, v in record.items() if k in ("loss", "nll", "kl") and isinstance(v, (int, float))}
    return {}
