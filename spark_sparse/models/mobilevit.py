"""timm's MobileViT (``mobilevit_xxs/xs/s``, ICLR 2022) on every backend.

Its stem and inverted-residual blocks are ByobNet's (containers, :mod:`.byobnet`). A ``MobileVitBlock``
convolves (a k x k ConvNormAct, a 1x1 conv), then UNFOLDS the map into its ``ph x pw`` patches: the sites
at one position ``(dy, dx)`` inside every patch form one token sequence, ``B * ph * pw`` sequences of
``(H / ph) * (W / pw)`` tokens, on which a ViT transformer runs (LayerNorm, ``timm.layers.Attention``,
Linear MLP, per sequence); then it folds them back, projects (1x1 ConvNormAct) and fuses with its input
(a k x k ConvNormAct of their concatenation).

Here the unfolded sequences are a feature map of their own: the sites of patch position ``(dy, dx)`` of
image ``b`` are "image" ``b * ph * pw + dy * pw + dx`` of an :class:`~spark_sparse.mask.ActiveMask` over
the patch grid (timm's order), whose active sites are the original ones. The transformer's blocks run
unchanged on that map's channels-last view: their norms and MLP per site, their attention among the
ACTIVE tokens of each sequence (:mod:`~spark_sparse.backends.token_attention`; masked positions are
neither keys nor values), their drop path per sequence as timm draws it. The regrouping is
:mod:`~spark_sparse.backends.site_groups`' (rows: one permutation each way).

timm interpolates a map whose sides are not multiples of the patch (bilinearly, which mixes masked zeros
into visible sites): refused at the first forward, naming the input sizes that tile (multiples of 64 for
MobileViT's 2x2 patches at stride 32; MobileViT's own size is 256).

MobileViT-V2's ``MobileVitV2Block`` unfolds the same way, but its transformer is pointwise (1x1 convs) except
for two reductions: ``GroupNorm1`` over all of an image's sites (patch positions included) and the separable
self-attention's softmax over each sequence's tokens. Neither needs the unfolding: the block runs its
transformer on the map itself (GroupNorm over each image's active sites, :mod:`~spark_sparse.backends.norms`)
and only the attention (:class:`FeatureLinearSelfAttention`) works on the patch positions, where each
sequence's context scores are a softmax over its ACTIVE tokens (masked positions are not tokens).

Default drop path 0 (2.3M and 1.4M nets), densify norm BatchNorm.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.mobilevit import LinearSelfAttention, LinearTransformerBlock, MobileVitBlock, MobileVitV2Block
from timm.models.vision_transformer import Block as TransformerBlock

from ..backends import register_container, register_converter
from ..backends.common import adopt_module
from ..backends.per_image import image_softmax, image_sums, per_site_values
from ..backends.site_groups import SiteGroups
from ..backends.token_attention import FeatureTokenAttention
from ..features import ChannelsLastView, FeatureMap, UnsupportedFeatureOperation
from .timm_encoders import register_timm_encoder

__all__ = ["FeatureLinearSelfAttention", "FeatureMobileVitBlock", "FeatureMobileVitV2Block", "patch_positions"]

register_container(TransformerBlock)
register_container(LinearTransformerBlock)
register_converter(Attention)(FeatureTokenAttention.of_token_sequence)


def patch_positions(x: FeatureMap, patch: tuple[int, int], name: str) -> SiteGroups:
    """The map's sites grouped by their position inside MobileViT's patches; a map they do not tile is refused."""
    def refusal(what: str) -> str:
        return (f"{name}: {what}, which timm handles by bilinear interpolation (mixing masked zeros into visible "
                f"sites); use an input size that is a multiple of {x.mask.downsample_ratio * patch[0]} (MobileViT's "
                f"own, 256, tiles every block)")
    return SiteGroups.of(x, patch, by_position=True, refusal=refusal)


@register_converter(MobileVitBlock)
class FeatureMobileVitBlock(nn.Module):
    """timm's ``MobileVitBlock``: convs on the map, the transformer on its patch positions (a map of their own,
    :func:`patch_positions`), fold, projection and fusion. The same children (converted), names and state."""

    def __init__(self, backend, block: MobileVitBlock, name: str = ""):
        super().__init__()
        adopt_module(self, block)
        backend.convert_children(self, prefix=f"{name}.")
        if block.conv_fusion is None:                                   # timm's no_fusion option
            self.conv_fusion = None
        self.patch_size, self.layer_name = tuple(block.patch_size), name

    def forward(self, x: FeatureMap) -> FeatureMap:
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        positions = patch_positions(x, self.patch_size, self.layer_name)
        tokens = self.norm(self.transformer(ChannelsLastView(positions.unfold(x))))
        x = self.conv_proj(positions.fold(tokens.channels_first, like=x))
        if self.conv_fusion is not None:
            x = self.conv_fusion(torch.cat((shortcut, x), dim=1))
        return x


@register_converter(LinearSelfAttention)
class FeatureLinearSelfAttention(nn.Module):
    """MobileViT-V2's separable self-attention, per patch-position sequence, among its ACTIVE tokens.

    timm's: ``qkv_proj`` (1x1 conv) gives each token one logit ``q``, a key ``k`` and a value ``v``; the
    sequence's context vector is ``sum_t softmax(q)_t k_t`` (softmax over the sequence's tokens), and each token's
    output is ``out_proj(relu(v) * context)``. Here the softmax and the sum run over the sequence's active tokens
    only. On SparK's masked map timm's layer would give every masked token the logit ``q = 0`` (its conv output,
    masked) and so a share of ``exp(0)`` of the softmax, diluting the context by an amount that depends on how much
    is hidden. The same children, names and state; ``patch_size`` is set by the enclosing
    :class:`FeatureMobileVitV2Block` (the layer alone does not know its patches).
    """

    def __init__(self, backend, attention: LinearSelfAttention, name: str = ""):
        super().__init__()
        adopt_module(self, attention)
        backend.convert_children(self, prefix=f"{name}.")
        self.embed_dim, self.layer_name = attention.embed_dim, name
        self.patch_size: Optional[tuple[int, int]] = None

    def forward(self, x: FeatureMap, x_prev: Optional[FeatureMap] = None) -> FeatureMap:
        if x_prev is not None:
            raise UnsupportedFeatureOperation(f"{self.layer_name}: cross-attention (x_prev) is not supported")
        if self.patch_size is None:
            raise UnsupportedFeatureOperation(f"{self.layer_name}: a LinearSelfAttention runs here only inside a "
                                              f"MobileVitV2Block, which tells it its patch size")
        positions = patch_positions(x, self.patch_size, self.layer_name)
        qkv = positions.unfold(self.qkv_proj(x))
        query, key, value = qkv.split([1, self.embed_dim, self.embed_dim], dim=1)
        scores = self.attn_drop(query.with_data(image_softmax(qkv, query.data))).data   # >= fp32, 0 if masked
        context = image_sums(qkv, key.data * scores)                      # [sequences, C]
        out = value.with_data(F.relu(value.data) * per_site_values(qkv, context))
        return self.out_drop(self.out_proj(positions.fold(out, like=x)))


@register_converter(MobileVitV2Block)
class FeatureMobileVitV2Block(nn.Module):
    """timm's ``MobileVitV2Block`` on the map itself: the unfold and fold around its transformer are one
    permutation and its inverse, and every layer of the transformer but the attention is pointwise or reduces
    over a whole image (``GroupNorm1``), so only the attention unfolds (:class:`FeatureLinearSelfAttention`).
    Maps that do not tile by the patches are refused (timm interpolates them). The same children and state."""

    def __init__(self, backend, block: MobileVitV2Block, name: str = ""):
        super().__init__()
        adopt_module(self, block)
        backend.convert_children(self, prefix=f"{name}.")
        self.patch_size, self.layer_name = tuple(block.patch_size), name
        for module in self.transformer.modules():
            if isinstance(module, FeatureLinearSelfAttention):
                module.patch_size = self.patch_size

    def forward(self, x: FeatureMap) -> FeatureMap:
        patch_positions(x, self.patch_size, self.layer_name)            # refuses maps timm would interpolate
        x = self.conv_1x1(self.conv_kxk(x))
        return self.conv_proj(self.norm(self.transformer(x)))


register_timm_encoder("mobilevit_xs", 0.0, densify_norm="bn", tested=True)
register_timm_encoder("mobilevitv2_050", 0.0, densify_norm="bn", tested=True)
