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

import pytest
import torch

from monai_cf.metrics import MAX_PSNR, composition_distances, image_similarity, l1_255, reversibility_distances


def _batch(seed: int = 0, n: int = 3, size: int = 16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=gen)
    pa = {"sex": torch.tensor([0, 1, 0])[:n], "age": torch.tensor([30.0, 50.0, 70.0])[:n]}
    return x, pa


def identity(x, pa, do):
    return x.clone(), {**pa, **do}


def test_l1_on_the_255_scale():
    x = torch.zeros(2, 1, 4, 4)
    y = torch.full((2, 1, 4, 4), 0.5)
    assert l1_255(x, y).tolist() == [127.5, 127.5]
    assert l1_255(x * 2 - 1, y * 2 - 1, data_range=2.0).tolist() == [127.5, 127.5]
    with pytest.raises(ValueError, match="shapes differ"):
        l1_255(x, y[:1])


def test_composition_of_identity_is_zero_and_a_drift_accumulates():
    x, pa = _batch()
    result = composition_distances(identity, x, pa, cycles=(1, 10))
    assert set(result) == {1, 10}
    assert all(float(v.abs().max()) == 0.0 for v in result.values())
    calls = []

    def drift(images, attributes, do):
        calls.append(do)
        return images + 1.0 / 255.0, attributes  # each null intervention brightens by one grey level

    x = torch.full((2, 1, 8, 8), 0.25)
    result = composition_distances(drift, x, pa, cycles=(10, 1, 3))
    assert len(calls) == 10 and all(do == {} for do in calls)
    for m, distance in result.items():
        assert distance.tolist() == pytest.approx([float(m)] * 2)
    with pytest.raises(ValueError, match="positive"):
        composition_distances(identity, x, pa, cycles=(0,))


def test_reversibility_goes_back_to_the_factual_value():
    x, pa = _batch()
    do = {"sex": 1 - pa["sex"]}
    assert float(reversibility_distances(identity, x, pa, do).abs().max()) == 0.0
    seen = []

    def sex_shift(images, attributes, intervention):
        seen.append({k: v.clone() for k, v in intervention.items()})
        # a model that forgets part of the image on every counterfactual: x * 0.9 (a loss of 10% of x)
        return images * 0.9, {**attributes, **intervention}

    distance = reversibility_distances(sex_shift, x, pa, do)
    assert torch.equal(seen[1]["sex"], pa["sex"])  # the way back asks for the factual value
    expected = (x - 0.81 * x).abs().flatten(1).mean(1) * 255.0
    assert torch.allclose(distance, expected.double())


def test_image_similarity_identical_and_offset():
    x, _ = _batch(size=32)
    same = image_similarity(x, x)
    assert same["l1"].tolist() == [0.0] * 3
    assert same["psnr"].tolist() == [MAX_PSNR] * 3
    assert same["ssim"].tolist() == pytest.approx([1.0] * 3)
    x = torch.full((2, 1, 32, 32), 0.4)
    offset = image_similarity(x, x + 0.1)
    assert offset["l1"].tolist() == pytest.approx([25.5, 25.5])
    assert offset["psnr"].tolist() == pytest.approx([20.0, 20.0], abs=1e-6)  # 10 log10(1 / 0.01)
    noisy = image_similarity(x, x + 0.2 * torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert (noisy["ssim"] < 0.9).all()
