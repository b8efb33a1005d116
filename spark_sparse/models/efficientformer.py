"""timm's EfficientFormer (NeurIPS 2022: "EfficientFormer: Vision Transformers at MobileNet Speed") on every
backend.

The stem, the downsampling convs, the ``MetaBlock2d`` blocks (PoolFormer's ``avgpool3x3(x) - x`` mixer,
padding excluded from the count and masked sites counted as the zeros they are in SparK, as for every
average pool here; a 1x1-conv MLP with BatchNorm; per-channel layer scales) are convolutions, pools,
BatchNorm and per-channel products: containers. The last stage flattens its map into a token sequence
(``Flat``) before its ``MetaBlock1d`` blocks (LayerNorm, attention, Linear MLP, layer scales): here the
sequence is the map's channels-last view, the same sites, on which those act per token.

The attention (``Attention``) is multi-head softmax attention over the image's tokens plus a learnt bias
per head and relative offset ``(|dy|, |dx|)`` on the 7x7 grid, the stride-32 map of a 224 px image:

    logits = q k^T / sqrt(d) + biases[:, idx(p_i, p_j)]

Each ACTIVE token attends among its image's active tokens (masked positions are neither keys nor
values, as for every attention here), each pair keeping the bias of its positions on the grid
(:func:`~spark_sparse.backends.token_attention.attend_among_active_tokens` with ``position_bias``). The
biases exist for the 7x7 grid alone, so the encoder runs at 224 px only, as timm's model does; other
sizes are refused at the first forward.

timm's ``forward_intermediates`` unflattens the last stage's tokens with the dense map's shape, which a
feature map does not have: :func:`efficientformer_features` runs the same children and returns the
channels-last view as the map it is. With every site visible this is timm's EfficientFormer. Default drop
path 0 (a 12M net, as SparK's small nets), densify norm BatchNorm (the net's own).
"""
from __future__ import annotations

import math

import torch.nn as nn
from timm.models.efficientformer import (Attention, ConvMlpWithNorm, Downsample, EfficientFormer,
                                         EfficientFormerStage, Flat, MetaBlock1d, MetaBlock2d, Pooling, Stem4)

from ..backends import register_container, register_converter
from ..backends.common import adopt_module
from ..backends.token_attention import attend_among_active_tokens, map_of_tokens
from ..features import ChannelsLastView, FeatureMap, UnsupportedFeatureOperation
from .timm_encoders import register_feature_forward, register_timm_encoder

__all__ = ["FeatureEfficientFormerAttention", "FeatureFlat", "efficientformer_features"]

#: the input size EfficientFormer's attention biases are built for (a 7x7 map at stride 32)
OWN_INPUT_SIZE = 224

for _composite in (EfficientFormer, Stem4, EfficientFormerStage, Downsample, Pooling, ConvMlpWithNorm, MetaBlock2d,
                   MetaBlock1d):
    register_container(_composite)


@register_converter(Flat)
class FeatureFlat(nn.Module):
    """``x.flatten(2).transpose(1, 2)``: a map's token sequence ``[B, H * W, C]`` is its channels-last view."""

    def __init__(self, backend, flat: Flat, name: str = ""):
        super().__init__()

    def forward(self, x: FeatureMap) -> ChannelsLastView:
        return ChannelsLastView(x)


@register_converter(Attention)
class FeatureEfficientFormerAttention(nn.Module):
    """EfficientFormer's attention among each image's ACTIVE tokens, with the learnt bias of each pair's
    relative position on the 7x7 grid. Same children (``qkv``, ``proj``), parameters and buffers."""

    def __init__(self, backend, attention: Attention, name: str = ""):
        super().__init__()
        adopt_module(self, attention)
        self.num_heads, self.scale = attention.num_heads, attention.scale
        self.key_dim, self.val_dim = attention.key_dim, attention.val_dim
        self.resolution = math.isqrt(attention.attention_bias_idxs.shape[0])
        self.layer_name = name

    def _check_grid(self, tokens: FeatureMap) -> None:
        height, width = tokens.mask.map_hw(tokens.stride)
        if (height, width) != (self.resolution, self.resolution):
            raise UnsupportedFeatureOperation(
                f"{self.layer_name}: EfficientFormer's attention biases are learnt for a {self.resolution}x"
                f"{self.resolution} token grid, got a {height}x{width} map at stride {tokens.stride}; use input "
                f"size {self.resolution * tokens.stride} (timm's model runs at that size only)")

    def forward(self, x: ChannelsLastView) -> ChannelsLastView:
        tokens = map_of_tokens(x, self.layer_name)
        self._check_grid(tokens)
        rows = tokens.active_rows()
        # timm's layout: per head, key_dim query, key_dim key and val_dim value channels
        query, key, value = self.qkv(rows).view(rows.shape[0], self.num_heads, -1).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=-1)
        out = attend_among_active_tokens(tokens, query, tokens, key, value, self.scale,
                                         position_bias=self.attention_biases[:, self.attention_bias_idxs])
        return ChannelsLastView(tokens.with_active_rows(self.proj(out)))


@register_feature_forward(EfficientFormer, probe_size=OWN_INPUT_SIZE)
def efficientformer_features(model: EfficientFormer, x, feature_indices: list[int]) -> list:
    """timm's ``forward_intermediates(x, norm=True)`` for the four stages: the last one's tokens, normed, as a
    map (the dense model's sequence unflattened to the previous map's halved size, as timm does; a feature
    map's channels-last view permuted back)."""
    if feature_indices != [0, 1, 2, 3]:
        raise ValueError(f"EfficientFormer's features are its four stages, got indices {feature_indices}")
    features = []
    x = model.stem(x)
    for stage in model.stages:
        previous, x = x, stage(x)
        features.append(x)
    tokens = model.norm(x)
    if not isinstance(tokens, ChannelsLastView):
        batch, _, height, width = previous.shape
        tokens = tokens.reshape(batch, height // 2, width // 2, -1)
    features[-1] = tokens.permute(0, 3, 1, 2)
    return features


register_timm_encoder("efficientformer_l1", 0.0, densify_norm="bn", tested=True)
