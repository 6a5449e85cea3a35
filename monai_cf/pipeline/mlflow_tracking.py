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
"""MLflow tracking of :class:`~monai_cf.pipeline.CounterfactualPipeline`'s stages.

Every stage is a run of the pipeline's experiment, named after the stage: the trainers open theirs from the
arguments of :func:`stage_handler_kwargs`; the evaluation's run is opened here, and its settings become the run's
parameters when it ends.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from monai_cf.engines.distributed import process_rank
from monai_cf.handlers import check_tracking_uri

__all__ = [
    "fail_mlflow_run",
    "finish_mlflow_run",
    "stage_handler_kwargs",
    "start_mlflow_run",
    "tracking_from_handlers",
]


def tracking_from_handlers(
    handlers: Sequence[Any] | None, tracking_uri: str | None, experiment_name: str
) -> tuple[str | None, str]:
    """The tracking URI (checked) and experiment: the given ones, or those of an MLflow handler of the bundle
    config (``--tracking mlflow``) when no URI is given.

    Example::

        tracking_from_handlers([], "sqlite:///mlruns.db", "cxr_soft_cft")  # ('sqlite:///.../mlruns.db', ...)
    """
    uri, experiment = tracking_uri, experiment_name
    for handler in handlers or ():
        client = getattr(handler, "client", None)
        if tracking_uri is None and client is not None and hasattr(client, "tracking_uri"):
            uri = client.tracking_uri
            experiment = getattr(handler, "experiment_name", None) or experiment_name
    if uri is not None:
        uri = check_tracking_uri(uri)
    return uri, experiment


def stage_handler_kwargs(
    stage: str, progress_bar: bool, tracking_uri: str | None, experiment_name: str
) -> dict[str, Any]:
    """The trainer arguments of every stage: a progress bar on rank 0 only, and the stage's MLflow run.

    Example::

        create_hvae_trainer(..., **stage_handler_kwargs("hvae", True, "sqlite:///mlruns.db", "cxr_soft_cft"))
    """
    return {
        "progress_bar": progress_bar and process_rank() == 0,
        "stats": False,
        "tracking_uri": tracking_uri,
        "experiment_name": experiment_name,
        "run_name": stage,
    }


def start_mlflow_run(tracking_uri: str, experiment_name: str, name: str) -> str:
    """Open a run called ``name`` in ``experiment_name`` (created when missing); returns its id.

    Example::

        run_id = start_mlflow_run("sqlite:///mlruns.db", "cxr_soft_cft", "evaluate")
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(experiment_name)
    run = client.create_run(experiment_id, run_name=name)
    return run.info.run_id


def finish_mlflow_run(tracking_uri: str, run_id: str, config: Mapping[str, Any]) -> None:
    """The evaluation's settings as the run's parameters, and its end when the evaluation ended.

    Example::

        finish_mlflow_run("sqlite:///mlruns.db", run_id, evaluator.results["config"])
    """
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient(tracking_uri)
    params = [Param(key, json.dumps(value) if not isinstance(value, str) else value) for key, value in config.items()]
    client.log_batch(run_id, params=[p for p in params if len(p.value) <= 6000])
    client.set_terminated(run_id)


def fail_mlflow_run(tracking_uri: str, run_id: str) -> None:
    """Mark a run that ended with an error as failed.

    Example::

        fail_mlflow_run("sqlite:///mlruns.db", run_id)
    """
    from mlflow import MlflowClient

    MlflowClient(tracking_uri).set_terminated(run_id, "FAILED")
