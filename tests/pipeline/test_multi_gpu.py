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
"""train.yaml + multi_gpu_train.yaml under torchrun with two processes (gloo on the CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from monai_cf.pipeline import load_checkpoint
from tests.pipeline.helpers import MULTI_GPU, STAGE_FILES, TINY, TRAIN, cli

TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.is_file() or not dist.is_available(), reason="needs torchrun and torch.distributed")
def test_two_processes_train_and_rank0_reports(tmp_path):
    result = cli(
        "--config_file", repr([str(TRAIN), str(MULTI_GPU)]),
        "--bundle_root", str(tmp_path),
        "--phantom", repr(TINY["phantom"]),
        "--batch_size", "8",
        "--predictor#max_epochs", "1",
        "--mechanisms#max_epochs", "1",
        "--hvae_training#max_epochs", "1",
        "--cft#max_epochs", "1",
        "--evaluation", repr(TINY["evaluation"]),
        "--progress_bar", "false",
        launcher=(str(TORCHRUN), "--standalone", "--nnodes=1", "--nproc_per_node=2"),
        timeout=300,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert log.count("Data: {'train': 32, 'val': 16, 'test': 16}") == 2  # both processes load the data
    assert log.count("Stage times (s)") == 1  # rank 0 alone reports

    runs = tmp_path / "models" / "runs"
    # HVAE and fine-tuning are data-parallel: 32 images / batch 8 / 2 processes = 2 iterations per epoch
    for stage in ("hvae", "hvae_cft_hard", "hvae_cft_soft"):
        assert (runs / stage / "checkpoint_final_iteration=2.pt").is_file(), sorted(p.name for p in runs.rglob("*"))
    # the predictors and mechanisms see the whole split on every process: 32 images in one batch of 64 / 256
    for stage in ("guidance_predictor", "evaluation_predictor", "mechanisms"):
        assert (runs / stage / "checkpoint_final_iteration=1.pt").is_file(), stage

    uids = {name: load_checkpoint(tmp_path / "models" / name)["uid"] for name in STAGE_FILES}
    assert len(set(uids.values())) == len(STAGE_FILES)
    for mode in ("hard", "soft"):
        settings = load_checkpoint(tmp_path / "models" / f"hvae_cft_{mode}.pt")["settings"]
        assert settings["hvae"] == uids["hvae.pt"] and settings["guidance"] == uids["guidance_predictor.pt"]
    eval_dir = tmp_path / "eval"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["config"]["cf_types"] == ["none", "hard", "soft"] and metrics["config"]["num_samples"] == 16
    assert set(json.loads((eval_dir / "timing.json").read_text())["seconds"]) >= {"hvae", "cft", "evaluate"}
    assert (eval_dir / "report.md").is_file() and len(list(eval_dir.glob("*.png"))) >= 4
