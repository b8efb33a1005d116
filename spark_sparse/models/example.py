"""A worked example of the custom encoder contract: a small VGG-style CNN.

Copy this file to pre-train your own backbone with SparK on any backend:

1. the encoder returns feature maps finest first, each stage halving the resolution, the last at
   ``get_downsample_ratio()`` (the patch size, a power of two, usually 32);
2. ``forward`` only calls child modules, adds their outputs and concatenates, splits or slices
   channels (``torch.cat`` / ``.split`` / ``.chunk`` / ``x[:, a:b]`` along ``dim=1``), and may view
   the map channels last (``x.permute(0, 2, 3, 1)``, and back with ``x.permute(0, 3, 1, 2)``); no
   other tensor methods such as ``.mean`` on the running features, so a backend can swap each module
   for its sparse version; composite blocks are declared with ``@register_container``;
3. layers are those the backends know: Conv2d, BatchNorm2d, timm's LayerNorm2d on the map,
   ``nn.LayerNorm`` and Linear on the channels-last view (on the NCHW map they would act on its width:
   refused), MaxPool2d, AvgPool2d, zero-preserving activations (ReLU, GELU, SiLU, ...), Dropout, timm's
   DropPath.

Then ``spark_sparse.create_spark("tiny_cnn")`` works, and ``spark-pretrain --model=tiny_cnn``; from a copy
in your own project (registered as, say, ``my_cnn``), ``spark-pretrain --import_module=my_models.py
--model=my_cnn`` (the module is imported first, so its registrations exist).
"""
from __future__ import annotations

import torch.nn as nn
from timm.layers import DropPath

from ..backends.base import register_container
from .registry import register_model

__all__ = ["TinyCNN", "ConvBNAct"]


@register_container
class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@register_container
class ResidualPair(nn.Module):
    """Two convs with an identity shortcut: shows that ``+`` and DropPath work on every backend."""

    def __init__(self, channels: int, drop_path_rate: float = 0.0):
        super().__init__()
        self.first = ConvBNAct(channels, channels)
        self.second = ConvBNAct(channels, channels)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x):
        return self.drop_path(self.second(self.first(x))) + x


@register_container
class TinyCNN(nn.Module):
    """Five stride-2 stages (stem /2, then /4 ... /32); feature maps at strides 4, 8, 16, 32."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), drop_path_rate: float = 0.0):
        super().__init__()
        self.widths = list(widths)
        self.stem = ConvBNAct(3, widths[0], stride=2)
        stages, cin = [], widths[0]
        for cout in widths:
            stages.append(nn.Sequential(ConvBNAct(cin, cout, stride=2), ResidualPair(cout, drop_path_rate)))
            cin = cout
        self.stages = nn.ModuleList(stages)

    def get_downsample_ratio(self) -> int:
        return 32

    def get_feature_map_channels(self) -> list[int]:
        return list(self.widths)

    def forward(self, x, hierarchical: bool = True):
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features if hierarchical else features[-1]


@register_model("tiny_cnn")
def tiny_cnn(drop_path_rate: float = 0.0, **kwargs) -> TinyCNN:
    return TinyCNN(drop_path_rate=drop_path_rate, **kwargs)
