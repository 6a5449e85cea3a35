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
"""The counterfactual evaluator: every metric of the Soft-CFT paper over a test set, in one Ignite run.

:class:`CounterfactualEvaluator` is a MONAI :class:`~monai.engines.Evaluator`. Each iteration takes one test
batch, draws one force-change intervention per image parent and sample (the same draws for every
counterfactual type), generates the counterfactuals of every type in batched calls and accumulates what the
metrics need; when the epoch completes it computes effectiveness and amplification (Table 1), the log-odds
shift, composition, reversibility, ground-truth error on the phantom, embedding shift (Fig. 2), FID and,
optionally, the utility of counterfactuals as training data (Table 2). The results land in
``evaluator.results`` (nested, JSON-ready) and ``evaluator.state.metrics`` (flat scalars for MONAI handlers);
with ``output_dir`` a :class:`~monai_cf.handlers.report.CounterfactualReportWriter` writes ``metrics.json``,
``report.md`` and the figures, and logs them to MLflow.

The engine here runs the loop and puts the results together; the counterfactual calls, batching and
accumulators live in :mod:`monai_cf.engines.evaluation_runner`, the result sections' computations in
:mod:`monai_cf.engines.evaluation_sections`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.engines import Evaluator
from monai.networks.utils import eval_mode
from monai.utils import convert_to_tensor
from torch import nn

from monai_cf.engines.evaluation_runner import (
    CounterfactualRunner,
    EvaluationAccumulator,
    TensorBatches,
    append_nested,
    cat_values,
    collect_dataset,
    predict_in_chunks,
    to_numpy,
)
from monai_cf.engines.evaluation_sections import (
    composition_results,
    consistency_results,
    effectiveness_results,
    embedding_results,
    example_figure_data,
    faithfulness_results,
    ground_truth_results,
    realism_results,
    reversibility_results,
    utility_results,
)
from monai_cf.engines.predictor_trainer import train_attribute_predictor
from monai_cf.engines.runtime import tune_cpu_allocator
from monai_cf.graph import CausalGraph
from monai_cf.handlers.report import CounterfactualReportWriter, flatten_results
from monai_cf.metrics import (
    composition_distances,
    draw_intervention_values,
    image_similarity,
    l1_255,
    reversibility_distances,
)

__all__ = ["CounterfactualEvaluator"]

logger = logging.getLogger("monai_cf.engines")


class CounterfactualEvaluator(Evaluator):
    """Evaluate counterfactual functions of one or more CF types on a test set with an evaluation predictor.

    A *counterfactual function* is ``cf_fn(x, pa, do) -> (x_cf, pa_cf)`` with the calling convention of
    :meth:`monai_cf.networks.DeepSCM.counterfactual` (images in ``[0, 1]``, canonical attributes, ``do`` a dict
    ``{attribute: (B,) values}``); a :class:`~monai_cf.networks.DeepSCM` may be given directly (then all
    interventions of a batch share one abduction and one stacked decode, and its discrete descendants draw
    their posterior noise from the evaluator's seeded generator).

    Interventions force a change: binary attributes flip, categorical ones move uniformly to another class,
    continuous ones take a value of the test marginal (``intervention_pool``) more than ``min_gap`` of the
    range away. One draw per sample and image parent is shared by every CF type. Descendants are whatever
    the counterfactual function returns (``do(age)`` changes disease).

    Results (``evaluator.results``, fractions for AUCs, original units for MAEs):

    - ``baseline``: the predictor on real images; ``effectiveness[k][cf_type]``: on counterfactuals under
      ``do(k)`` with the counterfactual labels;
    - ``amplification[cf_type]``: mean ``AUC_cf - AUC_real`` over interventions ``k`` and discrete attributes of
      ``graph.soft_target_set([k])`` (terms in ``amplification_detail``); ``logit_shift[cf_type]``: the mean
      paired change of ``|log-odds|`` of those attributes (``logit_shift_detail``);
    - ``composition[cf_type]``: L1 (0-255) after 1 and 10 null interventions; ``reversibility[k][cf_type]``;
    - ``amplification_continuous[cf_type]``: the same for continuous attributes of the soft-target sets, as the
      mean change of their MAE in units of the real-image MAE (``amplification_continuous_detail``);
    - ``effectiveness_excess[k][cf_type]``: ``AUC_cf(k) - AUC_real(k)`` of the intervened attribute (positive:
      read more confidently than real images, an exaggeration), its relative MAE change if continuous;
    - ``ground_truth[k][cf_type]``: L1, PSNR, SSIM against the phantom's true counterfactual, and the
      agreement of recomputed descendants with the true ones (phantom data only);
    - ``faithfulness`` (phantom data only): ``unchanged_l1[k]``, the L1 of the unchanged image to the true
      counterfactual (the do-nothing baseline), ``truth_gain[k][cf_type]`` ``= 1 - L1(x*, x_true) / L1(x, x_true)``
      (ratio of means; positive: the edit moves toward the truth) and its mean over interventions
      ``truth_gain_mean[cf_type]``;
    - ``consistency``: counterfactual consistency (:func:`~monai_cf.metrics.counterfactual_consistency`): per
      intervention and attribute, the bounds that the graph and ``observational_data`` put on the probability
      that the attribute changes, that probability read from the counterfactual images (adjusted for the
      predictor's confusion on real images) and from the model's counterfactual attributes, the truth on the
      phantom, and whether each lies inside the bounds; ``outside`` counts the rows outside per CF type;
    - ``embedding_shift``: W1 distances between real and counterfactual predictor embeddings along the
      leading whitened PCA modes, per intervention, CF type, unintervened attribute and subgroup;
    - ``realism``: FID on predictor features; ``utility`` (only with ``utility_data``): Table 2;
    - ``timing``: total and per-stage seconds.

    Args:
        graph: the causal graph.
        data: the test data: a ``DataLoader`` (or any re-iterable) of dict batches with the image, every
            attribute's canonical ``(B,)`` values and, for ground truth, a ``noise`` dict or a ``row_key``; or a
            dict of arrays (``image`` ``(N, C, *spatial)``, attributes ``(N,)``, optional ``noise``), such as
            :meth:`SyntheticCXR.sample_batch` returns.
        predictor: the *evaluation* predictor: ``forward(x) -> {name: logits or (mean, log std)}`` and
            ``features(x)`` (an :class:`~monai_cf.networks.AttributePredictor`).
        counterfactual_fns: ``{cf type: cf_fn or DeepSCM}``, e.g. ``{"none": scm0, "hard": scm1, "soft": scm2}``.
        device: where to compute (default: the predictor's device).
        intervened: the attributes intervened on (default: the image parents).
        batch_size: batch size when ``data`` is a dict of arrays.
        phantom: a :class:`~monai_cf.data.SyntheticCXR` for ground-truth counterfactuals.
        phantom_noise: the test split's noise (:meth:`SyntheticCXR.read_noise`), looked up by ``row_key``.
        row_key: batch key of a sample's row in ``phantom_noise``; ``row_base`` is the first row's number
            (the CSV loader counts from 1).
        row_base: see ``row_key``.
        composition_cycles: numbers of null interventions for composition.
        reversibility: compute reversibility (one more counterfactual call per intervention).
        min_gap: smallest change of a continuous intervention, as a fraction of the range.
        intervention_pool: ``{attribute: values}`` continuous interventions draw from (default: the test
            data's values when known, else each batch's).
        num_modes: leading PCA modes of the embedding shift.
        max_feature_samples: embeddings (PCA, FID) use the first this many test samples (``None``: all).
        num_examples: patients shown in the counterfactual grids.
        utility_data: training data (same formats as ``data``) for the utility stage; ``None`` skips it.
        observational_data: canonical attribute values ``{name: (M,)}`` the consistency bounds are computed from
            (e.g. the training split's labels; default: the test labels).
        consistency: compute the counterfactual-consistency table.
        consistency_bins: quantile bins per continuous attribute in the consistency table.
        train_predictor_fn: ``(images, attributes) -> predictor`` for the utility stage (default:
            :func:`train_attribute_predictor`).
        output_dir: where a :class:`~monai_cf.handlers.report.CounterfactualReportWriter` writes the report.
        tracking_uri: MLflow tracking URI (``sqlite:///...``) for the report writer.
        run_id: MLflow run to log the report artifacts to (default: the active run, if any).
        seed: seeds the intervention draws, the DeepSCM generator and torch's global RNG during the run.
        val_handlers: further Ignite/MONAI handlers.
        image_key: the image's key (default: the graph's).

    Example::

        evaluator = CounterfactualEvaluator(
            graph, phantom.sample_batch(500), predictor, {"none": scm_none, "hard": scm_hard, "soft": scm_soft},
            phantom=phantom, output_dir="eval",
        )
        evaluator.run()
        evaluator.results["amplification"]  # {"none": ..., "hard": 0.03, "soft": 0.004}
    """

    def __init__(
        self,
        graph: CausalGraph | Mapping | str,
        data: Iterable | Mapping[str, Any],
        predictor: nn.Module,
        counterfactual_fns: Mapping[str, Any],
        device: torch.device | str | None = None,
        intervened: Sequence[str] | None = None,
        batch_size: int = 64,
        phantom: Any = None,
        phantom_noise: Mapping[str, Any] | None = None,
        row_key: str = "row",
        row_base: int = 1,
        composition_cycles: Sequence[int] = (1, 10),
        reversibility: bool = True,
        min_gap: float = 0.1,
        intervention_pool: Mapping[str, Sequence[float]] | None = None,
        num_modes: int = 3,
        max_feature_samples: int | None = 2000,
        num_examples: int = 4,
        utility_data: Iterable | Mapping[str, Any] | None = None,
        observational_data: Mapping[str, Sequence[float]] | None = None,
        consistency: bool = True,
        consistency_bins: int = 3,
        train_predictor_fn: Callable[[torch.Tensor, Mapping[str, torch.Tensor]], nn.Module] | None = None,
        output_dir: str | None = None,
        tracking_uri: str | None = None,
        run_id: str | None = None,
        seed: int = 0,
        val_handlers: Sequence | None = None,
        image_key: str | None = None,
    ) -> None:
        self.graph = CausalGraph.build(graph)
        self.image_key = image_key or self.graph.image_key
        if not counterfactual_fns:
            raise ValueError("counterfactual_fns is empty; give at least one {cf type: cf_fn}.")
        for cf_type, fn in counterfactual_fns.items():
            if not callable(fn) and not hasattr(fn, "counterfactual"):
                raise ValueError(f"counterfactual_fns['{cf_type}'] is a {type(fn).__name__}, not callable.")
        self.intervened = self.graph.check_names(
            list(intervened) if intervened is not None else self.graph.image_parents
        )
        if not self.intervened:
            raise ValueError("No attribute to intervene on.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if not 0.0 <= min_gap < 0.5:
            raise ValueError(f"min_gap must be a fraction of the range in [0, 0.5), got {min_gap}.")
        if phantom_noise is not None and phantom is None:
            raise ValueError("phantom_noise was given without the phantom that renders the true counterfactuals.")
        self.batch_size = int(batch_size)
        loader = TensorBatches(data, batch_size, self.image_key) if isinstance(data, Mapping) else data
        if device is None:
            params = list(predictor.parameters())
            device = params[0].device if params else torch.device("cpu")
        tune_cpu_allocator(device)
        super().__init__(device=device, val_data_loader=loader, decollate=False, val_handlers=val_handlers)
        self.predictor = predictor
        self.seed = int(seed)
        self.counterfactual_fns = dict(counterfactual_fns)
        self.phantom = phantom
        self.phantom_noise = None if phantom_noise is None else {k: np.asarray(v) for k, v in phantom_noise.items()}
        self.row_key, self.row_base = row_key, int(row_base)
        self.composition_cycles = sorted({int(m) for m in composition_cycles})
        self.compute_reversibility = bool(reversibility)
        self.min_gap = float(min_gap)
        self.intervention_pool = self._default_pool(data, intervention_pool)
        self.num_modes = int(num_modes)
        self.max_feature_samples = max_feature_samples
        self.num_examples = int(num_examples)
        self.utility_data = utility_data
        self.observational_data = self._check_observational(observational_data)
        self.compute_consistency = bool(consistency)
        self.consistency_bins = int(consistency_bins)
        if self.consistency_bins < 2:
            raise ValueError(f"consistency_bins must be at least 2, got {consistency_bins}.")
        self.train_predictor_fn = train_predictor_fn or functools.partial(
            train_attribute_predictor, graph=self.graph, seed=self.seed
        )
        self.results: dict[str, Any] = {}
        self.figure_data: dict[str, Any] = {}
        self._stage_seconds: dict[str, float] = {}
        self._started = 0.0
        self._acc = EvaluationAccumulator()
        self._examples: dict[str, Any] = {}
        self._rng = np.random.default_rng(self.seed)
        self._runners: dict[str, CounterfactualRunner] = {}
        self._renderers: dict[int, Any] = {}
        self.add_event_handler(Events.STARTED, self._reset)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._finalize)
        if output_dir is not None:
            CounterfactualReportWriter(output_dir, tracking_uri=tracking_uri, run_id=run_id).attach(self)

    # ------------------------------------------------------------------------------------------ running
    def run(self, global_epoch: int = 1) -> None:  # type: ignore[override]
        """Run the evaluation; torch's global RNG is seeded for the run and restored afterwards."""
        devices = [self.state.device] if self.state.device is not None and self.state.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            super().run(global_epoch)

    def _reset(self, engine: Any = None) -> None:
        self._acc = EvaluationAccumulator()
        self._examples = {}
        self._stage_seconds = {}
        self._rng = np.random.default_rng(self.seed)
        device = self.state.device or torch.device("cpu")
        generator = torch.Generator(device=device).manual_seed(self.seed)
        self._runners = {name: CounterfactualRunner(fn, generator) for name, fn in self.counterfactual_fns.items()}
        self._started = time.perf_counter()

    @contextlib.contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.state.device is not None and self.state.device.type == "cuda":
                torch.cuda.synchronize(self.state.device)
            self._stage_seconds[name] = self._stage_seconds.get(name, 0.0) + time.perf_counter() - start

    def _modules(self) -> list[nn.Module]:
        modules = [self.predictor]
        for runner in self._runners.values():
            modules += runner.modules
        return modules

    def _iteration(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        with self._stage("load"):
            x, pa, noise = self._parse_batch(batchdata)
        with eval_mode(*self._modules()):
            self._evaluate_batch(x, pa, noise)
        return {"batch_size": int(x.shape[0])}

    # ------------------------------------------------------------------------------------------ one batch
    def _evaluate_batch(self, x: torch.Tensor, pa: dict[str, torch.Tensor], noise: dict | None) -> None:
        acc = self._acc
        size = x.shape[0]
        first_batch = acc.count == 0
        keep = (
            size if self.max_feature_samples is None else max(0, min(size, self.max_feature_samples - acc.feature_rows))
        )
        with self._stage("predict_real"):
            features, outputs = self._predict(x)
        for name in self.graph.attributes:
            append_nested(acc.labels, [name], pa[name])
            if name in outputs:
                append_nested(acc.real_outputs, [name], outputs[name])
        if keep:
            acc.real_features.append(features[:keep].detach().cpu())

        with self._stage("draw_interventions"):
            dos = {}
            for k in self.intervened:
                pool = self.intervention_pool.get(k)
                if pool is None:
                    pool = pa[k].cpu().numpy()
                values = draw_intervention_values(self.graph, k, pa[k].cpu().numpy(), self._rng, pool, self.min_gap)
                dos[k] = torch.as_tensor(values).to(device=x.device, dtype=pa[k].dtype)
                append_nested(acc.interventions, [k], dos[k])

        truth: dict[str, tuple[torch.Tensor, dict[str, np.ndarray]]] = {}
        if noise is not None:
            with self._stage("ground_truth"):
                renderer = self._renderer(x)
                factual = {n: pa[n].cpu().numpy() for n in self.graph.attributes}
                factual["noise"] = noise
                for k in self.intervened:
                    cf = renderer.counterfactual_batch(factual, {k: dos[k].cpu().numpy()})
                    image = torch.from_numpy(cf[self.image_key]).to(device=x.device, dtype=x.dtype)
                    truth[k] = (image, {n: np.asarray(cf[n]) for n in self.graph.attributes})
                    for n in self.graph.attributes:
                        append_nested(acc.true_attributes, [k, n], torch.as_tensor(truth[k][1][n]))
                    append_nested(acc.unchanged_l1, [k], l1_255(x, image))
            if self.compute_consistency:
                with self._stage("consistency"):
                    _, true_outputs = self._predict(torch.cat([truth[k][0] for k in self.intervened]))
                    for index, k in enumerate(self.intervened):
                        for name, value in true_outputs.items():
                            append_nested(acc.true_outputs, [k, name], value[index * size : (index + 1) * size])

        for cf_type, runner in self._runners.items():
            with self._stage("counterfactuals"):
                forward = runner.many(x, pa, [{k: dos[k]} for k in self.intervened])
            with self._stage("predict_counterfactuals"):
                cf_features, cf_outputs = self._predict(torch.cat([xc for xc, _ in forward]))
            for index, (k, (x_cf, pa_cf)) in enumerate(zip(self.intervened, forward)):
                rows = slice(index * size, (index + 1) * size)
                for name in self.graph.attributes:
                    append_nested(acc.cf_labels, [cf_type, k, name], pa_cf[name])
                    if name in cf_outputs:
                        append_nested(acc.cf_outputs, [cf_type, k, name], cf_outputs[name][rows])
                if keep:
                    append_nested(acc.cf_features, [cf_type, k], cf_features[rows][:keep])
                if k in truth:
                    with self._stage("ground_truth"):
                        true_image, true_attributes = truth[k]
                        for metric, values in image_similarity(x_cf, true_image).items():
                            append_nested(acc.ground_truth, [k, cf_type, metric], values)
                        for d in sorted(self.graph.descendants([k])):
                            true_d = torch.as_tensor(true_attributes[d])
                            model_d = pa_cf[d].detach().cpu()
                            if self.graph[d].is_discrete:
                                agreement = (model_d.long() == true_d.long()).double()
                            else:
                                agreement = (model_d.double() - true_d.double()).abs()
                            append_nested(acc.descendants, [k, cf_type, d], agreement)
            if self.composition_cycles:
                with self._stage("composition"):
                    for m, distance in composition_distances(runner, x, pa, self.composition_cycles).items():
                        append_nested(acc.composition, [cf_type, str(m)], distance)
            if self.compute_reversibility:
                with self._stage("reversibility"):
                    for k, result in zip(self.intervened, forward):
                        distance = reversibility_distances(runner, x, pa, {k: dos[k]}, forward=result)
                        append_nested(acc.reversibility, [k, cf_type], distance)
            if first_batch and self.num_examples > 0:
                n = min(self.num_examples, size)
                self._examples.setdefault("counterfactuals", {})[cf_type] = {
                    k: xc[:n].detach().cpu() for k, (xc, _) in zip(self.intervened, forward)
                }
                self._examples.setdefault("labels", {})[cf_type] = {
                    k: {name: v[:n].detach().cpu() for name, v in pc.items()}
                    for k, (_, pc) in zip(self.intervened, forward)
                }
        if first_batch and self.num_examples > 0:
            n = min(self.num_examples, size)
            self._examples["images"] = x[:n].detach().cpu()
            self._examples["factual"] = {name: v[:n].detach().cpu() for name, v in pa.items()}
            self._examples["truth"] = {k: t[0][:n].detach().cpu() for k, t in truth.items()}
        acc.feature_rows += keep
        acc.count += size

    def _predict(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return predict_in_chunks(self.predictor, x)

    def _renderer(self, x: torch.Tensor) -> Any:
        if self.phantom is None:
            raise ValueError("Batches carry phantom noise but no phantom was given to render true counterfactuals.")
        size = int(x.shape[-1])
        if size == self.phantom.spatial_size:
            return self.phantom
        if size not in self._renderers:
            # rendering is a pure function of attributes and noise, so a phantom of any seed renders at this size
            self._renderers[size] = type(self.phantom)(spatial_size=size, seed=self.phantom.seed)
        return self._renderers[size]

    def _parse_batch(
        self, batch: Mapping[str, Any], with_noise: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict | None]:
        if not isinstance(batch, Mapping):
            raise ValueError(f"Test batches must be dictionaries, got {type(batch).__name__}.")
        if self.image_key not in batch:
            raise ValueError(f"A test batch has no '{self.image_key}' entry; keys: {sorted(batch)}.")
        x = batch[self.image_key]
        x = convert_to_tensor(x, track_meta=False, wrap_sequence=True).to(self.state.device).float()
        pa = {}
        for name in self.graph.attributes:
            if name not in batch:
                raise ValueError(f"A test batch lacks attribute '{name}'; keys: {sorted(batch)}.")
            value = batch[name]
            # a list of Python numbers goes through NumPy, as before: float64 before the cast, not float32
            value = convert_to_tensor(value if torch.is_tensor(value) else np.asarray(value), track_meta=False)
            dtype = torch.long if self.graph[name].is_discrete else torch.float32
            pa[name] = value.reshape(-1).to(device=self.state.device, dtype=dtype)
            if pa[name].numel() != x.shape[0]:
                raise ValueError(f"Attribute '{name}' has {pa[name].numel()} values for {x.shape[0]} images.")
        noise = None
        if not with_noise:
            pass
        elif "noise" in batch and isinstance(batch["noise"], Mapping) and self.phantom is not None:
            noise = {k: to_numpy(v) for k, v in batch["noise"].items() if k != "patient_id"}
        elif self.phantom_noise is not None:
            if self.row_key not in batch:
                raise ValueError(f"phantom_noise is given but a test batch has no '{self.row_key}' to look it up by.")
            rows = to_numpy(batch[self.row_key]).astype(np.int64).reshape(-1) - self.row_base
            size = len(self.phantom_noise["u_sex"])
            if rows.min() < 0 or rows.max() >= size:
                raise ValueError(f"Rows {rows.tolist()[:5]}... fall outside the {size} rows of phantom_noise.")
            noise = {k: v[rows] for k, v in self.phantom_noise.items() if k != "patient_id"}
        return x, pa, noise

    def _default_pool(self, data: Any, pool: Mapping[str, Sequence[float]] | None) -> dict[str, np.ndarray]:
        result = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in (pool or {}).items()}
        continuous = [k for k in self.intervened if not self.graph[k].is_discrete and k not in result]
        records = getattr(getattr(data, "dataset", None), "data", None)
        for k in continuous:
            if isinstance(data, Mapping) and k in data:
                result[k] = to_numpy(data[k]).astype(np.float64).reshape(-1)
            elif isinstance(records, Sequence) and records and isinstance(records[0], Mapping) and k in records[0]:
                result[k] = np.asarray([float(r[k]) for r in records])
        return result

    def _check_observational(self, data: Mapping[str, Sequence[float]] | None) -> dict[str, np.ndarray] | None:
        if data is None:
            return None
        missing = [n for n in self.graph.attributes if n not in data]
        if missing:
            raise ValueError(f"observational_data lacks attributes {missing}; it has {sorted(data)}.")
        arrays = {n: to_numpy(data[n]).reshape(-1) for n in self.graph.attributes}
        sizes = {n: v.size for n, v in arrays.items()}
        if len(set(sizes.values())) != 1 or not next(iter(sizes.values())):
            raise ValueError(f"observational_data needs one value per row for every attribute, got sizes {sizes}.")
        return arrays

    # ------------------------------------------------------------------------------------------ the metrics
    def _finalize(self, engine: Any = None) -> None:
        acc = self._acc
        if acc.count == 0:
            raise ValueError("The test data gave no batch to evaluate.")
        labels = cat_values(acc.labels)
        real_outputs = cat_values(acc.real_outputs)
        cf_types = list(self.counterfactual_fns)
        with self._stage("effectiveness"):
            effectiveness = effectiveness_results(self.graph, acc, self.intervened, cf_types, labels, real_outputs)
        results: dict[str, Any] = {
            "config": {
                "num_samples": acc.count,
                "cf_types": cf_types,
                "interventions": list(self.intervened),
                "attributes": list(self.graph.attributes),
                "image_parents": list(self.graph.image_parents),
                "attribute_kinds": {n: self.graph[n].kind for n in self.graph.attributes},
                "seed": self.seed,
                "min_gap": self.min_gap,
                "composition_cycles": self.composition_cycles,
            },
            **effectiveness,
            "composition": composition_results(acc, cf_types),
            "reversibility": reversibility_results(acc),
            "ground_truth": ground_truth_results(acc),
        }
        results["faithfulness"] = faithfulness_results(acc, results["ground_truth"], cf_types)
        if self.compute_consistency:
            with self._stage("consistency"):
                results["consistency"] = consistency_results(
                    self.graph,
                    acc,
                    self.intervened,
                    cf_types,
                    labels,
                    real_outputs,
                    self.observational_data,
                    self.consistency_bins,
                    self.seed,
                )
        with self._stage("embedding_shift"):
            results["embedding_shift"], embedding_figure = embedding_results(
                self.graph, acc, self.intervened, cf_types, labels, self.num_modes, self.seed
            )
            if embedding_figure is not None:
                self.figure_data["embedding"] = embedding_figure
        with self._stage("realism"):
            results["realism"] = realism_results(acc, self.intervened, cf_types)
        if self.utility_data is not None:
            with self._stage("utility"):
                images, attributes = collect_dataset(self.utility_data, self.image_key, self.graph, self.batch_size)
                results["utility"] = utility_results(
                    self.graph,
                    images,
                    attributes,
                    self._runners,
                    self._test_batches(),
                    self.train_predictor_fn,
                    self.intervened,
                    self.intervention_pool,
                    self.min_gap,
                    self.seed,
                    self.batch_size,
                    self.state.device,
                )
        else:
            results["utility"] = None
        self.figure_data["examples"] = example_figure_data(self.graph, self._examples)
        results["timing"] = {
            "total_s": time.perf_counter() - self._started,
            "stages": dict(self._stage_seconds),
            "images_per_s": None,
        }
        generated = acc.count * len(self.intervened) * len(cf_types)
        if self._stage_seconds.get("counterfactuals"):
            results["timing"]["images_per_s"] = generated / self._stage_seconds["counterfactuals"]
        self.results = results
        self.state.metrics.update(flatten_results(results))
        logger.info(
            "Counterfactual evaluation of %d samples: amplification %s",
            acc.count,
            {k: round(v, 4) for k, v in results["amplification"].items()},
        )

    def _test_batches(self) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """The test batches' images and attributes, without noise (a generator: loads only when iterated)."""
        for batch in self.data_loader:
            x, pa, _ = self._parse_batch(batch, with_noise=False)
            yield x, pa
