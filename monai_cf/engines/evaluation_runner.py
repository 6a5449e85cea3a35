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
"""What :class:`~monai_cf.engines.CounterfactualEvaluator` runs on: counterfactual calls, batches and accumulators.

- :class:`CounterfactualRunner` calls a counterfactual function (or a DeepSCM, batched over interventions) and
  tidies what it returns;
- :class:`TensorBatches` turns a dictionary of arrays into a re-iterable, sized loader of dict batches;
- :class:`EvaluationAccumulator` keeps the per-iteration results on the CPU until the epoch completes;
- :func:`predict_in_chunks` runs the evaluation predictor (features and heads) in chunks;
- :func:`collect_dataset` gathers every image and attribute of a dataset (the utility stage trains on them);
- small reductions over the accumulated lists: :func:`append_nested`, :func:`cat_values`, :func:`mean_of`,
  :func:`finite_mean`, :func:`to_numpy`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.utils import convert_to_tensor
from torch import nn

from monai_cf.graph import CausalGraph
from monai_cf.networks.scm import DeepSCM

__all__ = [
    "PREDICT_CHUNK",
    "CounterfactualRunner",
    "EvaluationAccumulator",
    "TensorBatches",
    "append_nested",
    "cat_values",
    "collect_dataset",
    "finite_mean",
    "mean_of",
    "predict_in_chunks",
    "to_numpy",
]

PREDICT_CHUNK = 256  # images per call of the evaluation predictor


class CounterfactualRunner:
    """Calls a counterfactual function (or a DeepSCM) with the evaluator's generator, batched where it can.

    Args:
        fn: ``cf_fn(x, pa, do) -> (x_cf, pa_cf)`` or a :class:`~monai_cf.networks.DeepSCM` (then the
            interventions of :meth:`many` share one abduction and one stacked decode).
        generator: the generator a DeepSCM draws its posterior noise from.

    Example::

        runner = CounterfactualRunner(scm, torch.Generator().manual_seed(0))
        x_cf, pa_cf = runner(x, pa, {"sex": 1 - pa["sex"]})
        results = runner.many(x, pa, [{"sex": 1 - pa["sex"]}, {"age": pa["age"] + 10}])
    """

    def __init__(self, fn: Any, generator: torch.Generator | None) -> None:
        self.fn = fn
        self.generator = generator
        self.is_scm = isinstance(fn, DeepSCM)
        if not self.is_scm and not callable(fn):
            raise ValueError(f"A counterfactual function must be callable or a DeepSCM, got {type(fn).__name__}.")
        self.modules = [fn] if isinstance(fn, nn.Module) else []

    def __call__(self, x: torch.Tensor, pa: Mapping[str, torch.Tensor], do: Mapping[str, Any]) -> tuple:
        if self.is_scm:
            x_cf, pa_cf = self.fn.counterfactual(x, pa, dict(do), generator=self.generator)
        else:
            x_cf, pa_cf = self.fn(x, pa, dict(do))
        return self._tidy(x, pa, do, x_cf, pa_cf)

    def many(self, x: torch.Tensor, pa: Mapping[str, torch.Tensor], dos: Sequence[Mapping[str, Any]]) -> list:
        """The counterfactuals of ``x`` under each intervention of ``dos``: a list of ``(x_cf, pa_cf)``."""
        if self.is_scm:
            # one abduction of the image for every intervention, decoded in one stacked pass
            x_cfs, pa_cfs = self.fn.counterfactual(x, pa, [dict(d) for d in dos], generator=self.generator)
            return [self._tidy(x, pa, d, xc, pc) for d, xc, pc in zip(dos, x_cfs, pa_cfs)]
        return [self(x, pa, d) for d in dos]

    @staticmethod
    def _tidy(x, pa, do, x_cf, pa_cf) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x_cf = torch.as_tensor(x_cf).to(device=x.device, dtype=x.dtype)
        if x_cf.shape != x.shape:
            raise ValueError(f"A counterfactual function returned images of shape {tuple(x_cf.shape)} for {x.shape}.")
        result = {n: v for n, v in pa.items()}
        result.update({n: torch.as_tensor(v).reshape(-1) for n, v in do.items()})
        if pa_cf is not None:
            result.update({n: torch.as_tensor(v).reshape(-1) for n, v in pa_cf.items() if n in pa})
        return x_cf, {n: v.to(pa[n].device, pa[n].dtype) for n, v in result.items()}


class TensorBatches:
    """Batches of a dictionary of arrays (images, attributes, optional ``noise``), as a re-iterable sized loader.

    Each batch holds tensors of the rows, the ``noise`` dict's arrays sliced alike and ``_row``, the row numbers.

    Args:
        data: ``{image_key: (N, C, *spatial), attribute: (N,), ..., "noise": {name: (N,)}}``.
        batch_size: rows per batch (the last batch may be smaller).
        image_key: the image's key, whose length is the number of rows.

    Example::

        loader = TensorBatches(phantom.sample_batch(100), batch_size=32, image_key="image")
        len(loader)  # 4
    """

    def __init__(self, data: Mapping[str, Any], batch_size: int, image_key: str) -> None:
        if image_key not in data:
            raise ValueError(f"The test data has no '{image_key}' entry; keys: {sorted(data)}.")
        self.data = data
        self.batch_size = int(batch_size)
        self.size = len(data[image_key])
        for key, value in data.items():
            if key == "noise":
                lengths = {len(np.asarray(v).reshape(-1)) for k, v in value.items() if k != "patient_id"}
                if lengths and lengths != {self.size}:
                    raise ValueError(f"The test data's noise arrays have lengths {lengths}, the images {self.size}.")
            elif hasattr(value, "__len__") and len(value) != self.size:
                raise ValueError(f"Test data entry '{key}' has {len(value)} rows, '{image_key}' has {self.size}.")

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, self.size, self.batch_size):
            stop = min(start + self.batch_size, self.size)
            batch: dict[str, Any] = {}
            for key, value in self.data.items():
                if key == "noise":
                    batch[key] = {k: np.asarray(v)[start:stop] for k, v in value.items()}
                else:
                    batch[key] = torch.as_tensor(
                        np.asarray(value[start:stop]) if not torch.is_tensor(value) else value[start:stop]
                    )
            batch["_row"] = np.arange(start, stop)
            yield batch


class EvaluationAccumulator:
    """Per-iteration results of the counterfactual evaluation, kept on the CPU until the epoch completes.

    The nested dictionaries end in lists of per-batch tensors (see :func:`append_nested`); keys follow the
    order ``[cf type, intervention, attribute]`` for counterfactual outputs and labels, ``[intervention, cf type,
    metric]`` for the ground truth and descendants.

    Example::

        acc = EvaluationAccumulator()
        append_nested(acc.cf_labels, ["soft", "sex", "disease"], pa_cf["disease"])
    """

    def __init__(self) -> None:
        self.real_outputs: dict[str, list[torch.Tensor]] = {}
        self.labels: dict[str, list[torch.Tensor]] = {}
        self.real_features: list[torch.Tensor] = []
        self.cf_outputs: dict[str, dict[str, dict[str, list[torch.Tensor]]]] = {}
        self.cf_labels: dict[str, dict[str, dict[str, list[torch.Tensor]]]] = {}
        self.cf_features: dict[str, dict[str, list[torch.Tensor]]] = {}
        self.ground_truth: dict[str, dict[str, dict[str, list[torch.Tensor]]]] = {}
        self.unchanged_l1: dict[str, list[torch.Tensor]] = {}
        self.descendants: dict[str, dict[str, dict[str, list[torch.Tensor]]]] = {}
        self.interventions: dict[str, list[torch.Tensor]] = {}
        self.true_attributes: dict[str, dict[str, list[torch.Tensor]]] = {}
        self.true_outputs: dict[str, dict[str, list[torch.Tensor]]] = {}
        self.composition: dict[str, dict[int, list[torch.Tensor]]] = {}
        self.reversibility: dict[str, dict[str, list[torch.Tensor]]] = {}
        self.feature_rows = 0
        self.count = 0


def append_nested(store: dict, keys: Sequence[str], value: torch.Tensor) -> None:
    """Append a detached CPU copy of ``value`` to the list at ``store[keys[0]]...[keys[-1]]``, creating the levels.

    Example::

        store = {}
        append_nested(store, ["soft", "sex"], torch.ones(2))  # store == {"soft": {"sex": [tensor([1., 1.])]}}
    """
    for key in keys[:-1]:
        store = store.setdefault(key, {})
    store.setdefault(keys[-1], []).append(value.detach().cpu())


def cat_values(values: Mapping[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate each list of tensors: ``{name: [t1, t2]} -> {name: cat([t1, t2])}``.

    Example::

        cat_values({"sex": [torch.zeros(2), torch.ones(1)]})  # {"sex": tensor([0., 0., 1.])}
    """
    return {k: torch.cat(v) for k, v in values.items()}


