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
"""Training and validating the diffusion image mechanism by its noise-prediction loss."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from monai_cf.engines.hvae_trainer import HVAEEvaluator, HVAETrainer, build_image_trainer, image_trainer_options
from monai_cf.engines.optimizers import OptimizerFactory
from monai_cf.networks.nets.diffusion import DiffusionImageMechanism

__all__ = ["DiffusionTrainer", "DiffusionEvaluator", "create_diffusion_trainer", "DIFFUSION_OUTPUT_KEYS"]

#: Scalars of a :class:`DiffusionTrainer` iteration's output.
DIFFUSION_OUTPUT_KEYS = ("loss", "grad_norm", "skipped")


class DiffusionTrainer(HVAETrainer):
    """Train a :class:`~monai_cf.networks.nets.DiffusionImageMechanism` by its noise-prediction loss.

    The machinery is the :class:`~monai_cf.engines.HVAETrainer`'s: images mapped to ``[-1, 1]``, parents from the
    batch or a DeepSCM's encoder, gradient clipping and skipping, the warm-up schedule, EMA weights
    (``trainer.ema``), per-iteration seeding for exact resumes, DDP under ``torch.distributed``, the one-item
    decollated output ``[{"loss", "grad_norm", "skipped"}]``. Each iteration draws the timesteps, the noise and the
    per-attribute condition dropout of :meth:`DiffusionImageMechanism.loss` from torch's (seeded) RNG.

    Args:
        args: the :class:`~monai_cf.engines.HVAETrainer` arguments; ``network`` holds a diffusion mechanism.
        kwargs: as ``args``; ``beta`` and ``free_bits`` (ELBO settings) are rejected. Defaults differ where diffusion
            training differs: ``grad_clip=1.0``, ``grad_skip=None``.

    Example::

        model = DiffusionImageMechanism(2, 1, 32, parent_dims=[1, 3, 1, 1])
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
        trainer = DiffusionTrainer("cpu", max_epochs=10, train_data_loader=train_loader, network=model,
                                   optimizer=optimizer)
        trainer.run()
    """

    image_model_types = (DiffusionImageMechanism,)
    output_keys = DIFFUSION_OUTPUT_KEYS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for key in ("beta", "free_bits"):
            if kwargs.get(key) is not None:
                raise ValueError(f"'{key}' is an ELBO setting; a diffusion mechanism is trained without it.")
            kwargs.pop(key, None)
        kwargs.setdefault("grad_clip", 1.0)
        kwargs.setdefault("grad_skip", None)
        super().__init__(*args, **kwargs)

    @property
    def evaluator_class(self) -> type:
        return DiffusionEvaluator

    def _evaluator_defaults(self) -> dict[str, Any]:
        return {}

    def loss_terms(self, module: nn.Module, x: torch.Tensor, pa: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``{"loss": noise-prediction MSE}`` of a batch (``module`` is the mechanism or its DDP wrapper)."""
        return {"loss": module(x, pa)["loss"]}


class DiffusionEvaluator(HVAEEvaluator):
    """Validation noise-prediction loss of a diffusion mechanism (normally a :class:`DiffusionTrainer`'s EMA).

    The key metric (default ``"val_loss"``) is the sample-weighted mean loss, conditional on every attribute (no
    condition dropout). Timesteps and noise come from torch's RNG forked and seeded from ``(seed, rank,
    iteration)``, so two validations differ only by the weights. Lower is better.

    Args:
        args: the :class:`~monai_cf.engines.HVAEEvaluator` arguments.
        kwargs: as ``args``; ``key_metric_name`` defaults to ``"val_loss"``.

    Example::

        evaluator = DiffusionEvaluator("cpu", val_loader, trainer.ema)
        evaluator.run()
        evaluator.state.metrics["val_loss"]
    """

    image_model_types = (DiffusionImageMechanism,)
    metric_terms = ("loss",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("key_metric_name", "val_loss")
        super().__init__(*args, **kwargs)

    def validation_terms(self, x: torch.Tensor, pa: torch.Tensor | None) -> dict[str, torch.Tensor]:
        conditional = torch.zeros(x.shape[0], self.image_model.embedding.num_attributes, dtype=torch.bool)
        return self.image_model.loss(x, pa, null_mask=conditional.to(x.device))


def create_diffusion_trainer(
    network: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None = None,
    output_dir: str | os.PathLike | None = None,
    max_epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    optimizer: OptimizerFactory | None = None,
    warmup_steps: int = 100,
    grad_clip: float | None = 1.0,
    grad_skip: float | None = None,
    ema_rate: float | None = 0.999,
    ema_warmup: str = "inverse",
    ema_warmup_steps: int = 100,
    image_range: Sequence[float] = (0.0, 1.0),
    device: str | torch.device | None = None,
    seed: int = 0,
    amp: bool = False,
    amp_kwargs: dict | None = None,
    distributed: bool | None = None,
    **handler_kwargs: Any,
) -> DiffusionTrainer:
    """A :class:`DiffusionTrainer` with AdamW, warm-up, EMA, validation and the usual handlers, ready to ``run()``.

    The same handlers as :func:`~monai_cf.engines.create_hvae_trainer` (validation of the EMA weights every epoch,
    ``best.pt`` by ``val_loss``, atomic checkpoints and resume, ``StatsHandler``, progress bar, MLflow; see
    :func:`~monai_cf.engines.setup_training_handlers` for ``handler_kwargs``); DDP under ``torch.distributed``.

    Args:
        network: a diffusion mechanism or a DeepSCM holding one.
        train_loader: training loader.
        val_loader: validation loader, ``None`` for no validation.
        output_dir: where checkpoints go, ``None`` for none.
        max_epochs: number of epochs.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        optimizer: builds another optimiser from the parameters instead of AdamW (see
            :func:`~monai_cf.engines.create_hvae_trainer`).
        warmup_steps: linear warm-up length in updates.
        grad_clip: gradient-norm clipping threshold.
        grad_skip: skip updates whose gradient norm reaches this (``None``: only non-finite ones).
        ema_rate: EMA rate (``None``: no EMA).
        ema_warmup: EMA decay schedule.
        ema_warmup_steps: updates copied into the EMA before averaging starts.
        image_range: intensity range of the loader's images (a DeepSCM's own range wins).
        device: training device (default: CUDA if available, else CPU).
        seed: seed of the per-iteration random state.
        amp: mixed precision on CUDA.
        amp_kwargs: ``torch.autocast`` arguments.
        distributed: wrap in DDP (``None``: when a process group runs).
        handler_kwargs: :func:`~monai_cf.engines.setup_training_handlers` arguments.

    Example::

        scm = DeepSCM("mimic_cxr", image_model={"mechanism": "diffusion", "spatial_dims": 2, "in_channels": 1,
                                                "spatial_size": 32})
        trainer = create_diffusion_trainer(scm, train_loader, val_loader, "runs/diffusion", max_epochs=20)
        trainer.run()
    """
    return build_image_trainer(
        DiffusionTrainer,
        network,
        train_loader,
        val_loader,
        output_dir,
        stage="diffusion",
        options=image_trainer_options(locals()),
        **handler_kwargs,
    )
