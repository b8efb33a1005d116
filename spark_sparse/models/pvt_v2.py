"""timm's PVT-v2 (Pyramid Vision Transformer v2, CVMJ 2022) on every backend.

Each stage embeds its input with an overlapping strided conv (7x7 stride 4 for the stem, 3x3 stride 2
after) and a LayerNorm on the tokens, then runs transformer blocks on the map's tokens (its
channels-last view: the same sites) and a last LayerNorm:

- spatial-reduction attention: the queries are the tokens; the keys and values come from a conv of
  kernel = stride = ``sr_ratio`` over the map (8, 4, 2 at strides 4, 8, 16: the stride-32 patch grid
  in every stage), LayerNorm, a Linear. Each ACTIVE token attends among the keys of its image's
  ACTIVE patches (masked ones are neither keys nor values, as for every attention here); the last
  stage (``sr_ratio`` 1) attends among the image's active tokens themselves
  (:func:`~spark_sparse.backends.token_attention.attend_among_active_tokens`).
- the MLP runs a depthwise 3x3 conv on the map between its Linear layers, a conv like any other
  (masked sites are the zeros they are in SparK).

timm's stage and layers reshape the token sequence with the dense map's sizes, which a feature map
does not have: :class:`FeaturePvtStage`, :class:`FeatureSpatialReductionAttention` and :class:`FeaturePvtMlp` run
the same children on the map and its channels-last view. The linear-attention variant (``pvt_v2_b2_li``:
keys from an adaptive 7x7 average pool of the whole map) is refused. With every site visible this is
timm's PVT-v2. Default drop path 0.1 (as the other attention nets here, CAFormer-S18 and DaViT-T; pass another
with ``--dp``), densify norm LayerNorm (the net's own).
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from timm.models.pvt_v2 import (Attention, Block, MlpWithDepthwiseConv, OverlapPatchEmbed,
                                PyramidVisionTransformerStage, PyramidVisionTransformerV2)

from ..backends import UnsupportedModuleError, register_container, register_converter
from ..backends.common import adopt_module
from ..backends.token_attention import attend_among_active_tokens, map_of_tokens
from ..features import ChannelsLastView, FeatureMap
from .timm_encoders import register_timm_encoder

__all__ = ["FeaturePvtMlp", "FeaturePvtStage", "FeatureSpatialReductionAttention"]

# the net, the patch embedding (conv, permute to channels last, LayerNorm) and the block (norms, drop paths and
# residual adds around its attention and MLP, given the map size they ignore here) only call their children
for _composite in (PyramidVisionTransformerV2, OverlapPatchEmbed, Block):
    register_container(_composite)


@register_converter(PyramidVisionTransformerStage)
class FeaturePvtStage(nn.Module):
    """A PVT-v2 stage: its patch embedding (the map to tokens), its blocks on the tokens, the final LayerNorm,
    the tokens as the map again. Same children and names."""

    def __init__(self, backend, stage: PyramidVisionTransformerStage, name: str = ""):
        super().__init__()
        adopt_module(self, stage)
        backend.convert_children(self, prefix=f"{name}.")
        if stage.downsample is None:                     # the first stage: the stem embedded its input
            self.downsample = None

    def forward(self, x) -> FeatureMap:
        if self.downsample is not None:
            x = self.downsample(x)
        map_size = x.mask.map_hw(x.stride)
        for block in self.blocks:
            x = block(x, map_size)
        return self.norm(x).permute(0, 3, 1, 2)


@register_converter(Attention)
class FeatureSpatialReductionAttention(nn.Module):
    """Spatial-reduction attention (PVT-v2's, and Twins' global sub-sampled attention) among each image's
    ACTIVE tokens: keys and values from the ``sr`` conv's map (its active sites), LayerNorm and ``kv``;
    without ``sr`` from the tokens. Same children and parameters; ``q``, ``kv``, ``proj`` and the dropouts
    act on rows as on timm's tokens."""

    def __init__(self, backend, attention: nn.Module, name: str = ""):
        super().__init__()
        if getattr(attention, "pool", None) is not None:
            raise UnsupportedModuleError(
                f"module {name!r} is PVT-v2's linear attention (the *_li models), whose keys come from an adaptive "
                f"7x7 average pool of the whole map: windows the patches do not tile. Use a PVT-v2 without it "
                f"(pvt_v2_b0 ... pvt_v2_b5)")
        adopt_module(self, attention)
        # the Linear layers and dropouts act on rows as on timm's tokens; the key path's conv and norm on the map
        if attention.sr is None:                         # the last stage: keys from the tokens themselves
            self.sr = None
        else:
            self.sr = backend.convert_module(attention.sr, f"{name}.sr")
            self.norm = backend.convert_module(attention.norm, f"{name}.norm")
        self.num_heads, self.scale = attention.num_heads, attention.scale
        self.head_dim = attention.q.out_features // attention.num_heads       # Twins' layer keeps no head_dim
        self.layer_name = name

    def forward(self, x: ChannelsLastView, feat_size: Optional[tuple[int, int]] = None) -> ChannelsLastView:
        tokens = map_of_tokens(x, self.layer_name)
        rows = tokens.active_rows()
        query = self.q(rows).view(rows.shape[0], self.num_heads, self.head_dim)
        keys = tokens
        if self.sr is not None:
            keys = self.norm(ChannelsLastView(self.sr(tokens))).channels_first
        key_rows = keys.active_rows()
        key, value = self.kv(key_rows).view(key_rows.shape[0], 2, self.num_heads, self.head_dim).unbind(1)
        out = attend_among_active_tokens(tokens, query, keys, key, value, self.scale,
                                         self.attn_drop.p if self.training else 0.0)
        return ChannelsLastView(tokens.with_active_rows(self.proj_drop(self.proj(out))))


@register_converter(MlpWithDepthwiseConv)
class FeaturePvtMlp(nn.Module):
    """PVT-v2's MLP: ``fc1`` on the tokens, (ReLU and) the depthwise 3x3 conv on the map, GELU, ``fc2``."""

    def __init__(self, backend, mlp: MlpWithDepthwiseConv, name: str = ""):
        super().__init__()
        adopt_module(self, mlp)
        backend.convert_children(self, prefix=f"{name}.")
        self.layer_name = name

    def forward(self, x: ChannelsLastView, feat_size: Optional[tuple[int, int]] = None) -> ChannelsLastView:
        hidden = map_of_tokens(self.fc1(x), self.layer_name)
        x = ChannelsLastView(self.dwconv(self.relu(hidden)))
        return self.drop(self.fc2(self.drop(self.act(x))))


register_timm_encoder("pvt_v2_b0", 0.1, densify_norm="ln", tested=True)
