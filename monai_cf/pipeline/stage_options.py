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
"""Defaults and checks of :class:`~monai_cf.pipeline.CounterfactualPipeline`'s option sections.

The sections (``data``, ``phantom``, ``predictor``, ``mechanisms``, ``hvae_training``, ``cft``, ``evaluation``)
start from the defaults here; the checks fail when the pipeline is built, naming the section and key, so that a
misspelt setting stops a run before anything trains. Values typed on the bundle command line (``true``, ``null``)
are mapped to the values they name.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

from monai_cf.engines import CFT_MODES
from monai_cf.engines.optimizers import check_factory, describe_factory
from monai_cf.networks.nets import AttributePredictor

__all__ = [
    "DEFAULT_CFT",
    "DEFAULT_DATA",
    "DEFAULT_EVALUATION",
    "DEFAULT_HVAE_TRAINING",
    "DEFAULT_MECHANISMS",
    "DEFAULT_PHANTOM",
    "DEFAULT_PREDICTOR",
    "STAGE_PARTS",
    "check_cft_modes",
    "check_num_test",
    "check_parallel",
    "check_stage_options",
    "check_stage_parts",
    "image_model_config",
    "recorded_options",
    "retrain_set",
]

DEFAULT_DATA = {"train_csv": "train.csv", "val_csv": "val.csv", "test_csv": "test.csv"}
DEFAULT_PHANTOM = {"n_train": 4000, "n_val": 300, "n_test": 500, "seed": 0}
DEFAULT_PREDICTOR = {"backbone": "small_cnn", "max_epochs": 10, "lr": 1e-3, "batch_size": 64}
_PREDICTOR_TRAINING_KEYS = ("max_epochs", "lr", "batch_size", "optimizer", "handlers")
#: what every training section (predictor, mechanisms, hvae_training, cft) takes beside its own settings: an optimiser
#: factory in place of AdamW, and more handlers for its trainer
STAGE_PARTS = ("optimizer", "handlers")
DEFAULT_MECHANISMS = {"max_epochs": 30, "lr": 3e-3, "batch_size": 256}
DEFAULT_HVAE_TRAINING = {"max_epochs": 8, "lr": 1e-3}
DEFAULT_CFT = {
    "modes": list(CFT_MODES),
    "fine_tune_none": False,
    "max_epochs": 7,
    "lr": 1.5e-3,
    "warmup_steps": 100,
    "force_change": True,
    "ema_rate": None,
}
DEFAULT_EVALUATION = {"batch_size": 100}


def _cli_value(value: Any) -> Any:
    """``true`` / ``false`` / ``null`` typed on the bundle command line arrive as strings (Fire parses only the
    Python spellings ``True`` / ``False`` / ``None``): map them to the values they name."""
    if isinstance(value, str):
        return {"true": True, "false": False, "null": None, "none": None}.get(value.strip().lower(), value)
    return value


def recorded_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A training section as stage settings record and compare it: an optimiser factory by its description
    (another optimiser trains the stage again), handlers left out (they watch training; one that changes it, such as
    early stopping, needs ``--retrain`` of its stage). Without them the record is that of the options alone.

    Example::

        recorded_options({"max_epochs": 8, "handlers": [stopper]})  # {'max_epochs': 8}
    """
    recorded = {k: v for k, v in options.items() if k not in STAGE_PARTS}
    if options.get("optimizer") is not None:
        recorded["optimizer"] = describe_factory(options["optimizer"])
    return recorded


def check_stage_parts(section: str, options: Mapping[str, Any]) -> None:
    """Fail now, naming ``section``, when its optimiser factory or handlers cannot serve: the optimiser is built once
    on a stand-in parameter, so that a misspelt or out-of-range setting stops the run before anything trains.

    Example::

        check_stage_parts("mechanisms", {"optimizer": functools.partial(torch.optim.SGD, lr=0.1)})
    """
    factory = options.get("optimizer")
    if factory is not None:
        check_factory(factory, f"{section}.optimizer", "a torch optimiser from the parameters")
        try:
            describe_factory(factory)
            built = factory([torch.nn.Parameter(torch.zeros(1))])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{section}.optimizer: {error}") from None
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(f"{section}.optimizer built a {type(built).__name__}, not a torch.optim.Optimizer.")
    handlers = options.get("handlers")
    if handlers is None:
        return
    if isinstance(handlers, (str, Mapping)) or not isinstance(handlers, Sequence):
        raise TypeError(f"{section}.handlers must be a list of handlers, got a {type(handlers).__name__}.")
    for index, handler in enumerate(handlers):
        if not callable(getattr(handler, "attach", None)):
            raise TypeError(
                f"{section}.handlers[{index}] is a {type(handler).__name__}, not a handler (no attach(engine) method)."
            )