def mean_of(values: Sequence[torch.Tensor]) -> float:
    """The mean (in double precision) of a list of tensors taken together; NaN for an empty list.

    Example::

        mean_of([torch.zeros(2), torch.ones(2)])  # 0.5
    """
    return float(torch.cat(list(values)).double().mean()) if values else float("nan")


def finite_mean(values: Iterable[float]) -> float:
    """The mean of the finite values (``None``, NaN and infinities left out); NaN when none is left.

    Example::

        finite_mean([1.0, float("nan"), 3.0])  # 2.0
    """
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(kept)) if kept else float("nan")


def to_numpy(value: Any) -> np.ndarray:
    """A NumPy array of a tensor (detached, on the CPU) or of anything ``np.asarray`` takes.

    Example::

        to_numpy(torch.arange(3))  # array([0, 1, 2])
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def predict_in_chunks(
    predictor: nn.Module, x: torch.Tensor, chunk: int = PREDICT_CHUNK
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Features and head outputs of the evaluation predictor on ``x``, computed ``chunk`` images at a time.

    The heads are applied to the features (``heads_from_features``) when the predictor has it, else the
    predictor is called on the images.

    Args:
        predictor: ``features(x)`` and ``forward(x) -> {name: output}`` (an
            :class:`~monai_cf.networks.AttributePredictor`).
        x: ``(N, C, *spatial)`` images.
        chunk: images per call.

    Returns:
        ``(features (N, F), {name: (N, ...)})``, detached.

    Example::

        features, outputs = predict_in_chunks(predictor, images)
    """
    features, outputs = [], []
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk]
        feat = predictor.features(part)
        if hasattr(predictor, "heads_from_features"):
            out = predictor.heads_from_features(feat)
        else:
            out = predictor(part)
        features.append(feat.detach())
        outputs.append({k: v.detach() for k, v in out.items()})
    merged = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
    return torch.cat(features), merged


