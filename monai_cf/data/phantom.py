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
"""The embedded synthetic chest X-ray phantom: a structural causal model with ground-truth counterfactuals.

The phantom is an SCM over the ``mimic_cxr`` graph (sex, race, age roots; age -> disease; image <- all four)
whose image mechanism is a deterministic renderer. Every patient owns a set of exogenous noise values
(anatomy, effusion severity, acquisition, and the uniforms that decide the attributes); they are stored with
the sample and kept fixed under interventions, so the true counterfactual of a sample is simply the same
noise rendered under the new attribute values.

How each attribute shows in the image:

- **sex**: thorax shape (female: narrower and more tapered) and breast soft-tissue shadows over the lower
  lung fields;
- **age**: bone density (ribs and clavicles fade with age) and a larger, denser aortic knob with a
  calcified rim;
- **disease** (pleural effusion): a basal opacity with a meniscus that blunts the costophrenic angle, one
  or both sides, its height set by the continuous ``effusion_severity`` (many cases are mild);
- **race**: a subtle global cue, the soft-tissue density and the amplitude of a fine tissue texture.

Images are rendered in continuous coordinates (``[-1, 1]`` across the field of view, the patient's right on
the image left), so a patient looks the same at every ``spatial_size``; values lie in ``[0, 1]`` and are
quantised to 8-bit levels, so writing a PNG and reading it back is exact.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_cf.data.encoding import AttributeEncoder
from monai_cf.graph import CausalGraph

__all__ = [
    "SyntheticCXR",
    "PHANTOM_VERSION",
    "NOISE_KEYS",
    "RACE_PROBABILITIES",
    "disease_probability",
    "save_counterfactual_grid",
]

#: Bumped whenever the renderer or the noise layout changes, and written to ``phantom.json``.
PHANTOM_VERSION = "1.0"

#: Prevalence of the race classes (White, Asian, Black), roughly as in MIMIC-CXR.
RACE_PROBABILITIES = (0.6, 0.2, 0.2)

_SPLITS = ("train", "val", "test")
_ATTRIBUTES = ("sex", "race", "age", "disease")
_FEMALE = 1
_AGE_MEAN, _AGE_STD, _AGE_MIN, _AGE_MAX = 62.0, 17.0, 18.0, 95.0
# logit P(disease | age) = _DISEASE_LOGIT_AT_MEAN + _DISEASE_LOGIT_PER_YEAR * (age - 62): about 40% prevalence
_DISEASE_LOGIT_AT_MEAN, _DISEASE_LOGIT_PER_YEAR = -0.45, 0.055
# effusion severity ~ Kumaraswamy(a, b), a Beta look-alike with a closed-form inverse CDF; mass near 0 = mild
_SEVERITY_A, _SEVERITY_B = 1.0, 3.0

# Exogenous noise of one patient, in the order its uniforms are drawn from the stream. "uniform": U(0, 1);
# "normal": N(0, 1) clipped to [-4, 4]; "severity": Kumaraswamy on [0, 1]; "seed": an integer texture seed.
_NOISE_FIELDS: tuple[tuple[str, str], ...] = (
    ("u_sex", "uniform"),
    ("u_race", "uniform"),
    ("u_age", "normal"),
    ("u_disease", "uniform"),
    ("thorax_width", "normal"),
    ("thorax_taper", "normal"),
    ("lung_height", "normal"),
    ("diaphragm_dome", "normal"),
    ("diaphragm_asymmetry", "normal"),
    ("heart_size", "normal"),
    ("heart_shift", "normal"),
    ("mediastinum_width", "normal"),
    ("aorta_size", "normal"),
    ("rib_phase", "uniform"),
    ("rib_spacing", "normal"),
    ("rotation", "normal"),
    ("shift_x", "normal"),
    ("shift_y", "normal"),
    ("habitus", "normal"),
    ("breast_size", "uniform"),
    ("tissue_density", "normal"),
    ("tissue_texture", "normal"),
    ("bone_density", "normal"),
    ("gastric_bubble", "uniform"),
    ("effusion_severity", "severity"),
    ("effusion_side", "uniform"),
    ("exposure", "normal"),
    ("contrast", "normal"),
    ("grain", "normal"),
    ("texture_seed", "seed"),
)

#: Names of the exogenous noise entries stored in every sample's ``noise`` dictionary.
NOISE_KEYS: tuple[str, ...] = tuple(name for name, _ in _NOISE_FIELDS)

# Race cue directions (tissue density, texture amplitude): the three classes sit on a triangle, so each is
# separable from the other two by a linear read-out of the two cues.
_RACE_CUES = ((0.0, -1.0), (-0.866, 0.5), (0.866, 0.5))


def disease_probability(age: Any) -> np.ndarray:
    """``P(disease = pleural_effusion | age)`` of the phantom, rising with age (years)."""
    age = np.asarray(age, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-(_DISEASE_LOGIT_AT_MEAN + _DISEASE_LOGIT_PER_YEAR * (age - _AGE_MEAN))))


class SyntheticCXR:
    """A synthetic frontal chest X-ray SCM with exact counterfactuals, on the ``mimic_cxr`` graph.

    The attributes follow roughly MIMIC-like distributions: sex ~ Bernoulli(0.5) (1 = female), race ~
    Categorical(0.6, 0.2, 0.2) over (White, Asian, Black), age ~ N(62, 17) clipped to [18, 95] years,
    disease = 1 (pleural effusion) iff ``u_disease < disease_probability(age)``. Each patient's exogenous
    noise (see ``NOISE_KEYS``) is drawn as one row of uniforms from the generator's stream, so samples do
    not depend on how a request is split into calls: ``sample(3) + sample(2)`` equals ``sample(5)`` of a
    fresh instance with the same seed.

    Args:
        spatial_size: side of the square images, in pixels (any size >= 16; 32 to 192 are typical).
        seed: seed of the random stream; the same seed gives identical samples.
        chunk_size: how many images are rendered at once (bounds memory, not results).

    Example::

        phantom = SyntheticCXR(spatial_size=64, seed=0)
        samples = phantom.sample(4)
        samples[0]["image"].shape                        # (1, 64, 64)
        cf = phantom.counterfactual(samples[0], do={"sex": "female"})
        cf["noise"] == samples[0]["noise"]               # True: only the attribute changed
        phantom.write("phantom_data", n_train=800, n_val=100, n_test=100)
    """

    def __init__(self, spatial_size: int = 64, seed: int = 0, chunk_size: int = 64):
        if int(spatial_size) != spatial_size or int(spatial_size) < 16:
            raise ValueError(f"spatial_size must be an integer >= 16, got {spatial_size!r}.")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
        self.spatial_size = int(spatial_size)
        self.seed = int(seed)
        self.chunk_size = int(chunk_size)
        self._graph = CausalGraph.from_name("mimic_cxr")
        self._encoder = AttributeEncoder(self._graph)
        # independent sub-streams: one for sample(), one per written split (so splits never overlap and a
        # split does not change when another split's size does)
        streams = np.random.SeedSequence(self.seed).spawn(1 + len(_SPLITS))
        self._rng = np.random.Generator(np.random.PCG64(streams[0]))
        self._split_streams = dict(zip(_SPLITS, streams[1:]))

    @property
    def graph(self) -> CausalGraph:
        """The phantom's causal graph (``CausalGraph.from_name("mimic_cxr")``)."""
        return self._graph

    @property
    def encoder(self) -> AttributeEncoder:
        """An :class:`AttributeEncoder` for the phantom's graph."""
        return self._encoder

    def settings(self) -> dict[str, Any]:
        """The generator settings written to ``phantom.json``."""
        return {
            "generator": "monai_cf.data.SyntheticCXR",
            "version": PHANTOM_VERSION,
            "spatial_size": self.spatial_size,
            "seed": self.seed,
            "graph": "mimic_cxr",
            "noise_keys": list(NOISE_KEYS),
        }

    # ------------------------------------------------------------------ sampling
    def sample_noise(self, n: int, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """Draw the exogenous noise of ``n`` patients from the stream (or from ``rng``)."""
        n = _check_count(n, "n")
        rng = self._rng if rng is None else rng
        uniforms = rng.random((n, len(_NOISE_FIELDS)))
        return _noise_from_uniforms(uniforms)

    @staticmethod
    def attributes_from_noise(noise: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The factual attributes the SCM assigns to exogenous noise (the attribute mechanisms)."""
        u_sex = np.asarray(noise["u_sex"], dtype=np.float64)
        sex = (u_sex < 0.5).astype(np.int64)  # 1 = female
        race = np.searchsorted(np.cumsum(RACE_PROBABILITIES)[:-1], np.asarray(noise["u_race"]), side="right")
        age = np.clip(_AGE_MEAN + _AGE_STD * np.asarray(noise["u_age"], dtype=np.float64), _AGE_MIN, _AGE_MAX)
        disease = _disease_from(age, noise["u_disease"])
        return {"sex": sex, "race": race.astype(np.int64), "age": age, "disease": disease}

    def sample_batch(self, n: int, render: bool = True) -> dict[str, Any]:
        """Draw ``n`` patients as arrays: ``image`` (n, 1, H, W) float32, attributes (n,), ``noise`` dict.

        With ``render=False`` the ``image`` entry is left out (attributes and noise only).
        """
        return self._draw(n, self._rng, render)

    def sample(self, n: int) -> list[dict[str, Any]]:
        """Draw ``n`` patients as a list of dictionaries with ``image`` (1, H, W), attributes and ``noise``."""
        return self.to_list(self.sample_batch(n))

    def _draw(self, n: int, rng: np.random.Generator, render: bool) -> dict[str, Any]:
        noise = self.sample_noise(n, rng)
        batch: dict[str, Any] = dict(self.attributes_from_noise(noise))
        batch["noise"] = noise
        if render:
            batch["image"] = self.render(batch, noise)
        return batch

    # ------------------------------------------------------------------ counterfactuals
    def counterfactual(self, sample: Mapping[str, Any], do: Mapping[str, Any]) -> dict[str, Any]:
        """The ground-truth counterfactual of one sample under ``do={attribute: value}``.

        Values may be canonical (0/1, class index, years) or class names (``"female"``, ``"Black"``).
        The exogenous noise is kept; descendants of the intervened attributes are recomputed from it
        (do(age) re-decides disease from the stored ``u_disease`` unless disease is intervened too).
        """
        batch = _stack([sample])
        cf = self.counterfactual_batch(batch, do)
        return self.to_list(cf)[0]

    def counterfactual_batch(self, batch: Mapping[str, Any], do: Mapping[str, Any]) -> dict[str, Any]:
        """Batched :meth:`counterfactual`: ``batch`` holds attribute arrays of length B and a ``noise`` dict.

        Each ``do`` value is a scalar (applied to every row) or an array-like of length B.
        """
        self._graph.check_intervention(do)
        noise = _noise_arrays(batch["noise"])
        size = len(noise["u_sex"])
        values = {name: np.asarray(batch[name]) for name in _ATTRIBUTES}
        for name, raw in do.items():
            values[name] = self._parse_do(name, raw, size)
        if "age" in do and "disease" not in do:
            values["disease"] = _disease_from(values["age"], noise["u_disease"])
        cf: dict[str, Any] = {
            "sex": values["sex"].astype(np.int64),
            "race": values["race"].astype(np.int64),
            "age": values["age"].astype(np.float64),
            "disease": values["disease"].astype(np.int64),
            "noise": {k: v.copy() for k, v in noise.items()},
        }
        cf["image"] = self.render(cf, noise)
        return cf

    def _parse_do(self, name: str, raw: Any, size: int) -> np.ndarray:
        if isinstance(raw, (str, bytes)) or np.ndim(raw) == 0:
            parsed = [self._encoder.canonical(name, raw.item() if isinstance(raw, np.generic) else raw)] * size
        else:
            items = list(np.asarray(raw).reshape(-1)) if not isinstance(raw, (list, tuple)) else list(raw)
            if len(items) != size:
                raise ValueError(f"do['{name}'] has {len(items)} values for a batch of {size}.")
            parsed = [self._encoder.canonical(name, v.item() if isinstance(v, np.generic) else v) for v in items]
        return np.asarray(parsed, dtype=np.float64 if name == "age" else np.int64)

    # ------------------------------------------------------------------ rendering
    def render(
        self, attributes: Mapping[str, Any], noise: Mapping[str, Any], spatial_size: int | None = None
    ) -> np.ndarray:
        """Render images (B, 1, H, W), float32 in [0, 1] on 8-bit levels, from attributes and noise arrays.

        The result is a pure function of the inputs: a row does not depend on the rest of the batch.
        """
        size = self.spatial_size if spatial_size is None else int(spatial_size)
        if size < 16:
            raise ValueError(f"spatial_size must be >= 16, got {size}.")
        noise = _noise_arrays(noise)
        count = len(noise["u_sex"])
        attrs = {}
        for name in _ATTRIBUTES:
            if name not in attributes:
                raise ValueError(f"Attribute '{name}' is missing; got keys {sorted(attributes)}.")
            value = np.asarray(attributes[name], dtype=np.float64).reshape(-1)
            if len(value) != count:
                raise ValueError(f"Attribute '{name}' has {len(value)} values but the noise has {count} rows.")
            attrs[name] = value
        _check_attribute_values(attrs)
        out = np.empty((count, 1, size, size), dtype=np.float32)
        for start in range(0, count, self.chunk_size):
            stop = min(start + self.chunk_size, count)
            chunk_attrs = {k: v[start:stop] for k, v in attrs.items()}
            chunk_noise = {k: v[start:stop] for k, v in noise.items()}
            out[start:stop, 0] = _render(chunk_attrs, chunk_noise, size)
        return out

    # ------------------------------------------------------------------ conversions
    @staticmethod
    def to_list(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Split a batch of arrays into per-sample dictionaries of Python scalars (images stay arrays)."""
        noise = _noise_arrays(batch["noise"])
        samples = []
        for i in range(len(noise["u_sex"])):
            sample: dict[str, Any] = {}
            if "image" in batch:
                sample["image"] = np.asarray(batch["image"][i], dtype=np.float32)
            sample["sex"] = int(batch["sex"][i])
            sample["race"] = int(batch["race"][i])
            sample["age"] = float(batch["age"][i])
            sample["disease"] = int(batch["disease"][i])
            sample["noise"] = {k: (int(v[i]) if k == "texture_seed" else float(v[i])) for k, v in noise.items()}
            samples.append(sample)
        return samples

    @staticmethod
    def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Inverse of :meth:`to_list`: stack per-sample dictionaries into a batch of arrays."""
        return _stack(samples)

    # ------------------------------------------------------------------ writing
    def write(
        self, out_dir: str | os.PathLike, n_train: int, n_val: int, n_test: int, overwrite: bool = False
    ) -> dict[str, Path]:
        """Write a dataset in the CSV-loader format; returns ``{split: csv path}``.

        Layout: ``images/<split>/<patient_id>.png`` (8-bit grayscale), ``<split>.csv`` with columns
        ``patient_id,path,sex,race,age,disease`` (path relative to ``out_dir``, discrete attributes as class
        names, age as the float's repr so it reads back exactly), ``<split>_noise.npz`` with each row's
        exogenous noise (same order as the CSV) and ``phantom.json`` with the generator settings. Each split
        is drawn from its own sub-stream of the seed, so splits are disjoint, deterministic and independent
        of each other's sizes and of :meth:`sample` calls. Existing files are only replaced with
        ``overwrite=True``.
        """
        from PIL import Image

        counts = {"train": _check_count(n_train, "n_train"), "val": _check_count(n_val, "n_val")}
        counts["test"] = _check_count(n_test, "n_test")
        root = Path(out_dir)
        targets = [root / "phantom.json"]
        for split in _SPLITS:
            targets += [root / f"{split}.csv", root / f"{split}_noise.npz"]
        existing = [str(p) for p in targets if p.exists()]
        existing += [str(root / "images" / s) for s in _SPLITS if (root / "images" / s).is_dir()]
        if existing and not overwrite:
            raise FileExistsError(f"Refusing to overwrite existing phantom files {existing}; pass overwrite=True.")
        root.mkdir(parents=True, exist_ok=True)
        written = {}
        for split in _SPLITS:
            image_dir = root / "images" / split
            if image_dir.is_dir():
                for old in image_dir.glob("*.png"):
                    old.unlink()
            image_dir.mkdir(parents=True, exist_ok=True)
            batch = self._draw(counts[split], np.random.Generator(np.random.PCG64(self._split_streams[split])), False)
            ids = [f"{split}_{i:06d}" for i in range(counts[split])]
            for start in range(0, counts[split], self.chunk_size):
                stop = min(start + self.chunk_size, counts[split])
                chunk = {k: batch[k][start:stop] for k in _ATTRIBUTES}
                images = self.render(chunk, {k: v[start:stop] for k, v in batch["noise"].items()})
                for i, image in zip(range(start, stop), images):
                    pixels = np.rint(image[0] * 255.0).astype(np.uint8)
                    Image.fromarray(pixels).save(image_dir / f"{ids[i]}.png")
            csv_path = root / f"{split}.csv"
            with open(csv_path, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["patient_id", "path", *_ATTRIBUTES])
                for i, pid in enumerate(ids):
                    writer.writerow(
                        [
                            pid,
                            f"images/{split}/{pid}.png",
                            self._encoder.class_name("sex", batch["sex"][i]),
                            self._encoder.class_name("race", batch["race"][i]),
                            repr(float(batch["age"][i])),
                            self._encoder.class_name("disease", batch["disease"][i]),
                        ]
                    )
            np.savez(root / f"{split}_noise.npz", patient_id=np.asarray(ids), **batch["noise"])
            written[split] = csv_path
        settings = self.settings()
        settings["counts"] = counts
        with open(root / "phantom.json", "w") as handle:
            json.dump(settings, handle, indent=2)
        return written

    @staticmethod
    def read_noise(out_dir: str | os.PathLike, split: str) -> dict[str, np.ndarray]:
        """The exogenous noise of a written split, one row per CSV row, plus its ``patient_id`` array."""
        path = Path(out_dir) / f"{split}_noise.npz"
        if not path.is_file():
            raise ValueError(f"No phantom noise file '{path}' (split '{split}'); was the dataset written here?")
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        missing = [k for k in NOISE_KEYS if k not in arrays]
        if missing:
            raise ValueError(f"Phantom noise file '{path}' lacks entries {missing}.")
        return arrays

    @classmethod
    def from_directory(cls, out_dir: str | os.PathLike) -> SyntheticCXR:
        """The generator that wrote ``out_dir`` (from its ``phantom.json``), to render true counterfactuals."""
        path = Path(out_dir) / "phantom.json"
        if not path.is_file():
            raise ValueError(f"No '{path}'; '{out_dir}' was not written by SyntheticCXR.write.")
        with open(path) as handle:
            settings = json.load(handle)
        if settings.get("version") != PHANTOM_VERSION:
            raise ValueError(
                f"'{path}' was written by phantom version {settings.get('version')!r}; this is {PHANTOM_VERSION}."
            )
        return cls(spatial_size=settings["spatial_size"], seed=settings["seed"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spatial_size={self.spatial_size}, seed={self.seed})"


# ---------------------------------------------------------------------- noise and attributes
def _check_count(n: Any, what: str) -> int:
    if isinstance(n, bool) or int(n) != n or int(n) < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {n!r}.")
    return int(n)


def _noise_from_uniforms(uniforms: np.ndarray) -> dict[str, np.ndarray]:
    noise: dict[str, np.ndarray] = {}
    for column, (name, kind) in enumerate(_NOISE_FIELDS):
        u = uniforms[:, column]
        if kind == "uniform":
            noise[name] = u.copy()
        elif kind == "normal":
            clipped = torch.from_numpy(np.clip(u, 1e-9, 1.0 - 1e-9))
            noise[name] = np.clip(torch.special.ndtri(clipped).numpy(), -4.0, 4.0)
        elif kind == "severity":
            noise[name] = (1.0 - (1.0 - u) ** (1.0 / _SEVERITY_B)) ** (1.0 / _SEVERITY_A)
        else:
            noise[name] = np.floor(u * 2**31).astype(np.int64)
    return noise


def _noise_arrays(noise: Mapping[str, Any]) -> dict[str, np.ndarray]:
    missing = [k for k in NOISE_KEYS if k not in noise]
    if missing:
        raise ValueError(f"Noise entries {missing} are missing; got keys {sorted(noise)}.")
    arrays = {}
    for key in NOISE_KEYS:
        dtype = np.int64 if key == "texture_seed" else np.float64
        arrays[key] = np.asarray(noise[key], dtype=dtype).reshape(-1)
    sizes = {len(v) for v in arrays.values()}
    if len(sizes) != 1:
        raise ValueError(f"Noise entries have different lengths: { {k: len(v) for k, v in arrays.items()} }.")
    return arrays


def _check_attribute_values(attrs: Mapping[str, np.ndarray]) -> None:
    allowed = {"sex": 2, "race": len(RACE_PROBABILITIES), "disease": 2}
    for name, count in allowed.items():
        bad = attrs[name][~np.isin(attrs[name], np.arange(count))]
        if bad.size:
            raise ValueError(f"Attribute '{name}' must be a class index in 0..{count - 1}, got {bad[:5].tolist()}.")
    age = attrs["age"]
    bad = age[~np.isfinite(age) | (age < 0.0) | (age > 100.0)]
    if bad.size:
        raise ValueError(f"Attribute 'age' must lie in [0, 100] years, got {bad[:5].tolist()}.")


def _disease_from(age: Any, u_disease: Any) -> np.ndarray:
    return (np.asarray(u_disease, dtype=np.float64) < disease_probability(age)).astype(np.int64)


def _stack(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    if not samples:
        raise ValueError("Cannot stack an empty list of samples.")
    batch: dict[str, Any] = {}
    for name in _ATTRIBUTES:
        missing = [i for i, s in enumerate(samples) if name not in s]
        if missing:
            raise ValueError(f"Samples {missing[:5]} lack attribute '{name}'.")
        batch[name] = np.asarray([s[name] for s in samples], dtype=np.float64 if name == "age" else np.int64)
    for i, s in enumerate(samples):
        if "noise" not in s:
            raise ValueError(f"Sample {i} has no 'noise' entry; only phantom samples have true counterfactuals.")
    batch["noise"] = _noise_arrays(
        {k: [s["noise"][k] for s in samples] for k in NOISE_KEYS if k in samples[0]["noise"]}
    )
    if all("image" in s for s in samples):
        batch["image"] = np.stack([np.asarray(s["image"], dtype=np.float32) for s in samples])
    return batch


# ---------------------------------------------------------------------- the renderer
# Only IEEE-exact operations (+ - * /, sqrt, abs, floor, clamp, min/max) touch pixels, so an image does not
# depend on where it sits in a batch (SIMD and scalar code paths agree bit for bit) and quantisation is stable.
_M32 = np.uint64(0xFFFFFFFF)


def _hash_uniform(seed: np.ndarray, salt: int, rows: int, cols: int) -> np.ndarray:
    """Per-sample lattices (B, rows, cols) of uniforms in [-1, 1) from integer seeds (a 32-bit mixing hash)."""
    i = np.arange(rows, dtype=np.uint64)[None, :, None]
    j = np.arange(cols, dtype=np.uint64)[None, None, :]
    h = (seed.astype(np.uint64)[:, None, None] * np.uint64(0x9E3779B1) + np.uint64(salt) * np.uint64(0x27D4EB2F)) & _M32
    h = (h + i * np.uint64(0x85EBCA77) + j * np.uint64(0xC2B2AE3D)) & _M32
    for shift, mult in ((15, 0x2C1B3C6D), (12, 0x297A2D39), (15, 0x5BD1E995)):
        h ^= h >> np.uint64(shift)
        h = (h * np.uint64(mult)) & _M32
    h ^= h >> np.uint64(16)
    return (h.astype(np.float64) / 2.0**31 - 1.0).astype(np.float32)


def _value_noise(seed: np.ndarray, salt: int, cells: int, grid: torch.Tensor) -> torch.Tensor:
    """Smooth value noise (B, H, W) in [-1, 1], ``cells`` lattice cells across the field of view."""
    lattice = torch.from_numpy(_hash_uniform(seed, salt, cells + 1, cells + 1))
    u = (grid + 1.0) * (0.5 * cells)
    i0 = u.floor().clamp(0, cells - 1)
    f = u - i0
    w = f * f * (3.0 - 2.0 * f)
    i0 = i0.long()
    # explicit a + (b - a) w rather than torch.lerp, whose SIMD path may fuse the multiply-add
    low = lattice[:, :, i0]
    along_x = low + (lattice[:, :, i0 + 1] - low) * w  # (B, cells + 1, W)
    low = along_x[:, i0, :]
    return low + (along_x[:, i0 + 1, :] - low) * w[:, None]


def _ramp(z: torch.Tensor, width: Any) -> torch.Tensor:
    """0 -> 1 across ``width`` centred on ``z = 0``: an anti-aliased edge (in place on ``z``)."""
    return z.mul_(1.0 / width).add_(0.5).clamp_(0.0, 1.0)


def _sample_parameters(attrs: Mapping[str, np.ndarray], noise: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Per-sample geometry and contrast, (B, 1, 1) float32, from attributes and noise (exact arithmetic)."""
    n = {k: np.asarray(v, dtype=np.float64) for k, v in noise.items() if k != "texture_seed"}
    female = (np.asarray(attrs["sex"]) == _FEMALE).astype(np.float64)
    age01 = np.clip(np.asarray(attrs["age"], dtype=np.float64), 0.0, 100.0) / 100.0
    disease = (np.asarray(attrs["disease"]) > 0).astype(np.float64)
    race = np.asarray(attrs["race"], dtype=np.int64)
    cues = np.asarray(_RACE_CUES, dtype=np.float64)[race]
    p: dict[str, np.ndarray] = {"female": female, "age01": age01}

    theta = 0.035 * n["rotation"]  # radians; cos/sin by series, exact enough for |theta| < 0.15
    p["cos"], p["sin"] = 1.0 - theta * theta / 2.0, theta - theta**3 / 6.0
    p["shift_x"], p["shift_y"] = 0.03 * n["shift_x"], 0.03 * n["shift_y"]

    # thorax: sex sets the width and how quickly the lungs widen below the apices (taper)
    width = 0.78 - 0.035 * female + 0.035 * n["thorax_width"]
    p["width"] = width
    p["taper"] = np.maximum(0.8 + 1.0 * female + 0.25 * n["thorax_taper"], 0.1)
    p["apex"] = -0.78 + 0.03 * n["lung_height"]
    p["base"] = 0.52 + 0.04 * n["lung_height"]
    p["inv_height"] = 1.0 / (p["base"] - p["apex"])
    p["lung_centre"] = 0.42 * width
    p["lung_reach"] = 0.58 * width
    p["mediastinum"] = 0.095 + 0.012 * n["mediastinum_width"]
    p["heart_x"] = 0.10 + 0.025 * n["heart_shift"]
    p["heart_y"] = p["base"] - 0.24
    p["heart_ry"] = 0.27 * (1.0 + 0.05 * n["heart_size"])
    p["heart_inv_rx"] = 1.0 / (0.39 * (1.0 + 0.06 * n["heart_size"]))
    p["heart_inv_ry"] = 1.0 / p["heart_ry"]
    asym = 0.02 * n["diaphragm_asymmetry"]
    p["base_left"], p["base_right"] = p["base"] - 0.05 + asym, p["base"] - asym
    p["dome_height"] = 0.17 + 0.03 * n["diaphragm_dome"]
    p["dome_inv_width"] = 1.0 / (0.58 * width + 0.02)
    p["wall"] = 0.10 + 0.025 * n["habitus"]

    # bones fade with age; the aortic knob grows, densifies and calcifies with age
    p["bone"] = 0.11 * (1.40 - 0.85 * age01) * (1.0 + 0.1 * n["bone_density"])
    p["inv_spacing"] = 1.0 / (0.145 * (1.0 + 0.05 * n["rib_spacing"]))
    p["rib_phase"] = n["rib_phase"]
    p["knob_r"] = 0.045 + 0.04 * age01 + 0.006 * n["aorta_size"]
    p["knob_x"] = p["mediastinum"] - 0.02 + 0.6 * p["knob_r"]
    p["knob_density"] = 0.10 + 0.10 * age01
    p["knob_calcium"] = 0.20 * age01 * age01

    # breasts (female only)
    breast = 0.05 + 1.15 * n["breast_size"] * np.sqrt(n["breast_size"])  # many small, some large
    p["breast"] = female * breast
    p["breast_x"] = p["lung_centre"] + 0.15 * width
    p["breast_y"] = p["base"] - 0.10
    p["breast_inv_rx"] = 1.0 / (0.32 * np.sqrt(breast))
    p["breast_inv_ry"] = 1.0 / (0.22 * np.sqrt(breast))

    # effusion: fluid height per side (image left = patient right), zero without disease
    height = disease * (0.03 + 0.5 * n["effusion_severity"])
    side = n["effusion_side"]
    both, right_only = side < 0.35, (side >= 0.35) & (side < 0.675)
    p["fluid_left"] = np.where(both | right_only, height, 0.0)
    p["fluid_right"] = np.where(both, 0.6 * height, np.where(right_only, 0.0, height))

    p["bubble"] = (n["gastric_bubble"] < 0.7).astype(np.float64)
    p["bubble_r"] = 0.04 + 0.05 * n["gastric_bubble"]
    p["bubble_y"] = p["base"] - 0.45 * p["dome_height"] + 0.05 + p["bubble_r"]

    # race: a subtle global cue, soft-tissue density and the amplitude of a fine tissue texture
    p["tissue"] = 0.46 + 0.025 * n["habitus"] + 0.024 * cues[:, 0] + 0.01 * n["tissue_density"]
    p["texture"] = 0.02 * (1.0 + 0.45 * cues[:, 1]) * (1.0 + 0.2 * n["tissue_texture"]).clip(0.2)

    p["exposure"] = 0.04 * n["exposure"]
    p["contrast"] = 1.0 + 0.08 * n["contrast"]
    p["grain"] = 0.012 * (1.0 + 0.25 * n["grain"]).clip(0.2)
    return {k: torch.from_numpy(np.asarray(v, dtype=np.float32).reshape(-1, 1, 1)) for k, v in p.items()}


def _render(attrs: Mapping[str, np.ndarray], noise: Mapping[str, np.ndarray], size: int) -> np.ndarray:
    """Render one chunk: (B, H, W) float32 on 8-bit levels. Geometry is in units of half the field of view."""
    with _single_thread():
        return _render_chunk(attrs, noise, size)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    # the chunks are small and element-wise: extra intra-op threads mostly spin, and badly so on a busy machine
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _render_chunk(attrs: Mapping[str, np.ndarray], noise: Mapping[str, np.ndarray], size: int) -> np.ndarray:
    p = _sample_parameters(attrs, noise)
    seed = np.asarray(noise["texture_seed"], dtype=np.int64)
    pixel = 2.0 / size
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) * pixel - 1.0
    edge = math.sqrt(0.015**2 + (0.8 * pixel) ** 2)  # anatomical blur plus anti-aliasing

    # patient frame: a small rotation and shift of the patient in the field of view
    gx = grid.reshape(1, 1, -1) - p["shift_x"]
    gy = grid.reshape(1, -1, 1) - p["shift_y"]
    x = gx * p["cos"] + gy * p["sin"]
    y = gy * p["cos"] - gx * p["sin"]
    ax = x.abs()
    left = x < 0.0  # image left = the patient's right

    # lungs: a rounded apex widening to the costophrenic angle; saturating profile sqrt(t (1 + k) / (t + k))
    t = ((y - p["apex"]) * p["inv_height"]).clamp_(min=0.0)
    profile = torch.sqrt(t * (1.0 + p["taper"]) / (t + p["taper"]))
    lung_hw = profile * p["lung_reach"]
    lateral_edge = lung_hw + p["lung_centre"]
    med_hw = _ramp(y + 0.15, 0.3).mul_(0.02).add_(p["mediastinum"])
    dome = ((ax - p["lung_centre"]) * p["dome_inv_width"]).square_().neg_().add_(1.0).clamp_(min=0.0)
    base_side = torch.where(left, p["base_left"], p["base_right"])
    diaphragm = base_side - dome * p["dome_height"]
    lungs = _ramp(lateral_edge - ax, edge)
    lungs *= _ramp(ax - p["lung_centre"] + lung_hw, edge)
    lungs *= _ramp(ax - med_hw, edge)
    lungs *= _ramp(diaphragm - y, edge)
    lungs *= _ramp(y - p["apex"], edge)

    # heart (bulging to the patient's left) and mediastinum, merged into one central shadow
    heart_r2 = ((x - p["heart_x"]) * p["heart_inv_rx"]).square_() + ((y - p["heart_y"]) * p["heart_inv_ry"]).square_()
    heart = _ramp(heart_r2.neg_().add_(1.0).mul_(0.5 * p["heart_ry"]), edge + 0.01)
    mediastinum = _ramp(med_hw - ax, edge) * _ramp(p["base"] - 0.1 - y, 0.1)
    central = 1.0 - (1.0 - mediastinum) * (1.0 - heart)
    aerated = lungs * (1.0 - 0.9 * heart)
    hilum = (1.0 - ((ax - 0.17).square_() + (y + 0.02).square_()) * 5.0).clamp_(min=0.0).square_()

    # body: chest wall around the lungs, shoulders above, abdomen below the diaphragm
    chest_hw = torch.sqrt(t.clamp(0.3, 1.3)) * p["lung_reach"] + p["lung_centre"] + p["wall"]
    shoulder_hw = ((-0.30 - y) * 1.5).clamp_(0.0, 0.6).add_(0.55)
    body = _ramp(torch.maximum(chest_hw, shoulder_hw) - ax, edge)
    abdomen = _ramp(y - diaphragm, edge) * _ramp(chest_hw - p["wall"] - ax + 0.03, edge)

    # ribs: posterior ribs arch down laterally, fainter anterior ribs slope the other way (triangle waves)
    rib_width = 0.25 + 1.2 * pixel * p["inv_spacing"]
    rib_y = (y - p["apex"] - (0.75 * ax - 0.25) * ax) * p["inv_spacing"] + p["rib_phase"]
    posterior = _ramp((rib_y - rib_y.floor() - 0.5).abs_().mul_(2.0).sub_(0.72), rib_width)
    ant_y = (y - p["apex"] + 0.45 * ax) * (p["inv_spacing"] / 1.3) + p["rib_phase"] + 0.3
    anterior = _ramp((ant_y - ant_y.floor() - 0.5).abs_().mul_(2.0).sub_(0.75), rib_width)
    anterior *= _ramp(0.55 - ax, 0.1)
    cage = _ramp(lateral_edge + 0.05 - ax, edge) * _ramp(p["base"] + 0.03 - y, edge)
    cage *= _ramp(ax - 0.07, edge) * _ramp(y - p["apex"] + 0.06, edge)
    ribs = (posterior + 0.4 * anterior) * cage

    # clavicles: from the sternal notch laterally and slightly up, gently S-shaped
    seg_x, seg_y = 0.62, -0.16
    cx, cy = ax - 0.07, y + 0.60
    along = ((cx * seg_x + cy * seg_y) * (1.0 / (seg_x**2 + seg_y**2))).clamp_(0.0, 1.0)
    bend = along * (1.0 - along) * (0.5 - along) * 0.5
    clavicle_d2 = (cx - along * seg_x).square_() + (cy - along * seg_y + bend).square_()
    clavicles = _ramp(0.035 - torch.sqrt(clavicle_d2), edge)
    spine_wave = (y * (1.0 / 0.13) + p["rib_phase"]).frac_().sub_(0.5).abs_()
    spine = _ramp(0.06 - ax, edge) * (0.6 + 0.8 * spine_wave)
    trachea = _ramp(0.032 - (x + 0.01).abs(), edge) * _ramp(-0.30 - y, 0.06)

    # aortic knob at the upper left mediastinal border
    knob_d = torch.sqrt((x - p["knob_x"]).square_() + (y + 0.34).square_())
    knob = _ramp(p["knob_r"] - knob_d, edge)
    rim = (1.0 - ((knob_d - 0.85 * p["knob_r"]) * (1.0 / (0.015 + 0.5 * pixel))).square_()).clamp_(min=0.0)
    rim *= _ramp(x - p["knob_x"], 0.03)

    # breasts: soft-tissue shadows over the lower lung fields with a sharp curved lower edge
    b_r2 = ((ax - p["breast_x"]) * p["breast_inv_rx"]).square_() + ((y - p["breast_y"]) * p["breast_inv_ry"]).square_()
    breasts = torch.sqrt((1.0 - b_r2).clamp_(min=0.0)) * _ramp(y - p["breast_y"] + 0.10, 0.16) * p["breast"]

    # pleural effusion: basal fluid filling the costophrenic recess, its meniscus climbing laterally
    fluid_height = torch.where(left, p["fluid_left"], p["fluid_right"])
    lateral = ((ax - med_hw) / (lateral_edge - med_hw).clamp_(min=0.05)).clamp_(0.0, 1.0)
    fluid_top = base_side - fluid_height * (0.3 + 0.7 * lateral * lateral)
    fluid = aerated * _ramp(y - fluid_top, edge + 0.02) * (fluid_height > 0.0)

    # gastric bubble under the left hemidiaphragm (image right)
    bubble_d = torch.sqrt((x - p["lung_centre"]).square_() + (y - p["bubble_y"]).square_())
    bubble = _ramp(p["bubble_r"] - bubble_d, edge) * (p["bubble"] * (x > 0.0))

    texture = _value_noise(seed, 1, 22, grid)
    vessels = _value_noise(seed, 4, 14, grid)
    density = body * (p["tissue"] + p["texture"] * texture + 0.21 * abdomen - 0.12 * bubble)
    density += aerated * (0.06 * hilum + 0.035 * (0.4 + hilum) * vessels - 0.30)
    density += central * (0.26 - 0.20 * abdomen)
    density += 0.03 * spine - 0.10 * trachea + p["knob_density"] * knob * (1.0 - mediastinum)
    density += p["knob_calcium"] * rim + p["bone"] * (ribs * (1.0 - 0.6 * abdomen) + 1.6 * clavicles)
    density += 0.09 * breasts + 0.30 * fluid + 0.03

    # acquisition: exposure, contrast, a large-scale mottle and a fine grain
    image = (density - 0.4) * p["contrast"] + (0.4 + p["exposure"])
    image += 0.015 * _value_noise(seed, 2, 6, grid)
    image += p["grain"] * _value_noise(seed, 3, 96, grid)
    return image.clamp_(0.0, 1.0).mul_(255.0).round_().div_(255.0).numpy()


# ---------------------------------------------------------------------- the grid figure
def save_counterfactual_grid(
    out: str | os.PathLike, n: int = 6, spatial_size: int = 128, seed: int = 0, diff: bool = True
) -> Path:
    """Save a PNG grid (:func:`monai_cf.visualize.plot_counterfactual_grid`): per patient, the factual image and
    its true counterfactuals under do(sex) flipped, do(age) +/- 30 years, do(disease) flipped and do(race) -> the
    next class, with a row of difference maps ``x* - x`` when ``diff`` is true, each column on its own colour
    scale so that the subtle race cue shows beside the strong sex and disease edits.
    """
    from monai_cf.visualize import plot_counterfactual_grid

    phantom = SyntheticCXR(spatial_size=spatial_size, seed=seed)
    enc = phantom.encoder
    samples = phantom.sample(n)
    short = {"male": "M", "female": "F", "no_finding": "healthy", "pleural_effusion": "effusion"}

    def describe(s: Mapping[str, Any]) -> str:
        sex = short[enc.class_name("sex", s["sex"])]
        dis = short[enc.class_name("disease", s["disease"])]
        return f"{sex}, {enc.class_name('race', s['race'])}, {s['age']:.0f}y, {dis}"

    columns: dict[str, list[np.ndarray]] = {name: [] for name in ("sex", "age", "disease", "race")}
    titles: dict[str, list[str]] = {name: [] for name in columns}
    for s in samples:
        interventions = {
            "sex": {"sex": 1 - s["sex"]},
            "age": {"age": s["age"] + 30.0 if s["age"] < 60.0 else s["age"] - 30.0},
            "disease": {"disease": 1 - s["disease"]},
            "race": {"race": (s["race"] + 1) % 3},
        }
        for name, do in interventions.items():
            cf = phantom.counterfactual(s, do=do)
            label = f"do({name}={enc.to_original(name, cf[name]):.0f})" if name == "age" else None
            label = label or f"do({name}={enc.class_name(name, cf[name])})"
            if name == "age" and cf["disease"] != s["disease"]:
                label += "\n(disease flips)"
            columns[name].append(cf["image"])
            titles[name].append(label)
    factual = np.stack([s["image"] for s in samples])
    stacked = {f"do({name})": np.stack(images) for name, images in columns.items()}
    limits = {label: max(float(np.abs(images - factual).max()), 0.02) for label, images in stacked.items()}
    return plot_counterfactual_grid(
        out,
        factual,
        stacked,
        panel_titles={f"do({name})": value for name, value in titles.items()},
        row_labels=[describe(s) for s in samples],
        diff_limit=limits,
        title=f"SyntheticCXR v{PHANTOM_VERSION}: factual and ground-truth counterfactuals ({spatial_size}px)",
        differences=diff,
    )


# ---------------------------------------------------------------------- the command line
def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``write`` a dataset or draw a counterfactual ``grid``."""
    parser = argparse.ArgumentParser(prog="python -m monai_cf.data.phantom", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write PNGs, CSVs and noise files of train/val/test splits")
    write.add_argument("--out_dir", required=True)
    write.add_argument("--n_train", type=int, required=True)
    write.add_argument("--n_val", type=int, required=True)
    write.add_argument("--n_test", type=int, required=True)
    write.add_argument("--spatial_size", type=int, default=64)
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--overwrite", action="store_true")
    grid = commands.add_parser("grid", help="save a PNG grid of factual images and true counterfactuals")
    grid.add_argument("--out", required=True)
    grid.add_argument("--n", type=int, default=6)
    grid.add_argument("--spatial_size", type=int, default=128)
    grid.add_argument("--seed", type=int, default=0)
    grid.add_argument("--no_diff", action="store_true", help="leave out the difference-map columns")
    args = parser.parse_args(argv)
    if args.command == "write":
        phantom = SyntheticCXR(spatial_size=args.spatial_size, seed=args.seed)
        try:
            written = phantom.write(args.out_dir, args.n_train, args.n_val, args.n_test, overwrite=args.overwrite)
        except (FileExistsError, ValueError) as error:
            parser.exit(2, f"error: {error}\n")
        print(f"Wrote {', '.join(f'{k}: {v}' for k, v in written.items())}")
    else:
        path = save_counterfactual_grid(
            args.out, n=args.n, spatial_size=args.spatial_size, seed=args.seed, diff=not args.no_diff
        )
        print(f"Wrote {path}")


if __name__ == "__main__":
    main()
