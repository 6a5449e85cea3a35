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
"""Checkpoints of a run: atomic saving, and finding the checkpoint to resume from."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.handlers import CheckpointSaver
from monai.utils import IgniteInfo, min_version, optional_import

DiskSaver, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "DiskSaver")

__all__ = [
    "AtomicCheckpointSaver",
    "BEST_CHECKPOINT",
    "CHECKPOINT_PREFIX",
    "checkpoint_iteration",
    "latest_checkpoint",
]

#: File name of the best key-metric checkpoint written by the monai_cf engine factories.
BEST_CHECKPOINT = "best.pt"
#: Prefix of the periodic and final checkpoints (``checkpoint_iteration=N.pt``, ``checkpoint_final_iteration=N.pt``).
CHECKPOINT_PREFIX = "checkpoint_"

_ITERATION_IN_NAME = re.compile(r"iteration=(\d+)\.pt$")


class _AtomicDiskSaver(DiskSaver):  # type: ignore[misc, valid-type]
    """Ignite's ``DiskSaver(atomic=True)`` (temporary file + ``os.replace``) with MONAI's optional fixed file name.

    With a fixed file name the new file replaces the old one atomically, so ``remove`` does nothing: there is never
    a moment without a valid checkpoint under that name.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, atomic=True, create_dir=True, require_empty=False)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def remove(self, filename: str) -> None:
        if self.filename is None:
            super().remove(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's :class:`~monai.handlers.CheckpointSaver` writing every file atomically, and aware of earlier runs.

    MONAI's saver writes checkpoints in place (ignite ``DiskSaver(atomic=False)``), so a run killed while saving
    leaves a truncated file behind, which a resume would then try to load. This saver writes each checkpoint to a
    temporary file in the same directory and renames it into place (ignite 0.5 keeps group/other read
    permission). Arguments are those of :class:`~monai.handlers.CheckpointSaver`.

    :meth:`adopt_existing` registers the periodic (``checkpoint_iteration=N.pt``) and final checkpoints already
    in ``save_dir``, so that ``n_saved`` and the replacement of the final checkpoint keep working across resumed
    runs instead of leaving the files of earlier runs behind.

    Example::

        saver = AtomicCheckpointSaver(
            "runs/hvae", {"trainer": trainer, "network": net, "optimizer": opt},
            save_final=True, save_interval=500, epoch_level=False, n_saved=2,
        )
        saver.adopt_existing()
        saver.attach(trainer)
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                fixed_name = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = _AtomicDiskSaver(save_dir, fixed_name)

    def adopt_existing(self) -> None:
        """Register the periodic and final checkpoints found in ``save_dir`` as if this saver had written them."""
        if not os.path.isdir(self.save_dir):
            return
        names = os.listdir(self.save_dir)
        for checkpoint, marker in ((self._interval_checkpoint, "_iteration="), (self._final_checkpoint, "_final_")):
            if checkpoint is None or getattr(checkpoint.save_handler, "filename", None) is not None:
                continue
            prefix = f"{checkpoint.filename_prefix}_" if checkpoint.filename_prefix else ""
            found = []
            for name in names:
                iteration = checkpoint_iteration(name)
                is_final = "_final_iteration=" in name
                if iteration is None or not name.startswith(prefix + CHECKPOINT_PREFIX):
                    continue
                if (marker == "_final_") == is_final:
                    found.append((iteration, name))
            known = {item.filename for item in checkpoint._saved}
            for iteration, name in sorted(found):
                if name not in known:
                    checkpoint._saved.append(checkpoint.Item(iteration, name))
            checkpoint._saved.sort(key=lambda item: item.priority)


def checkpoint_iteration(filename: str | os.PathLike) -> int | None:
    """The training iteration in a checkpoint file name such as ``checkpoint_iteration=120.pt`` (else ``None``)."""
    match = _ITERATION_IN_NAME.search(os.path.basename(os.fspath(filename)))
    return int(match[1]) if match else None


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from in ``directory``: the periodic or final one with the highest iteration.

    Only files named ``checkpoint_*iteration=N.pt`` count (the best key-metric checkpoint does not: it may be
    older than the latest state). ``None`` if there is none.
    """
    root = Path(directory)
    if not root.is_dir():
        return None
    candidates = []
    for path in root.iterdir():
        iteration = checkpoint_iteration(path.name)
        if path.is_file() and path.name.startswith(CHECKPOINT_PREFIX) and iteration is not None:
            # at equal iterations prefer the periodic file: it was written first, before any end-of-run handlers
            candidates.append((iteration, "_final_" not in path.name, path))
    return max(candidates)[2] if candidates else None
