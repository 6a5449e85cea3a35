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
"""HVAE speed on the CPU at the reference architectures, in absolute figures.

For the Morpho-MNIST (batch 32) and MIMIC-192 (batch 16) architectures: training images/s (forward, backward,
AdamW step), counterfactual images/s (abduct + decode), peak memory, GFLOP/s achieved (FLOPs counted once with
``torch.utils.flop_counter``). One line per configuration, then a summary line. Each configuration runs in its
own process (clean peak memory).

A speed-up over the reference implementation is printed only when the reference is timed in the same run:
``--reference CHECKOUT`` points at a checkout of it (nothing of it is shipped; see ``reference_hvae.py``), and then
monai_cf and the reference run side by side, each configuration ``--rounds`` times in fresh processes with the
order alternated between rounds, and the ratio of the median images/s is printed. Without it the figures are
absolute and the summary says that no ratio was measured: a figure measured on another day is not a baseline.

Images/s is the median over several timed windows (best and worst printed beside it), because on a shared VM
windows of the same computation differ by up to 30%; the verdicts use the median.

``--precision`` picks the HVAE's arithmetic (:attr:`monai_cf.networks.HVAE.precision`; the default ``auto`` is
the library default: bf16 autocast on CPUs with native bf16 for large models such as MIMIC-192, float32 for
small ones such as Morpho-MNIST); the path that actually ran is printed. Unless
``--elbo-steps 0``, a short-training check follows: the Morpho-MNIST architecture (6 parent dims) trained from
the same seed on the same phantom images with ``fp32`` and with the chosen precision, both final models then
scored in fp32 on held-out images; it prints both nELBOs and their relative difference (target < 1%).

``--allocator tuned`` (the default) applies :func:`monai_cf.engines.runtime.tune_cpu_allocator` in each
process, as the monai_cf engines do on a CPU; ``--allocator default`` keeps the C library's settings.

Usage: ``python tests/benchmarks/bench_hvae_speed.py [--threads 2] [--precision auto] [--elbo-steps 200]
[--allocator tuned] [--reference ~/causal-gen --rounds 3]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_networks import _images, measure  # noqa: E402

CONFIGS = {
    "morphomnist": {"batch": 32, "warmup": 3, "repeats": 4, "windows": 7},
    "mimic192": {"batch": 16, "warmup": 1, "repeats": 1, "windows": 3},
}
ELBO_TOLERANCE = 0.01


def _resolved_path(precision: str, model: Any) -> str:
    if precision == "auto":
        bf16 = isinstance(model._precision_context(torch.device("cpu")), torch.autocast)
        return f"auto -> {'bf16' if bf16 else 'fp32'}"
    return precision


def _setup_process(threads: int, allocator: str) -> None:
    from monai_cf.engines.runtime import tune_cpu_allocator

    torch.set_num_threads(threads)
    if allocator == "tuned":
        tune_cpu_allocator()  # what the monai_cf engines do on a CPU


def interleaved_runs(
    function: Callable[..., Any], labels: Sequence[str], rounds: int, arguments: Callable[[str], tuple]
) -> dict[str, list[Any]]:
    """``function(*arguments(label))`` for every label, each call in a fresh spawned process, in interleaved rounds.

    On a shared VM windows of the same computation differ by up to 30%; interleaving (a, b, ..., a, b, ...) spreads
    that drift over all labels instead of letting it fall on one. Returns each label's results in round order.
    """
    results: dict[str, list[Any]] = {label: [] for label in labels}
    context = mp.get_context("spawn")
    for _ in range(rounds):
        for label in labels:
            with context.Pool(1) as pool:
                results[label].append(pool.apply(function, arguments(label)))
    return results


def interleaved_parser(description: str, rounds: int, unit: str) -> argparse.ArgumentParser:
    """The arguments the interleaved benchmarks share: ``--preset``, ``--tasks``, ``--rounds`` and ``--threads``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default="morphomnist", choices=tuple(CONFIGS))
    parser.add_argument("--tasks", default="train,cf")
    parser.add_argument("--rounds", type=int, default=rounds, help=f"interleaved rounds; each {unit} once per round")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    return parser


def make_step(model: Any, task: str, x: torch.Tensor, pa: torch.Tensor) -> Callable[[], None]:
    """One benchmark step on a batch: ``"train"`` (nELBO forward, backward, AdamW) or ``"cf"`` (abduct + decode)."""
    if task == "train":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.9), weight_decay=0.01, fused=True)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            model.elbo(x, pa)["nelbo"].backward()
            optimizer.step()

        return step
    model.eval().requires_grad_(False)  # inference; also keeps the FLOP counter's module hooks out of autograd
    pa_cf = pa.flip(0)

    def step() -> None:
        with torch.no_grad():
            model.counterfactual(x, pa, pa_cf)

    return step


