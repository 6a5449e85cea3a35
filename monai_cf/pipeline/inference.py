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
"""Counterfactuals for a CSV or a folder of user images from the models a training pipeline left behind."""

from __future__ import annotations

import ast
import csv
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset

from monai_cf.data import IMAGE_SUFFIXES as FORMAT_SUFFIXES
from monai_cf.data import AttributeEncoder, load_csv_datalist, load_image_transforms
from monai_cf.engines.cft_targets import CFT_MODES
from monai_cf.engines.runtime import tune_cpu_allocator
from monai_cf.engines.trainer_factory import training_device
from monai_cf.graph import CausalGraph
from monai_cf.networks import DeepSCM
from monai_cf.networks.nets import AttributePredictor, DiffusionGuidance, DiffusionImageMechanism
from monai_cf.pipeline.diffusion import DIFFUSION_FILE
from monai_cf.pipeline.workflow import CFT_FILE, load_checkpoint

__all__ = ["CounterfactualInference", "parse_intervention", "load_scm", "IMAGE_SUFFIXES", "CF_TYPES"]

logger = logging.getLogger("monai_cf.pipeline")

#: file endings read from a folder of images: every format the CSV loader reads
IMAGE_SUFFIXES = tuple(suffix for suffixes in FORMAT_SUFFIXES.values() for suffix in suffixes)


def parse_intervention(do: Mapping[str, Any] | str, graph: CausalGraph) -> dict[str, Any]:
    """``{attribute: raw value}`` from a dict or its string form (``"{'sex': 'female'}"``), checked against the graph.

    Raises:
        ValueError: for text that is not a dict, an empty intervention, or an attribute the graph lacks.
    """
    if isinstance(do, str):
        try:
            do = ast.literal_eval(do)
        except (ValueError, SyntaxError) as error:
            raise ValueError(f"--do {do!r} is not a dictionary such as \"{{'sex': 'female'}}\".") from error
    if not isinstance(do, Mapping) or not do:
        raise ValueError(f"--do must be a non-empty dictionary such as \"{{'sex': 'female'}}\"; got {do!r}.")
    unknown = [name for name in do if name not in graph.attributes]
    if unknown:
        raise ValueError(f"--do names unknown attributes {unknown}; the graph's attributes are {graph.attributes}.")
    graph.check_intervention(dict(do))
    return dict(do)


#: counterfactual types :func:`load_scm` loads: the HVAE's fine-tuning modes and the diffusion mechanism
CF_TYPES = (*CFT_MODES, "diffusion")


def load_scm(
    models_dir: str | os.PathLike,
    cf_type: str = "soft",
    device: str | torch.device = "cpu",
    guidance: DiffusionGuidance | Mapping[str, Any] | str | None = None,
) -> DeepSCM:
    """The DeepSCM a training pipeline left in ``models_dir``, in eval mode.

    ``hvae.pt`` carries the graph and the image model's settings, ``mechanisms.pt`` the attribute mechanisms and
    ``hvae_cft_<cf_type>.pt`` the fine-tuned image model (``cf_type="none"``: the pretrained HVAE). ``cf_type=
    "diffusion"`` loads ``diffusion.pt`` (the :class:`~monai_cf.pipeline.DiffusionPipeline`'s model, its graph and
    settings inside) with ``guidance`` (a :class:`~monai_cf.networks.nets.DiffusionGuidance` or its fields).

    Example::

        scm = load_scm("bundles/cxr_soft_cft/models", "soft")
        x_cf, pa_cf = scm.counterfactual(x, pa, {"sex": "female"})
        scm = load_scm("bundles/cxr_soft_cft/models", "diffusion", guidance={"mode": "dcfg", "intervened_weight": 4})
    """
    if cf_type not in CF_TYPES:
        raise ValueError(f"cf_type must be one of {', '.join(CF_TYPES)}; got {cf_type!r}.")
    models_dir = Path(models_dir)
    if cf_type == "diffusion":
        diffusion = load_checkpoint(models_dir / DIFFUSION_FILE)
        model = DiffusionImageMechanism.from_config(diffusion["image_model"])
        model.load_state_dict(diffusion["state_dict"])
        scm = DeepSCM(diffusion["settings"]["graph"], model.with_guidance(guidance))
        scm.mechanisms.load_state_dict(load_checkpoint(models_dir / "mechanisms.pt")["state_dict"])
        return scm.to(device).eval()
    if guidance is not None:
        raise ValueError(f"guidance is a setting of diffusion counterfactuals; cf_type is {cf_type!r}.")
    hvae = load_checkpoint(models_dir / "hvae.pt")
    image_file = models_dir / ("hvae.pt" if cf_type == "none" else CFT_FILE.format(mode=cf_type))
    image = hvae if cf_type == "none" else load_checkpoint(image_file)
    # a fine-tuned file carries the image model's settings it was tuned with (its counterfactual_noise too)
    image_model = image.get("image_model") or hvae["image_model"]
    scm = DeepSCM.from_config({"graph": hvae["settings"]["graph"], "image_model": image_model})
    scm.image_model.load_state_dict(image["state_dict"])
    scm.mechanisms.load_state_dict(load_checkpoint(models_dir / "mechanisms.pt")["state_dict"])
    return scm.to(device).eval()


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))


