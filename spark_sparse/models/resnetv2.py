"""timm's pre-activation ResNet-V2s (BiT): their blocks on every backend.

BiT models use ``StdConv2d`` (weight standardisation, then the backend's conv:
:mod:`~spark_sparse.backends.conv_weights`), ``GroupNormAct`` (statistics per image and group over
active sites: :mod:`~spark_sparse.backends.norms`) and a "fixed SAME" stem that zero-pads before its
max-pool (folded into one :class:`~spark_sparse.backends.pools.ConstantPadMaxPool2d` by the encoder).
The hierarchical forward asks timm for ``norm=True``: the deepest feature map passes through the
final ``GroupNormAct``, as in the model's ``forward_features``.

Default drop path 0.05 (ResNet-50's in SparK); densify norm BatchNorm.
"""
from __future__ import annotations

from timm.models.resnetv2 import (Bottleneck, DownsampleAvg, DownsampleConv, PreActBasic, PreActBottleneck,
                                  ResNetStage, ResNetV2)

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (ResNetV2, ResNetStage, PreActBasic, PreActBottleneck, Bottleneck, DownsampleConv, DownsampleAvg):
    register_container(_composite)

register_timm_encoder("resnetv2_50x1_bit", 0.05, densify_norm="bn", tested=True)
