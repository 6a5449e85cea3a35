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
"""Dictionary-based counterfactual transforms: replace an image by its counterfactual, or add one beside it.

The data dictionaries are those of :func:`monai_cf.data.csv_dataset` (and :class:`monai_cf.data.SyntheticCXR`):
an image ``(C, *spatial)`` in ``[0, 1]``, one canonical value per attribute of the causal graph (class index or
number in original units) and, optionally, the encoded parents ``"pa"``. The transforms write the counterfactual
value of every attribute the intervention sets or recomputes (``do(age)`` also updates ``disease``) and
re-encode ``"pa"``; attributes the intervention does not reach are left untouched (the same objects).

The model runs where the transform runs, one sample at a time. On a GPU, or for speed, use the batched path
(:class:`~monai_cf.transforms.CounterfactualBatchAugmenter`) in the engine's ``prepare_batch`` instead: it gives
the same counterfactuals for the same random state, in one network call per batch.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

from monai_cf.graph import CausalGraph
from monai_cf.transforms.array import (
    BatchCounterfactual,
    InterventionSampler,
    canonical_intervention,
    check_scm,
    read_scalar,
    restore_value,
)
from monai_cf.transforms.cache import CounterfactualCache

__all__ = [
    "Counterfactuald",
    "RandCounterfactuald",
    "CounterfactualPaird",
    "CounterfactualD",
    "CounterfactualDict",
    "RandCounterfactualD",
    "RandCounterfactualDict",
    "CounterfactualPairD",
    "CounterfactualPairDict",
]


def attribute_key_map(graph: CausalGraph, attribute_keys: Mapping[str, Hashable] | None) -> dict[str, Hashable]:
    """``{attribute: data key}`` for every attribute of ``graph`` (default: the attribute's own name)."""
    keys: dict[str, Hashable] = {name: name for name in graph.attributes}
    if attribute_keys is not None:
        if not isinstance(attribute_keys, Mapping):
            raise ValueError(f"attribute_keys must map attribute names to data keys, got {attribute_keys!r}.")
        graph.check_names(list(attribute_keys))
        keys.update(attribute_keys)
    return keys


class _CounterfactualTransform(MapTransform):
    """Shared reading and writing of the counterfactual transforms."""

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        keys: KeysCollection,
        scm: Any,
        attribute_keys: Mapping[str, Hashable] | None,
        pa_key: Hashable | None,
        posterior_mean: bool,
        seed: int,
        cache: CounterfactualCache | None,
        id_key: Hashable | None,
        allow_missing_keys: bool,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.scm = check_scm(scm)
        self.graph: CausalGraph = scm.graph
        self.attribute_keys = attribute_key_map(self.graph, attribute_keys)
        self.pa_key = pa_key
        self.id_key = id_key
        self.counterfactual = BatchCounterfactual(scm, posterior_mean=posterior_mean, seed=seed, cache=cache)
        #: the canonical intervention applied by the last call (``None``: the sample was left unchanged).
        self.last_intervention: dict[str, int | float] | None = None
        #: the seed of the posterior noise of discrete descendants in the last call (``None``: not needed).
        self.last_seed: int | None = None

    def current_attributes(self, data: Mapping[Hashable, Any]) -> dict[str, int | float]:
        """Canonical value of every attribute of the sample (class index or float)."""
        missing = [key for key in self.attribute_keys.values() if key not in data]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs every attribute of the graph; missing keys {missing}, "
                f"got {sorted(map(str, data))}."
            )
        return {
            name: self.scm.canonical_batch(name, read_scalar(data[key]), 1).item()
            for name, key in self.attribute_keys.items()
        }

    def compute(
        self, d: Mapping[Hashable, Any], do: Mapping[str, Any], seed: int | None
    ) -> tuple[dict[Hashable, Any], dict[str, int | float], list[str]]:
        """Counterfactual images per image key, counterfactual attributes, and the attributes that changed."""
        current = self.current_attributes(d)
        attributes = {name: torch.tensor([value]) for name, value in current.items()}
        images: dict[Hashable, Any] = {}
        cf: dict[str, int | float] = dict(current)
        affected: list[str] = []
        for index, key in enumerate(self.key_iterator(d)):
            img = d[key]
            plain = convert_to_tensor(img, wrap_sequence=True, track_meta=False)
            sample_key = None if self.id_key is None else [f"{read_scalar(d[self.id_key])}|{key}"]
            # Further image keys get the first key's counterfactual attributes as a joint intervention, so
            # every image of the sample shows the same descendants' draw.
            do_key = do if index == 0 else {name: cf[name] for name in affected}
            result = self.counterfactual(plain.unsqueeze(0), attributes, [do_key], [seed], sample_key)
            images[key] = convert_to_dst_type(result.images[0], dst=img)[0]
            if index == 0:
                self.last_seed = result.seeds[0]
                cf = {name: value[0].item() for name, value in result.attributes.items()}
                affected = [name for name in self.graph.attributes if bool(result.affected[name][0])]
        return images, cf, affected

    def write_attributes(
        self, out: dict, d: Mapping[Hashable, Any], cf: Mapping[str, int | float], names: Sequence[str], suffix: str
    ) -> None:
        for name in names:
            key = self.attribute_keys[name]
            out[_suffixed(key, suffix)] = restore_value(cf[name], d[key], self.graph, name)

    def write_parents(self, out: dict, d: Mapping[Hashable, Any], cf: Mapping[str, int | float], suffix: str) -> None:
        if self.pa_key is None or self.pa_key not in d:
            return
        encoder = self.scm.encoder
        encoded = encoder.encode({p: [cf[p]] for p in self.graph.image_parents}, names=self.graph.image_parents)
        vector = encoder.parents_vector(encoded)[0].to(torch.float32)
        out[_suffixed(self.pa_key, suffix)] = convert_to_dst_type(vector, dst=d[self.pa_key])[0]


