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
"""Exponential moving average (EMA) of a network's weights, and the Ignite handler that keeps it up to date."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from monai.engines.utils import IterationEvents
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["EMA_WARMUPS", "ExponentialMovingAverage", "EMAUpdateHandler", "unwrap_module"]

#: Decay schedules :class:`ExponentialMovingAverage` accepts.
EMA_WARMUPS = ("inverse", "tf", "none")


def unwrap_module(module: nn.Module) -> nn.Module:
    """The network inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (the module itself otherwise)."""
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module


class ExponentialMovingAverage(nn.Module):
    """A copy of a network whose weights track an exponential moving average of the network's weights.

    After update ``n`` (counted from 0) the EMA weights are ``ema = decay_n * ema + (1 - decay_n) * weights``;
    buffers (e.g. batch-norm statistics) are copied, not averaged. Decay schedules (``warmup``):

    - ``"inverse"`` (default, as the reference causal-gen code through ``ema-pytorch``'s defaults): the weights are
      copied for the first ``warmup_steps`` updates, then ``decay = min(rate, 1 - 1 / (1 + t))`` with ``t`` the
      number of updates after the copy phase, i.e. a running mean that turns into a ``rate`` EMA after
      about ``1 / (1 - rate)`` updates (1,000 for ``rate=0.999``);
    - ``"tf"``: ``decay = min(rate, (1 + n) / (10 + n))`` from the first update (TensorFlow's
      ``ExponentialMovingAverage(num_updates=...)``); ``warmup_steps`` is ignored;
    - ``"none"``: ``decay = rate`` throughout.

    The decay is computed on the host from an update counter, and the average is one fused
    ``torch._foreach_lerp_`` over the parameters, so an update adds no host synchronisation. The counter is part
    of :meth:`state_dict` (as extra state), so a resumed run continues the same schedule. Calling the module
    calls the averaged network.

    Args:
        model: the network to track (``DistributedDataParallel`` wrappers are looked through).
        rate: the decay once the warm-up is over.
        warmup: the decay schedule, one of ``EMA_WARMUPS``.
        warmup_steps: updates that copy the weights before averaging starts (``"inverse"`` only).

    Example::

        ema = ExponentialMovingAverage(model, rate=0.999)
        for batch in loader:
            loss = model(batch).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            ema.update(model)
        ema.module  # the averaged network (also ema(x) calls it)
    """

    def __init__(self, model: nn.Module, rate: float = 0.999, warmup: str = "inverse", warmup_steps: int = 100):
        super().__init__()
        if not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"EMA rate must be in [0, 1), got {rate}.")
        if warmup not in EMA_WARMUPS:
            raise ValueError(f"EMA warmup must be one of {list(EMA_WARMUPS)}, got {warmup!r}.")
        if int(warmup_steps) < 0:
            raise ValueError(f"EMA warmup_steps must be >= 0, got {warmup_steps}.")
        self.rate = float(rate)
        self.warmup = warmup
        self.warmup_steps = int(warmup_steps)
        self.num_updates = 0
        self.module = copy.deepcopy(unwrap_module(model))
        self.module.requires_grad_(False)
        self.module.eval()
        self.training = False

    def decay(self, num_updates: int | None = None) -> float:
        """The decay applied by update number ``num_updates`` (0-based; default: the next update)."""
        n = self.num_updates if num_updates is None else int(num_updates)
        if self.warmup == "none":
            return self.rate
        if self.warmup == "tf":
            return min(self.rate, (1.0 + n) / (10.0 + n))
        if n < self.warmup_steps:
            return 0.0
        t = n - self.warmup_steps
        return min(self.rate, 1.0 - 1.0 / (1.0 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards the current weights of ``model``."""
        model = unwrap_module(model)
        ema_params = [p for p in self.module.parameters()]
        params = [p for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError(
                f"The EMA copy has {len(ema_params)} parameters but the model has {len(params)}; "
                "update() must get the network the EMA was built from."
            )
        decay = self.decay()
        if decay == 0.0:
            torch._foreach_copy_(ema_params, [p.detach() for p in params])
        else:
            floating = [(e, p.detach()) for e, p in zip(ema_params, params) if e.is_floating_point()]
            if floating:
                ema_float, model_float = (list(t) for t in zip(*floating))
                torch._foreach_lerp_(ema_float, model_float, 1.0 - decay)
            for e, p in zip(ema_params, params):
                if not e.is_floating_point():
                    e.copy_(p)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
        self.num_updates += 1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> ExponentialMovingAverage:
        # The average is an inference copy: it stays in eval mode unless its ``module`` is switched explicitly.
        return self

    def get_extra_state(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "rate": self.rate, "warmup": self.warmup}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])

    def extra_repr(self) -> str:
        return f"rate={self.rate}, warmup={self.warmup!r}, warmup_steps={self.warmup_steps}, updates={self.num_updates}"


class EMAUpdateHandler:
    """Ignite handler that updates an :class:`ExponentialMovingAverage` after each optimiser step.

    It runs on MONAI's ``IterationEvents.MODEL_COMPLETED`` (fired inside the iteration, after the optimiser
    step), so handlers on ``ITERATION_COMPLETED``, e.g. checkpoint savers, always see the updated average; for
    engines that do not fire it, pass ``event=Events.ITERATION_COMPLETED``. Iterations whose update was skipped
    (``engine.state.step_skipped`` true, see :func:`monai_cf.engines.guarded_optimizer_step`) leave the average
    alone.

    Ignite's ``ignite.handlers.EMAHandler`` keeps an average model of its own with one momentum schedule; this
    handler updates a given :class:`ExponentialMovingAverage` (inverse/tf/no warm-up, its own copy phase, saved in
    the checkpoints with the model), hence another name.

    Args:
        ema: the average to update.
        model: the trained network (default: ``engine.network`` at attach time).
        event: the Ignite event to update on.

    Example::

        ema = ExponentialMovingAverage(network, rate=0.999)
        EMAUpdateHandler(ema).attach(trainer)  # a MONAI SupervisedTrainer
    """

    def __init__(self, ema: ExponentialMovingAverage, model: nn.Module | None = None, event: Any = None) -> None:
        self.ema = ema
        self.model = model
        self.event = IterationEvents.MODEL_COMPLETED if event is None else event

    def attach(self, engine: Engine) -> None:
        if self.model is None:
            self.model = getattr(engine, "network", None)
            if self.model is None:
                raise ValueError(
                    "EMAUpdateHandler needs a model: pass model=..., or attach it to an engine with .network."
                )
        engine.add_event_handler(self.event, self)

    def __call__(self, engine: Engine) -> None:
        if getattr(engine.state, "step_skipped", False):
            return
        self.ema.update(self.model)  # type: ignore[arg-type]
