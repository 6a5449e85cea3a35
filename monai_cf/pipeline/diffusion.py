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
"""The diffusion image mechanism in the bundle: trained beside the HVAE pipeline's models, evaluated with them."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from monai_cf.engines import create_diffusion_trainer
from monai_cf.engines.cft_targets import CFT_MODES
from monai_cf.networks import DeepSCM
from monai_cf.networks.nets import DiffusionGuidance, DiffusionImageMechanism
from monai_cf.pipeline.workflow import (
    STAGES,
    CounterfactualPipeline,
    _jsonable,
    _seeded,
    check_stage_parts,
    recorded_options,
)

__all__ = ["DiffusionPipeline", "DIFFUSION_FILE", "DIFFUSION_STAGES", "DEFAULT_GUIDANCE_TYPES"]

logger = logging.getLogger("monai_cf.pipeline")

#: the trained diffusion mechanism in ``models_dir``
DIFFUSION_FILE = "diffusion.pt"
#: the stages of a :class:`DiffusionPipeline`, in execution order (``hvae`` and ``cft`` only for the comparison)
DIFFUSION_STAGES = (*STAGES[:-1], "diffusion", STAGES[-1])
#: the diffusion counterfactual types evaluated by default
DEFAULT_GUIDANCE_TYPES = {
    "none": {"mode": "none"},
    "cfg_4": {"mode": "cfg", "weight": 4.0},
    "cfg_12": {"mode": "cfg", "weight": 12.0},
    "dcfg": {"mode": "dcfg", "intervened_weight": 4.0, "invariant_weight": 1.0},
}
DEFAULT_DIFFUSION_TRAINING = {"max_epochs": 20, "lr": 1e-3, "batch_size": 64}
_INFERENCE_KEYS = ("num_inference_steps", "max_batch", "guidance")
_TRAINING_OWNED = ("device", "seed", "output_dir", "progress_bar", "stats", "tracking_uri", "experiment_name")


class DiffusionPipeline(CounterfactualPipeline):
    """Train a :class:`~monai_cf.networks.nets.DiffusionImageMechanism` and evaluate its counterfactuals beside the
    HVAE's, with one :class:`~monai_cf.engines.CounterfactualEvaluator` on the same test images.

    Everything upstream is the :class:`CounterfactualPipeline`'s, with its files in the same ``models_dir``: the
    evaluation predictor, the attribute mechanisms (reused by the diffusion DeepSCM) and, for the comparison, the
    HVAE fine-tuned in ``compare_hvae`` modes. After the main job these are reused, so only the diffusion model
    trains. Its file ``diffusion.pt`` holds the weights, the mechanism's config and the settings that made it;
    an interrupted training resumes from ``models_dir/runs/diffusion``.

    The counterfactual types are ``diffusion_<name>`` for each entry of ``guidance_types`` (one trained model, its
    weights shared, see :meth:`DiffusionImageMechanism.with_guidance`) and ``hvae_<mode>`` for each mode of
    ``compare_hvae``.

    Args:
        args: :class:`CounterfactualPipeline` arguments (``dataset_dir``, ``output_dir``...).
        diffusion_model: :class:`DiffusionImageMechanism` keyword arguments; ``spatial_dims``, ``in_channels``,
            ``spatial_size`` and the parents come from the pipeline.
        diffusion_training: ``max_epochs``, ``batch_size`` and :func:`~monai_cf.engines.create_diffusion_trainer`
            arguments (``lr``, ``ema_rate``...).
        guidance_types: ``{name: DiffusionGuidance fields}``, the diffusion counterfactual types to evaluate.
        compare_hvae: fine-tuning modes of the HVAE evaluated beside them (``[]``: none).
        kwargs: further :class:`CounterfactualPipeline` arguments.

    Example::

        pipeline = DiffusionPipeline("data/phantom", "eval_diffusion", models_dir="models",
                                     phantom={"n_train": 4000, "n_val": 300, "n_test": 500, "seed": 0})
        pipeline.run()
        pipeline.results["amplification"]  # {"hvae_soft": ..., "diffusion_none": ..., "diffusion_dcfg": ...}
    """

    stages = DIFFUSION_STAGES

    def __init__(
        self,
        *args: Any,
        diffusion_model: Mapping[str, Any] | None = None,
        diffusion_training: Mapping[str, Any] | None = None,
        guidance_types: Mapping[str, Any] | None = None,
        compare_hvae: Sequence[str] = ("soft",),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.diffusion_model_config = self._diffusion_model_config(diffusion_model or {})
        self.diffusion_training = {**DEFAULT_DIFFUSION_TRAINING, **dict(diffusion_training or {})}
        owned = sorted(set(self.diffusion_training) & set(_TRAINING_OWNED))
        if owned:
            raise ValueError(
                f"diffusion_training.{owned[0]} is set by the pipeline; remove it from diffusion_training."
            )
        check_stage_parts("diffusion_training", self.diffusion_training)
        types = dict(DEFAULT_GUIDANCE_TYPES if guidance_types is None else guidance_types)
        if not types:
            raise ValueError("guidance_types is empty; name at least one diffusion counterfactual type.")
        self.guidance_types: dict[str, DiffusionGuidance] = {}
        for name, guidance in types.items():
            try:
                self.guidance_types[str(name)] = DiffusionGuidance.build(guidance)
            except ValueError as error:
                raise ValueError(f"guidance_types.{name}: {error}") from None
        compare = [compare_hvae] if isinstance(compare_hvae, str) else list(compare_hvae or [])
        unknown = sorted(set(compare) - set(CFT_MODES))
        if unknown:
            choices = ", ".join(CFT_MODES)
            raise ValueError(f"compare_hvae names unknown fine-tuning modes {unknown}; choose from {choices}.")
        self.compare_hvae = compare
        if compare:
            self.cft["modes"] = compare
        self.build_diffusion_scm()  # the mechanism's settings fail here, before anything trains

    def _diffusion_model_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        config = dict(config)
        for key, value in (
            ("spatial_dims", self.spatial_dims),
            ("in_channels", self.in_channels),
            ("spatial_size", self.spatial_size),
        ):
            if key in config and config[key] != value:
                raise ValueError(f"diffusion_model.{key}={config[key]} but the pipeline has {key}={value}.")
            config[key] = value
        config.pop("mechanism", None)
        config.setdefault("parent_dims", {name: self.graph[name].dim for name in self.graph.image_parents})
        return config

    def build_diffusion_scm(self) -> DeepSCM:
        """A fresh DeepSCM with this pipeline's graph and an untrained diffusion image mechanism."""
        return DeepSCM(self.graph, DiffusionImageMechanism(**self.diffusion_model_config))

    def _diffusion_settings(self) -> dict[str, Any]:
        settings = self._stage_settings("mechanisms")
        settings.pop("mechanisms")
        # how counterfactuals are generated (steps, batching) does not change what the model learns
        model = {k: v for k, v in self.diffusion_model_config.items() if k not in _INFERENCE_KEYS}
        return {**settings, "diffusion_model": model, "training": recorded_options(self.diffusion_training)}

    # ------------------------------------------------------------------------------------------------ stages
    def stage_diffusion(self) -> DeepSCM:
        """Train (or reuse) the diffusion image mechanism; returns its DeepSCM (with the fitted mechanisms)."""
        return self._timed("diffusion", self._diffusion_stage)

    def _diffusion_stage(self) -> DeepSCM:
        if not hasattr(self, "mechanisms_state"):
            self.stage_mechanisms()
        settings = self._diffusion_settings()
        with _seeded(self.seed):
            scm = self.build_diffusion_scm()
        ckpt = self._reusable("diffusion", DIFFUSION_FILE, settings)
        if ckpt is None:
            training = dict(self.diffusion_training)
            batch = int(training.pop("batch_size"))
            trainer, state = self._train_image_model(create_diffusion_trainer, scm, "diffusion", batch, training)
            metrics = dict(trainer.evaluator.state.metrics) if trainer.evaluator is not None else {}
            uid = self._save(
                DIFFUSION_FILE,
                state,
                settings,
                {"image_model": _jsonable(scm.image_model.config), "metrics": _jsonable(metrics)},
            )
            logger.info("diffusion: %s", {k: round(float(v), 4) for k, v in metrics.items()})
            ckpt = {"uid": uid, "state_dict": state}
        scm.image_model.load_state_dict(ckpt["state_dict"])  # the model is built with this run's inference keys
        scm.mechanisms.load_state_dict(self.mechanisms_state)
        self.diffusion_uid = ckpt["uid"]
        self.diffusion_scm = scm.to(self.device).eval()
        return self.diffusion_scm

    def stage_cft(self) -> dict[str, DeepSCM]:
        """The HVAE's fine-tuned models of ``compare_hvae`` (reused from the main job when it ran)."""
        if not self.compare_hvae:
            self.tuned = {}
            return self.tuned
        return super().stage_cft()

    def stage_hvae(self) -> DeepSCM | None:
        """The pretrained HVAE, needed only when ``compare_hvae`` names modes."""
        if not self.compare_hvae:
            return None
        return super().stage_hvae()

    def counterfactual_models(self) -> dict[str, DeepSCM]:
        """``hvae_<mode>`` for ``compare_hvae`` and ``diffusion_<name>`` per guidance type, one trained model."""
        if not hasattr(self, "tuned"):
            self.stage_cft()
        if not hasattr(self, "diffusion_scm"):
            self.stage_diffusion()
        models = {f"hvae_{mode}": scm for mode, scm in self.tuned.items()}
        base = self.diffusion_scm
        for name, guidance in self.guidance_types.items():
            models[f"diffusion_{name}"] = DeepSCM(
                base.graph, base.image_model.with_guidance(guidance), base.mechanisms, image_range=base.image_range
            ).eval()
        return models
