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
"""The pieces of counterfactual fine-tuning (Algorithm 1 of Soft-CFT) that do not depend on an engine.

- :func:`~monai_cf.interventions.sample_interventions` (in ``interventions``, imported here for old imports): one
  random image parent per sample, its value taken from another sample;
- :func:`cft_targets`: the predictor targets for the counterfactual images, hard or soft;
- :class:`~monai_cf.losses.DampedLagrangian` (in ``losses``): the constraint that keeps the nELBO near its value
  before fine-tuning.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from monai_cf.graph import CausalGraph
from monai_cf.interventions import InterventionBatch, sample_interventions
from monai_cf.losses.lagrangian import DampedLagrangian

__all__ = [
    "CFT_MODES",
    "INTERVENED_TARGETS",
    "InterventionBatch",
    "sample_interventions",
    "affected_mask",
    "cft_targets",
    "transported_reading",
    "DampedLagrangian",
]

#: ``none``: no fine-tuning (the baseline); ``hard``: factual labels for A*; ``soft``: predictor probabilities.
CFT_MODES = ("none", "hard", "soft")
#: targets of the intervened attributes and their descendants: ``hard`` counterfactual labels (Algorithm 1), or
#: the real image's reading ``transported`` to the counterfactual value (:func:`transported_reading`)
INTERVENED_TARGETS = ("hard", "transported")


def affected_mask(graph: CausalGraph, interventions: InterventionBatch) -> dict[str, torch.Tensor]:
    """Per image parent, ``(B,)`` booleans: intervened on, or a descendant of the sample's intervention.

    The complement is the per-sample soft target set A* (:meth:`CausalGraph.soft_target_set`).
    """
    masks = {name: torch.zeros_like(interventions.chosen, dtype=torch.bool) for name in graph.image_parents}
    for index, name in enumerate(interventions.attributes):
        reach = {name} | graph.descendants(name)
        for target in reach & set(masks):
            masks[target] = masks[target] | (interventions.chosen == index)
    return masks


def transported_reading(
    graph: CausalGraph,
    name: str,
    factual: torch.Tensor,
    counterfactual: torch.Tensor,
    reading: torch.Tensor,
) -> torch.Tensor:
    """The predictor's reading of a real image carried over to the attribute's counterfactual value.

    A counterfactual should be as typical of its new value as the real image was of its old one, no more: a
    hard label asks the predictor for certainty, which real images rarely give, and fine-tuning then exaggerates
    the edit. The reading moves with the value:

    - binary: ``p*(1) = p(1)`` where the value is unchanged, ``1 - p(1)`` where it flips (the confidence in the
      factual class becomes the confidence in the counterfactual one);
    - categorical: the probabilities of the factual and the counterfactual class swap places;
    - continuous: the predicted mean shifted by the change of the value, ``m + (a* - a)`` (the predictor's
      error on the real image is kept), clipped to the encoded range ``[-1, 1]``.

    Args:
        graph: the causal graph.
        name: the attribute.
        factual: encoded factual values ``(B, dim)``.
        counterfactual: encoded counterfactual values ``(B, dim)``.
        reading: the predictor's reading of the real images, as
            :meth:`~monai_cf.networks.AttributePredictor.probabilities` gives it.

    Example::

        transported_reading(graph, "sex", torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.tensor([[0.2]]))
        # tensor([[0.8]]): read as female as surely as the real image was read as male
    """
    var = graph[name]
    reading = reading.float().reshape(factual.shape)
    if not var.is_discrete:
        return (reading + (counterfactual.float() - factual.float())).clamp(-1.0, 1.0)
    if factual.shape[-1] == 1:
        flipped = (counterfactual != factual).float()
        return reading + flipped * (1.0 - 2.0 * reading)
    old, new = factual.argmax(-1, keepdim=True), counterfactual.argmax(-1, keepdim=True)
    return reading.scatter(-1, new, reading.gather(-1, old)).scatter(-1, old, reading.gather(-1, new))


def cft_targets(
    graph: CausalGraph,
    mode: str,
    factual: Mapping[str, torch.Tensor],
    counterfactual: Mapping[str, torch.Tensor],
    affected: Mapping[str, torch.Tensor],
    real_probabilities: Mapping[str, torch.Tensor] | None = None,
    intervened: str = "hard",
) -> dict[str, torch.Tensor]:
    """Targets of the guidance predictor on counterfactual images (Algorithm 1).

    Attributes that are intervened on or descend from the intervention get their counterfactual value (a
    hard label). The others, the set A*, get the factual label in ``"hard"`` mode and the guidance
    predictor's reading of the *real* image in ``"soft"`` mode, for every kind of attribute: its probability
    for a discrete attribute, its predicted mean (in encoded units) for a continuous one, so that the loss on
    the counterfactual (cross-entropy; MSE or Gaussian NLL on the mean) asks for the reading the real image
    had, not for the label.

    Args:
        graph: the causal graph.
        mode: ``"hard"`` or ``"soft"``.
        factual: encoded factual attributes, ``(B, dim)``.
        counterfactual: encoded counterfactual attributes, ``(B, dim)``.
        affected: from :func:`affected_mask`.
        real_probabilities: the predictor's readings of the real images, as
            :meth:`~monai_cf.networks.AttributePredictor.probabilities` returns them (``(B, 1)`` for binary,
            ``(B, K)`` for categorical, the mean ``(B, 1)`` for continuous), needed in soft mode and for
            transported targets.
        intervened: ``"hard"``: the intervened attribute and its descendants target their counterfactual value
            (Algorithm 1); ``"transported"``: the real image's reading carried to that value
            (:func:`transported_reading`), so that the edit is not pushed beyond what real images show.

    Returns:
        ``{name: (B, dim)}`` targets in the layout :class:`~monai_cf.networks.nets.AttributeLoss` takes:
        probabilities for discrete attributes, encoded values for continuous ones.
    """
    if mode not in ("hard", "soft"):
        raise ValueError(f"Targets are defined for modes 'hard' and 'soft', got '{mode}'.")
    if intervened not in INTERVENED_TARGETS:
        raise ValueError(f"intervened must be one of {INTERVENED_TARGETS}, got '{intervened}'.")
    targets = {}
    for name in graph.image_parents:
        needs_reading = mode == "soft" or intervened == "transported"
        if needs_reading and (real_probabilities is None or name not in real_probabilities):
            raise ValueError(
                f"{mode} targets ({intervened} for the intervened) need the predictor's reading of the real images "
                f"for '{name}'."
            )
        unintervened = factual[name].float()
        if mode == "soft":
            unintervened = real_probabilities[name].float().reshape(unintervened.shape)
        changed = counterfactual[name].float()
        if intervened == "transported":
            changed = transported_reading(graph, name, factual[name], counterfactual[name], real_probabilities[name])
        mask = affected[name].reshape(-1, 1)
        targets[name] = torch.where(mask, changed, unintervened)
    return targets
