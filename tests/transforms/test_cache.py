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
from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
from monai.data import list_data_collate

from monai_cf.transforms import (
    CounterfactualBatchAugmenter,
    CounterfactualCache,
    Counterfactuald,
    RandCounterfactuald,
    model_fingerprint,
)
from tests.transforms import ATTRIBUTES, make_items, make_scm


def _same(a, b):
    assert torch.equal(a["image"], b["image"])
    assert all(a[n] == b[n] for n in ATTRIBUTES)
    assert torch.equal(a["pa"], b["pa"])


def test_fingerprint_follows_the_weights():
    scm = make_scm()
    fingerprint = model_fingerprint(scm)
    assert model_fingerprint(copy.deepcopy(scm)) == fingerprint
    assert model_fingerprint(make_scm(seed=1)) != fingerprint
    with torch.no_grad():
        scm.image_model.likelihood_head.bias[0] += 1e-3
    assert model_fingerprint(scm) != fingerprint


def test_cache_returns_identical_results_and_writes_atomically(tmp_path):
    scm = make_scm()
    items = make_items(3)
    cache = CounterfactualCache(tmp_path, scm)
    cached = Counterfactuald("image", scm, do={"age": 85.0}, cache=cache)
    fresh = Counterfactuald("image", scm, do={"age": 85.0})
    first = [cached(item) for item in items]
    assert (cache.misses, cache.hits, len(cache)) == (3, 0, 3)
    second = [cached(item) for item in items]
    assert (cache.misses, cache.hits, len(cache)) == (3, 3, 3)
    for a, b, c in zip(first, second, items):
        _same(a, b)
        _same(a, fresh(c))
    files = os.listdir(cache.folder)
    assert len(files) == 3 and not any(name.startswith(".tmp") for name in files)
    assert os.path.basename(cache.folder) == model_fingerprint(scm)


def test_a_changed_weight_invalidates_the_cache(tmp_path):
    scm = make_scm()
    item = make_items(1)[0]
    cache = CounterfactualCache(tmp_path, scm)
    transform = Counterfactuald("image", scm, do={"sex": 1}, cache=cache)
    before = transform(item)
    old_folder = cache.folder
    bias = scm.image_model.likelihood_head.bias
    original = bias.detach().clone()
    with torch.no_grad():
        bias[0] += 0.5  # in place: the version counter tells the cache
    after = transform(item)
    assert cache.folder != old_folder and cache.hits == 0 and cache.misses == 2
    assert not torch.equal(before["image"], after["image"])
    _same(after, Counterfactuald("image", scm, do={"sex": 1})(item))
    # a weight swap that bypasses version counters needs refresh() (or verify="always")
    bias.data.copy_(original)
    cache.refresh()
    _same(transform(item), before)
    assert cache.hits == 1


def test_verify_always_and_load_state_dict(tmp_path):
    scm = make_scm()
    item = make_items(1)[0]
    cache = CounterfactualCache(tmp_path, scm, verify="always")
    transform = Counterfactuald("image", scm, do={"race": "Black"}, cache=cache)
    before = transform(item)
    scm.load_state_dict(make_scm(seed=2).state_dict())
    after = transform(item)
    assert cache.hits == 0 and not torch.equal(before["image"], after["image"])


def test_damaged_entries_are_misses_and_get_rewritten(tmp_path, caplog):
    scm = make_scm()
    item = make_items(1)[0]
    cache = CounterfactualCache(tmp_path, scm)
    transform = Counterfactuald("image", scm, do={"sex": 0}, cache=cache)
    reference = transform(item)
    (entry,) = os.listdir(cache.folder)
    with open(os.path.join(cache.folder, entry), "wb") as stream:
        stream.write(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="monai_cf.transforms"):
        _same(transform(item), reference)
    assert "unreadable" in caplog.text
    _same(transform(item), reference)
    assert cache.hits == 1


def test_batched_path_uses_the_cache_for_hits_only(tmp_path):
    scm = make_scm()
    items = make_items(8)
    cache = CounterfactualCache(tmp_path, scm)
    augmenter = CounterfactualBatchAugmenter(scm, attributes=["sex", "race"], prob=1.0, cache=cache, id_key="row")
    first = augmenter.set_random_state(0).augment(list_data_collate(items))
    assert cache.misses == 8 and len(cache) == 8
    second = augmenter.set_random_state(0).augment(list_data_collate(items))
    assert cache.hits == 8
    for key in ("image", *ATTRIBUTES, "pa"):
        assert torch.equal(first[key], second[key]), key
    plain = CounterfactualBatchAugmenter(scm, attributes=["sex", "race"], prob=1.0).set_random_state(0)
    third = plain.augment(list_data_collate(items))
    assert torch.allclose(first["image"], third["image"], atol=1e-6)
    # per-sample transform with the same ids reads the batch's entries
    per_sample = RandCounterfactuald("image", scm, attributes=["sex", "race"], prob=1.0, cache=cache, id_key="row")
    per_sample.set_random_state(0)
    outs = [per_sample(item) for item in items]
    assert cache.hits == 16
    assert all(torch.equal(o["image"].as_tensor(), first["image"][i].as_tensor()) for i, o in enumerate(outs))


def test_cache_arguments_are_validated(tmp_path):
    scm = make_scm()
    with pytest.raises(ValueError, match="verify"):
        CounterfactualCache(tmp_path, scm, verify="never")
    with pytest.raises(ValueError, match="another model"):
        Counterfactuald("image", scm, do={"sex": 1}, cache=CounterfactualCache(tmp_path, make_scm(seed=1)))
