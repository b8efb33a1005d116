"""timm's DLA (Deep Layer Aggregation) on every backend: its trees are containers.

A ``DlaTree`` max-pools its input to the tree's stride (``MaxPool2d(s, s)``), projects it with a
1x1 conv where channels change, runs its two subtrees (or blocks) and joins their outputs and the
tree's earlier children in a ``DlaRoot``: ``torch.cat(children, 1)``, a 1x1 conv, BatchNorm, an
optional residual ``+=``, ReLU. Every join is of maps at one resolution (the downsampling happens
before it), so the concatenation is exact on every backend (:class:`~spark_sparse.features.FeatureMap`);
the blocks (``DlaBasic``, ``DlaBottleneck``, ``DlaBottle2neck``: ResNet's and Res2Net's) are
compositions of convs, BatchNorms, ReLUs, adds, channel splits and one average pool.

DLA has no drop path (timm's constructor takes no ``drop_path_rate``: a drop path is refused at
creation, "pre-train it with --dp 0"). Features at strides 4..32 are timm's ``feature_info``
levels 2..5. Densify norm BatchNorm.
"""
from __future__ import annotations

from timm.models.dla import DLA, DlaBasic, DlaBottle2neck, DlaBottleneck, DlaRoot, DlaTree

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (DLA, DlaTree, DlaRoot, DlaBasic, DlaBottleneck, DlaBottle2neck):
    register_container(_composite)

register_timm_encoder("dla34", 0.0, densify_norm="bn", tested=True)
