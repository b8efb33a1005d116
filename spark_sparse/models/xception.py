"""timm's aligned Xception (``xception41/65/71`` and the pre-activation ``xception41p/65p``) on every backend.

Its modules are a separable conv (depthwise 3x3, BatchNorm, activation, 1x1, BatchNorm, activation;
the pre-activation variant normalises first) and blocks of three of them with a residual add (a
strided 1x1 conv and BatchNorm on the shortcut where the block downsamples): compositions of layers
every backend converts, so they are containers. timm's ``forward_intermediates`` takes features
inside each strided block (``forward_with_tap``), which composes the same children.

Default drop path 0.05 (ResNet-50-sized and larger), densify norm BatchNorm.
"""
from __future__ import annotations

from timm.models.xception_aligned import (PreSeparableConv2d, PreXceptionModule, SeparableConv2d, XceptionAligned,
                                          XceptionModule)

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (XceptionAligned, XceptionModule, PreXceptionModule, SeparableConv2d, PreSeparableConv2d):
    register_container(_composite)

register_timm_encoder("xception41", 0.05, densify_norm="bn", tested=True)
