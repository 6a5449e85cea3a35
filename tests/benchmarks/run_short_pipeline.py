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
"""A short real run of the whole pipeline on the phantom at 32x32, printing the figures of each stage.

Guidance predictor, mechanisms, HVAE, then fine-tuning none / hard / soft from the same pretrained HVAE, an
independently trained evaluation predictor, and the counterfactual evaluation (report in OUT_DIR).
Usage: ``python tests/benchmarks/run_short_pipeline.py [OUT_DIR]`` (about 4 minutes on a 2-core CPU).
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time

import torch
from ignite.engine import Events

from monai_cf.data import SyntheticCXR, csv_dataset
from monai_cf.engines import (
    CounterfactualEvaluator,
    create_cft_trainer,
    create_data_loader,
    create_hvae_trainer,
    create_mechanism_trainer,
    create_predictor_trainer,
    measure_nelbo,
)
from monai_cf.networks import DeepSCM
from monai_cf.networks.nets import AttributePredictor

OUT_DIR = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="monai_cf_eval_")
torch.manual_seed(0)
torch.set_num_threads(1)
root = tempfile.mkdtemp()
SyntheticCXR(spatial_size=32, seed=0).write(root, 2000, 200, 200)
train_ds = csv_dataset(os.path.join(root, "train.csv"), spatial_size=32, cache=True)
val_ds = csv_dataset(os.path.join(root, "val.csv"), spatial_size=32, cache=True)
train = create_data_loader(train_ds, batch_size=32, seed=0)
val = create_data_loader(val_ds, batch_size=100, shuffle=False)

t = time.time()
guidance = AttributePredictor(2, 1, "mimic_cxr")
pt = create_predictor_trainer(guidance, train, val, None, max_epochs=5, seed=1, stats=False)
pt.run()
print("guidance predictor", {k: round(v, 3) for k, v in pt.evaluator.state.metrics.items()}, f"{time.time() - t:.0f}s")

scm = DeepSCM("mimic_cxr", image_model={"spatial_dims": 2, "in_channels": 1, "spatial_size": 32})
mt = create_mechanism_trainer(scm, train_ds, val_ds, None, graph="mimic_cxr", max_epochs=30, stats=False)
mt.run()
print("mechanisms val_nll", round(mt.evaluator.state.metrics["val_nll"], 3))

t = time.time()
ht = create_hvae_trainer(scm, train, val, None, max_epochs=6, stats=False)
curve = []
ht.add_event_handler(Events.ITERATION_COMPLETED, lambda e: curve.append(e.state.output[0]["loss"]))
ht.run()
dt = time.time() - t
n = ht.state.iteration * 32
print(
    f"HVAE: {ht.state.iteration} iterations, {n / dt:.0f} images/s incl. validation; train nELBO first 10 its "
    f"{sum(curve[:10]) / 10:.3f}, last 60 its {sum(curve[-60:]) / 60:.3f}; val nELBO (EMA) {ht.evaluator.state.metrics}"
)
scm.image_model.load_state_dict(ht.ema.module.state_dict())
pretrained = copy.deepcopy(scm.state_dict())
epsilon = measure_nelbo(scm, train, 20)
print(f"epsilon (pre-CFT train nELBO) {epsilon:.3f}")

tuned = {}


def avg(rows, key):
    return sum(r[key] for r in rows) / len(rows)


for mode in ("none", "hard", "soft"):
    scm.load_state_dict(pretrained)
    t = time.time()
    tuner = create_cft_trainer(
        scm, guidance, train, mode=mode, max_epochs=2, elbo_constraint=epsilon, stats=False, lr=1e-4 * 3, ema_rate=None
    )
    rec = []
    tuner.add_event_handler(Events.ITERATION_COMPLETED, lambda e: rec.append(e.state.output[0]))
    tuner.run()
    k = 15
    print(
        f"CFT {mode}: {tuner.state.iteration} its in {time.time() - t:.0f}s; guidance accuracy on intervened attribute "
        f"of x*: first {k} its {avg(rec[:k], 'cf_accuracy'):.3f} -> last {k} its {avg(rec[-k:], 'cf_accuracy'):.3f}; "
        f"nELBO {avg(rec[:k], 'nelbo'):.3f} -> {avg(rec[-k:], 'nelbo'):.3f}; "
        f"lambda end {rec[-1]['lagrange_multiplier']:.3f}"
    )
    tuned[mode] = copy.deepcopy(scm).eval()

t = time.time()
evaluation = AttributePredictor(2, 1, "mimic_cxr")
et = create_predictor_trainer(evaluation, train, val, None, max_epochs=5, seed=2, stats=False)
et.run()
print(
    "evaluation predictor", {k: round(v, 3) for k, v in et.evaluator.state.metrics.items()}, f"{time.time() - t:.0f}s"
)
phantom = SyntheticCXR(spatial_size=32, seed=123)
t = time.time()
ev = CounterfactualEvaluator(
    scm.graph, phantom.sample_batch(500), evaluation.eval(), tuned, phantom=phantom, output_dir=OUT_DIR
)
ev.run()
print(f"evaluation {time.time() - t:.0f}s; amplification {ev.results['amplification']}")
print(open(os.path.join(OUT_DIR, "report.md")).read())
