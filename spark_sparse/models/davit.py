"""timm's DaViT (Dual Attention Vision Transformers, ECCV 2022) on every backend.

Each stage alternates two blocks, both with a depthwise conv positional encoding (``ConvPosEnc``, a conv
here like any other) before each half, LayerNorm and a Linear MLP on the tokens:

- ``SpatialBlock``: multi-head softmax attention inside each 7x7 window of the map. The windows are
  groups of sites (:mod:`~spark_sparse.backends.site_groups`), and each ACTIVE token attends among the
  active tokens of its own window (masked positions are neither keys nor values;
  :mod:`~spark_sparse.backends.token_attention`), a window with none is left alone. timm pads a map
  whose sides are not multiples of the window with zero tokens that take part in the attention (their
  keys are the qkv bias): that is refused at the first forward, naming the input sizes that tile
  (multiples of 224, DaViT's own size).
- ``ChannelBlock``: attention across channels, per image and head a ``d x d`` matrix of sums over the
  image's tokens (``k^T v``; the V2 layer's ``q^T k`` with ``q`` scaled by ``N^-1/2``), softmax over its
  rows, applied to each token. The sums run over the image's ACTIVE tokens and ``N`` is their number:
  on SparK's masked map timm's layer would add the masked tokens' LayerNorm bias terms to every sum.

The stem's and the downsampling's ``F.pad`` to a multiple of the kernel pads nothing on the maps SparK
runs (inputs are multiples of 32); a map it would pad is refused. With every site visible this is timm's
DaViT. Default drop path 0.1 (a 28M net, as ConvNeXt-T's SparK rate), densify norm LayerNorm.
"""
from __future__ import annotations

import torch.nn as nn
from timm.models.davit import (ChannelAttention, ChannelAttentionV2, ChannelBlock, ConvPosEnc, DaVit, DaVitStage,
                               Downsample, SpatialBlock, Stem, WindowAttention)

from ..backends import register_container, register_converter
from ..backends.common import adopt_module
from ..backends.per_image import active_counts
from ..backends.site_groups import attention_windows
from ..backends.token_attention import FeatureTokenAttention, token_batch, token_rows
from ..features import ChannelsLastView, FeatureMap, UnsupportedFeatureOperation
from .timm_encoders import register_timm_encoder

__all__ = ["FeatureChannelAttention", "FeatureChannelBlock", "FeatureDavitDownsample", "FeatureDavitStem",
           "FeatureSpatialBlock"]

for _composite in (DaVit, DaVitStage, ConvPosEnc):
    register_container(_composite)
register_converter(WindowAttention)(FeatureTokenAttention.of_token_sequence)


def _refuse_padding(x: FeatureMap, kernel: tuple[int, int], name: str) -> None:
    """timm's DaViT pads a map to a multiple of ``kernel`` with zeros: none on SparK's maps, else refused."""
    height, width = x.mask.map_hw(x.stride)
    if height % kernel[0] or width % kernel[1]:
        raise UnsupportedFeatureOperation(
            f"{name}: its {height}x{width} map at stride {x.stride} would be zero-padded to a multiple of "
            f"{kernel[0]}x{kernel[1]}; use an input size that is a multiple of 224 (DaViT's own)")


@register_converter(Stem)
class FeatureDavitStem(nn.Module):
    """DaViT's stem (a 7x7 stride-4 conv and LayerNorm2d); its padding to a multiple of 4 pads nothing here."""

    def __init__(self, backend, stem: Stem, name: str = ""):
        super().__init__()
        adopt_module(self, stem)
        backend.convert_children(self, prefix=f"{name}.")
        self.stride, self.layer_name = tuple(stem.stride), name

    def forward(self, x: FeatureMap) -> FeatureMap:
        _refuse_padding(x, self.stride, self.layer_name)
        return self.norm(self.conv(x))


@register_converter(Downsample)
class FeatureDavitDownsample(nn.Module):
    """DaViT's downsampling (LayerNorm2d, then a stride-2 conv; an even kernel pads to its multiple first)."""

    def __init__(self, backend, downsample: Downsample, name: str = ""):
        super().__init__()
        adopt_module(self, downsample)
        backend.convert_children(self, prefix=f"{name}.")
        self.even_k, self.kernel_size, self.layer_name = downsample.even_k, downsample.conv.kernel_size, name

    def forward(self, x: FeatureMap) -> FeatureMap:
        x = self.norm(x)
        if self.even_k:
            _refuse_padding(x, self.kernel_size, self.layer_name)
        return self.conv(x)


