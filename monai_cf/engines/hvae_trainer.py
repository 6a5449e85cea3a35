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
"""Training and validating the HVAE image mechanism by its negative ELBO (MONAI ``Trainer`` / ``Evaluator``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.engines import Evaluator, Trainer
from monai.engines.utils import IterationEvents
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn
from torch.utils.data import DataLoader

from monai_cf.engines.distributed import is_distributed
from monai_cf.engines.optimizers import OptimizerFactory, create_warmup_scheduler, guarded_optimizer_step
from monai_cf.engines.prepare_batch import CounterfactualPrepareBatch
from monai_cf.engines.reproducibility import IterationSeeder, derive_seed
from monai_cf.engines.runtime import tune_cpu_allocator
from monai_cf.engines.trainer_factory import attach_stage_handlers, create_optimizer, training_device, world_size
from monai_cf.engines.training_handlers import MeanMetric, OutputSummary, lower_is_better
from monai_cf.handlers.ema import EMAUpdateHandler, ExponentialMovingAverage, unwrap_module
from monai_cf.networks.nets.diffusion import DiffusionImageMechanism
from monai_cf.networks.nets.hvae import HVAE
from monai_cf.networks.nets.image_mechanism import is_image_mechanism
from monai_cf.networks.scm import DeepSCM

if TYPE_CHECKING:
    from ignite.engine import Engine, EventEnum
    from ignite.metrics import Metric
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    EventEnum, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "EventEnum")
    Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric")

__all__ = [
    "HVAETrainer",
    "HVAEEvaluator",
    "create_hvae_trainer",
    "build_image_trainer",
    "image_trainer_options",
    "IMAGE_TRAINER_OPTIONS",
    "HVAE_OUTPUT_KEYS",
]

#: Scalars of an :class:`HVAETrainer` iteration's output.
HVAE_OUTPUT_KEYS = ("loss", "nll", "kl", "grad_norm", "skipped")


def resolve_image_model(network: nn.Module, types: tuple[type, ...] = (HVAE,)) -> tuple[Any, DeepSCM | None]:
    """The image model to train (looking through DDP, EMA and DeepSCM wrappers) and the DeepSCM around it, if any."""
    module = unwrap_module(network)
    if isinstance(module, ExponentialMovingAverage):
        module = module.module
    scm = module if isinstance(module, DeepSCM) else None
    image_model = module.image_model if scm is not None else module
    image_model = unwrap_module(image_model)
    # an HVAE trainer also trains a user's HVAE-like network (see monai_cf.networks.nets.image_mechanism)
    hvae_like = (
        HVAE in types and is_image_mechanism(image_model) and not isinstance(image_model, DiffusionImageMechanism)
    )
    if not isinstance(image_model, types) and not hvae_like:
        kinds = " or ".join(t.__name__ for t in types) + (" (or an HVAE-like image mechanism)" if HVAE in types else "")
        raise ValueError(
            f"network must be a {kinds}, a DeepSCM of one or one of them wrapped in DistributedDataParallel; got "
            f"{type(network).__name__}" + (f" holding a {type(image_model).__name__}." if scm is not None else ".")
        )
    return image_model, scm


def model_inputs(
    batch: Any, image_range: tuple[float, float], scm: DeepSCM | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(x in [-1, 1], pa, image)`` from a prepared batch: a ``CounterfactualBatch`` or ``(image, pa)``."""
    if hasattr(batch, "pa") and hasattr(batch, "image"):
        image, pa, attributes = batch.image, batch.pa, batch.attributes
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        image, pa, attributes = batch[0], batch[1], {}
    else:
        raise ValueError(f"prepare_batch must return a CounterfactualBatch or (image, pa); got {type(batch).__name__}.")
    if pa is None and scm is not None and attributes:
        pa = scm.parents_vector(scm.encode_attributes(attributes, image.shape[0], image.device))
    low, high = image_range
    x = (image.to(torch.float32) - low) * (2.0 / (high - low)) - 1.0
    return x, pa, image


