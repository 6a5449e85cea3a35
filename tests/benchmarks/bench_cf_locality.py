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
"""Where a trained model's counterfactuals miss the phantom's true ones: inside the true edit or all over the image.

Run ``python tests/benchmarks/bench_cf_locality.py --models bundles/cxr_soft_cft/models`` (options: ``--cf-types
none,hard,soft --attributes sex,race,age,disease --n 400 --seed 123 --pathways``).

Setting: ``--n`` fresh phantom patients (``SyntheticCXR(32, seed)``, not the bundle's test split), one intervention
per attribute and patient (sex and disease flipped, race to the next class, age moved 25 years toward the other
side of 62), the true counterfactual rendered from each patient's stored noise, the model's counterfactual from
``load_scm(models, cf_type)`` (posterior means). L1 in grey levels [0, 255]. The *true edit* is where the true
counterfactual differs from the image by more than half a grey level.

Columns: ``unchanged`` (L1 of the image to the truth), ``L1`` and ``gain`` (truth gain ``1 - L1 / unchanged``),
``inside`` (L1 to the truth inside the true edit, beside the unchanged image's), ``outside`` (mean ``|x* - x|``
outside the true edit: every grey level there is an error), ``gain if local`` (the truth gain of the model's edit
kept inside the true edit, the image left unchanged elsewhere: what the model's edit would reach if it were local).
``--pathways`` adds, for HVAEs, rows with the counterfactual parents routed through one decoder parent pathway
only (``parent maps``, ``state``), the other kept at the factual parents.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch

from monai_cf.data.phantom import SyntheticCXR
from monai_cf.pipeline import load_scm

ATTRIBUTES = ("sex", "race", "age", "disease")


def intervention(name: str, pa: dict[str, torch.Tensor]) -> torch.Tensor:
    if name in ("sex", "disease"):
        return 1 - pa[name]
    if name == "race":
        return (pa["race"] + 1) % 3
    return torch.where(pa["age"] > 62, pa["age"] - 25, pa["age"] + 25).clamp(0, 100)


@contextlib.contextmanager
def one_pathway(model: torch.nn.Module, keep: str | None, batch: int) -> Iterator[None]:
    """Route the counterfactual parents through the ``keep`` pathway only (``None``: both, as trained)."""

    def factual(p: torch.Tensor) -> torch.Tensor:
        return p[:batch].repeat(p.shape[0] // batch, 1)

    add_map, project = model._add_parent_map, getattr(model.state_parents_proj, "forward", None)
    if keep == "state":
        model._add_parent_map = lambda h, p, r: add_map(h, None if p is None else factual(p), r)
    if keep == "parent maps" and project is not None:
        model.state_parents_proj.forward = lambda p: project(factual(p))
    try:
        yield
    finally:
        model.__dict__.pop("_add_parent_map", None)
        if project is not None:
            model.state_parents_proj.__dict__.pop("forward", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="a pipeline's models_dir")
    parser.add_argument("--cf-types", default="none,hard,soft")
    parser.add_argument("--attributes", default=",".join(ATTRIBUTES))
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--pathways", action="store_true")
    args = parser.parse_args()
    attributes = args.attributes.split(",")
    unknown = sorted(set(attributes) - set(ATTRIBUTES))
    if unknown:
        parser.error(f"--attributes: unknown {unknown}; the phantom's are {', '.join(ATTRIBUTES)}.")
    phantom = SyntheticCXR(spatial_size=32, seed=args.seed)
    batch = phantom.sample_batch(args.n)
    x = torch.from_numpy(batch["image"]).float()
    pa = {n: torch.as_tensor(batch[n]) for n in ATTRIBUTES}
    pa["age"] = pa["age"].float()
    print("| do() | cf type | pathway | unchanged | L1 | gain | inside (unchanged) | outside | gain if local |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in attributes:
        value = intervention(name, pa)
        true = torch.from_numpy(phantom.counterfactual_batch(batch, {name: value.numpy()})["image"]).float()
        true_edit = (true - x).abs() * 255
        inside = true_edit > 0.5
        unchanged = true_edit.mean()
        for cf_type in args.cf_types.split(","):
            scm = load_scm(args.models, cf_type)
            pathways = [None] + (
                ["parent maps", "state"] if args.pathways and hasattr(scm.image_model, "parent_maps") else []
            )
            for pathway in pathways:
                with one_pathway(scm.image_model, pathway, args.n) if pathway else contextlib.nullcontext():
                    with torch.no_grad():
                        x_cf, _ = scm.counterfactual(x, pa, {name: value})
                error = (x_cf - true).abs() * 255
                local = (torch.where(inside, x_cf, x) - true).abs() * 255
                inside_text = f"{error[inside].mean():.2f} ({true_edit[inside].mean():.2f})"
                print(
                    f"| {name} | {cf_type} | {pathway or 'both'} | {unchanged:.3f} | {error.mean():.3f} | "
                    f"{1 - error.mean() / unchanged:+.2f} | {inside_text} | "
                    f"{((x_cf - x).abs() * 255)[~inside].mean():.3f} | {1 - local.mean() / unchanged:+.2f} |"
                )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
