"""timm's EdgeNeXt (ECCV-W 2022: "Efficiently Amalgamated CNN-Transformer Architecture") on every backend.

Stem, downsampling and the ``ConvBlock`` stages are ConvNeXt-like (a depthwise conv, then NHWC
LayerNorm, MLP and layer scale between ``permute``s: :class:`~spark_sparse.features.ChannelsLastView`),
so they are containers. The last block of stages 2-4 is a ``SplitTransposeBlock``: Res2Net-style
channel groups through depthwise 3x3 convs, a Fourier positional encoding added to every token,
cross-covariance attention (XCA) and an MLP. :class:`FeatureSplitTransposeBlock` runs it on feature
maps with SparK's rule that masked sites stay 0:

- the positional encoding is added at ACTIVE sites only (added everywhere, as a bias, it would fill
  the masked sites the next block's convs read);
- XCA attends across channels, not positions: per image and head, ``q`` and ``k`` are L2-normalised
  over the image's tokens and ``softmax(temperature * q^ k^T)`` is a ``c x c`` matrix. Over an
  image's ACTIVE tokens only (masked ones are 0 in the encoder), its sums are index-adds over rows,
  and each active token gets ``attn @ v`` of its own values.

With every patch visible this is timm's maths. Default drop path 0.1 (ConvNeXt-T's SparK rate: the
blocks are ConvNeXt's; the other sizes run by their timm names with 0 unless given), densify norm
LayerNorm (the net's own).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.edgenext import ConvBlock, EdgeNeXt, EdgeNeXtStage, SplitTransposeBlock

from ..backends import register_container, register_converter
from ..backends.common import adopt_module
from ..backends.per_image import normalize_per_image, sum_per_image
from ..features import FeatureMap
from .timm_encoders import register_timm_encoder

__all__ = ["FeatureSplitTransposeBlock"]

for _composite in (EdgeNeXt, EdgeNeXtStage, ConvBlock):
    register_container(_composite)


@register_converter(SplitTransposeBlock)
class FeatureSplitTransposeBlock(nn.Module):
    """timm's ``SplitTransposeBlock`` on feature maps. The same children, names and parameters; all but
    ``pos_embd`` (a dense grid computed from the map's size) and ``xca`` (run on rows here) are
    converted to the backend's layers."""

    def __init__(self, backend, block: SplitTransposeBlock, name: str = ""):
        super().__init__()
        adopt_module(self, block)
        for optional in ("pos_embd", "gamma_xca", "gamma"):       # None (a plain attribute) where switched off
            if getattr(block, optional) is None:
                setattr(self, optional, None)
        backend.convert_children(self, prefix=f"{name}.", skip=frozenset({f"{name}.pos_embd", f"{name}.xca"}))

    def forward(self, x: FeatureMap) -> FeatureMap:
        shortcut = x
        groups = x.chunk(len(self.convs) + 1, dim=1)
        outputs, part = [], groups[0]
        for i, conv in enumerate(self.convs):
            part = conv(part if i == 0 else part + groups[i])
            outputs.append(part)
        x = FeatureMap.concat_channels(outputs + [groups[-1]])
        coords = x.mask.coords_at(x.stride)
        if self.pos_embd is not None:
            height, width = x.mask.map_hw(x.stride)
            grid = self.pos_embd((1, height, width))[0].flatten(1)             # (C, H * W)
            # index_select, whose backward is an index-add: deterministic on the CPU, unlike the
            # accumulating index_put that advanced indexing's backward is
            at_sites = grid.index_select(1, coords[:, 1] * width + coords[:, 2]).t()
            x = x + x.with_active_rows(at_sites.to(x.data.dtype))
        attended = x.with_active_rows(self._cross_covariance(self.norm_xca(x).active_rows(), coords[:, 0],
                                                             x.mask.batch_size))
        if self.gamma_xca is not None:
            attended = attended.per_site(lambda values: values * self.gamma_xca)
        x = x + self.drop_path(attended)
        x = self.mlp(self.norm(x))
        if self.gamma is not None:
            x = x.per_site(lambda values: values * self.gamma)
        return shortcut + self.drop_path(x)

    def _cross_covariance(self, rows: torch.Tensor, image_of_row: torch.Tensor, batch: int) -> torch.Tensor:
        """timm's ``CrossCovarianceAttn`` over each image's active rows ``[N, C]`` -> ``[N, C]``."""
        xca = self.xca
        heads = xca.num_heads
        q, k, v = xca.qkv(rows).reshape(rows.shape[0], 3, heads, -1).unbind(1)    # [N, heads, c] each
        q, k = normalize_per_image(q, image_of_row, batch), normalize_per_image(k, image_of_row, batch)
        attn = sum_per_image(q.unsqueeze(-1) * k.unsqueeze(-2), image_of_row, batch)   # [B, heads, c, c]
        attn = xca.attn_drop((attn * xca.temperature).softmax(dim=-1))
        out = torch.einsum("nhij,nhj->nhi", attn.index_select(0, image_of_row), v).reshape(rows.shape[0], -1)
        return xca.proj_drop(xca.proj(out))


register_timm_encoder("edgenext_small", 0.1, densify_norm="ln", tested=True)