def _run(preset: str, task: str, threads: int, precision: str, allocator: str) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    from monai_cf.networks import HVAE

    _setup_process(threads, allocator)
    torch.manual_seed(0)
    cfg = CONFIGS[preset]
    model = HVAE.from_preset(preset, precision=precision)
    x, pa = _images(cfg["batch"], model.in_channels, model.spatial_size, model.parents_dim)
    step = make_step(model, task, x, pa)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    load = os.getloadavg()[0]
    timed = _timed_windows(step, cfg, threads)
    return {
        "config": f"{preset} {task}",
        "precision": _resolved_path(precision, model),
        "params": sum(p.numel() for p in model.parameters()),
        "batch": cfg["batch"],
        **timed,
        "GFLOP/step": flops / 1e9,
        "GFLOP/s": flops * timed["img/s"] / cfg["batch"] / 1e9,
        "load": f"{load:.1f}->{os.getloadavg()[0]:.1f}",
    }


def _timed_windows(step: Callable[[], None], cfg: dict[str, int], threads: int) -> dict[str, Any]:
    # several timed windows: on a shared VM single windows of the same computation differ by up to 30%
    windows = [
        measure(step, cfg["batch"], threads, cfg["warmup"] if i == 0 else 0, cfg["repeats"])
        for i in range(cfg["windows"])
    ]
    rates = sorted(w["img/s"] for w in windows)
    return {
        "img/s": statistics.median(rates),
        "best img/s": rates[-1],
        "worst img/s": rates[0],
        "peak MB": max(w["peak MB"] for w in windows),
    }


def _run_reference(checkout: str, preset: str, task: str, threads: int, allocator: str) -> dict[str, Any]:
    """The reference HVAE of ``checkout`` timed as :func:`_run` times ours (same windows, threads and allocator)."""
    from reference_hvae import load_reference, reference_step

    _setup_process(threads, allocator)
    cfg = CONFIGS[preset]
    model, args = load_reference(checkout, preset)
    step = reference_step(model, args, task, cfg["batch"])
    load = os.getloadavg()[0]
    timed = _timed_windows(step, cfg, threads)
    return {
        "config": f"{preset} {task} (reference)",
        "precision": "fp32",
        "params": sum(p.numel() for p in model.parameters()),
        "batch": cfg["batch"],
        **timed,
        "GFLOP/step": float("nan"),
        "GFLOP/s": float("nan"),
        "load": f"{load:.1f}->{os.getloadavg()[0]:.1f}",
    }


def side_by_side(
    checkout: str, preset: str, task: str, rounds: int, threads: int, precision: str, allocator: str
) -> dict[str, list[dict[str, Any]]]:
    """monai_cf and the reference at ``preset`` / ``task``, each ``rounds`` times in fresh processes, the order
    alternated between rounds (monai_cf first in even rounds) so that a drifting machine favours neither."""
    runs: dict[str, list[dict[str, Any]]] = {"monai_cf": [], "reference": []}
    calls = {
        "monai_cf": (_run, (preset, task, threads, precision, allocator)),
        "reference": (_run_reference, (checkout, preset, task, threads, allocator)),
    }
    context = mp.get_context("spawn")
    for index in range(rounds):
        for label in ("monai_cf", "reference") if index % 2 == 0 else ("reference", "monai_cf"):
            function, arguments = calls[label]
            with context.Pool(1) as pool:
                runs[label].append(pool.apply(function, arguments))
    return runs


