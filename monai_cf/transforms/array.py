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
"""Array-level counterfactual machinery shared by the dictionary transforms and the batch augmenter.

- :class:`InterventionSampler` draws a random single-attribute intervention for one sample, always to a value
  other than the sample's own, from a ``numpy.random.RandomState`` (a transform's ``self.R``).
- :class:`BatchCounterfactual` computes the counterfactuals of a batch in one image-model call, each sample
  with its own intervention (or none) and its own seed for the posterior noise of discrete descendants, so
  the result of a sample never depends on the other samples of its batch: a transform applied sample by
  sample and the batch augmenter applied to the collated batch give the same counterfactuals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.networks import eval_mode
from monai.utils import MAX_SEED, convert_to_tensor

from monai_cf.graph import CausalGraph
from monai_cf.interventions import allowed_values, draw_other_in_range
from monai_cf.networks.nets.mechanisms import parents_vector
from monai_cf.transforms.cache import CounterfactualCache, tensor_digest

__all__ = [
    "InterventionSampler",
    "BatchCounterfactual",
    "CounterfactualResult",
    "canonical_intervention",
    "affected_attributes",
    "check_scm",
]

SAMPLING_MODES = ("uniform", "mechanism")


def check_scm(scm: Any) -> Any:
    """``scm`` if it looks like a :class:`~monai_cf.networks.DeepSCM`, else ``ValueError``."""
    needed = ("graph", "encoder", "counterfactual", "intervene_encoded", "canonical_batch")
    missing = [name for name in needed if not hasattr(scm, name)]
    if missing or not isinstance(scm, torch.nn.Module):
        raise ValueError(
            f"scm must be a monai_cf.networks.DeepSCM (an nn.Module with graph, encoder and counterfactual), "
            f"got {type(scm).__name__}."
        )
    return scm


def canonical_intervention(scm: Any, do: Mapping[str, Any], what: str = "do") -> dict[str, int | float]:
    """Validate ``{attribute: value}`` (raw or canonical scalars) and return canonical Python scalars.

    Raises ``ValueError`` naming an unknown attribute or an invalid value.
    """
    if not isinstance(do, Mapping):
        raise ValueError(f"{what} must be a mapping {{attribute: value}}, got {do!r}.")
    graph: CausalGraph = scm.graph
    graph.check_names(list(do))
    result: dict[str, int | float] = {}
    for name, value in do.items():
        if isinstance(value, torch.Tensor | np.ndarray) and np.size(value) == 1:
            value = value.reshape(-1)[0].item()
        if not isinstance(value, str | int | float | np.generic):
            raise ValueError(f"{what}['{name}'] must be one value (a class name, index or number), got {value!r}.")
        try:
            tensor = scm.canonical_batch(name, value, 1)
        except ValueError as error:
            raise ValueError(f"Invalid {what} value for '{name}': {error}") from None
        result[name] = tensor.item()
    return result


def affected_attributes(graph: CausalGraph, do: Mapping[str, Any]) -> set[str]:
    """The attributes an intervention sets or recomputes: ``do``'s keys and their descendants."""
    return set(do) | graph.descendants(list(do)) if do else set()


