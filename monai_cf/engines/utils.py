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
"""Pieces shared by the monai_cf engines (HVAE, predictor and mechanism training, counterfactual fine-tuning).

- batches: :class:`CounterfactualPrepareBatch` (image, canonical attributes, ``pa``) and
  :class:`AttributePrepareBatch` (image, encoded attribute targets) for MONAI engines;
- optimisation: :func:`guarded_optimizer_step` (clip, skip non-finite or huge gradients) and the linear
  warm-up schedule :func:`create_warmup_scheduler`;
- reproducibility: :class:`IterationSeeder` (per-iteration seeds), :class:`ResumableDistributedSampler` with
  :func:`create_data_loader` and :class:`SkipSeenBatches`, so that a run resumed mid-epoch from a checkpoint
  replays exactly what an uninterrupted run would have done;
- :class:`MeanMetric`, :class:`OutputSummary`, and :func:`setup_training_handlers`, which wires the MONAI
  handlers (checkpoints, resume, validation, stats, progress bar, MLflow) onto a trainer.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from monai.data import DataLoader, MetaTensor
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.handlers import CheckpointLoader, MLFlowHandler, StatsHandler, ValidationHandler
from monai.utils import IgniteInfo, min_version, optional_import
from torch.utils.data import Dataset, DistributedSampler

from monai_cf.data.encoding import AttributeEncoder
from monai_cf.graph import CausalGraph
from monai_cf.handlers.checkpoint import BEST_CHECKPOINT, AtomicCheckpointSaver, latest_checkpoint
from monai_cf.handlers.tracking import check_tracking_uri

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
    from ignite.metrics import Metric
    from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
    Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric", as_type="base")
    reinit__is_reduced, _ = optional_import(
        "ignite.metrics.metric", IgniteInfo.OPT_IMPORT_VERSION, min_version, "reinit__is_reduced", as_type="decorator"
    )
    sync_all_reduce, _ = optional_import(
        "ignite.metrics.metric", IgniteInfo.OPT_IMPORT_VERSION, min_version, "sync_all_reduce", as_type="decorator"
    )

__all__ = [
    "CounterfactualBatch",
    "CounterfactualPrepareBatch",
    "AttributePrepareBatch",
    "LinearWarmup",
    "create_warmup_scheduler",
    "guarded_optimizer_step",
    "fused_optimizer_kwargs",
    "derive_seed",
    "IterationSeeder",
    "ResumableDistributedSampler",
    "create_data_loader",
    "SkipSeenBatches",
    "MeanMetric",
    "OutputSummary",
    "is_distributed",
    "process_rank",
    "lower_is_better",
    "setup_training_handlers",
]

logger = logging.getLogger("monai_cf.engines")


# ------------------------------------------------------------------------------------------------------ batches
class CounterfactualBatch(NamedTuple):
    """What the monai_cf engines read from a batch.

    Attributes:
        image: ``(B, C, *spatial)`` float tensor on the engine's device, in the dataset's range (``[0, 1]`` for
            :func:`monai_cf.data.csv_dataset`); a plain ``torch.Tensor`` (MONAI metadata dropped).
        attributes: canonical attribute values ``{name: (B,)}``: ``long`` class indices for discrete attributes,
            ``float32`` original units for continuous ones.
        pa: the image parents' encoding ``(B, parents_dim)`` (``float32``), or ``None`` if it is neither in the
            batch nor computable (no graph).
    """

    image: torch.Tensor
    attributes: dict[str, torch.Tensor]
    pa: torch.Tensor | None


def _as_plain_tensor(value: Any) -> torch.Tensor:
    # MetaTensor would route every operation of the network through __torch_function__ (slow) and carry metadata
    if isinstance(value, MetaTensor):
        return value.as_tensor()
    return torch.as_tensor(value)


def _keys(batchdata: Mapping) -> list[str]:
    return sorted(map(str, batchdata))


def _canonical_tensor(graph: CausalGraph | None, name: str, value: Any) -> torch.Tensor:
    tensor = _as_plain_tensor(value).reshape(-1)
    if graph is not None and not graph[name].is_discrete:
        return tensor.to(torch.float32)
    if graph is not None:
        return tensor.to(torch.long)
    return tensor.to(torch.float32) if tensor.is_floating_point() else tensor


class CounterfactualPrepareBatch(PrepareBatch):
    """MONAI ``prepare_batch`` for dictionary batches of images and attributes, e.g. from
    :func:`monai_cf.data.csv_dataset` through ``monai.data.DataLoader``.

    Returns a :class:`CounterfactualBatch` ``(image, attributes, pa)`` on ``device``. The image becomes a plain
    tensor (``to_kwargs`` of the engine, e.g. a dtype, apply to it only); attributes are the canonical values of
    ``attributes`` (default: every attribute of ``graph``; none without a graph); ``pa`` is taken from the batch
    when present and otherwise computed from the attributes with the graph's encoding. Encoding runs on the
    collated CPU tensors before the copy to ``device``, so it adds no device synchronisation.

    Args:
        graph: the causal graph (or anything :meth:`CausalGraph.build` accepts); optional when the batch has ``pa``
            and no attributes are needed.
        image_key: key of the image in the batch.
        pa_key: key of the encoded parents vector.
        attributes: names of the attributes to return.

    Raises:
        ValueError: when the batch is not a mapping or a needed key is missing.

    Example::

        prepare = CounterfactualPrepareBatch("mimic_cxr")
        loader = monai.data.DataLoader(csv_dataset("phantom/train.csv", spatial_size=32), batch_size=8)
        image, attributes, pa = prepare(next(iter(loader)), device="cpu")
        attributes["age"].dtype, pa.shape  # torch.float32, (8, 6)
    """

    def __init__(
        self,
        graph: CausalGraph | Mapping | str | None = None,
        image_key: str = "image",
        pa_key: str = "pa",
        attributes: Sequence[str] | None = None,
    ) -> None:
        self.graph = None if graph is None else CausalGraph.build(graph)
        self.encoder = None if self.graph is None else AttributeEncoder(self.graph)
        self.image_key = image_key
        self.pa_key = pa_key
        if attributes is not None:
            self.attributes = list(attributes) if self.graph is None else self.graph.check_names(attributes)
        else:
            self.attributes = [] if self.graph is None else list(self.graph.attributes)

    def _attributes(self, batchdata: Mapping) -> dict[str, torch.Tensor]:
        missing = [name for name in self.attributes if name not in batchdata]
        if missing:
            raise ValueError(f"Attributes {missing} are missing from the batch; got keys {_keys(batchdata)}.")
        return {name: _canonical_tensor(self.graph, name, batchdata[name]) for name in self.attributes}

    def _parents(self, batchdata: Mapping, attributes: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        if self.pa_key in batchdata:
            return _as_plain_tensor(batchdata[self.pa_key]).to(torch.float32)
        if self.graph is None or self.encoder is None:
            return None
        parents = self.graph.image_parents
        missing = [p for p in parents if p not in batchdata]
        if missing:
            raise ValueError(
                f"The batch has no '{self.pa_key}' and lacks image parents {missing} to compute it from; "
                f"got keys {_keys(batchdata)}."
            )
        canonical = {
            p: attributes[p] if p in attributes else _canonical_tensor(self.graph, p, batchdata[p]) for p in parents
        }
        return self.encoder.parents_vector(self.encoder.encode(canonical, names=parents)).to(torch.float32)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> CounterfactualBatch:
        if not isinstance(batchdata, Mapping):
            raise ValueError(f"CounterfactualPrepareBatch expects a dictionary batch, got {type(batchdata).__name__}.")
        if self.image_key not in batchdata:
            raise ValueError(f"Image key '{self.image_key}' is missing from the batch; got {_keys(batchdata)}.")
        image = _as_plain_tensor(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        attributes = self._attributes(batchdata)
        pa = self._parents(batchdata, attributes)
        attributes = {n: v.to(device=device, non_blocking=non_blocking) for n, v in attributes.items()}
        if pa is not None:
            pa = pa.to(device=device, non_blocking=non_blocking)
        return CounterfactualBatch(image, attributes, pa)


class AttributePrepareBatch(PrepareBatch):
    """MONAI ``prepare_batch`` returning ``(image, targets)`` for supervised training on attributes.

    ``targets`` maps each attribute to its network encoding (see :class:`~monai_cf.data.AttributeEncoder`):
    binary ``(B, 1)`` in ``{0, 1}``, categorical one-hot ``(B, K)``, continuous ``(B, 1)`` in ``[-1, 1]`` — what
    :class:`~monai_cf.networks.AttributeLoss` takes and what the attribute mechanisms model. With
    ``image_key=None`` it returns ``(targets, None)`` instead, for networks of the attributes alone (the
    mechanisms). Works with MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator``.

    Args:
        graph: the causal graph (or anything :meth:`CausalGraph.build` accepts).
        attributes: the attributes to return (default: all attributes of the graph).
        image_key: key of the image, or ``None`` to return the attribute encodings as the inputs.

    Example::

        prepare = AttributePrepareBatch("mimic_cxr", attributes=predictor.attributes)
        trainer = SupervisedTrainer(..., network=predictor, loss_function=AttributeLoss("mimic_cxr"),
                                    prepare_batch=prepare)
    """

    def __init__(
        self,
        graph: CausalGraph | Mapping | str,
        attributes: Sequence[str] | None = None,
        image_key: str | None = "image",
    ) -> None:
        self.graph = CausalGraph.build(graph)
        self.encoder = AttributeEncoder(self.graph)
        self.attributes = list(self.graph.attributes) if attributes is None else self.graph.check_names(attributes)
        self.image_key = image_key

    def encode(self, batchdata: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The encodings of the attributes of a (CPU) batch."""
        missing = [name for name in self.attributes if name not in batchdata]
        if missing:
            raise ValueError(f"Attributes {missing} are missing from the batch; got keys {_keys(batchdata)}.")
        return {
            name: self.encoder.encode_attribute(name, _canonical_tensor(self.graph, name, batchdata[name]))
            for name in self.attributes
        }

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        if not isinstance(batchdata, Mapping):
            raise ValueError(f"AttributePrepareBatch expects a dictionary batch, got {type(batchdata).__name__}.")
        targets = {n: v.to(device=device, non_blocking=non_blocking) for n, v in self.encode(batchdata).items()}
        if self.image_key is None:
            return targets, None
        if self.image_key not in batchdata:
            raise ValueError(f"Image key '{self.image_key}' is missing from the batch; got {_keys(batchdata)}.")
        image = _as_plain_tensor(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        return image, targets


# ------------------------------------------------------------------------------------------------ optimisation
class LinearWarmup:
    """Learning-rate factor of a linear warm-up: update ``n`` (1-based) uses ``lr * min(1, n / warmup_steps)``.

    A callable object (not a closure) so that ``LambdaLR.state_dict()`` records it and checkpoints can be loaded
    with ``torch.load(weights_only=True)``.
    """

    def __init__(self, warmup_steps: int) -> None:
        if int(warmup_steps) < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)


