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
"""The optimiser of a trainer factory: its default, or one the user's config builds from the parameters."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["OptimizerFactory", "build_optimizer", "check_factory", "describe_factory", "optimizer_params"]

#: builds an optimiser from parameters, e.g. ``functools.partial(torch.optim.SGD, lr=0.01)`` or, in a bundle
#: config, ``{"_target_": "torch.optim.SGD", "_mode_": "callable", "lr": 0.01}``
OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def check_factory(factory: Any, name: str, builds: str) -> None:
    """Raise a ``TypeError`` naming ``name`` unless ``factory`` is a callable config (not a built object).

    A bundle config builds a component unless it says ``_mode_: callable``; an already-built optimiser or
    network cannot be rebuilt for each stage and training process, so it is refused with that hint.
    """
    if isinstance(factory, (torch.optim.Optimizer, torch.nn.Module)) or not callable(factory):
        raise TypeError(
            f"{name} must build {builds} when called (a class or functools.partial; in a bundle config add "
            f"`_mode_: callable` beside its `_target_`), got a {type(factory).__name__} object."
        )


def describe_factory(factory: Callable[..., Any]) -> dict[str, Any]:
    """A factory as a bundle-style config: ``{"_target_": "torch.optim.SGD", "lr": 0.01, ...}``.

    Unfolds nested ``functools.partial`` s. The description is what stage settings record and compare (a stage
    trained with another optimiser or network is not reused) and what a checkpoint rebuilds a network from, so
    positional arguments, which it cannot name, are refused.

    Example::

        describe_factory(functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9))
        # {"_target_": "torch.optim.sgd.SGD", "lr": 0.01, "momentum": 0.9}
    """
    func, keywords = factory, {}
    while isinstance(func, functools.partial):
        if func.args:
            raise ValueError(f"{func!r}: give its arguments by name, so that the settings can record them.")
        keywords = {**func.keywords, **keywords}
        func = func.func
    module, qualname = getattr(func, "__module__", None), getattr(func, "__qualname__", None)
    if module is None or qualname is None or "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(f"{factory!r} is not importable by name; define it at the top level of a module.")
    return {"_target_": f"{module}.{qualname}", **keywords}


def build_optimizer(
    factory: OptimizerFactory | None,
    parameters: Iterable[torch.nn.Parameter],
    default: OptimizerFactory,
    name: str = "optimizer",
) -> torch.optim.Optimizer:
    """``factory(parameters)``, or ``default(parameters)`` when no factory is given.

    Args:
        factory: the user's optimiser factory (``None``: the default).
        parameters: the parameters to optimise.
        default: the trainer's own optimiser (AdamW with its settings).
        name: the setting's name in error messages.
    """
    if factory is None:
        return default(parameters)
    check_factory(factory, name, "a torch optimiser from the parameters")
    optimizer = factory(parameters)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{name} built a {type(optimizer).__name__}, not a torch.optim.Optimizer.")
    return optimizer


def optimizer_params(optimizer: torch.optim.Optimizer, factory: OptimizerFactory | None) -> dict[str, Any]:
    """Tracked parameters of a user's optimiser: its target, its settings and the learning rate it uses."""
    if factory is None:
        return {}
    description = describe_factory(factory)
    settings = {f"optimizer.{k}": v for k, v in description.items() if k != "_target_"}
    return {"optimizer": description["_target_"], **settings, "lr": optimizer.defaults.get("lr")}
