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
"""What an image mechanism must offer to be trained, fine-tuned and evaluated in place of the HVAE."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["IMAGE_MECHANISM_ATTRIBUTES", "IMAGE_MECHANISM_METHODS", "check_image_mechanism", "is_image_mechanism"]

#: what the DeepSCM, the pipeline and the evaluator read from an image mechanism
IMAGE_MECHANISM_ATTRIBUTES = ("spatial_dims", "in_channels", "spatial_size", "parents_dim")
#: ``elbo(x, pa, beta=None, free_bits=None) -> {"nelbo", "nll", "kl"}`` (scalars; the HVAE trainer minimises
#: ``nelbo``), ``counterfactual(x, pa, pa_cf, posterior_mean=False) -> x_cf`` (differentiable, ``pa_cf`` of shape
#: ``(B, P)`` or ``(K, B, P)`` for ``K`` counterfactuals of each image), ``sample(pa, t=1.0) -> x``; images in
#: ``[-1, 1]``, ``pa`` the ``(B, parents_dim)`` parents vector. Calling the module,
#: ``forward(x, pa, beta=None, free_bits=None, pa_cf=None)``, is ``elbo`` and, with ``pa_cf``, adds ``"x_cf"``: the
#: counterfactual with sampled latents (the trainers call the module so that ``DistributedDataParallel`` sees it)
IMAGE_MECHANISM_METHODS = ("elbo", "counterfactual", "sample")


def _missing(module: Any) -> list[str]:
    missing = [name for name in IMAGE_MECHANISM_ATTRIBUTES if not hasattr(module, name)]
    return missing + [f"{name}()" for name in IMAGE_MECHANISM_METHODS if not callable(getattr(module, name, None))]


def is_image_mechanism(module: Any) -> bool:
    """Whether ``module`` is an ``nn.Module`` with everything an HVAE-like image mechanism offers."""
    return isinstance(module, nn.Module) and not _missing(module)


def check_image_mechanism(module: Any, name: str = "image_model") -> None:
    """Raise a ``TypeError`` naming what ``module`` lacks to stand in for the HVAE.

    An HVAE-like image mechanism is an ``nn.Module`` with the attributes :data:`IMAGE_MECHANISM_ATTRIBUTES`
    (``spatial_size`` a tuple per spatial dimension) and the methods :data:`IMAGE_MECHANISM_METHODS`, and whose
    ``forward`` is its ``elbo`` (plus ``"x_cf"`` when given ``pa_cf``); optional
    ``beta`` / ``free_bits`` attributes are the defaults the trainer records. The HVAE trainer, counterfactual
    fine-tuning and the evaluation use nothing else.

    Example::

        check_image_mechanism(HVAE.from_preset("small32", parents_dim=6))  # passes
        check_image_mechanism(torch.nn.Linear(2, 2))  # TypeError: ... lacks spatial_dims, ..., elbo(), ...
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got a {type(module).__name__}.")
    missing = _missing(module)
    if missing:
        raise TypeError(
            f"{name} ({type(module).__name__}) lacks {', '.join(missing)}: an image mechanism in place of the HVAE "
            f"needs the attributes {', '.join(IMAGE_MECHANISM_ATTRIBUTES)} and the methods "
            f"{', '.join(m + '()' for m in IMAGE_MECHANISM_METHODS)} (see monai_cf.networks.nets.image_mechanism)."
        )
