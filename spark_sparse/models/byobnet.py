"""timm's ByobNet ("bring your own blocks"): GENet, RepVGG, RegNetZ, the ``*ts`` / ``*q`` ResNets.

ByobNet assembles nets from a few residual blocks (``BasicBlock``, ``BottleneckBlock``,
``DarkBlock``, ``EdgeBlock``, ``RepVggBlock``, ``MobileOneBlock``) whose forward calls ``ConvNormAct``
layers, optional attention, the shortcut (identity, ``ConvNormAct`` or ``DownsampleAvg``: ResNet-D's
average pool + 1x1 conv) and adds: containers all, as are its stems. RepVGG's training-time block
adds a kxk branch, a 1x1 branch and a BatchNorm of the input, each a converted layer (a
re-parameterised block, ``reparam_conv``, is one plain conv and converts too); MobileOne's block
does the same over k branches, starting its sums from the number 0 (which feature maps add
exactly).

Not registered, so it fails at conversion naming the module: ``SelfAttnBlock`` (BoTNet / HaloNet
self-attention: its attention layers are not supported). Attention layers a config may choose (SE,
ECA, GCNet's global context supported; CBAM, selective kernel not) are converted or refused one by
one.

Default drop path: ResNet-50's 0.05 for the ResNets ``resnet33ts`` and ``gcresnet33ts``, 0 for
GENet, RepVGG and RegNetZ (SparK's ``--dp`` default); densify norm BatchNorm.
"""
from __future__ import annotations

from timm.models.byobnet import (BasicBlock, BottleneckBlock, ByobNet, DarkBlock, DownsampleAvg, EdgeBlock,
                                 MobileOneBlock, RepVggBlock, Stem)

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (ByobNet, Stem, BasicBlock, BottleneckBlock, DarkBlock, EdgeBlock, RepVggBlock, MobileOneBlock,
                   DownsampleAvg):
    register_container(_composite)

#: name -> SparK-style default drop path
_BYOBNETS = {"gernet_m": 0.0, "repvgg_a2": 0.0, "regnetz_c16": 0.0, "resnet33ts": 0.05, "gcresnet33ts": 0.05}
for _name, _dp in _BYOBNETS.items():
    register_timm_encoder(_name, _dp, densify_norm="bn", tested=True)
