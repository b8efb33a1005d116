"""timm's ConvNeXts: the SparK encoder, and its block as a layer every backend runs.

Default drop-path rates are SparK's (``pretrain/models/__init__.py``); ConvNeXt-T, which SparK never
pre-trained, uses 0.1 (the ConvNeXt paper's rate for that size).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.convnext import ConvNeXt, ConvNeXtBlock, ConvNeXtStage

from ..backends import register_container, register_converter
from ..features import FeatureMap
from .timm_encoders import TimmEncoder, register_timm_encoder

__all__ = ["TimmConvNeXtEncoder", "FeatureConvNeXtBlock"]

for _composite in (ConvNeXtStage, ConvNeXt):
    register_container(_composite)


@register_converter(ConvNeXtBlock)
class FeatureConvNeXtBlock(nn.Module):
    """timm's ``ConvNeXtBlock`` on a feature map, same children and parameter names.

    SparK masks the block's branch before the residual add; :meth:`FeatureMap.per_site` does that
    for the dense representation (a Linear's bias would otherwise leak into masked sites).
    """

    def __init__(self, backend, block: ConvNeXtBlock, name: str):
        super().__init__()
        if block.use_conv_mlp:
            raise NotImplementedError(f"{name}: ConvNeXt blocks with conv_mlp=True are not supported yet")
        self.conv_dw = backend.convert_module(block.conv_dw, f"{name}.conv_dw")
        self.norm = backend.convert_module(block.norm, f"{name}.norm")
        self.mlp = backend.adapt_per_site_module(block.mlp)
        self.gamma = block.gamma
        self.shortcut = backend.convert_module(block.shortcut, f"{name}.shortcut")
        self.drop_path = backend.convert_module(block.drop_path, f"{name}.drop_path")
        self.train(block.training)

    def _branch(self, v: torch.Tensor) -> torch.Tensor:
        v = self.mlp(v)
        return v if self.gamma is None else v * self.gamma

    def forward(self, x: FeatureMap) -> FeatureMap:
        shortcut = x
        x = self.conv_dw(x)
        x = self.norm(x)
        x = x.per_site(self._branch)
        return self.drop_path(x) + self.shortcut(shortcut)


class TimmConvNeXtEncoder(TimmEncoder):
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


for _name, _dp in {"convnext_tiny": 0.1, "convnext_small": 0.2, "convnext_base": 0.3, "convnext_large": 0.4}.items():
    register_timm_encoder(_name, TimmConvNeXtEncoder, _dp)
