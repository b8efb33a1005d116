"""timm's PP-HGNet (``hgnet_tiny/small/base``) on every backend.

An HGNet block runs a chain of (light) conv-BN-act layers, concatenates the input and every layer's
output (``torch.cat(..., 1)``: the same active sites), squeezes them with a 1x1 conv and gates the
result with its ``EseModule``; a stage starts with a strided depthwise conv. The gate is converted
here as SE is (:class:`~spark_sparse.backends.attention.ImageGate`): mean over each image's active
sites, the module's own ``conv -> sigmoid`` on the squeezed vector, features times the gate.

HGNet-V2 is not registered: its stem pads with ``F.pad`` (asymmetric, before a ceil-mode pool) and
its learnable affine blocks add a bias at every site; it fails at conversion, naming the stem.

Default drop path 0 (SparK's ``--dp`` default for small nets), densify norm BatchNorm.
"""
from __future__ import annotations

import torch
from timm.models.hgnet import (ConvBNAct, EseModule, HighPerfGpuBlock, HighPerfGpuNet, HighPerfGpuStage,
                               LightConvBNAct, StemV1)

from ..backends import register_container, register_converter
from ..backends.attention import ImageGate
from .timm_encoders import register_timm_encoder

__all__ = ["FeatureEseModule"]

for _composite in (HighPerfGpuNet, HighPerfGpuStage, HighPerfGpuBlock, ConvBNAct, LightConvBNAct, StemV1):
    register_container(_composite)


class FeatureEseModule(ImageGate):
    """HGNet's ``EseModule``: ``conv -> sigmoid`` on the active-site means, features times the gate."""

    def excite(self, squeezed: torch.Tensor) -> torch.Tensor:
        return self.sigmoid(self.conv(squeezed))


register_converter(EseModule)(FeatureEseModule.from_dense)
register_timm_encoder("hgnet_tiny", 0.0, densify_norm="bn", tested=True)
