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
"""What every ``create_*`` trainer factory of monai_cf does around its own engine.

The predictor, mechanism, image-mechanism (HVAE, diffusion) and fine-tuning factories differ in their engine and
their stage parameters; they share the device default, the optimiser (AdamW unless the user passes a factory, the
seam of the bundle's ``optimizer`` keys), the tracked parameters and the training handlers, which live here once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from torch import nn

from monai_cf.engines.distributed import is_distributed
from monai_cf.engines.optimizers import OptimizerFactory, build_optimizer, fused_optimizer_kwargs, optimizer_params
from monai_cf.engines.reproducibility import IterationSeeder
from monai_cf.engines.training_handlers import OutputSummary, setup_training_handlers

__all__ = [
    "training_device",
    "create_optimizer",
    "wrap_distributed",
    "world_size",
    "attach_stage_handlers",
    "SUPERVISED_TRAINER_OPTIONS",
    "supervised_trainer_options",
    "build_supervised_trainer",
    "finish_supervised_trainer",
]

#: the arguments of the predictor and mechanism factories that :func:`build_supervised_trainer` takes as they are
SUPERVISED_TRAINER_OPTIONS = ("max_epochs", "optimizer", "lr", "weight_decay", "device", "seed", "distributed")


def training_device(device: str | torch.device | None) -> torch.device:
    """The device a factory trains on: the one given, else CUDA when available, else the CPU."""
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def create_optimizer(
    factory: OptimizerFactory | None,
    parameters: Iterable[nn.Parameter],
    lr: float,
    weight_decay: float,
    betas: Sequence[float] | None = None,
    fused_on: torch.device | None = None,
) -> torch.optim.Optimizer:
    """The user's optimiser (``factory(parameters)``) or the factories' default, AdamW.

    Args:
        factory: an optimiser factory from the configuration (``None``: AdamW), checked by
            :func:`~monai_cf.engines.optimizers.build_optimizer`.
        parameters: the parameters to optimise.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas (``None``: torch's default).
        fused_on: the training device when AdamW may use its fused kernels there
            (:func:`~monai_cf.engines.optimizers.fused_optimizer_kwargs`); ``None`` keeps the default kernels.

    Example::

        optimizer = create_optimizer(None, model.parameters(), lr=1e-3, weight_decay=1e-4, fused_on=device)
    """
    adamw = {"lr": lr, "weight_decay": weight_decay}
    if betas is not None:
        adamw["betas"] = tuple(betas)
    if fused_on is not None:
        adamw.update(fused_optimizer_kwargs(fused_on))
    return build_optimizer(factory, parameters, lambda chosen: torch.optim.AdamW(chosen, **adamw))


def wrap_distributed(module: nn.Module, device: torch.device, distributed: bool | None) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` when ``distributed`` (``None``: when a process group runs)."""
    if distributed is None:
        distributed = is_distributed()
    if not distributed:
        return module
    device_ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def world_size() -> int:
    """Number of processes of the running process group (1 without one)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def attach_stage_handlers(
    trainer: Any,
    objects: Mapping[str, Any],
    output_dir: str | os.PathLike | None,
    stage_params: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    optimizer_factory: OptimizerFactory | None,
    handler_kwargs: dict[str, Any],
    **setup_kwargs: Any,
) -> Any:
    """Attach the training handlers to a factory's trainer and record what they track.

    The tracked parameters are the stage's, then the optimiser's
    (:func:`~monai_cf.engines.optimizers.optimizer_params`), then the caller's ``tracking_params``
    (taken out of ``handler_kwargs``); the handlers (checkpoints in ``output_dir``, resume, progress bar, MLflow,
    the user's own) come from :func:`~monai_cf.engines.setup_training_handlers` and are kept as
    ``trainer.attached_handlers``.

    Args:
        trainer: the factory's engine.
        objects: what the checkpoints hold (``{"trainer": ..., "network": ..., "optimizer": ...}``).
        output_dir: checkpoint directory, ``None`` for none.
        stage_params: the stage's own parameters to track.
        optimizer: the optimiser the trainer steps.
        optimizer_factory: the factory it came from (``None``: the default AdamW).
        handler_kwargs: the factory's ``**handler_kwargs``.
        setup_kwargs: further :func:`~monai_cf.engines.setup_training_handlers` arguments (``evaluator``,
            ``key_metric_negative_sign``).

    Returns:
        The trainer.

    Example::

        attach_stage_handlers(trainer, {"trainer": trainer, "network": net, "optimizer": opt}, "runs/x",
                              {"stage": "predictor", "lr": 1e-3}, opt, None, {"progress_bar": False})
    """
    tracked = {**dict(stage_params), **optimizer_params(optimizer, optimizer_factory)}
    tracked.update(handler_kwargs.pop("tracking_params", None) or {})
    trainer.attached_handlers = setup_training_handlers(
        trainer, objects, output_dir, tracking_params=tracked, **setup_kwargs, **handler_kwargs
    )
    return trainer


def supervised_trainer_options(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`SUPERVISED_TRAINER_OPTIONS` (and ``amp`` where given) among a factory's ``locals()``."""
    names = SUPERVISED_TRAINER_OPTIONS + (("amp",) if "amp" in arguments else ())
    return {name: arguments[name] for name in names}


def build_supervised_trainer(
    network: nn.Module,
    train_loader: Any,
    loss_function: nn.Module,
    prepare_batch: Any,
    *,
    max_epochs: int,
    optimizer: OptimizerFactory | None,
    lr: float,
    weight_decay: float,
    device: torch.device,
    seed: int,
    distributed: bool | None,
    amp: bool = False,
) -> SupervisedTrainer:
    """The MONAI ``SupervisedTrainer`` of the predictor and mechanism factories, before its handlers.

    The optimiser comes from :func:`create_optimizer` (``trainer.optimizer``), the network is wrapped for a
    distributed run (:func:`wrap_distributed`), the output is summarised for MONAI's handlers
    (:class:`~monai_cf.engines.OutputSummary`) and every iteration is seeded
    (:class:`~monai_cf.engines.IterationSeeder`). The factory adds its evaluator and
    :func:`attach_stage_handlers`.

    Example::

        trainer = build_supervised_trainer(predictor, loader, AttributeLoss("mimic_cxr"), AttributePrepareBatch(
            "mimic_cxr"), max_epochs=5, optimizer=None, lr=1e-3, weight_decay=1e-4, device=device, seed=0,
            distributed=None)
    """
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=max_epochs,
        train_data_loader=train_loader,
        network=wrap_distributed(network, device, distributed),
        optimizer=create_optimizer(optimizer, network.parameters(), lr, weight_decay, fused_on=device),
        loss_function=loss_function,
        prepare_batch=prepare_batch,
        amp=amp,
        decollate=False,
        optim_set_to_none=True,
    )
    OutputSummary(("loss",)).attach(trainer)
    IterationSeeder(seed).attach(trainer)
    trainer.stage_params = {
        "lr": lr,
        "weight_decay": weight_decay,
        "batch_size": getattr(train_loader, "batch_size", None),
        "num_parameters": sum(p.numel() for p in network.parameters()),
        "seed": seed,
    }
    return trainer


def finish_supervised_trainer(
    trainer: SupervisedTrainer,
    evaluator: Any,
    stage: str,
    checkpointed: nn.Module,
    output_dir: str | os.PathLike | None,
    optimizer_factory: OptimizerFactory | None,
    handler_kwargs: dict[str, Any],
    key_metric_negative_sign: bool,
    **stage_params: Any,
) -> SupervisedTrainer:
    """Give a :func:`build_supervised_trainer` trainer its validation evaluator and its stage handlers.

    The checkpoints hold the trainer, ``checkpointed`` and the optimiser; the tracked parameters are ``stage``, the
    ones :func:`build_supervised_trainer` recorded (``trainer.stage_params``: learning rate, weight decay, batch
    size, parameter count, seed) and ``stage_params``, then the optimiser's (:func:`attach_stage_handlers`).

    Example::

        finish_supervised_trainer(trainer, evaluator, "predictor", predictor, "runs/p", None, {"progress_bar": False},
                                  key_metric_negative_sign=False, attributes="sex,race")
    """
    trainer.evaluator = evaluator
    objects = {"trainer": trainer, "network": checkpointed, "optimizer": trainer.optimizer}
    attach_stage_handlers(
        trainer,
        objects,
        output_dir,
        {"stage": stage, **trainer.stage_params, **stage_params},
        trainer.optimizer,
        optimizer_factory,
        handler_kwargs,
        evaluator=evaluator,
        key_metric_negative_sign=key_metric_negative_sign,
    )
    return trainer
