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
"""Former home of the predictor and mechanism trainers, kept so that old imports work.

The predictor trainer is in :mod:`monai_cf.engines.predictor_trainer`, the mechanism trainer in
:mod:`monai_cf.engines.mechanism_trainer`, the losses in :mod:`monai_cf.losses`.
"""

from __future__ import annotations

from monai_cf.engines.mechanism_trainer import (
    AttributeTable,
    MechanismLikelihood,
    attribute_loader,
    create_mechanism_trainer,
)
from monai_cf.engines.predictor_trainer import AttributeMetrics, attribute_auc, create_predictor_trainer
from monai_cf.losses import MechanismNLLLoss

__all__ = [
    "AttributeMetrics",
    "attribute_auc",
    "MechanismLikelihood",
    "MechanismNLLLoss",
    "AttributeTable",
    "attribute_loader",
    "create_predictor_trainer",
    "create_mechanism_trainer",
]
