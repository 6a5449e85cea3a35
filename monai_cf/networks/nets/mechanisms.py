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
"""Structural assignments of the attributes of a deep structural causal model.

Every attribute ``a`` of a :class:`~monai_cf.graph.CausalGraph` gets a mechanism ``a = f(u, pa(a))`` with
exogenous noise ``u``. Mechanisms work in the *encoded* space of :class:`~monai_cf.data.AttributeEncoder`:
binary values are ``(B, 1)`` in ``{0, 1}``, categorical values ``(B, K)`` one-hot, continuous values ``(B, 1)``
scaled to ``[-1, 1]``; the parents of a mechanism are the encodings of the attribute's graph parents,
concatenated in the order the graph lists them (see :func:`parents_vector`).

- Continuous attributes: a conditional neural spline flow (``zuko.flows.NSF``) between standard normal noise
  and the value. Abduction is the exact inverse, so it is deterministic.
- Binary and categorical attributes: Gumbel-max, ``value = one_hot(argmax(logits(pa) + g))`` with ``g`` i.i.d.
  standard Gumbel. Abduction samples ``g`` from its posterior given the observed class (top-down truncated
  Gumbels), so it is stochastic and reproducible through a ``torch.Generator``.

The ``*_all`` functions apply a whole set of mechanisms in topological order, which is how
:class:`~monai_cf.networks.DeepSCM` abducts, intervenes and predicts the attributes of a counterfactual.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
import zuko
from monai.networks.layers.utils import get_act_layer
from torch import nn

from monai_cf.graph import AttributeKind, CausalGraph

__all__ = [
    "Mechanism",
    "SplineFlowMechanism",
    "GumbelMaxMechanism",
    "BinaryGumbelMaxMechanism",
    "build_mechanisms",
    "parents_vector",
    "parents_width",
    "abduct_all",
    "predict_all",
    "counterfactual_all",
    "sample_all",
    "log_prob_all",
]


class Mechanism(nn.Module):
    """Base class of an attribute mechanism ``value = predict(noise, parents)``.

    Subclasses implement :meth:`log_prob`, :meth:`abduct`, :meth:`predict` and :meth:`sample_noise`. A root
    mechanism (``parents_dim == 0``) takes ``parents=None`` everywhere; :meth:`sample` then needs ``n``.

    Args:
        value_dim: width of the encoded value.
        parents_dim: width of the concatenated encoded parents (0 for a root).
        noise_dim: width of the exogenous noise.

    Example::

        mech = SplineFlowMechanism(parents_dim=0)  # a continuous root, e.g. age in [-1, 1] units
        value = torch.tensor([[0.2], [-0.5]])
        noise = mech.abduct(value)
        torch.allclose(mech.predict(noise), value)  # True: abduction inverts the mechanism
    """

    def __init__(self, value_dim: int, parents_dim: int, noise_dim: int) -> None:
        super().__init__()
        if parents_dim < 0:
            raise ValueError(f"parents_dim must be >= 0, got {parents_dim}.")
        self.value_dim = int(value_dim)
        self.parents_dim = int(parents_dim)
        self.noise_dim = int(noise_dim)

    # ------------------------------------------------------------------ interface
    def log_prob(self, value: torch.Tensor, parents: torch.Tensor | None = None) -> torch.Tensor:
        """Log-likelihood ``log p(value | parents)`` of each sample, shape ``(B,)``."""
        raise NotImplementedError

    def abduct(
        self, value: torch.Tensor, parents: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Exogenous noise consistent with ``value`` under ``parents``, shape ``(B, noise_dim)``."""
        raise NotImplementedError

    def predict(self, noise: torch.Tensor, parents: torch.Tensor | None = None) -> torch.Tensor:
        """The structural assignment: the encoded value, shape ``(B, value_dim)``, for ``noise`` and ``parents``."""
        raise NotImplementedError

    def sample_noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws of the exogenous noise from its prior, shape ``(n, noise_dim)``."""
        raise NotImplementedError

    def forward(self, noise: torch.Tensor, parents: torch.Tensor | None = None) -> torch.Tensor:
        return self.predict(noise, parents)

    def sample(
        self, parents: torch.Tensor | None = None, n: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw values from ``p(value | parents)``; ``n`` is required for a root and optional otherwise."""
        batch = self._batch_size(parents, n)
        return self.predict(self.sample_noise(batch, generator), parents)

    # ------------------------------------------------------------------ checks
    @property
    def _reference(self) -> torch.Tensor:
        return next(self.parameters())

    def _check_parents(self, parents: torch.Tensor | None, batch: int | None) -> torch.Tensor | None:
        name = type(self).__name__
        if self.parents_dim == 0:
            if parents is not None and parents.shape[-1] != 0:
                raise ValueError(f"{name} is a root mechanism: parents must be None, got {tuple(parents.shape)}.")
            return None
        if parents is None:
            raise ValueError(f"{name} needs parents of shape (B, {self.parents_dim}), got None.")
        if parents.ndim != 2 or parents.shape[-1] != self.parents_dim:
            raise ValueError(f"{name} needs parents of shape (B, {self.parents_dim}), got {tuple(parents.shape)}.")
        if batch is not None and parents.shape[0] != batch:
            raise ValueError(f"{name}: parents have batch size {parents.shape[0]} but the value/noise has {batch}.")
        return parents.to(self._reference.dtype)

    def _check_width(self, tensor: torch.Tensor, width: int, what: str) -> torch.Tensor:
        if tensor.ndim != 2 or tensor.shape[-1] != width:
            raise ValueError(f"{type(self).__name__} needs {what} of shape (B, {width}), got {tuple(tensor.shape)}.")
        return tensor.to(self._reference.dtype)

    def _batch_size(self, parents: torch.Tensor | None, n: int | None) -> int:
        if self.parents_dim and parents is not None:
            if n is not None and n != parents.shape[0]:
                raise ValueError(f"n={n} differs from the parents' batch size {parents.shape[0]}.")
            return int(parents.shape[0])
        if n is None:
            raise ValueError(f"{type(self).__name__}.sample needs n when no parents are given.")
        return int(n)


