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
"""A disk cache of precomputed counterfactuals, invalidated by any change of the model's weights."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from itertools import chain
from typing import Any

import torch
from torch import nn

__all__ = ["CounterfactualCache", "model_fingerprint", "tensor_digest"]

logger = logging.getLogger("monai_cf.transforms")

_ENTRY_SUFFIX = ".pt"


def tensor_digest(tensors: Iterable[torch.Tensor], extra: Any = None, digest_size: int = 16) -> str:
    """Hex digest of the bytes, dtypes and shapes of ``tensors`` (any device, any dtype) and of ``repr(extra)``."""
    hasher = hashlib.blake2b(digest_size=digest_size)
    for tensor in tensors:
        tensor = tensor.detach()
        hasher.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        # A byte view works for every dtype (bfloat16 has no numpy equivalent).
        flat = tensor.to("cpu").contiguous().reshape(-1)
        hasher.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    if extra is not None:
        hasher.update(repr(extra).encode())
    return hasher.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """A hash of everything that decides a model's outputs: its class, its state dict and, for a
    :class:`~monai_cf.networks.DeepSCM`, its causal graph and image range.

    Two models with equal fingerprints compute the same counterfactuals; changing one weight changes it.

    Example::

        before = model_fingerprint(scm)
        with torch.no_grad():
            next(scm.parameters()).add_(1e-3)
        model_fingerprint(scm) != before  # True
    """
    state = model.state_dict()
    extra: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}", "names": list(state)}
    graph = getattr(model, "graph", None)
    if graph is not None and hasattr(graph, "to_dict"):
        extra["graph"] = graph.to_dict()
    if hasattr(model, "image_range"):
        extra["image_range"] = tuple(model.image_range)
    return tensor_digest(state.values(), extra=extra, digest_size=20)


class CounterfactualCache:
    """Precomputed counterfactuals on disk, one file per (sample, intervention, options) under a folder named
    by the model's fingerprint (:func:`model_fingerprint`), so a changed model never reads stale results.

    Entries are ``torch.save`` files of ``{"image": (C, *spatial) tensor, "attributes": {name: 0-d tensor}}``
    written atomically (a temporary file in the same folder, then ``os.replace``), so concurrent readers and
    writers (DataLoader workers, several processes) see either a whole entry or none. An unreadable entry is
    logged, treated as a miss and overwritten.

    The fingerprint is hashed once and hashed again only when a cheap probe of the model changes: the storage
    address and in-place version counter of every parameter and buffer. Optimiser steps, ``load_state_dict``
    and in-place edits under ``torch.no_grad()`` all bump those counters; edits through ``tensor.data`` do not,
    so call :meth:`refresh` after them, or pass ``verify="always"`` to hash the weights at every lookup.

    Used by :class:`~monai_cf.transforms.BatchCounterfactual` and, through it, by every counterfactual
    transform and the batch augmenter (``cache=`` argument). A cached discrete descendant (e.g. the disease
    under do(age)) is the one posterior draw made when the entry was written.

    Args:
        cache_dir: root folder of the cache (created if missing).
        model: the model whose outputs are cached, usually a :class:`~monai_cf.networks.DeepSCM`.
        verify: ``"version"`` (default) or ``"always"``, see above.

    Example::

        cache = CounterfactualCache("./cf_cache", scm)
        augment = RandCounterfactuald("image", scm, attributes=["sex"], prob=1.0, cache=cache)
        augment(sample)              # computed and written
        augment(sample)              # read back if the same intervention is drawn
        cache.hits, cache.misses, len(cache)
    """

    def __init__(self, cache_dir: str | os.PathLike, model: nn.Module, verify: str = "version") -> None:
        if verify not in ("version", "always"):
            raise ValueError(f"verify must be 'version' or 'always', got {verify!r}.")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.cache_dir = os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
        os.makedirs(self.cache_dir, exist_ok=True)
        self.model = model
        self.verify = verify
        self.hits = 0
        self.misses = 0
        self._probe: tuple | None = None
        self._fingerprint = ""
        self.refresh()

    # ------------------------------------------------------------------------------------------ fingerprint
    def _weights_probe(self) -> tuple:
        tensors = chain(self.model.parameters(), self.model.buffers())
        return tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors)

    def refresh(self) -> str:
        """Hash the model's weights again and return the fingerprint."""
        self._probe = self._weights_probe()
        self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the model's current weights (rehashed when they changed)."""
        if self.verify == "always" or self._weights_probe() != self._probe:
            self.refresh()
        return self._fingerprint

    @property
    def folder(self) -> str:
        """Where the entries of the current weights live."""
        return os.path.join(self.cache_dir, self.fingerprint)

    # ------------------------------------------------------------------------------------------ entries
    @staticmethod
    def key(sample: str, intervention: Mapping[str, Any], **options: Any) -> str:
        """The entry name of a sample (an id or a content digest) under an intervention and options."""
        payload = json.dumps(
            {"sample": str(sample), "do": {k: _plain(v) for k, v in intervention.items()}, "options": options},
            sort_keys=True,
            default=repr,
        )
        return hashlib.blake2b(payload.encode(), digest_size=20).hexdigest()

    def path(self, key: str, folder: str | None = None) -> str:
        return os.path.join(folder or self.folder, key + _ENTRY_SUFFIX)

    def load(self, key: str, folder: str | None = None) -> dict[str, Any] | None:
        """The entry under ``key``, or ``None`` (counted as a miss)."""
        path = self.path(key, folder)
        if not os.path.isfile(path):
            self.misses += 1
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(entry, dict) or "image" not in entry or "attributes" not in entry:
                raise ValueError("not a counterfactual cache entry")
        except Exception as error:  # a damaged file is a miss, whatever torch raised
            logger.warning("Ignoring unreadable counterfactual cache entry '%s': %s", path, error)
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def save(self, key: str, image: torch.Tensor, attributes: Mapping[str, Any], folder: str | None = None) -> str:
        """Write an entry atomically; returns its path."""
        folder = folder or self.folder
        os.makedirs(folder, exist_ok=True)
        entry = {
            "image": image.detach().to("cpu").contiguous(),
            "attributes": {n: torch.as_tensor(v).detach().to("cpu").reshape(()) for n, v in attributes.items()},
        }
        path = self.path(key, folder)
        handle, tmp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=_ENTRY_SUFFIX)
        try:
            with os.fdopen(handle, "wb") as stream:
                torch.save(entry, stream)
            os.replace(tmp_path, path)
        except BaseException:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
            raise
        return path

    def __len__(self) -> int:
        """Number of entries stored for the current weights."""
        folder = self.folder
        if not os.path.isdir(folder):
            return 0
        return sum(1 for name in os.listdir(folder) if name.endswith(_ENTRY_SUFFIX) and not name.startswith("."))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cache_dir={self.cache_dir!r}, fingerprint={self._fingerprint[:12]}...)"


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1)[0].item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and not isinstance(value, (list, tuple, str)):
        value = value.item()
    if isinstance(value, float):
        return repr(value)  # exact, so 60.0 and 60.000001 never share an entry
    return value