def create_warmup_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int = 100
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` that warms the learning rate up linearly over ``warmup_steps`` updates, then keeps it.

    Step it once per applied optimiser update: the first update runs at ``lr / warmup_steps`` and update
    ``warmup_steps`` onwards at ``lr`` (the reference starts at 0, wasting its first update). The HVAE trainer
    steps it itself, only after updates that were not skipped; with other engines use MONAI's
    ``LrScheduleHandler(scheduler, epoch_level=False)``.

    Example::

        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.9))
        scheduler = create_warmup_scheduler(optimizer, warmup_steps=100)
        optimizer.param_groups[0]["lr"]  # 1e-05
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LinearWarmup(warmup_steps))


def fused_optimizer_kwargs(device: str | torch.device) -> dict[str, Any]:
    """``{"fused": True}`` where torch has fused AdamW/Adam kernels for ``device`` (CPU, CUDA), else ``{}``.

    The fused step is one kernel over all parameters: on CPU it makes a small HVAE's training step ~7% faster.
    """
    return {"fused": True} if torch.device(device).type in ("cpu", "cuda") else {}


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def guarded_optimizer_step(
    engine: Engine | None,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    parameters: Iterable[torch.nn.Parameter] | None = None,
    grad_clip: float | None = 350.0,
    grad_skip: float | None = 500.0,
    scaler: torch.amp.GradScaler | None = None,
    set_to_none: bool = True,
) -> tuple[torch.Tensor, bool]:
    """Clip the gradients and step the optimiser, unless the step is unsafe; then zero the gradients.

    Call it after ``loss.backward()`` (``scaler.scale(loss).backward()`` with AMP). The total gradient norm is
    computed (after unscaling) and the gradients clipped to ``grad_clip``. The update is skipped, leaving the
    weights and the optimiser state untouched, when the norm is ``>= grad_skip`` or the loss or the norm is not
    finite (as the reference HVAE training does). Under ``torch.distributed`` the decision is all-reduced, so all
    processes skip together. With an ``engine``, ``engine.state.step_skipped`` is set and skips are counted in
    ``engine.state.skipped_updates``.

    Host synchronisation: the decision needs the norm on the host, so there is exactly one blocking copy (one
    ``.item()`` of a combined flag, plus one small all-reduce when distributed). Everything else stays on the device.

    Args:
        engine: the engine whose state records the outcome, or ``None``.
        optimizer: the optimiser to step.
        loss: the (unscaled) loss of this step, checked for finiteness.
        parameters: the parameters whose gradients count (default: all parameters of ``optimizer``).
        grad_clip: maximum total norm, ``None`` not to clip.
        grad_skip: skip threshold on the total norm (before clipping), ``None`` to skip only non-finite steps.
        scaler: the AMP gradient scaler, if any.
        set_to_none: zero the gradients by setting them to ``None``.

    Returns:
        ``(grad_norm, skipped)``: the total norm before clipping (a 0-d tensor on the device) and whether the
        update was skipped.

    Example::

        loss.backward()
        grad_norm, skipped = guarded_optimizer_step(engine, optimizer, loss, grad_clip=350, grad_skip=500)
        if not skipped:
            scheduler.step()
    """
    if parameters is None:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
    params = [p for p in parameters if p.grad is not None]
    if scaler is not None:
        scaler.unscale_(optimizer)
    if not params:
        grad_norm = torch.zeros((), device=loss.device)
    elif grad_clip is not None and math.isfinite(grad_clip):
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    unsafe = ~(torch.isfinite(grad_norm) & torch.isfinite(loss.detach()))
    if grad_skip is not None:
        unsafe = unsafe | (grad_norm >= grad_skip)
    if is_distributed():
        flag = unsafe.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        unsafe = flag.bool()
    skipped = bool(unsafe.item())
    if scaler is not None:
        if not skipped:
            scaler.step(optimizer)
        scaler.update()
    elif not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=set_to_none)
    if engine is not None:
        engine.state.step_skipped = skipped
        engine.state.skipped_updates = getattr(engine.state, "skipped_updates", 0) + int(skipped)
    return grad_norm.detach(), skipped


# ---------------------------------------------------------------------------------------------- reproducibility
def derive_seed(*values: int) -> int:
    """A 32-bit seed derived from integers (e.g. ``(seed, rank, iteration)``) through numpy's ``SeedSequence``."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


def process_rank() -> int:
    """This process's rank in a running ``torch.distributed`` group, 0 outside one.

    ``torch.distributed`` rather than ``ignite.distributed``: ignite's first rank query creates a process group, a
    collective call that must not happen on one rank only.
    """
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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


# ---------------------------------------------------------------------------------------------- metrics, outputs
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


# ---------------------------------------------------------------------------------------------- handler wiring
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
