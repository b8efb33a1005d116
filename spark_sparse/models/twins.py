"""timm's Twins (NeurIPS 2021: "Twins: Revisiting the Design of Spatial Attention in Vision Transformers")
on every backend: Twins-PCPVT and Twins-SVT.

Each stage embeds its input with a non-overlapping strided conv (4x4, then 2x2) and a LayerNorm on the
tokens, the map's channels-last view (the same sites), then runs transformer blocks (LayerNorm, attention,
a Linear MLP) with a positional encoding generator after the first (``PosConv``: a depthwise 3x3 conv on
the map plus the tokens, a conv like any other). The attention is one of:

- global sub-sampled attention (PCPVT's, every other block of SVT's): PVT's spatial-reduction attention,
  each ACTIVE token over keys and values from a conv of kernel = stride = ``sr_ratio`` onto the patch grid,
  at its image's ACTIVE patches alone
  (:class:`~spark_sparse.models.pvt_v2.FeatureSpatialReductionAttention`);
- locally grouped attention (SVT's): softmax attention inside each 7x7 window of the map, each active
  token among its window's active tokens (windows as groups of sites,
  :mod:`~spark_sparse.backends.site_groups`, as DaViT's). timm pads a map whose sides are not multiples of
  the window with zero tokens that take part in the attention: refused at the first forward, naming the
  sizes that tile (multiples of 224, Twins' own).

timm's ``forward_intermediates`` reshapes the token sequences with the dense map's sizes, which a feature
map does not have: :func:`twins_features` runs the same children and returns each stage's channels-last
view as the map it is. With every site visible this is timm's Twins. Default drop path 0.1 (nets of
ResNet-50's size, as DaViT), densify norm LayerNorm (the nets' own).
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from timm.models.twins import Block, GlobalSubSampleAttn, LocallyGroupedAttn, PatchEmbed, PosConv, Twins

from ..backends import register_container, register_converter
from ..backends.common import adopt_module
from ..backends.site_groups import attention_windows
from ..backends.token_attention import FeatureTokenAttention, map_of_tokens
from ..features import ChannelsLastView, FeatureMap
from .pvt_v2 import FeatureSpatialReductionAttention
from .timm_encoders import register_feature_forward, register_timm_encoder

__all__ = ["FeatureLocallyGroupedAttention", "FeaturePosConv", "FeatureTwinsPatchEmbed", "twins_features"]

# the net (its children, run by twins_features) and the block: norms, drop paths and residual adds around its
# attention (given the map size it ignores here) and its Linear MLP
for _composite in (Twins, Block):
    register_container(_composite)
register_converter(GlobalSubSampleAttn)(FeatureSpatialReductionAttention)


@register_converter(PatchEmbed)
class FeatureTwinsPatchEmbed(nn.Module):
    """Twins' patch embedding: the strided conv on the map, LayerNorm on its tokens; ``(tokens, map size)``."""

    def __init__(self, backend, embed: PatchEmbed, name: str = ""):
        super().__init__()
        adopt_module(self, embed)
        backend.convert_children(self, prefix=f"{name}.")

    def forward(self, x: FeatureMap) -> tuple[ChannelsLastView, tuple[int, int]]:
        x = self.proj(x)
        return self.norm(ChannelsLastView(x)), x.mask.map_hw(x.stride)


@register_converter(PosConv)
class FeaturePosConv(nn.Module):
    """Twins' positional encoding generator: the depthwise 3x3 conv on the map (plus the map when it keeps the
    stride), as tokens again."""

    def __init__(self, backend, pos_conv: PosConv, name: str = ""):
        super().__init__()
        adopt_module(self, pos_conv)
        backend.convert_children(self, prefix=f"{name}.")
        self.stride, self.layer_name = pos_conv.stride, name

    def forward(self, x: ChannelsLastView, size: Optional[tuple[int, int]] = None) -> ChannelsLastView:
        tokens = map_of_tokens(x, self.layer_name)
        out = self.proj(tokens)
        return ChannelsLastView(out + tokens if self.stride == 1 else out)


@register_converter(LocallyGroupedAttn)
class FeatureLocallyGroupedAttention(FeatureTokenAttention):
    """Twins-SVT's attention inside each ``ws x ws`` window: each active token among its window's active tokens.
    The same children (``qkv``, ``attn_drop``, ``proj``, ``proj_drop``), names and parameters."""

    def __init__(self, backend, attention: LocallyGroupedAttn, name: str = ""):
        super().__init__(attention, name, tokens_channels_last=True, feature_type=backend.feature_type)
        self.window = (attention.ws, attention.ws)

    def forward(self, x: ChannelsLastView, size: Optional[tuple[int, int]] = None) -> ChannelsLastView:
        tokens = map_of_tokens(x, self.layer_name)
        windows = attention_windows(tokens, self.window, self.layer_name, "Twins' own, 224, tiles every stage")
        attended = super().forward(ChannelsLastView(windows.unfold(tokens))).channels_first
        return ChannelsLastView(windows.fold(attended, like=tokens))


@register_feature_forward(Twins)
def twins_features(model: Twins, x, feature_indices: list[int]) -> list:
    """timm's ``forward_intermediates(x, norm=True)`` for the four stages: each stage's tokens (the last one
    normed) as a map (the dense model's sequence unflattened with its size, as timm does; a feature map's
    channels-last view permuted back)."""
    if feature_indices != [0, 1, 2, 3]:
        raise ValueError(f"Twins' features are its four stages, got indices {feature_indices}")
    features = []
    last = len(model.blocks) - 1
    for index, (embed, drop, blocks, pos_block) in enumerate(zip(model.patch_embeds, model.pos_drops, model.blocks,
                                                                 model.pos_block)):
        x, size = embed(x)
        x = drop(x)
        for position, block in enumerate(blocks):
            x = block(x, size)
            if position == 0:
                x = pos_block(x, size)
        if index == last:
            x = model.norm(x)
        if not isinstance(x, ChannelsLastView):
            x = x.reshape(x.shape[0], *size, -1)
        x = x.permute(0, 3, 1, 2)
        features.append(x)
    return features


register_timm_encoder("twins_pcpvt_small", 0.1, densify_norm="ln", tested=True)
register_timm_encoder("twins_svt_small", 0.1, densify_norm="ln", tested=True)
