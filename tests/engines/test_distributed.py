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

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_hvae_script.py")
CFT_SCRIPT = Path(__file__).with_name("ddp_cft_script.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: Path, out_dir: Path, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(script),
        str(out_dir),
        *args,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("kind", ["hvae", "diffusion"])
def test_torchrun_two_processes_train_in_lockstep(tmp_path, kind):
    _torchrun(SCRIPT, tmp_path, kind)
    final = [torch.load(tmp_path / f"final_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert final[0]["iteration"] == final[1]["iteration"] == 8  # 2 epochs x 4 batches per rank
    assert final[0]["samples_seen"] == final[1]["samples_seen"] == 16
    for key, value in final[0]["network"].items():
        assert torch.equal(value, final[1]["network"][key]), key
    for key, value in final[0]["ema"].items():
        assert torch.equal(value, final[1]["ema"][key]), key
    assert final[0]["val_metric"] == final[1]["val_metric"]  # reduced over both shards
    written = sorted(os.listdir(tmp_path / "rank0"))
    assert "best.pt" in written and "checkpoint_final_iteration=8.pt" in written
    assert not (tmp_path / "rank1").exists()
    checkpoint = torch.load(tmp_path / "rank0" / "checkpoint_final_iteration=8.pt", weights_only=True)
    assert all(torch.equal(v, final[0]["network"][k]) for k, v in checkpoint["network"].items())


def test_torchrun_soft_fine_tuning_in_lockstep(tmp_path):
    _torchrun(CFT_SCRIPT, tmp_path)
    final = [torch.load(tmp_path / f"final_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert final[0]["iteration"] == final[1]["iteration"] == 8
    for key, value in final[0]["network"].items():
        assert torch.equal(value, final[1]["network"][key]), key
    assert torch.equal(final[0]["multiplier"], final[1]["multiplier"])
    assert float(final[0]["multiplier"]) >= 0.0
    assert "checkpoint_final_iteration=8.pt" in os.listdir(tmp_path / "rank0")
    assert not (tmp_path / "rank1").exists()