class InterventionSampler:
    """Draws one random intervention per sample: one of ``attributes``, set to a value other than its own.

    Values come from ``values[name]`` when given (a subset of values to choose from; the sample's own value is
    left out), otherwise, with ``sampling="uniform"``, uniformly among the other classes of a discrete attribute
    or uniformly over a continuous attribute's range; with ``sampling="mechanism"``, from the attribute's
    mechanism given the sample's parents, ``p(a | pa(a))``, restricted to the other classes for a discrete
    attribute. An attribute whose allowed values are all equal to the sample's own is not drawn; if no listed
    attribute can change, :meth:`draw` returns ``(None, None)``.

    All randomness comes from the ``numpy.random.RandomState`` passed to :meth:`draw` (a transform's ``self.R``),
    including the seed returned for the posterior noise of discrete descendants.

    Args:
        scm: the :class:`~monai_cf.networks.DeepSCM` (its graph, encoder and, for ``"mechanism"``, mechanisms).
        attributes: the attributes to intervene on.
        values: optional ``{attribute: [values]}`` (raw or canonical) to draw from.
        sampling: ``"uniform"`` or ``"mechanism"``.

    Raises:
        ValueError: an attribute unknown to the graph, an empty list, an invalid value, an unknown ``sampling``.

    Example::

        sampler = InterventionSampler(scm, ["sex", "race"], values={"race": ["White", "Black"]})
        do, seed = sampler.draw({"sex": 0, "race": 0, "age": 60.0, "disease": 1}, np.random.RandomState(0))
        # e.g. ({'race': 2}, 1608637542): the only other allowed race
    """

    def __init__(
        self,
        scm: Any,
        attributes: Sequence[str] | str,
        values: Mapping[str, Sequence[Any]] | None = None,
        sampling: str = "uniform",
    ) -> None:
        self.scm = check_scm(scm)
        graph: CausalGraph = scm.graph
        attributes = [attributes] if isinstance(attributes, str) else list(attributes)
        if not attributes:
            raise ValueError("attributes must name at least one attribute to intervene on.")
        self.attributes = graph.check_names(attributes)
        if len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"attributes lists an attribute twice: {self.attributes}.")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}.")
        self.sampling = sampling
        self.values: dict[str, list[int | float]] = {}
        for name, options in (values or {}).items():
            if name not in self.attributes:
                graph.check_names([name])
                raise ValueError(f"values names '{name}', which is not in attributes {self.attributes}.")
            options = [options] if isinstance(options, str) or np.ndim(options) == 0 else list(options)
            if not options:
                raise ValueError(f"values['{name}'] is empty.")
            canonical = [canonical_intervention(scm, {name: v}, what="values")[name] for v in options]
            self.values[name] = list(dict.fromkeys(canonical))  # unique, in the given order

    def candidates(self, name: str, current: Any) -> list[int | float] | None:
        """The allowed values of ``name`` other than ``current``; ``None`` means "a whole range or class set"."""
        return allowed_values(self.scm.graph[name], current, self.values.get(name))

    def draw(
        self, current: Mapping[str, Any], rng: np.random.RandomState
    ) -> tuple[dict[str, int | float] | None, int | None]:
        """``({attribute: canonical value}, noise seed)`` for a sample with canonical values ``current``."""
        eligible = [name for name in self.attributes if self.candidates(name, current[name]) != []]
        if not eligible:
            return None, None
        name = eligible[int(rng.randint(len(eligible)))]
        value = self._draw_value(name, current, rng)
        seed = int(rng.randint(MAX_SEED))
        return {name: value}, seed

    def _draw_value(self, name: str, current: Mapping[str, Any], rng: np.random.RandomState) -> int | float:
        var = self.scm.graph[name]
        options = self.candidates(name, current[name])
        if self.sampling == "mechanism" and name not in self.values:
            return self._draw_from_mechanism(name, current, rng)
        if options is not None:
            return options[int(rng.randint(len(options)))]
        return draw_other_in_range(var, current[name], rng)

    def _draw_from_mechanism(self, name: str, current: Mapping[str, Any], rng: np.random.RandomState) -> int | float:
        scm, var = self.scm, self.scm.graph[name]
        mechanism = scm.mechanisms[name]
        with eval_mode(scm):
            encoded = scm.encode_attributes({n: [current[n]] for n in scm.graph.attributes}, 1)
            parents = parents_vector(scm.graph, name, encoded)
            if var.is_discrete:
                logits = mechanism.class_logits(parents, 1)[0].double()
                probs = torch.softmax(logits, dim=-1)
                probs[int(current[name])] = 0.0
                if not float(probs.sum()) > 0.0:  # the mechanism is certain of the current class: any other
                    probs = torch.ones_like(probs)
                    probs[int(current[name])] = 0.0
                probs = (probs / probs.sum()).cpu().numpy()
                return int(rng.choice(len(probs), p=probs))
            ref = next(mechanism.parameters())
            while True:
                noise = torch.tensor([[rng.standard_normal()]], dtype=ref.dtype, device=ref.device)
                value = float(scm.encoder.decode_attribute(name, mechanism.predict(noise, parents))[0])
                if value != current[name]:
                    return value


class CounterfactualResult(NamedTuple):
    """What :class:`BatchCounterfactual` returns.

    Attributes:
        images: ``(B, C, *spatial)``, same type, dtype and device as the input; samples without an intervention
            are copied bit for bit.
        attributes: canonical counterfactual attributes ``{name: (B,)}`` (``long`` class indices, ``float32``
            original units), on the images' device.
        affected: ``{name: (B,)}`` booleans: set by the sample's intervention or recomputed as a descendant.
        seeds: per sample, the seed of the posterior noise of discrete descendants, ``None`` where the sample
            had no intervention or was read from the cache.
    """

    images: torch.Tensor
    attributes: dict[str, torch.Tensor]
    affected: dict[str, torch.Tensor]
    seeds: list[int | None]


