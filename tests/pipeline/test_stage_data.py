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
"""The pipeline's data: split files named by the data section, the image under the trainers' key, and a warning
for a split that lacks a class."""

from __future__ import annotations

from pathlib import Path

from monai_cf.graph import CausalGraph
from monai_cf.pipeline.stage_data import ENGINE_IMAGE_KEY, csv_path, datalist_kwargs, warn_missing_classes


def test_the_data_section_names_the_csvs_and_the_datalist_arguments():
    data = {"train_csv": "a.csv", "val_csv": "sub/b.csv", "test_csv": "c.csv", "image_root": "img", "other": 1}
    assert csv_path(Path("root"), data, "val") == Path("root/sub/b.csv")
    assert datalist_kwargs(data) == {"image_root": "img"}


def test_a_split_without_a_class_is_named_in_a_warning(caplog):
    graph = CausalGraph.from_name("mimic_cxr")
    records = [{"sex": 0, "race": r % 2, "age": 50.0, "disease": 1} for r in range(6)]
    with caplog.at_level("WARNING", logger="monai_cf.pipeline"):
        missing = warn_missing_classes(graph, "val", records)
    assert missing == {"sex": ["female"], "race": ["Black"], "disease": ["no_finding"]}
    assert "The val split (6 rows) has no 'Black' of attribute 'race'" in caplog.text
    assert "the key metric averages the attributes whose AUC is defined" in caplog.text


def test_a_split_with_every_class_warns_nothing(caplog):
    graph = CausalGraph.from_name("mimic_cxr")
    records = [{"sex": s, "race": r, "age": 50.0, "disease": d} for s in (0, 1) for r in (0, 1, 2) for d in (0, 1)]
    with caplog.at_level("WARNING", logger="monai_cf.pipeline"):
        assert warn_missing_classes(graph, "test", records) == {}
    assert not caplog.text
    assert ENGINE_IMAGE_KEY == "image"
