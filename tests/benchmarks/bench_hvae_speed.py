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
"""HVAE speed on the CPU at the reference architectures, against the reference implementation's figures.

For the Morpho-MNIST (batch 32) and MIMIC-192 (batch 16) architectures: training images/s (forward, backward,
AdamW step), counterfactual images/s (abduct + decode), peak memory, GFLOP/s achieved (FLOPs counted once with
``torch.utils.flop_counter``) and the ratio to the reference figures measured on this machine class. One line per
configuration, then a summary line. Each configuration runs in its own process (clean peak memory).

Usage: ``python tests/benchmarks/bench_hvae_speed.py [--threads 2]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_networks import _images, measure  # noqa: E402

#: images/s of the reference implementation on a 2-core AMD EPYC (torch 2.13 CPU), from issue 8.
REFERENCE = {
    ("morphomnist", "train"): 46.0,
    ("morphomnist", "cf"): 132.0,
    ("mimic192", "train"): 0.6,
    ("mimic192", "cf"): 2.7,
}
CONFIGS = {
    "morphomnist": {"batch": 32, "warmup": 3, "repeats": 6},
    "mimic192": {"batch": 16, "warmup": 1, "repeats": 2},
}
TARGETS = {"morphomnist": 3.0, "mimic192": 2.0}


def _run(preset: str, task: str, threads: int) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    from monai_cf.networks import HVAE

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = CONFIGS[preset]
    model = HVAE.from_preset(preset)
    x, pa = _images(cfg["batch"], model.in_channels, model.spatial_size, model.parents_dim)
    if task == "train":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.9), weight_decay=0.01, fused=True)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            model.elbo(x, pa)["nelbo"].backward()
            optimizer.step()

    else:
        model.eval().requires_grad_(False)  # inference; also keeps the FLOP counter's module hooks out of autograd
        pa_cf = pa.flip(0)

        def step() -> None:
            with torch.no_grad():
                model.counterfactual(x, pa, pa_cf)

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    load = os.getloadavg()[0]
    result = measure(step, cfg["batch"], threads, cfg["warmup"], cfg["repeats"])
    steps_per_s = result["img/s"] / cfg["batch"]
    reference = REFERENCE[preset, task]
    return {
        "config": f"{preset} {task}",
        "params": sum(p.numel() for p in model.parameters()),
        "batch": cfg["batch"],
        "img/s": result["img/s"],
        "reference img/s": reference,
        "ratio": result["img/s"] / reference,
        "GFLOP/step": flops / 1e9,
        "GFLOP/s": flops * steps_per_s / 1e9,
        "peak MB": result["peak MB"],
        "load": f"{load:.1f}->{os.getloadavg()[0]:.1f}",
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    if isinstance(value, int) and value > 10000:
        return f"{value / 1e6:.2f}M"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default="morphomnist,mimic192")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs")
    columns = ["config", "params", "batch", "img/s", "reference img/s", "ratio", "GFLOP/step", "GFLOP/s", "peak MB"]
    print("| " + " | ".join(columns + ["load"]) + " |")
    print("|" + "---|" * (len(columns) + 1))
    results = []
    ctx = mp.get_context("spawn")
    for preset in args.configs.split(","):
        for task in ("train", "cf"):
            with ctx.Pool(1) as pool:
                result = pool.apply(_run, (preset, task, args.threads))
            results.append(result)
            print("| " + " | ".join(_fmt(result[c]) for c in columns + ["load"]) + " |", flush=True)
    verdicts = []
    for result in results:
        preset = result["config"].split()[0]
        ok = result["ratio"] >= TARGETS[preset]
        verdicts.append(
            f"{result['config']} {result['ratio']:.2f}x (target {TARGETS[preset]:.0f}x) {'PASS' if ok else 'FAIL'}"
        )
    print("summary: " + "; ".join(verdicts))


if __name__ == "__main__":
    main()
