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
"""Training the other parts of a deep SCM with MONAI's ``SupervisedTrainer``.

- Attribute predictors (the *guidance* predictor used by counterfactual fine-tuning and the independent
  *evaluation* predictor: same code, another seed or backbone): :func:`create_predictor_trainer`, validated by
  per-attribute ROC-AUC (binary; one-vs-rest macro for categorical) and MAE in original units (continuous),
  :class:`AttributeMetrics`.
- Attribute mechanisms by maximum likelihood, ``-sum_a log p(a | pa(a))``: :class:`MechanismLikelihood`,
  :class:`MechanismNLLLoss`, :func:`create_mechanism_trainer`; they train on the attribute table alone
  (:class:`AttributeTable`), no images are read.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.utils import CommonKeys, IgniteInfo, min_version, optional_import
from torch import nn
from torch.utils.data import DataLoader, Dataset

from monai_cf.data.encoding import AttributeEncoder
from monai_cf.engines.optimizers import OptimizerFactory, build_optimizer, optimizer_params
from monai_cf.engines.runtime import tune_cpu_allocator
from monai_cf.engines.utils import (
    AttributePrepareBatch,
    IterationSeeder,
    MeanMetric,
    OutputSummary,
    create_data_loader,
    fused_optimizer_kwargs,
    is_distributed,
    lower_is_better,
    setup_training_handlers,
)
from monai_cf.graph import AttributeKind, CausalGraph
from monai_cf.handlers.ema import unwrap_module
from monai_cf.losses import AttributeLoss, MechanismNLLLoss
from monai_cf.metrics import roc_auc
from monai_cf.networks.nets.mechanisms import log_prob_all
from monai_cf.networks.nets.predictor import AttributePredictor
from monai_cf.networks.scm import DeepSCM

if TYPE_CHECKING:
    import ignite.distributed as idist
    from ignite.metrics import Metric
else:
    idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")
    Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric", as_type="base")

__all__ = [
    "AttributeMetrics",
    "attribute_auc",
    "MechanismLikelihood",
    "MechanismNLLLoss",
    "AttributeTable",
    "attribute_loader",
    "create_predictor_trainer",
    "create_mechanism_trainer",
]


def _default_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def _wrap_ddp(module: nn.Module, device: torch.device, distributed: bool | None) -> nn.Module:
    if distributed is None:
        distributed = is_distributed()
    if not distributed:
        return module
    device_ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


# ------------------------------------------------------------------------------------------------- metrics
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


# ---------------------------------------------------------------------------------------------- mechanisms
class MechanismLikelihood(nn.Module):
    """The attribute mechanisms as one network: encoded attributes in, ``{name: log p(a | pa(a))}`` (``(B,)``) out.

    A thin wrapper (sharing the mechanisms' parameters) so that MONAI engines and ``DistributedDataParallel``
    can call them.

    Args:
        mechanisms: one mechanism per attribute (e.g. ``DeepSCM.mechanisms``).
        graph: the causal graph.

    Example::

        likelihood = MechanismLikelihood(scm.mechanisms, scm.graph)
        log_probs = likelihood(AttributeEncoder(scm.graph).encode(canonical_values))
    """

    def __init__(self, mechanisms: nn.ModuleDict | Mapping[str, nn.Module], graph: CausalGraph | Mapping | str) -> None:
        super().__init__()
        self.mechanisms = mechanisms if isinstance(mechanisms, nn.ModuleDict) else nn.ModuleDict(dict(mechanisms))
        self.graph = CausalGraph.build(graph)

    def forward(self, encoded: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return log_prob_all(self.mechanisms, self.graph, encoded)


class AttributeTable(Dataset):
    """The attribute values of a dataset, without its images: items are ``{name: canonical value}``.

    Args:
        data: a datalist (sequence of dicts, as :func:`monai_cf.data.load_csv_datalist` returns), a dataset with such
            a ``.data`` (e.g. :func:`monai_cf.data.csv_dataset`), or a mapping ``{name: sequence of values}``.
        graph: the causal graph; its attributes are kept.

    Raises:
        ValueError: when an attribute is missing from a row.
    """

    def __init__(self, data: Any, graph: CausalGraph | Mapping | str) -> None:
        self.graph = CausalGraph.build(graph)
        encoder = AttributeEncoder(self.graph)
        columns: dict[str, np.ndarray] = {}
        if isinstance(data, Mapping):
            for name in self.graph.attributes:
                if name not in data:
                    raise ValueError(f"Attribute '{name}' is missing; got columns {sorted(data)}.")
            raw = {name: list(data[name]) for name in self.graph.attributes}
        else:
            rows = getattr(data, "data", data)
            raw = {name: [] for name in self.graph.attributes}
            for i, row in enumerate(rows):
                for name in self.graph.attributes:
                    if name not in row:
                        raise ValueError(f"Row {i} has no attribute '{name}'; got keys {sorted(map(str, row))}.")
                    raw[name].append(row[name])
        for name, values in raw.items():
            canonical = [encoder.canonical(name, v) for v in values]
            dtype = np.float32 if self.graph[name].kind == AttributeKind.CONTINUOUS else np.int64
            columns[name] = np.asarray(canonical, dtype=dtype)
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"Attribute columns have different lengths {lengths}.")
        self.columns = columns
        self._length = lengths.pop()

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {name: column[index] for name, column in self.columns.items()}


def attribute_loader(
    data: Any, graph: CausalGraph | Mapping | str, batch_size: int = 256, shuffle: bool = True, seed: int = 0
) -> DataLoader:
    """A resumable loader (:func:`~monai_cf.engines.create_data_loader`) over an :class:`AttributeTable` of ``data``."""
    return create_data_loader(AttributeTable(data, graph), batch_size=batch_size, shuffle=shuffle, seed=seed)


# ------------------------------------------------------------------------------------------------ factories
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
    device = _default_device(device)
    tune_cpu_allocator(device)
    predictor = predictor.to(device)
    prepare = AttributePrepareBatch(predictor.graph, attributes=predictor.attributes)
    loss_function = loss_function or AttributeLoss(predictor.graph, attributes=predictor.attributes)
    optimizer_factory = optimizer
    optimizer = build_optimizer(
        optimizer_factory,
        predictor.parameters(),
        lambda parameters: torch.optim.AdamW(
            parameters, lr=lr, weight_decay=weight_decay, **fused_optimizer_kwargs(device)
        ),
    )
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=max_epochs,
        train_data_loader=train_loader,
        network=_wrap_ddp(predictor, device, distributed),
        optimizer=optimizer,
        loss_function=loss_function,
        prepare_batch=prepare,
        amp=amp,
        decollate=False,
        optim_set_to_none=True,
    )
    OutputSummary(("loss",)).attach(trainer)
    IterationSeeder(seed).attach(trainer)
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
    trainer.evaluator = evaluator
    params = {
        "stage": "predictor",
        "lr": lr,
        "weight_decay": weight_decay,
        "batch_size": getattr(train_loader, "batch_size", None),
        "attributes": ",".join(predictor.attributes),
        "num_parameters": sum(p.numel() for p in predictor.parameters()),
        "seed": seed,
        **optimizer_params(optimizer, optimizer_factory),
    }
    params.update(handler_kwargs.pop("tracking_params", None) or {})
    trainer.attached_handlers = setup_training_handlers(
        trainer,
        {"trainer": trainer, "network": predictor, "optimizer": optimizer},
        output_dir,
        evaluator=evaluator,
        key_metric_negative_sign=not discrete,
        tracking_params=params,
        **handler_kwargs,
    )
    return trainer


def create_mechanism_trainer(
    mechanisms: DeepSCM | nn.ModuleDict | Mapping[str, nn.Module],
    train_data: Any,
    val_data: Any = None,
    output_dir: str | os.PathLike | None = None,
    graph: CausalGraph | Mapping | str | None = None,
    max_epochs: int = 30,
    batch_size: int = 256,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    optimizer: OptimizerFactory | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    distributed: bool | None = None,
    **handler_kwargs: Any,
) -> SupervisedTrainer:
    """A MONAI ``SupervisedTrainer`` fitting the attribute mechanisms by maximum likelihood.

    The loss is ``-sum_a log p(a | pa(a))`` per sample (:class:`MechanismNLLLoss`), optimised with AdamW. Data can
    be loaders of attribute dictionaries, or anything :class:`AttributeTable` takes (a datalist or a
    ``csv_dataset``: only its attribute columns are read, images never). With ``val_data``, ``trainer.evaluator``
    reports the validation NLL per sample (``val_nll``, the key metric, lower is better) and per attribute
    (``val_nll_<name>``). Checkpoints hold the mechanisms as ``network``. ``handler_kwargs`` go to
    :func:`~monai_cf.engines.setup_training_handlers`.

    Args:
        mechanisms: a DeepSCM (its mechanisms and graph) or the mechanisms themselves (then pass ``graph``).
        train_data: training loader or attribute data.
        val_data: validation loader or attribute data, ``None`` for none.
        output_dir: checkpoint directory, ``None`` for none.
        graph: the causal graph when ``mechanisms`` is not a DeepSCM.
        max_epochs: number of epochs.
        batch_size: batch size of the loaders built from attribute data.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        optimizer: builds another optimiser from the mechanisms' parameters instead of AdamW (``lr`` and
            ``weight_decay`` are then unused).
        device: device (default: CUDA if available, else CPU).
        seed: seed of the data order.
        distributed: wrap in ``DistributedDataParallel`` (``None``: when a process group runs).
        handler_kwargs: :func:`~monai_cf.engines.setup_training_handlers` arguments.

    Example::

        trainer = create_mechanism_trainer(scm, train_datalist, val_datalist, "runs/mechanisms", max_epochs=30)
        trainer.run()
        trainer.evaluator.state.metrics["val_nll"]
    """
    if isinstance(mechanisms, DeepSCM):
        graph = mechanisms.graph if graph is None else graph
        mechanisms = mechanisms.mechanisms
    if graph is None:
        raise ValueError("create_mechanism_trainer needs graph=... when given mechanisms rather than a DeepSCM.")
    graph = CausalGraph.build(graph)
    device = _default_device(device)
    tune_cpu_allocator(device)
    likelihood = MechanismLikelihood(mechanisms, graph).to(device)

    def as_loader(data: Any, shuffle: bool) -> DataLoader:
        return data if isinstance(data, DataLoader) else attribute_loader(data, graph, batch_size, shuffle, seed)

    train_loader = as_loader(train_data, True)
    prepare = AttributePrepareBatch(graph, image_key=None)
    optimizer_factory = optimizer
    optimizer = build_optimizer(
        optimizer_factory,
        likelihood.parameters(),
        lambda parameters: torch.optim.AdamW(
            parameters, lr=lr, weight_decay=weight_decay, **fused_optimizer_kwargs(device)
        ),
    )
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=max_epochs,
        train_data_loader=train_loader,
        network=_wrap_ddp(likelihood, device, distributed),
        optimizer=optimizer,
        loss_function=MechanismNLLLoss(),
        prepare_batch=prepare,
        decollate=False,
        optim_set_to_none=True,
    )
    OutputSummary(("loss",)).attach(trainer)
    IterationSeeder(seed).attach(trainer)
    evaluator = None
    if val_data is not None:
        per_attribute = {
            f"val_nll_{name}": MeanMetric(output_transform=_negative_log_prob(name)) for name in graph.attributes
        }
        evaluator = SupervisedEvaluator(
            device=device,
            val_data_loader=as_loader(val_data, False),
            network=likelihood,
            prepare_batch=prepare,
            key_val_metric={"val_nll": MeanMetric(output_transform=_negative_log_prob(None))},
            additional_metrics=per_attribute,
            metric_cmp_fn=lower_is_better,
            decollate=False,
        )
    trainer.evaluator = evaluator
    params = {
        "stage": "mechanisms",
        "lr": lr,
        "weight_decay": weight_decay,
        "batch_size": getattr(train_loader, "batch_size", None),
        "num_parameters": sum(p.numel() for p in likelihood.parameters()),
        "seed": seed,
        **optimizer_params(optimizer, optimizer_factory),
    }
    params.update(handler_kwargs.pop("tracking_params", None) or {})
    trainer.attached_handlers = setup_training_handlers(
        trainer,
        {"trainer": trainer, "network": unwrap_module(likelihood).mechanisms, "optimizer": optimizer},
        output_dir,
        evaluator=evaluator,
        key_metric_negative_sign=True,
        tracking_params=params,
        **handler_kwargs,
    )
    return trainer


def _negative_log_prob(name: str | None) -> Callable[[Mapping], torch.Tensor]:
    def transform(output: Mapping) -> torch.Tensor:
        log_probs = output[CommonKeys.PRED]
        if name is not None:
            return -log_probs[name].reshape(-1)
        return -torch.stack([lp.reshape(-1) for lp in log_probs.values()]).sum(0)

    return transform
