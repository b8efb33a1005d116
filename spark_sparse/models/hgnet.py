"""timm's PP-HGNet (``hgnet_tiny/small/base``) and PP-HGNet-V2 (``hgnetv2_b0`` ... ``b6``) on every backend.

An HGNet block runs a chain of (light) conv-BN-act layers, concatenates the input and every layer's
output (``torch.cat(..., 1)``: the same active sites), squeezes them with 1x1 convs and, in V1, gates
the result with its ``EseModule``; a stage starts with a strided depthwise conv. The gate is converted
here as SE is (:class:`~spark_sparse.backends.attention.ImageGate`): mean over each image's active
sites, the module's own ``conv -> sigmoid`` on the squeezed vector, features times the gate.

HGNet-V2 adds two things:

- Learnable affine blocks (``scale * x + bias``, two scalars) after activations: a per-site function
  (:class:`FeatureLearnableAffine`), applied to active sites only; masked sites stay exactly zero,
  as after BatchNorm's bias.
- A stem that pads the bottom and right with ``F.pad(x, (0, 1, 0, 1))`` before a 2x2 conv and a 2x2
  stride-1 max-pool (ceil mode), and again before a second 2x2 conv. :func:`fold_stem_v2_padding`
  rewrites it into :class:`PadFreeStemV2`: each pad + 2x2 conv is timm's ``Conv2dSame`` (TensorFlow's
  "SAME" pads a 2x2 stride-1 conv by exactly (0, 1, 0, 1)), the pad + pool a
  :class:`~spark_sparse.backends.pools.ConstantPadMaxPool2d` with that padding, where masked sites and
  the padding both read 0. Same parameters, names and output; the rewrite checks the output on a
  random image against timm's stem and refuses a stem it does not reproduce.

Default drop path 0 (SparK's ``--dp`` default for small nets), densify norm BatchNorm.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import Conv2dSame
from timm.models.hgnet import (ConvBNAct, EseModule, HighPerfGpuBlock, HighPerfGpuNet, HighPerfGpuStage,
                               LearnableAffineBlock, LightConvBNAct, StemV1, StemV2)

from ..backends import register_container, register_converter
from ..backends.attention import ImageGate
from ..backends.common import adopt_state
from ..backends.pools import ConstantPadMaxPool2d
from ..features import FeatureMap
from .timm_encoders import UnsuitableModelError, register_timm_encoder, register_timm_rewrite

__all__ = ["FeatureEseModule", "FeatureLearnableAffine", "PadFreeStemV2", "fold_stem_v2_padding"]

#: F.pad's (left, right, top, bottom) of HGNet-V2's stem
_STEM_V2_PAD = (0, 1, 0, 1)


class FeatureEseModule(ImageGate):
    """HGNet's ``EseModule``: ``conv -> sigmoid`` on the active-site means, features times the gate."""

    def excite(self, squeezed: torch.Tensor) -> torch.Tensor:
        return self.sigmoid(self.conv(squeezed))


class FeatureLearnableAffine(LearnableAffineBlock):
    """HGNet-V2's ``scale * x + bias`` on each active site (masked sites stay zero)."""

    def forward(self, x: FeatureMap) -> FeatureMap:
        return x.per_site(lambda values: self.scale * values + self.bias)

    @classmethod
    def from_dense(cls, backend, block: LearnableAffineBlock, name: str = "") -> "FeatureLearnableAffine":
        return adopt_state(cls(), block)


def _same_padded(conv: nn.Conv2d, where: str) -> Conv2dSame:
    """``conv`` (2x2, stride 1, no padding) reading its input padded by (0, 1, 0, 1): timm's SAME conv."""
    if (type(conv) is not nn.Conv2d or tuple(conv.kernel_size) != (2, 2) or tuple(conv.stride) != (1, 1)
            or tuple(conv.padding) != (0, 0) or tuple(conv.dilation) != (1, 1)):
        raise UnsuitableModelError(f"{where}: expected HGNet-V2's 2x2 stride-1 unpadded stem conv, found {conv}")
    same = Conv2dSame(conv.in_channels, conv.out_channels, 2, stride=1, padding=0, groups=conv.groups,
                      bias=conv.bias is not None)
    return adopt_state(same, conv)


class PadFreeStemV2(nn.Module):
    """HGNet-V2's stem with its ``F.pad`` calls folded into the layers that read the padding.

    Children and parameter names are ``StemV2``'s, so state dicts load both ways.
    """

    def __init__(self, stem: StemV2):
        super().__init__()
        pool = stem.pool
        if type(pool) is not nn.MaxPool2d or pool.kernel_size not in (2, (2, 2)) or pool.stride not in (1, (1, 1)) \
                or pool.padding not in (0, (0, 0)) or pool.dilation not in (1, (1, 1)):
            raise UnsuitableModelError(f"HGNet-V2 stem: expected a 2x2 stride-1 max-pool, found {pool}")
        self.stem1 = stem.stem1
        self.stem2a = stem.stem2a
        self.stem2a.conv = _same_padded(stem.stem2a.conv, "stem2a.conv")
        self.stem2b = stem.stem2b
        self.stem2b.conv = _same_padded(stem.stem2b.conv, "stem2b.conv")
        self.stem3 = stem.stem3
        self.stem4 = stem.stem4
        # with stride 1, ceil mode changes no output size; the padding competes as a zero
        self.pool = ConstantPadMaxPool2d(2, 1, _STEM_V2_PAD)

    def forward(self, x):
        x = self.stem1(x)
        branch = self.stem2b(self.stem2a(x))
        x = torch.cat([self.pool(x), branch], dim=1)
        return self.stem4(self.stem3(x))


def fold_stem_v2_padding(model: nn.Module) -> None:
    """Replace every ``StemV2`` below ``model`` by a :class:`PadFreeStemV2` (in place), after checking
    on a random image that the new stem computes what timm's does."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not StemV2:
                continue
            param = next(child.parameters())
            probe = torch.randn(1, child.stem1.conv.in_channels, 32, 32, generator=torch.Generator().manual_seed(0))
            probe = probe.to(param.device, param.dtype)
            was_training = child.training
            child.eval()
            with torch.no_grad():
                want = child(probe)
                folded = PadFreeStemV2(child)
                got = folded(probe)
            folded.train(was_training)
            if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
                raise UnsuitableModelError(f"timm's HGNet-V2 stem ({child_name}) no longer computes what "
                                           f"spark_sparse's pad-free stem does (timm changed?); refusing the model "
                                           f"rather than pre-training other maths")
            setattr(parent, child_name, folded)


for _composite in (HighPerfGpuNet, HighPerfGpuStage, HighPerfGpuBlock, ConvBNAct, LightConvBNAct, StemV1,
                   PadFreeStemV2):
    register_container(_composite)
register_converter(EseModule)(FeatureEseModule.from_dense)
register_converter(LearnableAffineBlock)(FeatureLearnableAffine.from_dense)
register_timm_rewrite(fold_stem_v2_padding)
register_timm_encoder("hgnet_tiny", 0.0, densify_norm="bn", tested=True)
register_timm_encoder("hgnetv2_b0", 0.0, densify_norm="bn", tested=True)