class Counterfactuald(_CounterfactualTransform):
    """Replace the images of ``keys`` by their counterfactuals under a fixed intervention ``do``.

    Attributes set by ``do`` and their descendants are written back (in the container and dtype they had), and
    ``pa_key`` is re-encoded when present. The posterior noise of discrete descendants (e.g. the disease under
    ``do(age)``) is seeded from ``seed`` and a digest of the sample, so the transform is a deterministic function
    of its input, and each sample gets its own draw. Runs under ``torch.no_grad()`` and ``eval_mode``; images
    keep their type (MetaTensor metadata included), dtype and shape.

    Args:
        keys: image keys (all get the same intervention).
        scm: the :class:`~monai_cf.networks.DeepSCM`.
        do: ``{attribute: value}``, values raw (``"female"``) or canonical (``1``, ``80.0``); several attributes
            form one joint intervention.
        attribute_keys: ``{attribute: data key}`` where they differ (default: the attribute names).
        pa_key: key of the encoded parents vector, re-encoded when present (``None``: never).
        posterior_mean: abduct the image latents by their posterior means (deterministic images).
        seed: mixed into the per-sample seeds of the posterior noise.
        cache: an optional :class:`~monai_cf.transforms.CounterfactualCache`.
        id_key: a data key holding a stable sample id for the cache (only if the image that reaches the transform
            is the same every time for an id); default: a digest of the image and attributes.
        allow_missing_keys: don't raise if an image key is missing.

    Raises:
        ValueError: at construction, for an attribute unknown to the graph or an invalid value.

    Example::

        to_female = Counterfactuald("image", scm, do={"sex": "female"})
        sample = to_female({"image": image, "sex": 0, "race": 2, "age": 63.0, "disease": 1, "pa": pa})
        sample["sex"]  # 1; "image" is the counterfactual, "pa" re-encoded
    """

    def __init__(
        self,
        keys: KeysCollection,
        scm: Any,
        do: Mapping[str, Any],
        attribute_keys: Mapping[str, Hashable] | None = None,
        pa_key: Hashable | None = "pa",
        posterior_mean: bool = True,
        seed: int = 0,
        cache: CounterfactualCache | None = None,
        id_key: Hashable | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, scm, attribute_keys, pa_key, posterior_mean, seed, cache, id_key, allow_missing_keys)
        self.do = canonical_intervention(scm, do)
        if not self.do:
            raise ValueError("do must set at least one attribute, e.g. do={'sex': 'female'}.")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.last_intervention, self.last_seed = None, None
        if self.first_key(d) == ():
            return d
        images, cf, affected = self.compute(d, self.do, None)
        d.update(images)
        self.write_attributes(d, data, cf, affected, "")
        self.write_parents(d, data, cf, "")
        self.last_intervention = dict(self.do)
        return d


