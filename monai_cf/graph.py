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
"""The causal graph over a dataset's attributes and its image.

A :class:`CausalGraph` is the one place where the structure of a deep structural causal model is written
down: which attributes exist, what kind of values they take, who their parents are and which attributes
the image depends on. Every other part (data encoding, mechanisms, the image model, counterfactual
fine-tuning, metrics) reads the structure from here.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AttributeKind", "Variable", "CausalGraph", "DEFAULT_GRAPHS", "mimic_cxr_graph"]


class AttributeKind:
    """Value kinds an attribute can take.

    Example::

        CausalGraph.from_name("mimic_cxr")["age"].kind == AttributeKind.CONTINUOUS  # True
    """

    BINARY = "binary"
    CATEGORICAL = "categorical"
    CONTINUOUS = "continuous"

    ALL = (BINARY, CATEGORICAL, CONTINUOUS)


@dataclass(frozen=True)
class Variable:
    """One attribute of the causal graph.

    Args:
        name: attribute name, also the key of its value in a data dictionary.
        kind: one of ``"binary"``, ``"categorical"``, ``"continuous"``.
        parents: names of the attribute's causal parents.
        class_names: names of the classes of a discrete attribute, index ``i`` naming class ``i``.
            Binary attributes default to ``("0", "1")``.
        value_range: ``(low, high)`` of a continuous attribute in original units. Network inputs are the
            values scaled linearly from this range to ``[-1, 1]``.

    Example::

        race = Variable("race", AttributeKind.CATEGORICAL, class_names=("White", "Asian", "Black"))
        race.dim, race.num_classes  # (3, 3): one-hot encoded
    """

    name: str
    kind: str
    parents: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    value_range: tuple[float, float] | None = None

    @property
    def is_discrete(self) -> bool:
        return self.kind != AttributeKind.CONTINUOUS

    @property
    def num_classes(self) -> int:
        """Number of classes of a discrete attribute (``0`` for a continuous one)."""
        return len(self.class_names)

    @property
    def dim(self) -> int:
        """Width of the attribute's network encoding: one-hot for categorical, a scalar otherwise."""
        return self.num_classes if self.kind == AttributeKind.CATEGORICAL else 1

    def to_dict(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"kind": self.kind, "parents": list(self.parents)}
        if self.is_discrete:
            spec["class_names"] = list(self.class_names)
        else:
            spec["range"] = list(self.value_range)  # type: ignore[arg-type]
        return spec


@dataclass(frozen=True)
class _ImageNode:
    key: str
    parents: tuple[str, ...]


