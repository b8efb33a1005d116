"""timm's InceptionNeXt (MetaNeXt blocks) on every backend.

A MetaNeXt block is ConvNeXt's with an Inception token mixer: the channels split into four groups
(``torch.split(..., dim=1)``), three of them convolved depthwise with a square ``k x k`` and two band
kernels (``1 x K`` and ``K x 1``: non-square kernels, which every backend's convs take), the fourth
kept, and the four concatenated; then BatchNorm, a 1x1-conv MLP, the layer scale
``x.mul(gamma.reshape(1, -1, 1, 1))`` (a per-channel factor, see
:meth:`~spark_sparse.features.FeatureMap.__mul__`), drop path and the residual add. All of it runs
on feature maps, so the blocks, stages and net are containers.

Default drop path 0.1 (ConvNeXt-T's SparK rate, same size), densify norm BatchNorm (the blocks'
own norm).
"""
from __future__ import annotations

from timm.models.inception_next import ConvMlp, InceptionDWConv2d, MetaNeXt, MetaNeXtBlock, MetaNeXtStage

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (MetaNeXt, MetaNeXtStage, MetaNeXtBlock, InceptionDWConv2d, ConvMlp):
    register_container(_composite)

register_timm_encoder("inception_next_tiny", 0.1, densify_norm="bn", tested=True)
