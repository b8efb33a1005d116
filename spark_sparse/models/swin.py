"""timm's Swin Transformer (ICCV 2021: "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows") on every backend: ``swin_*`` and AutoFormerV2's ``swin_s3_*`` (timm's ``SwinTransformer``).

timm's Swin runs channels-last: its stages take and give ``[B, H, W, C]`` token maps, here a feature
map's channels-last view (:class:`~spark_sparse.features.ChannelsLastView`: the same sites).

- Patch embedding (timm's ``PatchEmbed``): a 4x4 stride-4 conv on the image's map, then LayerNorm on its
  tokens. timm's model is strict about its input size (``strict_img_size``): a strict model runs at its
  ``img_size`` only, as timm's, and other sizes are refused naming the fix.
- Patch merging: each 2x2 block of sites becomes one site at twice the stride, the four channel vectors
  side by side in timm's order, then LayerNorm and Linear per site. SparK's masks are 32 px patches, so
  at strides 4, 8, 16 a 2x2 block is all visible or all masked.
- Blocks: LayerNorm, window attention, Linear MLP, drop path per image. Window attention: each ACTIVE
  token attends among the active tokens of its ``ws x ws`` window (windows as groups of sites,
  :mod:`~spark_sparse.backends.site_groups`; masked positions are neither keys nor values), with the
  learnt relative position bias of each pair's positions inside the window. Every other block shifts the
  windows: timm rolls the map by ``-ws // 2`` (cyclic), windows it, adds -100 to the logits of pairs from
  different regions of the rolled map (sites that were not neighbours before the roll) and rolls back.
  Here the roll is part of the windows' permutation of sites (one ``index_select`` each way on rows,
  ``torch.roll`` of the masked map) and the region mask an additive bias per window, timm's -100 exactly.

timm fixes each block's window and shift at construction from its map size (a map not larger than the
window is one window, unshifted, unless ``always_partition``); they are taken from the block as they are.
A strict model precomputes the region masks for its own map sizes; a dynamic one (``strict_img_size=False``)
builds them for the map at each forward, as here for both. timm pads a map its windows do not tile with
zero tokens that take part in the attention: refused at the first forward, naming the input sizes that
tile (multiples of 224 for 7x7 windows, of 384 for 12x12).

With every site visible this is timm's Swin. Default drop path 0.1 (a 28M net, as ConvNeXt-T's SparK rate;
the paper's 0.2 is for supervised training), densify norm LayerNorm (the net's own).
Swin-V2 (``swinv2_*``: cosine attention, continuous position biases) subclasses these converters
(:mod:`.swin_v2`); SwinV2-CR is another class and is refused at conversion.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Format, PatchEmbed
from timm.models.swin_transformer import (PatchMerging, SwinTransformer, SwinTransformerBlock, SwinTransformerStage,
                                          WindowAttention)

from ..backends import register_container, register_converter
from ..backends.base import UnsupportedModuleError
from ..backends.common import adopt_module
from ..backends.site_groups import attention_windows
from ..backends.token_attention import FeatureTokenAttention, map_of_tokens
from ..features import ChannelsLastView, FeatureMap, MaskedDense, SparseRows, UnsupportedFeatureOperation
from ..kernels.gather import table_taps
from .timm_encoders import register_timm_encoder

__all__ = ["FeaturePatchEmbed", "FeatureSwinBlock", "FeatureSwinPatchMerging", "FeatureSwinWindowAttention",
           "merge_2x2_neighbourhoods", "shifted_window_regions"]

#: timm's logit for a pair of tokens from different regions of a shifted window (not -inf: with every site
#: visible the result must be timm's)
OTHER_REGION_LOGIT = -100.0

# the net (timm's forward_intermediates calls its children and permutes the channels-last views back) and
# the stage (patch merging, then the blocks)
for _composite in (SwinTransformer, SwinTransformerStage):
    register_container(_composite)


@register_converter(PatchEmbed)
class FeaturePatchEmbed(nn.Module):
    """timm's ``PatchEmbed`` (Swin's): the strided conv on the image's map, then the norm on its tokens, a
    channels-last view (timm's ``NHWC`` output, or the flattened ``NLC`` sequence: the same sites).

    A strict embedding (``strict_img_size``) takes its ``img_size`` only, as timm's, which asserts it."""

    def __init__(self, backend, embed: PatchEmbed, name: str = ""):
        super().__init__()
        self.channels_last = embed.flatten or embed.output_fmt in (Format.NHWC, Format.NLC)
        if not self.channels_last and not isinstance(embed.norm, nn.Identity):
            raise UnsupportedModuleError(f"module {name!r}: timm's PatchEmbed with an NCHW output normalises its "
                                         f"last (width) dimension; only channels-last outputs are supported")
        adopt_module(self, embed)
        backend.convert_children(self, prefix=f"{name}.")
        self.img_size, self.strict_img_size = embed.img_size, embed.strict_img_size
        self.patch_size, self.dynamic_img_pad = tuple(embed.patch_size), embed.dynamic_img_pad
        self.layer_name = name

    def _check_size(self, x: FeatureMap) -> None:
        height, width = x.mask.map_hw(x.stride)
        if self.img_size is not None and self.strict_img_size and (height, width) != tuple(self.img_size):
            size = height if height == width else (height, width)
            raise UnsupportedFeatureOperation(
                f"{self.layer_name}: the model is built for {self.img_size[0]}x{self.img_size[1]} images (timm's "
                f"strict_img_size), got {height}x{width}; use that input size (--input_size {self.img_size[0]}), or "
                f"build the model for yours (--model_kwargs img_size={size}; Python: ss.create_spark(name, "
                f"input_size={size}, img_size={size})), for a size whose maps the model's windows tile at every "
                f"stage (or change window_size too)")
        if height % self.patch_size[0] or width % self.patch_size[1]:
            raise UnsupportedFeatureOperation(
                f"{self.layer_name}: a {height}x{width} image is not a multiple of the {self.patch_size[0]}x"
                f"{self.patch_size[1]} patches (timm pads it or refuses)")

    def forward(self, x: FeatureMap):
        self._check_size(x)
        x = self.proj(x)
        return self.norm(ChannelsLastView(x)) if self.channels_last else x


def merge_2x2_neighbourhoods(x: FeatureMap, name: str) -> FeatureMap:
    """Each 2x2 block of ``x``'s sites as one site at twice the stride, their channel vectors side by side in
    timm's ``PatchMerging`` order ``[x(0, 0), x(1, 0), x(0, 1), x(1, 1)]`` (offsets ``(dy, dx)``, column offset
    major). Below the patch size a block is all visible or all masked, so the output is zero exactly at the
    masked sites of the coarser map; beyond it, and on odd maps (which timm pads), it is refused."""
    stride = 2 * x.stride
    height, width = x.mask.map_hw(x.stride)
    if height % 2 or width % 2 or stride > x.mask.downsample_ratio:
        raise UnsupportedFeatureOperation(
            f"{name}: merging 2x2 neighbourhoods of a {height}x{width} map at stride {x.stride} would "
            f"{'pad it (odd sides)' if height % 2 or width % 2 else 'put visible and masked sites in one site'}")
    if isinstance(x, MaskedDense):
        batch, channels = x.data.shape[:2]
        blocks = x.data.reshape(batch, channels, height // 2, 2, width // 2, 2)      # [B, C, h, dy, w, dx]
        merged = blocks.permute(0, 5, 3, 1, 2, 4).reshape(batch, 4 * channels, height // 2, width // 2)
        return MaskedDense(merged, x.mask, stride)
    table = x.mask.neighbour_table(x.stride, stride, (2, 2), (0, 0), (1, 1))        # [N, 4], taps (dy, dx) row-major
    taps = table_taps(x.data, table[:, [0, 2, 1, 3]])                               # [N, 4, C], dx major
    return SparseRows(taps.reshape(taps.shape[0], -1), x.mask, stride)


@register_converter(PatchMerging)
class FeatureSwinPatchMerging(nn.Module):
    """Swin's patch merging on its tokens: 2x2 neighbourhoods concatenated (:func:`merge_2x2_neighbourhoods`),
    LayerNorm and Linear per site. Same children and parameters."""

    def __init__(self, backend, merging: PatchMerging, name: str = ""):
        super().__init__()
        adopt_module(self, merging)
        backend.convert_children(self, prefix=f"{name}.")
        self.layer_name = name

    def neighbourhoods(self, x: ChannelsLastView) -> ChannelsLastView:
        """The tokens of each 2x2 neighbourhood side by side, one token at twice the stride."""
        return ChannelsLastView(merge_2x2_neighbourhoods(map_of_tokens(x, self.layer_name), self.layer_name))

    def forward(self, x: ChannelsLastView) -> ChannelsLastView:
        return self.reduction(self.norm(self.neighbourhoods(x)))


@register_converter(WindowAttention)
class FeatureSwinWindowAttention(FeatureTokenAttention):
    """Swin's window attention on a map of windows (one "image" per window, the block's
    :func:`~spark_sparse.backends.site_groups.attention_windows`): each active token among its window's active
    tokens, logits plus the learnt bias of the pair's relative position in the window and ``mask``, the region
    mask of shifted windows ``[windows per image, P, P]`` as timm's. Same children, parameters and buffers."""

    def __init__(self, backend, attention: nn.Module, name: str = "", scale: Optional[float] = None):
        super().__init__(attention, name, tokens_channels_last=True, feature_type=backend.feature_type, scale=scale)
        self.window_size = tuple(attention.window_size)

    def by_pair_of_positions(self, table: torch.Tensor) -> torch.Tensor:
        """``[(2 wh - 1) * (2 ww - 1), heads]`` values by relative position -> ``[heads, P, P]`` by pair of
        positions in the window (timm's ``relative_position_index``)."""
        area = self.window_size[0] * self.window_size[1]
        return table[self.relative_position_index.view(-1)].view(area, area, -1).permute(2, 0, 1)

    def relative_position_bias(self) -> torch.Tensor:
        """``[heads, P, P]``: the learnt bias of each pair of positions in the window (timm's ``_get_rel_pos_bias``)."""
        return self.by_pair_of_positions(self.relative_position_bias_table)

    def forward(self, x: ChannelsLastView, mask: Optional[torch.Tensor] = None) -> ChannelsLastView:
        windows = map_of_tokens(x, self.layer_name)
        if windows.mask.map_hw(windows.stride) != self.window_size:
            raise UnsupportedFeatureOperation(
                f"{self.layer_name}: Swin's window attention takes a map of its {self.window_size[0]}x"
                f"{self.window_size[1]} windows (its block's), got {windows.mask.map_hw(windows.stride)}")
        return ChannelsLastView(self.attend(windows, position_bias=self.relative_position_bias(), image_bias=mask))


def shifted_window_regions(map_hw: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
                           device: Optional[torch.device] = None) -> torch.Tensor:
    """``[windows, P, P]`` bool: the pairs of positions of each window of the map rolled by ``-shift`` whose
    sites come from different regions (timm's ``get_attn_mask``: the rolled map's last ``shift`` rows and columns
    wrapped around from the other border), windows row-major, positions ``y * ws + x``."""
    height, width = map_hw
    labels = torch.zeros(height, width, dtype=torch.long, device=device)
    region = 0
    for rows in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for columns in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            labels[rows, columns] = region
            region += 1
    windows = labels.view(height // window[0], window[0], width // window[1], window[1]).permute(0, 2, 1, 3)
    windows = windows.reshape(-1, window[0] * window[1])
    return windows.unsqueeze(1) != windows.unsqueeze(2)


@register_converter(SwinTransformerBlock)
class FeatureSwinBlock(nn.Module):
    """Swin's block on its tokens (a channels-last view): ``x + drop_path(attention in the (shifted) windows of
    norm1(x))``, then ``x + drop_path(mlp(norm2(x)))``. Window and shift as timm's block holds them; the region
    mask of shifted windows built for the map at hand (cached on the mask), timm's values. Same children,
    parameters and buffers."""

    def __init__(self, backend, block: SwinTransformerBlock, name: str = ""):
        super().__init__()
        adopt_module(self, block)
        backend.convert_children(self, prefix=f"{name}.")
        self.window_size, self.shift_size = tuple(block.window_size), tuple(block.shift_size)
        self.input_resolution, self.dynamic_mask = tuple(block.input_resolution), block.dynamic_mask
        self.layer_name = name

    def _region_bias(self, tokens: FeatureMap, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """timm's additive mask of shifted windows, ``[windows per image, P, P]``: 0 or -100; None unshifted."""
        if not any(self.shift_size):
            return None
        map_hw = tokens.mask.map_hw(tokens.stride)
        if not self.dynamic_mask and map_hw != self.input_resolution:
            raise UnsupportedFeatureOperation(
                f"{self.layer_name}: this block's shifted-window mask is built for a {self.input_resolution[0]}x"
                f"{self.input_resolution[1]} map (timm's strict_img_size), got {map_hw[0]}x{map_hw[1]} at stride "
                f"{tokens.stride}; create the model with the input size as img_size (--model_kwargs img_size=...), or "
                f"strict_img_size=False")
        def build() -> torch.Tensor:
            other = shifted_window_regions(map_hw, self.window_size, self.shift_size, tokens.mask.device)
            return torch.zeros(other.shape, dtype=dtype, device=other.device).masked_fill_(other, OTHER_REGION_LOGIT)
        # built once per mask for all the blocks of a stage (and V2's), not at every block's forward
        return tokens.mask.cached(("swin-region-bias", map_hw, self.window_size, self.shift_size, dtype), build)

    def window_attention(self, x: ChannelsLastView) -> ChannelsLastView:
        """The attention in the block's (shifted) windows of the tokens ``x`` (timm's ``_attn``)."""
        tokens = map_of_tokens(x, self.layer_name)
        windows = attention_windows(tokens, self.window_size, self.layer_name,
                                    "and the model created for it: img_size=, or strict_img_size=False",
                                    shift=self.shift_size)
        attended = self.attn(ChannelsLastView(windows.unfold(tokens)), self._region_bias(tokens, tokens.data.dtype))
        return ChannelsLastView(windows.fold(attended.channels_first, like=tokens))

    def forward(self, x: ChannelsLastView) -> ChannelsLastView:
        x = x + self.drop_path1(self.window_attention(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


register_timm_encoder("swin_tiny_patch4_window7_224", 0.1, densify_norm="ln", tested=True)
