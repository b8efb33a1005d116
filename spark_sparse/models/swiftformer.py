"""timm's SwiftFormer (ICCV 2023: "Efficient Additive Attention for Transformer-based Real-time Mobile
Vision Applications") on every backend.

The stem, the downsampling ``Embedding``, the ``ConvEncoder`` blocks, the local representation, the
MLP and the layer scales are convolutions, BatchNorm and per-channel products: containers. The last
block of every stage adds ``EfficientAdditiveAttention``, which mixes the whole image through one
global query vector per image:

    q, k = L2-normalised (over channels) Linear projections of each token
    a = normalise over the image's TOKENS (q . w_g / sqrt(d))
    g = sum over tokens of a * q                                  (one vector per image)
    out = final(proj(g * k) + q)

In SparK's masked model a Linear's output is 0 at masked sites, so masked tokens have ``q = k = 0``:
they add nothing to the norm over tokens or to ``g``, and receive ``proj``'s and ``final``'s bias,
which the mask removes. The attention over the image is therefore the attention over its ACTIVE
tokens, which :class:`FeatureEfficientAdditiveAttention` computes on rows with per-image index-adds.

Default drop path 0 (no SparK rate is known for the family; pass one with ``--dp``), densify norm
BatchNorm (the net's own).
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from timm.models.swiftformer import (Block, ConvEncoder, EfficientAdditiveAttention, Embedding, LayerScale2d,
                                     LocalRepresentation, Mlp, Stage, SwiftFormer)

from ..backends import register_container, register_converter
from ..backends.common import adopt_module
from ..backends.per_image import normalize_per_image, sum_per_image
from ..features import FeatureMap
from .timm_encoders import register_timm_encoder

__all__ = ["FeatureEfficientAdditiveAttention"]

for _composite in (SwiftFormer, Stage, Embedding, ConvEncoder, LocalRepresentation, Block, Mlp, LayerScale2d):
    register_container(_composite)


@register_converter(EfficientAdditiveAttention)
class FeatureEfficientAdditiveAttention(nn.Module):
    """timm's ``EfficientAdditiveAttention`` on the active rows of each image. The same children, names
    and parameters; its Linear layers act on rows as they act on timm's tokens, so none is converted."""

    def __init__(self, backend, attention: EfficientAdditiveAttention, name: str = ""):
        super().__init__()
        adopt_module(self, attention)
        self.scale_factor = attention.scale_factor

    def forward(self, x: FeatureMap) -> FeatureMap:
        rows = x.active_rows()                                                # [N, C]
        image_of_row = x.mask.coords_at(x.stride)[:, 0]
        batch = x.mask.batch_size
        query = F.normalize(self.to_query(rows), dim=-1)
        key = F.normalize(self.to_key(rows), dim=-1)
        score = normalize_per_image(query @ self.w_g * self.scale_factor, image_of_row, batch)   # [N, 1]
        context = sum_per_image(score * query, image_of_row, batch)                             # [B, D]
        out = self.proj(context.index_select(0, image_of_row) * key) + query
        return x.with_active_rows(self.final(out))


register_timm_encoder("swiftformer_xs", 0.0, densify_norm="bn", tested=True)
