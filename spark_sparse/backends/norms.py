"""Norms beyond BatchNorm and LayerNorm, on active sites: timm's norm + activation layers, GroupNorm, GRN.

SparK's rule for every norm: statistics come from active sites only, and masked sites are exactly
zero afterwards. BatchNorm and LayerNorm (in :mod:`.common`) follow it by construction; here:

- ``BatchNormAct2d`` / ``SyncBatchNormAct`` (timm): the BatchNorm above, then the layer's ``drop``
  then its ``act``, each converted like any module (so a non-zero-preserving activation or a
  DropBlock is refused, never run);
- ``GroupNorm`` (torch's, timm's ``GroupNorm``/``GroupNorm1``) and ``GroupNormAct``/``GroupNorm1Act``:
  mean and (biased) variance per image and group over the image's ACTIVE sites only;
- ConvNeXt-V2's ``GlobalResponseNorm``: each image's L2 norm over its active sites.

All of them are registered as shared converters (every backend runs them alike, through
:mod:`.per_image`). See docs/sparse_semantics.md for the formulas.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import GroupNorm, GroupNorm1
from timm.layers.grn import GlobalResponseNorm
from timm.layers.norm_act import BatchNormAct2d, GroupNorm1Act, GroupNormAct, SyncBatchNormAct

from ..features import ChannelsLastView, FeatureMap
from .base import register_converter
from .common import FeatureBatchNorm, FeatureSyncBatchNorm, LastDimensionLayer, adopt_state, refuse_channels_last_view
from .per_image import active_counts, image_sums, per_site_values, statistics_dtype

__all__ = ["FeatureBatchNormAct", "FeatureSyncBatchNormAct", "FeatureGroupNorm", "FeatureGroupNormAct",
           "FeatureGlobalResponseNorm", "group_norm_active"]


def _convert_drop_and_act(backend, new: nn.Module, old: nn.Module, name: str) -> nn.Module:
    """Give ``new`` the converted ``drop`` and ``act`` children of a timm norm + activation layer."""
    new.drop = backend.convert_module(old.drop, f"{name}.drop")
    new.act = backend.convert_module(old.act, f"{name}.act")
    return new


class FeatureBatchNormAct(FeatureBatchNorm):
    """timm's ``BatchNormAct2d``: BatchNorm over active sites, then ``drop``, then ``act``."""

    def forward(self, x: FeatureMap) -> FeatureMap:
        return self.act(self.drop(super().forward(x)))

    @classmethod
    def from_dense(cls, backend, bn: BatchNormAct2d, name: str = "") -> "FeatureBatchNormAct":
        return _convert_drop_and_act(backend, super().from_dense(backend, bn, name), bn, name)


class FeatureSyncBatchNormAct(FeatureSyncBatchNorm):
    """timm's ``SyncBatchNormAct`` (``timm.layers.convert_sync_batchnorm`` of ``BatchNormAct2d``)."""

    def forward(self, x: FeatureMap) -> FeatureMap:
        return self.act(self.drop(super().forward(x)))

    @classmethod
    def from_dense(cls, backend, bn: SyncBatchNormAct, name: str = "") -> "FeatureSyncBatchNormAct":
        return _convert_drop_and_act(backend, super().from_dense(backend, bn, name), bn, name)


def group_norm_active(x: FeatureMap, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      eps: float) -> FeatureMap:
    """GroupNorm with each image's statistics taken over its active sites only.

    For image ``b`` and group ``g`` of ``C / G`` channels: ``mean`` and biased ``var`` over the
    ``n_b * C / G`` values of its ``n_b`` active sites; ``y = (x - mean) / sqrt(var + eps) * w + b``
    at active sites, 0 at masked ones. With every site active this is ``F.group_norm``. bf16/fp16
    inputs are normalised in fp32 and give fp32 (as autocast runs ``group_norm``).
    """
    x = x.with_data(x.data.to(statistics_dtype(x.data.dtype)))
    batch, channels = x.mask.batch_size, x.channels
    per_group = channels // num_groups
    count = (active_counts(x) * per_group).unsqueeze(1)                                          # [B, 1]

    def per_channel(group_values: torch.Tensor) -> torch.Tensor:                                  # [B, G] -> [B, C]
        return group_values.repeat_interleave(per_group, dim=1)

    def group_sums(values: torch.Tensor) -> torch.Tensor:                                         # -> [B, G]
        return image_sums(x, values).view(batch, num_groups, per_group).sum(dim=2)

    mean = group_sums(x.data) / count
    centered = x.data - per_site_values(x, per_channel(mean))                                     # 0 at masked sites
    var = group_sums(centered * centered) / count
    scale = per_channel((var + eps).rsqrt())
    if weight is not None:
        scale = scale * weight
    out = centered * per_site_values(x, scale)
    if bias is not None:
        out = out + per_site_values(x, bias.expand(batch, channels))
    return x.with_data(out)