def _phantom_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` quantised 32x32 phantom images in [-1, 1] and their 6-dim parents (sex, race one-hot, age, disease)."""
    from monai_cf.data import SyntheticCXR

    batch = SyntheticCXR(spatial_size=32, seed=seed).sample_batch(n)
    x = torch.round(torch.as_tensor(batch["image"]).clamp(0, 1) * 255) / 127.5 - 1
    pa = torch.cat(
        [
            torch.as_tensor(batch["sex"]).float()[:, None],
            torch.nn.functional.one_hot(torch.as_tensor(batch["race"]), 3).float(),
            torch.as_tensor(batch["age"]).float()[:, None] / 50 - 1,
            torch.as_tensor(batch["disease"]).float()[:, None],
        ],
        dim=1,
    )
    return x, pa


def _train_elbo(precision: str, steps: int, threads: int, allocator: str) -> dict[str, Any]:
    """Train the Morpho-MNIST architecture ``steps`` steps; score the result in fp32 on held-out phantoms."""
    from monai_cf.networks import HVAE

    _setup_process(threads, allocator)
    x_train, pa_train = _phantom_data(1024, seed=0)
    x_test, pa_test = _phantom_data(256, seed=1)
    torch.manual_seed(0)
    model = HVAE.from_preset("morphomnist", parents_dim=6, precision=precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.9), weight_decay=0.01, fused=True)
    batch, last = 32, []
    start = time.perf_counter()
    for step in range(steps):
        rows = slice((step * batch) % len(x_train), (step * batch) % len(x_train) + batch)
        optimizer.zero_grad(set_to_none=True)
        nelbo = model.elbo(x_train[rows], pa_train[rows])["nelbo"]
        nelbo.backward()
        optimizer.step()
        if step >= steps - 20:
            last.append(nelbo.detach())
    seconds = time.perf_counter() - start
    trained_precision = _resolved_path(precision, model)
    model.precision = "fp32"
    torch.manual_seed(1)
    with torch.no_grad():
        held_out = sum(
            model.elbo(x_test[i : i + 64], pa_test[i : i + 64])["nelbo"].item() for i in range(0, len(x_test), 64)
        ) / (len(x_test) // 64)
    return {
        "precision": trained_precision,
        "train nelbo (last 20)": torch.stack(last).mean().item(),
        "held-out nelbo (fp32 eval)": held_out,
        "img/s": steps * batch / seconds,
        "load": os.getloadavg()[0],
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
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--elbo-steps", type=int, default=200, help="short-training ELBO check; 0 skips it")
    parser.add_argument(
        "--allocator", default="tuned", choices=("tuned", "default"), help="C allocator: tune_cpu_allocator or not"
    )
    parser.add_argument(
        "--reference", default=None, metavar="CHECKOUT", help="a checkout of the reference HVAE to time side by side"
    )
    parser.add_argument("--rounds", type=int, default=3, help="side-by-side rounds with --reference (order alternated)")
    args = parser.parse_args()
    if args.reference is not None and not Path(args.reference).expanduser().is_dir():
        parser.error(f"--reference {args.reference}: not a folder (a checkout of the reference implementation)")
    print(
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, precision {args.precision}, "
        f"allocator {args.allocator}"
    )
    columns = [
        "config",
        "precision",
        "params",
        "batch",
        "img/s",
        "best img/s",
        "worst img/s",
        "GFLOP/step",
        "GFLOP/s",
        "peak MB",
    ]
    print("| " + " | ".join(columns + ["load"]) + " |")
    print("|" + "---|" * (len(columns) + 1))
    results, ratios = [], []
    ctx = mp.get_context("spawn")
    for preset in args.configs.split(","):
        for task in ("train", "cf"):
            if args.reference is None:
                with ctx.Pool(1) as pool:
                    result = pool.apply(_run, (preset, task, args.threads, args.precision, args.allocator))
                results.append(result)
                print("| " + " | ".join(_fmt(result[c]) for c in columns + ["load"]) + " |", flush=True)
                continue
            try:
                runs = side_by_side(
                    args.reference, preset, task, args.rounds, args.threads, args.precision, args.allocator
                )
            except ValueError as error:  # the checkout lacks this preset: ours alone, no ratio
                print(f"reference skipped for {preset}: {error}", flush=True)
                args_ours = (preset, task, args.threads, args.precision, args.allocator)
                with ctx.Pool(1) as pool:
                    runs = {"monai_cf": [pool.apply(_run, args_ours)], "reference": []}
            for run in runs["monai_cf"] + runs["reference"]:
                print("| " + " | ".join(_fmt(run[c]) for c in columns + ["load"]) + " |", flush=True)
            ours = statistics.median(r["img/s"] for r in runs["monai_cf"])
            results.append({**runs["monai_cf"][0], "img/s": ours})
            if runs["reference"]:
                theirs = statistics.median(r["img/s"] for r in runs["reference"])
                ratios.append(
                    f"{preset} {task} monai_cf {ours:.1f} / reference {theirs:.1f} img/s = {ours / theirs:.2f}x "
                    f"(medians of {len(runs['reference'])} alternated rounds, {runs['monai_cf'][0]['precision']})"
                )
    verdicts = [f"{r['config']} {r['img/s']:.1f} img/s" for r in results]
    if ratios:
        verdicts += [f"side by side in this run: {ratio}" for ratio in ratios]
    else:
        verdicts.append("no ratio to the reference implementation measured (it was not timed in this run)")
    if args.elbo_steps > 0:
        runs = []
        for precision in ("fp32", args.precision):
            with ctx.Pool(1) as pool:
                run = pool.apply(_train_elbo, (precision, args.elbo_steps, args.threads, args.allocator))
            runs.append(run)
            print(
                f"elbo check ({args.elbo_steps} steps, morphomnist, phantoms): {run['precision']}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in run.items() if k != "precision"),
                flush=True,
            )
        relative = abs(runs[1]["held-out nelbo (fp32 eval)"] / runs[0]["held-out nelbo (fp32 eval)"] - 1)
        train_relative = abs(runs[1]["train nelbo (last 20)"] / runs[0]["train nelbo (last 20)"] - 1)
        ok = relative < ELBO_TOLERANCE
        verdicts.append(
            f"elbo {runs[1]['precision']} vs fp32: held-out {relative:.2%}, train {train_relative:.2%} "
            f"(target < {ELBO_TOLERANCE:.0%}) {'PASS' if ok else 'FAIL'}"
        )
    print("summary: " + "; ".join(verdicts))


if __name__ == "__main__":
    main()
