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
"""Stage files: written whole with their settings and checksum, read back, and compared with a run's settings."""

from __future__ import annotations

import json

import pytest
import torch

from monai_cf.pipeline.stage_files import (
    check_run_dir,
    checked_stage_file,
    copy_stage_file,
    discard_stage_file,
    load_checkpoint,
    pretrained_problem,
    save_stage_file,
    state_checksum,
    upstream_changed,
)


@pytest.fixture
def stage_file(tmp_path):
    torch.manual_seed(0)
    state = torch.nn.Linear(3, 2).state_dict()
    settings = {"training": {"max_epochs": 8, "lr": 1e-3}, "dataset_dir": str(tmp_path / "phantom")}
    uid = save_stage_file(tmp_path, "hvae.pt", state, settings)
    return tmp_path / "hvae.pt", state, settings, uid


def test_a_saved_stage_file_reads_back_whole(stage_file):
    path, state, settings, uid = stage_file
    ckpt = load_checkpoint(path)
    assert ckpt["uid"] == uid and ckpt["settings"] == settings
    assert ckpt["checksum"] == state_checksum(state)
    assert all(torch.equal(ckpt["state_dict"][k], state[k]) for k in state)
    assert not path.with_suffix(".tmp").exists()


def test_the_checksum_sees_values_dtypes_and_names():
    state = {"w": torch.arange(4.0)}
    assert state_checksum(state) == state_checksum({"w": torch.arange(4.0)})
    assert state_checksum(state) != state_checksum({"w": torch.arange(4.0) + 1e-6})
    assert state_checksum(state) != state_checksum({"w": torch.arange(4.0).double()})
    assert state_checksum(state) != state_checksum({"v": torch.arange(4.0)})


def test_foreign_or_missing_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="No checkpoint .*absent.pt"):
        load_checkpoint(tmp_path / "absent.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt' is not a monai_cf pipeline checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_other_settings_are_named_and_the_phantom_location_is_not(stage_file, tmp_path):
    path, _, settings, _ = stage_file
    moved = {**settings, "dataset_dir": "elsewhere"}
    assert checked_stage_file("hvae", path, moved, phantom=True)["settings"] == settings
    with pytest.raises(ValueError, match="dataset_dir"):
        checked_stage_file("hvae", path, moved, phantom=False)
    changed = {**settings, "training": {"max_epochs": 9, "lr": 1e-3}}
    with pytest.raises(ValueError, match=r"training.max_epochs: 8 -> 9.*--retrain \"\['hvae'\]\""):
        checked_stage_file("hvae", path, changed, phantom=True)


def test_a_tampered_pretrained_file_is_refused_with_the_reason(stage_file, tmp_path):
    path, _, settings, _ = stage_file
    assert pretrained_problem(path, settings, phantom=True) is None
    assert "max_epochs" in pretrained_problem(path, {**settings, "training": {"max_epochs": 1}}, phantom=True)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["weight"] += 1.0
    torch.save(ckpt, tmp_path / "tampered.pt")
    assert pretrained_problem(tmp_path / "tampered.pt", settings, phantom=True).startswith("checksum mismatch")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    assert pretrained_problem(tmp_path / "broken.pt", settings, phantom=True).startswith("unreadable")


def test_an_interrupted_run_resumes_only_with_its_settings(tmp_path):
    run_dir = tmp_path / "runs" / "hvae"
    check_run_dir(run_dir, {"lr": 1e-3}, phantom=True)
    assert json.loads((run_dir / "settings.json").read_text()) == {"lr": 1e-3}
    check_run_dir(run_dir, {"lr": 1e-3}, phantom=True)
    with pytest.raises(ValueError, match="interrupted run with other settings \\(lr: 0.001 -> 0.01\\)"):
        check_run_dir(run_dir, {"lr": 1e-2}, phantom=True)


def test_discard_removes_the_file_and_its_run_and_copy_writes_whole(stage_file, tmp_path):
    path, _, settings, _ = stage_file
    copy_stage_file(path, tmp_path / "copy" / "hvae.pt")
    assert load_checkpoint(tmp_path / "copy" / "hvae.pt")["settings"] == settings
    run_dir = tmp_path / "runs" / "hvae"
    check_run_dir(run_dir, settings, phantom=True)
    discard_stage_file("hvae", path, run_dir)
    assert not path.exists() and not run_dir.exists()


def test_upstream_changes_are_those_of_the_recorded_models():
    old = {"hvae": "a", "guidance": "b", "lr": 1e-4}
    assert not upstream_changed(old, {"hvae": "a", "guidance": "b", "lr": 1e-3})
    assert upstream_changed(old, {"hvae": "c", "guidance": "b"})
