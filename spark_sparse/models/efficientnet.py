"""timm's EfficientNets and MobileNet-V3s (``_efficientnet_blocks``): their blocks on every backend.

Their blocks (``DepthwiseSeparableConv``, ``InvertedResidual``, ``ConvBnAct``, EfficientNet-V2's
``EdgeResidual``) only call children and add, so they are containers; their layers are convs (depthwise included), ``BatchNormAct2d`` with
SiLU / ReLU / hard-swish, and the family's own ``SqueezeExcite``, converted here as an
:class:`~spark_sparse.backends.attention.ImageGate`: squeeze over each image's active sites, the
block's own ``conv_reduce -> act1 -> conv_expand -> gate`` on the squeezed vector, gate on features.

Features at strides 4..32 are timm's ``feature_info`` entries at those reductions (the stride-2
block and the ``conv_head`` are not part of the hierarchy). Default drop path 0: SparK pre-trained
no model this small (SparK's ``--dp`` default; ResNet-18/34 use 0 too). Densify norm BatchNorm.
"""
from __future__ import annotations

import torch
from timm.models._efficientnet_blocks import (ConvBnAct, DepthwiseSeparableConv, EdgeResidual, InvertedResidual,
                                              SqueezeExcite)
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3

from ..backends import register_container, register_converter
from ..backends.attention import ImageGate
from .timm_encoders import register_timm_encoder

__all__ = ["FeatureSqueezeExcite"]

for _composite in (EfficientNet, MobileNetV3, DepthwiseSeparableConv, InvertedResidual, ConvBnAct, EdgeResidual):
    register_container(_composite)


class FeatureSqueezeExcite(ImageGate):
    """EfficientNet / MobileNet-V3 ``SqueezeExcite``: ``conv_reduce -> act1 -> conv_expand -> gate``."""

    def excite(self, squeezed: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv_expand(self.act1(self.conv_reduce(squeezed))))


register_converter(SqueezeExcite)(FeatureSqueezeExcite.from_dense)

for _name in ("efficientnet_b0", "mobilenetv3_large_100"):
    register_timm_encoder(_name, 0.0, densify_norm="bn", tested=True)
