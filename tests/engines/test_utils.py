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
"""``monai_cf.engines.utils`` keeps serving the imports of its former contents."""

from __future__ import annotations

import monai_cf.engines as engines
import monai_cf.engines.utils as utils
from monai_cf.engines import distributed, optimizers, prepare_batch, reproducibility, training_handlers


def test_every_former_name_is_the_object_of_its_new_module():
    homes = (distributed, optimizers, prepare_batch, reproducibility, training_handlers)
    for name in utils.__all__:
        owners = [module for module in homes if name in module.__all__]
        assert len(owners) == 1, name
        assert getattr(utils, name) is getattr(owners[0], name)
        if hasattr(engines, name):
            assert getattr(engines, name) is getattr(utils, name)