class RandCounterfactuald(RandomizableTransform, _CounterfactualTransform):
    """With probability ``prob``, replace the images of ``keys`` by a counterfactual under a random intervention.

    The intervention sets one of ``attributes`` (drawn uniformly among those that can change) to a value other
    than the sample's own: from ``values[attribute]`` when given, else uniformly among the other classes of a
    discrete attribute or over a continuous attribute's range (``sampling="uniform"``), or from the attribute's
    mechanism given its parents (``sampling="mechanism"``); see :class:`~monai_cf.transforms.InterventionSampler`.
    Everything random (the coin, the attribute, the value, the seed of the ``torch.Generator`` for the posterior
    noise of discrete descendants) comes from ``self.R``, so :meth:`set_random_state` makes it reproducible. The
    attributes the intervention reaches are written back and ``pa_key`` re-encoded, as in :class:`Counterfactuald`;
    when the coin says no, the sample is returned unchanged (the same objects).

    Args:
        keys: image keys (all get the same intervention).
        scm: the :class:`~monai_cf.networks.DeepSCM`.
        attributes: the attributes that may be intervened on.
        prob: probability of applying a counterfactual.
        values: optional ``{attribute: [values]}`` to draw from, e.g. ``{"race": ["White", "Black"]}``.
        sampling: ``"uniform"`` or ``"mechanism"``, for attributes without ``values``.
        attribute_keys: ``{attribute: data key}`` where they differ.
        pa_key: key of the encoded parents vector, re-encoded when present (``None``: never).
        posterior_mean: abduct the image latents by their posterior means.
        cache: an optional :class:`~monai_cf.transforms.CounterfactualCache`; most useful with discrete attributes
            or a finite ``values`` set, where interventions repeat.
        id_key: a data key holding a stable sample id for the cache (only if the image that reaches the transform
            is the same every time for an id); default: a digest of the image and attributes.
        allow_missing_keys: don't raise if an image key is missing.

    Raises:
        ValueError: at construction, for an attribute unknown to the graph or an invalid entry of ``values``.

    Example::

        augment = RandCounterfactuald("image", scm, attributes=["sex", "race", "age"], prob=0.5)
        augment.set_random_state(seed=0)
        train_transforms = Compose([LoadGrayscaleImaged("image"), EncodeAttributesd("mimic_cxr"), augment])
    """

    def __init__(
        self,
        keys: KeysCollection,
        scm: Any,
        attributes: Sequence[str] | str,
        prob: float = 0.5,
        values: Mapping[str, Sequence[Any]] | None = None,
        sampling: str = "uniform",
        attribute_keys: Mapping[str, Hashable] | None = None,
        pa_key: Hashable | None = "pa",
        posterior_mean: bool = True,
        cache: CounterfactualCache | None = None,
        id_key: Hashable | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        _CounterfactualTransform.__init__(
            self, keys, scm, attribute_keys, pa_key, posterior_mean, 0, cache, id_key, allow_missing_keys
        )
        RandomizableTransform.__init__(self, prob)
        self.sampler = InterventionSampler(scm, attributes, values=values, sampling=sampling)
        self._intervention: dict[str, int | float] | None = None
        self._seed: int | None = None

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandCounterfactuald:
        super().set_random_state(seed, state)
        return self

    def randomize(self, data: Mapping[Hashable, Any]) -> None:
        super().randomize(None)
        self._intervention, self._seed = None, None
        if self._do_transform:
            self._intervention, self._seed = self.sampler.draw(self.current_attributes(data), self.R)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(d)
        self.last_intervention, self.last_seed = None, None
        if self._intervention is None or self.first_key(d) == ():
            return d
        images, cf, affected = self.compute(d, self._intervention, self._seed)
        d.update(images)
        self.write_attributes(d, data, cf, affected, "")
        self.write_parents(d, data, cf, "")
        self.last_intervention = dict(self._intervention)
        return d


class CounterfactualPaird(RandCounterfactuald):
    """Add a counterfactual view beside each real image, for counterfactual contrastive learning.

    For each image key ``k`` writes ``k + cf_suffix`` (e.g. ``"image_cf"``), a counterfactual of the sample under
    a random intervention drawn as in :class:`RandCounterfactuald`, and, for every attribute and ``pa_key``, the
    counterfactual version under ``key + cf_suffix`` (``"sex_cf"``, ..., ``"pa_cf"``), so each view has its
    labels. The real image and attributes are left untouched. With probability ``1 - prob`` the second view is
    a copy of the real one (CF-SimCLR uses ``prob=0.8``); both views then go through the usual augmentations.

    Args:
        keys: image keys.
        scm: the :class:`~monai_cf.networks.DeepSCM`.
        attributes: the attributes that may be intervened on (CF-SimCLR: the acquisition attributes, e.g. scanner).
        prob: probability that the second view is a counterfactual rather than a copy.
        values: optional ``{attribute: [values]}`` to draw from.
        sampling: ``"uniform"`` or ``"mechanism"``, for attributes without ``values``.
        attribute_keys: ``{attribute: data key}`` where they differ.
        pa_key: key of the encoded parents vector (``pa_key + cf_suffix`` is written when present).
        cf_suffix: suffix of the keys of the counterfactual view.
        posterior_mean: abduct the image latents by their posterior means.
        cache: an optional :class:`~monai_cf.transforms.CounterfactualCache` (precomputed views, as CF-SimCLR does
            offline).
        id_key: a data key holding a stable sample id for the cache (only if the image that reaches the transform
            is the same every time for an id); default: a digest of the image and attributes.
        allow_missing_keys: don't raise if an image key is missing.

    Example::

        pair = CounterfactualPaird("image", scm, attributes=["sex", "race"], prob=0.8)
        out = pair(sample)
        out["image"], out["image_cf"], out["race"], out["race_cf"]
    """

    def __init__(
        self,
        keys: KeysCollection,
        scm: Any,
        attributes: Sequence[str] | str,
        prob: float = 1.0,
        values: Mapping[str, Sequence[Any]] | None = None,
        sampling: str = "uniform",
        attribute_keys: Mapping[str, Hashable] | None = None,
        pa_key: Hashable | None = "pa",
        cf_suffix: str = "_cf",
        posterior_mean: bool = True,
        cache: CounterfactualCache | None = None,
        id_key: Hashable | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        if not isinstance(cf_suffix, str) or not cf_suffix:
            raise ValueError(f"cf_suffix must be a non-empty string, got {cf_suffix!r}.")
        super().__init__(
            keys,
            scm,
            attributes,
            prob,
            values,
            sampling,
            attribute_keys,
            pa_key,
            posterior_mean,
            cache,
            id_key,
            allow_missing_keys,
        )
        self.cf_suffix = cf_suffix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(d)
        self.last_intervention, self.last_seed = None, None
        if self._intervention is None:
            for key in self.key_iterator(d):
                d[_suffixed(key, self.cf_suffix)] = _copy(d[key])
            for key in self.attribute_keys.values():
                if key in d:
                    d[_suffixed(key, self.cf_suffix)] = _copy(d[key])
            if self.pa_key is not None and self.pa_key in d:
                d[_suffixed(self.pa_key, self.cf_suffix)] = _copy(d[self.pa_key])
            return d
        images, cf, affected = self.compute(d, self._intervention, self._seed)
        for key, image in images.items():
            d[_suffixed(key, self.cf_suffix)] = image
        for name in self.graph.attributes:
            if name not in affected:
                key = self.attribute_keys[name]
                d[_suffixed(key, self.cf_suffix)] = _copy(data[key])
        self.write_attributes(d, data, cf, affected, self.cf_suffix)
        self.write_parents(d, data, cf, self.cf_suffix)
        self.last_intervention = dict(self._intervention)
        return d


def _suffixed(key: Hashable, suffix: str) -> Hashable:
    return f"{key}{suffix}" if suffix else key


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    return list(value) if isinstance(value, list) else value


CounterfactualD = CounterfactualDict = Counterfactuald
RandCounterfactualD = RandCounterfactualDict = RandCounterfactuald
CounterfactualPairD = CounterfactualPairDict = CounterfactualPaird
