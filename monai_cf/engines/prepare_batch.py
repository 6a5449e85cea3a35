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
"""MONAI ``prepare_batch`` callables of the monai_cf engines.

:class:`CounterfactualPrepareBatch` gives ``(image, canonical attributes, pa)`` for the HVAE, CFT and evaluation
engines; :class:`AttributePrepareBatch` gives ``(image, encoded attribute targets)`` for MONAI's
``SupervisedTrainer`` / ``SupervisedEvaluator`` (predictors, mechanisms).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from monai.engines.utils import PrepareBatch
from monai.utils import convert_to_tensor

from monai_cf.data.encoding import AttributeEncoder
from monai_cf.graph import CausalGraph

__all__ = ["CounterfactualBatch", "CounterfactualPrepareBatch", "AttributePrepareBatch"]


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
    return convert_to_tensor(value, wrap_sequence=True, track_meta=False)


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