class SplineFlowMechanism(Mechanism):
    """Continuous attribute: a conditional neural spline flow between ``N(0, 1)`` noise and the encoded value.

    The flow is ``zuko.flows.NSF(features=1, context=parents_dim)`` (unconditional for a root) applied to the
    value multiplied by ``scale``: zuko's rational-quadratic splines act on ``[-5, 5]`` and are the identity
    outside, so ``scale=3`` puts the whole encoded range ``[-1, 1]`` at ``[-3, 3]``, inside the splines with room
    to spare. :meth:`abduct` is the flow's transform (value -> noise) and :meth:`predict` its exact inverse, so
    ``predict(abduct(v, pa), pa) == v`` up to floating-point error (below ``1e-5`` in float32, ``1e-12`` in
    float64). :meth:`log_prob` is the density of the encoded value (the ``log(scale)`` Jacobian included).

    The flow's density has full support on the real line; maximum-likelihood training on data in ``[-1, 1]``
    puts almost all of its mass there. With ``clamp=True`` (default) :meth:`predict` and :meth:`sample` clip
    their output to ``[-1, 1]``, so a counterfactual or a draw from the tails never leaves the attribute's range;
    values that abduct came from are inside the range already, so clipping never breaks the round trip.

    Args:
        parents_dim: width of the encoded parents (0 for a root).
        bins: spline bins per transform.
        transforms: number of stacked spline transforms.
        hidden_channels: widths of the hyper-network that maps the parents to the spline parameters.
        scale: the fixed factor applied to the encoded value before the flow.
        clamp: clip predicted values to ``[-1, 1]``.

    Example::

        mech = SplineFlowMechanism(parents_dim=1)
        age = torch.rand(8, 1) * 2 - 1
        pa = torch.zeros(8, 1)
        u = mech.abduct(age, pa)                            # (8, 1) standard-normal noise
        torch.allclose(mech.predict(u, pa), age, atol=1e-5)  # True
        mech.log_prob(age, pa).shape                        # torch.Size([8])
    """

    def __init__(
        self,
        parents_dim: int = 0,
        bins: int = 8,
        transforms: int = 3,
        hidden_channels: Sequence[int] = (64, 64),
        scale: float = 3.0,
        clamp: bool = True,
    ) -> None:
        super().__init__(value_dim=1, parents_dim=parents_dim, noise_dim=1)
        if not 0 < scale <= 4.0:
            raise ValueError(f"scale must be in (0, 4] so that [-1, 1] maps inside the spline domain, got {scale}.")
        self.scale = float(scale)
        self.clamp = bool(clamp)
        self.flow = zuko.flows.NSF(
            features=1,
            context=self.parents_dim,
            bins=bins,
            transforms=transforms,
            hidden_features=tuple(hidden_channels),
        )
        # Start from identity splines (zuko draws random root parameters), so that an untrained mechanism's
        # prior is N(0, 1 / scale**2) in encoded units, inside [-1, 1], instead of an arbitrary warp.
        for transform in self.flow.transform.transforms:
            if hasattr(transform, "phi"):
                for param in transform.phi:
                    nn.init.zeros_(param)
            else:
                last = [m for m in transform.hyper.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]
                last = last[-1]
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)

    def _distribution(self, parents: torch.Tensor | None):
        return self.flow(parents) if self.parents_dim else self.flow()

    def log_prob(self, value: torch.Tensor, parents: torch.Tensor | None = None) -> torch.Tensor:
        value = self._check_width(value, 1, "a value")
        parents = self._check_parents(parents, value.shape[0])
        return self._distribution(parents).log_prob(value * self.scale) + math.log(self.scale)

    def abduct(
        self, value: torch.Tensor, parents: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        value = self._check_width(value, 1, "a value")
        parents = self._check_parents(parents, value.shape[0])
        return self._distribution(parents).transform(value * self.scale)

    def predict(self, noise: torch.Tensor, parents: torch.Tensor | None = None) -> torch.Tensor:
        noise = self._check_width(noise, 1, "noise")
        parents = self._check_parents(parents, noise.shape[0])
        value = self._distribution(parents).transform.inv(noise) / self.scale
        return value.clamp(-1.0, 1.0) if self.clamp else value

    def sample_noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        ref = self._reference
        return torch.randn(n, 1, generator=generator, dtype=ref.dtype, device=ref.device)


class GumbelMaxMechanism(Mechanism):
    """Categorical attribute with ``K`` classes: ``value = one_hot(argmax(logits(parents) + g))``, ``g_i ~ Gumbel``.

    The logits come from a small MLP of the parents, or are learned constants for a root. The noise is the
    ``(B, K)`` vector of per-class Gumbels. :meth:`abduct` samples it from its posterior given the observed
    class ``k`` with the top-down construction: the maximum ``T = logsumexp(logits) + Gumbel`` goes to class
    ``k`` and every other class gets a Gumbel located at its logit and truncated to lie below ``T``. Hence
    ``predict(abduct(v, pa), pa) == v`` always, and ``predict(abduct(v, pa), pa')`` draws the Gumbel-max
    counterfactual under new parents ``pa'``. The other classes are kept a few ulps below ``T`` so that the
    round trip is exact in floating point too (a distortion of the posterior far below sampling error).

    Args:
        num_classes: number of classes ``K`` (at least 2).
        parents_dim: width of the encoded parents (0 for a root).
        hidden_channels: hidden widths of the logits MLP; ``()`` makes it a single linear layer.
        act: activation of the MLP (MONAI ``Act`` name or ``(name, args)``).

    Example::

        mech = GumbelMaxMechanism(num_classes=3, parents_dim=1)
        race = torch.nn.functional.one_hot(torch.tensor([0, 2, 1]), 3).float()
        pa = torch.tensor([[0.0], [1.0], [0.5]])
        g = mech.abduct(race, pa, generator=torch.Generator().manual_seed(0))
        torch.equal(mech.predict(g, pa), race)   # True
        mech.predict(g, -pa)                     # the counterfactual classes under new parents
    """

    def __init__(
        self,
        num_classes: int,
        parents_dim: int = 0,
        hidden_channels: Sequence[int] = (16, 16),
        act: str | tuple = "gelu",
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"A Gumbel-max mechanism needs at least 2 classes, got {num_classes}.")
        super().__init__(value_dim=self._value_dim(num_classes), parents_dim=parents_dim, noise_dim=num_classes)
        self.num_classes = int(num_classes)
        out = self._logits_dim(num_classes)
        if self.parents_dim == 0:
            self.root_logits = nn.Parameter(torch.zeros(out))
            self.net = None
        else:
            layers: list[nn.Module] = []
            width = self.parents_dim
            for hidden in hidden_channels:
                layers += [nn.Linear(width, int(hidden)), get_act_layer(act)]
                width = int(hidden)
            layers.append(nn.Linear(width, out))
            self.net = nn.Sequential(*layers)

    # The binary subclass overrides these three to use a (B, 1) encoding and one logit.
    @staticmethod
    def _value_dim(num_classes: int) -> int:
        return num_classes

    @staticmethod
    def _logits_dim(num_classes: int) -> int:
        return num_classes

    def _full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    # ------------------------------------------------------------------ values <-> class indices
    def value_to_index(self, value: torch.Tensor) -> torch.Tensor:
        """Class indices ``(B,)`` of a one-hot ``(B, K)`` value; ``ValueError`` if a row is not one-hot."""
        value = self._check_width(value, self.value_dim, "a one-hot value")
        if not (((value == 0) | (value == 1)).all() and (value.sum(-1) == 1).all()):
            raise ValueError(f"{type(self).__name__} needs one-hot values, got rows such as {value[0].tolist()}.")
        return value.argmax(-1)

    def index_to_value(self, index: torch.Tensor) -> torch.Tensor:
        return F.one_hot(index, self.num_classes).to(self._reference.dtype)

    # ------------------------------------------------------------------ mechanism
    def logits(self, parents: torch.Tensor | None = None, n: int | None = None) -> torch.Tensor:
        """The mechanism's logits, ``(B, K)`` (``(B, 1)`` for binary); a root needs ``n``."""
        if self.net is None:
            self._check_parents(parents, None)
            if n is None:
                raise ValueError(f"{type(self).__name__} is a root: logits() needs n.")
            return self.root_logits.unsqueeze(0).expand(n, -1)
        parents = self._check_parents(parents, n)
        return self.net(parents)

    def class_logits(self, parents: torch.Tensor | None = None, n: int | None = None) -> torch.Tensor:
        """Logits of all ``K`` classes, ``(B, K)``: the quantity the Gumbels are added to."""
        return self._full_logits(self.logits(parents, n))

    def log_prob(self, value: torch.Tensor, parents: torch.Tensor | None = None) -> torch.Tensor:
        index = self.value_to_index(value)
        log_p = torch.log_softmax(self.class_logits(parents, value.shape[0]), dim=-1)
        return log_p.gather(-1, index.unsqueeze(-1)).squeeze(-1)

    def abduct(
        self, value: torch.Tensor, parents: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        index = self.value_to_index(value)
        with torch.no_grad():
            logits = self.class_logits(parents, value.shape[0])
            observed = F.one_hot(index, self.num_classes).bool()
            top = torch.logsumexp(logits, dim=-1, keepdim=True) + self._gumbel(logits.shape[0], 1, generator)
            perturbed = logits + self._gumbel(logits.shape[0], self.num_classes, generator)
            # A Gumbel located at ``perturbed``'s location and truncated below ``top``.
            below = top - F.softplus(top - perturbed)
            # Keep a few ulps below ``top`` so that ``logits + noise`` recomputed in predict cannot tie with it.
            eps = torch.finfo(logits.dtype).eps
            margin = 8 * eps * (top.abs() + below.abs() + logits.abs().amax(-1, keepdim=True) + 1)
            below = torch.minimum(below, top - margin)
            return torch.where(observed, top, below) - logits

    def predict(self, noise: torch.Tensor, parents: torch.Tensor | None = None) -> torch.Tensor:
        noise = self._check_width(noise, self.num_classes, "Gumbel noise")
        logits = self.class_logits(parents, noise.shape[0])
        return self.index_to_value((logits + noise).argmax(-1))

    def sample_noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._gumbel(n, self.num_classes, generator)

    def _gumbel(self, n: int, k: int, generator: torch.Generator | None) -> torch.Tensor:
        ref = self._reference
        tiny = torch.finfo(ref.dtype).tiny
        uniform = torch.rand(n, k, generator=generator, dtype=ref.dtype, device=ref.device)
        return -torch.log(-torch.log(uniform.clamp(min=tiny, max=1.0 - torch.finfo(ref.dtype).eps)))


class BinaryGumbelMaxMechanism(GumbelMaxMechanism):
    """Binary attribute, encoded ``(B, 1)`` in ``{0, 1}``: Gumbel-max over the class logits ``(0, logit(pa))``.

    The noise is the pair of per-class Gumbels ``(B, 2)``; only their difference (a standard logistic variable)
    matters, so this is the usual ``value = [logit + eps > 0]`` with logistic ``eps``, and :meth:`abduct`
    draws ``eps`` from the logistic truncated to the observed side. Same API as :class:`GumbelMaxMechanism`;
    :meth:`logits` returns the single logit ``(B, 1)`` of class 1.

    Example::

        mech = BinaryGumbelMaxMechanism(parents_dim=1)
        disease = torch.tensor([[1.0], [0.0]])
        g = mech.abduct(disease, torch.zeros(2, 1))
        mech.predict(g, torch.zeros(2, 1))      # tensor([[1.], [0.]])
    """

    def __init__(self, parents_dim: int = 0, hidden_channels: Sequence[int] = (16, 16), act: str | tuple = "gelu"):
        super().__init__(num_classes=2, parents_dim=parents_dim, hidden_channels=hidden_channels, act=act)

    @staticmethod
    def _value_dim(num_classes: int) -> int:
        return 1

    @staticmethod
    def _logits_dim(num_classes: int) -> int:
        return 1

    def _full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(logits), logits], dim=-1)

    def value_to_index(self, value: torch.Tensor) -> torch.Tensor:
        value = self._check_width(value, 1, "a 0/1 value")
        if not ((value == 0) | (value == 1)).all():
            raise ValueError(f"{type(self).__name__} needs 0/1 values, got {value.flatten()[:8].tolist()}.")
        return value[:, 0].long()

    def index_to_value(self, index: torch.Tensor) -> torch.Tensor:
        return index.to(self._reference.dtype).unsqueeze(-1)


