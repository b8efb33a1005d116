"""timm's StarNet ("Rewrite the Stars", CVPR 2024) on every backend.

A StarNet block runs a depthwise 7x7 conv, two 1x1 convs ``f1``, ``f2`` and multiplies them site by
site, ``relu6(f1(x)) * f2(x)`` (the "star" operation), then a 1x1 conv, a second depthwise conv and
a residual add. Both factors are maps of the same active sites, so their product is too, and masked
sites stay 0 (:meth:`~spark_sparse.features.FeatureMap.__mul__`); the rest is convs, BatchNorm and
ReLU6 that the backends convert. ``f1``, ``f2`` and the second depthwise conv have a bias and no
BatchNorm: it is added at active sites only, as every conv's bias here.

Default drop path 0 (SparK's default for small nets), densify norm BatchNorm.
"""
from __future__ import annotations

from timm.models.starnet import Block, ConvBN, StarNet

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (StarNet, Block, ConvBN):
    register_container(_composite)

register_timm_encoder("starnet_s1", 0.0, densify_norm="bn", tested=True)
