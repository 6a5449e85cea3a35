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
"""A few HVAE (or diffusion) iterations under ``torchrun`` (gloo, CPU), run by ``test_distributed.py``.

Usage: ``torchrun --nproc_per_node=2 tests/engines/ddp_hvae_script.py OUT_DIR [hvae|diffusion]``. Each rank
checkpoints into ``OUT_DIR/rank<r>`` (only rank 0 may write there) and saves its final weights to
``OUT_DIR/final_rank<r>.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from monai_cf.engines import create_data_loader, create_diffusion_trainer, create_hvae_trainer  # noqa: E402
from monai_cf.networks import DiffusionImageMechanism  # noqa: E402
from tests.engines.helpers import image_records, tiny_hvae  # noqa: E402


def tiny_diffusion(seed: int) -> DiffusionImageMechanism:
    torch.manual_seed(seed)
    tiny = {"channels": (8, 16), "attention_levels": (False, True), "num_head_channels": 8, "norm_num_groups": 8}
    return DiffusionImageMechanism(2, 1, 16, parent_dims=[3], embed_dim=8, **tiny)


def main(out_dir: str, kind: str = "hvae") -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    records = image_records(40, seed=0)
    train = create_data_loader(records[:32], batch_size=4, seed=0)  # 16 samples, 4 batches per rank
    val = create_data_loader(records[32:], batch_size=4, shuffle=False)
    # different initial weights per rank: DDP must start all from rank 0's
    model = tiny_hvae(seed=rank) if kind == "hvae" else tiny_diffusion(seed=rank)
    factory = create_hvae_trainer if kind == "hvae" else create_diffusion_trainer
    trainer = factory(
        model,
        train,
        val,
        os.path.join(out_dir, f"rank{rank}"),
        max_epochs=2,
        warmup_steps=2,
        ema_rate=0.9,
        ema_warmup_steps=1,
        device="cpu",
        stats=False,
    )
    assert isinstance(trainer.forward_module, torch.nn.parallel.DistributedDataParallel)
    trainer.run()
    torch.save(
        {
            "network": model.state_dict(),
            "ema": trainer.ema.module.state_dict(),
            "iteration": trainer.state.iteration,
            "val_metric": trainer.evaluator.state.metrics["val_nelbo" if kind == "hvae" else "val_loss"],
            "samples_seen": len(train.sampler),
        },
        os.path.join(out_dir, f"final_rank{rank}.pt"),
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
