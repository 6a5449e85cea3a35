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
"""Where an HVAE step's time goes on the CPU, by ablation: the step timed with parts of its work removed.

A profiler misleads here: its own bookkeeping inflates the many small memory-bound operations of an HVAE several
fold (a 2 MB copy profiled at 6 ms that takes 0.1 ms unprofiled). This script instead times the real step and the
same step with one kind of work removed, each variant in a fresh process, in interleaved rounds (full, no GELU,
..., full, no GELU, ...) because on a shared VM windows of the same computation differ by up to 30%:

- ``no-gelu``: the activations inside the bottleneck blocks replaced by the identity;
- ``no-spatial-conv``: the kxk ("3x3") convolutions of the bottleneck blocks skipped (their input passed on);
- ``no-noise``: the Gaussian noise of the latent samples replaced by a cached zero tensor (no random numbers);
- ``none-of-these``: all three removed.

The ablated steps compute something else, so they are bounds, not options: "cost" is how much faster the step
gets when that work is free, and "img/s if free" the speed it then reaches. Together with the share of FLOPs
the kxk convolutions hold, this says how far kernel work on each part can take the issue-8 targets.

Usage: ``python tests/benchmarks/bench_hvae_breakdown.py [--preset morphomnist] [--rounds 5] [--threads 2]``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hvae_speed import (  # noqa: E402
    CONFIGS,
    REFERENCE,
    TARGETS,
    _setup_process,
    interleaved_parser,
    interleaved_runs,
    make_step,
)
from bench_networks import _images  # noqa: E402

VARIANTS = ("full", "no-gelu", "no-spatial-conv", "no-noise", "none-of-these")


def _ablate(model: torch.nn.Module, variant: str) -> None:
    """Remove one kind of work from ``model``'s steps, in this (throw-away) process only."""
    from monai_cf.networks.nets import hvae as hvae_module

    removed = {"no-gelu", "no-spatial-conv", "no-noise"} if variant == "none-of-these" else {variant}
    if "no-gelu" in removed:
        for module in model.modules():
            if isinstance(module, hvae_module.HVAEBottleneckBlock):
                module.act = torch.nn.Identity()
    if "no-spatial-conv" in removed:
        from monai_cf.networks.blocks import hvae_blocks

        hvae_blocks.spatial_conv = lambda conv, x: x
    if "no-noise" in removed:
        zeros: dict[tuple, torch.Tensor] = {}

        def zero_noise(like: torch.Tensor, dtype: torch.dtype | None = None, **_: Any) -> torch.Tensor:
            key = (like.shape, dtype or like.dtype)
            if key not in zeros:
                zeros[key] = torch.zeros(like.shape, dtype=key[1])
            return zeros[key]

        hvae_module.torch.randn_like = zero_noise  # type: ignore[assignment]


def _time_variant(preset: str, task: str, variant: str, threads: int, repeats: int) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    from monai_cf.networks import HVAE

    _setup_process(threads, "tuned")
    torch.manual_seed(0)
    batch = CONFIGS[preset]["batch"]
    model = HVAE.from_preset(preset)
    _ablate(model, variant)
    x, pa = _images(batch, model.in_channels, model.spatial_size, model.parents_dim)
    step = make_step(model, task, x, pa)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    for _ in range(CONFIGS[preset]["warmup"]):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"ms": statistics.median(times) * 1000, "gflop": counter.get_total_flops() / 1e9}


def main() -> None:
    parser = interleaved_parser(__doc__.splitlines()[0], rounds=5, unit="variant")
    parser.add_argument("--repeats", type=int, default=9, help="timed steps per process (median taken)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, preset {args.preset}")
    batch = CONFIGS[args.preset]["batch"]
    print("| task | variant | ms/step (median of rounds) | rounds | GFLOP/step | cost ms | cost % | img/s if free |")
    print("|---|---|---|---|---|---|---|---|")
    for task in args.tasks.split(","):
        load = os.getloadavg()[0]
        runs = interleaved_runs(
            _time_variant, VARIANTS, args.rounds, lambda v: (args.preset, task, v, args.threads, args.repeats)
        )
        full = statistics.median(r["ms"] for r in runs["full"])
        for variant in VARIANTS:
            ms = statistics.median(r["ms"] for r in runs[variant])
            spread = "/".join(f"{r['ms']:.0f}" for r in runs[variant])
            cost = full - ms
            ablated = [f"{cost:.1f}", f"{cost / full:.0%}", f"{batch / ms * 1000:.0f}"]
            if variant == "full":
                ablated = ["", "", ""]
            cells = [task, variant, f"{ms:.1f}", spread, f"{runs[variant][0]['gflop']:.2f}", *ablated]
            print("| " + " | ".join(cells) + " |", flush=True)
        target = TARGETS[args.preset] * REFERENCE[args.preset, task]
        print(
            f"{task}: full step {batch / full * 1000:.0f} img/s; the {TARGETS[args.preset]:.0f}x target "
            f"({target:.0f} img/s) needs {batch / target * 1000:.0f} ms/step; "
            f"load {load:.1f}->{os.getloadavg()[0]:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
