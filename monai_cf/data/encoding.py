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
"""Attribute values between three forms: raw (as written in a CSV), canonical and network-encoded.

- *raw*: what a user writes, a class name (``"female"``), a class index (``1``, ``"1"``) or a number in
  original units (``63.0`` years);
- *canonical*: a class index (``int``) for discrete attributes, a float in original units for continuous;
- *encoded*: network inputs, ``(B, dim)`` float tensors: ``0/1`` for binary, one-hot for categorical,
  continuous values scaled linearly from their range to ``[-1, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from monai_cf.graph import AttributeKind, CausalGraph, Variable

__all__ = ["AttributeEncoder"]


class AttributeEncoder:
    """Encodes attribute values for networks and decodes them back to original units, as the graph says.

    Args:
        graph: the causal graph, or anything :meth:`CausalGraph.build` accepts.
        value_maps: optional per-attribute maps from raw values to class names or indices, e.g.
            ``{"sex": {"M": "male", "F": "female"}}``, applied before the usual parsing.

    Example::

        enc = AttributeEncoder("mimic_cxr")
        enc.canonical("sex", "female")                 # 1
        x = enc.encode({"sex": [1], "race": [2], "age": [50.0], "disease": [0]})
        x["age"]                                        # tensor([[0.]])
        enc.parents_vector(x).shape                     # torch.Size([1, 6])
        enc.decode(x)["race"]                           # tensor([2])
    """

    def __init__(self, graph: CausalGraph | Mapping | str, value_maps: Mapping[str, Mapping] | None = None):
        self.graph = CausalGraph.build(graph)
        self.value_maps = {k: dict(v) for k, v in (value_maps or {}).items()}
        self.graph.check_names(list(self.value_maps))

    # ------------------------------------------------------------------ raw -> canonical
    def canonical(self, name: str, raw: Any) -> int | float:
        """Parse one raw value of attribute ``name``; ``ValueError`` says what was wrong with it."""
        var = self.graph[name]
        mapping = self.value_maps.get(name)
        if mapping is not None and _hashable(raw) and raw in mapping:
            raw = mapping[raw]
        elif mapping is not None and str(raw) in mapping:
            raw = mapping[str(raw)]
        if _is_missing(raw):
            raise ValueError(f"'{name}' is missing (empty or NaN).")
        if var.kind == AttributeKind.CONTINUOUS:
            return self._continuous(var, raw)
        return self._class_index(var, raw)

    def canonical_dict(self, values: Mapping[str, Any]) -> dict[str, int | float]:
        """Parse every attribute of the graph present in ``values``."""
        return {name: self.canonical(name, values[name]) for name in self.graph.attributes if name in values}

    def class_name(self, name: str, index: int) -> str:
        return self.graph[name].class_names[int(index)]

    def to_original(self, name: str, value: Any) -> Any:
        """A canonical value as a user reads it: a class name, or a number in original units."""
        var = self.graph[name]
        return self.class_name(name, value) if var.is_discrete else float(value)

    # ------------------------------------------------------------------ canonical <-> encoded
    def encode_attribute(self, name: str, values: Any) -> torch.Tensor:
        """Canonical values of one attribute (any array-like of length B) -> ``(B, dim)`` float tensor."""
        var = self.graph[name]
        t = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
        t = t.reshape(-1)
        if var.kind == AttributeKind.CONTINUOUS:
            low, high = var.value_range  # type: ignore[misc]
            return ((t.float() - low) / (high - low) * 2.0 - 1.0).unsqueeze(-1)
        idx = t.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= var.num_classes):
            raise ValueError(f"'{name}' class index out of range [0, {var.num_classes - 1}]: {idx.tolist()}.")
        if var.kind == AttributeKind.BINARY:
            return idx.float().unsqueeze(-1)
        return torch.nn.functional.one_hot(idx, var.num_classes).float()

    def decode_attribute(self, name: str, encoded: torch.Tensor) -> torch.Tensor:
        """``(B, dim)`` encoding (or probabilities/logits of the same layout) -> canonical ``(B,)`` values.

        Binary encodings are thresholded at 0.5, categorical ones take the arg-max, continuous ones are
        mapped back from ``[-1, 1]`` to original units.
        """
        var = self.graph[name]
        encoded = torch.as_tensor(encoded)
        if encoded.ndim == 1:
            encoded = encoded.unsqueeze(-1)
        if var.kind == AttributeKind.CONTINUOUS:
            low, high = var.value_range  # type: ignore[misc]
            return (encoded[:, 0].float() + 1.0) / 2.0 * (high - low) + low
        if var.kind == AttributeKind.BINARY:
            return (encoded[:, 0] > 0.5).long()
        return encoded.argmax(dim=-1)

    def encode(self, values: Mapping[str, Any], names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Encode canonical values of ``names`` (default: all attributes present in ``values``)."""
        names = (
            self.graph.check_names(names) if names is not None else [n for n in self.graph.attributes if n in values]
        )
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError(f"Attributes {missing} are missing; got keys {sorted(values)}.")
        return {n: self.encode_attribute(n, values[n]) for n in names}

    def decode(self, encoded: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: self.decode_attribute(n, v) for n, v in encoded.items() if n in self.graph}

    # ------------------------------------------------------------------ vectors for networks
    def concat(self, encoded: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
        """Concatenate per-attribute encodings of ``names``, in that order, into ``(B, sum(dim))``."""
        missing = [n for n in names if n not in encoded]
        if missing:
            raise ValueError(f"Encoded attributes {missing} are missing; got {sorted(encoded)}.")
        return torch.cat([encoded[n].float() for n in names], dim=-1)

    def split(self, vector: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`concat`."""
        widths = [self.graph[n].dim for n in names]
        if vector.shape[-1] != sum(widths):
            raise ValueError(f"Vector width {vector.shape[-1]} does not match {dict(zip(names, widths))}.")
        return dict(zip(names, torch.split(vector, widths, dim=-1)))

    def parents_vector(self, encoded: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The image parents' encodings concatenated in graph order: the HVAE's ``pa`` input."""
        return self.concat(encoded, self.graph.image_parents)

    @property
    def parents_dim(self) -> int:
        return self.graph.parents_dim

    # ------------------------------------------------------------------ parsing helpers
    def _continuous(self, var: Variable, raw: Any) -> float:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"'{var.name}' value {raw!r} is not a number.") from None
        low, high = var.value_range  # type: ignore[misc]
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"'{var.name}' value {value} is outside its range [{low}, {high}].")
        return value

    def _class_index(self, var: Variable, raw: Any) -> int:
        if isinstance(raw, str):
            text = raw.strip()
            if text in var.class_names:
                return var.class_names.index(text)
            lowered = [c.lower() for c in var.class_names]
            if text.lower() in lowered:
                return lowered.index(text.lower())
            try:
                raw = float(text)
            except ValueError:
                raise ValueError(
                    f"'{var.name}' has unknown category {raw!r}; expected one of {list(var.class_names)} "
                    f"or an index 0..{var.num_classes - 1}."
                ) from None
        try:
            number = float(raw)
        except (TypeError, ValueError):
            raise ValueError(
                f"'{var.name}' has unknown category {raw!r}; expected one of {list(var.class_names)}."
            ) from None
        if not number.is_integer() or not 0 <= number < var.num_classes:
            raise ValueError(
                f"'{var.name}' has unknown category {raw!r}; expected one of {list(var.class_names)} "
                f"or an index 0..{var.num_classes - 1}."
            )
        return int(number)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == "" or value.strip().lower() == "nan"
    try:
        return bool(np.isnan(value))
    except (TypeError, ValueError):
        return False


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
