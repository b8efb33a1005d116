"""timm's CSPNets (CSP-ResNet, CSP-ResNeXt, CSP-DarkNet, DarkNet, the CS3 nets) on every backend (CSPNeXt: ``cspnext``).

A cross-stage block splits its expanded features into two channel groups, runs blocks on one and
concatenates them back (``x.split(..., dim=1)``, ``torch.cat(..., dim=1)``): both parts hold the same
active sites, so the split and the concatenation are exact on every backend
(:class:`~spark_sparse.features.FeatureMap`). The rest is ``ConvNormAct`` layers (their anti-aliasing
slot ``Identity``, or timm's blur pool, which the backends convert), optional SE / ECA attention,
residual adds and the stem's max-pool: containers all.

Default drop path 0.05 (ResNet-50's SparK rate; these nets are ResNet-50-sized); densify norm
BatchNorm, as every BatchNorm net here.
"""
from __future__ import annotations

from timm.models.cspnet import BottleneckBlock, CrossStage, CrossStage3, CspNet, DarkBlock, DarkStage, EdgeBlock

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (CspNet, CrossStage, CrossStage3, DarkStage, BottleneckBlock, DarkBlock, EdgeBlock):
    register_container(_composite)

for _name in ("cspresnet50", "cspdarknet53"):
    register_timm_encoder(_name, 0.05, densify_norm="bn", tested=True)
