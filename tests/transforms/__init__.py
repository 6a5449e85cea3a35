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
"""Shared model and data of the transform tests: an untrained 16x16 DeepSCM and phantom samples."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from monai.data import MetaTensor

from monai_cf.data import EncodeAttributesd, SyntheticCXR
from monai_cf.networks import DeepSCM

SIZE = 16
ATTRIBUTES = ("sex", "race", "age", "disease")


def make_scm(seed: int = 0) -> DeepSCM:
    """An untrained DeepSCM whose disease mechanism has strong random weights, so that do(age) flips diagnoses."""
    torch.manual_seed(seed)
    scm = DeepSCM("mimic_cxr", image_model={"spatial_dims": 2, "in_channels": 1, "spatial_size": SIZE})
    with torch.no_grad():
        for param in scm.mechanisms["disease"].parameters():
            param.normal_(0.0, 2.0)
    return scm.eval()


@lru_cache(maxsize=4)
def _phantom_samples(n: int, seed: int) -> tuple:
    return tuple(SyntheticCXR(spatial_size=SIZE, seed=seed).sample(n))


def make_items(n: int = 8, seed: int = 0, meta: bool = True) -> list[dict]:
    """Data dictionaries as csv_dataset gives them: image (1, H, W) MetaTensor in [0, 1], attributes, "pa"."""
    encode = EncodeAttributesd("mimic_cxr")
    items = []
    for i, sample in enumerate(_phantom_samples(n, seed)):
        image = torch.as_tensor(np.array(sample["image"]))
        if meta:
            image = MetaTensor(image, meta={"filename_or_obj": f"phantom_{i:03d}.png"})
        item = {"image": image, **{name: sample[name] for name in ATTRIBUTES}, "row": i + 1}
        items.append(encode(item))
    return items


def attributes_of(item: dict) -> dict[str, torch.Tensor]:
    """The canonical attributes of one item as the (1,) tensors DeepSCM.counterfactual takes."""
    return {name: torch.tensor([item[name]]) for name in ATTRIBUTES}
