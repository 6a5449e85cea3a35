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
"""Datasets: the synthetic chest X-ray phantom, CSV/MIMIC-CXR loading and attribute encoding."""

from __future__ import annotations

from .csv_dataset import (
    IMAGE_SUFFIXES,
    MIMIC_CXR_PRESET,
    DatasetValidationError,
    EncodeAttributesd,
    GrayscaleImageReader,
    LoadGrayscaleImaged,
    RowProblem,
    check_image,
    csv_dataset,
    image_format,
    load_csv_datalist,
    load_image_transforms,
    mimic_cxr_datalist,
)
from .encoding import AttributeEncoder

_PHANTOM_NAMES = ("SyntheticCXR", "NOISE_KEYS", "PHANTOM_VERSION", "disease_probability", "save_counterfactual_grid")


def __getattr__(name: str):
    # The phantom is imported lazily so that `python -m monai_cf.data.phantom` runs it as a fresh __main__.
    if name in _PHANTOM_NAMES:
        from . import phantom

        return getattr(phantom, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AttributeEncoder",
    "DatasetValidationError",
    "RowProblem",
    "IMAGE_SUFFIXES",
    "image_format",
    "check_image",
    "load_csv_datalist",
    "GrayscaleImageReader",
    "LoadGrayscaleImaged",
    "load_image_transforms",
    "EncodeAttributesd",
    "csv_dataset",
    "MIMIC_CXR_PRESET",
    "mimic_cxr_datalist",
    "SyntheticCXR",
    "NOISE_KEYS",
    "PHANTOM_VERSION",
    "disease_probability",
    "save_counterfactual_grid",
]
