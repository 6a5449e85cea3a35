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
"""Fitting the attribute mechanisms of a deep SCM by maximum likelihood, ``-sum_a log p(a | pa(a))``, with MONAI's
``SupervisedTrainer``: :class:`MechanismLikelihood`, :func:`create_mechanism_trainer`. They train on the attribute
table alone (:class:`AttributeTable`); no images are read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.utils import CommonKeys
from torch import nn
from torch.utils.data import DataLoader, Dataset

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
from monai_cf.engines.training_handlers import MeanMetric, lower_is_better
from monai_cf.graph import AttributeKind, CausalGraph
from monai_cf.handlers.ema import unwrap_module
from monai_cf.losses import MechanismNLLLoss
from monai_cf.networks.nets.mechanisms import log_prob_all
from monai_cf.networks.scm import DeepSCM

__all__ = ["MechanismLikelihood", "AttributeTable", "attribute_loader", "create_mechanism_trainer"]


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
    device = training_device(device)
    tune_cpu_allocator(device)
    likelihood = MechanismLikelihood(mechanisms, graph).to(device)

    def as_loader(data: Any, shuffle: bool) -> DataLoader:
        return data if isinstance(data, DataLoader) else attribute_loader(data, graph, batch_size, shuffle, seed)

    train_loader = as_loader(train_data, True)
    prepare = AttributePrepareBatch(graph, image_key=None)
    trainer = build_supervised_trainer(
        likelihood,
        train_loader,
        MechanismNLLLoss(),
        prepare,
        **supervised_trainer_options(locals()),
    )
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
    return finish_supervised_trainer(
        trainer,
        evaluator,
        "mechanisms",
        unwrap_module(likelihood).mechanisms,
        output_dir,
        optimizer,
        handler_kwargs,
        key_metric_negative_sign=True,
    )


def _negative_log_prob(name: str | None) -> Callable[[Mapping], torch.Tensor]:
    def transform(output: Mapping) -> torch.Tensor:
        log_probs = output[CommonKeys.PRED]
        if name is not None:
            return -log_probs[name].reshape(-1)
        return -torch.stack([lp.reshape(-1) for lp in log_probs.values()]).sum(0)

    return transform
