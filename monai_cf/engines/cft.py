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
"""Counterfactual fine-tuning of the HVAE: none, hard (De Sousa Ribeiro et al.) or soft (Soft-CFT)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from monai.engines.utils import IterationEvents
from monai.utils import convert_to_tensor
from torch import nn

from monai_cf.engines.cft_targets import (
    CFT_MODES,
    INTERVENED_TARGETS,
    DampedLagrangian,
    affected_mask,
    cft_targets,
    sample_interventions,
)
from monai_cf.engines.distributed import is_distributed
from monai_cf.engines.hvae_trainer import HVAETrainer, model_inputs, resolve_image_model
from monai_cf.engines.optimizers import OptimizerFactory, guarded_optimizer_step
from monai_cf.engines.trainer_factory import attach_stage_handlers, create_optimizer, training_device, world_size
from monai_cf.engines.training_handlers import OutputSummary
from monai_cf.losses import AttributeLoss
from monai_cf.networks.nets.mechanisms import counterfactual_all
from monai_cf.networks.nets.predictor import AttributePredictor
from monai_cf.networks.scm import DeepSCM

__all__ = ["CFT_OUTPUT_KEYS", "CFT_TRAINABLE", "CounterfactualFineTuner", "measure_nelbo", "create_cft_trainer"]

#: what fine-tuning updates: the whole HVAE (the reference), or only the pathway of the parents into it
CFT_TRAINABLE = ("all", "parents")

CFT_OUTPUT_KEYS = (
    "loss",
    "nelbo",
    "nll",
    "kl",
    "predictor_loss",
    "lagrange_multiplier",
    "cf_accuracy",
    "grad_norm",
    "skipped",
)


class CounterfactualFineTuner(HVAETrainer):
    """Counterfactual fine-tuning (CFT) of a DeepSCM's HVAE with a frozen guidance predictor: Algorithm 1.

    Every iteration, each sample of the batch is intervened on one image parent chosen at random, with the value
    of another sample of the batch; descendants are recomputed by the (frozen) attribute mechanisms. The HVAE
    decodes the counterfactual ``x*`` (latents and pixel noise abducted from ``x``) and the guidance predictor is
    asked to recover, from ``x*``:

    - the counterfactual value of the intervened attribute and of its descendants (hard labels);
    - for the other image parents (the set A*, :meth:`CausalGraph.soft_target_set`): the factual label in
      ``mode="hard"``, or in ``mode="soft"`` the guidance predictor's probability on the *real* ``x``, so that
      attributes the intervention must not touch are not pushed to extremes (attribute amplification).

    The predictor loss (BCE / cross-entropy with soft targets, a regression loss for continuous attributes) is
    minimised under the constraint that the factual nELBO stays near ``elbo_constraint`` (its value before
    fine-tuning), through a :class:`~monai_cf.engines.cft_targets.DampedLagrangian` whose multiplier is learned
    by gradient ascent and kept ``>= 0``. Only the HVAE's weights change: the predictor and the mechanisms are
    frozen (``requires_grad`` off, eval mode). ``mode="none"`` runs the same iteration without any update: the
    no-CFT baseline, whose outputs (e.g. ``cf_accuracy``) are comparable with the fine-tuned runs.

    Gradient clipping/skipping, the EMA copy, checkpoint contents and DDP wrapping are those of
    :class:`~monai_cf.engines.HVAETrainer`; the multiplier and its optimiser are checkpointed too.

    Args:
        device: device to train on.
        max_epochs: number of epochs.
        train_data_loader: training batches (images and attributes, e.g. from :func:`monai_cf.data.csv_dataset`).
        network: the :class:`~monai_cf.networks.DeepSCM` to fine-tune (its HVAE is trained).
        optimizer: optimiser over the HVAE's parameters only (the reference: ``AdamW(lr=1e-4)``).
        guidance_predictor: the frozen predictor guiding fine-tuning (never the one used for evaluation).
        mode: ``"soft"``, ``"hard"`` or ``"none"``.
        elbo_constraint: the nELBO bound epsilon, normally :func:`measure_nelbo` of the pretrained model.
        damping: damping of the Lagrangian.
        lagrange_lr: learning rate of the multiplier's gradient ascent.
        lagrange_init: initial multiplier.
        predictor_loss: the loss on the predictor's outputs (default ``AttributeLoss`` over the image parents).
        intervene_on: attributes that may be intervened on (default: the image parents).
        force_change: discrete interventions always change the value (see
            :func:`~monai_cf.engines.cft_targets.sample_interventions`); the reference permutes the batch's
            values, which leaves about half of the binary interventions null.
        proximity_weight: weight of ``mean |x* - x|`` (images in ``[-1, 1]``) added to the predictor loss: edits
            as small as the targets allow, so pixels the intervention does not reach stay as they were (0: off,
            the reference objective).
        intervened_targets: ``"hard"``: the intervened attribute and its descendants target their counterfactual
            labels (Algorithm 1, the reference); ``"transported"``: the guidance predictor's reading of the real
            image carried to the counterfactual value
            (:func:`~monai_cf.engines.cft_targets.transported_reading`), which does not reward edits beyond what
            real images show.
        kwargs: further :class:`~monai_cf.engines.HVAETrainer` arguments (``grad_clip``, ``ema_rate``, ``seed``...).

    Example::

        epsilon = measure_nelbo(scm, train_loader)
        optimizer = torch.optim.AdamW(scm.image_model.parameters(), lr=1e-4, betas=(0.9, 0.9))
        tuner = CounterfactualFineTuner("cpu", 2, train_loader, scm, optimizer, guidance, mode="soft",
                                        elbo_constraint=epsilon)
        tuner.run()
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        guidance_predictor: AttributePredictor,
        mode: str = "soft",
        elbo_constraint: float | None = None,
        damping: float = 10.0,
        lagrange_lr: float = 0.1,
        lagrange_init: float = 0.0,
        predictor_loss: nn.Module | None = None,
        intervene_on: Sequence[str] | None = None,
        force_change: bool = False,
        proximity_weight: float = 0.0,
        intervened_targets: str = "hard",
        **kwargs: Any,
    ) -> None:
        if mode not in CFT_MODES:
            raise ValueError(f"mode must be one of {CFT_MODES}, got '{mode}'.")
        _, scm = resolve_image_model(network)
        if scm is None:
            raise ValueError("Counterfactual fine-tuning needs a DeepSCM (graph and mechanisms), not a bare HVAE.")
        if mode != "none" and elbo_constraint is None:
            raise ValueError("elbo_constraint is required for hard/soft fine-tuning; see measure_nelbo().")
        kwargs.setdefault("warmup_steps", 0)
        decollate = kwargs.pop("decollate", True)
        super().__init__(device, max_epochs, train_data_loader, network, optimizer, decollate=False, **kwargs)
        self.mode = mode
        self.graph = scm.graph
        self.intervene_on = tuple(self.graph.check_names(intervene_on or self.graph.image_parents))
        self.force_change = bool(force_change)
        if proximity_weight < 0:
            raise ValueError(f"proximity_weight must be >= 0, got {proximity_weight}.")
        self.proximity_weight = float(proximity_weight)
        if intervened_targets not in INTERVENED_TARGETS:
            raise ValueError(f"intervened_targets must be one of {INTERVENED_TARGETS}, got '{intervened_targets}'.")
        self.intervened_targets = intervened_targets
        self.guidance_predictor = guidance_predictor.to(self.state.device)
        self.predictor_loss = predictor_loss or AttributeLoss(self.graph)
        frozen = [self.guidance_predictor, scm.mechanisms]
        for module in frozen:
            module.eval()
            module.requires_grad_(False)
        trainable = {id(p) for p in self.image_model.parameters()}
        foreign = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in trainable]
        if foreign:
            raise ValueError(
                f"The optimizer holds {len(foreign)} parameters outside the HVAE; CFT updates the HVAE only."
            )
        epsilon = float("nan") if elbo_constraint is None else float(elbo_constraint)
        self.lagrangian = DampedLagrangian(epsilon, damping=damping, initial=lagrange_init).to(self.state.device)
        self.lagrange_optimizer = torch.optim.AdamW(
            self.lagrangian.parameters(), lr=lagrange_lr, maximize=True, weight_decay=0.0
        )
        if decollate:
            OutputSummary(CFT_OUTPUT_KEYS).attach(self)

    def checkpoint_dict(self) -> dict[str, Any]:
        objects = super().checkpoint_dict()
        objects["lagrangian"] = self.lagrangian
        objects["lagrange_optimizer"] = self.lagrange_optimizer
        return objects

    def _iteration(self, engine: CounterfactualFineTuner, batchdata: dict[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        x, pa, image = model_inputs(batch, engine.image_range, engine.scm)
        scm = engine.scm
        encoded = scm.encode_attributes(batch.attributes, image.shape[0], image.device)
        with torch.no_grad():
            interventions = sample_interventions(
                engine.graph, encoded, attributes=engine.intervene_on, force_change=engine.force_change
            )
            encoded_cf = counterfactual_all(
                scm.mechanisms, engine.graph, encoded, interventions.do, interventions.do_mask
            )
            pa_cf = scm.parents_vector(encoded_cf)
            real_probabilities = None
            if engine.mode == "soft" or engine.intervened_targets == "transported":
                real_probabilities = engine.guidance_predictor.probabilities(image)
        training = engine.mode != "none"
        engine.forward_module.train(training)
        engine.optimizer.zero_grad(set_to_none=True)
        engine.lagrange_optimizer.zero_grad(set_to_none=True)
        mixed = engine.amp and engine.scaler is not None
        precision = torch.autocast("cuda", **engine.amp_kwargs) if mixed else contextlib.nullcontext()
        with torch.set_grad_enabled(training):
            with precision:
                terms = engine.forward_module(x, pa, beta=engine.beta, free_bits=engine.free_bits, pa_cf=pa_cf)
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                outputs = engine.guidance_predictor(scm.from_model_range(terms["x_cf"]))
            outputs = {k: v.float() for k, v in outputs.items()}
            terms = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in terms.items()}
            affected = affected_mask(engine.graph, interventions)
            targets = cft_targets(
                engine.graph,
                "hard" if engine.mode == "none" else engine.mode,
                encoded,
                encoded_cf,
                affected,
                real_probabilities,
                engine.intervened_targets if training else "hard",
            )
            predictor_loss = engine.predictor_loss(outputs, targets)
            objective = predictor_loss
            if engine.proximity_weight:
                objective = objective + engine.proximity_weight * (terms["x_cf"] - x).abs().mean()
            loss = engine.lagrangian(objective, terms["nelbo"]) if training else objective
        engine.state.output = {
            "loss": loss.detach(),
            "nelbo": terms["nelbo"].detach(),
            "nll": terms["nll"].detach(),
            "kl": terms["kl"].detach(),
            "predictor_loss": predictor_loss.detach(),
            "lagrange_multiplier": engine.lagrangian.multiplier.detach().clone(),
            "cf_accuracy": _intervened_accuracy(engine.graph, interventions, outputs, encoded_cf),
        }
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        skipped = True
        grad_norm = torch.zeros((), device=image.device)
        if training:
            if mixed:
                engine.scaler.scale(loss).backward()
            else:
                loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            grad_norm, skipped = guarded_optimizer_step(
                engine,
                engine.optimizer,
                loss,
                parameters=list(engine.image_model.parameters()),
                grad_clip=engine.grad_clip,
                grad_skip=engine.grad_skip,
                scaler=engine.scaler if mixed else None,
            )
            if not skipped:
                if mixed:  # the scaler unscaled the HVAE's gradients only
                    engine.lagrangian.multiplier.grad /= engine.scaler.get_scale()
                if is_distributed():
                    # Each rank sees its own nELBO; the multiplier must follow the global mean to stay in lockstep.
                    grad = engine.lagrangian.multiplier.grad
                    torch.distributed.all_reduce(grad)
                    grad /= torch.distributed.get_world_size()
                engine.lagrange_optimizer.step()
                engine.lagrangian.clamp_()
                if engine.lr_scheduler is not None:
                    engine.lr_scheduler.step()
            engine.lagrange_optimizer.zero_grad(set_to_none=True)
        else:
            engine.state.step_skipped = True
        engine.state.output["grad_norm"] = grad_norm
        engine.state.output["skipped"] = int(skipped and training)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def _intervened_accuracy(
    graph: Any, interventions: Any, outputs: Mapping[str, torch.Tensor], encoded_cf: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Share of samples whose discrete intervened attribute the predictor reads correctly from ``x*``."""
    correct = torch.zeros((), device=interventions.chosen.device)
    counted = torch.zeros((), device=interventions.chosen.device)
    for name in interventions.attributes:
        var = graph[name]
        if not var.is_discrete:
            continue
        mask = interventions.do_mask[name]
        if var.num_classes == 2 and outputs[name].shape[-1] == 1:
            predicted = (outputs[name][:, 0] > 0).long()
            wanted = encoded_cf[name][:, 0].long()
        else:
            predicted = outputs[name].argmax(-1)
            wanted = encoded_cf[name].argmax(-1)
        correct = correct + ((predicted == wanted) & mask).sum()
        counted = counted + mask.sum()
    return correct / counted.clamp(min=1)


@torch.no_grad()
def measure_nelbo(
    network: nn.Module, data_loader: Iterable, max_batches: int | None = 20, device: str | torch.device | None = None
) -> float:
    """Mean nELBO (nats per pixel) of a DeepSCM's HVAE over (at most ``max_batches`` of) ``data_loader``.

    Its value before fine-tuning is the ``elbo_constraint`` of :class:`CounterfactualFineTuner`.

    Example::

        epsilon = measure_nelbo(scm, train_loader, max_batches=20)
    """
    image_model, scm = resolve_image_model(network)
    device = torch.device(device) if device is not None else next(image_model.parameters()).device
    was_training = image_model.training
    image_model.eval()
    total, count = 0.0, 0
    try:
        for index, batchdata in enumerate(data_loader):
            if max_batches is not None and index >= max_batches:
                break
            image = convert_to_tensor(batchdata["image"], track_meta=False).to(device, torch.float32)
            if scm is not None:
                attributes = {n: batchdata[n] for n in scm.graph.attributes}
                terms = scm.elbo(image, attributes)
            else:
                pa = convert_to_tensor(batchdata["pa"], track_meta=False).to(device)
                terms = image_model.elbo(image * 2.0 - 1.0, pa)
            total += float(terms["nelbo"]) * image.shape[0]
            count += image.shape[0]
    finally:
        image_model.train(was_training)
    if count == 0:
        raise ValueError("measure_nelbo got no batch from the data loader.")
    return total / count


def create_cft_trainer(
    network: DeepSCM,
    guidance_predictor: AttributePredictor,
    train_loader: Any,
    mode: str = "soft",
    output_dir: str | os.PathLike | None = None,
    max_epochs: int = 1,
    elbo_constraint: float | None = None,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    betas: Sequence[float] = (0.9, 0.9),
    optimizer: OptimizerFactory | None = None,
    damping: float = 10.0,
    lagrange_lr: float = 0.1,
    grad_clip: float | None = 100.0,
    grad_skip: float | None = 1000.0,
    ema_rate: float | None = 0.999,
    device: str | torch.device | None = None,
    seed: int = 0,
    constraint_batches: int = 20,
    distributed: bool | None = None,
    force_change: bool = False,
    warmup_steps: int = 0,
    proximity_weight: float = 0.0,
    trainable: str = "all",
    intervened_targets: str = "hard",
    **handler_kwargs: Any,
) -> CounterfactualFineTuner:
    """A :class:`CounterfactualFineTuner` with the reference settings and the usual handlers, ready to ``run()``.

    AdamW over the HVAE (``lr`` 1e-4, ``weight_decay`` 0.05, betas (0.9, 0.9)), damping 10 and multiplier
    learning rate 0.1 as the Soft-CFT runs; the nELBO bound is measured on ``constraint_batches`` training batches
    when not given. ``force_change=True`` makes every discrete intervention change the value (the reference
    permutes the batch's values); ``warmup_steps`` ramps the learning rate up linearly (none by default), which
    lets a larger ``lr`` start without breaking the pretrained model. ``proximity_weight`` adds ``mean |x* - x|`` to
    the objective. ``trainable="parents"`` updates only the parents' pathway into the HVAE
    (:meth:`~monai_cf.networks.nets.HVAE.parents_pathway_parameters`; the other parameters get
    ``requires_grad=False``), so that fine-tuning changes how the parents act while the blocks that draw the image
    stay as the likelihood trained them. ``optimizer`` builds another optimiser from the trained parameters instead
    of AdamW (``lr``, ``betas`` and ``weight_decay`` are then unused), e.g. ``functools.partial(torch.optim.SGD,
    lr=1e-3)``; the multiplier keeps its own AdamW (``lagrange_lr``). Checkpoints, resume, progress bar and MLflow as
    :func:`~monai_cf.engines.create_hvae_trainer` (``handler_kwargs`` go to
    :func:`~monai_cf.engines.setup_training_handlers`).

    Example::

        tuner = create_cft_trainer(scm, guidance, train_loader, mode="soft", output_dir="runs/cft_soft",
                                   max_epochs=2, progress_bar=True)
        tuner.run()
    """
    device = training_device(device)
    network = network.to(device)
    if elbo_constraint is None and mode != "none":
        elbo_constraint = measure_nelbo(network, train_loader, constraint_batches, device)
    if trainable not in CFT_TRAINABLE:
        raise ValueError(f"trainable must be one of {CFT_TRAINABLE}, got {trainable!r}.")
    if trainable == "parents":
        parameters = network.image_model.parents_pathway_parameters()
        chosen = {id(p) for p in parameters}
        for p in network.image_model.parameters():
            p.requires_grad_(id(p) in chosen)  # no weight gradients for the frozen blocks: a cheaper backward
    else:
        parameters = list(network.image_model.parameters())
    optimizer_factory = optimizer
    optimizer = create_optimizer(optimizer_factory, parameters, lr, weight_decay, betas=betas)
    trainer = CounterfactualFineTuner(
        device=device,
        max_epochs=max_epochs,
        train_data_loader=train_loader,
        network=network,
        optimizer=optimizer,
        guidance_predictor=guidance_predictor,
        mode=mode,
        elbo_constraint=elbo_constraint,
        damping=damping,
        lagrange_lr=lagrange_lr,
        grad_clip=grad_clip,
        grad_skip=grad_skip,
        ema_rate=ema_rate,
        seed=seed,
        distributed=distributed,
        force_change=force_change,
        warmup_steps=warmup_steps,
        proximity_weight=proximity_weight,
        intervened_targets=intervened_targets,
    )
    stage_params = {
        "stage": f"cft_{mode}",
        "mode": mode,
        "lr": lr,
        "weight_decay": weight_decay,
        "damping": damping,
        "lagrange_lr": lagrange_lr,
        "elbo_constraint": elbo_constraint,
        "grad_clip": grad_clip,
        "grad_skip": grad_skip,
        "ema_rate": ema_rate,
        "batch_size": getattr(train_loader, "batch_size", None),
        "seed": seed,
        "force_change": force_change,
        "warmup_steps": warmup_steps,
        "proximity_weight": proximity_weight,
        "trainable": trainable,
        "intervened_targets": intervened_targets,
        "world_size": world_size(),
    }
    attach_stage_handlers(
        trainer, trainer.checkpoint_dict(), output_dir, stage_params, optimizer, optimizer_factory, handler_kwargs
    )
    return trainer
