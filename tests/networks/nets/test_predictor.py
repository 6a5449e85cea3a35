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
from torch import nn

from monai_cf.graph import CausalGraph
from monai_cf.networks.nets.predictor import AttributeLoss, AttributePredictor, SmallCNN

EXPECTED_HEADS = {"sex": 1, "race": 3, "age": 2, "disease": 1}


@pytest.mark.parametrize(
    "spatial_dims,backbone,size,features",
    [(2, "small_cnn", 32, 128), (3, "small_cnn", 16, 128), (2, "resnet18", 32, 512), (2, "densenet121", 32, 1024)],
)
def test_output_shapes(spatial_dims, backbone, size, features):
    torch.manual_seed(0)
    predictor = AttributePredictor(spatial_dims, 1, "mimic_cxr", backbone=backbone).eval()
    x = torch.randn(3, 1, *([size] * spatial_dims))
    out = predictor(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (3, d) for k, d in EXPECTED_HEADS.items()}
    emb = predictor.features(x)
    assert emb.shape == (3, features) and predictor.num_features == features
    probs = predictor.probabilities(x)
    assert torch.allclose(probs["sex"], torch.sigmoid(out["sex"]))
    assert torch.allclose(probs["race"].sum(-1), torch.ones(3))
    assert torch.allclose(probs["age"], out["age"][:, :1])
    # The heads sit on the embedding.
    assert torch.allclose(predictor.heads["race"](emb), out["race"], atol=1e-6)


def test_attribute_subset_custom_backbone_and_errors():
    graph = CausalGraph.from_name("mimic_cxr")
    predictor = AttributePredictor(2, 3, graph, attributes=["disease", "race"], channels=(8, 16))
    out = predictor(torch.randn(2, 3, 16, 16))
    assert list(out) == ["disease", "race"] and predictor.num_features == 16
    custom = AttributePredictor(2, 1, graph, backbone=nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), num_features=5)
    assert custom(torch.randn(2, 1, 8, 8))["race"].shape == (2, 3)
    with pytest.raises(ValueError, match="Unknown variable 'height'"):
        AttributePredictor(2, 1, graph, attributes=["sex", "height"])
    with pytest.raises(ValueError, match="Unknown predictor backbone"):
        AttributePredictor(2, 1, graph, backbone="vgg")
    with pytest.raises(ValueError, match="num_features"):
        AttributePredictor(2, 1, graph, backbone=nn.Identity())
    with pytest.raises(ValueError, match="Unknown variable 'height'"):
        AttributeLoss(graph, attributes=["height"])
    with pytest.raises(ValueError, match="not supervised"):
        AttributeLoss(graph, attributes=["sex"], weights={"race": 2.0})
    with pytest.raises(ValueError, match="continuous"):
        AttributeLoss(graph, continuous="l1")
    assert SmallCNN(3, 1, channels=(4,))(torch.zeros(1, 1, 4, 4, 4)).shape == (1, 4)


def test_small_cnn_learns_bright_vs_dark():
    torch.manual_seed(0)
    graph = CausalGraph.from_dict({"bright": {"kind": "binary"}, "level": {"kind": "categorical", "num_classes": 3}})
    predictor = AttributePredictor(2, 1, graph, channels=(8, 16, 32))
    loss_fn = AttributeLoss(graph)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=3e-3)

    def batch(n):
        level = torch.randint(0, 3, (n,))
        images = 0.3 * torch.randn(n, 1, 16, 16) + (level.float() - 1.0).view(n, 1, 1, 1)
        return images, {"bright": (level == 2).float(), "level": level}

    for _ in range(40):
        images, targets = batch(32)
        loss = loss_fn(predictor(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    predictor.eval()
    images, targets = batch(400)
    with torch.no_grad():
        probs = predictor.probabilities(images)
    bright_acc = ((probs["bright"][:, 0] > 0.5).float() == targets["bright"]).float().mean().item()
    level_acc = (probs["level"].argmax(-1) == targets["level"]).float().mean().item()
    assert bright_acc > 0.95 and level_acc > 0.95, (bright_acc, level_acc)
