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
"""The attribute predictors' loss, with hard or soft targets, and the head layout it and the predictors share."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai_cf.graph import AttributeKind, CausalGraph

__all__ = ["AttributeLoss", "attribute_head_dim", "supervised_attributes"]

#: Log standard deviations of continuous heads are clipped to this range in the Gaussian NLL.
_LOG_SCALE_RANGE = (-7.0, 5.0)


def attribute_head_dim(graph: CausalGraph, name: str) -> int:
    """Width of a predictor head: 1 logit (binary), ``K`` logits (categorical), mean and log-scale (continuous)."""
    var = graph[name]
    if var.kind == AttributeKind.CONTINUOUS:
        return 2
    return var.num_classes if var.kind == AttributeKind.CATEGORICAL else 1


def supervised_attributes(graph: CausalGraph, attributes: Sequence[str] | None) -> list[str]:
    """The attributes a predictor (and its loss) cover: ``attributes`` checked, or the image's parents."""
    names = list(graph.image_parents) if attributes is None else graph.check_names(attributes)
    if not names:
        raise ValueError("A predictor needs at least one attribute.")
    if len(set(names)) != len(names):
        raise ValueError(f"Attributes listed twice: {names}.")
    return names


class AttributeLoss(nn.Module):
    """Per-attribute supervision of :class:`AttributePredictor` outputs, with hard or soft targets.

    - binary: binary cross-entropy with logits; the target is ``0/1`` or a probability in ``[0, 1]``,
      ``(B,)`` or ``(B, 1)``;
    - categorical: cross-entropy; the target is class indices ``(B,)`` (or ``(B, 1)``) or probabilities
      ``(B, K)`` whose rows sum to 1 (a one-hot row gives the same loss as its index);
    - continuous: ``"mse"`` on the predicted mean, or ``"gaussian_nll"`` with the predicted log standard
      deviation (clipped to ``[-7, 5]``); targets in encoded ``[-1, 1]`` units, ``(B,)`` or ``(B, 1)``.

    Args:
        graph: a :class:`~monai_cf.graph.CausalGraph` or anything :meth:`CausalGraph.build` accepts.
        attributes: the attributes to supervise (default: the image's parents).
        weights: optional per-attribute weights of the total (default 1 each).
        continuous: ``"mse"`` or ``"gaussian_nll"``.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` for per-sample ``(B,)`` losses.

    Calling it returns the weighted total; with ``return_parts=True`` it returns ``(total, parts)`` where
    ``parts`` maps every attribute to its unweighted loss.

    Example::

        loss_fn = AttributeLoss("mimic_cxr")
        outputs = predictor(images)
        targets = {"sex": torch.tensor([1, 0]), "race": torch.tensor([[0.2, 0.7, 0.1], [1.0, 0.0, 0.0]]),
                   "age": torch.tensor([0.1, -0.4]), "disease": torch.tensor([[0.9], [0.0]])}
        total, parts = loss_fn(outputs, targets, return_parts=True)
    """

    def __init__(
        self,
        graph: CausalGraph | Mapping | str,
        attributes: Sequence[str] | None = None,
        weights: Mapping[str, float] | None = None,
        continuous: str = "mse",
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.graph = CausalGraph.build(graph)
        self.attributes = supervised_attributes(self.graph, attributes)
        weights = dict(weights or {})
        unknown = [n for n in weights if n not in self.attributes]
        if unknown:
            raise ValueError(f"Weights given for {unknown}, which are not supervised; attributes: {self.attributes}.")
        self.weights = {n: float(weights.get(n, 1.0)) for n in self.attributes}
        if continuous not in ("mse", "gaussian_nll"):
            raise ValueError(f"continuous must be 'mse' or 'gaussian_nll', got '{continuous}'.")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got '{reduction}'.")
        self.continuous = continuous
        self.reduction = reduction

    def forward(
        self,
        outputs: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        return_parts: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {}
        for name in self.attributes:
            if name not in outputs:
                raise ValueError(f"Predictor output for '{name}' is missing; got {sorted(outputs)}.")
            if name not in targets:
                raise ValueError(f"Target for '{name}' is missing; got {sorted(targets)}.")
            per_sample = self.attribute_loss(name, outputs[name], targets[name])
            if self.reduction == "mean":
                parts[name] = per_sample.mean()
            elif self.reduction == "sum":
                parts[name] = per_sample.sum()
            else:
                parts[name] = per_sample
        total = sum(self.weights[n] * parts[n] for n in self.attributes)
        return (total, parts) if return_parts else total

    def attribute_loss(self, name: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The per-sample ``(B,)`` loss of one attribute."""
        var = self.graph[name]
        expected = attribute_head_dim(self.graph, name)
        if output.ndim != 2 or output.shape[-1] != expected:
            raise ValueError(f"Output for '{name}' must have shape (B, {expected}), got {tuple(output.shape)}.")
        batch = output.shape[0]
        target = torch.as_tensor(target, device=output.device)
        if var.kind == AttributeKind.CATEGORICAL:
            return self._categorical(name, output, target, batch)
        target = _column(name, target, batch).to(output.dtype)
        if var.kind == AttributeKind.BINARY:
            if ((target < 0) | (target > 1)).any():
                raise ValueError(f"Binary target of '{name}' must be 0/1 or a probability in [0, 1].")
            return F.binary_cross_entropy_with_logits(output, target, reduction="none")[:, 0]
        mean = output[:, 0]
        if self.continuous == "mse":
            return (mean - target[:, 0]) ** 2
        log_scale = output[:, 1].clamp(*_LOG_SCALE_RANGE)
        return 0.5 * ((target[:, 0] - mean) * torch.exp(-log_scale)) ** 2 + log_scale + 0.5 * math.log(2 * math.pi)

    def _categorical(self, name: str, logits: torch.Tensor, target: torch.Tensor, batch: int) -> torch.Tensor:
        num_classes = logits.shape[-1]
        if target.ndim == 2 and target.shape == (batch, num_classes) and target.is_floating_point():
            if (target < 0).any() or not torch.allclose(target.sum(-1), torch.ones_like(target[:, 0]), atol=1e-3):
                raise ValueError(f"Soft target of '{name}' must hold probabilities whose rows sum to 1.")
            return -(target.to(logits.dtype) * torch.log_softmax(logits, dim=-1)).sum(-1)
        index = _column(name, target, batch)[:, 0]
        if index.is_floating_point():
            if not torch.equal(index, index.round()):
                raise ValueError(
                    f"Target of '{name}' must be class indices (B,) or probabilities (B, {num_classes}), "
                    f"got non-integer values of shape {tuple(target.shape)}."
                )
        index = index.long()
        if ((index < 0) | (index >= num_classes)).any():
            raise ValueError(f"Class index target of '{name}' out of range [0, {num_classes - 1}].")
        return F.cross_entropy(logits, index, reduction="none")


def _column(name: str, target: torch.Tensor, batch: int) -> torch.Tensor:
    if target.ndim == 1:
        target = target.unsqueeze(-1)
    if target.ndim != 2 or target.shape != (batch, 1):
        raise ValueError(f"Target of '{name}' must have shape ({batch},) or ({batch}, 1), got {tuple(target.shape)}.")
    return target