@register_converter(ChannelAttention, ChannelAttentionV2)
class FeatureChannelAttention(nn.Module):
    """DaViT's channel attention over each image's ACTIVE tokens (a channels-last view in, one out).

    Per image and head: V1 ``softmax(k^T v * scale)`` applied to each token's ``q``; V2 (``dynamic_scale``)
    ``softmax((q N^-1/2)^T k)`` applied to each token's ``v``, ``N`` the image's active tokens. The sums over
    tokens are products of padded token batches (zero where no token is). Same children and state."""

    def __init__(self, backend, attention: nn.Module, name: str = ""):
        super().__init__()
        adopt_module(self, attention)
        self.v2 = isinstance(attention, ChannelAttentionV2)
        self.num_heads = attention.groups if self.v2 else attention.num_heads
        self.scale = None if self.v2 else attention.scale
        self.dynamic_scale = attention.dynamic_scale if self.v2 else False
        self.head_dim = attention.qkv.out_features // (3 * self.num_heads)

    def forward(self, x: ChannelsLastView) -> ChannelsLastView:
        tokens = x.channels_first
        rows = tokens.active_rows()
        q, k, v = (token_batch(tokens, part) for part in
                   self.qkv(rows).view(rows.shape[0], 3, self.num_heads, self.head_dim).unbind(1))  # [B, h, L, d]
        if self.v2:
            if self.dynamic_scale:
                q = q * active_counts(tokens, q.dtype).rsqrt().view(-1, 1, 1, 1)
            else:
                q = q * self.head_dim ** -0.5
            attn = (q.transpose(-1, -2) @ k).softmax(dim=-1)                    # [B, h, d, d]
            out = v @ attn.transpose(-1, -2)
        else:
            attn = ((k * self.scale).transpose(-1, -2) @ v).softmax(dim=-1)
            out = q @ attn.transpose(-1, -2)
        return ChannelsLastView(tokens.with_active_rows(self.proj(token_rows(tokens, out))))


class _FeatureDavitBlock(nn.Module):
    """What DaViT's two blocks share: their children converted (``norm2``, ``mlp``, ``drop_path2`` are plain
    ``None`` attributes without an MLP, ``ffn=False``) and the MLP half on the tokens."""

    def __init__(self, backend, block: nn.Module, name: str = ""):
        super().__init__()
        adopt_module(self, block)
        backend.convert_children(self, prefix=f"{name}.")
        for optional in ("norm2", "mlp", "drop_path2"):
            if getattr(block, optional, None) is None:
                setattr(self, optional, None)
        self.layer_name = name

    def _mlp_half(self, x: FeatureMap) -> FeatureMap:
        """``x + drop_path2(mlp(norm2(x)))`` on the tokens, when the block has an MLP."""
        if self.mlp is None:
            return x
        tokens = ChannelsLastView(x)
        return (tokens + self.drop_path2(self.mlp(self.norm2(tokens)))).channels_first


@register_converter(SpatialBlock)
class FeatureSpatialBlock(_FeatureDavitBlock):
    """DaViT's window-attention block: attention among the active tokens of each 7x7 window (groups of
    sites, :class:`~spark_sparse.backends.site_groups.SiteGroups`), drop path per image as timm draws it."""

    def __init__(self, backend, block: SpatialBlock, name: str = ""):
        super().__init__(backend, block, name)
        self.window_size = tuple(block.window_size)

    def forward(self, x: FeatureMap) -> FeatureMap:
        shortcut = self.cpe1(x)
        windows = attention_windows(shortcut, self.window_size, self.layer_name, "DaViT's own, 224, tiles every block")
        normed = self.norm1(ChannelsLastView(shortcut)).channels_first
        attended = self.attn(ChannelsLastView(windows.unfold(normed))).channels_first
        x = shortcut + self.drop_path1(windows.fold(attended, like=shortcut))
        return self._mlp_half(self.cpe2(x))


@register_converter(ChannelBlock)
class FeatureChannelBlock(_FeatureDavitBlock):
    """DaViT's channel-attention block on the map's tokens (its channel attention: :class:`FeatureChannelAttention`)."""

    def forward(self, x: FeatureMap) -> FeatureMap:
        tokens = ChannelsLastView(self.cpe1(x))
        x = (tokens + self.drop_path1(self.attn(self.norm1(tokens)))).channels_first
        return self._mlp_half(self.cpe2(x))


register_timm_encoder("davit_tiny", 0.1, densify_norm="ln", tested=True)
