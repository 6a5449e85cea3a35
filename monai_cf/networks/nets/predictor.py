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
"""Attribute predictors ``q(pa | x)`` (their loss, :class:`~monai_cf.losses.AttributeLoss`, is in ``losses``).

An :class:`AttributePredictor` is an image backbone (a small CNN of MONAI ``Convolution`` blocks for small
images, or a MONAI ``ResNet``/``DenseNet``) with one linear head per attribute. Counterfactual fine-tuning
uses one as the *guidance* predictor; an independently trained one is the *evaluation* predictor behind
every reported metric, and its :meth:`~AttributePredictor.features` feed the embedding-shift and FID metrics.

Head outputs, in the encoded units of :class:`~monai_cf.data.AttributeEncoder`:

- binary: one logit ``(B, 1)``;
- categorical: ``K`` logits ``(B, K)``;
- continuous: ``(B, 2)``, the mean and the log standard deviation of a Gaussian over the ``[-1, 1]`` value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import monai.networks.nets as monai_nets
import torch
from monai.networks.blocks import Convolution
from monai.networks.layers import Pool
from torch import nn

from monai_cf.graph import AttributeKind, CausalGraph
from monai_cf.losses.attribute import AttributeLoss, attribute_head_dim, supervised_attributes

__all__ = ["SmallCNN", "AttributePredictor", "AttributeLoss", "PREDICTOR_BACKBONES"]  # AttributeLoss: monai_cf.losses

_RESNETS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101")
_DENSENETS = ("densenet121", "densenet169", "densenet201")

#: Backbone names :class:`AttributePredictor` accepts.
PREDICTOR_BACKBONES = ("small_cnn",) + _RESNETS + _DENSENETS


class SmallCNN(nn.Module):
    """A compact convolutional feature extractor for small 2D/3D images.

    Each stage is two 3x3 MONAI ``Convolution`` blocks (norm, activation); every stage but the first starts
    with a stride-2 convolution. Global average pooling gives a ``(B, channels[-1])`` embedding.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        channels: widths of the stages.
        act: activation (MONAI ``Act`` name or ``(name, args)``).
        norm: normalisation (MONAI ``Norm`` name or ``(name, args)``).

    Example::

        net = SmallCNN(spatial_dims=2, in_channels=1)
        net(torch.zeros(4, 1, 64, 64)).shape  # torch.Size([4, 128])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int] = (16, 32, 64, 128),
        act: str | tuple = "relu",
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if not channels:
            raise ValueError("SmallCNN needs at least one stage in channels.")
        layers: list[nn.Module] = []
        width = in_channels
        for stage, out in enumerate(channels):
            for strides in (1 if stage == 0 else 2, 1):
                layers.append(
                    Convolution(spatial_dims, width, int(out), strides=strides, kernel_size=3, act=act, norm=norm)
                )
                width = int(out)
        self.features = nn.Sequential(*layers)
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


def _build_backbone(
    name: str, spatial_dims: int, in_channels: int, channels: Sequence[int], act, norm, kwargs: dict
) -> tuple[nn.Module, int]:
    if name == "small_cnn":
        net = SmallCNN(spatial_dims, in_channels, channels=channels, act=act, norm=norm, **kwargs)
        return net, net.num_features
    if name in _RESNETS:
        net = getattr(monai_nets, name)(
            spatial_dims=spatial_dims, n_input_channels=in_channels, feed_forward=False, **kwargs
        )
        return net, int(net.in_planes)
    if name in _DENSENETS:
        net = getattr(monai_nets, name.replace("densenet", "DenseNet"))(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1, **kwargs
        )
        num_features = int(net.class_layers.out.in_features)
        net.class_layers.out = nn.Identity()  # keep MONAI's final activation + pooling, drop its classifier
        return net, num_features
    raise ValueError(f"Unknown predictor backbone '{name}'; available: {list(PREDICTOR_BACKBONES)}.")


class AttributePredictor(nn.Module):
    """An image backbone with one head per attribute of a causal graph.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        graph: a :class:`~monai_cf.graph.CausalGraph` or anything :meth:`CausalGraph.build` accepts.
        attributes: the attributes to predict (default: the image's parents). Unknown names raise
            ``ValueError``.
        backbone: ``"small_cnn"``, one of MONAI's ``"resnet10"``... ``"resnet101"`` or ``"densenet121"``,
            ``"densenet169"``, ``"densenet201"`` (see ``PREDICTOR_BACKBONES``), or an ``nn.Module`` mapping
            ``(B, C, *spatial)`` to ``(B, num_features)``.
        num_features: the embedding width of a custom ``backbone`` module (ignored for named backbones).
        channels: stage widths of ``"small_cnn"``.
        act: activation of ``"small_cnn"``.
        norm: normalisation of ``"small_cnn"``.
        dropout: dropout probability on the embedding before the heads.
        backbone_kwargs: extra arguments of the named backbone, e.g. ``{"dropout_prob": 0.2}`` for a DenseNet
            or ``{"conv1_t_stride": 2}`` for a ResNet.

    Example::

        predictor = AttributePredictor(spatial_dims=2, in_channels=1, graph="mimic_cxr")
        out = predictor(torch.zeros(4, 1, 64, 64))
        {k: tuple(v.shape) for k, v in out.items()}
        # {'sex': (4, 1), 'race': (4, 3), 'age': (4, 2), 'disease': (4, 1)}
        predictor.features(torch.zeros(4, 1, 64, 64)).shape  # torch.Size([4, 128])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        graph: CausalGraph | Mapping | str,
        attributes: Sequence[str] | None = None,
        backbone: str | nn.Module = "small_cnn",
        num_features: int | None = None,
        channels: Sequence[int] = (16, 32, 64, 128),
        act: str | tuple = "relu",
        norm: str | tuple = "batch",
        dropout: float = 0.0,
        backbone_kwargs: Mapping | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.spatial_dims = spatial_dims
        self.graph = CausalGraph.build(graph)
        self.attributes = supervised_attributes(self.graph, attributes)
        if isinstance(backbone, nn.Module):
            if num_features is None:
                raise ValueError("A custom backbone module needs num_features (its embedding width).")
            self.backbone, self.num_features = backbone, int(num_features)
        else:
            self.backbone, self.num_features = _build_backbone(
                str(backbone).lower(), spatial_dims, in_channels, channels, act, norm, dict(backbone_kwargs or {})
            )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.heads = nn.ModuleDict(
            {n: nn.Linear(self.num_features, attribute_head_dim(self.graph, n)) for n in self.attributes}
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate embedding ``(B, num_features)`` (for PCA embedding shift and FID)."""
        return self.backbone(x)

    def heads_from_features(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Apply the heads to an embedding from :meth:`features`."""
        features = self.dropout(features)
        return {name: head(features) for name, head in self.heads.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw head outputs per attribute: logits, or (mean, log std) for continuous attributes."""
        return self.heads_from_features(self.features(x))

    def to_probabilities(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Head outputs -> sigmoid ``(B, 1)``, softmax ``(B, K)`` or the mean ``(B, 1)`` in encoded units."""
        probs = {}
        for name in self.attributes:
            out = outputs[name]
            kind = self.graph[name].kind
            if kind == AttributeKind.BINARY:
                probs[name] = torch.sigmoid(out)
            elif kind == AttributeKind.CATEGORICAL:
                probs[name] = torch.softmax(out, dim=-1)
            else:
                probs[name] = out[:, :1]
        return probs

    def probabilities(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per attribute: sigmoid / softmax probabilities, or the predicted mean of a continuous attribute."""
        return self.to_probabilities(self(x))