# ---------------------------------------------------------------------- graph-level helpers
def parents_width(graph: CausalGraph, name: str) -> int:
    """Width of the concatenated encoded parents of attribute ``name``."""
    return sum(graph[p].dim for p in graph[name].parents)


def parents_vector(graph: CausalGraph, name: str, encoded: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The encoded parents of ``name`` concatenated in the order the graph lists them; ``None`` for a root."""
    parents = graph[name].parents
    if not parents:
        return None
    missing = [p for p in parents if p not in encoded]
    if missing:
        raise ValueError(f"Parents {missing} of '{name}' are missing; got {sorted(encoded)}.")
    return torch.cat([encoded[p] if encoded[p].is_floating_point() else encoded[p].float() for p in parents], dim=-1)


def build_mechanisms(
    graph: CausalGraph | Mapping | str,
    flow_kwargs: Mapping | None = None,
    discrete_kwargs: Mapping | None = None,
) -> nn.ModuleDict:
    """One mechanism per attribute of ``graph``, keyed by name in topological order.

    Continuous attributes get a :class:`SplineFlowMechanism`, binary ones a :class:`BinaryGumbelMaxMechanism`
    and categorical ones a :class:`GumbelMaxMechanism`, each with the parents' width from the graph.

    Args:
        graph: a :class:`CausalGraph` or anything :meth:`CausalGraph.build` accepts.
        flow_kwargs: extra arguments of every :class:`SplineFlowMechanism` (``bins``, ``hidden_channels``...).
        discrete_kwargs: extra arguments of every Gumbel-max mechanism (``hidden_channels``, ``act``).

    Example::

        mechanisms = build_mechanisms("mimic_cxr")
        list(mechanisms)                 # ['sex', 'race', 'age', 'disease']
        mechanisms["disease"].parents_dim  # 1 (age)
    """
    graph = CausalGraph.build(graph)
    mechanisms = nn.ModuleDict()
    for name in graph.topological_order():
        var = graph[name]
        width = parents_width(graph, name)
        if var.kind == AttributeKind.CONTINUOUS:
            mechanisms[name] = SplineFlowMechanism(parents_dim=width, **dict(flow_kwargs or {}))
        elif var.kind == AttributeKind.BINARY:
            mechanisms[name] = BinaryGumbelMaxMechanism(parents_dim=width, **dict(discrete_kwargs or {}))
        else:
            mechanisms[name] = GumbelMaxMechanism(var.num_classes, parents_dim=width, **dict(discrete_kwargs or {}))
    return mechanisms


def _check_mechanisms(mechanisms: Mapping[str, Mechanism], graph: CausalGraph) -> None:
    for name in graph.topological_order():
        if name not in mechanisms:
            raise ValueError(f"No mechanism for attribute '{name}'; got {sorted(mechanisms)}.")
        mech, var = mechanisms[name], graph[name]
        if mech.value_dim != var.dim or mech.parents_dim != parents_width(graph, name):
            raise ValueError(
                f"Mechanism of '{name}' has value/parents widths ({mech.value_dim}, {mech.parents_dim}) but the "
                f"graph needs ({var.dim}, {parents_width(graph, name)})."
            )


def _check_encoded(graph: CausalGraph, name: str, tensor: torch.Tensor, what: str) -> torch.Tensor:
    if tensor.ndim != 2 or tensor.shape[-1] != graph[name].dim:
        raise ValueError(f"{what} of '{name}' must have shape (B, {graph[name].dim}), got {tuple(tensor.shape)}.")
    return tensor


def _observed(
    mechanisms: Mapping[str, Mechanism], graph: CausalGraph, encoded: Mapping[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """``(name, encoded value, encoded parents)`` of every attribute in topological order, each checked."""
    _check_mechanisms(mechanisms, graph)
    for name in graph.topological_order():
        if name not in encoded:
            raise ValueError(f"Encoded value of '{name}' is missing; got {sorted(encoded)}.")
        value = _check_encoded(graph, name, encoded[name], "The encoded value")
        yield name, value, parents_vector(graph, name, encoded)


def log_prob_all(
    mechanisms: Mapping[str, Mechanism], graph: CausalGraph, encoded: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``log p(a | pa(a))`` per attribute, each ``(B,)``; their sum is the attributes' joint log-likelihood."""
    return {name: mechanisms[name].log_prob(value, pa) for name, value, pa in _observed(mechanisms, graph, encoded)}


def abduct_all(
    mechanisms: Mapping[str, Mechanism],
    graph: CausalGraph,
    encoded: Mapping[str, torch.Tensor],
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The exogenous noise of every attribute given all encoded values (discrete noise is a posterior draw)."""
    return {
        name: mechanisms[name].abduct(value, pa, generator=generator)
        for name, value, pa in _observed(mechanisms, graph, encoded)
    }


def predict_all(
    mechanisms: Mapping[str, Mechanism],
    graph: CausalGraph,
    noise: Mapping[str, torch.Tensor],
    do: Mapping[str, torch.Tensor] | None = None,
    factual: Mapping[str, torch.Tensor] | None = None,
    do_mask: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Run the mechanisms in topological order from ``noise``, under the intervention ``do``.

    Without ``factual``, every attribute not intervened on is ``predict(noise, parents)``. With ``factual``
    (the encoded values the noise was abducted from), only the intervened attributes and their descendants
    change: a descendant is recomputed from its noise and its new parents, every other attribute keeps its
    factual value exactly, and ``noise`` only needs entries for the attributes that are recomputed.

    Args:
        mechanisms: one :class:`Mechanism` per attribute, e.g. from :func:`build_mechanisms`.
        graph: the causal graph.
        noise: exogenous noise per attribute, e.g. from :func:`abduct_all`.
        do: encoded intervention values per attribute, ``(B, dim)`` or ``(1, dim)`` / ``(dim,)`` broadcast.
        factual: encoded factual values per attribute (all attributes).
        do_mask: optional ``(B,)`` booleans per intervened attribute: the samples it applies to, so that each
            sample of a batch can have its own intervention (the others keep the value from their noise or
            factual state).

    Returns:
        the encoded counterfactual value of every attribute, ``(B, dim)`` each.
    """
    _check_mechanisms(mechanisms, graph)
    do = graph.check_intervention(do or {})
    do_mask = dict(do_mask or {})
    unknown = [n for n in do_mask if n not in do]
    if unknown:
        raise ValueError(f"do_mask names {unknown} that are not intervened on; do has {sorted(do)}.")
    sources = [t for t in (*(factual or {}).values(), *noise.values()) if isinstance(t, torch.Tensor)]
    sources += [t for t in do.values() if isinstance(t, torch.Tensor) and t.ndim == 2]
    if not sources:
        raise ValueError("predict_all needs noise, factual values or batched do values to know the batch size.")
    batch = max(int(t.shape[0]) for t in sources)
    ref = next(iter(mechanisms[graph.topological_order()[0]].parameters()))

    values: dict[str, torch.Tensor] = {}
    changed: dict[str, torch.Tensor] = {}  # per sample: differs from the factual state
    for name in graph.topological_order():
        mech = mechanisms[name]
        dim = graph[name].dim
        parents = parents_vector(graph, name, values)
        if factual is None:
            recompute = torch.ones(batch, dtype=torch.bool, device=ref.device)
            value = None
        else:
            if name not in factual:
                raise ValueError(f"Factual value of '{name}' is missing; got {sorted(factual)}.")
            value = _check_encoded(graph, name, factual[name], "The factual value").to(ref.dtype)
            recompute = torch.zeros(batch, dtype=torch.bool, device=ref.device)
            for p in graph[name].parents:
                recompute = recompute | changed[p]
        intervened = torch.zeros(batch, dtype=torch.bool, device=ref.device)
        if name in do:
            intervened = _do_mask(do_mask.get(name), batch, name).to(ref.device)
        needs_noise = recompute & ~intervened
        if needs_noise.any():
            if name not in noise:
                raise ValueError(f"Noise of '{name}' is needed to recompute it but is missing; got {sorted(noise)}.")
            eps = _check_encoded_noise(name, noise[name], mech.noise_dim)
            predicted = mech.predict(eps, parents)
            value = predicted if value is None else torch.where(needs_noise.unsqueeze(-1), predicted, value)
        if name in do:
            target = _do_value(do[name], batch, dim, name).to(device=ref.device, dtype=ref.dtype)
            value = target if value is None else torch.where(intervened.unsqueeze(-1), target, value)
        if value is None:  # all samples intervened on
            value = _do_value(do[name], batch, dim, name).to(device=ref.device, dtype=ref.dtype)
        values[name] = value
        changed[name] = recompute | intervened
    return values


def counterfactual_all(
    mechanisms: Mapping[str, Mechanism],
    graph: CausalGraph,
    encoded: Mapping[str, torch.Tensor],
    do: Mapping[str, torch.Tensor],
    do_mask: Mapping[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Abduct, act, predict: the encoded counterfactual attributes of ``encoded`` under ``do``.

    Attributes that are neither intervened on nor descendants of an intervention keep their factual values;
    descendants are recomputed from their abducted noise (a posterior draw for discrete ones, so pass a
    ``generator`` for reproducible results).

    Example::

        graph = CausalGraph.from_name("mimic_cxr")
        mechanisms = build_mechanisms(graph)
        cf = counterfactual_all(mechanisms, graph, encoded, do={"age": torch.tensor([[0.8]])})
    """
    _check_mechanisms(mechanisms, graph)
    noise = {}
    # Intervened descendants of other interventions are abducted too: a do_mask may leave them to their noise.
    affected = set().union(*(graph.descendants(name) for name in graph.check_intervention(do)))
    for name in graph.topological_order():
        if name in affected:
            value = _check_encoded(graph, name, encoded[name], "The encoded value")
            parents = parents_vector(graph, name, encoded)
            noise[name] = mechanisms[name].abduct(value, parents, generator=generator)
    return predict_all(mechanisms, graph, noise, do=do, factual=encoded, do_mask=do_mask)


def sample_all(
    mechanisms: Mapping[str, Mechanism], graph: CausalGraph, n: int, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Ancestral sampling of ``n`` encoded attribute sets from the mechanisms."""
    _check_mechanisms(mechanisms, graph)
    values: dict[str, torch.Tensor] = {}
    for name in graph.topological_order():
        values[name] = mechanisms[name].sample(parents_vector(graph, name, values), n=n, generator=generator)
    return values


def _check_encoded_noise(name: str, tensor: torch.Tensor, width: int) -> torch.Tensor:
    if tensor.ndim != 2 or tensor.shape[-1] != width:
        raise ValueError(f"Noise of '{name}' must have shape (B, {width}), got {tuple(tensor.shape)}.")
    return tensor


def _do_value(value: torch.Tensor, batch: int, dim: int, name: str) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.float32) if not isinstance(value, torch.Tensor) else value
    if value.ndim == 1:
        value = value.unsqueeze(0)
    if value.ndim != 2 or value.shape[-1] != dim or value.shape[0] not in (1, batch):
        raise ValueError(
            f"Intervention value of '{name}' must be encoded with shape ({batch}, {dim}) or (1, {dim}), "
            f"got {tuple(value.shape)}."
        )
    return value.expand(batch, dim)


def _do_mask(mask: torch.Tensor | None, batch: int, name: str) -> torch.Tensor:
    if mask is None:
        return torch.ones(batch, dtype=torch.bool)
    mask = torch.as_tensor(mask).reshape(-1)
    if mask.shape[0] != batch:
        raise ValueError(f"do_mask of '{name}' must have {batch} entries, got {mask.shape[0]}.")
    return mask.bool()
