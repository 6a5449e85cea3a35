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
"""Benchmark of the synthetic chest X-ray phantom: rendering speed and how learnable each attribute is.

Run ``python tests/benchmarks/bench_phantom.py [--epochs 10 --seed 0]``. It prints

- the seconds to render 10,000 phantom images at 64x64 (target < 30 s on a 2-core CPU);
- the test AUC of a small CNN trained on 5,000 phantom images and tested on 2,000 other ones, per attribute,
  against the calibration bands (the Soft-CFT paper's real-data baselines are race 0.938, sex 0.996,
  disease 0.942), plus the age MAE in years.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from monai.networks.layers.factories import Act, Conv, Norm, Pool
from sklearn.metrics import roc_auc_score
from torch import nn

from monai_cf.data import SyntheticCXR

BANDS = {"sex AUC": (0.97, 0.999), "race OvR macro AUC": (0.85, 0.97), "disease AUC": (0.88, 0.97)}
RENDER_TARGET_S = 30.0


class SmallPredictor(nn.Module):
    """Four conv stages (16-32-64-128; conv 3x3, BatchNorm, ReLU, max-pool), global pooling, one head per attribute."""

    def __init__(self, spatial_dims: int = 2, channels: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.BATCH, spatial_dims]
        pool = Pool[Pool.MAX, spatial_dims]
        layers: list[nn.Module] = []
        in_channels = 1
        for out_channels in channels:
            layers += [conv(in_channels, out_channels, 3, padding=1, bias=False), norm(out_channels), Act[Act.RELU]()]
            layers.append(pool(2))
            in_channels = out_channels
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict(
            {
                "sex": nn.Linear(in_channels, 1),
                "race": nn.Linear(in_channels, 3),
                "age": nn.Linear(in_channels, 1),
                "disease": nn.Linear(in_channels, 1),
            }
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}


def _loss(out: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> torch.Tensor:
    bce = nn.functional.binary_cross_entropy_with_logits
    return (
        bce(out["sex"][:, 0], y["sex"].float())
        + nn.functional.cross_entropy(out["race"], y["race"])
        + bce(out["disease"][:, 0], y["disease"].float())
        + nn.functional.mse_loss(out["age"][:, 0], (y["age"].float() - 60.0) / 20.0)
    )


def _predict(model: nn.Module, images: torch.Tensor, batch: int = 256) -> dict[str, np.ndarray]:
    model.eval()
    outs: dict[str, list[torch.Tensor]] = {"sex": [], "race": [], "age": [], "disease": []}
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out = model(images[i : i + batch])
            outs["sex"].append(torch.sigmoid(out["sex"][:, 0]))
            outs["race"].append(torch.softmax(out["race"], dim=1))
            outs["age"].append(out["age"][:, 0] * 20.0 + 60.0)
            outs["disease"].append(torch.sigmoid(out["disease"][:, 0]))
    return {k: torch.cat(v).numpy() for k, v in outs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n_train", type=int, default=5000)
    parser.add_argument("--n_test", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spatial_size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)

    phantom = SyntheticCXR(spatial_size=args.spatial_size, seed=args.seed)
    start = time.perf_counter()
    data = phantom.sample_batch(10_000)
    render_s = time.perf_counter() - start
    print(
        f"render: 10,000 images at {args.spatial_size}x{args.spatial_size} in {render_s:.2f} s "
        f"({10_000 / render_s:.0f} images/s)  target < {RENDER_TARGET_S:.0f} s  "
        f"{'PASS' if render_s < RENDER_TARGET_S else 'FAIL'}"
    )
    prevalence = data["disease"].mean()
    print(
        f"attributes: female {data['sex'].mean():.3f}, race {np.bincount(data['race'], minlength=3) / 10_000}, "
        f"age {data['age'].mean():.1f} +/- {data['age'].std():.1f}, disease prevalence {prevalence:.3f}"
    )

    train = slice(0, args.n_train)
    test = slice(args.n_train, args.n_train + args.n_test)  # later draws of the stream: disjoint patients
    images = torch.from_numpy(data["image"])
    labels = {k: torch.from_numpy(np.asarray(data[k])) for k in ("sex", "race", "age", "disease")}
    model = SmallPredictor()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(args.n_train, generator=generator)
        total = 0.0
        for i in range(0, args.n_train, 64):
            idx = order[i : i + 64]
            loss = _loss(model(images[train][idx]), {k: v[train][idx] for k, v in labels.items()})
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / args.n_train:.4f}")
    train_s = time.perf_counter() - start

    pred = _predict(model, images[test])
    truth = {k: v[test].numpy() for k, v in labels.items()}
    figures = {
        "sex AUC": roc_auc_score(truth["sex"], pred["sex"]),
        "race OvR macro AUC": roc_auc_score(truth["race"], pred["race"], multi_class="ovr", average="macro"),
        "disease AUC": roc_auc_score(truth["disease"], pred["disease"]),
    }
    print(
        f"predictor: trained {args.epochs} epochs on {args.n_train} images in {train_s:.0f} s, "
        f"tested on {args.n_test} other images"
    )
    for name, value in figures.items():
        low, high = BANDS[name]
        print(f"  {name:20s} {value:.3f}  band [{low}, {high}]  {'PASS' if low <= value <= high else 'FAIL'}")
    per_class = [roc_auc_score(truth["race"] == c, pred["race"][:, c]) for c in range(3)]
    print(f"  race per class (White, Asian, Black) {np.round(per_class, 3).tolist()}")
    print(
        f"  age MAE              {np.abs(pred['age'] - truth['age']).mean():.2f} years "
        f"(predicting the mean: {np.abs(truth['age'] - truth['age'].mean()).mean():.2f})"
    )


if __name__ == "__main__":
    main()