class BatchCounterfactual:
    """Counterfactuals of a batch under per-sample interventions, with one call of the image model.

    For each sample with an intervention, the attribute part runs alone (abduct, act, predict on the causal
    graph, with a ``torch.Generator`` seeded by the sample's seed for the posterior Gumbel noise of discrete
    descendants), which is cheap; then all counterfactual images are decoded in one
    :meth:`DeepSCM.counterfactual <monai_cf.networks.DeepSCM.counterfactual>` call whose ``do`` holds the
    per-sample counterfactual value of every affected attribute. A sample's result therefore depends only on
    the sample, its intervention and its seed, not on the rest of the batch. Runs under ``torch.no_grad()`` and
    ``monai.networks.eval_mode`` (the model's training flag is restored afterwards).

    Without ``seeds``, the seed of each sample is derived from ``seed`` and a digest of the sample (image and
    attributes), which makes the result a deterministic function of the sample. With ``posterior_mean=False``
    the image latents are drawn from the posterior under ``torch.random.fork_rng`` seeded from the samples'
    seeds (reproducible, global RNG untouched), and a sample then does depend on its batch.

    Args:
        scm: the :class:`~monai_cf.networks.DeepSCM`; it stays on its device and images are moved to it.
        posterior_mean: abduct the image latents by their posterior means (deterministic images).
        seed: mixed into the content-derived seeds.
        cache: an optional :class:`~monai_cf.transforms.CounterfactualCache` of precomputed results.

    Example::

        run = BatchCounterfactual(scm)
        result = run(images, {"sex": sex, "race": race, "age": age, "disease": disease},
                     interventions=[{"age": 80.0}, None, {"sex": 1}], seeds=[3, None, 5])
        result.images.shape, result.attributes["disease"], result.affected["disease"]  # disease: sample 0 only
    """

    def __init__(
        self, scm: Any, posterior_mean: bool = True, seed: int = 0, cache: CounterfactualCache | None = None
    ) -> None:
        self.scm = check_scm(scm)
        self.posterior_mean = bool(posterior_mean)
        self.seed = int(seed)
        if cache is not None and not isinstance(cache, CounterfactualCache):
            raise ValueError(f"cache must be a CounterfactualCache or None, got {type(cache).__name__}.")
        if cache is not None and cache.model is not scm:
            raise ValueError("The cache was built for another model; pass CounterfactualCache(cache_dir, scm).")
        self.cache = cache

    @property
    def graph(self) -> CausalGraph:
        return self.scm.graph

    def canonical_attributes(self, attributes: Mapping[str, Any], batch: int) -> dict[str, torch.Tensor]:
        """Canonical ``(B,)`` tensors of every attribute of the graph (raw values are parsed)."""
        missing = [n for n in self.graph.attributes if n not in attributes]
        if missing:
            raise ValueError(
                f"Counterfactuals need every attribute of the graph; missing {missing}, got {sorted(attributes)}."
            )
        return {n: self.scm.canonical_batch(n, _plain_values(attributes[n]), batch) for n in self.graph.attributes}

    def __call__(
        self,
        images: torch.Tensor,
        attributes: Mapping[str, Any],
        interventions: Sequence[Mapping[str, Any] | None] | Mapping[str, Any],
        seeds: Sequence[int | None] | None = None,
        sample_keys: Sequence[str] | None = None,
    ) -> CounterfactualResult:
        """Counterfactuals of ``images`` ``(B, C, *spatial)`` with factual ``attributes`` ``{name: (B,)}``.

        Args:
            images: a batch of images in the model's ``image_range`` (tensor, MetaTensor or numpy array).
            attributes: factual values of every attribute, canonical or raw, ``B`` per attribute.
            interventions: ``B`` entries: ``{attribute: value}`` or ``None`` for "leave this sample alone"; one
                mapping applies to every sample.
            seeds: ``B`` seeds for the posterior noise of discrete descendants; ``None`` entries (or no list)
                derive one from the sample's content.
            sample_keys: ``B`` stable sample ids for the cache (default: a digest of the image and attributes);
                only valid when the image an id reaches this call with never changes (no random transform
                before it).
        """
        plain = convert_to_tensor(images, wrap_sequence=True, track_meta=False)
        batch = int(plain.shape[0])
        if isinstance(interventions, Mapping):
            interventions = [interventions] * batch
        for name, given in (("interventions", interventions), ("seeds", seeds), ("sample_keys", sample_keys)):
            if given is not None and len(given) != batch:
                raise ValueError(f"{name} has {len(given)} entries for a batch of {batch}.")
        reference = next(self.scm.parameters())
        device, model_dtype = reference.device, reference.dtype
        canonical = {n: v.to(device) for n, v in self.canonical_attributes(attributes, batch).items()}
        x_model = plain.to(device=device, dtype=model_dtype)
        result_images = plain.clone()
        cf = {n: v.clone() for n, v in canonical.items()}
        affected = {n: torch.zeros(batch, dtype=torch.bool) for n in self.graph.attributes}
        active = [i for i in range(batch) if interventions[i]]
        plans = {i: canonical_intervention(self.scm, interventions[i]) for i in active}
        for i, do in plans.items():
            for name in affected_attributes(self.graph, do):
                affected[name][i] = True
        digests: dict[int, str] = {}

        def digest(i: int) -> str:
            if i not in digests:
                factual = tuple(canonical[n][i].item() for n in self.graph.attributes)
                digests[i] = tensor_digest([x_model[i]], extra=factual)
            return digests[i]

        with eval_mode(self.scm):
            todo = active
            cache_keys: dict[int, str] = {}
            folder = None
            if self.cache is not None:
                folder = self.cache.folder
                todo = []
                for i in active:
                    sample = f"id:{sample_keys[i]}" if sample_keys is not None else f"content:{digest(i)}"
                    factual = {n: canonical[n][i].item() for n in self.graph.attributes}
                    cache_keys[i] = self.cache.key(
                        sample, plans[i], factual=factual, posterior_mean=self.posterior_mean
                    )
                    entry = self.cache.load(cache_keys[i], folder)
                    if not _usable_entry(entry, plain.shape[1:], self.graph.attributes):
                        todo.append(i)
                        continue
                    result_images[i] = entry["image"].to(result_images)
                    for name in self.graph.attributes:
                        cf[name][i] = entry["attributes"][name].to(cf[name])
            sample_seeds: dict[int, int | None] = {}
            for i in todo:
                given = None if seeds is None else seeds[i]
                if given is not None:
                    sample_seeds[i] = int(given)
                elif not self.posterior_mean or self._needs_noise(plans[i]):
                    sample_seeds[i] = self._content_seed(digest(i))
                else:
                    sample_seeds[i] = None
                self._intervene_attributes(i, plans[i], canonical, cf, sample_seeds[i], device)
            if todo:
                index = torch.tensor(todo, device=device)
                changed = set().union(*(affected_attributes(self.graph, plans[i]) for i in todo))
                do_batch = {n: cf[n][index] for n in self.graph.attributes if n in changed}
                factual = {n: canonical[n][index] for n in self.graph.attributes}
                # The attribute part is already done per sample; this generator only keeps the global RNG untouched.
                quiet = torch.Generator(device=device).manual_seed(0)
                with self._latent_rng([sample_seeds[i] for i in todo], device):
                    x_cf, _ = self.scm.counterfactual(
                        x_model[index], factual, do_batch, posterior_mean=self.posterior_mean, generator=quiet
                    )
                result_images[index.to(result_images.device)] = x_cf.to(result_images)
                if self.cache is not None:
                    for row, i in enumerate(todo):
                        self.cache.save(cache_keys[i], x_cf[row], {n: cf[n][i] for n in self.graph.attributes}, folder)
        out_device = plain.device
        return CounterfactualResult(
            images=_like_input(result_images, images),
            attributes={n: v.to(out_device) for n, v in cf.items()},
            affected={n: v.to(out_device) for n, v in affected.items()},
            seeds=[sample_seeds.get(i) for i in range(batch)],
        )

    # ------------------------------------------------------------------------------------------ helpers
    def _content_seed(self, sample_digest: str) -> int:
        return int(tensor_digest([], extra=(self.seed, sample_digest), digest_size=8), 16) % MAX_SEED

    def _needs_noise(self, do: Mapping[str, Any]) -> bool:
        return any(self.graph[n].is_discrete for n in self.graph.descendants(list(do)) - set(do))

    def _intervene_attributes(
        self,
        i: int,
        do: Mapping[str, int | float],
        canonical: Mapping[str, torch.Tensor],
        cf: dict[str, torch.Tensor],
        seed: int | None,
        device: torch.device,
    ) -> None:
        for name, value in do.items():
            cf[name][i] = value
        descendants = self.graph.descendants(list(do)) - set(do)
        if not descendants:
            return
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        encoded = self.scm.encode_attributes({n: canonical[n][i : i + 1] for n in self.graph.attributes}, 1, device)
        encoded_cf = self.scm.intervene_encoded(encoded, do, 1, generator=generator)
        for name in descendants:
            cf[name][i] = self.scm.encoder.decode_attribute(name, encoded_cf[name])[0].to(cf[name])

    def _latent_rng(self, seeds: Sequence[int | None], device: torch.device) -> contextlib.AbstractContextManager:
        if self.posterior_mean:
            return contextlib.nullcontext()
        # every seed is set when posterior_mean is False
        return _seeded_rng(int(np.random.SeedSequence([int(s or 0) for s in seeds]).generate_state(1)[0]), device)


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device):
    # Seed only the generator of the model's device, inside fork_rng, so no other random state moves.
    if device.type == "cuda":
        with torch.random.fork_rng(devices=[device], device_type="cuda"):
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield


