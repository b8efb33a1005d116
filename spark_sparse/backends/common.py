"""Layers that run the same way on every backend, written against :class:`FeatureMap`.

Only convolution and pooling differ between backends (dense-and-mask vs a sparse kernel). Norms,
activations, Linear/Mlp, DropPath, layer-scale and residual adds act on each active site's channel
vector, so they are written once here and every backend's converter table starts from
:data:`COMMON_CONVERTERS`. Each replacement adopts the original module's parameters and buffers
(the same ``nn.Parameter`` objects), so parameter names and state dicts stay timm's.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm, LayerNorm2d

from ..features import FeatureMap

__all__ = ["adopt_state", "FeatureBatchNorm", "FeatureSyncBatchNorm", "FeatureLayerNorm", "FeatureLinear", "Elementwise",
           "FeatureDropPath", "COMMON_CONVERTERS", "ZERO_PRESERVING_ACTIVATIONS"]


def adopt_state(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` the very parameter and buffer objects of ``old`` (no copy), and its train flag."""
    for name, param in old._parameters.items():
        new._parameters[name] = param
    for name, buf in old._buffers.items():
        new._buffers[name] = buf
    new.train(old.training)
    return new


class FeatureBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose batch statistics (and running statistics) come from active sites only.

    This is SparK's ``SparseBatchNorm2d``: gather the active sites to ``[N, C]`` and normalise them
    as BatchNorm1d would. Parameter names are BatchNorm2d's.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 2:
            raise ValueError(f"expected active rows [N, C], got shape {tuple(input.shape)}")

    def forward(self, x: FeatureMap) -> FeatureMap:
        return x.with_active_rows(super().forward(x.active_rows()))

    @classmethod
    def from_dense(cls, backend, bn: nn.modules.batchnorm._BatchNorm, name: str = "") -> "FeatureBatchNorm":
        new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats)
        return adopt_state(new, bn)


class FeatureSyncBatchNorm(nn.SyncBatchNorm):
    """:class:`FeatureBatchNorm` with statistics synchronised across processes (SparK's ``--sbn``)."""

    def forward(self, x: FeatureMap) -> FeatureMap:
        return x.with_active_rows(super().forward(x.active_rows()))

    @classmethod
    def from_dense(cls, backend, bn: nn.modules.batchnorm._BatchNorm, name: str = "") -> "FeatureSyncBatchNorm":
        new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats)
        return adopt_state(new, bn)


class FeatureLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each active site (timm's ``LayerNorm`` and ``LayerNorm2d``)."""

    def forward(self, x: FeatureMap) -> FeatureMap:
        return x.per_site(lambda v: F.layer_norm(v, self.normalized_shape, self.weight, self.bias, self.eps))

    @classmethod
    def from_dense(cls, backend, ln: nn.LayerNorm, name: str = "") -> "FeatureLayerNorm":
        new = cls(ln.normalized_shape, eps=ln.eps, elementwise_affine=ln.elementwise_affine,
                  bias=ln.bias is not None)
        return adopt_state(new, ln)


class FeatureLinear(nn.Linear):
    """A Linear layer applied to each active site's channel vector (channels-last layers)."""

    def forward(self, x: FeatureMap) -> FeatureMap:
        return x.per_site(lambda v: F.linear(v, self.weight, self.bias))

    @classmethod
    def from_dense(cls, backend, linear: nn.Linear, name: str = "") -> "FeatureLinear":
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        return adopt_state(new, linear)


class Elementwise(nn.Module):
    """Apply a zero-preserving elementwise module to the feature values, keeping its state names."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: FeatureMap) -> FeatureMap:
        return x.elementwise(self.fn)


#: f(0) == 0, so applying them to masked zeros keeps them zero (SparK relies on this too).
ZERO_PRESERVING_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Hardswish, nn.Mish,
                               nn.Tanh, nn.ELU, nn.Dropout)


class FeatureDropPath(DropPath):
    """timm's per-sample DropPath on a feature map; draws its factors like timm does."""

    def forward(self, x: FeatureMap) -> FeatureMap:
        return x.drop_path(self.drop_prob, self.training, self.scale_by_keep)

    @classmethod
    def from_dense(cls, backend, dp: DropPath, name: str = "") -> "FeatureDropPath":
        return adopt_state(cls(dp.drop_prob, dp.scale_by_keep), dp)


def _elementwise(backend, module, name):
    return Elementwise(module)


COMMON_CONVERTERS: dict = {
    nn.BatchNorm2d: FeatureBatchNorm.from_dense,
    nn.SyncBatchNorm: FeatureSyncBatchNorm.from_dense,
    # timm's LayerNorm (channels last) and LayerNorm2d (channels first) normalise each site's channels too
    nn.LayerNorm: FeatureLayerNorm.from_dense,
    LayerNorm: FeatureLayerNorm.from_dense,
    LayerNorm2d: FeatureLayerNorm.from_dense,
    nn.Linear: FeatureLinear.from_dense,
    DropPath: FeatureDropPath.from_dense,
    nn.Identity: lambda backend, module, name: module,
    **{act: _elementwise for act in ZERO_PRESERVING_ACTIVATIONS},
}
