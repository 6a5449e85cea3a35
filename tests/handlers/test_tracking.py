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
from __future__ import annotations

import pytest

from monai_cf.handlers import check_tracking_uri


def test_tracking_uri_check(tmp_path):
    uri = f"sqlite:///{tmp_path}/sub/mlruns.db"
    assert check_tracking_uri(uri) == uri
    assert (tmp_path / "sub").is_dir()
    assert check_tracking_uri("http://localhost:5000") == "http://localhost:5000"
    for bad in (str(tmp_path / "mlruns"), f"file://{tmp_path}/mlruns"):
        with pytest.raises(ValueError, match="sqlite"):
            check_tracking_uri(bad)
