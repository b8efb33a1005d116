"""timm's CSPNets (CSP-ResNet, CSP-ResNeXt, CSP-DarkNet, DarkNet, the CS3 nets, CSPNeXt) on every backend.

A cross-stage block splits its expanded features into two channel groups, runs blocks on one and
concatenates them back (``x.split(..., dim=1)``, ``torch.cat(..., dim=1)``): both parts hold the same
active sites, so the split and the concatenation are exact on every backend
(:class:`~spark_sparse.features.FeatureMap`). The rest is ``ConvNormAct`` layers (their anti-aliasing
slot ``Identity``, or timm's blur pool, which the backends convert), optional SE / ECA attention,
residual adds and the stem's max-pool: containers all.

CSPNeXt (RTMDet's backbone) concatenates its main and short branches (``torch.cat(..., dim=1)``),
gates them with timm's ``EffectiveSEModule`` (squeeze over each image's active sites), and ends
with an SPP block: 5x5, 9x9 and 13x13 stride-1 max-pools of one map, concatenated (masked sites
count as 0 in each window, padding never wins: ``nn.MaxPool2d``'s semantics).

Default drop path 0.05 (ResNet-50's SparK rate; these nets are ResNet-50-sized), 0 for the small
``cspnext_tiny``; densify norm BatchNorm, as every BatchNorm net here.
"""
from __future__ import annotations

from timm.models.cspnet import BottleneckBlock, CrossStage, CrossStage3, CspNet, DarkBlock, DarkStage, EdgeBlock
from timm.models.cspnext import CspNext, CspNextBlock, CspNextLayer, DepthwiseSeparableConv, SPPBottleneck

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (CspNet, CrossStage, CrossStage3, DarkStage, BottleneckBlock, DarkBlock, EdgeBlock,
                   CspNext, CspNextLayer, CspNextBlock, DepthwiseSeparableConv, SPPBottleneck):
    register_container(_composite)

for _name in ("cspresnet50", "cspdarknet53"):
    register_timm_encoder(_name, 0.05, densify_norm="bn", tested=True)
register_timm_encoder("cspnext_tiny", 0.0, densify_norm="bn", tested=True)
