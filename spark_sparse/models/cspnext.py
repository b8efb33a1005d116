"""timm's CSPNeXt (RTMDet's backbone) on every backend.

CSPNeXt concatenates its main and short branches (``torch.cat(..., dim=1)``: both hold the same
active sites, exact on every backend), gates them with timm's ``EffectiveSEModule`` (squeeze over
each image's active sites), and ends with an SPP block: 5x5, 9x9 and 13x13 stride-1 max-pools of one
map, concatenated (masked sites count as 0 in each window, padding never wins: ``nn.MaxPool2d``'s
semantics). The rest is ``ConvNormAct`` layers and depthwise-separable convs: containers all.

Default drop path 0 (SparK's default for small nets), densify norm BatchNorm.
"""
from __future__ import annotations

from timm.models.cspnext import CspNext, CspNextBlock, CspNextLayer, DepthwiseSeparableConv, SPPBottleneck

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (CspNext, CspNextLayer, CspNextBlock, DepthwiseSeparableConv, SPPBottleneck):
    register_container(_composite)

register_timm_encoder("cspnext_tiny", 0.0, densify_norm="bn", tested=True)