def check_stage_options(
    predictor: Mapping[str, Any],
    mechanisms: Mapping[str, Any],
    hvae_training: Mapping[str, Any],
    cft: Mapping[str, Any],
    handler_keys: Collection[str],
) -> None:
    """Stage settings may not name what the pipeline sets itself (handlers, device, seed, output folders).

    Args:
        predictor: the ``predictor`` section: training settings and AttributePredictor arguments.
        mechanisms: the ``mechanisms`` section.
        hvae_training: the ``hvae_training`` section.
        cft: the ``cft`` section.
        handler_keys: the trainer arguments the pipeline passes to every stage (progress bar, tracking).

    Example::

        check_stage_options(DEFAULT_PREDICTOR, DEFAULT_MECHANISMS, {"device": "cpu"}, DEFAULT_CFT, ["progress_bar"])
        # ValueError: hvae_training.device is set by the pipeline (use the top-level device); ...
    """
    owned = {key: "use the top-level progress_bar or --tracking" for key in handler_keys}
    owned |= {
        "device": "use the top-level device",
        "seed": "use the top-level seed",
        "output_dir": "use models_dir",
    }
    stages = {
        "hvae_training": (hvae_training, owned),
        "cft": (cft, {**owned, "mode": "use cft.modes", "elbo_constraint": "the pretrained nELBO, measured"}),
    }
    for section, (options, reserved) in stages.items():
        for key in options:
            if key in reserved:
                raise ValueError(f"{section}.{key} is set by the pipeline ({reserved[key]}); remove it from {section}.")
    allowed = set(inspect.signature(AttributePredictor.__init__).parameters) - {
        "self",
        "spatial_dims",
        "in_channels",
        "graph",
    }
    unknown = sorted(set(predictor) - allowed - set(_PREDICTOR_TRAINING_KEYS))
    if unknown:
        raise ValueError(
            f"predictor.{unknown[0]} is neither a training setting ({', '.join(_PREDICTOR_TRAINING_KEYS)}) nor an "
            f"AttributePredictor argument ({', '.join(sorted(allowed))})."
        )
    unknown = sorted(set(mechanisms) - set(DEFAULT_MECHANISMS) - set(STAGE_PARTS))
    if unknown:
        raise ValueError(
            f"mechanisms.{unknown[0]} is not a setting; mechanisms takes "
            f"{', '.join((*DEFAULT_MECHANISMS, *STAGE_PARTS))}."
        )
    for section, options in (
        ("predictor", predictor),
        ("mechanisms", mechanisms),
        ("hvae_training", hvae_training),
        ("cft", cft),
    ):
        check_stage_parts(section, options)


def check_num_test(evaluation: dict[str, Any]) -> None:
    """Map ``evaluation.num_test`` from the command line and fail unless it is a positive count or null.

    Example::

        check_num_test({"batch_size": 100, "num_test": "null"})  # num_test becomes None
    """
    num_test = _cli_value(evaluation.get("num_test"))
    if "num_test" in evaluation:
        evaluation["num_test"] = num_test
    if num_test is not None and (isinstance(num_test, bool) or not isinstance(num_test, int) or num_test < 1):
        raise ValueError(f"evaluation.num_test must be a positive number of test images or null, got {num_test!r}.")


def check_cft_modes(modes: Collection[str]) -> None:
    """Fail unless ``cft.modes`` is a non-empty subset of the fine-tuning modes.

    Example::

        check_cft_modes(["hard", "soft"])
    """
    unknown_cft = set(modes) - set(CFT_MODES)
    if unknown_cft or not modes:
        raise ValueError(f"cft modes must be a non-empty subset of {', '.join(CFT_MODES)}; got {modes}.")


def check_parallel(parallel: Any) -> bool | str:
    """``parallel`` as given (``true`` / ``false`` from the command line mapped), or an error.

    Example::

        check_parallel("true")  # True
    """
    parallel = _cli_value(parallel)
    if parallel not in (True, False, "auto"):
        raise ValueError(f"parallel must be true, false or 'auto', got {parallel!r}.")
    return parallel


def retrain_set(retrain: bool | str | Sequence[str], stages: Sequence[str]) -> set[str]:
    """The stages to retrain: ``True`` for every stage but ``data``, or stage names (``predictors``: both).

    Example::

        retrain_set(["predictors"], STAGES)  # {'guidance', 'evaluation_predictor'}
    """
    retrain = _cli_value(retrain)
    if retrain is True:
        return set(stages) - {"data"}
    if not retrain:
        return set()
    names = {retrain} if isinstance(retrain, str) else set(retrain)
    unknown = names - set(stages) - {"predictors"}
    if unknown:
        raise ValueError(f"retrain names unknown stages {sorted(unknown)}; stages: {list(stages[1:])}.")
    if "predictors" in names:
        names |= {"guidance", "evaluation_predictor"}
    return names - {"predictors"}


def image_model_config(
    config: Mapping[str, Any] | Any, parents_dim: int, spatial_dims: int, in_channels: int, spatial_size: int
) -> dict[str, Any]:
    """The ``image_model`` section as stage files record it: HVAE keyword arguments (a preset's or the pipeline's
    image size and channels filled in), or a user's network as the ``_target_`` config that rebuilds it.

    Example::

        image_model_config({"preset": "small32"}, parents_dim=6, spatial_dims=2, in_channels=1, spatial_size=32)
        # {'preset': 'small32', 'parents_dim': 6}
    """
    if not isinstance(config, Mapping):
        # a user's network, from a bundle config with `_mode_: callable`: recorded as the config that rebuilds it
        check_factory(config, "image_model", "the image network")
        try:
            config = describe_factory(config)
            json.dumps(config)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"image_model: {error} (its arguments must be plain values: numbers, text, lists)"
            ) from None
    config = dict(config)
    if "_target_" in config:
        return config
    config.setdefault("parents_dim", parents_dim)
    if "preset" not in config:
        config.setdefault("spatial_dims", spatial_dims)
        config.setdefault("in_channels", in_channels)
        config.setdefault("spatial_size", spatial_size)
    return config
