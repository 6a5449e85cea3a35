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
"""Counterfactual augmentation of whole collated batches, in one network call, e.g. in an engine's ``prepare_batch``."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.engines.utils import PrepareBatch, default_prepare_batch
from monai.transforms import Randomizable
from monai.utils import convert_to_dst_type, convert_to_tensor, ensure_tuple

from monai_cf.graph import CausalGraph
from monai_cf.transforms.array import (
    BatchCounterfactual,
    InterventionSampler,
    canonical_intervention,
    check_scm,
    read_scalar,
    restore_batch,
)
from monai_cf.transforms.cache import CounterfactualCache
from monai_cf.transforms.dictionary import _copy, _suffixed, attribute_key_map

__all__ = ["CounterfactualBatchAugmenter"]

MODES = ("replace", "pair")


class CounterfactualBatchAugmenter(Randomizable, PrepareBatch):
    """The counterfactual transforms applied to a collated dictionary batch, with one image-model call per batch.

    Each sample gets its own intervention: a fixed ``do`` (as :class:`~monai_cf.transforms.Counterfactuald`) or,
    with ``attributes``, a random one drawn per sample as in :class:`~monai_cf.transforms.RandCounterfactuald`
    (a coin with probability ``prob``, one attribute, a value other than the sample's own). The draws are made
    sample by sample, in batch order, with the same calls on ``self.R`` as the dictionary transforms make, and
    each sample's counterfactual depends only on the sample, its intervention and its seed (see
    :class:`~monai_cf.transforms.BatchCounterfactual`). So for the same random state, augmenting a batch gives
    exactly what the dictionary transform gives sample by sample (images up to float rounding of batched
    convolutions), at a fraction of the cost.

    ``mode="replace"`` replaces the images and the attributes the interventions reach (like
    ``RandCounterfactuald``); ``mode="pair"`` adds ``key + cf_suffix`` views and attributes beside the real ones
    (like ``CounterfactualPaird``). ``pa_key`` is re-encoded for the samples that changed.

    Use it as a MONAI ``PrepareBatch``: calling it with ``(batchdata, device, non_blocking)`` moves the images to
    ``device``, augments, and hands the batch to ``prepare_batch`` (MONAI's ``default_prepare_batch`` unless given,
    e.g. :class:`monai_cf.engines.utils.CounterfactualPrepareBatch`). :meth:`augment` does the augmentation alone
    on a dictionary batch and returns the new dictionary.

    Args:
        scm: the :class:`~monai_cf.networks.DeepSCM` (kept on its device; images are moved to it and back).
        attributes: attributes for random interventions (give this or ``do``).
        do: a fixed intervention ``{attribute: value}`` (give this or ``attributes``).
        prob: per-sample probability of a counterfactual.
        values: ``{attribute: [values]}`` to draw from (random interventions).
        sampling: ``"uniform"`` or ``"mechanism"`` (random interventions), see
            :class:`~monai_cf.transforms.InterventionSampler`.
        mode: ``"replace"`` or ``"pair"``.
        image_keys: keys of the images, ``(B, C, *spatial)``.
        attribute_keys: ``{attribute: batch key}`` where they differ from the attribute names.
        pa_key: key of the encoded parents ``(B, parents_dim)``, updated when present (``None``: never).
        cf_suffix: suffix of the counterfactual keys in ``"pair"`` mode.
        posterior_mean: abduct the image latents by their posterior means.
        seed: mixed into the content-derived noise seeds of a fixed ``do`` (as ``Counterfactuald(seed=...)``).
        cache: an optional :class:`~monai_cf.transforms.CounterfactualCache`; only the misses go to the network.
        id_key: a batch key holding stable sample ids for the cache (only if the images never change for an id);
            default: a digest of each image and its attributes.
        prepare_batch: what to hand the augmented batch to when used as a ``PrepareBatch``.

    Raises:
        ValueError: at construction, for an unknown attribute, an invalid value, or a bad ``mode``.

    Example::

        augment = CounterfactualBatchAugmenter(scm, attributes=["sex", "race", "age"], prob=0.5,
                                               prepare_batch=CounterfactualPrepareBatch("mimic_cxr"))
        augment.set_random_state(seed=0)
        trainer = SupervisedTrainer(..., prepare_batch=augment)   # or HVAETrainer / any MONAI engine
        batch = augment.augment(next(iter(loader)))               # the augmentation alone
    """

    def __init__(
        self,
        scm: Any,
        attributes: Sequence[str] | str | None = None,
        do: Mapping[str, Any] | None = None,
        prob: float = 1.0,
        values: Mapping[str, Sequence[Any]] | None = None,
        sampling: str = "uniform",
        mode: str = "replace",
        image_keys: Sequence[Hashable] | Hashable = "image",
        attribute_keys: Mapping[str, Hashable] | None = None,
        pa_key: Hashable | None = "pa",
        cf_suffix: str = "_cf",
        posterior_mean: bool = True,
        seed: int = 0,
        cache: CounterfactualCache | None = None,
        id_key: Hashable | None = None,
        prepare_batch: Callable[..., Any] | None = None,
    ) -> None:
        self.scm = check_scm(scm)
        self.graph: CausalGraph = scm.graph
        if (attributes is None) == (do is None):
            raise ValueError("Give either attributes (random interventions) or do (a fixed intervention), not both.")
        self.sampler = None if attributes is None else InterventionSampler(scm, attributes, values, sampling)
        self.do = None if do is None else canonical_intervention(scm, do)
        if self.do is not None and not self.do:
            raise ValueError("do must set at least one attribute, e.g. do={'sex': 'female'}.")
        if values is not None and self.sampler is None:
            raise ValueError("values only applies to random interventions (attributes=...).")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if mode == "pair" and (not isinstance(cf_suffix, str) or not cf_suffix):
            raise ValueError(f"cf_suffix must be a non-empty string, got {cf_suffix!r}.")
        self.prob = min(max(float(prob), 0.0), 1.0)
        self.mode = mode
        self.image_keys = ensure_tuple(image_keys)
        if not self.image_keys:
            raise ValueError("image_keys must name at least one image.")
        self.attribute_keys = attribute_key_map(self.graph, attribute_keys)
        self.pa_key = pa_key
        self.cf_suffix = cf_suffix
        self.id_key = id_key
        self.counterfactual = BatchCounterfactual(scm, posterior_mean=posterior_mean, seed=seed, cache=cache)
        self.prepare_batch = prepare_batch if prepare_batch is not None else default_prepare_batch
        #: per sample, the canonical intervention of the last batch (``None``: left unchanged).
        self.last_interventions: list[dict[str, int | float] | None] = []
        self._plans: list[tuple[dict[str, int | float] | None, int | None]] = []

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> CounterfactualBatchAugmenter:
        super().set_random_state(seed, state)
        return self

    def randomize(self, data: Sequence[Mapping[str, int | float]]) -> None:
        """Draw the interventions of a batch from ``self.R``, given each sample's canonical attributes."""
        plans: list[tuple[dict[str, int | float] | None, int | None]] = []
        for current in data:
            if not self.R.rand() < self.prob:
                plans.append((None, None))
            elif self.sampler is None:
                plans.append((dict(self.do or {}), None))
            else:
                plans.append(self.sampler.draw(current, self.R))
        self._plans = plans

    def augment(self, batch: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """The augmented copy of a collated dictionary batch."""
        if not isinstance(batch, Mapping):
            raise ValueError(f"{type(self).__name__} expects a dictionary batch, got {type(batch).__name__}.")
        missing = [k for k in (*self.image_keys, *self.attribute_keys.values()) if k not in batch]
        if missing:
            raise ValueError(f"Keys {missing} are missing from the batch; got {sorted(map(str, batch))}.")
        size = int(np.shape(batch[self.image_keys[0]])[0])
        named = {name: batch[key] for name, key in self.attribute_keys.items()}
        canonical = self.counterfactual.canonical_attributes(named, size)
        self.randomize([{n: canonical[n][i].item() for n in self.graph.attributes} for i in range(size)])
        interventions = [plan[0] for plan in self._plans]
        seeds = [plan[1] for plan in self._plans]
        self.last_interventions = [None if do is None else dict(do) for do in interventions]
        d = dict(batch)
        suffix = self.cf_suffix if self.mode == "pair" else ""
        result = None
        for key in self.image_keys:
            ids = None
            if self.id_key is not None:
                ids = [f"{read_scalar(v)}|{key}" for v in _rows(batch[self.id_key], size)]
            if result is None:
                result = self.counterfactual(batch[key], canonical, interventions, seeds, ids)
                d[_suffixed(key, suffix)] = result.images
                continue
            # Further image keys: the first key's counterfactual attributes as joint interventions, so every
            # image of a sample shows the same descendants' draw.
            joint = [
                None
                if do is None
                else {n: result.attributes[n][i].item() for n in self.graph.attributes if result.affected[n][i]}
                for i, do in enumerate(interventions)
            ]
            d[_suffixed(key, suffix)] = self.counterfactual(batch[key], canonical, joint, seeds, ids).images
        assert result is not None
        changed = torch.zeros(size, dtype=torch.bool)
        for name, key in self.attribute_keys.items():
            mask = result.affected[name].cpu()
            changed |= mask
            if bool(mask.any()):
                d[_suffixed(key, suffix)] = restore_batch(result.attributes[name], mask, batch[key], self.graph, name)
            elif suffix:
                d[_suffixed(key, suffix)] = _copy(batch[key])
        if self.pa_key is not None and self.pa_key in batch:
            d[_suffixed(self.pa_key, suffix)] = self._parents(batch[self.pa_key], result.attributes, changed)
        return d

    def _parents(self, pa: Any, attributes: Mapping[str, torch.Tensor], changed: torch.Tensor) -> Any:
        encoder = self.scm.encoder
        parents = self.graph.image_parents
        vector = encoder.parents_vector(encoder.encode({p: attributes[p].cpu() for p in parents}, names=parents))
        plain = convert_to_tensor(pa, wrap_sequence=True, track_meta=False)
        result = plain.clone()
        result[changed.to(result.device)] = vector[changed].to(result)
        return convert_to_dst_type(result, dst=pa)[0] if isinstance(pa, np.ndarray) else result

    def __call__(
        self,
        batchdata: Mapping[Hashable, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Augment the batch on ``device`` and return ``prepare_batch(augmented, device, non_blocking, **kwargs)``."""
        if not isinstance(batchdata, Mapping):
            raise ValueError(f"{type(self).__name__} expects a dictionary batch, got {type(batchdata).__name__}.")
        batch = dict(batchdata)
        if device is not None:
            for key in self.image_keys:
                if isinstance(batch.get(key), torch.Tensor):
                    batch[key] = batch[key].to(device=device, non_blocking=non_blocking)
        return self.prepare_batch(self.augment(batch), device, non_blocking, **kwargs)


def _rows(values: Any, size: int) -> list[Any]:
    if isinstance(values, torch.Tensor | np.ndarray):
        return [values[i] for i in range(size)]
    rows = list(values)
    if len(rows) != size:
        raise ValueError(f"The id key has {len(rows)} entries for a batch of {size}.")
    return rows
