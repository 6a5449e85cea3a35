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
"""A few soft counterfactual fine-tuning iterations under ``torchrun`` (gloo, CPU), run by ``test_distributed.py``.

Usage: ``torchrun --nproc_per_node=2 tests/engines/ddp_cft_script.py OUT_DIR``. Each rank checkpoints into
``OUT_DIR/rank<r>`` (only rank 0 may write there) and saves its final weights to ``OUT_DIR/final_rank<r>.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from monai_cf.data import SyntheticCXR  # noqa: E402
from monai_cf.engines import create_cft_trainer, create_data_loader  # noqa: E402
from monai_cf.networks import DeepSCM  # noqa: E402
from monai_cf.networks.nets import AttributePredictor  # noqa: E402
from tests.engines.helpers import TINY_HVAE  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    batch = SyntheticCXR(spatial_size=16, seed=0).sample_batch(32)
    records = [
        {"image": torch.as_tensor(batch["image"][i]), **{k: batch[k][i] for k in ("sex", "race", "age", "disease")}}
        for i in range(32)
    ]
    train = create_data_loader(records, batch_size=4, seed=0)  # 16 samples, 4 batches per rank
    torch.manual_seed(rank)  # different initial weights per rank: DDP must start all from rank 0's HVAE
    scm = DeepSCM("mimic_cxr", image_model={**TINY_HVAE, "parents_dim": 6})
    torch.manual_seed(0)  # the frozen parts are shared
    scm.mechanisms.load_state_dict(
        DeepSCM("mimic_cxr", image_model={**TINY_HVAE, "parents_dim": 6}).mechanisms.state_dict()
    )
    guidance = AttributePredictor(2, 1, "mimic_cxr", channels=(8, 16))
    tuner = create_cft_trainer(
        scm,
        guidance,
        train,
        mode="soft",
        output_dir=os.path.join(out_dir, f"rank{rank}"),
        max_epochs=2,
        elbo_constraint=3.0,
        lagrange_lr=0.5,
        ema_rate=0.9,
        device="cpu",
        stats=False,
    )
    assert isinstance(tuner.forward_module, torch.nn.parallel.DistributedDataParallel)
    tuner.run()
    torch.save(
        {
            "network": scm.image_model.state_dict(),
            "multiplier": tuner.lagrangian.multiplier.detach().clone(),
            "iteration": tuner.state.iteration,
        },
        os.path.join(out_dir, f"final_rank{rank}.pt"),
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
