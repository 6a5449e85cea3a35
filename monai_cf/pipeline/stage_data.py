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
"""The data of :class:`~monai_cf.pipeline.CounterfactualPipeline`: the phantom written once, the splits loaded with
the image under the key the trainers read, and the stages' loaders.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from monai.data import DataLoader

from monai_cf.data import csv_dataset
from monai_cf.engines import create_data_loader
from monai_cf.engines.reproducibility import ResumableDistributedSampler
from monai_cf.graph import CausalGraph

__all__ = [
    "ENGINE_IMAGE_KEY",
    "csv_path",
    "datalist_kwargs",
    "load_splits",
    "stage_loader",
    "warn_missing_classes",
    "write_phantom",
]

logger = logging.getLogger("monai_cf.pipeline")

#: the batch key of the image for every trainer and the evaluator, whatever the graph calls its image
ENGINE_IMAGE_KEY = "image"
_DATALIST_KEYS = ("columns", "value_maps", "image_root", "skip_bad_rows")


class _EngineImageKey:
    """Moves a sample's image to the key the trainers read (``"image"``) from the key a user's graph gives it."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, item: Mapping[str, Any]) -> dict[str, Any]:
        item = dict(item)
        item[ENGINE_IMAGE_KEY] = item.pop(self.key)
        return item


def datalist_kwargs(data: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data`` section's :func:`~monai_cf.data.load_csv_datalist` arguments.

    Example::

        datalist_kwargs({"train_csv": "train.csv", "image_root": "images"})  # {'image_root': 'images'}
    """
    return {k: data[k] for k in _DATALIST_KEYS if k in data}


def csv_path(dataset_dir: Path, data: Mapping[str, Any], split: str) -> Path:
    """The CSV of ``split`` (``train`` / ``val`` / ``test``) named by the ``data`` section.

    Example::

        csv_path(Path("data"), {"val_csv": "val.csv"}, "val")  # Path('data/val.csv')
    """
    return dataset_dir / str(data[f"{split}_csv"])


def write_phantom(dataset_dir: Path, phantom: Mapping[str, Any], spatial_size: int) -> None:
    """Write the phantom to ``dataset_dir`` unless it holds one written with the same settings; fail when it holds
    another phantom or other files.

    Example::

        write_phantom(Path("data/phantom"), {"n_train": 4000, "n_val": 300, "n_test": 500, "seed": 0}, 32)
    """
    from monai_cf.data import SyntheticCXR

    settings_file = dataset_dir / "phantom.json"
    wanted = {"n_train": phantom["n_train"], "n_val": phantom["n_val"], "n_test": phantom["n_test"]}
    if settings_file.is_file():
        with open(settings_file) as handle:
            written = json.load(handle)
        counts = written.get("counts", {})
        have = {f"n_{split}": counts.get(split) for split in ("train", "val", "test")} | {"seed": written.get("seed")}
        want = wanted | {"seed": phantom["seed"]}
        if have != want:
            raise ValueError(
                f"dataset_dir '{dataset_dir}' holds a phantom written with {have}, but the config asks for "
                f"{want}: choose another dataset_dir or delete that one."
            )
        return
    if dataset_dir.exists() and any(dataset_dir.iterdir()):
        raise ValueError(
            f"dataset_dir '{dataset_dir}' is not empty and holds no phantom; the phantom is only written to a "
            "new or empty directory (for your own data set phantom to null)."
        )
    logger.info("Writing the phantom to %s", dataset_dir)
    SyntheticCXR(spatial_size=spatial_size, seed=phantom["seed"]).write(dataset_dir, **wanted)


def load_splits(dataset_dir: Path, data: Mapping[str, Any], graph: CausalGraph, spatial_size: int) -> dict[str, Any]:
    """The cached train / val / test datasets, the image under :data:`ENGINE_IMAGE_KEY`; warns about classes that
    the val and test splits lack.

    Example::

        datasets = load_splits(Path("data/phantom"), DEFAULT_DATA, CausalGraph.from_name("mimic_cxr"), 32)
    """
    datasets = {}
    for split in ("train", "val", "test"):
        datasets[split] = csv_dataset(
            csv_path(dataset_dir, data, split),
            graph,
            spatial_size=spatial_size,
            cache=True,
            transforms=[_EngineImageKey(graph.image_key)],
            **datalist_kwargs(data),
        )
    logger.info("Data: %s", {k: len(v) for k, v in datasets.items()})
    for split in ("val", "test"):
        warn_missing_classes(graph, split, getattr(datasets[split], "data", []))
    return datasets


def stage_loader(
    dataset: Any, batch_size: int, shuffle: bool, seed: int, num_workers: int, across_ranks: bool = True
) -> Any:
    """A resumable loader over a dataset; ``across_ranks=False`` gives every process the whole dataset (stages
    that run the same computation on every rank of a multi-process launch, so that all ranks hold identical
    models).

    Example::

        loader = stage_loader(datasets["train"], 32, shuffle=True, seed=0, num_workers=0)
    """
    if across_ranks or not (dist.is_available() and dist.is_initialized()):
        return create_data_loader(dataset, batch_size=batch_size, shuffle=shuffle, seed=seed, num_workers=num_workers)
    sampler = ResumableDistributedSampler(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers)


def warn_missing_classes(graph: CausalGraph, split: str, records: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Warn, naming the split and attribute, when a split lacks classes of a discrete attribute (AUCs undefined)."""
    missing = {}
    for name in graph.attributes:
        var = graph[name]
        if not var.is_discrete or not records:
            continue
        present = {int(r[name]) for r in records if name in r}
        absent = [var.class_names[c] for c in range(var.num_classes) if c not in present]
        if absent:
            missing[name] = absent
            logger.warning(
                "The %s split (%d rows) has no '%s' of attribute '%s': its AUC is undefined there and %s",
                split,
                len(records),
                "', '".join(absent),
                name,
                "the key metric averages the attributes whose AUC is defined."
                if split == "val"
                else "its effectiveness and amplification terms are left out of the means.",
            )
    return missing
