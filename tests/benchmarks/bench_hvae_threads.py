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
"""How an HVAE step's throughput scales over the CPU's cores, and the most that spreading it over them can give.

Times the step of ``bench_hvae_speed`` (training or counterfactuals at a reference architecture) four ways, each
in a fresh process, in interleaved rounds because on a shared VM windows of the same computation differ by up
to 30%:

- ``1-thread``: one process, one intra-op thread;
- ``N-threads``: one process, N intra-op threads (what the library runs; N = ``--threads``);
- ``N-workers-split``: N Python threads in one process, each with one intra-op thread, its own model and
  batch/N images, stepping independently (data parallelism without any gradient exchange);
- ``N-workers-full``: the same with the full batch per worker: N independent copies of the whole step.

Images/s counts every worker's images. The ``workers`` rows share nothing but the machine, so they bound what
any way of spreading one step over N cores (more intra-op threads, inter-op parallelism, data parallelism) can
reach with these kernels: if ``N-workers-full`` stays below a target, no threading scheme gets there. Each
worker holds its own model and activations (about 1 GB per training worker at Morpho-MNIST, batch 32).

Usage: ``python tests/benchmarks/bench_hvae_threads.py [--preset morphomnist] [--rounds 3] [--threads 2]``.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_hvae_speed as speed  # noqa: E402
from bench_networks import _images  # noqa: E402

MODES = ("1-thread", "N-threads", "N-workers-split", "N-workers-full")


def _layout(mode: str, threads: int, batch: int) -> tuple[int, int, int]:
    """(intra-op threads, workers, images per worker step) of a mode."""
    if mode == "1-thread":
        return 1, 1, batch
    if mode == "N-threads":
        return threads, 1, batch
    return 1, threads, batch // threads if mode == "N-workers-split" else batch


def _time_mode(preset: str, task: str, mode: str, threads: int, seconds: float) -> float:
    """Images/s of ``mode``: all workers step for ``seconds`` after their warm-up; their images are summed."""
    from monai_cf.networks import HVAE

    intra, workers, batch = _layout(mode, threads, speed.CONFIGS[preset]["batch"])
    speed._setup_process(intra, "tuned")
    torch.manual_seed(0)
    steps = []
    for _ in range(workers):
        model = HVAE.from_preset(preset)
        x, pa = _images(batch, model.in_channels, model.spatial_size, model.parents_dim)
        steps.append(speed.make_step(model, task, x, pa))
    ready = threading.Barrier(workers)
    done = [0] * workers
    elapsed = [0.0] * workers

    def work(index: int) -> None:
        # warm up on the thread that will be timed: each OpenMP root thread has its own team and caches
        for _ in range(speed.CONFIGS[preset]["warmup"]):
            steps[index]()
        ready.wait()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            steps[index]()
            done[index] += 1
        elapsed[index] = time.perf_counter() - start

    if workers == 1:
        work(0)
    else:
        pool = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    return sum(n * batch / t for n, t in zip(done, elapsed))


def main() -> None:
    parser = speed.interleaved_parser(__doc__.splitlines()[0], rounds=3, unit="mode")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per mode and round")
    args = parser.parse_args()
    batch = speed.CONFIGS[args.preset]["batch"]
    if batch % args.threads:
        parser.error(f"--threads {args.threads} does not divide the {args.preset} batch of {batch} images")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, N = {args.threads}, preset {args.preset}")
    print("| task | mode | img/s (median of rounds) | rounds | vs 1 thread | vs reference |")
    print("|---|---|---|---|---|---|")
    for task in args.tasks.split(","):
        load = os.getloadavg()[0]
        rates = speed.interleaved_runs(
            _time_mode, MODES, args.rounds, lambda m: (args.preset, task, m, args.threads, args.seconds)
        )
        single = statistics.median(rates["1-thread"])
        reference = speed.REFERENCE[args.preset, task]
        for mode in MODES:
            median = statistics.median(rates[mode])
            spread = "/".join(f"{r:.0f}" for r in rates[mode])
            cells = [task, mode, f"{median:.1f}", spread, f"{median / single:.2f}x", f"{median / reference:.2f}x"]
            print("| " + " | ".join(cells) + " |", flush=True)
        target = speed.TARGETS[args.preset] * reference
        best = max(MODES, key=lambda m: statistics.median(rates[m]))
        print(
            f"{task}: the {speed.TARGETS[args.preset]:.0f}x target is {target:.0f} img/s; the most any mode reached is "
            f"{statistics.median(rates[best]):.0f} ({best}); load {load:.1f}->{os.getloadavg()[0]:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
