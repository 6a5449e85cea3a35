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
"""CPU throughput and peak memory of monai_cf networks.

Run ``python tests/benchmarks/bench_networks.py`` (all rows) or ``... --rows hvae_small32_train,hvae_small32_cf``
(``--list`` names them). Each row is a function registered with :func:`row`; it runs in a fresh spawned
process, so that its peak memory is its own, and returns a dict of the table's columns.

Columns: ``params``; ``batch``; ``img/s`` = images per wall-clock second after warm-up (training: forward,
backward and a fused AdamW step; counterfactuals: abduction of latents and pixel noise plus decoding
under new parents, no gradients); ``cpu util`` = process CPU time / (wall time x threads), well below 1
when other processes compete for the cores (the figures are then pessimistic); ``peak MB`` = peak
resident set size of the row's process (``resource.getrusage(...).ru_maxrss``: Python, torch, model,
data and the step's activations); ``step MB`` = that peak minus the resident size after building the model,
optimiser and data, i.e. what running the steps adds (activations, gradients, optimiser state, allocator
caches).

To add rows for another network, write a function that builds its inputs, calls :func:`measure` with a
step closure and returns the result, and decorate it with ``@row("name")``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time
from collections.abc import Callable
from typing import Any

import torch

ROWS: dict[str, Callable[[int], dict[str, Any]]] = {}
COLUMNS = ["row", "params", "batch", "img/s", "cpu util", "peak MB", "step MB", "note"]


def row(name: str) -> Callable:
    """Register a benchmark row: a function of the thread count returning a dict of :data:`COLUMNS`."""

    def register(fn: Callable[[int], dict[str, Any]]) -> Callable[[int], dict[str, Any]]:
        ROWS[name] = fn
        return fn

    return register


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(step: Callable[[], Any], batch: int, threads: int, warmup: int, repeats: int) -> dict[str, Any]:
    """Time ``repeats`` calls of ``step`` (each processing ``batch`` images) after ``warmup`` calls."""
    rss_before = _rss_mb()
    for _ in range(warmup):
        step()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "batch": batch,
        "img/s": batch * repeats / wall,
        "cpu util": cpu / (wall * threads),
        "peak MB": peak,
        "step MB": max(peak - rss_before, 0.0),
    }


def _images(batch: int, channels: int, size: tuple[int, ...], parents: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((batch, channels) + size, generator=gen) * 2 - 1
    x = torch.round((x + 1) * 127.5) / 127.5 - 1
    return x, torch.randn(batch, parents, generator=gen)


def _hvae_train(preset: str, batch: int, threads: int, warmup: int, repeats: int, **overrides: Any) -> dict:
    from monai_cf.networks import HVAE

    torch.manual_seed(0)
    model = HVAE.from_preset(preset, **overrides)
    x, pa = _images(batch, model.in_channels, model.spatial_size, model.parents_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.9), weight_decay=0.01, fused=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.elbo(x, pa)["nelbo"].backward()
        optimizer.step()

    result = measure(step, batch, threads, warmup, repeats)
    return {"params": sum(p.numel() for p in model.parameters()), **result}


def _hvae_counterfactual(preset: str, batch: int, threads: int, warmup: int, repeats: int, **overrides: Any) -> dict:
    from monai_cf.networks import HVAE

    torch.manual_seed(0)
    model = HVAE.from_preset(preset, **overrides).eval()
    x, pa = _images(batch, model.in_channels, model.spatial_size, model.parents_dim)
    pa_cf = pa.flip(0)

    def step() -> None:
        with torch.no_grad():
            model.counterfactual(x, pa, pa_cf)

    result = measure(step, batch, threads, warmup, repeats)
    return {"params": sum(p.numel() for p in model.parameters()), **result}


@row("hvae_small32_train")
def hvae_small32_train(threads: int) -> dict:
    return _hvae_train("small32", 32, threads, warmup=3, repeats=10)


@row("hvae_small32_cf")
def hvae_small32_cf(threads: int) -> dict:
    return _hvae_counterfactual("small32", 32, threads, warmup=2, repeats=10)


@row("hvae_small64_train")
def hvae_small64_train(threads: int) -> dict:
    return _hvae_train("small64", 32, threads, warmup=3, repeats=6)


@row("hvae_small64_cf")
def hvae_small64_cf(threads: int) -> dict:
    return _hvae_counterfactual("small64", 32, threads, warmup=2, repeats=6)


@row("hvae_morphomnist_train")
def hvae_morphomnist_train(threads: int) -> dict:
    result = _hvae_train("morphomnist", 32, threads, warmup=3, repeats=6)
    return {**result, "note": "reference: 46 img/s"}


@row("hvae_morphomnist_cf")
def hvae_morphomnist_cf(threads: int) -> dict:
    result = _hvae_counterfactual("morphomnist", 32, threads, warmup=2, repeats=6)
    return {**result, "note": "reference: 132 img/s"}


@row("hvae_mimic192_train")
def hvae_mimic192_train(threads: int) -> dict:
    return _hvae_train("mimic192", 16, threads, warmup=1, repeats=2)


@row("hvae_mimic192_cf")
def hvae_mimic192_cf(threads: int) -> dict:
    return _hvae_counterfactual("mimic192", 16, threads, warmup=1, repeats=2)


def _bundle_diffusion(**overrides: Any) -> Any:
    """The diffusion mechanism of the bundle's ``diffusion.yaml`` (32x32, the phantom's four image parents)."""
    from pathlib import Path

    import yaml

    from monai_cf.networks.nets import DiffusionImageMechanism

    config_file = Path(__file__).resolve().parents[2] / "bundles" / "cxr_soft_cft" / "configs" / "diffusion.yaml"
    config = yaml.safe_load(config_file.read_text())["diffusion_model"]
    torch.manual_seed(0)
    parents = {"sex": 1, "race": 3, "age": 1, "disease": 1}
    return DiffusionImageMechanism(2, 1, 32, parents, **{**config, **overrides})


@row("diffusion32_train")
def diffusion32_train(threads: int) -> dict:
    model = _bundle_diffusion()
    x, pa = _images(64, 1, (32, 32), model.parents_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x, pa)["loss"].backward()
        optimizer.step()

    result = measure(step, 64, threads, warmup=3, repeats=10)
    return {"params": sum(p.numel() for p in model.parameters()), **result, "note": "batch 64, diffusion.yaml"}


def _diffusion_counterfactual(threads: int, steps: int, guidance: str) -> dict:
    model = _bundle_diffusion(num_inference_steps=steps).eval()
    x, pa = _images(50, 1, (32, 32), model.parents_dim)
    pa_cf = torch.stack([pa.roll(k + 1, 0) for k in range(4)])  # four interventions from one inversion
    intervened = torch.zeros(4, 50, 4, dtype=torch.bool)
    for k in range(4):
        intervened[k, :, k] = True
    weights = {"mode": guidance, "weight": 3.0, "intervened_weight": 3.0}

    def step() -> None:
        model.counterfactual(x, pa, pa_cf, intervened=intervened, guidance=weights)

    result = measure(step, 4 * 50, threads, warmup=1, repeats=2)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        **result,
        "note": f"{steps} DDIM steps, {guidance}; counterfactual images (4 per inversion)",
    }


for _steps in (10, 25, 50):
    for _guidance in ("none", "cfg", "dcfg"):
        row(f"diffusion32_cf_s{_steps}_{_guidance}")(
            lambda threads, steps=_steps, guidance=_guidance: _diffusion_counterfactual(threads, steps, guidance)
        )


def _run_row(name: str, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    load = os.getloadavg()[0]
    result = ROWS[name](threads)
    note = result.get("note", "")
    result["note"] = f"{note}; " if note else ""
    result["note"] += f"load {load:.1f}->{os.getloadavg()[0]:.1f}"
    return {"row": name, **result}


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if value < 10 else f"{value:.0f}"
    if isinstance(value, int) and value >= 10000:
        return f"{value / 1e6:.2f}M"
    return str(value)


def print_table(results: list[dict[str, Any]]) -> None:
    """Print ``results`` as a markdown table with the :data:`COLUMNS`."""
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for result in results:
        print("| " + " | ".join(_format(result.get(col, "")) for col in COLUMNS) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per row (default 2)")
    parser.add_argument("--list", action="store_true", help="list the row names and exit")
    args = parser.parse_args()
    if args.list:
        print("\n".join(ROWS))
        return
    names = [n for n in args.rows.split(",") if n] or list(ROWS)
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; available: {list(ROWS)}")
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs")
    context = mp.get_context("spawn")
    results = []
    for name in names:
        with context.Pool(1) as pool:
            results.append(pool.apply(_run_row, (name, args.threads)))
    print_table(results)


if __name__ == "__main__":
    main()
