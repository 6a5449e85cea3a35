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
"""The pipeline's MLflow runs: one per stage, named after it, with the evaluation's settings as parameters."""

from __future__ import annotations

import pytest

from monai_cf.pipeline.mlflow_tracking import (
    fail_mlflow_run,
    finish_mlflow_run,
    stage_handler_kwargs,
    start_mlflow_run,
    tracking_from_handlers,
)


class _MLflowLike:
    """What the pipeline reads of a bundle's MLflow handler: its client's URI and its experiment."""

    def __init__(self, uri: str, experiment_name: str) -> None:
        self.client = type("Client", (), {"tracking_uri": uri})()
        self.experiment_name = experiment_name


def test_tracking_comes_from_the_arguments_or_the_bundle_handler(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    assert tracking_from_handlers([], None, "exp") == (None, "exp")
    assert tracking_from_handlers([_MLflowLike(uri, "bundle_exp")], None, "exp") == (uri, "bundle_exp")
    assert tracking_from_handlers([_MLflowLike("sqlite:///other.db", "b")], uri, "exp") == (uri, "exp")
    with pytest.raises(ValueError, match="file"):
        tracking_from_handlers([], str(tmp_path / "mlruns"), "exp")


def test_stage_runs_are_named_after_the_stage():
    kwargs = stage_handler_kwargs("hvae", True, "sqlite:///m.db", "exp")
    assert kwargs == {
        "progress_bar": True,
        "stats": False,
        "tracking_uri": "sqlite:///m.db",
        "experiment_name": "exp",
        "run_name": "hvae",
    }


def test_the_evaluation_run_records_its_settings_and_its_end(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    run_id = start_mlflow_run(uri, "exp", "evaluate")
    finish_mlflow_run(uri, run_id, {"num_test": 500, "modes": ["hard", "soft"], "graph": "mimic_cxr"})
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.run_name == "evaluate" and run.info.status == "FINISHED"
    assert run.data.params == {"num_test": "500", "modes": '["hard", "soft"]', "graph": "mimic_cxr"}
    failed = start_mlflow_run(uri, "exp", "cft")
    fail_mlflow_run(uri, failed)
    assert MlflowClient(uri).get_run(failed).info.status == "FAILED"
    assert len(MlflowClient(uri).search_runs([run.info.experiment_id])) == 2
