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
"""Reproducible and resumable training: seeds per iteration, a data order that depends on ``(seed, epoch)`` only,
and a resume in the middle of an epoch that sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from monai.data import DataLoader
from monai.utils import IgniteInfo, min_version, optional_import
from torch.utils.data import Dataset, DistributedSampler

from monai_cf.engines.distributed import process_rank

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["derive_seed", "IterationSeeder", "ResumableDistributedSampler", "create_data_loader", "SkipSeenBatches"]


def derive_seed(*values: int) -> int:
    """A 32-bit seed derived from integers (e.g. ``(seed, rank, iteration)``) through numpy's ``SeedSequence``."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


class IterationSeeder:
    """Seed torch's global random generators at the start of every iteration from ``(seed, rank, iteration)``.

    The random draws of an iteration (e.g. the HVAE's posterior samples) then depend on the iteration number
    only, not on what ran before (validation, data-loader start-up, a resume from a checkpoint), so a resumed run
    repeats an uninterrupted one exactly. Processes of a distributed run get different streams.

    Args:
        seed: base seed.

    Example::

        IterationSeeder(seed=0).attach(trainer)
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        torch.manual_seed(derive_seed(self.seed, process_rank(), engine.state.iteration))


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (also for one process) whose next pass can start after the first ``n`` samples.

    The order of an epoch depends only on ``(seed, epoch)`` (MONAI's workflows call ``set_epoch`` at every
    epoch start); :meth:`skip` drops the first samples of the next pass, which :class:`SkipSeenBatches` uses to
    continue a run resumed in the middle of an epoch with exactly the batches an uninterrupted run would see.

    Args:
        dataset: the dataset.
        num_replicas: number of processes (default: the process group's size, 1 without one).
        rank: this process's rank (default: from the process group, 0 without one).
        shuffle: shuffle each epoch.
        seed: shuffling seed, the same on every process.
        drop_last: drop the tail so that every process gets the same number of samples.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        running = dist.is_available() and dist.is_initialized()
        num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if running else 1)
        rank = rank if rank is not None else (dist.get_rank() if running else 0)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self._skip = 0

    def skip(self, num_samples: int) -> None:
        """Leave out the first ``num_samples`` indices of the next pass only."""
        self._skip = max(int(num_samples), 0)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


def create_data_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
    **kwargs: Any,
) -> DataLoader:
    """A ``monai.data.DataLoader`` with a :class:`ResumableDistributedSampler`, reproducible and resumable.

    The sampler splits the data across the processes of a ``torch.distributed`` run (one process otherwise),
    the order of each epoch depends on ``(seed, epoch)`` only, and the loader's own generator (worker seeds) is
    seeded too, so building it does not touch torch's global random state.

    Args:
        dataset: the dataset.
        batch_size: samples per batch and process.
        shuffle: shuffle every epoch (training) or keep the order (validation).
        seed: seed of the order and of the workers.
        drop_last: drop the last incomplete batch (and the samples that do not split evenly across processes).
        num_workers: loader worker processes.
        kwargs: further ``DataLoader`` arguments (``pin_memory``, ``persistent_workers``...).

    Example::

        train_loader = create_data_loader(csv_dataset("phantom/train.csv", spatial_size=32), batch_size=32)
    """
    sampler = ResumableDistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    generator = torch.Generator().manual_seed(derive_seed(seed, 7919))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=generator,
        **kwargs,
    )


class SkipSeenBatches:
    """When a run is resumed mid-epoch, make the data loader continue where the interrupted epoch stopped.

    Ignite restarts the data iterator on resume, so without this the resumed epoch would see its first batches
    again. Attach it after the ``CheckpointLoader`` (both run on ``STARTED``); it needs the loader's sampler to be
    a :class:`ResumableDistributedSampler` (see :func:`create_data_loader`) and warns otherwise.
    """

    def __init__(self, data_loader: Any) -> None:
        self.data_loader = data_loader

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch_length = engine.state.epoch_length
        if not epoch_length or engine.state.iteration % epoch_length == 0:
            return
        done = engine.state.iteration % epoch_length
        sampler = getattr(self.data_loader, "sampler", None)
        batch_size = getattr(self.data_loader, "batch_size", None)
        if not isinstance(sampler, ResumableDistributedSampler) or batch_size is None:
            warnings.warn(
                f"Resuming in the middle of an epoch ({done} of {epoch_length} iterations done) with a data loader "
                "whose sampler cannot skip: the epoch restarts from its first batch. Build the loader with "
                "monai_cf.engines.create_data_loader for an exact resume.",
                stacklevel=2,
            )
            return
        sampler.skip(done * batch_size)
