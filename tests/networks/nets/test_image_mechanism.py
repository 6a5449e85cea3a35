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
import torch

from monai_cf.networks import DeepSCM
from monai_cf.networks.nets import HVAE, check_image_mechanism, is_image_mechanism
from tests.pipeline.user_network import ConditionalAutoencoder

USER_NETWORK = "tests.pipeline.user_network.ConditionalAutoencoder"


def test_the_hvae_and_a_user_network_are_image_mechanisms_a_plain_module_is_not():
    assert is_image_mechanism(HVAE.from_preset("small32", parents_dim=6))
    assert is_image_mechanism(ConditionalAutoencoder(2, 1, 32, 6))
    assert not is_image_mechanism(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"lacks spatial_dims, in_channels, spatial_size, parents_dim, elbo\(\)"):
        check_image_mechanism(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        check_image_mechanism("hvae")


def test_a_deepscm_builds_a_target_config_with_the_graphs_parents():
    config = {"_target_": USER_NETWORK, "spatial_dims": 2, "in_channels": 1, "spatial_size": 32, "width": 4}
    scm = DeepSCM.from_config({"graph": "mimic_cxr", "image_model": config})
    assert isinstance(scm.image_model, ConditionalAutoencoder) and scm.image_model.parents_dim == scm.graph.parents_dim
    with pytest.raises(TypeError, match=f"image_model._target_ '{USER_NETWORK}': .*widht"):
        DeepSCM.from_config({"graph": "mimic_cxr", "image_model": {**config, "widht": 4}})
    with pytest.raises(ValueError, match="cannot be imported"):
        DeepSCM.from_config({"graph": "mimic_cxr", "image_model": {"_target_": "my_package.MyNetwork"}})
