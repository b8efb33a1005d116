"""timm's RDNet on every backend.

RDNet concatenates every earlier block's output into each block's input, as DenseNet
(``torch.cat(..., 1)``: every group holds the same active sites, exact on every backend); its blocks
(LayerNorm, GELU, eSE, a per-channel ``gamma``) are layers the backends convert. Its
``proj_drop_rate`` (``F.dropout`` inside its layers) is refused on the first training forward.

RDNet is a LayerNorm net of ConvNeXt-T's size: default drop path 0.1 and densify norm LayerNorm, as
SparK's ConvNeXt-T.
"""
from __future__ import annotations

from timm.models.rdnet import Block as RDNetBlock
from timm.models.rdnet import BlockESE as RDNetBlockESE
from timm.models.rdnet import DenseBlock as RDNetDenseBlock
from timm.models.rdnet import RDNet, DenseStage

from ..backends import register_container
from .timm_encoders import register_timm_encoder

__all__ = []

for _composite in (RDNet, DenseStage, RDNetDenseBlock, RDNetBlock, RDNetBlockESE):
    register_container(_composite)

register_timm_encoder("rdnet_tiny", 0.1, densify_norm="ln", tested=True)