@dataclass
class CausalGraph:
    """A directed acyclic graph over attributes plus an image node.

    Build it from a config-style dictionary with :meth:`from_dict` or by name with :meth:`from_name`.
    All validation happens on construction: a cycle, a parent that is not a variable, an unknown kind,
    a categorical attribute without classes or a continuous attribute without a valid range raise
    ``ValueError`` naming the variable at fault.

    Args:
        variables: the attributes, in any order.
        image_parents: the attributes the image depends on (the image's parents ``pa_x``).
        image_key: the key of the image in a data dictionary.

    Example::

        graph = CausalGraph.from_dict({
            "age": {"kind": "continuous", "range": [0, 100]},
            "disease": {"kind": "binary", "parents": ["age"]},
            "image": {"kind": "image", "parents": ["age", "disease"]},
        })
        graph.topological_order()          # ['age', 'disease']
        graph.descendants(["age"])         # {'disease'}
        graph.soft_target_set(["disease"])  # {'age'}
    """

    variables: dict[str, Variable]
    image_parents: tuple[str, ...]
    image_key: str = "image"
    _order: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self.variables = dict(self.variables)
        self.image_parents = tuple(self.image_parents)
        if self.image_key in self.variables:
            raise ValueError(f"Attribute name '{self.image_key}' clashes with the image key.")
        for var in self.variables.values():
            _check_variable(var)
            for parent in var.parents:
                if parent not in self.variables:
                    raise ValueError(
                        f"Variable '{var.name}' lists unknown parent '{parent}'; known: {sorted(self.variables)}."
                    )
        for parent in self.image_parents:
            if parent not in self.variables:
                raise ValueError(
                    f"Image '{self.image_key}' lists unknown parent '{parent}'; known: {sorted(self.variables)}."
                )
        if len(set(self.image_parents)) != len(self.image_parents):
            raise ValueError(f"Image '{self.image_key}' lists a parent twice: {list(self.image_parents)}.")
        self._order = self._sort()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, spec: Mapping[str, Mapping[str, Any]], image_key: str | None = None) -> CausalGraph:
        """Build a graph from ``{name: {"kind": ..., "parents": [...], ...}}``.

        Discrete attributes take ``class_names`` (or ``num_classes``, naming classes ``"0"..``); binary
        attributes default to two classes. Continuous attributes take ``range: [low, high]``. Exactly one
        entry of kind ``"image"`` names the image key and lists the image's parents; without one, the
        image key is ``"image"`` and every attribute is an image parent.
        """
        if not isinstance(spec, Mapping) or not spec:
            raise ValueError(f"A causal graph needs a non-empty mapping of variables, got {spec!r}.")
        variables: dict[str, Variable] = {}
        image_nodes: list[_ImageNode] = []
        for name, entry in spec.items():
            if not isinstance(entry, Mapping):
                raise ValueError(f"Variable '{name}' must be a mapping with at least 'kind', got {entry!r}.")
            kind = str(entry.get("kind", "")).lower()
            parents = _as_names(entry.get("parents", ()), f"parents of '{name}'")
            if kind == "image":
                image_nodes.append(_ImageNode(str(name), parents))
                continue
            if kind not in AttributeKind.ALL:
                raise ValueError(
                    f"Variable '{name}' has unknown kind '{entry.get('kind')}'; "
                    f"expected one of {list(AttributeKind.ALL) + ['image']}."
                )
            variables[str(name)] = Variable(
                name=str(name),
                kind=kind,
                parents=parents,
                class_names=_class_names(str(name), kind, entry),
                value_range=_value_range(str(name), kind, entry),
            )
        if len(image_nodes) > 1:
            raise ValueError(f"Only one image node is supported, got {[n.key for n in image_nodes]}.")
        if image_nodes:
            node = image_nodes[0]
            if image_key is not None and image_key != node.key:
                raise ValueError(f"image_key '{image_key}' differs from the graph's image node '{node.key}'.")
            return cls(variables, node.parents, node.key)
        return cls(variables, tuple(variables), image_key or "image")

    @classmethod
    def from_name(cls, name: str) -> CausalGraph:
        """One of the graphs shipped with monai_cf, see ``DEFAULT_GRAPHS``."""
        if name not in DEFAULT_GRAPHS:
            raise ValueError(f"Unknown graph name '{name}'; available: {sorted(DEFAULT_GRAPHS)}.")
        return cls.from_dict(copy.deepcopy(DEFAULT_GRAPHS[name]))

    @classmethod
    def build(cls, graph: CausalGraph | Mapping | str) -> CausalGraph:
        """Accept a graph, a config dictionary or a shipped graph's name (handy for bundle configs)."""
        if isinstance(graph, CausalGraph):
            return graph
        if isinstance(graph, str):
            return cls.from_name(graph)
        return cls.from_dict(graph)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The config dictionary that :meth:`from_dict` turns back into this graph."""
        spec = {name: var.to_dict() for name, var in self.variables.items()}
        spec[self.image_key] = {"kind": "image", "parents": list(self.image_parents)}
        return spec

    # ------------------------------------------------------------------ queries
    @property
    def attributes(self) -> list[str]:
        """All attribute names in topological order."""
        return list(self._order)

    def __getitem__(self, name: str) -> Variable:
        self.check_names([name])
        return self.variables[name]

    def __contains__(self, name: object) -> bool:
        return name in self.variables

    def parents(self, name: str) -> tuple[str, ...]:
        if name == self.image_key:
            return self.image_parents
        return self[name].parents

    def children(self, name: str) -> list[str]:
        self.check_names([name])
        return [v for v in self._order if name in self.variables[v].parents]

    def topological_order(self) -> list[str]:
        """Attribute names such that every parent comes before its children (ties keep declaration order)."""
        return list(self._order)

    def descendants(self, names: str | Iterable[str]) -> set[str]:
        """Attributes reachable from ``names`` along directed edges, ``names`` themselves excluded."""
        start = self.check_names(names)
        found: set[str] = set()
        frontier = list(start)
        while frontier:
            current = frontier.pop()
            for child in self.children(current):
                if child not in found:
                    found.add(child)
                    frontier.append(child)
        return found - set(start)

    def soft_target_set(self, intervened: str | Iterable[str]) -> set[str]:
        """The set A* of Algorithm 1: image parents neither intervened on nor descending from an intervention.

        Counterfactual fine-tuning supervises these attributes towards their factual state (a hard label or,
        in Soft-CFT, the predictor's probability on the real image); all other image parents get the hard
        counterfactual value.
        """
        names = self.check_names(intervened)
        affected = set(names) | self.descendants(names)
        return {p for p in self.image_parents if p not in affected}

    def check_names(self, names: str | Iterable[str]) -> list[str]:
        """Return ``names`` as a list, raising ``ValueError`` for any that is not an attribute of the graph."""
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            if name not in self.variables:
                raise ValueError(f"Unknown variable '{name}'; the graph has {self._order or sorted(self.variables)}.")
        return names

    def check_intervention(self, do: Mapping[str, Any]) -> dict[str, Any]:
        """Validate the keys of an intervention ``do={name: value}`` (values are checked by the encoder)."""
        if not isinstance(do, Mapping):
            raise ValueError(f"An intervention must be a mapping {{attribute: value}}, got {do!r}.")
        self.check_names(list(do))
        return dict(do)

    @property
    def parents_dim(self) -> int:
        """Width of the concatenated encoding of the image parents (the HVAE's ``parents_dim``)."""
        return sum(self.variables[p].dim for p in self.image_parents)

    # ------------------------------------------------------------------ internals
    def _sort(self) -> list[str]:
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = on the current path, 2 = done

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = path[path.index(name) :] + [name]
                raise ValueError(f"The graph has a cycle through variable '{name}': {' -> '.join(cycle)}.")
            state[name] = 1
            for parent in self.variables[name].parents:
                visit(parent, path + [name])
            state[name] = 2
            order.append(name)

        for name in self.variables:
            visit(name, [])
        return order


def _as_names(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence):
        raise ValueError(f"The {what} must be a list of names, got {value!r}.")
    names = tuple(str(v) for v in value)
    if len(set(names)) != len(names):
        raise ValueError(f"The {what} list a name twice: {list(names)}.")
    return names


def _class_names(name: str, kind: str, entry: Mapping[str, Any]) -> tuple[str, ...]:
    if kind == AttributeKind.CONTINUOUS:
        return ()
    names = entry.get("class_names")
    count = entry.get("num_classes")
    if names is None and count is None:
        if kind == AttributeKind.BINARY:
            return ("0", "1")
        raise ValueError(f"Categorical variable '{name}' needs 'class_names' or 'num_classes'.")
    if names is None:
        if int(count) < 2:
            raise ValueError(f"Variable '{name}' needs num_classes >= 2, got {count}.")
        names = [str(i) for i in range(int(count))]
    names = tuple(str(n) for n in names)
    if count is not None and int(count) != len(names):
        raise ValueError(f"Variable '{name}': num_classes={count} but {len(names)} class_names {list(names)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"Variable '{name}' repeats a class name: {list(names)}.")
    if kind == AttributeKind.BINARY and len(names) != 2:
        raise ValueError(f"Binary variable '{name}' needs exactly 2 class names, got {list(names)}.")
    if kind == AttributeKind.CATEGORICAL and len(names) < 2:
        raise ValueError(f"Categorical variable '{name}' needs at least 2 classes, got {list(names)}.")
    return names


def _value_range(name: str, kind: str, entry: Mapping[str, Any]) -> tuple[float, float] | None:
    if kind != AttributeKind.CONTINUOUS:
        return None
    value = entry.get("range", entry.get("value_range"))
    if value is None:
        raise ValueError(f"Continuous variable '{name}' needs 'range: [low, high]' in original units.")
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"Continuous variable '{name}' has an invalid range {value!r}; expected [low, high]."
        ) from None
    if not low < high:
        raise ValueError(f"Continuous variable '{name}' has an empty range [{low}, {high}].")
    return (low, high)


def _check_variable(var: Variable) -> None:
    if var.kind not in AttributeKind.ALL:
        raise ValueError(f"Variable '{var.name}' has unknown kind '{var.kind}'; expected one of {AttributeKind.ALL}.")
    if var.name in var.parents:
        raise ValueError(f"The graph has a cycle through variable '{var.name}': it lists itself as a parent.")


def mimic_cxr_graph() -> CausalGraph:
    """The MIMIC-CXR graph of the Soft-CFT paper: sex, race, age roots; age -> disease; image <- all four."""
    return CausalGraph.from_name("mimic_cxr")


#: Graph specifications shipped with monai_cf, by name. ``mimic_cxr`` is also the phantom's graph.
DEFAULT_GRAPHS: dict[str, dict[str, dict[str, Any]]] = {
    "mimic_cxr": {
        "sex": {"kind": "binary", "parents": [], "class_names": ["male", "female"]},
        "race": {"kind": "categorical", "parents": [], "class_names": ["White", "Asian", "Black"]},
        "age": {"kind": "continuous", "parents": [], "range": [0.0, 100.0]},
        "disease": {"kind": "binary", "parents": ["age"], "class_names": ["no_finding", "pleural_effusion"]},
        "image": {"kind": "image", "parents": ["sex", "race", "age", "disease"]},
    }
}
