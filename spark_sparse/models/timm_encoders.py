"""timm's ResNets and ConvNeXts as SparK encoders.

The timm model itself is kept (``self.model``), created with ``pretrained=False`` and
``num_classes=0``, so parameter names are timm's and :meth:`timm_state_dict` loads into
``timm.create_model(name, num_classes=0)`` with ``strict=True``. Only the hierarchical forward is
ours: it returns the four stage outputs (strides 4, 8, 16, 32), finest first, like SparK's.
Default drop-path rates are SparK's (``pretrain/models/__init__.py``); for models SparK never
pre-trained: ResNet-18/34 use 0 (like SparK's ``--dp`` default) and ConvNeXt-T uses 0.1 (the
ConvNeXt paper's rate for that size).
"""
from __future__ import annotations

import timm
import torch.nn as nn

from .registry import register_model

__all__ = ["TimmResNetEncoder", "TimmConvNeXtEncoder"]


class _TimmEncoder(nn.Module):
    timm_name: str
    head_modules: tuple[str, ...] = ()

    def __init__(self, timm_name: str, drop_path_rate: float = 0.0, **kwargs):
        super().__init__()
        self.timm_name = timm_name
        self.model = timm.create_model(timm_name, pretrained=False, num_classes=0,
                                       drop_path_rate=drop_path_rate, **kwargs)

    def get_downsample_ratio(self) -> int:
        return 32

    def get_feature_map_channels(self) -> list[int]:
        return [info["num_chs"] for info in self.model.feature_info if info["reduction"] >= 4]

    def modules_outside_hierarchy(self) -> list[str]:
        """Heads the hierarchical forward never calls: backends leave them as they are."""
        return [f"model.{name}" for name in self.head_modules]

    def timm_state_dict(self) -> dict:
        """Weights as ``timm.create_model(self.timm_name, num_classes=0)`` names them."""
        return self.model.state_dict()

    def load_timm_state_dict(self, state: dict, strict: bool = True):
        return self.model.load_state_dict(state, strict=strict)


class TimmResNetEncoder(_TimmEncoder):
    head_modules = ("global_pool", "fc")
    densify_norm = "bn"

    def forward(self, x, hierarchical: bool = True) -> list:
        m = self.model
        x = m.maxpool(m.act1(m.bn1(m.conv1(x))))
        features = []
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            x = layer(x)
            features.append(x)
        return features if hierarchical else features[-1]


class TimmConvNeXtEncoder(_TimmEncoder):
    head_modules = ("norm_pre", "head")
    densify_norm = "ln"   # SparK densifies ConvNeXt features with a channels-first LayerNorm

    def forward(self, x, hierarchical: bool = True) -> list:
        m = self.model
        x = m.stem(x)
        features = []
        for stage in m.stages:
            x = stage(x)
            features.append(x)
        return features if hierarchical else features[-1]


def _register(name: str, cls: type, drop_path: float) -> None:
    def factory(drop_path_rate: float = drop_path, **kwargs) -> nn.Module:
        return cls(name, drop_path_rate=drop_path_rate, **kwargs)
    factory.__name__ = name
    factory.__doc__ = f"timm ``{name}`` as a SparK encoder (SparK's default drop-path {drop_path})."
    register_model(name, default_drop_path=drop_path)(factory)


for _name, _dp in {"resnet18": 0.0, "resnet34": 0.0, "resnet50": 0.05, "resnet101": 0.08,
                   "resnet152": 0.10, "resnet200": 0.15}.items():
    _register(_name, TimmResNetEncoder, _dp)
for _name, _dp in {"convnext_tiny": 0.1, "convnext_small": 0.2, "convnext_base": 0.3, "convnext_large": 0.4}.items():
    _register(_name, TimmConvNeXtEncoder, _dp)
