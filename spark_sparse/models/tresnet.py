"""timm's TResNet (``tresnet_m/l/xl`` and ``tresnet_v2_l``) on every backend.

Its stem is a space-to-depth rearrangement (each 4x4 block of the image becomes one stride-4 site of
48 channels; :mod:`spark_sparse.backends.space_to_depth`) and a 3x3 ``ConvNormAct``. The blocks are
ResNet basic blocks and bottlenecks of ``ConvNormAct`` layers with leaky ReLU, an ``SEModule`` (its
squeeze over each image's active sites), anti-aliased downsampling (a stride-1 conv, then a 3x3 blur
pool at stride 2 with reflect padding) and ResNet-D shortcuts (2x2 average pool, then a 1x1 conv): all
layers every backend converts, so the blocks and the model are containers.

Default drop path 0.05 (``tresnet_m`` is ResNet-50-sized; the larger ones take the same), densify norm
BatchNorm.
"""
from __future__ import annotations

from timm.models.tresnet import BasicBlock, Bottleneck, TResNet

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (TResNet, BasicBlock, Bottleneck):
    register_container(_composite)

register_timm_encoder("tresnet_m", 0.05, densify_norm="bn", tested=True)
