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
"""The deep structural causal model: graph + attribute mechanisms + image mechanism."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.utils.module import locate
from torch import nn

from monai_cf.data.encoding import AttributeEncoder
from monai_cf.graph import CausalGraph
from monai_cf.networks.nets.diffusion import DiffusionImageMechanism
from monai_cf.networks.nets.hvae import HVAE
from monai_cf.networks.nets.image_mechanism import check_image_mechanism
from monai_cf.networks.nets.mechanisms import build_mechanisms, counterfactual_all, log_prob_all, sample_all

__all__ = ["DeepSCM", "build_image_model"]

Intervention = Mapping[str, Any]


class DeepSCM(nn.Module):
    """A deep structural causal model over a :class:`~monai_cf.graph.CausalGraph` and an image.

    Counterfactuals follow abduction, action, prediction: the exogenous noise of every attribute (flow
    noise, posterior Gumbels) and of the image (HVAE latents and pixel noise) is inferred from the factual
    sample, the intervened attributes are set, their descendants are recomputed in topological order from
    their noise, attributes that do not descend from an intervention keep their values exactly, and the
    image is decoded from its abducted noise under the counterfactual parents.

    Attribute values go in and come out *canonical*: class indices for discrete attributes, original units
    for continuous ones (see :class:`~monai_cf.data.AttributeEncoder`); intervention values may also be
    class names (``do={"sex": "female"}``). Images go in and come out in ``image_range`` (``[0, 1]``, the
    range of monai_cf's data pipeline); the HVAE sees them mapped to ``[-1, 1]``.

    Args:
        graph: the causal graph (a :class:`CausalGraph`, its config dict, or a shipped graph's name).
        image_model: the image mechanism, an :class:`~monai_cf.networks.nets.HVAE` or a
            :class:`~monai_cf.networks.nets.DiffusionImageMechanism` whose ``parents_dim`` equals
            ``graph.parents_dim``; a mapping is taken as HVAE keyword arguments (``parents_dim`` is filled in from
            the graph), or, with ``mechanism: diffusion``, as diffusion keyword arguments (``parent_dims`` filled in
            with the graph's image parents and their widths).
        mechanisms: one mechanism per attribute; ``None`` builds them with
            :func:`~monai_cf.networks.nets.build_mechanisms` (``mechanism_kwargs`` passed on).
        image_range: ``(low, high)`` of the images the model is given and returns.
        value_maps: raw-value maps for intervention values, as in :class:`AttributeEncoder`.
        mechanism_kwargs: keyword arguments of ``build_mechanisms`` when ``mechanisms`` is ``None``.

    Example::

        scm = DeepSCM("mimic_cxr", image_model={"spatial_dims": 2, "in_channels": 1, "spatial_size": 32})
        x = torch.rand(4, 1, 32, 32)
        pa = {"sex": [0, 1, 0, 1], "race": [0, 2, 1, 0], "age": [60.0, 45.0, 70.0, 30.0], "disease": [1, 0, 0, 1]}
        x_cf, pa_cf = scm.counterfactual(x, pa, do={"sex": "female"})
        pa_cf["sex"]  # tensor([1, 1, 1, 1]); race, age and disease unchanged
    """

    def __init__(
        self,
        graph: CausalGraph | Mapping | str,
        image_model: HVAE | DiffusionImageMechanism | Mapping[str, Any],
        mechanisms: nn.ModuleDict | Mapping[str, nn.Module] | None = None,
        image_range: Sequence[float] = (0.0, 1.0),
        value_maps: Mapping[str, Mapping] | None = None,
        mechanism_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.graph = CausalGraph.build(graph)
        self.encoder = AttributeEncoder(self.graph, value_maps=value_maps)
        if isinstance(image_model, Mapping):
            image_model = build_image_model(self.graph, image_model)
        if not isinstance(image_model, (HVAE, DiffusionImageMechanism)):
            check_image_mechanism(image_model)  # a user's network stands in for the HVAE: it must offer as much
        if image_model.parents_dim != self.graph.parents_dim:
            raise ValueError(
                f"image_model.parents_dim={image_model.parents_dim} but the graph's image parents "
                f"{list(self.graph.image_parents)} encode to {self.graph.parents_dim} values."
            )
        names = getattr(image_model, "parent_names", None)
        if names is not None and tuple(names) != tuple(self.graph.image_parents):
            raise ValueError(
                f"The image model was trained on the image parents {list(names)}, but the graph's are "
                f"{list(self.graph.image_parents)}: a model of another graph."
            )
        self.image_model = image_model
        if mechanisms is None:
            mechanisms = build_mechanisms(self.graph, **dict(mechanism_kwargs or {}))
        self.mechanisms = mechanisms if isinstance(mechanisms, nn.ModuleDict) else nn.ModuleDict(dict(mechanisms))
        missing = [n for n in self.graph.attributes if n not in self.mechanisms]
        if missing:
            raise ValueError(f"Mechanisms are missing for attributes {missing}.")
        low, high = (float(v) for v in image_range)
        if not low < high:
            raise ValueError(f"image_range must be (low, high) with low < high, got {image_range}.")
        self.image_range = (low, high)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DeepSCM:
        """Build from a plain dictionary (e.g. a bundle config section).

        Keys: ``graph`` (name or dict), ``image_model`` (HVAE keyword arguments, or ``{"preset": name, ...}``
        for :meth:`HVAE.from_preset`, or ``{"mechanism": "diffusion", ...}`` for a
        :class:`~monai_cf.networks.nets.DiffusionImageMechanism`), and optionally ``image_range``, ``value_maps``,
        ``mechanism_kwargs``.
        """
        config = copy.deepcopy(dict(config))
        unknown = set(config) - {"graph", "image_model", "image_range", "value_maps", "mechanism_kwargs"}
        if unknown:
            raise ValueError(f"Unknown DeepSCM config keys {sorted(unknown)}.")
        if "graph" not in config or "image_model" not in config:
            raise ValueError(f"A DeepSCM config needs 'graph' and 'image_model'; got keys {sorted(config)}.")
        graph = CausalGraph.build(config.pop("graph"))
        return cls(graph, build_image_model(graph, config.pop("image_model")), **config)

    # ------------------------------------------------------------------------------------------ conversions
    def to_model_range(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.image_range
        return (x - low) * (2.0 / (high - low)) - 1.0

    def from_model_range(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.image_range
        return (x + 1.0) * ((high - low) / 2.0) + low

    def canonical_batch(self, name: str, values: Any, batch: int | None = None) -> torch.Tensor:
        """Canonical values of one attribute as a ``(B,)`` tensor, validated (range, classes).

        ``values`` may be a scalar (broadcast to ``batch``), a sequence or array of raw values, or a tensor of
        canonical values.
        """
        var = self.graph[name]
        dtype = torch.float32 if not var.is_discrete else torch.long
        if isinstance(values, torch.Tensor) or (isinstance(values, np.ndarray) and values.dtype.kind in "biuf"):
            tensor = torch.as_tensor(values).reshape(-1)
            if var.is_discrete:
                bad = (tensor < 0) | (tensor >= var.num_classes) | (tensor != tensor.round())
                kind = f"a class index 0..{var.num_classes - 1} of {list(var.class_names)}"
            else:
                low, high = var.value_range  # type: ignore[misc]
                bad = ~((tensor >= low) & (tensor <= high))
                kind = f"within [{low}, {high}]"
            if bool(bad.any()):
                raise ValueError(f"'{name}' values {tensor[bad].tolist()[:5]} are not {kind}.")
            tensor = tensor.to(dtype)
        else:
            items = [values] if isinstance(values, (str, int, float, np.generic)) else list(values)
            tensor = torch.tensor([self.encoder.canonical(name, v) for v in items], dtype=dtype)
        if batch is not None and tensor.numel() == 1 and batch != 1:
            tensor = tensor.expand(batch)
        if batch is not None and tensor.numel() != batch:
            raise ValueError(f"'{name}' has {tensor.numel()} values for a batch of {batch}.")
        return tensor

    def encode_attributes(
        self, values: Mapping[str, Any], batch: int | None = None, device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """Encode canonical (or raw) values of every attribute of the graph into network inputs."""
        missing = [n for n in self.graph.attributes if n not in values]
        if missing:
            raise ValueError(f"Attributes {missing} are missing; got {sorted(values)}.")
        canonical = {n: self.canonical_batch(n, values[n], batch) for n in self.graph.attributes}
        device = device or self._device
        return {n: self.encoder.encode_attribute(n, v).to(device) for n, v in canonical.items()}

    def parents_vector(self, encoded: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The HVAE's ``pa`` input from encoded attributes."""
        return self.encoder.parents_vector(encoded)

    # ------------------------------------------------------------------------------------------ the model
    def counterfactual(
        self,
        x: torch.Tensor,
        pa: Mapping[str, Any],
        do: Intervention | Sequence[Intervention],
        do_mask: Mapping[str, torch.Tensor] | None = None,
        posterior_mean: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        """Counterfactual images and attributes of a batch under an intervention.

        Args:
            x: images ``(B, C, *spatial)`` in ``image_range``.
            pa: the factual value of every attribute: ``{name: (B,) canonical values}`` (tensors, lists).
            do: ``{name: value}``; a value is a scalar (same for the whole batch) or ``B`` per-sample values,
                raw or canonical. Several attributes in one mapping form one joint intervention; a list of
                mappings gives several counterfactuals of the batch from one abduction of the image.
            do_mask: optional ``{name: (B,) bool}``: apply ``do[name]`` only to those samples.
            posterior_mean: abduct the image latents by their posterior means (deterministic counterfactuals);
                ``False`` draws them from the posterior.
            generator: random generator for the posterior Gumbel noise of discrete descendants.

        Returns:
            ``(x_cf, pa_cf)``: images in ``image_range`` and canonical attributes ``{name: (B,)}``; for a list
            of interventions, lists of both in the same order.
        """
        many = not isinstance(do, Mapping)
        interventions = list(do) if many else [do]
        if not interventions:
            raise ValueError("No intervention given.")
        batch = x.shape[0]
        encoded = self.encode_attributes(pa, batch, x.device)
        canonical = {n: self.canonical_batch(n, pa[n], batch).to(x.device) for n in self.graph.attributes}
        encoded_cf = [
            self.intervene_encoded(encoded, intervention, batch, do_mask, generator) for intervention in interventions
        ]
        pa_vec = self.parents_vector(encoded)
        pa_cf_vec = torch.stack([self.parents_vector(e) for e in encoded_cf])
        extra = {}
        if getattr(self.image_model, "uses_intervention_groups", False):
            extra["intervened"] = torch.stack(
                [self.intervened_groups(intervention, batch, do_mask) for intervention in interventions]
            ).to(x.device)
        x_cf = self.image_model.counterfactual(
            self.to_model_range(x), pa_vec, pa_cf_vec, posterior_mean=posterior_mean, **extra
        )
        x_cf = self.from_model_range(x_cf)
        pa_cf = [
            self._decode_changed(e, canonical, intervention, batch, do_mask)
            for e, intervention in zip(encoded_cf, interventions)
        ]
        if many:
            return list(x_cf.unbind(0)), pa_cf
        return x_cf[0], pa_cf[0]

    def intervened_groups(
        self, do: Intervention, batch: int, do_mask: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``(B, A)`` bool over the image parents: what ``do`` sets in each sample, and the descendants of that.

        The invariant group is the complement. Under ``do_mask`` a sample's group holds only the attributes set in
        it (and their descendants).
        """
        do = self.graph.check_intervention(do)
        parents = list(self.graph.image_parents)
        groups = torch.zeros(batch, len(parents), dtype=torch.bool)
        for name in do:
            active = torch.ones(batch, dtype=torch.bool)
            mask = (do_mask or {}).get(name)
            if mask is not None:
                active = torch.as_tensor(mask, dtype=torch.bool).reshape(-1).cpu().expand(batch)
            for member in {name} | self.graph.descendants([name]):
                if member in parents:
                    groups[:, parents.index(member)] |= active
        return groups

    def intervene_encoded(
        self,
        encoded: Mapping[str, torch.Tensor],
        do: Intervention,
        batch: int,
        do_mask: Mapping[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Attribute part of a counterfactual in encoded space: set ``do``, recompute descendants."""
        do = self.graph.check_intervention(do)
        device = next(iter(encoded.values())).device
        do_encoded = {
            n: self.encoder.encode_attribute(n, self.canonical_batch(n, v, batch)).to(device) for n, v in do.items()
        }
        return counterfactual_all(self.mechanisms, self.graph, encoded, do_encoded, do_mask, generator)

    @torch.no_grad()
    def sample(
        self, n: int, t: float = 1.0, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Draw ``n`` patients from the model: attributes from the mechanisms, images from the HVAE prior.

        Returns ``(images in image_range, canonical attributes)``; images are the likelihood means.
        """
        encoded = sample_all(self.mechanisms, self.graph, n, generator=generator)
        images = self.image_model.sample(self.parents_vector(encoded), t=t)
        return self.from_model_range(images), self.encoder.decode(encoded)

    def attribute_log_prob(self, pa: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Log-likelihood ``(B,)`` of each attribute under its mechanism (the mechanisms' training objective)."""
        encoded = self.encode_attributes(pa)
        return log_prob_all(self.mechanisms, self.graph, encoded)

    def elbo(self, x: torch.Tensor, pa: Mapping[str, Any], **kwargs: Any) -> dict[str, torch.Tensor]:
        """The image mechanism's ELBO terms for images in ``image_range`` and canonical attributes."""
        encoded = self.encode_attributes(pa, x.shape[0], x.device)
        return self.image_model.elbo(self.to_model_range(x), self.parents_vector(encoded), **kwargs)

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def _device(self) -> torch.device:
        return next(self.image_model.parameters()).device

    def _decode_changed(
        self,
        encoded_cf: Mapping[str, torch.Tensor],
        canonical: Mapping[str, torch.Tensor],
        do: Intervention,
        batch: int,
        do_mask: Mapping[str, torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        # Values are returned bit-identical where they are known exactly (untouched or set by do), and
        # decoded from the encoding only for recomputed descendants.
        descendants = self.graph.descendants(list(do))
        result = {}
        for name in self.graph.attributes:
            value = canonical[name].clone()
            if name in descendants:
                value = self.encoder.decode_attribute(name, encoded_cf[name]).to(value)
            if name in do:
                target = self.canonical_batch(name, do[name], batch).to(value)
                mask = (do_mask or {}).get(name)
                value = target if mask is None else torch.where(torch.as_tensor(mask).to(value.device), target, value)
            result[name] = value
        return result


def build_image_model(graph: CausalGraph, config: Mapping[str, Any]) -> nn.Module:
    """The image mechanism a DeepSCM config describes, its parents filled in from ``graph``.

    ``config`` holds HVAE keyword arguments, ``{"preset": name, ...}`` (:meth:`HVAE.from_preset`),
    ``{"mechanism": "diffusion", ...}`` (:class:`DiffusionImageMechanism` keyword arguments), or a bundle-style
    ``{"_target_": "my_package.MyNetwork", ...}``: any HVAE-like network (see
    :func:`~monai_cf.networks.nets.check_image_mechanism`), given ``parents_dim`` from the graph when it takes
    that argument and the config does not set it.
    """
    config = dict(config)
    if "_target_" in config:
        target = config.pop("_target_")
        component = locate(target) if isinstance(target, str) else target
        if component is None:
            raise ValueError(f"image_model._target_ '{target}' cannot be imported.")
        if "parents_dim" not in config and "parents_dim" in inspect.signature(component).parameters:
            config["parents_dim"] = graph.parents_dim
        try:
            model = component(**config)
        except TypeError as error:
            raise TypeError(f"image_model._target_ '{target}': {error}") from None
        check_image_mechanism(model, f"image_model._target_ '{target}'")
        return model
    kind = config.pop("mechanism", "hvae")
    if kind == "diffusion":
        config.setdefault("parent_dims", {name: graph[name].dim for name in graph.image_parents})
        return DiffusionImageMechanism(**config)
    if kind != "hvae":
        raise ValueError(f"Unknown image mechanism '{kind}'; choose 'hvae' or 'diffusion'.")
    config.setdefault("parents_dim", graph.parents_dim)
    if "preset" in config:
        return HVAE.from_preset(config.pop("preset"), **config)
    return HVAE(**config)
