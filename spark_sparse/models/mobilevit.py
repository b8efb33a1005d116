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
neither keys nor values), their drop path per sequence as timm draws it. The rows of the two maps are one
permutation apart (``index_select`` both ways).

timm interpolates a map whose sides are not multiples of the patch (bilinearly, which mixes masked zeros
into visible sites): refused at the first forward, naming the input sizes that tile (multiples of 64 for
MobileViT's 2x2 patches at stride 32; MobileViT's own size is 256). MobileViT-V2's separable attention
(``MobileVitV2Block``) is not converted.

Default drop path 0 (a 2.3M net), densify norm BatchNorm.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models.mobilevit import MobileVitBlock
from timm.models.vision_transformer import Block as TransformerBlock

from ..backends import register_container, register_converter
from ..backends.token_attention import FeatureTokenAttention
from ..features import ChannelsLastView, FeatureMap, MaskedDense, SparseRows, UnsupportedFeatureOperation
from ..mask import ActiveMask
from .timm_encoders import register_timm_encoder

__all__ = ["FeatureMobileVitBlock", "PatchPositions"]

register_container(TransformerBlock)
register_converter(Attention)(FeatureTokenAttention.of_token_sequence)


class PatchPositions:
    """The unfolding of a map at ``stride`` into its ``ph x pw`` patch positions, as a map of its own.

    ``mask``: one "image" per (image, position inside the patch), over the patch grid (stride 1 of its own
    mask); ``to_positions`` / ``from_positions``: row orders of the two maps (sparse rows).
    """

    def __init__(self, mask: ActiveMask, stride: int, patch: tuple[int, int]):
        site = mask.dense_at(stride)
        batch, _, height, width = site.shape
        ph, pw = patch
        nh, nw = height // ph, width // pw
        self.patch, self.grid = patch, (nh, nw)
        positions = site.view(batch, nh, ph, nw, pw).permute(0, 2, 4, 1, 3).reshape(batch * ph * pw, 1, nh, nw)
        self.mask = ActiveMask(positions, downsample_ratio=1)
        g, i, j = self.mask.coords_at(1).unbind(1)
        b, p = g // (ph * pw), g % (ph * pw)
        self.to_positions = mask.index_grid(stride)[b, i * ph + p // pw, j * pw + p % pw]
        self.from_positions = torch.empty_like(self.to_positions).scatter_(
            0, self.to_positions, torch.arange(self.to_positions.shape[0], device=self.to_positions.device))

    @classmethod
    def of(cls, x: FeatureMap, patch: tuple[int, int], name: str) -> "PatchPositions":
        height, width = x.mask.dense_at(x.stride).shape[-2:]
        if height % patch[0] or width % patch[1]:
            tile = x.stride * patch[0]
            raise UnsupportedFeatureOperation(
                f"{name}: its {height}x{width} map at stride {x.stride} does not tile by the {patch[0]}x{patch[1]} "
                f"patches, which timm handles by bilinear interpolation (mixing masked zeros into visible sites); "
                f"use an input size that is a multiple of {tile} (MobileViT's own, 256, tiles every block)")
        key = ("mobilevit-patch-positions", x.stride, tuple(patch))
        return x.mask.cached(key, lambda: cls(x.mask, x.stride, patch))

    def unfold(self, x: FeatureMap) -> FeatureMap:
        if isinstance(x, MaskedDense):
            (ph, pw), (nh, nw) = self.patch, self.grid
            batch, channels = x.data.shape[:2]
            data = x.data.view(batch, channels, nh, ph, nw, pw).permute(0, 3, 5, 1, 2, 4)
            return MaskedDense(data.reshape(batch * ph * pw, channels, nh, nw), self.mask, 1)
        return SparseRows(x.data.index_select(0, self.to_positions), self.mask, 1)

    def fold(self, positions: FeatureMap, like: FeatureMap) -> FeatureMap:
        if isinstance(positions, MaskedDense):
            (ph, pw), (nh, nw) = self.patch, self.grid
            channels = positions.data.shape[1]
            data = positions.data.view(-1, ph, pw, channels, nh, nw).permute(0, 3, 4, 1, 5, 2)
            return MaskedDense(data.reshape(-1, channels, nh * ph, nw * pw), like.mask, like.stride)
        return SparseRows(positions.data.index_select(0, self.from_positions), like.mask, like.stride)


@register_converter(MobileVitBlock)
class FeatureMobileVitBlock(nn.Module):
    """timm's ``MobileVitBlock``: convs on the map, the transformer on its patch positions (a map of their own,
    :class:`PatchPositions`), fold, projection and fusion. The same children (converted), names and state."""

    def __init__(self, backend, block: MobileVitBlock, name: str = ""):
        super().__init__()
        for child, module in block.named_children():
            setattr(self, child, backend.convert_module(module, f"{name}.{child}"))
        if block.conv_fusion is None:                                   # timm's no_fusion option
            self.conv_fusion = None
        self.patch_size, self.layer_name = tuple(block.patch_size), name
        self.train(block.training)

    def forward(self, x: FeatureMap) -> FeatureMap:
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        positions = PatchPositions.of(x, self.patch_size, self.layer_name)
        tokens = self.norm(self.transformer(ChannelsLastView(positions.unfold(x))))
        x = self.conv_proj(positions.fold(tokens.channels_first, like=x))
        if self.conv_fusion is not None:
            x = self.conv_fusion(torch.cat((shortcut, x), dim=1))
        return x


register_timm_encoder("mobilevit_xs", 0.0, densify_norm="bn", tested=True)
