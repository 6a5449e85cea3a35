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
"""Independent trainings of :class:`~monai_cf.pipeline.CounterfactualPipeline` side by side in child processes.

The two attribute predictors, and the hard and soft fine-tuning, do not depend on each other: on the CPU they
train in spawned processes that split the threads, each rebuilding the pipeline from its arguments (sent by
value with cloudpickle) and writing its stage file, which the pipeline then reuses. A child's log lines carry
its job (``[cft hard]``).
"""

from __future__ import annotations

import logging
import multiprocessing
import resource
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import cloudpickle
import torch
import torch.distributed as dist

__all__ = ["parallel_workers", "train_side_by_side"]

logger = logging.getLogger("monai_cf.pipeline")


def parallel_workers(parallel: bool | str, device: torch.device) -> int:
    """How many trainings may run side by side (1: one after the other).

    Example::

        parallel_workers("auto", torch.device("cpu"))  # torch.get_num_threads()
    """
    if parallel is False or device.type != "cpu" or (dist.is_available() and dist.is_initialized()):
        return 1
    return 2**16 if parallel is True else torch.get_num_threads()  # True: as many as there are jobs


def train_side_by_side(
    jobs: Sequence[tuple[str, str | None]],
    init_kwargs: Mapping[str, Any],
    retrain: set[str],
    progress_bar: bool,
    workers: int,
    epsilon: float | None = None,
) -> float:
    """Train ``(stage, mode)`` jobs in ``workers`` spawned processes, each rebuilding the pipeline from
    ``init_kwargs`` and writing its stage file.

    Args:
        jobs: ``(stage, None)`` of a predictor stage or ``("cft", mode)``.
        init_kwargs: the pipeline's arguments (``CounterfactualPipeline._init_kwargs``).
        retrain: the stages the pipeline retrains; a job retrains its own stage when named here.
        progress_bar: show the first job's progress bar.
        workers: how many processes (at least 2); the CPU threads are split between them.
        epsilon: the nELBO bound of fine-tuning, measured once for all modes.

    Returns:
        the largest peak resident memory (MB) of the processes.

    Example::

        peak_mb = train_side_by_side([("cft", "hard"), ("cft", "soft")], pipeline._init_kwargs, set(), True, 2, 1.9)
    """
    threads = max(1, torch.get_num_threads() // workers)
    logger.info(
        "Training %s side by side: %d processes with %d thread(s) each",
        ", ".join(stage if mode is None else f"{stage} {mode}" for stage, mode in jobs),
        workers,
        threads,
    )
    kwargs = dict(init_kwargs)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {
            pool.submit(
                _train_job,
                # the job's own stage may be retrained as asked; its upstream files were made by this run. By
                # value (cloudpickle): a config's handlers hold lambdas, which pickle cannot send
                cloudpickle.dumps(
                    dict(kwargs, retrain=sorted(retrain & {stage}), progress_bar=progress_bar and i == 0)
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
    return peak_mb


def _train_job(kwargs: bytes, stage: str, mode: str | None, threads: int, epsilon: float | None) -> float:
    """One side-by-side training (runs in a spawned process): rebuild the pipeline from its cloudpickled arguments,
    train, write the stage file.

    Returns the process's peak resident memory in MB.
    """
    from monai_cf.pipeline.workflow import CounterfactualPipeline  # the workflow imports this module

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
