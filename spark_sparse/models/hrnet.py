"""timm's HRNet on every backend: parallel branches at strides 4..32, fused by sums.

Each ``HighResolutionModule`` runs one branch per resolution (ResNet's ``BasicBlock`` /
``Bottleneck``) and then fuses: every output branch is the sum, ReLU'd, of every input branch
brought to its resolution by stride-2 3x3 convs (finer inputs) or by a 1x1 conv, BatchNorm and a
nearest ``nn.Upsample`` (coarser inputs). Nearest upsampling of a patch-masked map is exact on every
backend (:mod:`spark_sparse.backends.upsample`: each fine site copies the coarse site covering it,
and masked sites stay zero), so the modules, the stage transitions and the network pass Python
lists of feature maps around as containers.

The features at strides 4..32 are timm's ``forward_intermediates`` taps: the last stage's branches
through the classification head's ``incre`` blocks (the head's downsampling and final layer are
outside the hierarchy). HRNet has no drop path (a drop path is refused at creation, "pre-train it
with --dp 0"). Densify norm BatchNorm.
"""
from __future__ import annotations

from timm.models.hrnet import HighResolutionModule, HighResolutionNet, SequentialList

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (HighResolutionNet, HighResolutionModule, SequentialList):
    register_container(_composite)

register_timm_encoder("hrnet_w18_small", 0.0, densify_norm="bn", tested=True)