def _usable_entry(entry: Mapping[str, Any] | None, shape: Sequence[int], names: Sequence[str]) -> bool:
    if entry is None or tuple(entry["image"].shape) != tuple(shape):
        return False
    return all(name in entry["attributes"] for name in names)


def _plain_values(values: Any) -> Any:
    if isinstance(values, torch.Tensor):
        return convert_to_tensor(values, track_meta=False)
    if isinstance(values, tuple):
        return list(values)
    return values


def _like_input(result: torch.Tensor, original: Any) -> Any:
    if isinstance(original, np.ndarray):
        return result.cpu().numpy().astype(original.dtype, copy=False)
    if hasattr(original, "as_tensor"):  # MetaTensor: keep its metadata
        from monai.utils import convert_to_dst_type

        return convert_to_dst_type(result, original)[0]
    return result


# ---------------------------------------------------------------------------------------------- data values
def read_scalar(value: Any) -> Any:
    """One attribute value of a sample as a Python scalar (one-element tensors and arrays unwrapped)."""
    if isinstance(value, torch.Tensor | np.ndarray) and np.size(value) == 1:
        return value.reshape(-1)[0].item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def restore_value(value: int | float, template: Any, graph: CausalGraph, name: str) -> Any:
    """A canonical value in the container and dtype of ``template`` (the value it replaces).

    A continuous value replacing an integer one becomes floating point (``float32`` tensors, ``float64``
    arrays, Python ``float``); a string is replaced by the class name or the number.
    """
    var = graph[name]
    if isinstance(template, torch.Tensor):
        dtype = template.dtype if var.is_discrete or template.is_floating_point() else torch.float32
        return torch.as_tensor(value, dtype=dtype, device=template.device).reshape(template.shape)
    if isinstance(template, np.ndarray | np.generic):
        dtype = template.dtype if var.is_discrete or template.dtype.kind == "f" else np.dtype(np.float64)
        array = np.asarray(value, dtype=dtype).reshape(np.shape(template))
        return array if isinstance(template, np.ndarray) else array[()]
    if isinstance(template, str):
        return var.class_names[int(value)] if var.is_discrete else float(value)
    if isinstance(template, bool) and var.is_discrete:
        return bool(value)
    return int(value) if var.is_discrete else float(value)


def restore_batch(values: torch.Tensor, mask: torch.Tensor, template: Any, graph: CausalGraph, name: str) -> Any:
    """Collated ``template`` with the rows in ``mask`` replaced by ``values`` (canonical ``(B,)``), same container."""
    var = graph[name]
    rows = mask.nonzero().flatten().tolist()
    if isinstance(template, torch.Tensor):
        plain = convert_to_tensor(template, track_meta=False)
        dtype = plain.dtype if var.is_discrete or plain.is_floating_point() else torch.float32
        result = plain.to(dtype=dtype, copy=True)
        flat = result.reshape(len(mask), -1)
        flat[mask.to(flat.device)] = values[mask.to(values.device)].to(flat).unsqueeze(-1)
        return result
    if isinstance(template, np.ndarray):
        dtype = template.dtype if var.is_discrete or template.dtype.kind == "f" else np.dtype(np.float64)
        result = template.astype(dtype, copy=True)
        result.reshape(len(mask), -1)[mask.cpu().numpy()] = values[mask].cpu().numpy().astype(dtype)[:, None]
        return result
    result = list(template)
    for row in rows:
        result[row] = restore_value(values[row].item(), template[row], graph, name)
    return type(template)(result) if isinstance(template, tuple) else result
