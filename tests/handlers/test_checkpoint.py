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

import torch
from ignite.engine import Engine
from torch import nn

from monai_cf.handlers import AtomicCheckpointSaver, checkpoint_iteration, latest_checkpoint


def test_checkpoints_are_atomic_named_and_adopted(tmp_path):
    model = nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    saver = AtomicCheckpointSaver(
        str(tmp_path),
        {"model": model, "trainer": engine},
        save_final=True,
        save_interval=2,
        epoch_level=False,
        n_saved=2,
    )
    saver.adopt_existing()
    saver.attach(engine)
    engine.run(range(5), max_epochs=1)
    names = sorted(os.listdir(tmp_path))
    assert names == ["checkpoint_final_iteration=5.pt", "checkpoint_iteration=2.pt", "checkpoint_iteration=4.pt"]
    assert latest_checkpoint(tmp_path).name == "checkpoint_final_iteration=5.pt"
    state = torch.load(tmp_path / "checkpoint_iteration=4.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 4
    assert torch.equal(state["model"]["weight"], model.weight)

    # a second run in the same directory takes over the old files: n_saved and the final file still apply
    engine2 = Engine(lambda e, b: None)
    saver2 = AtomicCheckpointSaver(
        str(tmp_path),
        {"model": model, "trainer": engine2},
        save_final=True,
        save_interval=2,
        epoch_level=False,
        n_saved=2,
    )
    saver2.adopt_existing()
    saver2.attach(engine2)
    engine2.load_state_dict({"iteration": 5, "epoch_length": 9, "max_epochs": 1})
    engine2.run(range(9))
    names = sorted(os.listdir(tmp_path))
    assert names == ["checkpoint_final_iteration=9.pt", "checkpoint_iteration=6.pt", "checkpoint_iteration=8.pt"]
    assert latest_checkpoint(tmp_path).name == "checkpoint_final_iteration=9.pt"
    assert not [n for n in os.listdir(tmp_path) if n.startswith("tmp")]


def test_latest_checkpoint_and_iteration_parsing(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    for name in (
        "best.pt",
        "checkpoint_iteration=30.pt",
        "checkpoint_final_iteration=30.pt",
        "checkpoint_iteration=7.pt",
    ):
        (tmp_path / name).write_bytes(b"x")
    assert latest_checkpoint(tmp_path).name == "checkpoint_iteration=30.pt"
    assert checkpoint_iteration("runs/checkpoint_final_iteration=120.pt") == 120
    assert checkpoint_iteration("best.pt") is None
