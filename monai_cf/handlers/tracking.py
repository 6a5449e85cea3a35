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
"""MLflow tracking URIs that MONAI 1.6.1 and MLflow 3 accept, checked before a run starts."""

from __future__ import annotations

from pathlib import Path

__all__ = ["check_tracking_uri"]


def check_tracking_uri(tracking_uri: str) -> str:
    """Validate an MLflow tracking URI for monai_cf: ``sqlite:///<path>`` or a remote ``http(s)://`` server.

    MLflow 3 refuses the file store and MONAI 1.6.1's ``MLFlowHandler`` rejects plain paths and ``file://`` URIs;
    this says so before a run starts. The directory of a SQLite database is created.

    Raises:
        ValueError: for a plain path, a ``file://`` URI or an unknown scheme.
    """
    uri = str(tracking_uri)
    if uri.startswith("sqlite:///"):
        db_path = Path(uri[len("sqlite:///") :])
        db_path.parent.mkdir(parents=True, exist_ok=True)
        return uri
    if uri.startswith(("http://", "https://", "databricks", "postgresql", "mysql", "mssql")):
        return uri
    raise ValueError(
        f"MLflow tracking_uri {uri!r} is not supported: use 'sqlite:///<absolute path>/mlruns.db' (MLflow 3 and MONAI "
        "1.6.1 refuse plain paths and file:// stores) or a remote 'http(s)://' tracking server."
    )
