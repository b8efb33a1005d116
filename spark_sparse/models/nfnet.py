"""timm's normalisation-free nets (NF-ResNet, NFNet, ECA-NFNet) on every backend.

NF-Nets replace BatchNorm by weight-standardised convs (``ScaledStdConv2d``, and
``ScaledStdConv2dSame`` with TensorFlow padding in the DeepMind ports: both convert with their
weight transform) and scalar gains: a block computes ``act1(x) * beta``, its residual branch (with SE
or ECA attention times ``attn_gain``, a drop path and a skip-init gain ``out.mul_(gain)``), then
``out * alpha + shortcut``. Scalar factors keep masked sites exactly zero, so feature maps accept
them (:meth:`~spark_sparse.features.FeatureMap.__mul__`); the blocks, the net and the average-pool
shortcut are containers. The activations are ``GammaAct`` (``act(x) * gamma``), converted here when
the activation maps 0 to 0 (ReLU, SiLU, GELU: all timm uses) and refused otherwise.

No BatchNorm also means no densify norm to pick from the encoder: SparK's decoder side keeps its
BatchNorm (densify norm ``bn``). Default drop path 0.05 for the ResNet-50-sized nets, as ResNet-50's.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.nfnet import DownsampleAvg, GammaAct, NormFreeBlock, NormFreeNet

from ..backends import UnsupportedModuleError, register_container, register_converter
from ..features import FeatureMap
from .timm_encoders import register_timm_encoder

__all__ = ["FeatureGammaAct"]

for _composite in (NormFreeNet, NormFreeBlock, DownsampleAvg):
    register_container(_composite)


@register_converter(GammaAct)
class FeatureGammaAct(nn.Module):
    """NF-Nets' ``GammaAct``: ``act(x) * gamma`` at every site, for an activation with ``act(0) == 0``."""

    def __init__(self, backend, act: GammaAct, name: str = ""):
        super().__init__()
        at_zero = float(act.act_fn(torch.zeros(1)))
        if at_zero != 0.0:
            raise UnsupportedModuleError(
                f"backend {backend.name!r} cannot convert {name!r} (GammaAct of {act.act_fn!r}): the activation "
                f"gives {at_zero} at 0, which would fill masked sites")
        self.act_fn, self.gamma = act.act_fn, act.gamma

    def forward(self, x: FeatureMap) -> FeatureMap:
        return x.elementwise(lambda values: self.act_fn(values) * self.gamma)

    def extra_repr(self) -> str:
        return f"act_fn={getattr(self.act_fn, '__name__', self.act_fn)}, gamma={self.gamma}"


for _name in ("nf_resnet50", "eca_nfnet_l0"):
    register_timm_encoder(_name, 0.05, densify_norm="bn", tested=True)
