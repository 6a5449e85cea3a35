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
"""HVAE training throughput and nELBO on the phantom through :func:`monai_cf.engines.create_hvae_trainer`.

``python tests/engines/bench_hvae_training.py --n-train 2000 --epochs 2 --size 32 --threads 2`` writes a phantom,
trains the default ``HVAE(2, 1, size, 6)`` with the full handler stack (EMA, validation, atomic checkpoints,
optional MLflow) and prints: images/s of the training iterations (data loading included, validation and
checkpoint writing excluded), the validation nELBO of the initial and the final EMA weights, and the mean training
nELBO of the first 10 and the last epoch's iterations (nats per pixel).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from ignite.engine import Events  # noqa: E402
from monai.data import CacheDataset  # noqa: E402
from monai.engines.utils import IterationEvents  # noqa: E402

from monai_cf.data import SyntheticCXR, csv_dataset  # noqa: E402
from monai_cf.engines import create_data_loader, create_hvae_trainer  # noqa: E402
from monai_cf.networks import HVAE  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mlflow", action="store_true", help="also track the run in a SQLite MLflow store")
    parser.add_argument(
        "--flatten-cache",
        action="store_true",
        help="cache the whole loading pipeline (csv_dataset's nested Compose stops CacheDataset caching at its start)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench_hvae_"))
    start = time.perf_counter()
    SyntheticCXR(spatial_size=args.size, seed=0).write(root / "data", args.n_train, args.n_val, 1)
    train_ds = csv_dataset(root / "data" / "train.csv", "mimic_cxr", spatial_size=args.size, cache=True)
    val_ds = csv_dataset(root / "data" / "val.csv", "mimic_cxr", spatial_size=args.size, cache=True)
    if args.flatten_cache:
        train_ds = CacheDataset(train_ds.data, train_ds.transform.flatten(), progress=False)
        val_ds = CacheDataset(val_ds.data, val_ds.transform.flatten(), progress=False)
    print(f"phantom written and cached in {time.perf_counter() - start:.1f} s")
    train = create_data_loader(train_ds, batch_size=args.batch_size, seed=0)
    val = create_data_loader(val_ds, batch_size=100, shuffle=False)
    torch.manual_seed(0)
    model = HVAE(2, 1, args.size, 6)
    extra = {"tracking_uri": f"sqlite:///{root}/mlruns.db", "log_every": 1} if args.mlflow else {}
    trainer = create_hvae_trainer(
        model, train, val, root / "run", max_epochs=args.epochs, device="cpu", stats=False, **extra
    )
    trainer.evaluator.run()
    initial_val = trainer.evaluator.state.metrics["val_nelbo"]

    losses: list[float] = []
    busy = {"start": 0.0}
    epoch_times: list[float] = []

    # data loading + forward/backward/step/EMA of each iteration; checkpoint writing and validation excluded
    trainer.add_event_handler(Events.GET_BATCH_STARTED, lambda e: busy.__setitem__("start", time.perf_counter()))

    @trainer.on(IterationEvents.MODEL_COMPLETED)
    def _stop_clock(engine):
        if (engine.state.iteration - 1) % engine.state.epoch_length == 0:
            epoch_times.append(0.0)
        epoch_times[-1] += time.perf_counter() - busy["start"]

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output[0]["loss"]))
    wall = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - wall
    n_per_epoch = len(train.sampler)
    print(f"params {sum(p.numel() for p in model.parameters())}, batch {args.batch_size}, threads {args.threads}")
    for epoch, seconds in enumerate(epoch_times, start=1):
        print(f"epoch {epoch}: {n_per_epoch / seconds:.1f} images/s ({seconds:.1f} s in training iterations)")
    print(f"trainer.run wall time {wall:.1f} s (iterations, validation, checkpoints, logging)")
    last = sum(losses[-len(train) :]) / len(train)
    print(f"train nELBO first 10 iterations {sum(losses[:10]) / 10:.4f}, last epoch {last:.4f}")
    print(f"val nELBO (EMA) initial {initial_val:.4f} -> final {trainer.evaluator.state.metrics['val_nelbo']:.4f}")
    print(f"skipped updates {trainer.state.skipped_updates}; outputs in {root}")


if __name__ == "__main__":
    main()
