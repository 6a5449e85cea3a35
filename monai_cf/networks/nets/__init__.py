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
"""Networks of monai_cf: image mechanisms (HVAE, diffusion), attribute mechanisms and attribute predictors."""

from __future__ import annotations

from .diffusion import GUIDANCE_MODES, AttributeSplitEmbedding, DiffusionGuidance, DiffusionImageMechanism
from .hvae import HVAE, discretized_gaussian_log_likelihood, gaussian_kl, parse_decoder_arch, parse_encoder_arch
from .image_mechanism import (
    IMAGE_MECHANISM_ATTRIBUTES,
    IMAGE_MECHANISM_METHODS,
    check_image_mechanism,
    is_image_mechanism,
)
from .mechanisms import (
    BinaryGumbelMaxMechanism,
    GumbelMaxMechanism,
    Mechanism,
    SplineFlowMechanism,
    abduct_all,
    build_mechanisms,
    counterfactual_all,
    log_prob_all,
    parents_vector,
    parents_width,
    predict_all,
    sample_all,
)
from .predictor import PREDICTOR_BACKBONES, AttributeLoss, AttributePredictor, SmallCNN
