"""timm's ConvNeXts (V1 and V2): their block as a layer every backend runs.

Default drop-path rates are SparK's (``pretrain/models/__init__.py``); ConvNeXt-T, which SparK never
pre-trained, uses 0.1 (the ConvNeXt paper's rate for that size), and so does ConvNeXt-V2-T. SparK
densifies ConvNeXt features with a channels-first LayerNorm.

The block's MLP runs per site (Linear layers on each active site's channel vector) except
ConvNeXt-V2's ``GlobalResponseNormMlp``, whose GRN normalises by each image's L2 norm over its
active sites (:class:`~spark_sparse.backends.norms.FeatureGlobalResponseNorm`), and the 1x1-conv MLPs
of the small ConvNeXts (``conv_mlp=True``: atto ... nano), which run as converted layers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import ConvMlp, GluMlp, Mlp
from timm.layers.mlp import GlobalResponseNormMlp
from timm.models.convnext import ConvNeXt, ConvNeXtBlock, ConvNeXtStage

from ..backends import UnsupportedModuleError, register_container, register_converter
from ..backends.common import LastDimensionLayer
from ..backends.norms import FeatureGlobalResponseNorm
from ..features import ChannelsLastView, FeatureMap
from .timm_encoders import register_timm_encoder

__all__ = ["FeatureConvNeXtBlock", "FeatureGlobalResponseNormMlp"]

# Mlp and ConvMlp only call their children (Linear or 1x1 conv, act, drop, norm): as converted layers
# they are exact on feature maps too (the small ConvNeXts' conv_mlp=True blocks use them so)
for _composite in (ConvNeXtStage, ConvNeXt, Mlp, ConvMlp):
    register_container(_composite)

#: MLPs that are functions of each site's channel vector alone (exact types)
PER_SITE_MLPS = (Mlp, GluMlp)


@register_converter(GlobalResponseNormMlp)
class FeatureGlobalResponseNormMlp(LastDimensionLayer, nn.Module):
    """timm's ``GlobalResponseNormMlp`` on a feature map: ``fc1 -> act -> drop1``, the GRN per image over
    active sites, ``fc2 -> drop2``. Same children and parameter names.

    With Linear layers (channels last) the parts around the GRN run per site, as one function of each
    site's channel vector, on a map or its channels-last view (a view only under a user's forward:
    :class:`LastDimensionLayer`); with 1x1 convs (``use_conv=True``) every child is converted like any layer.
    """

    def __init__(self, backend, mlp: GlobalResponseNormMlp, name: str):
        super().__init__()
        self.per_site = isinstance(mlp.fc1, nn.Linear)
        for child in ("fc1", "act", "drop1", "fc2", "drop2"):
            module = getattr(mlp, child)
            setattr(self, child, module if self.per_site else backend.convert_module(module, f"{name}.{child}"))
        if self.per_site:
            backend.adapt_per_site_module(self)      # e.g. Linear -> RowLinear on the sparse backend
        self.grn = FeatureGlobalResponseNorm.from_dense(backend, mlp.grn, f"{name}.grn")
        self.train(mlp.training)

    def forward(self, x: FeatureMap) -> FeatureMap:
        if not self.per_site:
            return self.drop2(self.fc2(self.grn(self.drop1(self.act(self.fc1(x))))))
        self.check_layout(x, "GlobalResponseNormMlp")
        x = x.per_site(lambda v: self.drop1(self.act(self.fc1(v))))
        return self.grn(x).per_site(lambda v: self.drop2(self.fc2(v)))


@register_converter(ConvNeXtBlock)
class FeatureConvNeXtBlock(nn.Module):
    """timm's ``ConvNeXtBlock`` on a feature map, same children and parameter names.

    SparK masks the block's branch before the residual add; :meth:`FeatureMap.per_site` does that
    for the dense representation (a Linear's bias would otherwise leak into masked sites).
    """

    def __init__(self, backend, block: ConvNeXtBlock, name: str):
        super().__init__()
        self.conv_dw = backend.convert_module(block.conv_dw, f"{name}.conv_dw")
        self.norm = backend.convert_module(block.norm, f"{name}.norm")
        self.norm_channels_last = not block.use_conv_mlp    # timm permutes to NHWC before the norm then
        if block.use_conv_mlp or type(block.mlp) is GlobalResponseNormMlp:
            # a layer on the feature map (1x1 convs, or the GRN's per-image statistics)
            self.mlp = backend.convert_module(block.mlp, f"{name}.mlp")
            self.mlp_per_site = False
        elif type(block.mlp) in PER_SITE_MLPS:
            self.mlp = backend.adapt_per_site_module(block.mlp)
            self.mlp_per_site = True
        else:
            raise UnsupportedModuleError(
                f"backend {backend.name!r} cannot convert {name}.mlp of type {type(block.mlp).__qualname__}: only "
                f"{', '.join(t.__name__ for t in PER_SITE_MLPS + (GlobalResponseNormMlp,))} are known")
        self.gamma = block.gamma
        self.shortcut = backend.convert_module(block.shortcut, f"{name}.shortcut")
        self.drop_path = backend.convert_module(block.drop_path, f"{name}.drop_path")
        self.train(block.training)

    def _scale(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.gamma is None else v * self.gamma

    def forward(self, x: FeatureMap) -> FeatureMap:
        shortcut = x
        x = self.conv_dw(x)
        x = self.norm(ChannelsLastView(x)).channels_first if self.norm_channels_last else self.norm(x)
        if self.mlp_per_site:
            x = x.per_site(lambda v: self._scale(self.mlp(v)))
        elif self.gamma is not None:
            x = self.mlp(x).per_site(self._scale)
        else:
            x = self.mlp(x)
        return self.drop_path(x) + self.shortcut(shortcut)


for _name, _dp, _tested in (("convnext_tiny", 0.1, True), ("convnext_small", 0.2, False), ("convnext_base", 0.3, False),
                            ("convnext_large", 0.4, False), ("convnextv2_tiny", 0.1, True)):
    register_timm_encoder(_name, _dp, densify_norm="ln", tested=_tested)
