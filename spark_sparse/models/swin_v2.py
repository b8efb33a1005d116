"""timm's Swin Transformer V2 (CVPR 2022: "Swin Transformer V2: Scaling Up Capacity and Resolution") on every
backend: ``swinv2_*`` (timm's ``SwinTransformerV2``), Swin V1's machinery (:mod:`.swin`: channels-last token maps,
patch embedding, 2x2 patch merging, windows as groups of sites, shifted windows with timm's -100 region mask, each
ACTIVE token among its window's active tokens) with V2's maths:

- cosine attention: logits ``normalize(q) . normalize(k) * exp(min(logit_scale, log 100))``, a learnt scale per
  head. The scale is folded into the normalised queries, so the shared attention runs with ``scale = 1``: the
  same logits up to rounding;
- continuous position bias: ``16 * sigmoid(cpb_mlp(relative_coords_table))`` taken by each pair's relative
  position in the window, the bias V1 learns as a table;
- the qkv bias ``cat(q_bias, 0, v_bias)`` (keys have none);
- residual post-norm: ``x + drop_path(norm1(attention(x)))``, ``x + drop_path(norm2(mlp(x)))``;
- patch merging: the 2x2 neighbourhoods side by side, then Linear, then LayerNorm (V1: LayerNorm first).

Windows, shifts (timm's ``always_partition``, ``dynamic_mask`` and strict ``img_size`` rules, as V1's) and
refusals are V1's: a strict model runs at its ``img_size`` only; a map the windows do not tile, which timm pads
with zero tokens that attend, is refused naming the input sizes that tile (multiples of 256 for the 8x8 windows of
``swinv2_*_window8_256``). With every site visible this is timm's Swin-V2. Default drop path 0.1, densify norm
LayerNorm, as V1's. SwinV2-CR (``swinv2_cr_*``: another class, scaled cosine attention with a meta network,
no shared layers) is refused at conversion.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import (PatchMerging, SwinTransformerV2, SwinTransformerV2Block,
                                             SwinTransformerV2Stage, WindowAttention)

from ..backends import register_container, register_converter
from ..features import ChannelsLastView
from .swin import FeatureSwinBlock, FeatureSwinPatchMerging, FeatureSwinWindowAttention
from .timm_encoders import register_timm_encoder

__all__ = ["FeatureSwinV2Block", "FeatureSwinV2PatchMerging", "FeatureSwinV2WindowAttention"]

#: timm's bound on the learnt logit scale of cosine attention: ``exp(logit_scale) <= 100``
MAX_LOGIT_SCALE = math.log(1.0 / 0.01)

# the net and the stage compose their children as V1's do (timm's forward_intermediates: the channels-last stages,
# the final norm on the last one, permuted back to the map)
for _composite in (SwinTransformerV2, SwinTransformerV2Stage):
    register_container(_composite)


@register_converter(PatchMerging)
class FeatureSwinV2PatchMerging(FeatureSwinPatchMerging):
    """Swin-V2's patch merging: 2x2 neighbourhoods side by side, then ``reduction`` (Linear), then ``norm`` per site.
    Same children and parameters."""

    def forward(self, x: ChannelsLastView) -> ChannelsLastView:
        return self.norm(self.reduction(self.neighbourhoods(x)))


@register_converter(WindowAttention)
class FeatureSwinV2WindowAttention(FeatureSwinWindowAttention):
    """Swin-V2's cosine window attention on a map of windows, as V1's (each active token among its window's active
    tokens, the shifted windows' region mask): logits ``normalize(q) . normalize(k) * exp(min(logit_scale,
    log 100))`` per head plus the continuous position bias. Same children, parameters and buffers."""

    def __init__(self, backend, attention: WindowAttention, name: str = ""):
        super().__init__(backend, attention, name, scale=1.0)     # the logit scale multiplies the queries
        if attention.q_bias is None:                              # timm keeps these as plain attributes then
            self.q_bias = self.k_bias = self.v_bias = None
        self.qkv_bias_separate = attention.qkv_bias_separate

    def queries_keys_values(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit queries times the head's logit scale, unit keys, values (``[N, heads, d]`` each)."""
        if self.q_bias is None:
            qkv = self.qkv(rows)
        else:
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = self.qkv(rows) + bias if self.qkv_bias_separate else F.linear(rows, self.qkv.weight, bias)
        query, key, value = qkv.view(rows.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        logit_scale = torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp().view(self.num_heads, 1)
        return F.normalize(query, dim=-1) * logit_scale, F.normalize(key, dim=-1), value

    def relative_position_bias(self) -> torch.Tensor:
        """``[heads, P, P]``: the continuous position bias of each pair of positions in the window."""
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        return 16 * torch.sigmoid(self.by_pair_of_positions(table))


@register_converter(SwinTransformerV2Block)
class FeatureSwinV2Block(FeatureSwinBlock):
    """Swin-V2's block on its tokens, residual post-norm: ``x + drop_path(norm1(attention in the (shifted) windows
    of x))``, then ``x + drop_path(norm2(mlp(x)))``. Windows, shifts and region masks as V1's block. Same children,
    parameters and buffers."""

    def forward(self, x: ChannelsLastView) -> ChannelsLastView:
        x = x + self.drop_path1(self.norm1(self.window_attention(x)))
        return x + self.drop_path2(self.norm2(self.mlp(x)))


register_timm_encoder("swinv2_tiny_window8_256", 0.1, densify_norm="ln", tested=True)
