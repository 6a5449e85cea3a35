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
"""The pipeline's option sections: command-line spellings mapped, misspelt or reserved keys named."""

from __future__ import annotations

import functools

import pytest
import torch
from monai.handlers import EarlyStopHandler

from monai_cf.pipeline.stage_options import (
    DEFAULT_CFT,
    DEFAULT_HVAE_TRAINING,
    DEFAULT_MECHANISMS,
    DEFAULT_PREDICTOR,
    check_cft_modes,
    check_num_test,
    check_parallel,
    check_stage_options,
    check_stage_parts,
    image_model_config,
    recorded_options,
    retrain_set,
)
from monai_cf.pipeline.workflow import STAGES


def _check(**sections):
    defaults = {
        "predictor": DEFAULT_PREDICTOR,
        "mechanisms": DEFAULT_MECHANISMS,
        "hvae_training": DEFAULT_HVAE_TRAINING,
        "cft": DEFAULT_CFT,
    }
    check_stage_options(**{**defaults, **sections}, handler_keys=["progress_bar", "tracking_uri"])


def test_the_defaults_pass():
    _check()


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"hvae_training": {"device": "cpu"}}, "hvae_training.device is set by the pipeline"),
        ({"cft": {"mode": "soft"}}, "cft.mode is set by the pipeline \\(use cft.modes\\)"),
        ({"cft": {"tracking_uri": "x"}}, "cft.tracking_uri is set by the pipeline"),
        ({"predictor": {"max_epoch": 3}}, "predictor.max_epoch is neither a training setting"),
        ({"mechanisms": {"learning_rate": 0.1}}, "mechanisms.learning_rate is not a setting"),
    ],
)
def test_reserved_or_unknown_keys_are_named(sections, message):
    with pytest.raises(ValueError, match=message):
        _check(**sections)


def test_stage_parts_are_built_once_before_training():
    check_stage_parts("cft", {"optimizer": functools.partial(torch.optim.SGD, lr=0.1), "handlers": []})
    with pytest.raises(ValueError, match="mechanisms.optimizer: .*learning rate"):
        check_stage_parts("mechanisms", {"optimizer": functools.partial(torch.optim.SGD, lr=-1.0)})
    with pytest.raises(TypeError, match="cft.handlers must be a list"):
        check_stage_parts("cft", {"handlers": {"stop": 1}})
    with pytest.raises(TypeError, match=r"cft.handlers\[1\] is a int, not a handler"):
        check_stage_parts("cft", {"handlers": [EarlyStopHandler(patience=1, score_function=lambda e: 0.0), 3]})


def test_recorded_options_describe_the_optimiser_and_leave_handlers_out():
    recorded = recorded_options({"max_epochs": 8, "handlers": [object()], "optimizer": None})
    assert recorded == {"max_epochs": 8}
    recorded = recorded_options({"max_epochs": 8, "optimizer": functools.partial(torch.optim.SGD, lr=0.1)})
    assert recorded["max_epochs"] == 8 and "SGD" in str(recorded["optimizer"]) and "0.1" in str(recorded["optimizer"])


def test_command_line_values_are_mapped_or_refused():
    evaluation = {"num_test": "null"}
    check_num_test(evaluation)
    assert evaluation == {"num_test": None}
    with pytest.raises(ValueError, match="evaluation.num_test must be a positive number .* got 0"):
        check_num_test({"num_test": 0})
    assert check_parallel("true") is True and check_parallel("auto") == "auto"
    with pytest.raises(ValueError, match="parallel must be true, false or 'auto', got 'yes'"):
        check_parallel("yes")
    check_cft_modes(["soft"])
    with pytest.raises(ValueError, match="cft modes must be a non-empty subset"):
        check_cft_modes(["soft", "gentle"])


def test_retrain_names_stages_or_fails():
    assert retrain_set("true", STAGES) == set(STAGES) - {"data"}
    assert retrain_set(["predictors", "hvae"], STAGES) == {"guidance", "evaluation_predictor", "hvae"}
    assert retrain_set(False, STAGES) == set()
    with pytest.raises(ValueError, match=r"retrain names unknown stages \['hvea'\]"):
        retrain_set(["hvea"], STAGES)


def test_image_model_config_fills_in_the_pipeline_sizes():
    assert image_model_config({"preset": "small32"}, 6, 2, 1, 32) == {"preset": "small32", "parents_dim": 6}
    config = image_model_config({"widths": [8, 16]}, 6, 2, 1, 32)
    assert config["parents_dim"] == 6 and config["spatial_dims"] == 2 and config["in_channels"] == 1
