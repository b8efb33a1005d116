"""timm's EfficientViT (MIT, ICCV 2023: "Multi-Scale Linear Attention") on every backend.

Stages 1-2 are MobileNet-style convs (``DSConv``, ``MBConv``, ``FusedMBConv`` from timm's own
``ConvNormAct``), stages 3-4 add ``LiteMLA``: ReLU linear attention over the whole image. Its
queries and keys are ReLU of convolutions, so in SparK's masked model they are exactly 0 at masked
sites: a masked site adds nothing to an image's ``sum_i k_i^T [v_i, 1]`` and receives 0. Linear
attention over the image is therefore linear attention over its ACTIVE sites, which
:class:`FeatureLiteMLA` computes on rows: per image and head, ``kv[b] = sum over b's active rows of
outer(k, [v, 1])`` (an index-add over rows), then ``out = (q kv_v) / (q kv_1 + eps)`` at each active
row, in at least fp32 with autocast off as timm does. Everything else calls its children, adds
residuals and concatenates channels: containers.

Default drop path 0 (the net has none), densify norm BatchNorm (the net's own).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.efficientvit_mit import (ConvBlock, ConvNormAct, DSConv, EfficientVit, EfficientVitBlock,
                                          EfficientVitLarge, EfficientVitLargeStage, EfficientVitStage, FusedMBConv,
                                          LiteMLA, MBConv, ResidualBlock, Stem)

from ..backends import register_container, register_converter
from ..backends.common import adopt_module
from ..backends.per_image import sum_per_image
from ..features import FeatureMap
from .timm_encoders import register_timm_encoder

__all__ = ["FeatureLiteMLA"]

for _composite in (EfficientVit, EfficientVitLarge, Stem, EfficientVitStage, EfficientVitLargeStage,
                   EfficientVitBlock, ResidualBlock, ConvNormAct, DSConv, ConvBlock, MBConv, FusedMBConv):
    register_container(_composite)


@register_converter(LiteMLA)
class FeatureLiteMLA(nn.Module):
    """timm's ``LiteMLA`` on the active rows of each image. The same children, names and parameters;
    ``kernel_func`` (ReLU) stays torch's, as it acts on the rows of q and k."""

    def __init__(self, backend, attention: LiteMLA, name: str = ""):
        super().__init__()
        adopt_module(self, attention)
        backend.convert_children(self, prefix=f"{name}.", skip=frozenset({f"{name}.kernel_func"}))
        self.dim, self.eps = attention.dim, attention.eps

    def forward(self, x: FeatureMap) -> FeatureMap:
        qkv = self.qkv(x)
        multi_scale = FeatureMap.concat_channels([qkv] + [aggregate(qkv) for aggregate in self.aggreg])
        rows = multi_scale.active_rows()                                    # [N, groups * 3 * dim]
        groups = rows.shape[1] // (3 * self.dim)
        q, k, v = rows.reshape(rows.shape[0], groups, 3 * self.dim).chunk(3, dim=-1)
        q, k = self.kernel_func(q), self.kernel_func(k)
        dtype = torch.promote_types(rows.dtype, torch.float32)
        with torch.autocast(device_type=rows.device.type, enabled=False):
            q, k, v = q.to(dtype), k.to(dtype), F.pad(v.to(dtype), (0, 1), mode="constant", value=1.0)
            image_of_row = x.mask.coords_at(x.stride)[:, 0]
            kv = sum_per_image(k.unsqueeze(-1) * v.unsqueeze(-2), image_of_row,
                               x.mask.batch_size)                   # [B, groups, dim, dim + 1]
            out = torch.einsum("ngd,ngde->nge", q, kv.index_select(0, image_of_row))
            out = out[..., :-1] / (out[..., -1:] + self.eps)
        return self.proj(x.with_active_rows(out.reshape(rows.shape[0], groups * self.dim).to(rows.dtype)))


register_timm_encoder("efficientvit_b0", 0.0, densify_norm="bn", tested=True)