class CounterfactualInference:
    """Write counterfactual images and a CSV of counterfactual attributes for user images.

    The models come from a training run's ``models_dir`` (``hvae.pt`` carries the graph and the image settings,
    ``mechanisms.pt`` the attribute mechanisms, ``hvae_cft_<cf_type>.pt`` the fine-tuned image model). Input is a
    CSV of image paths and attributes (validated like training data, see
    :func:`monai_cf.data.load_csv_datalist`) or a folder of images, whose attributes the guidance predictor
    estimates (most probable class, predicted mean). ``do`` is in original units (class names, years).

    Outputs in ``output_dir``: ``images/<name>_cf.png`` (NIfTI for 3D) and ``counterfactuals.csv`` with the source,
    the output and every attribute before (``<name>``) and after (``cf_<name>``) the intervention. Existing outputs
    are an error unless ``overwrite``.

    Args:
        models_dir: the training run's ``models_dir``.
        input: a CSV file or a folder of images.
        do: the intervention, e.g. ``{"sex": "female"}`` or its string form.
        output_dir: where to write.
        cf_type: ``"soft"``, ``"hard"``, ``"none"`` (the pretrained HVAE) or ``"diffusion"`` (``diffusion.pt`` of the
            :class:`~monai_cf.pipeline.DiffusionPipeline`).
        guidance: the diffusion counterfactuals' :class:`~monai_cf.networks.nets.DiffusionGuidance` (its fields, or a
            mode name); diffusion only.
        columns: CSV column mapping; ``image_root``, ``value_maps``: see :func:`~monai_cf.data.load_csv_datalist`.
        image_root: see ``columns``.
        value_maps: see ``columns``.
        batch_size: images per network call.
        device: torch device (default: CUDA when available).
        overwrite: replace existing outputs.

    Example::

        CounterfactualInference("bundles/cxr_soft_cft/models", "my_images/", {"sex": "female"}, "cf_out").run()
    """

    def __init__(
        self,
        models_dir: str | os.PathLike,
        input: str | os.PathLike,
        do: Mapping[str, Any] | str,
        output_dir: str | os.PathLike,
        cf_type: str = "soft",
        columns: Mapping[str, str | Sequence[str]] | None = None,
        image_root: str | os.PathLike | None = None,
        value_maps: Mapping[str, Mapping] | None = None,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        overwrite: bool = False,
        guidance: DiffusionGuidance | Mapping[str, Any] | str | None = None,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.input = Path(input)
        self.output_dir = Path(output_dir)
        self.device = training_device(device)
        tune_cpu_allocator(self.device)
        self.batch_size = int(batch_size)
        self.overwrite = overwrite if isinstance(overwrite, bool) else str(overwrite).lower() == "true"
        if not self.input.exists():
            raise ValueError(f"input '{self.input}' does not exist (a CSV file or a folder of images).")
        if cf_type not in CF_TYPES:
            raise ValueError(f"cf_type must be one of {', '.join(CF_TYPES)}; got {cf_type!r}.")
        settings = load_checkpoint(self.models_dir / (DIFFUSION_FILE if cf_type == "diffusion" else "hvae.pt"))[
            "settings"
        ]
        self.graph = CausalGraph.build(settings["graph"])
        self.spatial_size = int(settings["spatial_size"])
        self.do = parse_intervention(do, self.graph)
        self.encoder = AttributeEncoder(self.graph, value_maps)
        self.do_canonical = {name: self.encoder.canonical(name, value) for name, value in self.do.items()}
        if isinstance(guidance, str) and guidance.strip().startswith("{"):
            try:
                guidance = ast.literal_eval(guidance)
            except (ValueError, SyntaxError) as error:
                raise ValueError(f"--guidance {guidance!r} is not a dictionary of DiffusionGuidance fields.") from error
        self.scm = load_scm(self.models_dir, cf_type, self.device, guidance=guidance)
        self.cf_type = cf_type
        self.spatial_dims = self.scm.image_model.spatial_dims
        self.transform = load_image_transforms((self.spatial_size,) * self.spatial_dims, self.graph.image_key)
        self.datalist = self._datalist(columns, image_root, value_maps)
        self._check_outputs()

    def _datalist(self, columns: Any, image_root: Any, value_maps: Any) -> list[dict[str, Any]]:
        key = self.graph.image_key
        if self.input.is_dir():
            files = _image_files(self.input)
            if not files:
                raise ValueError(f"input folder '{self.input}' holds no images ({', '.join(IMAGE_SUFFIXES)}).")
            self.attributes_from = "guidance predictor"
            return [{key: str(f), "source": str(f)} for f in files]
        self.attributes_from = "csv"
        rows = load_csv_datalist(self.input, self.graph, columns, image_root=image_root, value_maps=value_maps)
        for row in rows:
            row["source"] = row[key]
        return rows

    def _output_name(self, source: str, index: int) -> str:
        stem = Path(source).name
        for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        ext = ".png" if self.spatial_dims == 2 else ".nii.gz"
        return f"{index:05d}_{stem}_cf{ext}"

    def _check_outputs(self) -> None:
        table = self.output_dir / "counterfactuals.csv"
        if table.exists() and not self.overwrite:
            raise ValueError(f"'{table}' exists; pass --overwrite true or choose another output_dir.")

    def _predict_attributes(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if not hasattr(self, "predictor"):
            ckpt = load_checkpoint(self.models_dir / "guidance_predictor.pt")
            backbone = ckpt["settings"]["predictor"]["backbone"]
            self.predictor = AttributePredictor(self.spatial_dims, images.shape[1], self.graph, backbone=backbone)
            self.predictor.load_state_dict(ckpt["state_dict"])
            self.predictor = self.predictor.to(self.device).eval()
        probabilities = self.predictor.probabilities(images)
        attributes = {}
        for name in self.graph.attributes:
            value = self.encoder.decode_attribute(name, probabilities[name])
            if not self.graph[name].is_discrete:
                low, high = self.graph[name].value_range
                value = value.clamp(low, high)
            attributes[name] = value
        return attributes

    @torch.no_grad()
    def run(self) -> list[dict[str, Any]]:
        """Generate and write the counterfactuals; returns the CSV rows."""
        key = self.graph.image_key
        loader = DataLoader(Dataset(self.datalist, transform=self.transform), batch_size=self.batch_size)
        (self.output_dir / "images").mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, Any]] = []
        index = 0
        for batch in loader:
            x = batch[key].to(self.device).float()
            if self.attributes_from == "csv":
                pa = {name: torch.as_tensor(batch[name]).to(self.device) for name in self.graph.attributes}
            else:
                pa = self._predict_attributes(x)
            x_cf, pa_cf = self.scm.counterfactual(x, pa, dict(self.do_canonical))
            for i in range(x.shape[0]):
                source = batch["source"][i]
                out_path = self.output_dir / "images" / self._output_name(source, index)
                self._write_image(x_cf[i], out_path)
                row = {"source": source, "counterfactual": str(out_path), "attributes_from": self.attributes_from}
                for name in self.graph.attributes:
                    row[name] = self.encoder.to_original(name, pa[name][i].item())
                for name in self.graph.attributes:
                    row[f"cf_{name}"] = self.encoder.to_original(name, pa_cf[name][i].item())
                rows.append(row)
                index += 1
        with open(self.output_dir / "counterfactuals.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        logger.info("Wrote %d counterfactuals (do %s, %s) to %s", len(rows), self.do, self.cf_type, self.output_dir)
        return rows

    def _write_image(self, image: torch.Tensor, path: Path) -> None:
        array = image.detach().float().clamp(0, 1).cpu().numpy()[0]
        if self.spatial_dims == 2:
            from PIL import Image

            Image.fromarray(np.round(array * 255).astype(np.uint8)).save(path)
        else:
            import nibabel as nib

            nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), str(path))