def _bind_image_model(
    engine: Engine, network: nn.Module, image_model: HVAE, scm: DeepSCM | None, image_range: Sequence[float]
) -> None:
    """The model attributes the HVAE engines' iterations read (the DeepSCM's image range wins when there is one)."""
    engine.network = network
    engine.image_model = image_model
    engine.scm = scm
    engine.image_range = tuple(float(v) for v in (scm.image_range if scm is not None else image_range))


class HVAETrainer(Trainer):
    """Train the HVAE image mechanism by its negative ELBO, as the reference causal-gen training does.

    Each iteration: the image is mapped from ``image_range`` to ``[-1, 1]``; the nELBO (nats per pixel,
    ``nll + beta * kl``) is computed, backpropagated, the gradients clipped at ``grad_clip`` and the update skipped
    (weights and optimiser untouched, ``engine.state.skipped_updates`` counted) when the gradient norm is
    ``>= grad_skip`` or anything is non-finite (:func:`~monai_cf.engines.guarded_optimizer_step`); after an
    applied update the learning-rate schedule (a linear warm-up over ``warmup_steps`` updates unless
    ``lr_scheduler`` is given) steps and the EMA weights (``trainer.ema``, rate ``ema_rate``, see
    :class:`~monai_cf.handlers.ExponentialMovingAverage`) are updated. Validate and checkpoint with the EMA:
    :meth:`create_evaluator`, :meth:`checkpoint_dict`, or the factory :func:`create_hvae_trainer`.

    ``network`` may be an :class:`~monai_cf.networks.nets.HVAE` (batches must then carry ``pa``), a
    :class:`~monai_cf.networks.DeepSCM` (its image model is trained; its image range is used and ``pa`` is computed
    from the batch's attributes when missing), or either's HVAE in ``DistributedDataParallel``. When a
    ``torch.distributed`` process group runs (``distributed=None``: detected), the HVAE is wrapped in
    ``DistributedDataParallel`` here (``HVAE.forward`` is its ELBO); give each process its shard of the data with
    a ``DistributedSampler`` (:func:`~monai_cf.engines.create_data_loader`).

    The iteration output (``engine.state.output`` after ``IterationEvents.MODEL_COMPLETED``) is
    ``[{"loss": nelbo, "nll", "kl", "grad_norm", "skipped": 0/1}]`` in Python numbers, the one-item decollated form
    MONAI's handlers read (``decollate=False`` keeps the dict of 0-d tensors instead).

    Args:
        device: device to train on.
        max_epochs: number of epochs.
        train_data_loader: training batches, dictionaries with the image, ``pa`` and/or attributes.
        network: the HVAE, a DeepSCM, or a DDP-wrapped HVAE.
        optimizer: optimiser of the HVAE parameters (the reference: ``AdamW(lr=1e-3, betas=(0.9, 0.9))``).
        epoch_length: iterations per epoch (default ``len(train_data_loader)``).
        non_blocking: non-blocking host-to-device copies.
        prepare_batch: default :class:`~monai_cf.engines.CounterfactualPrepareBatch` (with the DeepSCM's graph).
        lr_scheduler: a scheduler stepped after each applied update; ``None`` builds the linear warm-up.
        warmup_steps: warm-up length of the default schedule (0: none).
        beta: KL weight (``None``: the HVAE's own).
        free_bits: free bits per latent channel (``None``: the HVAE's own).
        grad_clip: gradient-norm clipping threshold (``None``: no clipping).
        grad_skip: skip updates whose gradient norm (before clipping) reaches this (``None``: only non-finite).
        ema_rate: EMA rate, ``None`` for no EMA.
        ema_warmup: EMA decay schedule (``"inverse"`` as the reference, ``"tf"`` or ``"none"``).
        ema_warmup_steps: updates copied into the EMA before averaging starts (``"inverse"`` schedule).
        image_range: the intensity range of the batches' images (used for an HVAE; a DeepSCM's own range wins).
        seed: if given, reseed torch every iteration from ``(seed, rank, iteration)`` (:class:`IterationSeeder`),
            which makes a resumed run repeat an uninterrupted one.
        distributed: wrap the HVAE in ``DistributedDataParallel`` (``None``: when a process group runs).
        iteration_update: replaces :meth:`_iteration` (MONAI argument).
        postprocessing: MONAI postprocessing of the output.
        key_train_metric: MONAI key training metric.
        additional_metrics: further MONAI training metrics.
        metric_cmp_fn: MONAI metric comparison.
        train_handlers: handlers attached after the trainer is built (e.g. ``StatsHandler``).
        amp: automatic mixed precision on CUDA (``amp_kwargs`` e.g. ``{"dtype": torch.bfloat16}``).
        event_names: extra Ignite events.
        event_to_attr: MONAI ``event_to_attr``.
        decollate: summarise the output as ``[{key: float}]`` (see above).
        to_kwargs: extra ``Tensor.to`` arguments for the image in ``prepare_batch``.
        amp_kwargs: ``torch.autocast`` arguments.

    Example::

        model = HVAE(2, 1, 32, parents_dim=6)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.9), weight_decay=0.01)
        trainer = HVAETrainer("cpu", max_epochs=10, train_data_loader=train_loader, network=model,
                              optimizer=optimizer)
        evaluator = trainer.create_evaluator(val_loader)  # validates the EMA weights
        trainer.run()
        trainer.ema.module  # the EMA HVAE
    """

    #: What ``network`` may hold; subclasses train other image mechanisms with the same machinery.
    image_model_types: tuple[type, ...] = (HVAE,)
    #: Scalars of an iteration's output (``loss``, the terms of :meth:`loss_terms`, ``grad_norm``, ``skipped``).
    output_keys: tuple[str, ...] = HVAE_OUTPUT_KEYS

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable | None = None,
        lr_scheduler: Any = None,
        warmup_steps: int = 100,
        beta: float | None = None,
        free_bits: float | None = None,
        grad_clip: float | None = 350.0,
        grad_skip: float | None = 500.0,
        ema_rate: float | None = 0.999,
        ema_warmup: str = "inverse",
        ema_warmup_steps: int = 100,
        image_range: Sequence[float] = (0.0, 1.0),
        seed: int | None = None,
        distributed: bool | None = None,
        iteration_update: Callable[[Engine, Any], Any] | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list[str | EventEnum | type[EventEnum]] | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = True,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        image_model, scm = resolve_image_model(network, self.image_model_types)
        tune_cpu_allocator(device)
        if prepare_batch is None:
            prepare_batch = CounterfactualPrepareBatch(graph=scm.graph if scm is not None else None)
        extra = {} if metric_cmp_fn is None else {"metric_cmp_fn": metric_cmp_fn}
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=None,
            amp=amp,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=False,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
            **extra,
        )
        _bind_image_model(self, network, image_model, scm, image_range)
        if distributed is None:
            distributed = is_distributed()
        if isinstance(network, nn.parallel.DistributedDataParallel):
            self.forward_module: nn.Module = network
        elif distributed:
            device_ids = [self.state.device] if self.state.device.type == "cuda" else None
            self.forward_module = nn.parallel.DistributedDataParallel(image_model, device_ids=device_ids)
        else:
            self.forward_module = image_model
        self.optimizer = optimizer
        if lr_scheduler is None and warmup_steps > 0:
            lr_scheduler = create_warmup_scheduler(optimizer, warmup_steps)
        self.lr_scheduler = lr_scheduler
        self.beta = beta
        self.free_bits = free_bits
        self.grad_clip = grad_clip
        self.grad_skip = grad_skip
        self.ema = (
            None
            if ema_rate is None
            else ExponentialMovingAverage(image_model, ema_rate, warmup=ema_warmup, warmup_steps=ema_warmup_steps)
        )
        self.state.skipped_updates = 0
        self.state.step_skipped = False
        self.state_dict_user_keys.append("skipped_updates")
        if self.ema is not None:
            EMAUpdateHandler(self.ema, image_model).attach(self)
        if decollate:
            OutputSummary(self.output_keys).attach(self)
        if seed is not None:
            IterationSeeder(seed).attach(self)
        if train_handlers is not None:
            self._register_handlers(train_handlers)

    def checkpoint_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume: this trainer's state, the network, EMA, optimiser, scheduler."""
        objects: dict[str, Any] = {"trainer": self, "network": unwrap_module(self.network), "optimizer": self.optimizer}
        if self.ema is not None:
            objects["ema"] = self.ema
        if self.lr_scheduler is not None:
            objects["lr_scheduler"] = self.lr_scheduler
        return objects

    def create_evaluator(
        self, val_data_loader: Iterable | DataLoader, use_ema: bool = True, **kwargs: Any
    ) -> HVAEEvaluator:
        """An :class:`HVAEEvaluator` of the EMA model (or the raw one), with this trainer's batch handling."""
        network = self.ema if use_ema and self.ema is not None else self.image_model
        kwargs.setdefault("prepare_batch", self.prepare_batch)
        for key, value in self._evaluator_defaults().items():
            kwargs.setdefault(key, value)
        kwargs.setdefault("image_range", self.image_range)
        kwargs.setdefault("amp", self.amp)
        kwargs.setdefault("amp_kwargs", self.amp_kwargs)
        kwargs.setdefault("non_blocking", self.non_blocking)
        return self.evaluator_class(self.state.device, val_data_loader, network, scm=self.scm, **kwargs)

    @property
    def evaluator_class(self) -> type:
        return HVAEEvaluator

    def _evaluator_defaults(self) -> dict[str, Any]:
        return {"beta": self.beta, "free_bits": self.free_bits}

    def loss_terms(self, module: nn.Module, x: torch.Tensor, pa: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``{"loss": the nELBO, "nll", "kl"}`` of a batch (``module`` is the HVAE or its DDP wrapper)."""
        terms = module(x, pa, beta=self.beta, free_bits=self.free_bits)
        return {"loss": terms["nelbo"], "nll": terms["nll"], "kl": terms["kl"]}

    def _iteration(self, engine: HVAETrainer, batchdata: dict[str, Any]) -> dict:
        """One nELBO step. Returns the output dict (before ``MODEL_COMPLETED`` handlers summarise it).

        Raises:
            ValueError: when ``batchdata`` is None or the batch has no parents and none can be computed.
        """
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        x, pa, _ = model_inputs(batch, engine.image_range, engine.scm)
        engine.forward_module.train()
        engine.optimizer.zero_grad(set_to_none=True)
        if engine.amp and engine.scaler is not None:
            with torch.autocast("cuda", **engine.amp_kwargs):
                terms = engine.loss_terms(engine.forward_module, x, pa)
        else:
            terms = engine.loss_terms(engine.forward_module, x, pa)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss = terms["loss"]
        engine.state.output = {key: value.detach() for key, value in terms.items()}
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(loss).backward()
        else:
            loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        grad_norm, skipped = guarded_optimizer_step(
            engine,
            engine.optimizer,
            loss,
            grad_clip=engine.grad_clip,
            grad_skip=engine.grad_skip,
            scaler=engine.scaler if engine.amp else None,
        )
        if not skipped and engine.lr_scheduler is not None:
            engine.lr_scheduler.step()
        engine.state.output["grad_norm"] = grad_norm
        engine.state.output["skipped"] = int(skipped)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class HVAEEvaluator(Evaluator):
    """Validation nELBO of an HVAE (normally the EMA copy a :class:`HVAETrainer` keeps) as a MONAI evaluator.

    The key metric ``key_metric_name`` (default ``"val_nelbo"``) is the sample-weighted mean nELBO over the data,
    reduced across processes; ``"val_nll"`` and ``"val_kl"`` come with it. Lower is better, so the evaluator
    compares with ``<`` and a MONAI ``CheckpointSaver(save_key_metric=True, key_metric_negative_sign=True)``
    keeps the best model. Each iteration runs with torch's random state forked and seeded from
    ``(seed, rank, iteration)``: the posterior samples are the same at every validation, so differences between
    validations come from the weights alone, and the training's random stream is left untouched.

    Args:
        device: device to evaluate on.
        val_data_loader: validation batches.
        network: an HVAE, a DeepSCM, an :class:`~monai_cf.handlers.ExponentialMovingAverage` of an HVAE.
        epoch_length: iterations per run (default ``len(val_data_loader)``).
        non_blocking: non-blocking host-to-device copies.
        prepare_batch: default :class:`~monai_cf.engines.CounterfactualPrepareBatch`.
        beta: KL weight (``None``: the HVAE's own).
        free_bits: free bits (``None``: the HVAE's own).
        image_range: intensity range of the batches' images (a DeepSCM's own range wins).
        scm: a DeepSCM to compute ``pa`` from attributes when batches lack it.
        seed: seed of the forked random state.
        key_metric_name: name of the key metric.
        val_handlers: MONAI handlers.
        amp: automatic mixed precision on CUDA.
        amp_kwargs: ``torch.autocast`` arguments.
        to_kwargs: extra ``Tensor.to`` arguments for the image.
        decollate: decollate the output (off: the output is the dict of 0-d tensors the metrics read).

    Example::

        evaluator = HVAEEvaluator("cpu", val_loader, trainer.ema)
        evaluator.run()
        evaluator.state.metrics["val_nelbo"]
    """

    image_model_types: tuple[type, ...] = (HVAE,)
    #: Terms of :meth:`validation_terms` averaged into metrics; the first is the key metric.
    metric_terms: tuple[str, ...] = ("nelbo", "nll", "kl")

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Iterable | DataLoader,
        network: nn.Module,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable | None = None,
        beta: float | None = None,
        free_bits: float | None = None,
        image_range: Sequence[float] = (0.0, 1.0),
        scm: DeepSCM | None = None,
        seed: int = 0,
        key_metric_name: str = "val_nelbo",
        val_handlers: Sequence | None = None,
        amp: bool = False,
        amp_kwargs: dict | None = None,
        to_kwargs: dict | None = None,
        decollate: bool = False,
    ) -> None:
        image_model, own_scm = resolve_image_model(network, self.image_model_types)
        scm = own_scm if own_scm is not None else scm
        if prepare_batch is None:
            prepare_batch = CounterfactualPrepareBatch(graph=scm.graph if scm is not None else None)
        key_term, *other_terms = self.metric_terms
        prefix = key_metric_name[: -len(key_term)] if key_metric_name.endswith(key_term) else "val_"
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            key_val_metric={key_metric_name: MeanMetric(output_transform=_batch_term(key_term))},
            additional_metrics={f"{prefix}{t}": MeanMetric(output_transform=_batch_term(t)) for t in other_terms},
            metric_cmp_fn=lower_is_better,
            val_handlers=val_handlers,
            amp=amp,
            decollate=decollate,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        _bind_image_model(self, network, image_model, scm, image_range)
        self.beta = beta
        self.free_bits = free_bits
        self.seed = int(seed)

    def _iteration(self, engine: HVAEEvaluator, batchdata: dict[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        x, pa, _ = model_inputs(batch, engine.image_range, engine.scm)
        cuda = engine.state.device is not None and engine.state.device.type == "cuda"
        devices = [engine.state.device] if cuda else []
        with engine.mode(engine.image_model), torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(derive_seed(engine.seed, engine.state.rank, engine.state.iteration))
            if engine.amp:
                with torch.autocast("cuda", **engine.amp_kwargs):
                    terms = engine.validation_terms(x, pa)
            else:
                terms = engine.validation_terms(x, pa)
        engine.state.output = {**{t: terms[t] for t in engine.metric_terms}, "batch_size": x.shape[0]}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def validation_terms(self, x: torch.Tensor, pa: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The validated terms of a batch: the HVAE's nELBO, NLL and KL."""
        return self.image_model.elbo(x, pa, beta=self.beta, free_bits=self.free_bits)


def _batch_term(key: str) -> Callable[[Mapping], tuple[torch.Tensor, int]]:
    def transform(output: Mapping) -> tuple[torch.Tensor, int]:
        return output[key], output["batch_size"]

    return transform


def create_hvae_trainer(
    network: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None = None,
    output_dir: str | os.PathLike | None = None,
    max_epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    betas: Sequence[float] = (0.9, 0.9),
    optimizer: OptimizerFactory | None = None,
    warmup_steps: int = 100,
    grad_clip: float | None = 350.0,
    grad_skip: float | None = 500.0,
    ema_rate: float | None = 0.999,
    ema_warmup: str = "inverse",
    ema_warmup_steps: int = 100,
    beta: float | None = None,
    free_bits: float | None = None,
    image_range: Sequence[float] = (0.0, 1.0),
    device: str | torch.device | None = None,
    seed: int = 0,
    amp: bool = False,
    amp_kwargs: dict | None = None,
    distributed: bool | None = None,
    **handler_kwargs: Any,
) -> HVAETrainer:
    """An :class:`HVAETrainer` with the reference optimisation and all the usual handlers, ready to ``run()``.

    AdamW (``lr``, ``betas``, ``weight_decay``; the fused kernel on CPU/CUDA) with the linear warm-up; gradient
    clipping and skipping; EMA; validation of the EMA model every epoch on ``val_loader`` (the evaluator is
    ``trainer.evaluator``); atomic checkpoints in ``output_dir`` holding trainer state, network, EMA, optimiser and
    scheduler, the best one by validation nELBO as ``best.pt``; resume from the latest checkpoint there; MONAI
    ``StatsHandler``, optional progress bar and MLflow tracking — see
    :func:`~monai_cf.engines.setup_training_handlers` for ``handler_kwargs`` (``checkpoint_every``, ``resume``,
    ``progress_bar``, ``tracking_uri``, ``run_name``...).
    Under ``torch.distributed`` the HVAE is wrapped in DDP and only rank 0 writes and logs.

    Args:
        network: an HVAE or a DeepSCM (its HVAE is trained).
        train_loader: training loader (see :func:`~monai_cf.engines.create_data_loader` for exact resumes).
        val_loader: validation loader, ``None`` for no validation.
        output_dir: where checkpoints go, ``None`` for none.
        max_epochs: number of epochs.
        lr: peak learning rate.
        weight_decay: AdamW weight decay (the reference: 0.01 for MorphoMNIST, 0.05-0.1 for MIMIC).
        betas: AdamW betas.
        optimizer: builds another optimiser from the HVAE's parameters instead of AdamW (``lr``, ``betas`` and
            ``weight_decay`` are then unused), e.g. ``functools.partial(torch.optim.SGD, lr=0.01)``.
        warmup_steps: linear warm-up length in updates.
        grad_clip: gradient-norm clipping threshold.
        grad_skip: gradient-norm threshold above which an update is skipped.
        ema_rate: EMA rate (``None``: no EMA; validation then uses the raw weights).
        ema_warmup: EMA decay schedule, see :class:`~monai_cf.handlers.ExponentialMovingAverage`.
        ema_warmup_steps: updates copied into the EMA before averaging starts.
        beta: KL weight (``None``: the HVAE's own).
        free_bits: free bits (``None``: the HVAE's own).
        image_range: intensity range of the loader's images (a DeepSCM's own range wins).
        device: training device (default: CUDA if available, else CPU).
        seed: seed of the per-iteration random state.
        amp: mixed precision on CUDA.
        amp_kwargs: ``torch.autocast`` arguments.
        distributed: wrap in DDP (``None``: when a process group runs).
        handler_kwargs: :func:`~monai_cf.engines.setup_training_handlers` arguments.

    Example::

        train_loader = create_data_loader(csv_dataset("phantom/train.csv", spatial_size=32), batch_size=32)
        val_loader = create_data_loader(csv_dataset("phantom/val.csv", spatial_size=32), 64, shuffle=False)
        trainer = create_hvae_trainer(HVAE(2, 1, 32, 6), train_loader, val_loader, "runs/hvae", max_epochs=20,
                                      progress_bar=True, tracking_uri="sqlite:////abs/runs/mlruns.db")
        trainer.run()
    """
    image_model, _ = resolve_image_model(network)
    return build_image_trainer(
        HVAETrainer,
        network,
        train_loader,
        val_loader,
        output_dir,
        stage="hvae",
        options=image_trainer_options(locals()),
        trainer_kwargs={"beta": beta, "free_bits": free_bits},
        params={
            "beta": getattr(image_model, "beta", None) if beta is None else beta,
            "free_bits": getattr(image_model, "free_bits", None) if free_bits is None else free_bits,
        },
        **handler_kwargs,
    )


#: the optimisation settings every image-mechanism factory takes (see :func:`build_image_trainer`)
IMAGE_TRAINER_OPTIONS = (
    "max_epochs",
    "lr",
    "weight_decay",
    "betas",
    "optimizer",
    "warmup_steps",
    "grad_clip",
    "grad_skip",
    "ema_rate",
    "ema_warmup",
    "ema_warmup_steps",
    "image_range",
    "device",
    "seed",
    "amp",
    "amp_kwargs",
    "distributed",
)
# the options the trainer itself takes (the optimiser's and the device are handled by the factory core)
_TRAINER_OPTIONS = tuple(
    k for k in IMAGE_TRAINER_OPTIONS if k not in ("lr", "weight_decay", "betas", "optimizer", "device")
)


def image_trainer_options(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`IMAGE_TRAINER_OPTIONS` among a factory's arguments (its ``locals()``)."""
    return {name: arguments[name] for name in IMAGE_TRAINER_OPTIONS}


def build_image_trainer(
    trainer_class: type[HVAETrainer],
    network: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    output_dir: str | os.PathLike | None,
    stage: str,
    options: Mapping[str, Any],
    trainer_kwargs: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    **handler_kwargs: Any,
) -> HVAETrainer:
    """The shared core of the image-mechanism factories: the optimiser, the trainer, its evaluator and handlers.

    ``options`` holds every :data:`IMAGE_TRAINER_OPTIONS` entry (see :func:`create_hvae_trainer` for their meaning);
    ``trainer_kwargs`` go to ``trainer_class`` beside them; ``params`` join the tracked parameters; ``stage`` names
    the run.
    """
    missing = sorted(set(IMAGE_TRAINER_OPTIONS) - set(options))
    if missing:
        raise ValueError(f"build_image_trainer options lack {missing}.")
    device = training_device(options["device"])
    image_model, _ = resolve_image_model(network, trainer_class.image_model_types)
    network = network.to(device)
    optimizer = create_optimizer(
        options["optimizer"],
        image_model.parameters(),
        options["lr"],
        options["weight_decay"],
        betas=options["betas"],
        fused_on=device,
    )
    trainer = trainer_class(
        device=device,
        train_data_loader=train_loader,
        network=network,
        optimizer=optimizer,
        **{name: options[name] for name in _TRAINER_OPTIONS},
        **dict(trainer_kwargs or {}),
    )
    trainer.evaluator = None if val_loader is None else trainer.create_evaluator(val_loader, seed=options["seed"])
    stage_params = {
        "stage": stage,
        **{
            name: options[name] for name in ("lr", "weight_decay", "warmup_steps", "grad_clip", "grad_skip", "ema_rate")
        },
        "betas": tuple(options["betas"]),
        "ema_warmup": f"{options['ema_warmup']}:{options['ema_warmup_steps']}",
        **dict(params or {}),
        "batch_size": getattr(train_loader, "batch_size", None),
        "num_parameters": sum(p.numel() for p in image_model.parameters()),
        "seed": options["seed"],
        "world_size": world_size(),
    }
    attach_stage_handlers(
        trainer,
        trainer.checkpoint_dict(),
        output_dir,
        stage_params,
        optimizer,
        options["optimizer"],
        handler_kwargs,
        evaluator=trainer.evaluator,
        key_metric_negative_sign=True,
    )
    return trainer
