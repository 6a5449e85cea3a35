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
"""Shared pieces of the bundle tests: tiny settings, the bundle entry point, a generated own-data set."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "cxr_soft_cft" / "configs"
TRAIN = CONFIGS / "train.yaml"
INFERENCE = CONFIGS / "inference.yaml"
MULTI_GPU = CONFIGS / "multi_gpu_train.yaml"
STAGE_FILES = (
    "guidance_predictor.pt",
    "evaluation_predictor.pt",
    "mechanisms.pt",
    "hvae.pt",
    "hvae_cft_hard.pt",
    "hvae_cft_soft.pt",
)

# a few iterations per stage; the evaluation without its slowest optional parts (10 null interventions,
# reversibility), so a whole run takes seconds
TINY: dict[str, Any] = {
    "phantom": {"n_train": 32, "n_val": 16, "n_test": 16, "seed": 0},
    "batch_size": 16,
    "predictor#max_epochs": 1,
    "mechanisms#max_epochs": 1,
    "hvae_training#max_epochs": 1,
    "cft#max_epochs": 1,
    "evaluation": {"batch_size": 16, "composition_cycles": [1], "reversibility": False, "num_examples": 2},
    "progress_bar": False,
    "parallel": False,  # side-by-side training has its own test; spawning processes costs seconds
}

# a graph unlike the phantom's: other names, a three-class root, a continuous root with another range, a binary
# child of both, and an image key of its own; the CSV columns are named differently from the graph keys
OWN_GRAPH: dict[str, Any] = {
    "scanner": {"kind": "categorical", "parents": [], "class_names": ["ge", "siemens", "philips"]},
    "thickness": {"kind": "continuous", "parents": [], "range": [1.0, 5.0]},
    "lesion": {"kind": "binary", "parents": ["scanner", "thickness"], "class_names": ["absent", "present"]},
    "scan": {"kind": "image", "parents": ["scanner", "thickness", "lesion"]},
}
OWN_COLUMNS = {"scan": "file_name", "scanner": "Scanner Model", "thickness": "slice_mm", "lesion": "lesion_flag"}
OWN_VALUE_MAPS = {"lesion": {"N": "absent", "Y": "present"}}
OWN_SCANNERS = ("GE", "Siemens", "Philips")


def run_bundle(config_file: str | Path | list, **overrides: Any) -> None:
    """``python -m monai.bundle run`` in this process (overrides as Fire would pass them)."""
    import monai.bundle

    if isinstance(config_file, list):
        config_file = [str(c) for c in config_file]
    else:
        config_file = str(config_file)
    monai.bundle.run(config_file=config_file, **overrides)


def cli(*args: str, timeout: float = 240, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run ARGS`` in a subprocess, as a user types it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = list(launcher or (sys.executable,)) + ["-m", "monai.bundle", "run", *args]
    # a session of its own, so that a launcher's workers die with it when the command runs over time
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{' '.join(command)} ran over {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def messages(error: BaseException) -> str:
    """Every message along an exception's chain (MONAI wraps errors of config expressions in RuntimeError)."""
    out, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        out.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(out)


def write_own_dataset(root: Path, counts: tuple[int, int, int] = (64, 32, 32), seed: int = 0) -> Path:
    """CSVs and 32x32 PNGs whose intensities follow ``OWN_GRAPH``: the scanner sets the background, the slice
    thickness the size of a bright disk, a lesion adds a bright square; lesions are likelier on thick slices."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:32, :32]
    for split, count in zip(("train", "val", "test"), counts):
        rows = []
        for i in range(count):
            scanner = int(rng.integers(3))
            thickness = float(rng.uniform(1.0, 5.0))
            lesion = bool(rng.random() < 1.0 / (1.0 + np.exp(-(thickness - 3.0) * 1.5 - 0.5 * (scanner - 1))))
            image = 30.0 + 40.0 * scanner + rng.normal(0.0, 4.0, (32, 32))
            image[(yy - 16) ** 2 + (xx - 16) ** 2 <= (2.0 + 2.0 * thickness) ** 2] += 60.0
            if lesion:
                image[6:12, 20:26] = 250.0
            name = f"images/{split}_{i:03d}.png"
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / name)
            rows.append(
                {
                    "file_name": name,
                    "Scanner Model": OWN_SCANNERS[scanner],
                    "slice_mm": f"{thickness:.3f}",
                    "lesion_flag": "Y" if lesion else "N",
                }
            )
        with open(root / f"{split}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def is_png(path: Path) -> bool:
    with open(path, "rb") as handle:
        if handle.read(8) != b"\x89PNG\r\n\x1a\n":
            return False
    with Image.open(path) as image:
        image.verify()
    return True
