"""timm's ConvFormer, CAFormer and PoolFormer-V2 (MetaFormer baselines, TPAMI 2024) on every backend.

A MetaFormer block is LayerNorm (PoolFormer: GroupNorm with one group), a token mixer, an optional
per-channel layer or residual scale, drop path and the residual add, then the same around a 1x1-conv
MLP. ConvFormer's mixer is a separable conv, ``1x1 conv -> StarReLU -> depthwise 7x7 -> 1x1 conv``;
PoolFormer's is ``avgpool3x3(x) - x`` (padding excluded from the count, masked sites counted as the
zeros they are in SparK, as for every average pool here). Every part is a layer the backends
convert, a per-channel factor (:meth:`~spark_sparse.features.FeatureMap.__mul__`) or a difference
of two maps of the same sites, so the net, stem, downsampling, blocks and mixers are containers;
two parts need more:

- StarReLU, ``s * relu(x) ** 2 + b``, maps 0 to ``b``: it runs on each active site
  (:class:`FeatureStarReLU`), masked sites stay 0 as after every layer here, so ``b`` never leaks
  into the depthwise conv's or the pool's windows.
- A stage unpacks ``x.shape`` before its blocks, which a feature map does not have (its layout
  differs per backend): :class:`FeatureMetaFormerStage` runs its downsampling and blocks. A stage of
  attention blocks (CAFormer's last two) flattens the map into a token sequence ``[B, H * W, C]``:
  its blocks get the map's channels-last view instead (the same sites, channels last), on which their
  bias-free channels-last LayerNorm, Linear MLP and residual scales act per site.
- CAFormer's ``Attention`` (multi-head softmax self-attention over the tokens) attends among each
  image's ACTIVE tokens (:class:`~spark_sparse.backends.token_attention.FeatureTokenAttention`):
  masked positions are neither keys nor values, as the encoder must behave as if the masked patches
  did not exist.

The bias-free norms (``LayerNorm2dNoBias``, ``GroupNorm1NoBias``) are their base norms with
``bias=None``, which the base converters take. Default drop path 0.1 (ConvFormer-S18 and CAFormer-S18:
ConvNeXt-T's SparK rate, nets of the same size; PoolFormer-S12: its paper's rate), densify norm LayerNorm (the
nets' own kind of norm: no BatchNorm anywhere).
"""
from __future__ import annotations

import torch.nn as nn
from timm.models.metaformer import (Attention, Downsampling, GroupNorm1NoBias, LayerNorm2dNoBias, LayerNormNoBias,
                                    MetaFormer, MetaFormerBlock, MetaFormerStage, Pooling, Scale, SepConv, StarReLU,
                                    Stem)

from ..backends import register_container, register_converter
from ..backends.common import FeatureLayerNorm, adopt_state
from ..backends.norms import FeatureGroupNorm
from ..backends.token_attention import FeatureTokenAttention
from ..features import ChannelsLastView, FeatureMap
from .timm_encoders import register_timm_encoder

__all__ = ["FeatureMetaFormerStage", "FeatureStarReLU"]

for _composite in (MetaFormer, Stem, Downsampling, MetaFormerBlock, SepConv, Pooling, Scale):
    register_container(_composite)

register_converter(LayerNorm2dNoBias, LayerNormNoBias)(FeatureLayerNorm.from_dense)
register_converter(GroupNorm1NoBias)(FeatureGroupNorm.from_dense)


class FeatureStarReLU(StarReLU):
    """``scale * relu(x) ** 2 + bias`` on each active site; masked sites stay 0. Same parameter names."""

    def forward(self, x: FeatureMap) -> FeatureMap:
        return x.per_site(lambda values: self.scale * self.relu(values) ** 2 + self.bias)

    @classmethod
    def from_dense(cls, backend, act: StarReLU, name: str = "") -> "FeatureStarReLU":
        return adopt_state(cls(), act)


register_converter(StarReLU)(FeatureStarReLU.from_dense)


@register_converter(MetaFormerStage)
class FeatureMetaFormerStage(nn.Module):
    """A MetaFormer stage: its downsampling, then its blocks, on the map (channels-first stages) or on its
    channels-last view (token stages, where timm flattens the map to ``[B, H * W, C]``). Same children and
    names."""

    def __init__(self, backend, stage: MetaFormerStage, name: str):
        super().__init__()
        self.use_nchw = stage.use_nchw
        self.downsample = backend.convert_module(stage.downsample, f"{name}.downsample")
        self.blocks = backend.convert_module(stage.blocks, f"{name}.blocks")
        self.train(stage.training)

    def forward(self, x: FeatureMap) -> FeatureMap:
        x = self.downsample(x)
        return self.blocks(x) if self.use_nchw else self.blocks(ChannelsLastView(x)).channels_first


register_converter(Attention)(FeatureTokenAttention.of_token_sequence)


register_timm_encoder("convformer_s18", 0.1, densify_norm="ln", tested=True)
register_timm_encoder("poolformerv2_s12", 0.1, densify_norm="ln", tested=True)
register_timm_encoder("caformer_s18", 0.1, densify_norm="ln", tested=True)
