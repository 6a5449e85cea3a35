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
"""Counterfactual augmentation throughput: the dictionary transform per sample versus the batched path.

Run ``python tests/benchmarks/bench_transforms.py`` (options: ``--size 64 --batch 64 --repeats 3 --threads 2``).

Setting: the default small HVAE at 64x64 (``HVAE(2, 1, 64, 6)`` through ``DeepSCM("mimic_cxr", ...)``,
untrained; speed does not depend on the weights), ``--batch`` phantom samples as ``csv_dataset`` gives them
(``(1, H, W)`` MetaTensor images, canonical attributes, ``"pa"``), random interventions on sex, race or age
(``prob=1``; do(age) also recomputes disease).

Rows:

- ``per-sample``: ``RandCounterfactuald`` called once per sample (what a ``Dataset`` transform does);
- ``batched``: ``CounterfactualBatchAugmenter.augment`` once on the collated batch (one image-model call);
- ``batched, cache hit``: the same with a warm ``CounterfactualCache`` (no network call);
- ``fixed do, per-sample`` / ``fixed do, batched``: ``Counterfactuald(do={"age": 80})`` and its batched twin.

Columns: ``img/s`` = images per second of the best (least disturbed) repeat and of the median repeat, the rows' repeats
interleaved so that they share the background load;
``cpu util`` = process CPU time / (wall time x threads) over the repeats, well below 1 when other processes
compete for the cores. Both paths draw the same interventions (same random state) and the script checks that
they produce the same counterfactuals. Exit status 1 if the batched path is less than 5x faster per image.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from monai.data import MetaTensor, list_data_collate

from monai_cf.data import EncodeAttributesd, SyntheticCXR
from monai_cf.networks import DeepSCM
from monai_cf.transforms import (
    CounterfactualBatchAugmenter,
    CounterfactualCache,
    Counterfactuald,
    RandCounterfactuald,
)

ATTRIBUTES = ["sex", "race", "age"]
REQUIRED_SPEEDUP = 5.0


def _items(size: int, n: int) -> list[dict]:
    encode = EncodeAttributesd("mimic_cxr")
    items = []
    for i, sample in enumerate(SyntheticCXR(spatial_size=size, seed=0).sample(n)):
        image = MetaTensor(torch.as_tensor(sample["image"]), meta={"filename_or_obj": f"{i:05d}.png"})
        items.append(encode({"image": image, **{k: sample[k] for k in ("sex", "race", "age", "disease")}}))
    return items


def _measure(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[list[float], float]]:
    """Wall times of each step over ``repeats`` interleaved rounds (so every row sees the same background load)
    and each step's CPU time over its rounds."""
    for step in steps.values():
        step()  # warm-up (allocator, oneDNN primitives, cache entries)
    walls: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, float] = dict.fromkeys(steps, 0.0)
    for _ in range(repeats):
        for name, step in steps.items():
            cpu_start, start = time.process_time(), time.perf_counter()
            step()
            walls[name].append(time.perf_counter() - start)
            cpu[name] += time.process_time() - cpu_start
    return {name: (walls[name], cpu[name]) for name in steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    scm = DeepSCM("mimic_cxr", image_model={"spatial_dims": 2, "in_channels": 1, "spatial_size": args.size}).eval()
    items = _items(args.size, args.batch)
    batch = list_data_collate(items)
    n = args.batch
    params = sum(p.numel() for p in scm.image_model.parameters())
    load_before = os.getloadavg()

    per_sample = RandCounterfactuald("image", scm, attributes=ATTRIBUTES, prob=1.0)
    batched = CounterfactualBatchAugmenter(scm, attributes=ATTRIBUTES, prob=1.0)
    fixed = Counterfactuald("image", scm, do={"age": 80.0})
    fixed_batched = CounterfactualBatchAugmenter(scm, do={"age": 80.0})

    # Same random state -> same interventions -> same counterfactuals on both paths.
    per_sample.set_random_state(0)
    reference = [per_sample(item) for item in items]
    check = batched.set_random_state(0).augment(batch)
    max_diff = max(float((check["image"][i] - r["image"]).abs().max()) for i, r in enumerate(reference))
    same_attributes = all(
        check[name][i].item() == r[name] for i, r in enumerate(reference) for name in ("sex", "race", "disease")
    )

    with tempfile.TemporaryDirectory() as cache_dir:
        cached = CounterfactualBatchAugmenter(
            scm, attributes=ATTRIBUTES, prob=1.0, cache=CounterfactualCache(cache_dir, scm)
        )

        def cached_step():
            cached.set_random_state(0)  # the same interventions every time: all hits after the warm-up
            return cached.augment(batch)

        steps = {
            f"per-sample RandCounterfactuald x{n}": lambda: [per_sample(item) for item in items],
            f"batched augmenter, 1 call of {n}": lambda: batched.augment(batch),
            "batched, cache hit": cached_step,
            "fixed do(age=80), per-sample": lambda: [fixed(item) for item in items],
            "fixed do(age=80), batched": lambda: fixed_batched.augment(batch),
        }
        timings = _measure(steps, args.repeats)
    load_after = os.getloadavg()
    rows = [
        (name, n / min(walls), n / statistics.median(walls), cpu / (sum(walls) * args.threads))
        for name, (walls, cpu) in timings.items()
    ]
    per_walls = timings[f"per-sample RandCounterfactuald x{n}"][0]
    batch_walls = timings[f"batched augmenter, 1 call of {n}"][0]

    speedup_best = min(per_walls) / min(batch_walls)
    speedup_rounds = statistics.median(p / b for p, b in zip(per_walls, batch_walls))
    print(
        f"HVAE(2, 1, {args.size}, 6) via DeepSCM('mimic_cxr'): {params / 1e6:.2f}M image-model parameters; "
        f"batch {n}; {args.threads} threads; {args.repeats} interleaved repeats after a warm-up"
    )
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}; {os.cpu_count()} CPUs")
    print()
    print(f"| {'path':<36} | {'img/s (best)':>12} | {'img/s (median)':>14} | {'cpu util':>8} |")
    print(f"|{'-' * 38}|{'-' * 14}|{'-' * 16}|{'-' * 10}|")
    for name, best, median, util in rows:
        print(f"| {name:<36} | {best:>12.1f} | {median:>14.1f} | {util:>8.2f} |")
    print()
    print(
        f"speed-up of the batched path per image: {speedup_best:.1f}x (best vs best), "
        f"{speedup_rounds:.1f}x (median over rounds)"
    )
    print(
        f"per-sample vs batched counterfactuals: max |image difference| {max_diff:.2e}, "
        f"discrete attributes identical: {same_attributes}"
    )
    ok = speedup_best >= REQUIRED_SPEEDUP and max_diff < 1e-4 and same_attributes
    print("PASS" if ok else "FAIL", f"(needs >= {REQUIRED_SPEEDUP:.0f}x and identical counterfactuals)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
