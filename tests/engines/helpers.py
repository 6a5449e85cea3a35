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
"""Tiny models and data shared by the engine tests (also imported by the torchrun script)."""

from __future__ import annotations

import torch

from monai_cf.networks import HVAE

TINY_HVAE = {
    "spatial_dims": 2,
    "in_channels": 1,
    "spatial_size": 16,
    "parents_dim": 3,
    "encoder_arch": "16b1d2,8b1d2,4b1d4,1b1",
    "decoder_arch": "1b1,4b1,8b1,16b1",
    "widths": (16, 16, 32, 32),
    "z_dim": 4,
}


def tiny_hvae(seed: int = 0) -> HVAE:
    torch.manual_seed(seed)
    return HVAE(**TINY_HVAE)


def image_records(n: int, seed: int = 0, size: int = 16) -> list[dict]:
    """Dictionaries like csv_dataset's: 8-bit-quantised images in [0, 1] and a 3-dim parents vector that
    shifts the image brightness (so the model has something to learn)."""
    gen = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(n):
        pa = torch.randn(3, generator=gen)
        image = (0.5 + 0.15 * pa[0] + 0.1 * torch.randn(1, size, size, generator=gen)).clamp(0, 1)
        records.append({"image": torch.round(image * 255) / 255, "pa": pa})
    return records


def parameters_vector(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def interrupted_and_resumed(factory, tmp_path, stop_at: int = 6) -> tuple:
    """``(reference, interrupted, resumed)`` trainers of ``factory(output_dir, model_seed=...)``: an uninterrupted
    run, a run stopped after ``stop_at`` iterations, and that run resumed from its folder with other initial
    weights (so that everything the resumed run has must come from the checkpoint). Asserts that the interrupted
    run left its final checkpoint at ``stop_at``."""
    from ignite.engine import Events

    from monai_cf.handlers import latest_checkpoint

    reference = factory(tmp_path / "reference")
    reference.run()
    interrupted = factory(tmp_path / "resumed")
    interrupted.add_event_handler(Events.ITERATION_COMPLETED(once=stop_at), lambda engine: engine.terminate())
    interrupted.run()
    assert latest_checkpoint(tmp_path / "resumed").name == f"checkpoint_final_iteration={stop_at}.pt"
    resumed = factory(tmp_path / "resumed", model_seed=99)
    resumed.run()
    return reference, interrupted, resumed