def collect_dataset(
    data: Iterable | Mapping[str, Any], image_key: str, graph: CausalGraph, batch_size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """All images and canonical attributes of a dataset, on the CPU (the utility stage trains on them).

    Args:
        data: a re-iterable of dict batches (a ``DataLoader``) or a dict of arrays (see :class:`TensorBatches`).
        image_key: the image's key.
        graph: the causal graph: every attribute is collected, discrete ones as ``long``, others as ``float``.
        batch_size: batch size when ``data`` is a dict of arrays.

    Returns:
        ``(images (N, C, *spatial) float, {name: (N,)})``.

    Example::

        images, attributes = collect_dataset(DataLoader(train_set, batch_size=16), "image", graph, 16)
    """
    loader = TensorBatches(data, batch_size, image_key) if isinstance(data, Mapping) else data
    images, attributes = [], {n: [] for n in graph.attributes}
    for batch in loader:
        images.append(convert_to_tensor(batch[image_key], track_meta=False, wrap_sequence=True).float().cpu())
        for name in graph.attributes:
            value = torch.as_tensor(to_numpy(batch[name])).reshape(-1)
            attributes[name].append(value.long() if graph[name].is_discrete else value.float())
    if not images:
        raise ValueError("utility_data gave no batch.")
    return torch.cat(images), {n: torch.cat(v) for n, v in attributes.items()}
