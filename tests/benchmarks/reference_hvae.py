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
"""The reference HVAE of a user's checkout, built and stepped the way its own trainer does, for side-by-side timing.

Nothing of the reference is shipped: :func:`load_reference` imports ``hps.py`` and ``vae.py`` from the checkout the
user names (``--reference CHECKOUT`` of ``bench_hvae_speed.py``), builds the hyper-parameters of a preset from the
checkout's own argument defaults and preset registry, and :func:`reference_step` makes one training step (nELBO
forward, backward, AdamW with the preset's learning rate, weight decay and betas) or one counterfactual (abduct, then
decode the latents under other parents) on a batch shaped as the reference expects: images in [-1, 1] and parents
broadcast over the image (``(B, context_dim, H, W)``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_reference", "reference_batch", "reference_step"]

#: folders of a checkout searched for a ``hps.py`` whose registry holds the preset (beside or below a ``vae.py``)
SEARCH_DIRS = ("src", "src/chest_xray", ".")


def _import_from(folder: Path, name: str) -> Any:
    sys.path.insert(0, str(folder))
    try:
        sys.modules.pop(name, None)  # another folder's module of the same name may have been imported before
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))


def _find_preset(checkout: Path, preset: str) -> tuple[Path, Any]:
    searched = []
    for relative in SEARCH_DIRS:
        folder = (checkout / relative).resolve()
        if not (folder / "hps.py").is_file() or str(folder / "hps.py") in searched:
            continue
        searched.append(str(folder / "hps.py"))
        hps = _import_from(folder, "hps")
        if preset in getattr(hps, "HPARAMS_REGISTRY", {}):
            return folder, hps
    where = ", ".join(searched) if searched else f"no hps.py in {', '.join(SEARCH_DIRS)}"
    raise ValueError(f"The reference checkout '{checkout}' has no preset '{preset}' (searched {where}).")


def load_reference(checkout: str | Path, preset: str) -> tuple[torch.nn.Module, Any]:
    """The reference ``HVAE`` of ``checkout`` at ``preset`` and its hyper-parameters, initialised from seed 0.

    Example::

        model, args = load_reference("~/causal-gen", "morphomnist")
        args.context_dim, args.input_res  # 12, 32
    """
    checkout = Path(checkout).expanduser()
    if not checkout.is_dir():
        raise ValueError(f"The reference checkout '{checkout}' is not a folder.")
    folder, hps = _find_preset(checkout, preset)
    vae_dirs = [d for d in (folder, folder.parent, checkout / "src") if (d / "vae.py").is_file()]
    if not vae_dirs:
        raise ValueError(f"The reference checkout '{checkout}' has no vae.py beside or above {folder / 'hps.py'}.")
    args = hps.add_arguments(argparse.ArgumentParser()).parse_args([])
    for key, value in vars(hps.HPARAMS_REGISTRY[preset]).items():
        setattr(args, key, value)
    args.hps = preset
    vae = _import_from(vae_dirs[0], "vae")
    torch.manual_seed(0)
    return vae.HVAE(args), args


def reference_batch(args: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantised images in [-1, 1] and parents broadcast over the image, as the reference trainer feeds them."""
    generator = torch.Generator().manual_seed(0)
    size = (args.input_res, args.input_res)
    x = torch.round(torch.rand((batch, args.input_channels, *size), generator=generator) * 255) / 127.5 - 1
    pa = torch.randn(batch, args.context_dim, 1, 1, generator=generator).expand(-1, -1, *size).contiguous()
    return x, pa


def reference_step(model: torch.nn.Module, args: Any, task: str, batch: int) -> Callable[[], None]:
    """One reference step on a batch: ``"train"`` (nELBO forward, backward, AdamW) or ``"cf"`` (abduct + decode).

    Example::

        step = reference_step(model, args, "train", batch=32)
        step()
    """
    if task not in ("train", "cf"):
        raise ValueError(f"task must be 'train' or 'cf', got {task!r}.")
    x, pa = reference_batch(args, batch)
    if task == "train":
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd, betas=tuple(args.betas))

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            model(x, pa, beta=args.beta)["elbo"].backward()
            optimizer.step()

        return step
    model.eval().requires_grad_(False)
    pa_cf = pa.flip(0)

    def step() -> None:
        with torch.no_grad():
            model.forward_latents(model.abduct(x, pa), pa_cf)

    return step
