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
"""A resumed pass of the sampler continues the epoch's order; the loader's order depends on (seed, epoch) only."""

from __future__ import annotations

import torch

from monai_cf.engines.reproducibility import ResumableDistributedSampler, create_data_loader


def test_resumable_sampler_skips_into_the_epoch():
    data = list(range(20))
    full = ResumableDistributedSampler(data, seed=5)
    full.set_epoch(3)
    order = list(full)
    assert sorted(order) == data and order != data
    resumed = ResumableDistributedSampler(data, seed=5)
    resumed.set_epoch(3)
    resumed.skip(8)
    assert list(resumed) == order[8:]
    assert list(resumed) == order  # the skip applies to one pass only
    shard = ResumableDistributedSampler(data, num_replicas=2, rank=1, seed=5)
    shard.set_epoch(3)
    assert list(shard) == order[1::2]
    loader = create_data_loader(data, batch_size=4, seed=5)
    loader.sampler.set_epoch(3)
    assert torch.cat(list(loader)).tolist() == order