class FeatureGroupNorm(nn.GroupNorm):
    """GroupNorm per image over its active sites (torch's ``nn.GroupNorm`` parameter names)."""

    def forward(self, x: FeatureMap) -> FeatureMap:
        return group_norm_active(x, self.num_groups, self.weight, self.bias, self.eps)

    @classmethod
    def from_dense(cls, backend, gn: nn.GroupNorm, name: str = "") -> "FeatureGroupNorm":
        new = cls(gn.num_groups, gn.num_channels, eps=gn.eps, affine=gn.affine)
        return adopt_state(new, gn)


class FeatureGroupNormAct(FeatureGroupNorm):
    """timm's ``GroupNormAct`` / ``GroupNorm1Act``: GroupNorm over active sites, then ``drop``, then ``act``."""

    def forward(self, x: FeatureMap) -> FeatureMap:
        return self.act(self.drop(super().forward(x)))

    @classmethod
    def from_dense(cls, backend, gn: nn.GroupNorm, name: str = "") -> "FeatureGroupNormAct":
        return _convert_drop_and_act(backend, super().from_dense(backend, gn, name), gn, name)



def _norm_with_zero_gradient_at_zero(squares: torch.Tensor) -> torch.Tensor:
    """``sqrt(squares)`` whose gradient at 0 is 0 (as ``torch.linalg.vector_norm``'s), not NaN."""
    positive = squares > 0
    return torch.where(positive, torch.where(positive, squares, torch.ones_like(squares)).sqrt(),
                       torch.zeros_like(squares))


class FeatureGlobalResponseNorm(LastDimensionLayer, GlobalResponseNorm):
    """ConvNeXt-V2's GRN with each image's L2 norm over its ACTIVE sites.

    ``G[b, c] = ||x[b, :, c]||_2`` over the active sites of image ``b``; ``N = G / (mean_c G + eps)``;
    ``y = x + bias + weight * (x * N)`` at active sites, 0 at masked ones (the bias would otherwise
    fill them). Per image, unlike the FCMAE code, which normalises over the whole batch
    (ConvNeXt-V2 issue 86); with every site active this is timm's GRN. bf16/fp16 inputs are
    computed in fp32 and give fp32. Its layout is timm's ``channels_last``: a channels-last GRN takes
    a channels-last view (and, under a user's forward, only a view: :class:`LastDimensionLayer`), a
    channels-first one refuses a view.
    """

    def forward(self, x: FeatureMap) -> FeatureMap:
        if isinstance(x, ChannelsLastView):
            if self.channel_dim != -1:
                refuse_channels_last_view(x, "GlobalResponseNorm(channels_last=False)")
            return ChannelsLastView(self._normalise(x.channels_first))
        if self.channel_dim == -1:
            self.check_layout(x, "GlobalResponseNorm(channels_last=True)")
        return self._normalise(x)

    def _normalise(self, x: FeatureMap) -> FeatureMap:
        x = x.with_data(x.data.to(statistics_dtype(x.data.dtype)))
        batch, channels = x.mask.batch_size, x.channels
        norm = _norm_with_zero_gradient_at_zero(image_sums(x, x.data * x.data))                 # [B, C]
        normalized = norm / (norm.mean(dim=1, keepdim=True) + self.eps)
        response = per_site_values(x, self.weight.expand(batch, channels)) * (x.data * per_site_values(x, normalized))
        return x.with_data(x.data + (per_site_values(x, self.bias.expand(batch, channels)) + response))

    @classmethod
    def from_dense(cls, backend, grn: GlobalResponseNorm, name: str = "") -> "FeatureGlobalResponseNorm":
        new = cls(grn.weight.shape[0], eps=grn.eps, channels_last=grn.channel_dim == -1)
        return adopt_state(new, grn)


register_converter(BatchNormAct2d)(FeatureBatchNormAct.from_dense)
register_converter(SyncBatchNormAct)(FeatureSyncBatchNormAct.from_dense)
# timm's GroupNorm and GroupNorm1 are nn.GroupNorm with an optional fused kernel: the same maths
register_converter(nn.GroupNorm, GroupNorm, GroupNorm1)(FeatureGroupNorm.from_dense)
register_converter(GroupNormAct, GroupNorm1Act)(FeatureGroupNormAct.from_dense)
register_converter(GlobalResponseNorm)(FeatureGlobalResponseNorm.from_dense)
