"""timm's PP-LCNet-V2 trained in its branched (re-parameterisable) form, on every backend.

``RepDepthwiseSeparable`` sums depthwise convs of several kernel sizes (maps of the same active
sites), then SE (a squeeze over each image's active sites), a pointwise conv and a shortcut:
containers all. The fused inference form is not used while pre-training (timm's
``reparameterize()`` runs after it, on the plain timm model the checkpoint loads into).

Default drop path 0 (SparK's default for small nets), densify norm BatchNorm.
"""
from __future__ import annotations

from timm.models.lcnetv2 import LCNetV2, RepDepthwiseSeparable

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (LCNetV2, RepDepthwiseSeparable):
    register_container(_composite)

register_timm_encoder("lcnetv2_small", 0.0, densify_norm="bn", tested=True)
