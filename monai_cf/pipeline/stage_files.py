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
"""Stage files of :class:`~monai_cf.pipeline.CounterfactualPipeline` on disk.

A finished stage leaves one self-describing file in ``models_dir``: its weights, the settings that produced them,
the weights' checksum and an id later stages record as their input. An interrupted stage leaves
``models_dir/runs/<stage>/settings.json``, the settings it resumes with. This module writes and reads those files
and compares recorded settings with a run's, with the messages that name the differences; which stage reuses,
resumes or retrains is the pipeline's decision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from monai_cf.engines.distributed import process_rank

__all__ = [
    "CFT_FILE",
    "CHECKPOINT_VERSION",
    "UPSTREAM_KEYS",
    "check_run_dir",
    "checked_stage_file",
    "comparable_settings",
    "copy_stage_file",
    "discard_stage_file",
    "load_checkpoint",
    "pretrained_problem",
    "save_stage_file",
    "state_checksum",
    "upstream_changed",
]

logger = logging.getLogger("monai_cf.pipeline")

#: file name of a fine-tuned image model in ``models_dir``
CFT_FILE = "hvae_cft_{mode}.pt"
_PREDICTOR_FILES = {"guidance": "guidance_predictor.pt", "evaluation_predictor": "evaluation_predictor.pt"}
_STAGE_FILES = {**_PREDICTOR_FILES, "mechanisms": "mechanisms.pt", "hvae": "hvae.pt"}
CHECKPOINT_VERSION = 1
#: the settings of a fine-tuned file that name the models it was fine-tuned from (their stage files' ids)
UPSTREAM_KEYS = ("hvae", "guidance")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _differences(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a stage file written by :class:`CounterfactualPipeline`, with a clear error for anything else.

    Example::

        load_checkpoint("models/hvae.pt")["settings"]["training"]  # {'max_epochs': 8, 'lr': 0.001}
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"No checkpoint '{path}': run the training bundle first (or point models_dir elsewhere).")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION or "state_dict" not in ckpt:
        raise ValueError(f"'{path}' is not a monai_cf pipeline checkpoint (version {CHECKPOINT_VERSION}).")
    return ckpt


def state_checksum(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and values: what a stage file's ``checksum`` records.

    Example::

        state_checksum(model.state_dict())  # '9f2c...'
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = torch.as_tensor(state_dict[key]).detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def comparable_settings(settings: Mapping[str, Any], phantom: bool) -> dict[str, Any]:
    """Settings as compared for reuse: the phantom (``phantom=True``) is defined by its own settings, not by where
    it lies, so ``dataset_dir`` is left out.

    Example::

        comparable_settings({"seed": 0, "dataset_dir": "data/phantom"}, phantom=True)  # {'seed': 0}
    """
    settings = dict(settings)
    if phantom:
        settings.pop("dataset_dir", None)
    return settings


def _setting_differences(old: Mapping[str, Any], new: Mapping[str, Any], phantom: bool) -> list[str]:
    return _differences(comparable_settings(old, phantom), comparable_settings(_jsonable(new), phantom))


def save_stage_file(
    models_dir: Path, name: str, state_dict: Mapping[str, Any], settings: Mapping, extra: Mapping | None = None
) -> str:
    """Write the stage file ``models_dir/name`` on rank 0 (whole, then renamed); every rank returns the id rank 0
    wrote.

    Example::

        uid = save_stage_file(Path("models"), "mechanisms.pt", scm.mechanisms.state_dict(), settings)
    """
    uid = uuid.uuid4().hex
    if process_rank() == 0:
        models_dir.mkdir(parents=True, exist_ok=True)
        path = models_dir / name
        tmp = path.with_suffix(".tmp")
        payload = {
            "version": CHECKPOINT_VERSION,
            "uid": uid,
            "settings": _jsonable(settings),
            "state_dict": dict(state_dict),
            "checksum": state_checksum(state_dict),
            **dict(extra or {}),
        }
        torch.save(payload, tmp)
        os.replace(tmp, path)
    _barrier()
    return uid if process_rank() == 0 else load_checkpoint(models_dir / name)["uid"]


def discard_stage_file(stage: str, path: Path, run_dir: Path) -> None:
    """Remove a stage's file and its interrupted run (rank 0) before the stage is retrained.

    Example::

        discard_stage_file("hvae", Path("models/hvae.pt"), Path("models/runs/hvae"))
    """
    if process_rank() == 0:
        if path.exists():
            logger.info("Retraining %s: replacing %s", stage, path)
            path.unlink()
        shutil.rmtree(run_dir, ignore_errors=True)
    _barrier()


def checked_stage_file(stage: str, path: Path, settings: Mapping, phantom: bool) -> dict[str, Any]:
    """The stage file at ``path`` when it was made with ``settings``; an error naming the differences otherwise.

    Example::

        ckpt = checked_stage_file("hvae", Path("models/hvae.pt"), settings, phantom=True)
    """
    ckpt = load_checkpoint(path)
    diff = _setting_differences(ckpt["settings"], settings, phantom)
    if diff:
        raise ValueError(
            f"'{path}' was trained with other settings ({'; '.join(diff[:6])}). Pass --retrain \"['{stage}']\" "
            f"(or true for all stages) to replace it, or use another models_dir."
        )
    logger.info("Reusing %s (%s)", stage, path)
    return ckpt


def check_run_dir(run_dir: Path, settings: Mapping, phantom: bool) -> None:
    """An interrupted stage resumes only with the settings it started with: fail when ``run_dir`` holds other
    settings, else record ``settings`` there (rank 0).

    Example::

        check_run_dir(Path("models/runs/hvae"), settings, phantom=True)
    """
    settings_file = run_dir / "settings.json"
    if settings_file.is_file():
        with open(settings_file) as handle:
            old = json.load(handle)
        diff = _setting_differences(old, settings, phantom)
        if diff:
            raise ValueError(
                f"'{run_dir}' holds an interrupted run with other settings ({'; '.join(diff[:6])}); pass --retrain "
                "for this stage to start it afresh."
            )
    elif process_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        # written whole, then renamed: the other ranks check the same file and must never read half of it
        partial = settings_file.with_suffix(".tmp")
        with open(partial, "w") as handle:
            json.dump(_jsonable(settings), handle, indent=1)
        os.replace(partial, settings_file)


def pretrained_problem(path: Path, expected_settings: Mapping[str, Any], phantom: bool) -> str | None:
    """Why a shipped stage file cannot stand in for training the stage, or ``None`` when it can.

    Example::

        pretrained_problem(Path("pretrained/hvae.pt"), settings, phantom=True)  # None, or 'checksum mismatch: ...'
    """
    try:
        ckpt = load_checkpoint(path)
    except Exception as error:  # a damaged or foreign file is a reason to train, not to stop
        return f"unreadable: {error}"
    if ckpt.get("checksum") is None:
        return "it carries no checksum"
    actual = state_checksum(ckpt["state_dict"])
    if actual != ckpt["checksum"]:
        return f"checksum mismatch: the file says {ckpt['checksum'][:12]}..., its weights give {actual[:12]}..."
    diff = _setting_differences(ckpt["settings"], expected_settings, phantom)
    if diff:
        return f"trained with other settings: {'; '.join(diff[:6])}"
    return None


def copy_stage_file(source: Path, target: Path) -> None:
    """Copy a stage file on rank 0, whole then renamed, so that no process ever reads half of it.

    Example::

        copy_stage_file(Path("pretrained/hvae.pt"), Path("models/hvae.pt"))
    """
    if process_rank() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".tmp")
        shutil.copyfile(source, partial)
        os.replace(partial, target)


def upstream_changed(old_settings: Mapping[str, Any], settings: Mapping[str, Any]) -> bool:
    """Whether a fine-tuned file's recorded upstream models (:data:`UPSTREAM_KEYS`) differ from ``settings``'.

    Example::

        upstream_changed(load_checkpoint("models/hvae_cft_soft.pt")["settings"], pipeline._cft_settings("soft"))
    """
    return {k: old_settings.get(k) for k in UPSTREAM_KEYS} != {k: settings[k] for k in UPSTREAM_KEYS}
