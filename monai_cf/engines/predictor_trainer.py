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
"""Training attribute predictors with MONAI's ``SupervisedTrainer``: the *guidance* predictor of counterfactual
fine-tuning and the independent *evaluation* predictor (same code, another seed or backbone).

:func:`create_predictor_trainer` validates by per-attribute ROC-AUC (binary; one-vs-rest macro for categorical) and
MAE in original units (continuous), :class:`AttributeMetrics`.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import LrScheduleHandler
from monai.utils import CommonKeys, IgniteInfo, min_version, optional_import
from torch import nn
from torch.utils.data import DataLoader

from monai_cf.data.encoding import AttributeEncoder
from monai_cf.engines.optimizers import OptimizerFactory
from monai_cf.engines.prepare_batch import AttributePrepareBatch
from monai_cf.engines.reproducibility import create_data_loader
from monai_cf.engines.runtime import tune_cpu_allocator
from monai_cf.engines.trainer_factory import (
    build_supervised_trainer,
    finish_supervised_trainer,
    supervised_trainer_options,
    training_device,
)
from monai_cf.engines.training_handlers import lower_is_better
from monai_cf.graph import AttributeKind, CausalGraph
from monai_cf.losses import AttributeLoss
from monai_cf.metrics import roc_auc
from monai_cf.networks.nets.predictor import AttributePredictor

if TYPE_CHECKING:
    import ignite.distributed as idist
    from ignite.metrics import Metric
else:
    idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")
    Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric", as_type="base")

__all__ = ["AttributeMetrics", "attribute_auc", "create_predictor_trainer", "train_attribute_predictor"]


def attribute_auc(kind: str, labels: torch.Tensor | np.ndarray, scores: torch.Tensor | np.ndarray) -> float:
    """ROC-AUC of one discrete attribute: binary, or the one-vs-rest macro average over the classes present.

    A thin adapter of :func:`monai_cf.metrics.roc_auc` to the ``(kind, labels, scores)`` order used here.

    Args:
        kind: ``"binary"`` or ``"categorical"``.
        labels: class indices ``(N,)``.
        scores: ``(N,)`` probabilities of class 1 (binary) or ``(N, K)`` class probabilities (categorical).

    Returns:
        The AUC, ``nan`` when it is undefined (a single class present).
    """
    scores = torch.as_tensor(scores).detach()
    num_classes = 2 if kind == AttributeKind.BINARY else int(scores.shape[-1])
    return roc_auc(scores, labels, num_classes)


class AttributeMetrics(Metric):
    """Per-attribute validation metrics of an :class:`~monai_cf.networks.AttributePredictor`.

    ``{prefix}auc_<name>`` for discrete attributes (binary ROC-AUC; categorical: one-vs-rest macro AUC),
    ``{prefix}mae_<name>`` for continuous ones (in original units, e.g. years), and ``{prefix}mean_auc`` (mean over
    the discrete attributes) / ``{prefix}mean_mae``. The values are flattened into ``engine.state.metrics``
    (Ignite's ``metrics_result_mode="flatten"``), so attach it under one of these names, e.g. ``"val_mean_auc"``,
    to make that the key metric. Predictions and targets are gathered across processes before computing.

    ``output_transform`` must give ``(outputs, targets)``: the predictor's raw head outputs and the encoded
    targets of :class:`~monai_cf.engines.AttributePrepareBatch` (by default read from a MONAI
    ``SupervisedEvaluator``'s undecollated output).

    Args:
        graph: the causal graph (or anything :meth:`CausalGraph.build` accepts).
        attributes: the attributes to evaluate (default: the graph's image parents).
        prefix: prefix of the metric names.
        output_transform: engine output -> ``(outputs, targets)``.

    Example::

        evaluator = SupervisedEvaluator(device, val_loader, predictor, prepare_batch=AttributePrepareBatch(graph),
                                        key_val_metric={"val_mean_auc": AttributeMetrics(graph)}, decollate=False)
    """

    def __init__(
        self,
        graph: CausalGraph | Mapping | str,
        attributes: Sequence[str] | None = None,
        prefix: str = "val_",
        output_transform: Callable = lambda out: (out[CommonKeys.PRED], out[CommonKeys.LABEL]),
    ) -> None:
        self.graph = CausalGraph.build(graph)
        self.encoder = AttributeEncoder(self.graph)
        self.attributes = list(self.graph.image_parents) if attributes is None else self.graph.check_names(attributes)
        self.prefix = prefix
        self._warned = False
        super().__init__(output_transform=output_transform, metrics_result_mode="flatten")

    def reset(self) -> None:
        self._scores: dict[str, list[torch.Tensor]] = {name: [] for name in self.attributes}
        self._labels: dict[str, list[torch.Tensor]] = {name: [] for name in self.attributes}

    def update(self, output: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]) -> None:
        outputs, targets = output
        for name in self.attributes:
            kind = self.graph[name].kind
            out = outputs[name].detach().float()
            target = torch.as_tensor(targets[name]).detach()
            if kind == AttributeKind.BINARY:
                score, label = torch.sigmoid(out[:, 0]), target.reshape(-1).float()
            elif kind == AttributeKind.CATEGORICAL:
                score = torch.softmax(out, dim=-1)
                label = (target.argmax(dim=-1) if target.ndim == 2 else target.reshape(-1)).float()
            else:
                score, label = out[:, 0], target.reshape(-1).float()
            self._scores[name].append(score.cpu())
            self._labels[name].append(label.cpu())

    def compute(self) -> dict[str, float]:
        results: dict[str, float] = {}
        aucs, maes = [], []
        gathered: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in self.attributes:
            if not self._scores[name]:
                raise RuntimeError("AttributeMetrics must have at least one update before it can be computed.")
            scores = torch.cat(self._scores[name])
            labels = torch.cat(self._labels[name])
            if idist.get_world_size() > 1:
                scores = idist.all_gather(scores)
                labels = idist.all_gather(labels)
            kind = self.graph[name].kind
            gathered[name] = (scores, labels)
            if kind == AttributeKind.CONTINUOUS:
                predicted = self.encoder.decode_attribute(name, scores.unsqueeze(-1))
                actual = self.encoder.decode_attribute(name, labels.unsqueeze(-1))
                results[f"{self.prefix}mae_{name}"] = float((predicted - actual).abs().mean())
                maes.append(results[f"{self.prefix}mae_{name}"])
            else:
                results[f"{self.prefix}auc_{name}"] = attribute_auc(kind, labels, scores)
                aucs.append(results[f"{self.prefix}auc_{name}"])
        defined = [a for a in aucs if not math.isnan(a)]
        if aucs:
            results[f"{self.prefix}mean_auc"] = float(np.mean(defined)) if defined else self._mean_accuracy(gathered)
        if maes:
            results[f"{self.prefix}mean_mae"] = float(np.mean(maes))
        return results

    def _mean_accuracy(self, gathered: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Stands in for the mean AUC when no AUC is defined (every discrete attribute has one class in the data)."""
        accuracies = []
        for name in self.attributes:
            kind = self.graph[name].kind
            if kind == AttributeKind.CONTINUOUS:
                continue
            scores, labels = gathered[name]
            predicted = (scores > 0.5).float() if kind == AttributeKind.BINARY else scores.argmax(dim=-1).float()
            accuracies.append(float((predicted == labels).float().mean()))
        if not self._warned:
            warnings.warn(
                f"{self.prefix}mean_auc: no AUC is defined (each discrete attribute has a single class in the data); "
                "the mean accuracy stands in, so that the best checkpoint is still chosen by something defined."
            )
            self._warned = True
        return float(np.mean(accuracies))


def create_predictor_trainer(
    predictor: AttributePredictor,
    train_loader: DataLoader,
    val_loader: DataLoader | None = None,
    output_dir: str | os.PathLike | None = None,
    max_epochs: int = 5,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    optimizer: OptimizerFactory | None = None,
    loss_function: nn.Module | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    amp: bool = False,
    distributed: bool | None = None,
    **handler_kwargs: Any,
) -> SupervisedTrainer:
    """A MONAI ``SupervisedTrainer`` for an :class:`~monai_cf.networks.AttributePredictor`, with its evaluator.

    Batches are dictionaries with the image and canonical attributes (e.g. from :func:`monai_cf.data.csv_dataset`);
    :class:`~monai_cf.engines.AttributePrepareBatch` encodes the targets and
    :class:`~monai_cf.networks.AttributeLoss` (or ``loss_function``) supervises every head; AdamW optimises.
    With ``val_loader``, ``trainer.evaluator`` (a MONAI ``SupervisedEvaluator``) reports :class:`AttributeMetrics`
    every epoch; its key metric is ``val_mean_auc`` (higher is better), or ``val_mean_mae`` when all attributes
    are continuous. Train the guidance and the evaluation predictors with two calls (other ``seed`` or backbone,
    other ``output_dir``). ``handler_kwargs`` go to :func:`~monai_cf.engines.setup_training_handlers`
    (checkpoints in ``output_dir``, resume, progress bar, MLflow...).

    Args:
        predictor: the predictor to train.
        train_loader: training loader.
        val_loader: validation loader, ``None`` for no validation.
        output_dir: checkpoint directory, ``None`` for none.
        max_epochs: number of epochs.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        optimizer: builds another optimiser from the predictor's parameters instead of AdamW (``lr`` and
            ``weight_decay`` are then unused).
        loss_function: default ``AttributeLoss(predictor.graph, predictor.attributes)``.
        device: device (default: CUDA if available, else CPU).
        seed: seed of the per-iteration random state (dropout).
        amp: mixed precision on CUDA.
        distributed: wrap in ``DistributedDataParallel`` (``None``: when a process group runs).
        handler_kwargs: :func:`~monai_cf.engines.setup_training_handlers` arguments.

    Example::

        guidance = AttributePredictor(2, 1, "mimic_cxr")
        trainer = create_predictor_trainer(guidance, train_loader, val_loader, "runs/guidance", max_epochs=5)
        trainer.run()
        trainer.evaluator.state.metrics["val_auc_sex"]
    """
    device = training_device(device)
    tune_cpu_allocator(device)
    predictor = predictor.to(device)
    prepare = AttributePrepareBatch(predictor.graph, attributes=predictor.attributes)
    loss_function = loss_function or AttributeLoss(predictor.graph, attributes=predictor.attributes)
    trainer = build_supervised_trainer(
        predictor,
        train_loader,
        loss_function,
        prepare,
        **supervised_trainer_options(locals()),
    )
    evaluator = None
    discrete = any(predictor.graph[n].is_discrete for n in predictor.attributes)
    if val_loader is not None:
        key = "val_mean_auc" if discrete else "val_mean_mae"
        evaluator = SupervisedEvaluator(
            device=device,
            val_data_loader=val_loader,
            network=predictor,
            prepare_batch=prepare,
            key_val_metric={key: AttributeMetrics(predictor.graph, predictor.attributes)},
            metric_cmp_fn=(lambda current, best: current > best) if discrete else lower_is_better,
            amp=amp,
            decollate=False,
        )
    return finish_supervised_trainer(
        trainer,
        evaluator,
        "predictor",
        predictor,
        output_dir,
        optimizer,
        handler_kwargs,
        key_metric_negative_sign=not discrete,
        attributes=",".join(predictor.attributes),
    )


def train_attribute_predictor(
    images: torch.Tensor,
    attributes: Mapping[str, torch.Tensor],
    graph: CausalGraph | Mapping | str,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 3e-3,
    channels: Sequence[int] = (16, 32, 64, 128),
    seed: int = 0,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Train a small :class:`~monai_cf.networks.AttributePredictor` (``"small_cnn"``) on tensors in memory.

    The same training as :func:`create_predictor_trainer` (its ``SupervisedTrainer``,
    :class:`~monai_cf.networks.AttributeLoss`, per-iteration seeds), with Adam whose learning rate is
    cosine-annealed to zero over the run and no validation. :class:`CounterfactualEvaluator` uses it for the
    utility stage (predictors trained on counterfactuals only) when no ``train_predictor_fn`` is given. The
    caller's global random state is left as it was.

    Args:
        images: ``(N, C, *spatial)`` images in ``[0, 1]``.
        attributes: canonical values ``{name: (N,)}`` of the attributes to predict (those of the graph present).
        graph: the causal graph.
        epochs: passes over the data.
        batch_size: mini-batch size.
        lr: Adam learning rate (cosine-annealed to zero).
        channels: widths of the small CNN's stages.
        seed: seeds the initialisation, the order and the per-iteration random state.
        device: where to train (default: the images' device).

    Returns:
        The trained predictor, in eval mode.

    Example::

        predictor = train_attribute_predictor(torch.from_numpy(batch["image"]), batch, "mimic_cxr", epochs=5)
    """
    graph = CausalGraph.build(graph)
    names = [n for n in graph.image_parents if n in attributes] or [n for n in graph.attributes if n in attributes]
    if not names:
        raise ValueError(f"No attribute of the graph among {sorted(attributes)}.")
    device = torch.device(device) if device is not None else images.device
    values = {name: torch.as_tensor(attributes[name]).reshape(-1).cpu() for name in names}
    count = int(images.shape[0])
    for name, column in values.items():
        if column.numel() != count:
            raise ValueError(f"attributes['{name}'] has {column.numel()} values for {count} images.")
    samples = [{"image": images[i], **{name: column[i] for name, column in values.items()}} for i in range(count)]
    with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []):
        torch.manual_seed(seed)
        predictor = AttributePredictor(images.ndim - 2, images.shape[1], graph, attributes=names, channels=channels)
        # batch norm needs two samples: a last batch of one is dropped
        loader = create_data_loader(samples, batch_size=batch_size, seed=seed, drop_last=count % batch_size == 1)
        trainer = create_predictor_trainer(
            predictor,
            loader,
            max_epochs=epochs,
            optimizer=functools.partial(torch.optim.Adam, lr=lr),
            device=device,
            seed=seed,
            distributed=False,
            stats=False,
        )
        steps = max(1, epochs * len(loader))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(trainer.optimizer, steps)
        LrScheduleHandler(scheduler, print_lr=False, epoch_level=False).attach(trainer)
        trainer.run()
    return predictor.eval()
